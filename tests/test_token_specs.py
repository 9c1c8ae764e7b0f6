"""Token-reduction specs that pass a type check but could not survive the run: each is one line ``error: ...`` on
stderr and exit code 2 from the scripts, or a one-line ValueError from the library, before any work is done. Also
the interface's capability check: any model with the hooks takes a method, whatever its class."""
import json

import pytest
import torch
import torch.nn as nn

import benchmark
import flops
import main
import study
from framework import options
from models import apply_token_reduction, token_schedule
from models.layers import Block, PatchEmbed
from models.vit import VisionTransformer

CONFIG = {'model': 'deit_tiny', 'input_size': 64}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / 'tiny.json'
    path.write_text(json.dumps(CONFIG))
    return str(path)


def one_line_error(capsys, code):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    return lines[0]


BAD_SPECS = [
    ({'method': 'act', 'seed': 100000000000000000000000}, ['seed', '2**64 - 1']),
    ({'method': 'smyrf', 'location': 3, 'seed': 2 ** 64}, ['seed']),
    ({'method': 'act', 'q_hashes': 100000}, ['q_hashes', 'at most', 'memory']),
    ({'method': 'act', 'group_k': True, 'k_hashes': 100000}, ['k_hashes', 'memory']),
    ({'method': 'smyrf', 'location': 3, 'n_hashes': 100000}, ['n_hashes', 'at most', 'memory']),
    ({'method': 'smyrf', 'location': 3, 'q_cluster_size': 10 ** 6, 'k_cluster_size': 10 ** 6},
     ['q_cluster_size', 'no effect past N']),
    ({'method': 'hourglass', 'location': 2, 'num_clusters': 16, 'iters': 100000}, ['iters', 'at most']),
    ({}, ["'method' is required", 'tome', 'smyrf']),
    ({'r': 4}, ["'method' is required"]),
]


@pytest.mark.parametrize('spec,words', BAD_SPECS)
def test_flops_refuses_in_one_line(capsys, config, spec, words):
    line = one_line_error(capsys, flops.main(['--config', config, '--token-reduction', json.dumps(spec)]))
    assert all(word in line for word in words), line


@pytest.mark.parametrize('spec,words', BAD_SPECS[:3])
def test_main_refuses_in_one_line_and_writes_nothing(capsys, config, tmp_path, spec, words):
    out_dir = tmp_path / 'run'
    code = main.main(['--config', config, '--eval', '--random-weights', '--data-set', 'FAKE', '--output_dir',
                      str(out_dir), '--token-reduction', json.dumps(spec)])
    line = one_line_error(capsys, code)
    assert all(word in line for word in words), line
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_bounds_are_inclusive():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=3).eval()
    for spec in ({'method': 'act', 'q_hashes': 256, 'seed': 2 ** 64 - 1}, {'method': 'smyrf', 'location': 3,
                 'n_hashes': 256, 'q_cluster_size': 65536, 'k_cluster_size': 65536},
                 {'method': 'hourglass', 'location': 2, 'num_clusters': 4, 'iters': 100}):
        apply_token_reduction(model, spec)
        with torch.no_grad():
            assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


@pytest.mark.parametrize('text,words', [
    ('[' * 60000, ['too deeply']),
    ('{"a": ' * 60000, ['too deeply']),
    ('{"method": "tome", "r": 2, "r": 3}', ["'r' twice"]),
])
def test_token_reduction_flag_json(capsys, config, text, words):
    line = one_line_error(capsys, flops.main(['--config', config, '--token-reduction', text]))
    assert all(word in line for word in words) and len(line) < 400, line


def test_deeply_nested_config_file(capsys, tmp_path):
    path = tmp_path / 'deep.json'
    path.write_text('{"model": "deit_tiny", "token_reduction": ' + '[' * 60000 + ']' * 60000 + '}')
    line = one_line_error(capsys, flops.main(['--config', str(path)]))
    assert 'too deeply' in line
    with pytest.raises(options.UserError, match='twice'):
        path.write_text('{"model": "deit_tiny", "token_reduction": {"method": "tome", "r": 2, "r": 4}}')
        options.load_json_config(str(path))


@pytest.mark.parametrize('size', [0, -16, 8, 230, 16.0, True])
def test_token_schedule_refuses_sizes_the_patch_does_not_divide(size):
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    with pytest.raises(ValueError) as error:
        token_schedule(model, {'method': 'tome', 'r': 1}, input_size=size)
    message = str(error.value)
    assert 'patch size 16' in message and '\n' not in message
    assert token_schedule(model, {'method': 'tome', 'r': 1}, input_size=240)['tokens_in'] == 1 + 15 * 15


