"""The layout rules: scripts import library modules, never another script; distributed init reports what it found."""
import ast

import pytest

from conftest import REPO

import utils

# the command-line entry points (a module with a ``__main__`` block is one; the list is checked against that)
SCRIPTS = {'main', 'flops', 'benchmark', 'run_with_submitit', 'study', 'visualize', 'table', 'hourglass_speed',
           'evo_ats_speed'}


def _python_files():
    return sorted(p for p in [*REPO.glob('*.py'), *REPO.glob('benchmarks/*.py'), *REPO.glob('models/**/*.py')])


def _imported_modules(tree):
    for node in ast.walk(tree):   # every import, at the top or inside a function (lazy)
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f'{node.module}.{alias.name}' for alias in node.names)


def test_every_entry_point_is_listed():
    for path in _python_files():
        text = path.read_text()
        if "if __name__ == '__main__':" in text:
            assert path.stem in SCRIPTS, path


def test_no_script_imports_another_script():
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _imported_modules(tree):
            parts = name.split('.')
            target = parts[-1] if parts[0] == 'benchmarks' else parts[0]
            if target in SCRIPTS and target != path.stem:
                found.append(f'{path.relative_to(REPO)} imports {name}')
    assert found == []


def test_the_check_sees_lazy_imports():
    tree = ast.parse('def f():\n    import flops\n    from benchmarks import table\n')
    assert {'flops', 'benchmarks', 'benchmarks.table'} <= set(_imported_modules(tree))


@pytest.mark.parametrize('env, local_rank_flag, expected', [
    ({}, None, utils.DistInfo(0, 1, 0, 'cpu', None)),
    ({'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0'}, None, utils.DistInfo(0, 1, 0, 'cpu', None)),
    ({'RANK': '0', 'WORLD_SIZE': '1'}, 3, utils.DistInfo(0, 1, 3, 'cpu', None)),   # old launcher's --local-rank 3
    ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}, None, utils.DistInfo(0, 1, 0, 'cpu', None)),
])
def test_init_distributed_mode_returns_what_it_found(monkeypatch, env, local_rank_flag, expected):
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    info = utils.init_distributed_mode('cpu', local_rank=local_rank_flag)
    assert info == expected and not info.distributed and not utils.is_dist()
