"""HiViT (models/hivit.py): sizes, upstream parity, checkpoint mapping, resolution changes, layer decay.

Fixtures (made outside this repo by a throwaway script, CPU, torch 2.14.1):

- ``tests/data/hivit_mmpretrain_tiny.pt``: mmpretrain 1.2.0 (mmengine 0.10.7, mmcv-lite 2.2.0), unmodified.
  ``MODELS.build(ImageClassifier(backbone=HiViT(arch=dict(embed_dims=24, depths=[1, 1, 7], num_heads=2),
  img_size=224, ape=True, rpe=True), neck=GlobalAveragePooling, head=LinearClsHead(num_classes=10, in_channels=24,
  init_cfg=None), init_cfg=[TruncNormal(Linear, std .02), Constant(LayerNorm, 1/0)]))`` under
  ``torch.manual_seed(1234)``, ``init_weights()``. (The main depth is 7 because with fewer main blocks than stem
  modules + 1, mmpretrain's default ``out_indices`` hits a stem block and its forward breaks; 24 wide keeps the file
  small.) Then, so that biases, LayerNorm affines and the tables matter, every parameter got
  ``randn(shape, generator=Generator().manual_seed(1))`` noise in ``named_parameters`` order: x0.5 for the relative
  position bias tables, x0.2 for ``pos_embed`` and every 1-D parameter, none for the other weights.
- ``tests/data/hivit_authors_tiny.pt``: the authors' ``supervised/models/hivit.py`` (zhangxiaosong18/hivit@2718339,
  run as is with timm 1.0.31): ``HiViT(img_size=224, num_classes=10, embed_dim=32, depths=[2, 2, 3], num_heads=2,
  norm_layer=partial(nn.LayerNorm, eps=1e-6), ape=True, rpe=True)`` under ``torch.manual_seed(4321)``, perturbed the
  same way with generator seed 2. This is their layout: ``absolute_pos_embed``, ``fc_norm.*``, ``head.weight``.

Both models ran in eval mode on ``torch.randn(2, 3, 224, 224, generator=Generator().manual_seed(0))`` (regenerated here;
``input_first`` holds its first 8 values as a check). Each file is a dict: ``state_dict`` (upstream layout, minus the
``relative_position_index`` buffers, which are deterministic and 300 KB each; their names are in
``arch['dropped_keys']``), ``logits`` and ``pooled`` (upstream outputs), ``arch``, ``versions``.
"""
import fnmatch
import itertools
import pathlib

import pytest
import timm
from timm.layers import DropPath
from timm.optim import create_optimizer_v2
import torch
import torch.nn as nn

import models
from models.hivit import HiViT, HiViTBlock, PatchMerge, StemBlock, relative_position_index
from models.layers import set_fused_attn

DATA = pathlib.Path(__file__).parent / 'data'
MMPRETRAIN = DATA / 'hivit_mmpretrain_tiny.pt'
AUTHORS = DATA / 'hivit_authors_tiny.pt'
MMPRETRAIN_KWARGS = dict(embed_dim=24, depths=(1, 1, 7), num_heads=2, num_classes=10)
AUTHORS_KWARGS = dict(embed_dim=32, depths=(2, 2, 3), num_heads=2, num_classes=10, norm_eps=1e-6, fc_norm=True)


def load_fixture(path):
    fx = torch.load(path, map_location='cpu', weights_only=True)
    x = torch.randn(*fx['input_shape'], generator=torch.Generator().manual_seed(fx['input_seed']))
    assert torch.equal(x.flatten()[:8], fx['input_first']), 'torch.randn no longer gives the fixture input'
    return fx, x


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        fused = model(x)
        pooled = model.forward_features(x).mean(dim=1)
        set_fused_attn(model, False)
        explicit = model(x)
        set_fused_attn(model, True)
    return fused, explicit, pooled


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return models.create_model('hivit_tiny')


@pytest.mark.parametrize('name,count', [('hivit_tiny', 19_180_900), ('hivit_small', 37_525_696),
                                        ('hivit_base', 79_050_792)])
def test_parameter_counts_exact(name, count):
    with torch.device('meta'):
        model = models.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_authors_base_variant_is_expressible():
    with torch.device('meta'):
        model = models.create_model('hivit_base', depths=(2, 2, 20), norm_eps=1e-6, fc_norm=True)
    assert sum(p.numel() for p in model.parameters()) == 66_417_928 + 1_024  # their count + fc_norm
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert isinstance(model.fc_norm, nn.LayerNorm)


