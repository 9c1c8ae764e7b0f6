"""study.py end to end (subprocess runs on a tiny sweep): fine-tuning every reduced row (record, checkpoint per
row, kill and resume inside a row), resume keys that tell checkpoints apart, a sweep listing a setting twice, errors
found before the first row leaving nothing on disk, a non-finite evaluation loss, and Ctrl-C during the demo
backbone's training (exit 130, resumed from its last epoch). Backbone: swag_vit_l16 narrowed to 2 blocks of width
64 at 64 px on FAKE data; the demo backbone on DIGITS with 2 steps per epoch."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script

from framework import study_results as rs
from framework.demo import TRAINING_FILE, WEIGHTS_FILE
import models
import study

SMALL_BACKBONE = {'model': 'swag_vit_l16', 'input_size': 64, 'depth': 2, 'embed_dim': 64, 'num_heads': 2,
                  'batch_size': 4, 'num_workers': 0, 'warmup_epochs': 0, 'print_freq': 1000}
FAST = ['--warmup', '0', '--iters', '1', '--batch-size', '2', '--threads', '1']
FAKE = ['--data-set', 'FAKE', '--fake-val-size', '8', '--fake-train-size', '16', '--fake-num-classes', '10']
TOME = {'method': 'tome', 'r': 2}
HOURGLASS = {'method': 'hourglass', 'location': 1, 'num_clusters': 4}
SMYRF = {'method': 'smyrf', 'location': 1, 'n_hashes': 2, 'q_cluster_size': 4, 'k_cluster_size': 4}   # unseeded


@pytest.fixture
def config(tmp_path):
    path = tmp_path / 'small-swag.json'
    path.write_text(json.dumps(SMALL_BACKBONE))
    return str(path)


@pytest.fixture
def weights(tmp_path):
    """A checkpoint of the small backbone (random weights, fixed seed)."""
    torch.manual_seed(0)
    model = models.create_model('swag_vit_l16', img_size=64, num_classes=10, depth=2, embed_dim=64, num_heads=2)
    path = tmp_path / 'backbone.pth'
    torch.save({'model': model.state_dict()}, path)
    return str(path)


def write_sweep(tmp_path, items, name='sweep.json'):
    path = tmp_path / name
    path.write_text(json.dumps(items))
    return str(path)


def study_cmd(config, sweep, out, *extra):
    return ['--config', config, '--sweep', sweep, '--output-dir', str(out), *FAST, *FAKE, *extra]


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-2000:]
    return lines[0]


def test_finetune_rows_record_and_checkpoints(config, weights, tmp_path):
    """Every reduced row is fine-tuned: top-1 without retraining and after, time, img/s and the row's own
    checkpoint (the number of epochs asked, loadable into the reduced model); the plain row is not fine-tuned.
    table.md has the fine-tuned column."""
    out = tmp_path / 'out'
    sweep = write_sweep(tmp_path, [TOME, {'name': 'hg', 'spec': HOURGLASS}])
    proc = run_script(study_cmd(config, sweep, out, '--checkpoint', weights, '--finetune-epochs', '2',
                                '--finetune-lr', '1e-3'), script='study.py')
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = rs.read_results(str(out / rs.RESULTS_FILE))
    assert [r['name'] for r in rows] == ['plain', 'tome r=2', 'hg'] and rows[0]['finetune'] is None
    folders = set()
    for row in rows[1:]:
        f = row['finetune']
        assert f['epochs'] == 2 and f['lr'] == 1e-3 and f['seconds'] > 0 and f['images_per_s'] > 0
        assert 0 <= f['acc1'] <= f['acc5'] <= 100 and 0 <= row['acc1'] <= 100
        state = torch.load(f['checkpoint'], map_location='cpu', weights_only=True)
        assert state['epoch'] == 1 and state['key'] == row['key'] and {'optimizer', 'lr_scheduler'} <= set(state)
        assert state['model'].keys() == torch.load(weights, weights_only=True)['model'].keys()
        assert os.path.dirname(f['checkpoint']).startswith(str(out / study.FINETUNE_DIR))
        folders.add(os.path.dirname(f['checkpoint']))
        assert 'Epoch: [1]' in open(os.path.join(os.path.dirname(f['checkpoint']), 'finetune.log')).read()
    assert len(folders) == 2
    assert 'Epoch:' not in proc.stdout and '* Acc@1' not in proc.stdout      # loops' lines went to log files
    assert '[2/3] ToMe r=2' in proc.stdout and '(fine-tuned ' in proc.stdout
    header = [c.strip() for c in (out / rs.TABLE_FILE).read_text().split('### ToMe')[1].splitlines()[2].split('|')]
    assert header[-2] == 'Top-1 fine-tuned (%)'
    # the same command again: nothing recomputed
    again = run_script(study_cmd(config, sweep, out, '--checkpoint', weights, '--finetune-epochs', '2',
                                 '--finetune-lr', '1e-3'), script='study.py')
    assert again.returncode == 0 and 'resuming: 3 of 3 rows' in again.stdout
    assert rs.read_results(str(out / rs.RESULTS_FILE)) == rows


def finetuned_weights(row: dict) -> dict:
    return torch.load(row['finetune']['checkpoint'], map_location='cpu', weights_only=True)['model']


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_row_measures_the_same_whatever_ran_before_it(config, weights, tmp_path):
    """SMYRF without a seed draws its hashes from the global RNG, and fine-tuning shuffles and drops paths: the
    study seeds every row, so the row alone and the row after another fine-tuned row give the same top-1 and
    bit-identical fine-tuned weights."""
    results = {}
    for name, items in (('alone', [SMYRF]), ('after', [TOME, SMYRF])):
        out = tmp_path / name
        proc = run_script(study_cmd(config, write_sweep(tmp_path, items, f'{name}.json'), out, '--checkpoint',
                                    weights, '--finetune-epochs', '2', '--fake-train-size', '32'), script='study.py')
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = rs.read_results(str(out / rs.RESULTS_FILE))[-1]
    alone, after = results['alone'], results['after']
    assert alone['method'] == after['method'] == 'smyrf'
    assert (alone['acc1'], alone['acc5']) == (after['acc1'], after['acc5'])
    assert (alone['finetune']['acc1'], alone['finetune']['acc5']) == (after['finetune']['acc1'],
                                                                      after['finetune']['acc5'])
    assert_same_weights(finetuned_weights(alone), finetuned_weights(after))


def test_finetune_killed_resumes_inside_the_row(config, weights, tmp_path):
    """Killed after the first epoch checkpoint of a row appears, the same command resumes that row's fine-tuning
    from the epoch after the saved one and finishes it."""
    out = tmp_path / 'out'
    sweep = write_sweep(tmp_path, [TOME])
    epochs = 12
    cmd = [sys.executable, 'study.py', *study_cmd(config, sweep, out, '--checkpoint', weights, '--finetune-epochs',
                                                  str(epochs), '--fake-train-size', '64')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    log = open(tmp_path / 'first.log', 'w')
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    checkpoint = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and checkpoint is None:
            found = list((out / study.FINETUNE_DIR).glob(f'*/{study.FINETUNE_CHECKPOINT}')) \
                if (out / study.FINETUNE_DIR).is_dir() else []
            checkpoint = found[0] if found else None
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    assert checkpoint is not None, (tmp_path / 'first.log').read_text()[-2000:]
    saved = torch.load(checkpoint, map_location='cpu', weights_only=True)['epoch']
    assert saved < epochs - 1, 'the first run finished the row before it was killed; make an epoch longer'
    assert len(rs.read_results(str(out / rs.RESULTS_FILE))) == 1          # the plain row only
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming the fine-tuning of 'tome r=2' at epoch {saved + 1} of {epochs}" in again.stdout
    assert 'resuming: 1 of 2 rows' in again.stdout
    rows = rs.read_results(str(out / rs.RESULTS_FILE))
    assert len(rows) == 2 and rows[1]['finetune']['epochs'] == epochs
    assert torch.load(checkpoint, map_location='cpu', weights_only=True)['epoch'] == epochs - 1
    log_text = (checkpoint.parent / 'finetune.log').read_text()
    assert log_text.count(f'Epoch: [{saved + 1}]') >= 1 and log_text.count('Epoch: [0] Total') == 1
    # the resumed row ends with the weights of a run that was never killed
    whole = tmp_path / 'whole'
    proc = subprocess.run([*cmd[:cmd.index('--output-dir') + 1], str(whole), *cmd[cmd.index('--output-dir') + 2:]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    uninterrupted = rs.read_results(str(whole / rs.RESULTS_FILE))[1]
    assert_same_weights(finetuned_weights(rows[1]), finetuned_weights(uninterrupted))


def test_other_checkpoint_sets_rows_aside_and_repeats_measured_once(config, weights, tmp_path):
    """A finished study run again on another checkpoint measures every row anew and says how many old rows were
    set aside; table.md shows the new rows only. A sweep listing a setting twice measures it once."""
    out = tmp_path / 'out'
    sweep = write_sweep(tmp_path, [TOME, HOURGLASS, {'method': 'tome', 'r': 2, 'prop_attn': True}])
    first = run_script(study_cmd(config, sweep, out, '--checkpoint', weights), script='study.py')
    assert first.returncode == 0, first.stderr[-2000:]
    assert 'the sweep lists 1 setting(s) twice; each is measured once' in first.stdout
    rows = rs.read_results(str(out / rs.RESULTS_FILE))
    assert len(rows) == 3
    assert rows[0]['key'] != rows[1]['key'] and json.loads(rows[0]['key'])['measured_on']['checkpoint']['path'] \
        == os.path.abspath(weights)

    torch.manual_seed(1)
    other = models.create_model('swag_vit_l16', img_size=64, num_classes=10, depth=2, embed_dim=64, num_heads=2)
    other_path = tmp_path / 'other.pth'
    torch.save({'model': other.state_dict()}, other_path)
    second = run_script(study_cmd(config, sweep, out, '--checkpoint', other_path), script='study.py')
    assert second.returncode == 0, second.stderr[-2000:]
    assert 'note: 3 row(s) of' in second.stdout and 'set aside' in second.stdout
    assert 'resuming' not in second.stdout
    after = rs.read_results(str(out / rs.RESULTS_FILE))
    assert after[:3] == rows and len(after) == 6
    assert all(r['checkpoint'] == str(other_path) for r in after[3:])
    table = (out / rs.TABLE_FILE).read_text()
    assert len(sections_rows(table, 'ToMe')) == 2                 # plain + r=2 of the new checkpoint only
    # the same weights in a file with another modification time: not the same checkpoint either
    os.utime(other_path, ns=(1, 1))
    third = run_script(study_cmd(config, sweep, out, '--checkpoint', other_path), script='study.py')
    assert third.returncode == 0 and 'note: 6 row(s) of' in third.stdout


def sections_rows(table: str, title: str) -> list:
    body = table.split(f'### {title}')[1].split('###')[0]
    return [line for line in body.splitlines()
            if line.startswith('| ') and not line.startswith(('| Method', '| ---'))]


def test_errors_before_the_first_row_leave_nothing(config, weights, tmp_path):
    """A missing checkpoint, a checkpoint of another model, a spec the model rejects, a non-ViT config, fine-tuning
    without data: one line, exit 2, no output folder."""
    out = tmp_path / 'out'
    sweep = write_sweep(tmp_path, [TOME])
    missing = tmp_path / 'nope.pth'
    line = one_error_line(run_script(study_cmd(config, sweep, out, '--checkpoint', missing), script='study.py'))
    assert line == f'error: --checkpoint {missing}: not found'

    deit = models.create_model('deit_tiny', img_size=64, num_classes=10)
    deit_path = tmp_path / 'deit.pth'
    torch.save({'model': deit.state_dict()}, deit_path)
    line = one_error_line(run_script(study_cmd(config, sweep, out, '--checkpoint', deit_path), script='study.py'))
    assert 'does not fit swag_vit_l16' in line

    rejected = write_sweep(tmp_path, [TOME, {'method': 'hourglass', 'location': 1, 'num_clusters': 5}], 'rej.json')
    line = one_error_line(run_script(study_cmd(config, rejected, out, '--checkpoint', weights), script='study.py'))
    assert 'num_clusters' in line and 'hourglass' in line

    hvt = tmp_path / 'hvt.json'
    hvt.write_text(json.dumps({'model': 'hvt_model', 'input_size': 32, 'patch_size': 8, 'num_heads': 2,
                               'head_dim': 8, 'num_blocks': 2, 'pool_block_width': 1, 'num_workers': 0}))
    line = one_error_line(run_script(study_cmd(str(hvt), sweep, out), script='study.py'))
    assert 'HVT has no token_reduction' in line and 'deit_' in line

    line = one_error_line(run_script(['--config', config, '--sweep', sweep, '--output-dir', out, *FAST,
                                      '--finetune-epochs', '1'], script='study.py'))
    assert 'needs a data set' in line
    assert not out.exists()


def test_non_finite_evaluation_is_one_line_naming_the_row(config, tmp_path):
    """Weights that give NaN outputs: one line naming the row, exit 2."""
    model = models.create_model('swag_vit_l16', img_size=64, num_classes=10, depth=2, embed_dim=64, num_heads=2)
    state = model.state_dict()
    state['head.weight'] = torch.full_like(state['head.weight'], float('nan'))
    path = tmp_path / 'nan.pth'
    torch.save({'model': state}, path)
    sweep = write_sweep(tmp_path, [TOME])
    line = one_error_line(run_script(study_cmd(config, sweep, tmp_path / 'out', '--checkpoint', path),
                                     script='study.py'))
    assert "row 'plain'" in line and ('nan' in line.lower() or 'finite' in line)


def test_demo_backbone_ctrl_c_exit_130_and_resume(tmp_path):
    """Ctrl-C while the demo backbone trains: one line, exit 130; started again, the training resumes after its
    last saved epoch, and the backbone lives in its own folder (not the config's output_dir)."""
    backbone = tmp_path / 'backbone'
    sweep = write_sweep(tmp_path, [TOME])
    epochs = 30
    args = ['study.py', '--backbone-dir', str(backbone), '--sweep', sweep, '--output-dir', str(tmp_path / 'out'),
            *FAST, '--epochs', str(epochs), '--max-steps-per-epoch', '2']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (backbone / TRAINING_FILE).exists():
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert len(stderr.strip().splitlines()) == 1 and 'interrupted' in stderr
    assert not (backbone / WEIGHTS_FILE).exists()
    saved = torch.load(backbone / TRAINING_FILE, map_location='cpu', weights_only=True)['epoch']
    assert saved < epochs - 1
    again = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming the demo backbone's training at epoch {saved + 1} of {epochs}" in again.stdout
    assert (backbone / WEIGHTS_FILE).exists() and 'Epoch:' not in again.stdout
    assert 'Epoch: [' in (backbone / 'train.log').read_text()
    assert any(line.startswith('[1/2] plain: ') for line in again.stdout.splitlines())    # "plain", once
    # a backbone trained with other settings is not taken for this one
    other = subprocess.run([sys.executable, *args[:-4], '--epochs', str(epochs + 1), '--max-steps-per-epoch', '2'],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and f'epochs {epochs} (now {epochs + 1})' in other.stderr, other.stderr[-2000:]
