"""PiT family (models/pit.py): parameter counts, numerical equality with timm, checkpoint layouts, resolution, heads."""
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import group_parameters

import models
from models.pit import PiT

PARAMS = {
    'pit_ti': 4_847_272, 'pit_xs': 10_618_888, 'pit_s': 23_461_912, 'pit_b': 73_764_840,
    'pit_ti_distilled': 5_104_336, 'pit_xs_distilled': 11_003_984, 'pit_s_distilled': 24_039_056,
    'pit_b_distilled': 74_790_096,
}
TOL = 1e-5


def timm_name(name: str) -> str:
    """Our name -> timm's: pit_s -> pit_s_224, pit_s_distilled -> pit_s_distilled_224."""
    return f'{name}_224'


@pytest.fixture(scope='module')
def timm_models():
    """timm models built once per module (seeded, eval mode), keyed by our name."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = timm.create_model(timm_name(name)).eval()
        return cache[name]

    return get


def ours_from(name: str, state_dict: dict, **kwargs) -> PiT:
    model = models.create_model(name, **kwargs)
    missing, unexpected = models.load_pretrained(model, {'model': state_dict}, log=None)
    assert missing == [] and unexpected == []
    return model.eval()


def image(batch=2, size=(224, 224), seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize('name', list(PARAMS))
def test_param_counts(name):
    with torch.device('meta'):  # shapes only: fast even for pit_b
        model = models.create_model(name)
    assert isinstance(model, PiT)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_official_key_layout():
    with torch.device('meta'):
        keys = set(models.create_model('pit_s_distilled').state_dict())
    assert {'pos_embed', 'cls_token', 'patch_embed.conv.weight', 'pools.0.conv.weight', 'pools.1.fc.bias',
            'transformers.0.blocks.1.attn.qkv.weight', 'transformers.2.blocks.3.mlp.fc2.bias', 'norm.weight',
            'head.weight', 'head_dist.weight'} <= keys
    assert not any('.pool.' in k for k in keys)
    assert len(keys) == 162


@pytest.mark.parametrize('name', ['pit_ti', 'pit_s'])
def test_logits_match_timm(name, timm_models):
    reference = timm_models(name)
    ours = ours_from(name, reference.state_dict())
    x = image()
    with torch.inference_mode():
        expected = reference(x)
        got = ours(x)
    assert got.shape == (2, 1000)
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize('name', ['pit_ti_distilled'])
def test_distilled_logits_match_timm(name, timm_models):
    reference = timm_models(name)
    ours = ours_from(name, reference.state_dict())
    x = image()
    with torch.inference_mode():
        feats = reference.forward_features(x)  # normed class tokens (B, 2, C)
        cls_logits, dist_logits = reference.head(feats[:, 0]), reference.head_dist(feats[:, 1])
        by_hand = (cls_logits + dist_logits) / 2
        wrong_token = (cls_logits + reference.head_dist(feats[:, 0])) / 2  # timm 0.9.0 - 1.0.24 head bug
        got = ours(x)
        timm_out = reference(x)
    assert max_diff(ours.forward_features(x), feats) <= TOL
    assert max_diff(got, by_hand) <= TOL
    assert max_diff(got, wrong_token) > 1e-3  # the comparison can tell token 1 from token 0
    assert max_diff(timm_out, by_hand) <= TOL  # timm 1.0.31 feeds token 1 to head_dist


def test_distilled_train_returns_tuple_eval_returns_average():
    torch.manual_seed(0)
    model = models.create_model('pit_ti_distilled', img_size=64, num_classes=10)  # no dropout: train == eval maths
    x = image(size=(64, 64))
    with torch.no_grad():
        feats = model.eval().forward_features(x)
        out = model.train()(x)
        assert isinstance(out, tuple) and len(out) == 2
        cls_logits, dist_logits = out
        assert cls_logits.shape == dist_logits.shape == (2, 10)
        assert max_diff(cls_logits, model.head(feats[:, 0])) <= TOL
        assert max_diff(dist_logits, model.head_dist(feats[:, 1])) <= TOL
        assert max_diff(cls_logits, dist_logits) > 1e-3
        avg = model.eval()(x)
        assert torch.is_tensor(avg) and avg.shape == (2, 10)
        assert max_diff(avg, (cls_logits + dist_logits) / 2) <= TOL
        model.train().set_distilled_training(False)
        assert max_diff(model(x), avg) <= TOL


def test_distilled_backward_reaches_every_parameter():
    model = models.create_model('pit_ti_distilled', num_classes=5, img_size=48).train()
    cls_logits, dist_logits = model(image(batch=2, size=(48, 48)))
    (cls_logits.sum() + 2 * dist_logits.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert model.cls_token.grad[0, 1].abs().sum() > 0  # the distillation token is used


def _rename(state_dict: dict, pattern: str, repl) -> dict:
    regex = re.compile(pattern)
    return {regex.sub(repl, k): v for k, v in state_dict.items()}


@pytest.mark.parametrize('name', ['pit_ti_distilled'])
def test_official_and_old_timm_layouts_load(name, timm_models):
    reference = timm_models(name)
    timm_sd = reference.state_dict()
    assert any(k.startswith('transformers.1.pool.') for k in timm_sd)  # timm >= 0.9 layout
    official = _rename(timm_sd, r'^transformers\.(\d)\.pool\.', lambda m: f'pools.{int(m.group(1)) - 1}.')
    old_timm = _rename(timm_sd, r'^transformers\.(\d)\.pool\.', lambda m: f'transformers.{int(m.group(1)) - 1}.pool.')
    assert 'pools.0.conv.weight' in official and 'transformers.0.pool.conv.weight' in old_timm
    x = image(batch=1)
    with torch.inference_mode():
        expected = reference(x)
        for sd in (official, old_timm, timm_sd):
            model = ours_from(name, sd)
            assert torch.equal(model.pools[0].conv.weight, timm_sd['transformers.1.pool.conv.weight'])
            assert torch.equal(model.pools[1].fc.weight, timm_sd['transformers.2.pool.fc.weight'])
            assert max_diff(model(x), expected) <= TOL


def test_checkpoint_filter_is_idempotent_on_official_keys():
    model = models.create_model('pit_ti')
    sd = model.state_dict()
    out = model.checkpoint_filter(dict(sd))
    assert list(out) == list(sd)
    assert all(out[k] is sd[k] for k in sd)


def test_load_at_another_resolution(timm_models):
    reference = timm_models('pit_ti')
    sd = reference.state_dict()
    model = ours_from('pit_ti', sd, img_size=256)
    assert model.patch_embed.grid_size == (31, 31)
    assert model.grid_sizes == [(31, 31), (16, 16), (8, 8)]
    assert model.pos_embed.shape == (1, 64, 31, 31)
    expected_pos = F.interpolate(sd['pos_embed'], size=(31, 31), mode='bicubic', align_corners=False, antialias=True)
    assert max_diff(model.pos_embed, expected_pos) <= 1e-6
    assert torch.equal(model.patch_embed.conv.weight, sd['patch_embed.conv.weight'])
    x = image(batch=1, size=(256, 256))
    with torch.inference_mode():
        cls_tokens, maps = model.forward_stages(x, return_maps=True)
        out = model.forward_head(model.norm(cls_tokens))
        # a 224 model fed 256 px resizes pos_embed the same way at run time
        at_224 = ours_from('pit_ti', sd)
        assert max_diff(at_224(x), out) <= TOL
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert [tuple(m.shape) for m in maps] == [(1, 64, 31, 31), (1, 128, 16, 16), (1, 256, 8, 8)]
    assert cls_tokens.shape == (1, 1, 256)


@pytest.mark.parametrize('size, grids', [
    ((224, 224), [(27, 27), (14, 14), (7, 7)]),
    ((192, 256), [(23, 31), (12, 16), (6, 8)]),
    ((40, 33), [(4, 3), (2, 2), (1, 1)]),
])
def test_grid_sizes_follow_conv_arithmetic(size, grids):
    model = models.create_model('pit_ti', img_size=size, num_classes=7).eval()
    assert model.grid_sizes == grids
    assert model.pos_embed.shape[-2:] == grids[0]
    with torch.inference_mode():
        cls_tokens, maps = model.forward_stages(image(batch=1, size=size), return_maps=True)
        out = model.forward_head(model.norm(cls_tokens))
    assert [tuple(m.shape[-2:]) for m in maps] == grids
    assert out.shape == (1, 7)


def test_pit_b_grid():
    with torch.device('meta'):
        model = models.create_model('pit_b', num_classes=0)
    assert model.grid_sizes == [(31, 31), (16, 16), (8, 8)]
    assert model.pos_embed.shape == (1, 256, 31, 31)
    assert model.num_features == 1024


def test_create_model_finetune_options():
    model = models.create_model('pit_s', num_classes=10, drop_path_rate=0.1, img_size=224)
    assert isinstance(model, PiT) and model.head.out_features == 10
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.transformers for b in s.blocks]
    assert len(rates) == 12 and rates[0] == 0. and rates[-1] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    out = model.train()(image(batch=1, size=(224, 224)))
    assert out.shape == (1, 10)


def test_timm_create_model_returns_ours():
    model = timm.create_model('pit_s', num_classes=3)
    assert isinstance(model, PiT) and model.head.out_features == 3
    assert isinstance(timm.create_model('pit_ti_distilled'), PiT)


def test_head_dropped_for_other_class_count(timm_models):
    sd = timm_models('pit_ti_distilled').state_dict()
    model = models.create_model('pit_ti_distilled', num_classes=10)
    missing, unexpected = models.load_pretrained(model, {'model': sd}, log=None)
    assert sorted(missing) == ['head.bias', 'head.weight', 'head_dist.bias', 'head_dist.weight']
    assert unexpected == []
    assert torch.equal(model.cls_token, sd['cls_token'])


def test_init_follows_upstream():
    torch.manual_seed(0)
    model = models.create_model('pit_ti')
    qkv = model.transformers[0].blocks[0].attn.qkv.weight  # PyTorch default: U(-1/sqrt(64), 1/sqrt(64)), std 0.072
    assert qkv.abs().max() <= 64 ** -0.5 and qkv.std() > 0.06
    assert model.transformers[0].blocks[0].attn.qkv.bias.abs().sum() > 0  # default bias init, not zeros
    assert 0.015 < model.pos_embed.std() < 0.025 and 0.01 < model.cls_token.std() < 0.03
    assert torch.equal(model.norm.weight, torch.ones(256)) and torch.equal(model.norm.bias, torch.zeros(256))


def test_weight_decay_and_layer_groups():
    model = models.create_model('pit_ti')
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    layer_of = group_parameters(model, model.group_matcher(), reverse=True)
    assert layer_of['pos_embed'] == layer_of['cls_token'] == layer_of['patch_embed.conv.weight'] == 0
    assert layer_of['transformers.0.blocks.0.norm1.weight'] == 1
    assert layer_of['pools.0.conv.weight'] == layer_of['transformers.0.blocks.1.mlp.fc2.bias'] == 2
    assert layer_of['transformers.1.blocks.0.attn.qkv.weight'] == 3
    assert layer_of['transformers.2.blocks.3.norm1.weight'] == layer_of['norm.weight'] == 12
    assert layer_of['head.weight'] == 13