# ------------------------------------------------------------------------------------------------- out of memory

CPU_OOM = 'DefaultCPUAllocator: not enough memory: you tried to allocate 5368709120 bytes.'


def test_flops_out_of_memory_is_one_line(capsys, config, monkeypatch):
    def report(*args, **kwargs):
        raise RuntimeError(CPU_OOM)
    monkeypatch.setattr(flops, 'report', report)
    spec = {'method': 'smyrf', 'location': 3}
    line = one_line_error(capsys, flops.main(['--config', config, '--token-reduction', json.dumps(spec)]))
    assert 'out of memory at batch size 1' in line and '"smyrf"' in line


def test_benchmark_out_of_memory_is_one_line(capsys, config, monkeypatch):
    def run(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 5.00 GiB')
    monkeypatch.setattr(benchmark, 'benchmark', run)
    code = benchmark.main(['--config', config, '--batch-size', '7', '--token-reduction', '{"method": "act"}'])
    line = one_line_error(capsys, code)
    assert 'out of memory at batch size 7' in line and '"act"' in line


def test_main_and_study_out_of_memory_are_one_line(capsys, config, tmp_path, monkeypatch):
    def run(*args, **kwargs):
        raise RuntimeError(CPU_OOM)
    monkeypatch.setattr(main, 'run', run)
    code = main.main(['--config', config, '--eval', '--random-weights', '--data-set', 'FAKE', '--batch-size', '6',
                      '--output_dir', str(tmp_path / 'run'), '--token-reduction', '{"method": "tome", "r": 2}'])
    line = one_line_error(capsys, code)
    assert 'out of memory at batch size 6' in line and '"tome"' in line
    monkeypatch.setattr(study, 'run', run)
    line = one_line_error(capsys, study.main(['--batch-size', '3']))
    assert 'out of memory at batch size 3' in line


def test_other_runtime_errors_are_not_taken_for_memory(config, monkeypatch):
    def report(*args, **kwargs):
        raise RuntimeError('shape mismatch')
    monkeypatch.setattr(flops, 'report', report)
    with pytest.raises(RuntimeError, match='shape mismatch'):
        flops.main(['--config', config])


# ------------------------------------------------------------------------------------------- capability checks

class HookedViT(nn.Module):
    """A timm-free ViT with what the methods use and no more: ``token_reduction``, ``num_prefix_tokens``,
    ``patch_embed.grid_size/patch_size`` and ``models.layers.Block`` blocks run with a TokenState."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.token_reduction = None
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(32, 8, 3, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = nn.ModuleList([Block(16, 2) for _ in range(3)])

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.patch_embed(x)], dim=1)
        method = self.token_reduction
        state = method.new_state(x, self.patch_embed.grid_size, len(self.blocks)) if method else None
        for index, block in enumerate(self.blocks):
            if state is not None:
                state.index = index
            x = block(x, state=state)
        return x[:, 0]


def test_a_model_with_the_hooks_takes_a_method_whatever_its_class():
    model = HookedViT().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        apply_token_reduction(model, {'method': 'tome', 'r': 3})
        merged = model(images)
        assert token_schedule(model)['tokens_out'] == 17 - 9
        apply_token_reduction(model, {'method': 'ats', 'locations': [1], 'num_tokens': 100,
                                      'variant': 'expedit-swag'})
        assert model(images).shape == plain.shape
        apply_token_reduction(model, None)
        assert torch.equal(model(images), plain)
    assert not torch.allclose(merged, plain)


def test_a_model_without_the_hooks_is_refused_in_one_line():
    for model in (nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3))):
        with pytest.raises(ValueError) as error:
            apply_token_reduction(model, {'method': 'tome', 'r': 1})
        assert 'hooks' in str(error.value) and '\n' not in str(error.value)
    model = HookedViT()
    model.blocks = nn.ModuleList([nn.TransformerEncoderLayer(16, 2) for _ in range(3)])
    with pytest.raises(ValueError, match='state'):
        apply_token_reduction(model, {'method': 'tome', 'r': 1})


def test_a_block_given_an_attention_bias_refuses_a_method():
    block = Block(16, 2)
    apply_token_reduction(model := HookedViT(), {'method': 'tome', 'r': 1})
    state = model.token_reduction.new_state(torch.zeros(1, 17, 16), (4, 4), 3)
    with pytest.raises(ValueError) as error:
        block(torch.zeros(1, 17, 16), attn_bias=torch.zeros(1, 2, 17, 17), state=state)
    assert 'attention bias' in str(error.value) and '\n' not in str(error.value)
