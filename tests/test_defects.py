"""Defects a new user (or an attacker) hits: each test reproduces one and checks the fix (issue 8, section 5).

Bad values and output folders run ``main.main`` in this process (it returns the exit code and prints the one-line
error); everything that trains runs the real script in a fresh interpreter."""
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from timm.scheduler import create_scheduler_v2

from conftest import FAST, REPO, TINY_HVT, run_script
from framework import builders, options
import main
import models
import utils
from utils import UserError

DIGITS = ['--data-set', 'DIGITS']
SHORT = [*TINY_HVT, *FAST, *DIGITS, '--max-steps-per-epoch', '2']


def read_log(out):
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), text
    return lines[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One tiny epoch on DIGITS whose output folder comes from a config file (as `make train` does)."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    config = out.parent / 'tiny.json'
    config.write_text(json.dumps({'output_dir': str(out), 'epochs': 1}))
    res = run_script(['--config', config, *SHORT])
    assert res.returncode == 0, res.stderr[-3000:]
    return out, config


# ----------------------------------------------------------------------------------------------------------- values

def bad_value_cases(tmp):
    def config(name, text):
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ['--config', str(path)]

    return {
        'null model': (config('m.json', '{"model": null}'), "'model' in"),
        'null epochs': (config('e.json', '{"epochs": null}'), "'epochs' in"),
        'null batch_size': (config('b.json', '{"batch_size": null}'), "'batch_size' in"),
        'negative lr': (['--lr', '-0.1'], '--lr must be >= 0'),
        'zero epochs': (['--epochs', '0'], '--epochs must be >= 1'),
        'negative epochs in config': (config('n.json', '{"epochs": -3}'), '--epochs must be >= 1'),
        'negative num_workers': (['--num-workers', '-1'], '--num-workers must be >= 0'),
        'zero input_size': (['--input-size', '0'], '--input-size must be >= 1'),
        'zero patch_size': (config('p.json', '{"model": "hvt_model", "patch_size": 0}'), "'patch_size' must be > 0"),
        'binary config': (config('bin.json', bytes(range(256)) * 4), 'is not UTF-8 text'),
        'duplicate key': (config('d.json', '{"lr": 0.1, "epochs": 2, "lr": 0.2}'), "key 'lr' twice"),
    }


BAD_VALUE_CASES = ['null model', 'null epochs', 'null batch_size', 'negative lr', 'zero epochs',
                   'negative epochs in config', 'negative num_workers', 'zero input_size', 'zero patch_size',
                   'binary config', 'duplicate key']


@pytest.mark.parametrize('case', BAD_VALUE_CASES)
def test_bad_value_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    flags, message = bad_value_cases(tmp_path)[case]
    fresh, previous = tmp_path / 'fresh', tmp_path / 'previous'
    previous.mkdir()
    (previous / 'config.json').write_text('{"epochs": 7}\n')
    for out in (fresh, previous):   # (no model flags here: they would override the config's values)
        assert main.main([*DIGITS, '--max-steps-per-epoch', '1', *flags, '--output_dir', str(out)]) == 2
        assert message in one_error_line(capsys.readouterr().err)
    assert not fresh.exists()                                          # no empty folder left behind
    assert (previous / 'config.json').read_text() == '{"epochs": 7}\n'  # nor a rewritten config


# ----------------------------------------------------------------------------------------------------- output folder

def test_unusable_output_folder_fails_before_any_work(tmp_path, capsys):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    cases = {a_file: 'is not a folder', a_file / 'sub': 'cannot create output folder',
             '/dev/full': 'is not a folder', tmp_path / ('x' * 300): 'name too long'}
    for out, message in cases.items():
        assert main.main([*SHORT, '--epochs', '1', '--output_dir', str(out)]) == 2
        captured = capsys.readouterr()
        assert message in one_error_line(captured.err)
        assert 'number of params' not in captured.out    # nothing was built


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_output_folder_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / 'ro'
    out.mkdir()
    out.chmod(0o555)
    assert main.main([*SHORT, '--epochs', '1', '--output_dir', str(out)]) == 2
    assert 'is not writable' in one_error_line(capsys.readouterr().err)


def test_second_run_into_a_locked_output_folder_stops(trained):
    out, _ = trained
    before = snapshot(out)
    lock = utils.lock_output_dir(str(out))      # this process plays the first run
    try:
        res = run_script([*SHORT, '--epochs', '2', '--output_dir', out])
    finally:
        utils.unlock_output_dir(lock)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert f'pid {os.getpid()}' in line and 'in use' in line
    assert snapshot(out) == before


def test_disk_full_while_saving_keeps_the_last_checkpoint(trained, tmp_path):
    """A file-size limit makes the second epoch's (larger, EMA-carrying) checkpoint fail mid-write, as a full disk
    would: one line, exit 2, the epoch-0 checkpoint intact and no partial .tmp file."""
    out = tmp_path / 'run'
    shutil.copytree(trained[0], out)
    size = (out / 'checkpoint.pth').stat().st_size
    model = torch.load(out / 'checkpoint.pth', weights_only=True)['model']
    weights = sum(v.numel() * v.element_size() for v in model.values())
    limit = size + weights // 2    # room for the log and config, not for the EMA copy of the weights

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, 'main.py', *SHORT, '--epochs', '2', '--model-ema', '--output_dir', str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_error_line(res.stderr)
    assert 'checkpoint.pth' in line and 'kept' in line
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert not list(out.glob('*.tmp'))


def test_save_failure_removes_the_partial_file(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    torch.save({'epoch': 0}, path)

    def fail_midway(obj, f):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', fail_midway)
    with pytest.raises(UserError, match='No space left on device.*kept'):
        utils.save_on_master({'epoch': 1}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)['epoch'] == 0 and not list(tmp_path.glob('*.tmp'))


# ----------------------------------------------------------------------------------------------------------- data

@pytest.fixture
def corrupt_imagenet(fake_imagenet, tmp_path):
    root = tmp_path / 'imnet'
    shutil.copytree(fake_imagenet, root)
    (root / 'train' / 'n00001' / 'text.jpg').write_text('this is not an image\n')
    (root / 'val' / 'n00002' / 'empty.JPEG').write_bytes(b'')
    return root


IMNET_RUN = [*TINY_HVT, *FAST, '--data-set', 'IMNET', '--batch-size', '8', '--epochs', '1']


def test_corrupt_image_is_one_line_naming_it(corrupt_imagenet, tmp_path):
    # the train set has a text file named .jpg; with a worker process the error crosses the DataLoader boundary
    res = run_script([*IMNET_RUN, '--data-path', corrupt_imagenet, '--num-workers', '1', '--output_dir', tmp_path])
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_error_line(res.stderr)
    assert str(corrupt_imagenet / 'train' / 'n00001' / 'text.jpg') in line and '--skip-corrupt' in line
    # the validation set has a 0-byte JPEG: found at the first evaluation, reported the same way
    os.remove(corrupt_imagenet / 'train' / 'n00001' / 'text.jpg')
    res = run_script([*IMNET_RUN, '--data-path', corrupt_imagenet, '--output_dir', tmp_path / 'b'])
    assert res.returncode == 2 and 'empty.JPEG' in one_error_line(res.stderr) and 'empty file' in res.stderr


def test_skip_corrupt_leaves_unreadable_images_out(corrupt_imagenet, tmp_path):
    res = run_script([*IMNET_RUN, '--data-path', corrupt_imagenet, '--skip-corrupt', '--output_dir', tmp_path])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'left out 1 unreadable image of 25' in res.stdout and 'left out 1 unreadable image of 13' in res.stdout
    assert read_log(tmp_path)[0]['test_n_samples'] == 12


class RunsCode:
    """Unpickling this calls os.system: what a crafted CIFAR file under --data-path does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_cifar_reader_does_not_run_code_from_data_files(tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    marker = tmp_path / 'pwned'
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({b'data': RunsCode(marker), b'labels': [0]}, f)
    args = options.parse_args(['--data-set', 'CIFAR10', '--data-path', str(tmp_path), '--input-size', '32'])
    import datasets
    with pytest.raises(UserError, match="test_batch' is not a CIFAR python pickle.*system"):
        datasets.build_dataset(is_train=False, args=args)
    assert not marker.exists()


def test_cifar_reader_reads_the_original_numpy_1_layout(tmp_path):
    """The released files were written by numpy 1 (``numpy.core.multiarray``) with protocol 2."""
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 256, size=(5, 3072), dtype=np.uint8)
    raw = pickle.dumps({b'batch_label': b'testing batch 1 of 1', b'labels': [1, 2, 3, 4, 5], b'data': data,
                        b'filenames': [b'a.png'] * 5}, protocol=2)
    (folder / 'test_batch').write_bytes(raw.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    args = options.parse_args(['--data-set', 'CIFAR10', '--data-path', str(tmp_path), '--input-size', '32'])
    import datasets
    dataset, classes = datasets.build_dataset(is_train=False, args=args)
    assert classes == 10 and dataset.targets == [1, 2, 3, 4, 5]
    assert np.array_equal(dataset.images[2], data[2].reshape(3, 32, 32).transpose(1, 2, 0))


# ----------------------------------------------------------------------------------------------------------- resume

def cosine_lrs(epochs, lr):
    """The per-epoch lr of timm's cosine schedule with FAST's settings: the reference a resumed run must follow."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=epochs, min_lr=1e-5, warmup_lr=1e-6,
                                       warmup_epochs=0, cooldown_epochs=10, decay_epochs=30, decay_rate=0.1)
    lrs = []
    for epoch in range(epochs):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]['lr'])
    return lrs


