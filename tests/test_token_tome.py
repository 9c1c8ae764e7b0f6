"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023): equality with a step-by-step reference,
closed-form schedules at the SWAG sizes, the (N - 1) // 2 cap, per-block r, fused vs explicit attention with the
log-size bias, round trip, errors, dtypes."""

import pytest
import torch

import models
from models import apply_token_reduction, create_model, token_schedule
from models.layers import set_fused_attn
from vit_reference import (attention, embed, expedit_gmacs, head, layer_norm, meta_vit, mlp, pairs, plain_forward,
                           tiny_vit)


# ------------------------------------------------------------------------------------------------ the reference

def merge_one_image(tokens, size, keys, r):
    """Bipartite soft matching and size-weighted merging of one image, as the ToMe paper lists them.

    tokens (N, C), size (N,), keys (heads, N, head_dim) -> merged tokens (N - r, C), their sizes (N - r,)."""
    metric = keys.mean(0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = tokens.shape[0]
    even, odd = list(range(0, n, 2)), list(range(1, n, 2))
    similarity = (metric[even] @ metric[odd].t()).tolist()
    best = {}                                   # even token -> (best similarity, its odd match)
    for row, a in enumerate(even):
        if a == 0:
            continue                            # the class token is never merged
        column = max(range(len(odd)), key=lambda j: similarity[row][j])
        best[a] = (similarity[row][column], odd[column])
    merged = sorted(best, key=lambda a: best[a][0], reverse=True)[:r]
    kept = [a for a in even if a not in merged]
    sums = {b: tokens[b] * size[b] for b in odd}
    sizes = {b: size[b].clone() for b in odd}
    for a in merged:
        b = best[a][1]
        sums[b] = sums[b] + tokens[a] * size[a]
        sizes[b] = sizes[b] + size[a]
    new_tokens = [tokens[a] for a in kept] + [sums[b] / sizes[b] for b in odd]
    new_sizes = [size[a] for a in kept] + [sizes[b] for b in odd]
    return torch.stack(new_tokens), torch.stack(new_sizes)


def tome_reference(model, images, r_per_block, prop_attn=True):
    """Logits and final tokens of ToMe on ``model``, one image at a time, explicit attention with log(size) added
    to every key's logits (sizes start at 1, so log 0 before the first merge)."""
    logits, features = [], []
    for image in images:
        x = embed(model, image[None])
        size = torch.ones(x.shape[1])
        for block, r in zip(model.blocks, r_per_block):
            out, _, keys = attention(block, x, size.log()[None] if prop_attn else None)
            x = x + out
            r = min(r, (x.shape[1] - 1) // 2)
            if r > 0:
                merged, size = merge_one_image(x[0], size, keys[0], r)
                x = merged[None]
            x = x + mlp(block, x)
        logits.append(head(model, x)[0])
        features.append(x[0])
    return torch.stack(logits), features


# ---------------------------------------------------------------------------------------------------- equality

@pytest.mark.parametrize('fused', [True, False], ids=['sdpa', 'explicit'])
@pytest.mark.parametrize('r, prop_attn', [(8, True), (8, False), ([10, 0, 30, 5], True)],
                         ids=['r8', 'r8-no-prop', 'r-list-capped'])
def test_tome_equals_reference(r, prop_attn, fused):
    model = tiny_vit()                                          # 64 px, patch 8: 65 tokens, 4 blocks
    set_fused_attn(model, fused)
    apply_token_reduction(model, {'method': 'tome', 'r': r, 'prop_attn': prop_attn})
    images = torch.randn(2, 3, 64, 64)
    r_per_block = r if isinstance(r, list) else [r] * 4
    with torch.no_grad():
        expected, expected_tokens = tome_reference(model, images, r_per_block, prop_attn)
        logits = model(images)
        tokens = model.forward_features(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for image_tokens, reference in zip(tokens, expected_tokens):
        torch.testing.assert_close(image_tokens, layer_norm(model.norm, reference), rtol=1e-4, atol=1e-4)
    assert tokens.shape[1] == token_schedule(model)['tokens_out']
    assert not torch.allclose(logits, plain_forward(model, images), atol=1e-2), 'ToMe changed nothing'


def test_log_size_bias_same_under_sdpa_and_explicit():
    """Proportional attention passes log(size) as SDPA's additive mask; the explicit path adds it to the logits."""
    model = tiny_vit(seed=1)
    apply_token_reduction(model, {'method': 'tome', 'r': 6})
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fused = model(images)
        set_fused_attn(model, False)
        explicit = model(images)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_tome_on_deit_small():
    """DeiT-S at 224 with r = 13, the ToMe README's ViT-S/16 setting: 197 tokens lose 13 per block, 41 are left."""
    torch.manual_seed(0)
    model = apply_token_reduction(create_model('deit_small'), {'method': 'tome', 'r': 13}).eval()
    schedule = token_schedule(model)
    assert pairs(schedule) == [(197 - 13 * i, 184 - 13 * i) for i in range(12)]
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(images)
        logits = model(images)
        expected, _ = tome_reference(model, images, [13] * 12)
    assert tokens.shape == (1, 41, 384)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- schedules


def test_schedule_swag_l16_r40():
    schedule = token_schedule(meta_vit(512, 16, 1024, 24), {'method': 'tome', 'r': 40})
    assert pairs(schedule) == [(1025 - 40 * i, 1025 - 40 * (i + 1)) for i in range(24)]
    assert schedule['tokens_in'] == 1025 and schedule['tokens_out'] == 65 and not schedule['data_dependent']


def test_schedule_swag_h14_r40():
    schedule = token_schedule(meta_vit(518, 14, 1280, 32), {'method': 'tome', 'r': 40})
    assert pairs(schedule) == [(1370 - 40 * i, 1370 - 40 * (i + 1)) for i in range(32)]
    assert schedule['tokens_out'] == 90


@pytest.mark.parametrize('geometry, published', [
    ((512, 16, 1024, 24), {10: 317.5, 20: 271.2, 40: 184.3}),
    ((518, 14, 1280, 32), {10: 890.0, 20: 760.0, 40: 516.9})], ids=['L16', 'H14'])
def test_schedule_gives_the_published_gflops(geometry, published):
    """Expedit-SWAG's ToMe GFLOPs from our schedule by its counter's closed form, with ToMe's own counted ops:
    log(size) added to the logits from the second block on, the even·oddᵀ matching matmul, the metric's normalising
    division and the size weighting (x·size before the merge, ÷size after)."""
    img_size, patch_size, width, depth = geometry
    head_dim = width // 16
    for r, gflops in published.items():
        schedule = pairs(token_schedule(meta_vit(*geometry), {'method': 'tome', 'r': r}))
        extra = sum(16 * n * n for n, _ in schedule[1:])
        extra += sum((n + 1) // 2 * (n // 2) * head_dim + n * head_dim + n * width + n_mlp * width
                     for n, n_mlp in schedule)
        assert round(expedit_gmacs(schedule, width, 16, patch_size, img_size, extra), 1) == gflops


def test_schedule_cap_binds():
    """r = 42 on L/16: the last block has 59 tokens, so only (59 - 1) // 2 = 29 can be merged."""
    schedule = token_schedule(meta_vit(512, 16, 1024, 24), {'method': 'tome', 'r': 42})
    assert pairs(schedule)[:23] == [(1025 - 42 * i, 1025 - 42 * (i + 1)) for i in range(23)]
    assert pairs(schedule)[23] == (59, 30) and schedule['tokens_out'] == 30


def test_schedule_per_block_list_and_other_input_size():
    model = tiny_vit()
    schedule = token_schedule(model, {'method': 'tome', 'r': [10, 0, 30, 5]})
    assert pairs(schedule) == [(65, 55), (55, 55), (55, 28), (28, 23)]      # block 2: cap (55 - 1) // 2 = 27
    schedule = token_schedule(model, {'method': 'tome', 'r': 3}, input_size=32)   # 16 patches
    assert pairs(schedule) == [(17, 14), (14, 11), (11, 8), (8, 5)]


# ---------------------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize('spec, word', [
    ({'method': 'tome'}, "'r' is required"),
    ({'method': 'tome', 'r': 'many'}, "'r'"),
    ({'method': 'tome', 'r': -1}, "'r'"),
    ({'method': 'tome', 'r': True}, "'r'"),
    ({'method': 'tome', 'r': 2.5}, "'r'"),
    ({'method': 'tome', 'r': [1, 2]}, "'r' has 2 values"),
    ({'method': 'tome', 'r': [1, -2, 0, 0]}, "'r'"),
    ({'method': 'tome', 'r': []}, "'r'"),
    ({'method': 'tome', 'r': 1000}, "'r' 1000"),
    ({'method': 'tome', 'r': [16, 16, 16, 16]}, "'r'"),
    ({'method': 'tome', 'r': 4, 'prop_attn': 'yes'}, "'prop_attn'"),
    ({'method': 'tome', 'r': 4, 'proportional': True}, 'proportional'),
])
def test_bad_specs_are_one_line_errors(spec, word):
    model = tiny_vit()                                                  # 64 patches, 4 blocks
    with pytest.raises(ValueError) as error:
        apply_token_reduction(model, spec)
    message = str(error.value)
    assert word in message and '\n' not in message
    assert model.token_reduction is None                                # the model is unchanged


def test_models_package_exports():
    assert models.apply_token_reduction is apply_token_reduction and 'tome' in models.token_reduction.METHODS
