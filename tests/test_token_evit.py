"""EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022): equality with a step-by-step reference, the
explicit attention path only where the score needs the map, closed-form schedules and the published GFLOPs at the SWAG
sizes, default locations, round trip, errors, dtypes."""
import math

import pytest
import torch

from models import apply_token_reduction, create_model, token_schedule
from models.layers import Attention, set_fused_attn
from models.token_reduction.evit import default_locations
from vit_reference import (attention, embed, expedit_gmacs, head, layer_norm, meta_vit, mlp, pairs, plain_forward,
                           tiny_vit)


# ------------------------------------------------------------------------------------------------ the reference

def evit_reference(model, images, keep_rate, locations, fuse, score):
    """Logits and final tokens of EViT, one image at a time, with explicit attention everywhere."""
    logits, features = [], []
    for image in images:
        x = embed(model, image[None])
        for index, block in enumerate(model.blocks):
            out, attn_map, _ = attention(block, x)
            x = x + out
            n = x.shape[1]
            keep = math.ceil(keep_rate * (n - 1))
            if index in locations and keep < n - 1:
                if score == 'mean':     # attention received from every query, averaged over queries and heads
                    scores = {j: attn_map[0, :, :, j].mean().item() for j in range(1, n)}
                else:                   # the class token's attention, averaged over heads
                    scores = {j: attn_map[0, :, 0, j].mean().item() for j in range(1, n)}
                ranked = sorted(scores, key=lambda j: scores[j], reverse=True)
                tokens = [x[0, 0]] + [x[0, j] for j in ranked[:keep]]
                if fuse:
                    tokens.append(sum(scores[j] * x[0, j] for j in sorted(ranked[keep:])))
                x = torch.stack(tokens)[None]
            x = x + mlp(block, x)
        logits.append(head(model, x)[0])
        features.append(layer_norm(model.norm, x[0]))
    return torch.stack(logits), features


# ---------------------------------------------------------------------------------------------------- equality