def test_tiny_layout_widths_and_drop_path(tiny):
    assert sum(p.numel() for p in tiny.parameters()) == 19_180_900
    kinds = [type(b) for b in tiny.blocks]
    assert kinds == [StemBlock] * 2 + [PatchMerge] + [StemBlock] * 2 + [PatchMerge] + [HiViTBlock] * 10
    assert tiny.patch_embed.proj.kernel_size == (4, 4) and tiny.patch_embed.proj.stride == (4, 4)
    assert tiny.patch_embed.proj.out_channels == 96
    assert tiny.blocks[0].mlp.fc1.weight.shape == (288, 96) and tiny.blocks[3].mlp.fc1.weight.shape == (576, 192)
    assert tiny.blocks[2].reduction.weight.shape == (192, 384) and tiny.blocks[2].reduction.bias is None
    assert tiny.blocks[5].reduction.weight.shape == (384, 768)
    assert tiny.blocks[6].attn.relative_position_bias_table.shape == (729, 6)
    assert tiny.blocks[6].mlp.fc1.weight.shape == (1536, 384)
    assert tiny.pos_embed.shape == (1, 196, 384)
    assert isinstance(tiny.fc_norm, nn.Identity) and not hasattr(tiny, 'norm')
    assert all(m.eps == 1e-5 for m in tiny.modules() if isinstance(m, nn.LayerNorm))
    # one rate per MLP/attention block in order (merges take none), as mmpretrain: linspace(0, 0.05, 14)
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0. for b in tiny.blocks
             if not isinstance(b, PatchMerge)]
    assert rates == pytest.approx(torch.linspace(0, 0.05, 14).tolist())
    # no relative_position_index in our state dict: the buffers are deterministic and non-persistent
    assert not [k for k in tiny.state_dict() if 'relative_position_index' in k]


def test_relative_position_index_formula():
    h, w = 3, 4
    index = relative_position_index((h, w))
    coords = list(itertools.product(range(h), range(w)))
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            assert index[i, j] == (yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)
    full = relative_position_index((14, 14))
    assert full.shape == (196, 196) and full.min() == 0 and full.max() == 728
    assert torch.all(full.diagonal() == 13 * 27 + 13)


def test_mmpretrain_fixture_parity():
    fx, x = load_fixture(MMPRETRAIN)
    assert 'backbone.pos_embed' in fx['state_dict'] and 'head.fc.weight' in fx['state_dict']
    model = HiViT(**MMPRETRAIN_KWARGS)
    missing, unexpected = models.load_pretrained(model, MMPRETRAIN, log=None)
    assert missing == [] and unexpected == []
    fused, explicit, pooled = outputs(model, x)  # SDPA with the bias as attn_mask, and explicit softmax
    assert (fused - fx['logits']).abs().max() <= 1e-5
    assert (explicit - fx['logits']).abs().max() <= 1e-5
    assert (pooled - fx['pooled']).abs().max() <= 1e-5


def test_incoming_relative_position_index_is_dropped():
    """Upstream index buffers (model-level and per attention) are ignored; wrong values would break the output."""
    fx, x = load_fixture(MMPRETRAIN)
    state_dict = dict(fx['state_dict'])
    assert len(fx['arch']['dropped_keys']) == 8  # 7 attention blocks + mmpretrain's model-level buffer
    for key in fx['arch']['dropped_keys']:
        state_dict[key] = torch.zeros(196, 196, dtype=torch.long)
    model = HiViT(**MMPRETRAIN_KWARGS)
    missing, unexpected = models.load_pretrained(model, {'state_dict': state_dict, 'meta': {}}, log=None)
    assert missing == [] and unexpected == []
    for block in model.blocks[model.num_stem_blocks:]:
        assert torch.equal(block.attn.relative_position_index, relative_position_index((14, 14)))
    logits, _, _ = outputs(model, x)
    assert (logits - fx['logits']).abs().max() <= 1e-5