def test_resume_with_more_epochs_and_new_lr_follows_the_command_line(trained, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(trained[0], out)
    res = run_script([*SHORT, '--epochs', '3', '--lr', '2e-3', '--output_dir', out])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'epochs 1 -> 3' in res.stdout and 'lr 0.001 -> 0.002' in res.stdout
    lrs = [r['train_lr'] for r in read_log(out)]
    assert lrs[0] == pytest.approx(cosine_lrs(1, 1e-3)[0])
    assert lrs[1:] == pytest.approx(cosine_lrs(3, 2e-3)[1:])   # not min_lr: the schedule runs to the new end
    config = json.loads((out / 'config.json').read_text())
    assert config['epochs'] == 3 and config['lr'] == 2e-3


# ----------------------------------------------------------------------------------------------------------- eval

def test_eval_refuses_random_weights(tmp_path, capsys):
    assert main.main([*SHORT, '--eval', '--output_dir', str(tmp_path / 'ev')]) == 2
    assert '--random-weights' in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / 'ev').exists()


def test_eval_without_output_dir_writes_its_own_folder(trained):
    out, config = trained
    before = snapshot(out)
    for _ in range(2):
        res = run_script(['--config', config, *SHORT, '--eval', '--resume', out / 'checkpoint.pth'])
        assert res.returncode == 0, res.stderr[-3000:]
    assert snapshot(out) == before                        # the training run's files are untouched
    result = json.loads((out / 'eval-checkpoint' / 'eval.json').read_text())
    assert result['acc1'] == pytest.approx(read_log(out)[0]['test_acc1'])
    assert 'replacing' in res.stdout and 'eval-checkpoint' in res.stdout   # the second one says so


