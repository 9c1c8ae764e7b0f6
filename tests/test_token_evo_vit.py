"""Evo-ViT (Xu et al., "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer", AAAI 2022;
models/token_reduction/evo_vit.py) against a reference written from the paper's steps: explicit attention maps, tokens
physically re-sorted every block as upstream does (the method keeps grid order and gathers the same top-k set)."""

import pytest
import torch

from models import apply_token_reduction, create_model, token_schedule
from vit_reference import meta_vit, seeded_vit


def explicit_block(block, x):
    """One plain block with the attention map written out; returns (x, map (B, heads, N, N))."""
    attn = block.attn
    B, N, C = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = ((q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5).softmax(dim=-1)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    x = x + block.mlp(block.norm2(x))
    return x, weights


def reference_evo_vit(model, images, location, keep_ratio, tradeoff):
    """Upstream's eval-mode step list: returns (logits, normed tokens in grid order)."""
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    patches = x.shape[1] - 1
    grid_position = torch.arange(patches).expand(x.shape[0], -1)  # where each current patch slot came from
    score = None
    for index, block in enumerate(model.blocks):
        keep = int(patches * keep_ratio)
        if index >= location and keep < patches:
            order = torch.argsort(score, dim=1, descending=True, stable=True)
            sorted_patches = x[:, 1:].gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], sorted_patches], dim=1)
            score, grid_position = score.gather(1, order), grid_position.gather(1, order)
            updated, weights = explicit_block(block, x[:, :keep + 1])
            score = score.clone()
            score[:, :keep] = (1 - tradeoff) * score[:, :keep] + tradeoff * weights.mean(dim=1)[:, 0, 1:]
            x = torch.cat([updated, x[:, keep + 1:]], dim=1)
        else:
            x, weights = explicit_block(block, x)
            current = weights.mean(dim=1)[:, 0, 1:]
            score = current if score is None else (1 - tradeoff) * score + tradeoff * current
    tokens = model.norm(x)
    logits = model.head(tokens[:, 0])
    in_grid_order = torch.empty_like(tokens[:, 1:])
    in_grid_order.scatter_(1, grid_position.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens[:, 1:])
    return logits, torch.cat([tokens[:, :1], in_grid_order], dim=1)


@pytest.mark.parametrize('location,keep_ratio,tradeoff', [(2, 0.4, 0.5), (1, 0.25, 0.3), (4, 0.7, 0.9)])
def test_matches_reference(location, keep_ratio, tradeoff):
    model = seeded_vit(patch_size=4, depth=6, std=0.15, qkv_std=0.3, seed=0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model.forward_features(images)
        ref_logits, ref_tokens = reference_evo_vit(model, images, location, keep_ratio, tradeoff)
        apply_token_reduction(model, {'method': 'evo_vit', 'location': location, 'keep_ratio': keep_ratio,
                                      'tradeoff': tradeoff})
        tokens = model.forward_features(images)
        logits = model(images)
    assert tokens.shape == (3, 65, 32)  # the sequence keeps every token
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-4, atol=1e-4)
    assert (tokens - plain).abs().max() > 0.1  # pruning changed the result