def test_authors_fixture_parity():
    fx, x = load_fixture(AUTHORS)
    keys = set(fx['state_dict'])
    assert {'absolute_pos_embed', 'fc_norm.weight', 'head.weight'} <= keys and 'pos_embed' not in keys
    state_dict = dict(fx['state_dict'])
    for key in fx['arch']['dropped_keys']:  # the authors' per-attention buffers
        state_dict[key] = torch.zeros(196, 196, dtype=torch.long)
    model = HiViT(**AUTHORS_KWARGS)
    missing, unexpected = models.load_pretrained(model, {'model': state_dict}, log=None)
    assert missing == [] and unexpected == []
    fused, explicit, pooled = outputs(model, x)
    assert (fused - fx['logits']).abs().max() <= 1e-5
    assert (explicit - fx['logits']).abs().max() <= 1e-5
    assert (pooled - fx['pooled']).abs().max() <= 1e-5
    # without fc_norm (mmpretrain style) the authors' fc_norm has nowhere to go and is reported
    plain = HiViT(**{**AUTHORS_KWARGS, 'fc_norm': False})
    missing, unexpected = models.load_pretrained(plain, AUTHORS, log=None)
    assert missing == [] and sorted(unexpected) == ['fc_norm.bias', 'fc_norm.weight']


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    source = HiViT(**AUTHORS_KWARGS).eval()
    state_dict = source.state_dict()
    assert all(v is state_dict[k] for k, v in source.checkpoint_filter(state_dict).items())
    assert set(source.checkpoint_filter(state_dict)) == set(state_dict)
    torch.save({'model': state_dict, 'epoch': 3}, tmp_path / 'ckpt.pth')
    torch.manual_seed(2)
    target = HiViT(**AUTHORS_KWARGS).eval()
    missing, unexpected = models.load_pretrained(target, tmp_path / 'ckpt.pth', log=None)
    assert missing == [] and unexpected == []
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_filter_is_a_noop_at_the_same_resolution():
    fx, _ = load_fixture(MMPRETRAIN)
    model = HiViT(**MMPRETRAIN_KWARGS)
    out = model.checkpoint_filter(dict(fx['state_dict']))
    assert len(out) == len(fx['state_dict'])
    assert out['pos_embed'] is fx['state_dict']['backbone.pos_embed']
    assert out['head.weight'] is fx['state_dict']['head.fc.weight']
    for i in range(6, 13):
        key = f'blocks.{i}.attn.relative_position_bias_table'
        assert out[key] is fx['state_dict'][f'backbone.{key}']


def test_finetune_at_256_from_224_weights():
    fx, x = load_fixture(MMPRETRAIN)
    old_tables = {k[len('backbone.'):]: v for k, v in fx['state_dict'].items()
                  if k.endswith('relative_position_bias_table')}
    model = HiViT(img_size=256, **MMPRETRAIN_KWARGS)
    missing, unexpected = models.load_pretrained(model, MMPRETRAIN, log=None)
    assert missing == [] and unexpected == []
    assert model.grid_size == (16, 16) and model.pos_embed.shape == (1, 256, 24)
    assert len(old_tables) == 7
    for key, old in old_tables.items():
        new = model.get_parameter(key)
        assert old.shape == (27 * 27, 2) and new.shape == (31 * 31, 2)
        # offset (0, 0) sits on the centre of both offset grids, so bicubic keeps its value exactly
        assert torch.allclose(new[15 * 31 + 15], old[13 * 27 + 13], atol=1e-6)
        assert not torch.allclose(new[:729], old)
    for block in model.blocks[model.num_stem_blocks:]:
        assert torch.equal(block.attn.relative_position_index, relative_position_index((16, 16)))
    x256 = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        out = model(x256)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # the 224 model run on 256 inputs resizes the same way at run time
    ref = HiViT(**MMPRETRAIN_KWARGS).eval()
    models.load_pretrained(ref, MMPRETRAIN, log=None)
    with torch.no_grad():
        assert torch.allclose(ref(x256), out, atol=1e-5)


def test_resizing_keeps_the_axes_apart():
    """Resize 14x14 -> 14x18 units (224 x 288 px) tables that vary only along x: they must still vary only along x."""
    source = HiViT(**MMPRETRAIN_KWARGS)
    state_dict = source.state_dict()
    state_dict['pos_embed'] = torch.arange(14.).repeat(14)[None, :, None].expand(1, 196, 24).clone()
    dx = torch.arange(27.).repeat(27)  # row = (dy + 13) * 27 + (dx + 13)
    for key in [k for k in state_dict if k.endswith('relative_position_bias_table')]:
        state_dict[key] = dx[:, None].expand(729, 2).clone()
    model = HiViT(img_size=(224, 288), **MMPRETRAIN_KWARGS)
    out = model.checkpoint_filter(state_dict)
    pos = out['pos_embed'].reshape(14, 18, 24)
    assert torch.allclose(pos, pos[:1].expand(14, 18, 24), atol=1e-5)  # constant down each column
    assert (pos[0, 1:, 0] - pos[0, :-1, 0] > 0).all()  # increasing along x
    table = out['blocks.6.attn.relative_position_bias_table'].reshape(27, 35, 2)
    assert torch.allclose(table, table[:1].expand(27, 35, 2), atol=1e-5)
    assert (table[0, 1:, 0] - table[0, :-1, 0] > 0).all()
    assert torch.allclose(table[:, 17], torch.full((27, 2), 13.), atol=1e-5)  # dx = 0 keeps its value
    missing, unexpected = models.load_pretrained(model, out, log=None)
    assert missing == [] and unexpected == []