# ----------------------------------------------------------------------------------------------------------- weights

def test_checkpoint_of_another_architecture_says_what_differs(trained, capsys):
    out, _ = trained
    assert main.main([*SHORT, '--head-dim', '16', '--eval', '--resume', str(out / 'checkpoint.pth')]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert 'classes' not in line
    assert 'patch_embed.proj.weight (16, 3, 8, 8) vs model (32, 3, 8, 8)' in line
    assert "written for model 'hvt_model'" in line and 'head_dim=8' in line


def test_upstream_checkpoint_of_another_architecture_is_recognised():
    with torch.device('meta'):
        pit = models.create_model('pit_ti')
    foreign = {k: torch.zeros(v.shape) for k, v in pit.state_dict().items()}   # a pit_ti file, no 'args'
    hvt = models.create_model('hvt_ti_1', num_classes=10)
    with pytest.raises(models.CheckpointError, match='looks like a pit_ti checkpoint'):
        models.load_pretrained(hvt, foreign, drop_mismatched_head=False, log=None)


# ----------------------------------------------------------------------------------------------------------- machine

def test_cpu_run_caps_workers_and_says_pin_memory_is_off(monkeypatch):
    monkeypatch.setattr(utils, 'cpu_count', lambda: 2)
    args = options.parse_args(['--device', 'cpu'])
    assert options.adapt_to_machine(args) == []         # defaults: capped quietly, no DataLoader warning
    assert args.num_workers == 2 and args.pin_mem is False
    args = options.parse_args(['--device', 'cpu', '--num-workers', '8', '--pin-mem'])
    notes = options.adapt_to_machine(args)
    assert args.num_workers == 2 and args.pin_mem is False
    assert any('--num-workers 8' in n and '2 CPUs' in n for n in notes)
    assert any('--pin-mem has no effect without a CUDA device' in n for n in notes) and len(notes) == 2


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


# ----------------------------------------------------------------------------------------------------------- SLURM

def test_submitit_validates_before_submitting(tmp_path, capsys):
    import run_with_submitit
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'epochs': 1, 'batch_sise': 4, 'output_dir': str(tmp_path / 'out')}))
    assert run_with_submitit.submit(['--executor', 'local', '--config', str(bad)]) == 2
    assert "unknown config key 'batch_sise'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / 'out').exists()    # nothing submitted, no job folder


