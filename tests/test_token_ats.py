"""ATS (Fayyaz et al., "Adaptive Token Sampling for Efficient Vision Transformers", ECCV 2022;
models/token_reduction/ats.py) against a per-image reference written from the paper's steps: explicit attention maps,
dense nearest-CDF picks, Python de-duplication, one image at a time (so no padding); the method runs whole batches,
padded, and must give every image the same result."""

import pytest
import torch

from models import apply_token_reduction, create_model, token_schedule
from models.token_reduction.ats import adaptive_sample, nearest_positions
from vit_reference import merge_heads, meta_vit, seeded_vit, split_heads


def reference_ats(model, image, locations, num_tokens):
    """One image (1, 3, H, W): returns (logits (1, classes), tokens after each block)."""
    x = model.patch_embed(image)
    x = torch.cat([model.cls_token, x], dim=1) + model.pos_embed
    counts = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = split_heads(attn, block.norm1(x))
        weights = ((q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5).softmax(dim=-1)  # (1, heads, N, N)
        N = x.shape[1]
        if index in locations:
            value_norm = v[0].transpose(0, 1).reshape(N, -1).norm(dim=-1)
            score = (weights[0, :, 0, :].sum(dim=0) * value_norm)[1:]
            score = score / score.sum()
            order = sorted(range(N - 1), key=lambda j: (score[j].item(), j))  # ascending, ties by position
            cdf = score[order].cumsum(dim=0)
            cdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
            draws = min(N, num_tokens) - 1
            start = cdf[cdf > 0].min()
            heights = start + torch.arange(draws) * (1 - start) / max(draws - 1, 1)
            picks = (heights[:, None] - cdf[None, :]).abs().argmin(dim=1)  # first of equal distances
            kept = [0] + [order[p] + 1 for p in sorted(set(picks.tolist()))]
            out = merge_heads(attn, weights[:, :, kept, :] @ v)
            x = x[:, kept] + out
        else:
            x = x + merge_heads(attn, weights @ v)
        x = x + block.mlp(block.norm2(x))
        counts.append(x.shape[1])
    return model.head(model.norm(x)[:, 0]), counts


def run_recording(model, images):
    """Logits and the state of the forward (its per-block real-token counts)."""
    method = model.token_reduction
    states = []

    def new_state(x, grid_size, depth):
        states.append(type(method).new_state(method, x, grid_size, depth))
        return states[-1]
    method.new_state = new_state
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        del method.new_state
    return logits, states[0]


SETTINGS = [([2], 1000), ([1, 3, 4], 30), ([0, 2], 20)]


@pytest.mark.parametrize('locations,num_tokens', SETTINGS)
def test_matches_per_image_reference_in_a_padded_batch(locations, num_tokens):
    model = seeded_vit(patch_size=4, depth=6, std=0.15, qkv_std=1.0, seed=1)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        references = [reference_ats(model, images[i:i + 1], locations, num_tokens) for i in range(4)]
    ref_logits = torch.cat([logits for logits, _ in references])
    ref_counts = [counts for _, counts in references]
    finals = [counts[-1] for counts in ref_counts]
    assert min(finals) < 65 and len(set(finals)) > 1  # tokens dropped, a different number per image: padding

    apply_token_reduction(model, {'method': 'ats', 'locations': locations, 'num_tokens': num_tokens})
    logits, state = run_recording(model, images)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    mlp_counts = torch.stack([record[:, 1] for record in state.kept_tokens], dim=1)  # (B, blocks)
    assert mlp_counts.tolist() == ref_counts
    attention_counts = torch.stack([record[:, 0] for record in state.kept_tokens], dim=1)
    assert attention_counts[:, 0].tolist() == [65] * 4 and torch.equal(attention_counts[:, 1:], mlp_counts[:, :-1])
    assert (logits - plain).abs().max() > 1e-3

    for i in range(4):  # batch 1: no padding at all
        single, single_state = run_recording(model, images[i:i + 1])
        torch.testing.assert_close(single, ref_logits[i:i + 1], rtol=1e-4, atol=1e-4)
        assert single_state.kept_tokens[-1][0, 1] == finals[i]

    apply_token_reduction(model, {'method': 'ats', 'locations': locations, 'num_tokens': num_tokens,
                                  'drop_tokens': False})  # padded to the upper bound instead: same results
    logits, state = run_recording(model, images)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.stack([r[:, 1] for r in state.kept_tokens], dim=1), mlp_counts)


def test_forward_features_shape_is_the_batch_largest_count():
    model = seeded_vit(patch_size=4, depth=6, std=0.15, qkv_std=1.0, seed=1)
    images = torch.randn(4, 3, 32, 32)
    apply_token_reduction(model, {'method': 'ats', 'locations': [1], 'num_tokens': 1000})
    _, state = run_recording(model, images)
    largest = int(state.kept_tokens[-1][:, 1].max())
    with torch.no_grad():
        tokens = model.forward_features(images)
    assert tokens.shape == (4, largest, 32)
    schedule = token_schedule(model)
    assert schedule['data_dependent'] and schedule['tokens_out'] == 65  # the upper bound


