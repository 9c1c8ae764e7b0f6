"""Plain ViT and HVT: exact parameter counts, token schedules, equality with timm, attention paths, errors."""
import pytest
import timm
import timm.optim
import torch

import models
from models.hvt import HVT
from models.layers import set_fused_attn

HVT_PARAMS = {  # the MonashAI/HVT models' exact counts, 224 px, 1000 classes
    'hvt_ti_1': 5_735_656, 'hvt_s_0': 22_049_896, 'hvt_s_1': 22_087_144, 'hvt_s_2': 22_105_576,
    'hvt_s_3': 22_114_408, 'hvt_s_4': 22_118_632, 'scale_hvt_ti_4': 22_118_632}
HVT_TOKENS = {  # tokens entering blocks 0..11
    'hvt_ti_1': [196] + [97] * 11, 'hvt_s_0': [196] * 12, 'hvt_s_1': [196] + [97] * 11,
    'hvt_s_2': [196] + [97] * 6 + [48] * 5, 'hvt_s_3': [196] + [97] * 4 + [48] * 4 + [23] * 3,
    'hvt_s_4': [196] + [97] * 3 + [48] * 3 + [23] * 3 + [11] * 2}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', sorted(HVT_PARAMS))
def test_hvt_parameter_counts_exact(name):
    assert n_params(models.create_model(name)) == HVT_PARAMS[name]


def test_hvt_100_class_counts_match_paperswithcode():
    # the 21.74M listed for HVT-S-1 (paperswithcode) is the count with a CIFAR-100 head
    assert n_params(models.create_model('hvt_s_1', num_classes=100)) == 21_740_644


@pytest.mark.parametrize('name', sorted(HVT_TOKENS))
def test_hvt_token_schedule(name):
    model = models.create_model(name).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert seen == HVT_TOKENS[name] and out.shape == (1, 1000)
    pooled = [i for i, b in enumerate(model.blocks) if b.pool is not None]
    assert {k for k in model.state_dict() if k.endswith('pos_embed')} == \
        {'pos_embed'} | {f'blocks.{i}.pos_embed' for i in pooled}


def test_hvt_pool_stride_is_honoured():
    counts = HVT.pooled_token_counts(196, 4, 2, kernel_size=3, stride=3)
    assert counts == [196, 65, 65, 21, 21]
    model = models.create_model('hvt_model', img_size=64, patch_size=8, num_blocks=4, pool_block_width=2,
                                pool_stride=3, num_classes=5)
    assert model.blocks[0].pos_embed.shape[1] == (64 - 3) // 3 + 1


def test_hvt_errors_are_clear():
    with pytest.raises(ValueError, match='not divisible by patch size 16'):
        models.create_model('hvt_s_1', img_size=200)
    with pytest.raises(ValueError, match='pooling leaves no tokens'):
        models.create_model('hvt_model', img_size=32, patch_size=16, pool_block_width=1)
    with pytest.raises(models.UnknownModelError, match='did you mean hvt_s_1'):
        models.create_model('hvt_s1')


def test_hvt_no_weight_decay_covers_every_pos_embed():
    model = models.create_model('hvt_s_4')
    opt = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1 and not name.endswith('pos_embed')), name


@pytest.mark.parametrize('ours,theirs', [('deit_tiny', 'deit_tiny_patch16_224'),
                                         ('deit_small', 'deit_small_patch16_224')])
def test_deit_equals_timm(ours, theirs):
    torch.manual_seed(0)
    ref = timm.create_model(theirs).eval()
    model = models.create_model(ours).eval()
    assert n_params(model) == n_params(ref)
    assert models.load_pretrained(model, {'model': ref.state_dict()}, log=None) == ([], [])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_deit_base_params():
    assert n_params(models.create_model('deit_base')) == 86_567_656


def test_deit_finetune_at_other_resolution_resizes_pos_embed():
    ref = timm.create_model('deit_tiny_patch16_224')
    model = models.create_model('deit_tiny', img_size=256, num_classes=10)
    missing, unexpected = models.load_pretrained(model, ref.state_dict(), log=None)
    assert model.pos_embed.shape == (1, 257, 192)
    assert missing == ['head.weight', 'head.bias'] and unexpected == []   # 1000-class head dropped
    assert torch.equal(model.cls_token, ref.cls_token)
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 10)


@pytest.mark.parametrize('name', ['hvt_s_2', 'deit_tiny'])
def test_sdpa_and_explicit_attention_agree(name):
    model = models.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fused = model(x)
        set_fused_attn(model, False)
        explicit = model(x)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_attention_returns_map_and_takes_bias():
    attn = models.layers.Attention(32, num_heads=4).eval()
    x = torch.randn(2, 5, 32)
    bias = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        out, amap = attn(x, attn_bias=bias, return_attn=True)
        assert torch.allclose(out, attn(x, attn_bias=bias), atol=1e-5)
    assert amap.shape == (2, 4, 5, 5) and torch.allclose(amap.sum(-1), torch.ones(2, 4, 5))


def test_registered_in_timm_under_our_names():
    for name in ('hvt_s_1', 'deit_small', 'scale_hvt_ti_4'):
        assert name in timm.list_models()
    assert isinstance(timm.create_model('hvt_s_1', num_classes=3), HVT)
    with pytest.raises(ValueError, match='no hub weights'):
        timm.create_model('hvt_s_1', pretrained=True)
