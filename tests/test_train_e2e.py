"""main.py end to end on tiny data: training, outputs, checkpoints, eval-only, kill and resume, EMA, NaN stop."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import DIGITS, FAST, REPO, TINY_HVT, one_error_line, read_log, run_script
import utils

DEIT_LOG_KEYS = {'train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters'}


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """One epoch of a tiny HVT on DIGITS (30 steps), shared by the tests below."""
    out = tmp_path_factory.mktemp('digits_run')
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--epochs', '1', '--max-steps-per-epoch', '30',
                      '--output_dir', out])
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_digits_epoch_writes_deit_outputs(digits_run):
    out, res = digits_run
    assert 'number of params: ' in res.stdout
    log = read_log(out)
    assert len(log) == 1 and DEIT_LOG_KEYS <= set(log[0]) and log[0]['epoch'] == 0
    assert log[0]['test_n_samples'] == 450 and log[0]['train_images_per_sec'] > 0
    assert log[0]['test_acc1'] > 15.0, 'a tiny HVT should beat chance (10%) after 30 steps on digits'
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)   # plain types only
    assert {'model', 'optimizer', 'lr_scheduler', 'scaler', 'model_ema', 'epoch', 'max_accuracy', 'rng_states',
            'args'} <= set(ckpt)
    assert ckpt['epoch'] == 0 and ckpt['max_accuracy'] == pytest.approx(log[0]['test_acc1'])
    assert isinstance(ckpt['args'], dict) and ckpt['args']['batch_size'] == 16
    assert (out / 'best_checkpoint.pth').is_file()
    config = json.loads((out / 'config.json').read_text())
    assert config['model'] == 'hvt_model' and config['pool_block_width'] == 1 and config['input_size'] == 32
    assert not list(out.glob('*.tmp'))


def test_eval_only_scores_checkpoint_exactly(digits_run, tmp_path):
    out, _ = digits_run
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--eval', '--resume', out / 'checkpoint.pth',
                      '--output_dir', tmp_path])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / 'eval.json').read_text())
    assert {'acc1', 'acc5', 'loss', 'n_samples', 'checkpoint', 'model', 'input_size'} <= set(result)
    assert result['n_samples'] == 450 and result['model'] == 'hvt_model' and result['input_size'] == 32
    # the setting scored: plain model, its GMACs (fvcore) at that input size, the data config used
    from framework import counting
    import models
    tiny = models.create_model('hvt_model', img_size=32, patch_size=8, num_heads=2, head_dim=8, num_blocks=2,
                               pool_block_width=1, num_classes=10)
    assert result['token_reduction'] is None and result['gmacs_convention'] == 'fvcore'
    assert result['gmacs'] == counting.count_macs(tiny, 32)[0] / 1e9
    assert (result['crop_pct'], result['interpolation']) == (0.875, 'bicubic')
    assert result['acc1'] == pytest.approx(read_log(out)[0]['test_acc1'], abs=1e-6)
    assert result['loss'] == pytest.approx(read_log(out)[0]['test_loss'], rel=1e-5)
    assert 'Acc@1' in res.stdout


def test_eval_only_does_not_need_the_training_set(fake_imagenet, tmp_path):
    val_only = tmp_path / 'imnet'
    shutil.copytree(fake_imagenet / 'val', val_only / 'val')
    res = run_script([*TINY_HVT, *FAST, '--data-set', 'IMNET', '--data-path', val_only, '--eval', '--random-weights',
                      '--output_dir', tmp_path / 'out'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / 'out' / 'eval.json').read_text())['n_samples'] == 12


def test_fake_imagenet_folder_trains(fake_imagenet, tmp_path):
    res = run_script([*TINY_HVT, *FAST, '--data-set', 'IMNET', '--data-path', fake_imagenet, '--epochs', '1',
                      '--batch-size', '8', '--input-size', '32', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25',
                      '--mixup', '0.8', '--cutmix', '1.0', '--output_dir', tmp_path])
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(tmp_path)
    assert log[0]['test_n_samples'] == 12 and log[0]['n_parameters'] > 0


def test_cifar100_upsampled_trains(fake_cifar, tmp_path):
    res = run_script([*TINY_HVT, *FAST, '--data-set', 'CIFAR', '--data-path', fake_cifar, '--epochs', '1',
                      '--input-size', '48', '--output_dir', tmp_path])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert ckpt['model']['head.weight'].shape[0] == 100


RESUME_RUN = [*TINY_HVT, *FAST, *DIGITS, '--epochs', '4', '--max-steps-per-epoch', '12', '--drop-path', '0.1',
              '--model-ema', '--model-ema-decay', '0.9']


def test_killed_run_resumes_where_it_stopped(tmp_path):
    """Kill a run after its first epoch, restart the same command: it continues from the checkpoint, and the
    result equals an uninterrupted run (model, optimizer, scheduler, EMA and RNG states all restored)."""
    straight = tmp_path / 'straight'
    res = run_script([*RESUME_RUN, '--output_dir', straight])
    assert res.returncode == 0, res.stderr[-3000:]

    killed = tmp_path / 'killed'
    cmd = [sys.executable, 'main.py', *RESUME_RUN, '--output_dir', str(killed)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed / 'log.txt').is_file() and (killed / 'checkpoint.pth').is_file():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = torch.load(killed / 'checkpoint.pth', weights_only=True)['epoch']
    assert done_before < 3, 'the run finished before it could be killed'

    res = run_script([*RESUME_RUN, '--output_dir', killed])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'resumed from epoch {done_before}' in res.stdout
    log_a, log_b = read_log(straight), read_log(killed)
    assert [r['epoch'] for r in log_b] == [0, 1, 2, 3]
    for a, b in zip(log_a, log_b):
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-5, abs=1e-6)
        assert b['test_acc1'] == pytest.approx(a['test_acc1'], abs=1e-6)
        assert b['test_acc1_ema'] == pytest.approx(a['test_acc1_ema'], abs=1e-6)
    ckpt_a = torch.load(straight / 'checkpoint.pth', weights_only=True)
    ckpt_b = torch.load(killed / 'checkpoint.pth', weights_only=True)
    for key, value in ckpt_a['model'].items():
        assert torch.allclose(value, ckpt_b['model'][key], atol=1e-5), key
    for key, value in ckpt_a['model_ema'].items():
        assert torch.allclose(value, ckpt_b['model_ema'][key], atol=1e-5), key
    assert ckpt_b['max_accuracy'] == pytest.approx(max(r['test_acc1'] for r in log_a))


def test_best_accuracy_survives_resume(digits_run, tmp_path):
    out, _ = digits_run
    shutil.copytree(out, tmp_path / 'run', dirs_exist_ok=True)
    best_before = (tmp_path / 'run' / 'best_checkpoint.pth').read_bytes()
    # one more epoch at lr 0 cannot improve; the best checkpoint must not be overwritten after the resume
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--epochs', '2', '--max-steps-per-epoch', '2', '--lr', '0',
                      '--min-lr', '0', '--output_dir', tmp_path / 'run'])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    first = read_log(out)[0]['test_acc1']
    assert read_log(tmp_path / 'run')[1]['test_acc1'] == pytest.approx(first)   # lr 0: same weights, same score
    assert ckpt['epoch'] == 1 and ckpt['max_accuracy'] == pytest.approx(first) and ckpt['best_epoch'] == 0
    assert (tmp_path / 'run' / 'best_checkpoint.pth').read_bytes() == best_before   # DeiT would overwrite it


def test_ema_is_evaluated_and_scored(tmp_path):
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--epochs', '1', '--max-steps-per-epoch', '5', '--model-ema',
                      '--model-ema-decay', '0.5', '--output_dir', tmp_path])
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(tmp_path)[0]
    assert 'test_acc1_ema' in log and (tmp_path / 'best_checkpoint_ema.pth').is_file()
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--eval', '--eval-ema', '--resume', tmp_path / 'checkpoint.pth',
                      '--output_dir', tmp_path / 'ev'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / 'ev' / 'eval.json').read_text())['acc1'] == pytest.approx(log['test_acc1_ema'])


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    # epoch 0 warms up at lr 1e-4 and is checkpointed; epoch 1 runs at lr 1e30 and blows up
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--epochs', '3', '--max-steps-per-epoch', '5', '--warmup-epochs', '1',
                      '--warmup-lr', '1e-4', '--lr', '1e30', '--output_dir', tmp_path])
    assert res.returncode == 1
    assert 'training stopped on every rank: loss is' in res.stderr and 'epoch 1' in res.stderr
    assert 'Traceback' not in res.stderr
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert ckpt['epoch'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert [r['epoch'] for r in read_log(tmp_path)] == [0]


UPSTREAM_HVT = ['--model', 'hvt_model', '--input-size', '32', '--patch-size', '4', '--num-heads', '2',
                '--head-dim', '16', '--num-blocks', '4', '--pool-kernel-size', '3', '--pool-block-width', '2']


def test_official_hvt_weights_through_resume_and_finetune(tmp_path):
    """A state dict in the official HVT layout (tests/data, made by the upstream code) scores with --eval --resume
    and starts a fine-tune with --finetune."""
    fixture = REPO / 'tests' / 'data' / 'hvt_upstream_small.pt'
    res = run_script([*UPSTREAM_HVT, *FAST, *DIGITS, '--eval', '--resume', fixture, '--output_dir', tmp_path / 'ev'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / 'ev' / 'eval.json').read_text())['n_samples'] == 450
    res = run_script([*UPSTREAM_HVT, *FAST, *DIGITS, '--finetune', fixture, '--epochs', '1',
                      '--max-steps-per-epoch', '2', '--output_dir', tmp_path / 'ft'])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'missing keys: none' in res.stdout and 'unexpected keys: none' in res.stdout


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_on_cpu(amp, tmp_path):
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--amp', amp, '--epochs', '1', '--max-steps-per-epoch', '3',
                      '--accum-steps', '2', '--clip-grad', '1.0', '--output_dir', tmp_path])
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert (ckpt['scaler'] is not None) == (amp == 'fp16')   # GradScaler only for fp16


def test_ctrl_c_ends_with_one_line(tmp_path):
    cmd = [sys.executable, 'main.py', *TINY_HVT, *FAST, *DIGITS, '--epochs', '50', '--max-steps-per-epoch', '2',
           '--output_dir', str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / 'checkpoint.pth').is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert 'interrupted' in one_error_line(err)
    assert not list(tmp_path.glob('*.tmp')) and not (tmp_path / utils.LOCK_NAME).exists()
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['epoch'] >= 0