def test_forward_at_any_multiple_of_16():
    model = HiViT(**MMPRETRAIN_KWARGS).eval()
    with torch.no_grad():
        for size in [(160, 160), (192, 256), (32, 48)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 10)
            assert model.forward_features(torch.randn(1, 3, *size)).shape == (1, size[0] * size[1] // 256, 24)
        for kwargs in (dict(rpe=False), dict(ape=False), dict(rpe=False, ape=False)):
            plain = HiViT(**MMPRETRAIN_KWARGS, **kwargs).eval()
            assert plain(torch.randn(1, 3, 256, 256)).shape == (1, 10)
    with pytest.raises(ValueError, match='multiple of the 16-pixel'):
        model(torch.randn(1, 3, 200, 200))
    with pytest.raises(ValueError, match='multiple of the 16-pixel'):
        HiViT(img_size=200)
    with pytest.raises(ValueError, match='divisible'):
        HiViT(embed_dim=30)


def test_training_step_reaches_every_parameter():
    model = models.create_model('hivit_tiny', embed_dim=24, num_heads=2, depths=(1, 1, 2), num_classes=10,
                                drop_path_rate=0.1).train()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(dim=1).mean()
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_layer_decay_groups(tiny):
    optimizer = create_optimizer_v2(tiny, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in tiny.named_parameters()}
    scale, decay = {}, {}
    for group in optimizer.param_groups:
        for p in group['params']:
            scale[names[id(p)]] = group['lr_scale']
            decay[names[id(p)]] = group['weight_decay']
    assert set(scale) == set(names.values())

    def depth(name):
        if name.startswith(('patch_embed', 'pos_embed')):
            return 0
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1
        assert name.startswith(('head', 'fc_norm')), name
        return 17

    per_depth = {}
    for name, s in scale.items():
        per_depth.setdefault(depth(name), set()).add(s)
    assert sorted(per_depth) == list(range(18))  # stem, 16 blocks (2+2 MLP, 2 merges, 10 attention), head
    assert all(len(s) == 1 for s in per_depth.values())
    scales = [per_depth[d].pop() for d in range(18)]
    assert scales == pytest.approx([0.75 ** (17 - d) for d in range(18)])
    assert len(set(scales)) == 18 and scales[-1] == 1.0 and min(scales) == scale['patch_embed.proj.weight']

    for name, wd in decay.items():
        no_decay = (name == 'pos_embed' or name.endswith('relative_position_bias_table') or name.endswith('.bias')
                    or 'norm' in name)
        assert wd == (0. if no_decay else 0.05), name
    assert decay['blocks.6.attn.relative_position_bias_table'] == 0. and decay['pos_embed'] == 0.
    assert decay['blocks.6.attn.qkv.weight'] == 0.05 and decay['patch_embed.proj.weight'] == 0.05
    assert decay['blocks.2.reduction.weight'] == 0.05 and decay['head.weight'] == 0.05


def test_no_weight_decay_patterns(tiny):
    patterns = tiny.no_weight_decay()
    matched = [n for n, _ in tiny.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    assert sorted(matched) == sorted(['pos_embed'] + [f'blocks.{i}.attn.relative_position_bias_table'
                                                      for i in range(6, 16)])


def test_create_model_with_common_kwargs():
    model = models.create_model('hivit_tiny', num_classes=10, drop_path_rate=0.1)
    assert isinstance(model, HiViT) and model.head.out_features == 10
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert models.model_class('hivit_small') is HiViT
    assert {'norm_eps', 'fc_norm', 'depths', 'embed_dim', 'num_heads'} <= set(models.model_arg_names('hivit_base'))
    with torch.device('meta'):
        assert models.create_model('hivit_small').blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
        assert models.create_model('hivit_base').blocks[-1].drop_path.drop_prob == pytest.approx(0.5)


def test_registered_in_timm_under_our_names():
    for name in ('hivit_tiny', 'hivit_small', 'hivit_base'):
        assert name in timm.list_models()
    with torch.device('meta'):
        model = timm.create_model('hivit_tiny', num_classes=3)
    assert type(model) is HiViT and model.head.out_features == 3
    with pytest.raises(ValueError, match='no hub weights'):
        timm.create_model('hivit_tiny', pretrained=True)