def test_keep_ratio_one_is_the_plain_model():
    model = seeded_vit(patch_size=4, depth=6, std=0.15, qkv_std=0.3, seed=0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        apply_token_reduction(model, {'method': 'evo_vit', 'location': 1, 'keep_ratio': 1.0})
        torch.testing.assert_close(model(images), plain, rtol=1e-5, atol=1e-5)


def test_placeholders_pass_through_unchanged():
    """In the last block only the class token and the top int(64 * 0.25) = 16 patches change."""
    model = seeded_vit(patch_size=4, depth=6, std=0.15, qkv_std=0.3, seed=0)
    images = torch.randn(2, 3, 32, 32)
    apply_token_reduction(model, {'method': 'evo_vit', 'location': 2, 'keep_ratio': 0.25})
    seen = {}
    last = model.blocks[-1]
    last.register_forward_hook(lambda module, args, kwargs, out: seen.update(x_in=args[0], x_out=out),
                               with_kwargs=True)
    with torch.no_grad():
        model(images)
    changed = (seen['x_out'] - seen['x_in']).abs().amax(dim=-1) > 0
    assert changed[:, 0].all()
    assert changed[:, 1:].sum(dim=1).tolist() == [16, 16]


def _expedit_gflops(schedule, width, heads, grid, patch, classes=1000):
    """Expedit-SWAG's counter in closed form over a token schedule; the
    final norm runs on every token (Evo-ViT keeps the sequence)."""
    tokens = grid * grid + 1
    total = grid * grid * width * 3 * patch * patch + 2 * tokens * width + 4 * tokens * width + classes * (width + 1)
    for n, m in schedule:
        total += 3 * n * width * (width + 1) + n * width * (width + 1) + 2 * n * n * width + 5 * heads * n * n
        total += 7 * n * width + m * 4 * width * (width + 1) + m * width * (4 * width + 1) + 14 * m * width
    return total / 1e9


# (model dims, location, keep_ratio, Expedit-SWAG's published GFLOPs; H/14 (14, 0.5) is 713.43 by upstream's own code)
PUBLISHED = [((512, 16, 1024, 24), 18, 0.4, 307.0), ((512, 16, 1024, 24), 8, 0.6, 259.1),
             ((512, 16, 1024, 24), 8, 0.4, 210.6), ((518, 14, 1280, 32), 16, 0.6, 799.8),
             ((518, 14, 1280, 32), 14, 0.5, 713.43), ((518, 14, 1280, 32), 14, 0.3, 602.0)]


@pytest.mark.parametrize('dims,location,keep_ratio,published', PUBLISHED)
def test_schedule_closed_form_and_published_gflops(dims, location, keep_ratio, published):
    img_size, patch, width, depth = dims
    model = meta_vit(img_size, patch, width, depth)
    grid = img_size // patch
    tokens = grid * grid + 1  # 1025 (L/16) or 1370 (H/14)
    kept = 1 + int((tokens - 1) * keep_ratio)  # int(P * ratio) of the patch tokens, plus the class token
    schedule = token_schedule(model, {'method': 'evo_vit', 'location': location, 'keep_ratio': keep_ratio})
    pairs = [(b['attention'], b['mlp']) for b in schedule['blocks']]
    assert pairs == [(tokens, tokens)] * location + [(kept, kept)] * (depth - location)
    assert schedule['tokens_in'] == schedule['tokens_out'] == tokens
    assert not schedule['data_dependent']
    gflops = _expedit_gflops(pairs, width, 16, grid, patch)
    assert abs(gflops - published) < (0.005 if published == 713.43 else 0.05), gflops


@pytest.fixture(scope='module')
def small_vit():
    return seeded_vit(patch_size=4, depth=6)


@pytest.mark.parametrize('spec,word', [
    ({'keep_ratio': 0.5}, 'location'),
    ({'location': 2}, 'keep_ratio'),
    ({'location': 0, 'keep_ratio': 0.5}, 'location'),
    ({'location': 6, 'keep_ratio': 0.5}, 'location'),  # 6 blocks: 1 to 5
    ({'location': -1, 'keep_ratio': 0.5}, 'location'),
    ({'location': 2.0, 'keep_ratio': 0.5}, 'location'),
    ({'location': 2, 'keep_ratio': 0}, 'keep_ratio'),
    ({'location': 2, 'keep_ratio': 1.5}, 'keep_ratio'),
    ({'location': 2, 'keep_ratio': True}, 'keep_ratio'),
    ({'location': 2, 'keep_ratio': '0.5'}, 'keep_ratio'),
    ({'location': 2, 'keep_ratio': 0.01}, 'keep_ratio'),  # int(64 * 0.01) = 0 patch tokens
    ({'location': 2, 'keep_ratio': 0.5, 'tradeoff': 1.5}, 'tradeoff'),
    ({'location': 2, 'keep_ratio': 0.5, 'tradeoff': None}, 'tradeoff'),
    ({'location': 2, 'keep_ratio': 0.5, 'ratio': 0.5}, 'ratio'),
])
def test_bad_specs_are_one_line_errors(small_vit, spec, word):
    apply_token_reduction(small_vit, {'method': 'evo_vit', 'location': 3, 'keep_ratio': 0.5})
    before = small_vit.token_reduction
    with pytest.raises(ValueError) as error:
        apply_token_reduction(small_vit, {'method': 'evo_vit', **spec})
    message = str(error.value)
    assert word in message and '\n' not in message
    assert small_vit.token_reduction is before  # a rejected spec leaves the model as it was


def test_location_past_deit_tiny_is_refused():
    with pytest.raises(ValueError, match="'location' 12 is outside"):
        apply_token_reduction(create_model('deit_tiny'), {'method': 'evo_vit', 'location': 12, 'keep_ratio': 0.5})