def test_nearest_positions_is_the_dense_argmin():
    """Binary search over the sorted CDF == argmin of the dense distance, first index on ties (repeated values from
    zero scores, heights exactly between two values)."""
    torch.manual_seed(0)
    scores = torch.rand(5, 40)
    scores[:, :6] = 0  # ties at the bottom
    scores[2, 10:20] = 0.25  # repeated values in the middle
    cdf = scores.sort(dim=1).values.cumsum(dim=1)
    cdf = (cdf - cdf[:, :1]) / (cdf[:, -1:] - cdf[:, :1])
    heights = torch.cat([torch.rand(5, 30), cdf[:, 10:15], (cdf[:, 20:25] + cdf[:, 21:26]) / 2], dim=1)
    dense = (heights[:, :, None] - cdf[:, None, :]).abs().argmin(dim=2)
    assert torch.equal(nearest_positions(cdf.contiguous(), heights), dense)


def test_padding_does_not_change_the_sample():
    """A padded image (scores 0 at padded slots, flagged) samples the same tokens as the image alone."""
    torch.manual_seed(0)
    score = torch.rand(1, 30) ** 4
    score = score / score.sum()
    alone_index, alone_real = adaptive_sample(score, None, num_tokens=25)
    padded = torch.cat([score, torch.zeros(1, 10)], dim=1)
    patch_real = torch.cat([torch.ones(1, 30, dtype=torch.bool), torch.zeros(1, 10, dtype=torch.bool)], dim=1)
    index, real = adaptive_sample(padded, patch_real, num_tokens=25, length=41)
    kept = int(alone_real.sum())
    assert kept < 25 and int(real.sum()) == kept
    assert torch.equal(index[:, :kept], alone_index[:, :kept]) and not real[:, kept:].any()


@pytest.mark.parametrize('dims,tokens', [((512, 16, 1024, 24), 1025), ((518, 14, 1280, 32), 1370)])
def test_schedule_upper_bounds(dims, tokens):
    img_size, patch, width, depth = dims
    model = meta_vit(img_size, patch, width, depth)
    single = token_schedule(model, {'method': 'ats', 'locations': [depth - 6], 'num_tokens': 2000})
    assert [(b['attention'], b['mlp']) for b in single['blocks']] == [(tokens, tokens)] * depth  # budget >= N
    assert single['data_dependent'] and single['tokens_out'] == tokens
    staged = token_schedule(model, {'method': 'ats', 'locations': [8, 4], 'num_tokens': 500})
    assert [(b['attention'], b['mlp']) for b in staged['blocks']] == (
        [(tokens, tokens)] * 4 + [(tokens, 500)] + [(500, 500)] * (depth - 5))
    assert staged['tokens_out'] == 500


@pytest.fixture(scope='module')
def small_vit():
    return seeded_vit(patch_size=4, depth=6)


@pytest.mark.parametrize('spec,word', [
    ({'num_tokens': 30}, 'locations'),
    ({'locations': [2]}, 'num_tokens'),
    ({'locations': [], 'num_tokens': 30}, 'locations'),
    ({'locations': 2, 'num_tokens': 30}, 'locations'),
    ({'locations': [2, 2], 'num_tokens': 30}, 'locations'),
    ({'locations': [6], 'num_tokens': 30}, 'locations'),  # 6 blocks: 0 to 5
    ({'locations': [-1], 'num_tokens': 30}, 'locations'),
    ({'locations': [1.0], 'num_tokens': 30}, 'locations'),
    ({'locations': [2], 'num_tokens': 1}, 'num_tokens'),
    ({'locations': [2], 'num_tokens': 0.5}, 'num_tokens'),
    ({'locations': [2], 'num_tokens': True}, 'num_tokens'),
    ({'locations': [2], 'num_tokens': 30, 'drop_tokens': 'yes'}, 'drop_tokens'),
    ({'locations': [2], 'num_tokens': 30, 'tokens': 3}, 'tokens'),
])
def test_bad_specs_are_one_line_errors(small_vit, spec, word):
    apply_token_reduction(small_vit, {'method': 'ats', 'locations': [3], 'num_tokens': 30})
    before = small_vit.token_reduction
    with pytest.raises(ValueError) as error:
        apply_token_reduction(small_vit, {'method': 'ats', **spec})
    message = str(error.value)
    assert word in message and '\n' not in message
    assert small_vit.token_reduction is before


def test_swag_table_setting_at_a_budget_above_n_and_upstream_crash_value():
    """num_tokens >= N is capped to N (the SWAG tables); 197, which crashes upstream at 512 px, is a budget below N
    here and runs."""
    model = create_model('deit_tiny', img_size=64, num_classes=10).eval()  # 17 tokens
    images = torch.randn(2, 3, 64, 64)
    for num_tokens in (197, 17, 5):
        apply_token_reduction(model, {'method': 'ats', 'locations': [4], 'num_tokens': num_tokens})
        logits, state = run_recording(model, images)
        assert torch.isfinite(logits).all()
        assert int(state.kept_tokens[-1][:, 1].max()) <= min(num_tokens, 17)