def test_submitit_failing_run_fails_the_job(tmp_path):
    import submitit
    import run_with_submitit
    config = tmp_path / 'c.json'   # the output folder comes from the config
    config.write_text(json.dumps({'epochs': 1, 'output_dir': str(tmp_path / 'out')}))
    job = run_with_submitit.submit(['--executor', 'local', '--ngpus', '1', '--timeout', '10', '--config', str(config),
                                    *TINY_HVT, *FAST, '--device', 'cpu', '--data-set', 'IMNET',
                                    '--data-path', str(tmp_path / 'no_imagenet')])
    with pytest.raises(submitit.core.utils.FailedJobError):
        job.result()
    assert (tmp_path / 'out' / 'submitit').is_dir()      # the job folder went under the config's output_dir
    assert 'does not exist' in job.stderr()


def test_submitit_help_says_where_other_flags_go():
    res = run_script(['--help'], script='run_with_submitit.py')
    assert res.returncode == 0 and 'every other flag goes to main.py' in ' '.join(res.stdout.lower().split())


# ----------------------------------------------------------------------------------------------------------- teacher

def test_teacher_that_does_not_load_completely_is_refused(trained, tmp_path):
    saved = torch.load(trained[0] / 'checkpoint.pth', weights_only=True)
    partial = {**saved, 'model': {k: v for i, (k, v) in enumerate(saved['model'].items()) if i % 2}}
    torch.save(partial, tmp_path / 'partial.pth')
    torch.save(saved['model'], tmp_path / 'bare.pth')     # no args: loaded into --teacher-model as it is
    student = ['--model', 'pit_ti_distilled', '--input-size', '32', '--patch-size', '4', '--stride', '4',
               '--base-dims', '[8, 8, 8]', '--heads', '[1, 2, 4]', '--depth', '[1, 1, 1]', *DIGITS,
               '--distillation-type', 'hard']
    cases = {'partial.pth': [], 'bare.pth': ['--teacher-model', 'resnet10t']}
    for name, extra in cases.items():
        args = options.parse_args([*student, *extra, '--teacher-path', str(tmp_path / name)])
        with pytest.raises(UserError, match=r'of \d+ keys missing'):
            builders.build_teacher(args, torch.device('cpu'), 10)
