"""SWAG ViT-L/16 and ViT-H/14: exact sizes, and SWAG / torchvision / timm state dicts giving the upstream logits.

References: torchvision's ``VisionTransformer`` (the architecture of SWAG's and torchvision's SWAG weights) and timm's
``vit_*`` models, built with the same random weights. Widths and head counts are the real ones; depth and resolution
are reduced for speed (the key conversion is the same for every depth and size).
"""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torchvision.models import vision_transformer as tv

from conftest import REPO, run_script
import datasets
from framework import options
import models

# (our model, torchvision builder, patch, width, MLP, blocks, default input size)
ARCHS = {
    'swag_vit_l16': ('vit_l_16', 16, 1024, 4096, 24, 512),
    'swag_vit_h14': ('vit_h_14', 14, 1280, 5120, 32, 518),
}
TIMM_NAMES = {'swag_vit_l16': 'vit_large_patch16_384', 'swag_vit_h14': 'vit_huge_patch14_224'}
SMALL_IMAGE = {'swag_vit_l16': 64, 'swag_vit_h14': 56}  # a 4x4 patch grid


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (torchvision zero-inits its head and class token): LayerNorm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = p.ndim == 1 and name.endswith('weight') and ('ln' in name or 'norm' in name)
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.05 * noise)
    return module


def torchvision_vit(name: str, image_size: int, num_layers: int = 2, num_classes: int = 10, seed: int = 0):
    _, patch, width, mlp, _, _ = ARCHS[name]
    model = tv.VisionTransformer(image_size=image_size, patch_size=patch, num_layers=num_layers, num_heads=16,
                                 hidden_dim=width, mlp_dim=mlp, num_classes=num_classes)
    return randomize_(model, seed)


def swag_layout(tv_state_dict: dict) -> dict:
    """A torchvision ViT state dict rewritten in SWAG's own key layout (facebookresearch/SWAG vision_transformer.py):
    ``layer_{i}``, ``mlp.linear_1/2``, ``head.layers.head``, position embedding sequence-first [S, 1, D]."""
    out = {}
    for key, value in tv_state_dict.items():
        key = key.replace('encoder.layers.encoder_layer_', 'encoder.layers.layer_')
        key = key.replace('.mlp.0.', '.mlp.linear_1.').replace('.mlp.3.', '.mlp.linear_2.')
        key = key.replace('heads.head.', 'head.layers.head.')
        if key == 'encoder.pos_embedding':
            value = value.permute(1, 0, 2).contiguous()
        out[key] = value.clone()
    return out


def load_quietly(model, state_dict):
    missing, unexpected = models.load_pretrained(model, state_dict, drop_mismatched_head=False, log=None)
    assert missing == [] and unexpected == []
    return model


def assert_same_logits(ours, reference, image_size: int, seed: int = 1):
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    ours.eval(), reference.eval()
    with torch.no_grad():  # torchvision's MultiheadAttention takes its fused fast path here
        diff = (ours(x) - reference(x)).abs().max().item()
        assert diff <= 1e-4, diff
    ours.train(), reference.train()  # dropout and drop path are 0: the regular MHA path, same numbers
    diff = (ours(x) - reference(x)).abs().max().item()
    assert diff <= 1e-4, diff


# --------------------------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize('name, expected', [('swag_vit_l16', 305_174_504), ('swag_vit_h14', 633_470_440)])
def test_exact_parameter_count(name, expected):
    with torch.device('meta'):
        model = models.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected
    _, patch, width, _, depth, size = ARCHS[name]
    assert model.patch_embed.img_size == size and model.patch_embed.patch_size == patch
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (width, depth, 16)
    assert model.blocks[0].mlp.fc1.out_features == 4 * width
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * depth + 1 and all(m.eps == 1e-6 for m in norms)
    assert models.data_config(name)['input_size'] == size and models.data_config(name)['crop_pct'] == 1.0
    assert models.data_config(name)['interpolation'] == 'bicubic'


