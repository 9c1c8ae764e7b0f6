"""Shared fixtures: tiny fake data sets on disk, one tiny trained run, a runner for the real scripts and the checks
of their one-line errors."""
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# a 2-block HVT on 32 px inputs: a training step takes milliseconds on CPU
TINY_HVT = ['--model', 'hvt_model', '--input-size', '32', '--patch-size', '8', '--num-heads', '2',
            '--head-dim', '8', '--num-blocks', '2', '--pool-block-width', '1']
# fast, deterministic training flags (no workers, no RandAugment/mixup, a few steps)
FAST = ['--batch-size', '16', '--num-workers', '0', '--aa', '', '--mixup', '0', '--cutmix', '0', '--reprob', '0',
        '--warmup-epochs', '0', '--print-freq', '100', '--lr', '1e-3', '--unscale-lr']
DIGITS = ['--data-set', 'DIGITS']
# a tiny HVT on scikit-learn's digits, two steps per epoch
SHORT = [*TINY_HVT, *FAST, *DIGITS, '--max-steps-per-epoch', '2']


def run_script(args, timeout=300, env=None, script='main.py'):
    """Run one of the repo's scripts in a fresh interpreter; returns CompletedProcess (text output)."""
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **(env or {})}
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'MASTER_ADDR', 'MASTER_PORT'):
        if env is None or key not in env:
            full_env.pop(key, None)
    cmd = [sys.executable, script, *map(str, args)] if isinstance(script, str) else [*script, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def fake_imagenet(tmp_path_factory):
    """ImageFolder layout: 3 classes, 8 train and 4 val JPEGs each, 40x40 px."""
    root = tmp_path_factory.mktemp('imagenet')
    rng = np.random.default_rng(0)
    for split, count in (('train', 8), ('val', 4)):
        for c in range(3):
            folder = root / split / f'n0000{c}'
            folder.mkdir(parents=True)
            for i in range(count):
                img = (rng.random((40, 40, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(img).save(folder / f'img_{i}.JPEG')
    return root


@pytest.fixture(scope='session')
def fake_cifar(tmp_path_factory):
    """CIFAR-100 and CIFAR-10 python pickles with the real key layout (64 train / 20 test images)."""
    root = tmp_path_factory.mktemp('cifar')
    rng = np.random.default_rng(0)

    def dump(path, n, label_key, num_classes):
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        with open(path, 'wb') as f:
            pickle.dump({b'data': data, label_key: [int(i % num_classes) for i in range(n)]}, f)

    (root / 'cifar-100-python').mkdir()
    dump(root / 'cifar-100-python' / 'train', 64, b'fine_labels', 100)
    dump(root / 'cifar-100-python' / 'test', 20, b'fine_labels', 100)
    (root / 'cifar-10-batches-py').mkdir()
    for i in range(1, 6):
        dump(root / 'cifar-10-batches-py' / f'data_batch_{i}', 16, b'labels', 10)
    dump(root / 'cifar-10-batches-py' / 'test_batch', 20, b'labels', 10)
    return root


def read_log(out):
    """The JSON lines of a run's log.txt."""
    return [json.loads(line) for line in (Path(out) / 'log.txt').read_text().splitlines()]


def snapshot(folder):
    """File name -> SHA-256 of every file in ``folder``: to show that a failed run changed nothing."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def one_error_line(text):
    """The single ``error: ...`` line a script printed on stderr (fails if there is anything else)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), text
    return lines[0]


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
    """One tiny epoch on DIGITS whose output folder comes from a config file (as `make train` does): (folder, config).
    Tests that change the folder work on a copy."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    config = out.parent / 'tiny.json'
    config.write_text(json.dumps({'output_dir': str(out), 'epochs': 1}))
    res = run_script(['--config', config, *SHORT])
    assert res.returncode == 0, res.stderr[-3000:]
    return out, config
