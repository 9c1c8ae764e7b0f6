"""Official-layout HVT weights load into our ``hvt_model`` and reproduce the upstream model's outputs.

Fixture ``tests/data/hvt_upstream_small.pt`` was produced outside this repo by running the unmodified upstream
``models.py`` + ``params.py`` of ziplab/HVT (same history as MonashAI/HVT) at commit
ae5286e4253e85b1c4ad30eeb42a98935863ed08, with torch 2.14.1+cu130 and timm 1.0.31 on CPU (timm only warns that
``timm.models.layers`` / ``timm.models.registry`` are deprecated). Upstream reads its settings from ``sys.argv``:
``--input_size=32 --patch_size=4 --num_heads=2 --head_dim=16 --num_blocks=4 --pool_kernel_size=3
--pool_block_width=2``; the model was ``models.hvt_model(num_classes=10)`` under ``torch.manual_seed(0)`` (upstream's
own init), in eval mode, run on ``torch.manual_seed(1); torch.randn(2, 3, 32, 32)``. Tokens 64 -> 31 (block 0 pools)
-> 15 (block 2 pools). The file is a plain dict: ``model`` (upstream state dict, official key names), ``input``,
``logits`` (upstream output), ``settings`` (plain python values) and ``source``; plus ``logits_perturbed``: the same
upstream model after adding ``0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(123))`` to every
state-dict tensor in state-dict order (``perturbation`` says so). Upstream's own init leaves biases at 0 and LayerNorm
affines at 1/0 and gives logits of ~0.05, so on its own it cannot catch swapped biases or norm weights, nor a tanh GELU;
the perturbed check can. (A LayerNorm eps of 1e-5 instead of 1e-6 moves the logits by only ~3e-6 either way.)
The script that made it (kept outside the repo) used the upstream files verbatim, read with the code index.
"""
import argparse
import pathlib
import pickle

import pytest
import torch

import models
from models.layers import set_fused_attn

FIXTURE = pathlib.Path(__file__).parent / 'data' / 'hvt_upstream_small.pt'
MODEL_KWARGS = dict(patch_size=4, num_heads=2, head_dim=16, num_blocks=4, pool_kernel_size=3, pool_block_width=2,
                    num_classes=10)


@pytest.fixture(scope='module')
def fixture():
    return torch.load(FIXTURE, map_location='cpu', weights_only=True)


def build(img_size=32):
    return models.create_model('hvt_model', img_size=img_size, **MODEL_KWARGS)


def test_fixture_settings_match_our_build(fixture):
    s = fixture['settings']
    assert s['input_size'] == 32
    assert {k: s[k] for k in MODEL_KWARGS} == MODEL_KWARGS
    assert fixture['source'].startswith('ziplab/HVT models.py @ ')


def loaded_logits(source, inputs, fused=True):
    """Load ``source`` into a 32-px model (every key must match), run ``inputs`` in eval mode."""
    model = build(32)
    missing, unexpected = models.load_pretrained(model, source, log=None)
    assert missing == [] and unexpected == []
    set_fused_attn(model, fused)
    with torch.no_grad():
        return model.eval()(inputs)


def test_official_keys_equal_ours_and_load_verbatim(fixture):
    model = build(32)
    assert set(model.state_dict()) == set(fixture['model']), 'official key names differ from ours'
    models.load_pretrained(model, FIXTURE, log=None)
    for key, value in fixture['model'].items():  # no filter changed anything at this size
        assert torch.equal(model.state_dict()[key], value), key


def perturbed_state_dict(fixture):
    gen = torch.Generator().manual_seed(123)
    return {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in fixture['model'].items()}


@pytest.mark.parametrize('fused', [True, False], ids=['sdpa', 'explicit'])
@pytest.mark.parametrize('weights', ['upstream_init', 'perturbed'])
def test_upstream_weights_reproduce_upstream_logits(fixture, weights, fused):
    """Upstream computes attention with explicit matmuls; both of our paths must match it. Upstream's own init gives
    logits of ~0.05, so the perturbed weights (logits of O(1)) are what catches a swapped bias or norm."""
    if weights == 'perturbed':
        source, ref = {'model': perturbed_state_dict(fixture)}, fixture['logits_perturbed']
        assert ref.abs().max().item() > 1.
    else:
        source, ref = FIXTURE, fixture['logits']
    logits = loaded_logits(source, fixture['input'], fused)
    assert logits.shape == ref.shape == (2, 10)
    assert (logits - ref).abs().max().item() <= 1e-5


def test_legacy_training_checkpoint_with_namespace_args(fixture, tmp_path):
    """DeiT/HVT main.py checkpoints pickle an argparse.Namespace under 'args'; weights_only loading must allow it."""
    path = tmp_path / 'last_checkpoint.pth'
    torch.save({'model': fixture['model'], 'args': argparse.Namespace(lr=1e-3), 'epoch': 3}, path)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only loading refuses the Namespace: the allowlist is what helps
        torch.load(path, map_location='cpu', weights_only=True)
    assert (loaded_logits(path, fixture['input']) - fixture['logits']).abs().max().item() <= 1e-5


def test_upstream_weights_resized_for_larger_input(fixture):
    """At 48 px (144 tokens -> 71 -> 35) every position embedding is resampled by checkpoint_filter."""
    model = build(48)
    own = model.state_dict()
    expected = {'pos_embed': (1, 144, 32), 'blocks.0.pos_embed': (1, 71, 32), 'blocks.2.pos_embed': (1, 35, 32)}
    assert {k: tuple(own[k].shape) for k in expected} == expected
    filtered = model.checkpoint_filter(dict(fixture['model']))
    assert {k: tuple(filtered[k].shape) for k in expected} == expected
    missing, unexpected = models.load_pretrained(model, FIXTURE, log=None)
    assert missing == [] and unexpected == []
    loaded = model.state_dict()
    for key, value in fixture['model'].items():
        if key in expected:
            assert torch.allclose(loaded[key], filtered[key])
        else:
            assert torch.equal(loaded[key], value), key
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_grid_position_embedding_is_resampled_bicubically_in_2d(fixture):
    """The patch-grid embedding (8x8 at 32 px) becomes 12x12 at 48 px: a 2-D antialiased bicubic resampling over the
    grid (reference written out here with F.interpolate), the per-stage ones linearly along the sequence."""
    import torch.nn.functional as F
    pos = fixture['model']['pos_embed']  # (1, 64, 32)
    filtered = build(48).checkpoint_filter(dict(fixture['model']))
    grid = pos.reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    reference = F.interpolate(grid, size=(12, 12), mode='bicubic', align_corners=False, antialias=True)
    assert torch.allclose(filtered['pos_embed'], reference.permute(0, 2, 3, 1).reshape(1, 144, 32), atol=1e-6)
    stage = fixture['model']['blocks.0.pos_embed']  # (1, 31, 32) -> (1, 71, 32)
    reference = F.interpolate(stage.transpose(1, 2), size=71, mode='linear', align_corners=False).transpose(1, 2)
    assert torch.allclose(filtered['blocks.0.pos_embed'], reference, atol=1e-6)