@pytest.mark.parametrize('name', sorted(ARCHS))
def test_full_size_keys_and_shapes_equal_torchvision(name):
    """Every tensor of torchvision's full-size builder (at the SWAG resolution) lands on one of ours, same shape."""
    builder, *_, size = ARCHS[name]
    with torch.device('meta'):
        reference = getattr(tv, builder)(image_size=size)
        ours = models.create_model(name)
    converted = ours.checkpoint_filter(dict(reference.state_dict()))
    own = ours.state_dict()
    assert sorted(converted) == sorted(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    assert len(own) == (296 if name == 'swag_vit_l16' else 392)


def test_img_size_any_multiple_of_the_patch():
    with torch.device('meta'):
        model = models.create_model('swag_vit_h14', img_size=224)
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 1280)
    with pytest.raises(ValueError, match='not divisible by patch size 14'):
        models.create_model('swag_vit_h14', img_size=224 + 7, depth=1)


# ------------------------------------------------------------------------------------------------ same logits

@pytest.mark.parametrize('layout', ['torchvision', 'swag'])
@pytest.mark.parametrize('name', sorted(ARCHS))
def test_logits_equal_torchvision(name, layout):
    size = SMALL_IMAGE[name]
    reference = torchvision_vit(name, size)
    state_dict = reference.state_dict()
    if layout == 'swag':
        state_dict = swag_layout(state_dict)
        assert state_dict['encoder.pos_embedding'].shape == (17, 1, ARCHS[name][2])
    ours = load_quietly(models.create_model(name, img_size=size, depth=2, num_classes=10), state_dict)
    assert_same_logits(ours, reference, size)


@pytest.mark.parametrize('name', sorted(ARCHS))
def test_logits_equal_timm(name):
    size = SMALL_IMAGE[name]
    reference = timm.create_model(TIMM_NAMES[name], img_size=size, depth=2, num_classes=10)
    assert reference.global_pool == 'token' and reference.norm.eps == 1e-6
    randomize_(reference, seed=2)
    ours = load_quietly(models.create_model(name, img_size=size, depth=2, num_classes=10), reference.state_dict())
    assert_same_logits(ours, reference, size)


def test_other_class_count_drops_the_head():
    reference = torchvision_vit('swag_vit_l16', 64, num_classes=1000)
    ours = models.create_model('swag_vit_l16', img_size=64, depth=2, num_classes=10)
    head_before = ours.head.weight.clone()
    lines = []
    missing, unexpected = models.load_pretrained(ours, swag_layout(reference.state_dict()), log=lines.append)
    assert sorted(missing) == ['head.bias', 'head.weight'] and unexpected == []
    assert torch.equal(ours.head.weight, head_before)
    assert any('head.weight' in line and 'dropped' in line for line in lines)
    with torch.no_grad():  # the trunk is torchvision's
        x = torch.randn(1, 3, 64, 64)
        tokens = reference._process_input(x)
        tokens = torch.cat([reference.class_token.expand(1, -1, -1), tokens], dim=1)
        expected = reference.encoder(tokens)[:, 0]
        assert (ours.forward_features(x)[:, 0] - expected).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------- position embeddings

@pytest.mark.parametrize('layout', ['torchvision', 'swag'])
@pytest.mark.parametrize('img_size', [64, 384])
def test_position_embedding_resized_like_timm(layout, img_size):
    """A checkpoint with a 32x32 grid (512 px, patch 16) loaded at another size: timm's bicubic resample of the grid,
    class-token slot kept."""
    reference = randomize_(tv.VisionTransformer(image_size=512, patch_size=16, num_layers=1, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10), seed=4)
    state_dict = reference.state_dict()
    if layout == 'swag':
        state_dict = swag_layout(state_dict)
    ours = load_quietly(models.create_model('swag_vit_l16', img_size=img_size, embed_dim=32, depth=1, num_heads=2,
                                            mlp_ratio=2., num_classes=10), state_dict)
    grid = img_size // 16
    pos = reference.encoder.pos_embedding.detach()  # [1, 1 + 32*32, 32]
    expected = resample_abs_pos_embed(pos, new_size=(grid, grid), old_size=(32, 32), num_prefix_tokens=1)
    assert ours.pos_embed.shape == (1, 1 + grid * grid, 32)
    assert torch.equal(ours.pos_embed.data, expected)
    assert torch.equal(ours.pos_embed.data[:, 0], pos[:, 0])
    # independently of timm: the grid as a 32x32 image, bicubic (antialiased when shrinking)
    image = pos[:, 1:].reshape(1, 32, 32, 32).permute(0, 3, 1, 2)
    by_hand = F.interpolate(image, size=(grid, grid), mode='bicubic', antialias=True, align_corners=False)
    assert torch.allclose(ours.pos_embed.data[:, 1:], by_hand.permute(0, 2, 3, 1).reshape(1, grid * grid, 32),
                          atol=1e-6)


