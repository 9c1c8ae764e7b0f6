"""Checkpoints: saved atomically (a full disk keeps the previous one), resumed with the command line's new settings,
evaluated without touching the training run, and refused in one line when they do not fit the model."""
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from timm.scheduler import create_scheduler_v2

from conftest import REPO, SHORT, one_error_line, read_log, run_script, snapshot
import main
import models
import utils
from utils import UserError


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
