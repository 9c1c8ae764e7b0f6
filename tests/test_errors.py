"""Every error a user can cause: one line naming the cause, exit code 2, no traceback, nothing on disk changed."""
import hashlib
import json

import pytest

from conftest import FAST, TINY_HVT, run_script

DIGITS = ['--data-set', 'DIGITS']


@pytest.fixture(scope='module')
def previous_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('previous')
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--epochs', '1', '--max-steps-per-epoch', '2', '--output_dir', out])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def write(path, text):
    path.write_text(text)
    return path


def bad_inputs(tmp, prev, fake_cifar):
    truncated = tmp / 'truncated.pth'
    truncated.write_bytes((prev / 'checkpoint.pth').read_bytes()[:5000])
    empty = tmp / 'empty_dir'
    empty.mkdir()
    return {
        'unknown config key': (['--config', write(tmp / 'a.json', json.dumps({'batch_sise': 8}))],
                               "unknown config key 'batch_sise'"),
        'malformed JSON': (['--config', write(tmp / 'b.json', '{"model": "hvt_s_1",\n')], 'not valid JSON'),
        'missing data path': (['--data-set', 'IMNET', '--data-path', tmp / 'nowhere'], 'does not exist'),
        'empty data path': (['--data-set', 'IMNET', '--data-path', empty], 'is empty'),
        'class count differs from checkpoint': (
            ['--data-set', 'CIFAR', '--data-path', fake_cifar, '--eval', '--resume', prev / 'checkpoint.pth'],
            'has 10 classes but data set CIFAR has 100'),
        'class count differs on auto-resume': (['--data-set', 'CIFAR', '--data-path', fake_cifar],
                                               'has 10 classes but data set CIFAR has 100'),
        'truncated checkpoint': ([*DIGITS, '--eval', '--resume', truncated], 'cannot read checkpoint'),
        'truncated finetune weights': ([*DIGITS, '--finetune', truncated], 'cannot read checkpoint'),
        'missing checkpoint': ([*DIGITS, '--resume', tmp / 'nope.pth'], 'checkpoint not found'),
        'input size not divisible by patch size': ([*DIGITS, '--input-size', '36'], 'not divisible by patch size 8'),
        'pooling leaves no tokens': ([*DIGITS, '--input-size', '16', '--num-blocks', '3'],
                                     'pooling leaves no tokens'),
        'non-existent model': ([*DIGITS, '--model', 'hvt_s_7'], "unknown model 'hvt_s_7'"),
        'unknown flag': ([*DIGITS, '--epoch', '3'], "unknown flag '--epoch'"),
        'bad flag value': ([*DIGITS, '--amp', 'fp8'], "argument --amp"),
    }


CASES = ['unknown config key', 'malformed JSON', 'missing data path', 'empty data path',
         'class count differs from checkpoint', 'class count differs on auto-resume', 'truncated checkpoint',
         'truncated finetune weights', 'missing checkpoint', 'input size not divisible by patch size',
         'pooling leaves no tokens', 'non-existent model', 'unknown flag', 'bad flag value']


@pytest.mark.parametrize('case', CASES)
def test_bad_input_fails_cleanly(case, previous_run, fake_cifar, tmp_path):
    flags, message = bad_inputs(tmp_path, previous_run, fake_cifar)[case]
    before = snapshot(previous_run)
    res = run_script([*TINY_HVT, *FAST, '--epochs', '2', *flags, '--output_dir', previous_run])
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], res.stderr
    assert 'Traceback' not in res.stdout + res.stderr
    assert snapshot(previous_run) == before
