"""Multi-process CPU (gloo) runs through every launcher: torchrun, torch.distributed.launch with and without
--use_env, SLURM variables, and submitit's local executor. Distributed eval must equal a 1-process eval."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST, REPO, TINY_HVT, free_port, run_script

DIGITS = ['--data-set', 'DIGITS']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def eval_json(path):
    return json.loads((path / 'eval.json').read_text())


@pytest.fixture(scope='module')
def torchrun_training(tmp_path_factory):
    """2 processes train 1 epoch (RASampler on) and evaluate; the checkpoint is scored again below."""
    out = tmp_path_factory.mktemp('torchrun')
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--epochs', '1', '--max-steps-per-epoch', '8', '--output_dir', out],
                     script=[*TORCHRUN, 'main.py'])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out, res


@pytest.fixture(scope='module')
def single_process_eval(torchrun_training, tmp_path_factory):
    out, _ = torchrun_training
    ev = tmp_path_factory.mktemp('eval1')
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--eval', '--resume', out / 'checkpoint.pth', '--output_dir', ev])
    assert res.returncode == 0, res.stderr[-3000:]
    return eval_json(ev)


def test_torchrun_trains_and_evaluates_every_sample_once(torchrun_training, single_process_eval):
    out, res = torchrun_training
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert len(log) == 1 and log[0]['test_n_samples'] == 450
    assert single_process_eval['n_samples'] == 450
    assert log[0]['test_acc1'] == pytest.approx(single_process_eval['acc1'], abs=1e-6)
    assert log[0]['test_loss'] == pytest.approx(single_process_eval['loss'], rel=1e-5)
    rng = torch.load(out / 'checkpoint.pth', weights_only=True)['rng_states']
    assert len(rng) == 2 and not torch.equal(rng[0]['torch'], rng[1]['torch'])   # one state per rank


def test_legacy_launch_without_use_env(torchrun_training, single_process_eval, tmp_path):
    """``python -m torch.distributed.launch`` without --use_env appends --local-rank=N to argv."""
    out, _ = torchrun_training
    launch = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', f'--master_port={free_port()}',
              'main.py']
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--eval', '--resume', out / 'checkpoint.pth',
                      '--output_dir', tmp_path], script=launch)
    assert res.returncode == 0, res.stderr[-3000:]
    result = eval_json(tmp_path)
    assert result['world_size'] == 2 and result['n_samples'] == 450
    assert result['acc1'] == pytest.approx(single_process_eval['acc1'], abs=1e-6)


def test_legacy_launch_with_use_env(torchrun_training, single_process_eval, tmp_path):
    out, _ = torchrun_training
    launch = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=3', '--use_env',
              f'--master_port={free_port()}', 'main.py']
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--eval', '--resume', out / 'checkpoint.pth',
                      '--output_dir', tmp_path], script=launch)
    assert res.returncode == 0, res.stderr[-3000:]
    result = eval_json(tmp_path)
    assert result['world_size'] == 3 and result['n_samples'] == 450   # 450 = 3 x 150; no padding either way
    assert result['acc1'] == pytest.approx(single_process_eval['acc1'], abs=1e-6)


def test_slurm_variables(torchrun_training, single_process_eval, tmp_path):
    """Two processes started the way srun starts them: only SLURM_* variables, no RANK/WORLD_SIZE."""
    out, _ = torchrun_training
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS='2', SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST='127.0.0.1',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        cmd = [sys.executable, 'main.py', *TINY_HVT, *FAST, *DIGITS, '--eval', '--resume',
               str(out / 'checkpoint.pth'), '--output_dir', str(tmp_path)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    result = eval_json(tmp_path)
    assert result['world_size'] == 2 and result['n_samples'] == 450
    assert result['acc1'] == pytest.approx(single_process_eval['acc1'], abs=1e-6)


def test_nan_on_two_ranks_stops_both(tmp_path):
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--epochs', '2', '--max-steps-per-epoch', '4', '--lr', '1e30',
                      '--output_dir', tmp_path], script=[*TORCHRUN, 'main.py'], timeout=240)
    assert res.returncode != 0
    assert res.stderr.count('training stopped on every rank: loss is') == 1     # said once, by rank 0
    assert 'engine.py", line' not in res.stderr   # no traceback of ours (torchrun prints its own on exit 1)


def test_submitit_local_executor_runs_and_requeues(tmp_path):
    import run_with_submitit
    job = run_with_submitit.submit(['--executor', 'local', '--ngpus', '1', '--timeout', '10', *TINY_HVT, *FAST,
                                    *DIGITS, '--epochs', '1', '--max-steps-per-epoch', '3', '--device', 'cpu',
                                    '--output_dir', str(tmp_path / 'out')])
    assert job.result() == 0, job.stderr()
    log = [json.loads(line) for line in (tmp_path / 'out' / 'log.txt').read_text().splitlines()]
    assert log[0]['test_n_samples'] == 450
    # the timeout/pre-emption hook requeues the same command with a fresh rendezvous file
    trainer = run_with_submitit.Trainer(['--output_dir', str(tmp_path / 'out')], str(tmp_path / 'a_init'))
    delayed = trainer.checkpoint()
    assert delayed.function.main_argv == trainer.main_argv and delayed.function.init_file != trainer.init_file
    assert run_with_submitit.submit(['--executor', 'local', '--epochs', '1']) == 2   # no output_dir: refused