def test_position_embedding_at_the_checkpoint_size_is_copied():
    reference = torchvision_vit('swag_vit_h14', 56, seed=5)
    ours = load_quietly(models.create_model('swag_vit_h14', img_size=56, depth=2, num_classes=10),
                        swag_layout(reference.state_dict()))
    assert torch.equal(ours.pos_embed.data, reference.encoder.pos_embedding.detach())


# ------------------------------------------------------------------------------------------------------ errors

def test_pre_logits_checkpoint_is_refused():
    reference = tv.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=10, representation_size=16)
    ours = models.create_model('swag_vit_l16', img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(models.CheckpointError, match='pre-logits layer'):
        models.load_pretrained(ours, reference.state_dict(), log=None)


def test_non_square_position_grid_is_refused():
    ours = models.create_model('swag_vit_l16', img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    state_dict = ours.state_dict()
    state_dict['pos_embed'] = torch.zeros(1, 1 + 6, 32)
    with pytest.raises(models.CheckpointError, match='not a class token plus a square patch grid'):
        models.load_pretrained(ours, state_dict, log=None)


# ------------------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize('config, name', [('swag-vit-l16', 'swag_vit_l16'), ('swag-vit-h14', 'swag_vit_h14')])
def test_config_matches_the_model_data_config(config, name):
    args = options.parse_args(['--config', str(REPO / 'config' / f'{config}.json')])
    data = models.data_config(name)
    assert args.model == name and args.input_size == data['input_size']
    assert args.crop_pct == data['crop_pct'] == 1.0


# --------------------------------------------------------------------------------------------------- end to end

SMALL_ARCH = ['--model', 'swag_vit_l16', '--input-size', '64', '--depth', '2', '--embed-dim', '64', '--num-heads', '4']


@pytest.mark.parametrize('flag, layout', [('--finetune', 'torchvision'), ('--resume', 'swag')])
def test_main_eval_with_upstream_weights(tmp_path, fake_imagenet, flag, layout):
    """main.py --eval on a 3-class ImageFolder with a torchvision/SWAG file: eval.json holds torchvision's scores."""
    reference = randomize_(tv.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4,
                                                hidden_dim=64, mlp_dim=256, num_classes=3), seed=6)
    state_dict = reference.state_dict()
    path = tmp_path / 'weights.pth'
    torch.save(swag_layout(state_dict) if layout == 'swag' else state_dict, path)
    argv = [*SMALL_ARCH, '--data-set', 'IMNET', '--data-path', str(fake_imagenet), '--eval-crop-ratio', '1.0',
            '--batch-size', '4', '--num-workers', '0', '--device', 'cpu', '--amp', 'none']
    out_dir = tmp_path / 'out'
    result = run_script([*argv, '--eval', flag, path, '--output_dir', out_dir])
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((out_dir / 'eval.json').read_text())
    assert scores['model'] == 'swag_vit_l16' and scores['input_size'] == 64 and scores['n_samples'] == 12

    # the same images through torchvision's model
    dataset, _ = datasets.build_dataset(is_train=False, args=options.parse_args(argv))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = reference.eval()(images)
    correct = int((logits.argmax(1) == labels).sum())
    assert scores['acc1'] == pytest.approx(100.0 * correct / len(labels), abs=1e-6)
    assert scores['loss'] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-4)