@pytest.mark.parametrize('fused', [True, False], ids=['sdpa', 'explicit'])
@pytest.mark.parametrize('score', ['mean', 'cls'])
@pytest.mark.parametrize('fuse', [False, True], ids=['drop', 'fuse'])
@pytest.mark.parametrize('keep_rate, locations', [(0.6, None), (0.5, [0, 2])], ids=['default-locations', 'custom'])
def test_evit_equals_reference(keep_rate, locations, fuse, score, fused):
    model = tiny_vit()                                         # 65 tokens, 4 blocks: default locations 1, 2, 3
    set_fused_attn(model, fused)
    spec = {'method': 'evit', 'keep_rate': keep_rate, 'fuse': fuse, 'score': score}
    if locations is not None:
        spec['locations'] = locations
    apply_token_reduction(model, spec)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, expected_tokens = evit_reference(model, images, keep_rate, locations or [1, 2, 3], fuse, score)
        logits = model(images)
        tokens = model.forward_features(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for image_tokens, reference in zip(tokens, expected_tokens):
        torch.testing.assert_close(image_tokens, reference, rtol=1e-4, atol=1e-4)
    assert tokens.shape[1] == token_schedule(model)['tokens_out']
    assert not torch.allclose(logits, plain_forward(model, images), atol=1e-2), 'EViT changed nothing'


@pytest.mark.parametrize('score, explicit_blocks', [('mean', [1, 2, 3]), ('cls', [])])
def test_explicit_attention_only_where_the_score_needs_the_map(monkeypatch, score, explicit_blocks):
    """score 'mean' needs the whole map in the three reduction blocks only; 'cls' never leaves the fused kernel."""
    calls = []
    original = Attention.attend

    def recording_attend(self, q, k, v, attn_bias=None, return_attn=False):
        calls.append(return_attn)
        return original(self, q, k, v, attn_bias, return_attn)

    monkeypatch.setattr(Attention, 'attend', recording_attend)
    model = tiny_vit()
    apply_token_reduction(model, {'method': 'evit', 'keep_rate': 0.7, 'score': score})
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 4                                # one attention per block, in block order
    assert [index for index, explicit in enumerate(calls) if explicit] == explicit_blocks


def test_keep_rate_one_or_a_full_keep_leaves_the_model_plain():
    """Upstream returns early when ceil(keep_rate · (N - 1)) = N - 1: no reordering, no fused token."""
    model = tiny_vit()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(images)
        for spec in ({'method': 'evit', 'keep_rate': 1.0, 'fuse': True},
                     {'method': 'evit', 'keep_rate': 0.999, 'fuse': True}):       # ceil(0.999 · 64) = 64
            apply_token_reduction(model, spec)
            torch.testing.assert_close(model(images), plain, rtol=1e-5, atol=1e-5)
            assert token_schedule(model)['tokens_out'] == 65


# ---------------------------------------------------------------------------------------------------- schedules


def stepped(tokens, locations, depth):
    """Closed form: ``tokens[k]`` tokens after the k-th location; attention of a location sees the count before."""
    result, stage = [], 0
    for index in range(depth):
        before = tokens[stage]
        if index in locations:
            stage += 1
        result.append((before, tokens[stage]))
    return result


L16, H14 = (512, 16, 1024, 24), (518, 14, 1280, 32)


@pytest.mark.parametrize('geometry, keep_rate, fuse, tokens', [
    (L16, 0.8, False, [1025, 821, 657, 526]),
    (L16, 0.7, False, [1025, 718, 503, 353]),
    (L16, 0.5, False, [1025, 513, 257, 129]),
    (L16, 0.8, True, [1025, 822, 659, 529]),          # one fused token more after every location
    (H14, 0.7, False, [1370, 960, 673, 472]),
    (H14, 0.6, False, [1370, 823, 495, 298]),
    (H14, 0.5, False, [1370, 686, 344, 173]),
], ids=['L16-0.8', 'L16-0.7', 'L16-0.5', 'L16-0.8-fuse', 'H14-0.7', 'H14-0.6', 'H14-0.5'])
def test_schedule_at_swag_sizes(geometry, keep_rate, fuse, tokens):
    depth = geometry[3]
    locations = [depth // 4, depth // 2, 3 * depth // 4]              # 6 12 18 / 8 16 24
    schedule = token_schedule(meta_vit(*geometry), {'method': 'evit', 'keep_rate': keep_rate, 'fuse': fuse})
    assert pairs(schedule) == stepped(tokens, locations, depth)
    assert schedule['tokens_out'] == tokens[-1] and not schedule['data_dependent']


@pytest.mark.parametrize('geometry, keep_rate, fuse, published', [
    (L16, 0.8, False, 264.9), (L16, 0.7, False, 227.1), (L16, 0.5, False, 170.2),
    (H14, 0.7, False, 632.3), (H14, 0.6, False, 544.4), (H14, 0.5, False, 472.0),
    (L16, 0.8, True, 265.39),                 # fuse on: EViT's fused token, not a README row
])
def test_schedule_gives_the_published_gflops(geometry, keep_rate, fuse, published):
    """Expedit-SWAG's EViT GFLOPs from our schedule by its counter's closed form (fuse adds its score-weighting
    multiply)."""
    img_size, patch_size, width, depth = geometry
    schedule = pairs(token_schedule(meta_vit(*geometry), {'method': 'evit', 'keep_rate': keep_rate, 'fuse': fuse}))
    extra = sum((n - 1 - math.ceil(keep_rate * (n - 1))) * width for n, n_mlp in schedule if n != n_mlp) * fuse
    digits = 2 if fuse else 1
    assert round(expedit_gmacs(schedule, width, 16, patch_size, img_size, extra), digits) == published


def test_default_locations_per_depth():
    assert default_locations(12) == [3, 6, 9] and default_locations(24) == [6, 12, 18]
    assert default_locations(32) == [8, 16, 24] and default_locations(4) == [1, 2, 3]
    assert default_locations(6) == [1, 3, 4] and default_locations(2) == [0, 1] and default_locations(1) == [0]
    deit = apply_token_reduction(create_model('deit_tiny', img_size=64), {'method': 'evit', 'keep_rate': 0.5})
    assert pairs(token_schedule(deit)) == stepped([17, 9, 5, 3], [3, 6, 9], 12)
    assert pairs(token_schedule(deit, {'method': 'evit', 'keep_rate': 0.5, 'locations': [0, 11]})) == \
        stepped([17, 9, 5], [0, 11], 12)


# ---------------------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize('spec, word', [
    ({'method': 'evit'}, "'keep_rate' is required"),
    ({'method': 'evit', 'keep_rate': 0}, "'keep_rate'"),
    ({'method': 'evit', 'keep_rate': 1.5}, "'keep_rate'"),
    ({'method': 'evit', 'keep_rate': -0.2}, "'keep_rate'"),
    ({'method': 'evit', 'keep_rate': 'half'}, "'keep_rate'"),
    ({'method': 'evit', 'keep_rate': True}, "'keep_rate'"),
    ({'method': 'evit', 'keep_rate': float('nan')}, "'keep_rate'"),
    ({'method': 'evit', 'keep_rate': 0.5, 'locations': []}, "'locations'"),
    ({'method': 'evit', 'keep_rate': 0.5, 'locations': [4]}, "'locations' 4 is outside"),
    ({'method': 'evit', 'keep_rate': 0.5, 'locations': [-1]}, "'locations'"),
    ({'method': 'evit', 'keep_rate': 0.5, 'locations': 2}, "'locations'"),
    ({'method': 'evit', 'keep_rate': 0.5, 'locations': [1.5]}, "'locations'"),
    ({'method': 'evit', 'keep_rate': 0.5, 'locations': [2, 2]}, "'locations' [2, 2] repeats"),
    ({'method': 'evit', 'keep_rate': 0.5, 'fuse': 'yes'}, "'fuse'"),
    ({'method': 'evit', 'keep_rate': 0.5, 'score': 'max'}, "'score'"),
    ({'method': 'evit', 'keep_rate': 0.5, 'drop_loc': [1]}, 'drop_loc'),
])
def test_bad_specs_are_one_line_errors(spec, word):
    model = tiny_vit()                                                  # 4 blocks
    with pytest.raises(ValueError) as error:
        apply_token_reduction(model, spec)
    message = str(error.value)
    assert word in message and '\n' not in message
    assert model.token_reduction is None
