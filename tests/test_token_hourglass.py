"""Hourglass token clustering / reconstruction (Liang et al., Expedit-SWAG, NeurIPS 2022) against a reference written
here.

The reference works per image in float64 with explicit bins, cells and windows and the direct squared difference
||x - c||^2 (not the expanded form the method uses), so it shares no code with models/token_reduction/hourglass.py.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import apply_token_reduction, token_schedule
from models.layers import set_fused_attn
from models.token_reduction.hourglass import cluster_tokens, reconstruct_tokens, reconstruction_weights
from vit_reference import meta_vit, seeded_vit


# ------------------------------------------------------------------------------------------------- reference

def reference_cells(grid, side):
    """Initial cell (row, col) of each token: nearest-neighbour upsampling, source index floor(dst * h / H)."""
    H, W = grid
    return [((t // W) * side // H, (t % W) * side // W) for t in range(H * W)]


def reference_cluster(patches, grid, side, iters, temperature, window_size):
    """One image's patch tokens (L, C) -> (centres (M, C), last assignment (M, L)), float64, step by step."""
    H, W = grid
    L, C = patches.shape
    fmap = patches.reshape(H, W, C)
    centres = []
    for i in range(side):  # adaptive average pooling: bin rows floor(i*H/h) .. ceil((i+1)*H/h)
        rows = slice((i * H) // side, -((-(i + 1) * H) // side))
        for j in range(side):
            cols = slice((j * W) // side, -((-(j + 1) * W) // side))
            centres.append(fmap[rows, cols].reshape(-1, C).mean(0))
    centres = torch.stack(centres)
    cells = reference_cells(grid, side)
    radius = window_size // 2
    allowed = torch.tensor([[abs(row - m // side) <= radius and abs(col - m % side) <= radius
                             for m in range(side * side)] for row, col in cells])            # (L, M)
    assignment = None
    for _ in range(iters):
        distance = ((patches[:, None, :] - centres[None, :, :]) ** 2).sum(-1)              # (L, M)
        logits = (-distance * temperature).masked_fill(~allowed, -math.inf)
        assignment = logits.softmax(dim=1).T                                                # (M, L), over centres
        centres = assignment @ patches / assignment.sum(1, keepdim=True).clamp(min=1e-16)
    return centres, assignment


def reference_weights(tokens, centres, k, temperature):
    """(L, M) reconstruction weights of one image, float64, in log space: exp(-t d) over the k nearest centres,
    divided by the row's L2 norm, which is exp(0.5 * logsumexp(-2 t d)) (no underflow)."""
    distance = ((tokens[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    weights = torch.zeros_like(distance)
    for i in range(distance.shape[0]):
        nearest = distance[i].argsort()[:k]
        log_w = -temperature * distance[i, nearest]
        weights[i, nearest] = torch.exp(log_w - 0.5 * torch.logsumexp(2 * log_w, dim=0))
    return weights


def reference_forward(model, images, spec):
    """The hourglass model by hand, float64: plain blocks, clustering before ``location``, reconstruction before
    ``reconstruct_location`` (== depth: after the last block). Returns (logits, normed tokens)."""
    model = copy.deepcopy(model).double()
    apply_token_reduction(model, None)
    images = images.double()
    side = math.isqrt(spec['num_clusters'])
    grid = model.patch_embed.grid_size
    defaults = dict(iters=5, temperature=1.0, window_size=5, reconstruct_location=None, reconstruct_k=3,
                    reconstruct_temperature=0.05)
    spec = {**defaults, **spec}
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    weights = []

    def rebuild(x):
        patches = torch.stack([w @ x[b, 1:] for b, w in enumerate(weights)])
        return torch.cat([x[:, :1], patches], dim=1)

    depth = len(model.blocks)
    for index, block in enumerate(model.blocks):
        if index == spec['location']:
            centres = []
            for b in range(x.shape[0]):
                c, _ = reference_cluster(x[b, 1:], grid, side, spec['iters'], spec['temperature'], spec['window_size'])
                centres.append(c)
                weights.append(reference_weights(x[b, 1:], c, spec['reconstruct_k'], spec['reconstruct_temperature']))
            x = torch.cat([x[:, :1], torch.stack(centres)], dim=1)
        if index == spec['reconstruct_location']:
            x = rebuild(x)
        x = block(x)
    if spec['reconstruct_location'] == depth:
        x = rebuild(x)
    x = model.norm(x)
    return model.head(x[:, 0]), x


def images(batch=2, size=80, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- (1) against the reference

SPECS = [  # on the 10x10 grid of tiny_vit, 4 blocks
    # 4x4 centres on a 10x10 grid: overlapping pool bins, nearest cells that differ from them; window 3 is local
    dict(method='hourglass', location=1, num_clusters=16, window_size=3),
    dict(method='hourglass', location=0, num_clusters=25, iters=3, temperature=4.0),
    dict(method='hourglass', location=2, num_clusters=9, iters=1, temperature=0.25, window_size=1),
    dict(method='hourglass', location=1, num_clusters=16, window_size=3, reconstruct_location=3),
    dict(method='hourglass', location=0, num_clusters=25, reconstruct_location=4, reconstruct_k=5,
         reconstruct_temperature=0.5),
    dict(method='hourglass', location=2, num_clusters=49, temperature=2.0, reconstruct_location=3, reconstruct_k=1),
]


@pytest.mark.parametrize('spec', SPECS, ids=lambda s: '-'.join(f'{k}{v}' for k, v in s.items() if k != 'method'))
def test_model_equals_reference(spec):
    model = seeded_vit(img_size=80)
    x = images()
    ref_logits, ref_tokens = reference_forward(model, x, spec)
    apply_token_reduction(model, spec)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
    assert tokens.shape == ref_tokens.shape == (2, token_schedule(model)['tokens_out'], 32)
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens.double(), ref_tokens, atol=1e-4, rtol=1e-4)
    # in float64 the expanded distance of the method and the direct one of the reference agree to rounding
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        torch.testing.assert_close(model64(x.double()), ref_logits, atol=1e-10, rtol=1e-9)


def test_cluster_tokens_soft_assignment_and_temperature_multiplies():
    """Centres of cluster_tokens equal the reference at several temperatures; a temperature that divided instead
    would give other centres (checked, so the test can tell)."""
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(2, 100, 16, generator=g, dtype=torch.float64)
    for temperature in (0.05, 1.0, 20.0):
        ours = cluster_tokens(patches, (10, 10), (4, 4), 4, temperature, 3)
        ref = torch.stack([reference_cluster(p, (10, 10), 4, 4, temperature, 3)[0] for p in patches])
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)
        if temperature != 1.0:
            divided = torch.stack([reference_cluster(p, (10, 10), 4, 4, 1 / temperature, 3)[0] for p in patches])
            assert (ours - divided).abs().max() > 1e-3


def test_cluster_tokens_local_window_and_grid_cells():
    """A token far outside a centre's window never contributes to it: with window 1 (r = 0) and hard assignment,
    each centre is the mean of the tokens whose initial (nearest-neighbour) cell it is."""
    patches = torch.randn(1, 100, 8, generator=torch.Generator().manual_seed(3))
    centres = cluster_tokens(patches, (10, 10), (3, 3), 2, 1.0, 1)
    cells = reference_cells((10, 10), 3)
    for m in range(9):
        members = [t for t, (row, col) in enumerate(cells) if row * 3 + col == m]
        torch.testing.assert_close(centres[0, m], patches[0, members].mean(0))


def test_assignment_is_detached():
    """Gradients reach the tokens only through the last centre update (weighted mean with fixed assignment)."""
    g = torch.Generator().manual_seed(4)
    patches = torch.randn(1, 64, 8, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(16, 8, generator=g, dtype=torch.float64)
    centres = cluster_tokens(patches, (8, 8), (4, 4), 3, 1.0, 3)
    (centres[0] * probe).sum().backward()
    _, assignment = reference_cluster(patches[0].detach(), (8, 8), 4, 3, 1.0, 3)
    expected = assignment.T @ (probe / assignment.sum(1, keepdim=True))
    torch.testing.assert_close(patches.grad[0], expected, atol=1e-10, rtol=1e-9)


def test_reconstruction_weights_match_upstream_where_upstream_works():
    """Small-norm features: upstream's exp(-t d), top-k mask, F.normalize gives the same weights as ours."""
    g = torch.Generator().manual_seed(5)
    tokens = 0.3 * torch.randn(2, 64, 16, generator=g)
    centres = cluster_tokens(tokens, (8, 8), (4, 4), 5, 1.0, 5)
    distance = ((tokens[:, :, None] - centres[:, None]) ** 2).sum(-1)
    upstream = torch.exp(-0.05 * distance)
    kth = upstream.topk(3, dim=2).values.min(dim=-1, keepdim=True).values
    upstream = F.normalize(torch.where(upstream >= kth, upstream, torch.zeros_like(upstream)), dim=2)
    torch.testing.assert_close(reconstruction_weights(tokens, centres, 3, 0.05), upstream, atol=1e-6, rtol=1e-5)


def test_reconstruction_does_not_underflow_on_large_norms():
    """Feature norms ~100 (SWAG scale), t = 0.05: upstream's weights are exactly zero, so is its output; ours are
    the right normalised rows and rebuild the tokens from their nearest centres."""
    g = torch.Generator().manual_seed(6)
    tokens = torch.randn(2, 64, 64, generator=g)
    tokens = 100 * tokens / tokens.norm(dim=-1, keepdim=True)
    centres = cluster_tokens(tokens, (8, 8), (4, 4), 5, 1.0, 5)
    distance = ((tokens[:, :, None] - centres[:, None]) ** 2).sum(-1)
    naive = torch.exp(-0.05 * distance)
    assert torch.equal(naive, torch.zeros_like(naive))
    assert torch.equal(F.normalize(naive, dim=2) @ centres, torch.zeros_like(tokens))

    ours = reconstruction_weights(tokens, centres, 3, 0.05)
    ref = torch.stack([reference_weights(t.double(), c.double(), 3, 0.05) for t, c in zip(tokens, centres)])
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(2, 64))
    rebuilt = reconstruct_tokens(ours, centres)
    torch.testing.assert_close(rebuilt.double(), ref @ centres.double(), atol=1e-3, rtol=1e-4)
    assert rebuilt.norm(dim=-1).min() > 1


# --------------------------------------------------------------------------- counted products (FLOPs policy)

def counted_flops(fn, *args):
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()  # 2 per multiply-accumulate


def test_clustering_executes_upstreams_products():
    """Per iteration one (centres x tokens) distance product and one bmm centre update, L*M*C MACs each, as upstream
    (what the published GFLOPs count); the reconstruction adds one distance product and weights @ centres."""
    L, M, C, iters = 100, 16, 32, 5
    tokens = torch.randn(1, L, C)
    assert counted_flops(cluster_tokens, tokens, (10, 10), (4, 4), iters, 1.0, 5) == 2 * iters * 2 * L * M * C
    centres = torch.randn(1, M, C)
    assert counted_flops(reconstruction_weights, tokens, centres, 3, 0.05) == 2 * L * M * C
    assert counted_flops(reconstruct_tokens, torch.randn(1, L, M), centres) == 2 * L * M * C


@pytest.mark.parametrize('spec', [SPECS[0], SPECS[3], SPECS[4]], ids=['cluster', 'reconstruct', 'reconstruct-end'])
def test_executed_graph_follows_the_schedule(spec):
    """Matmul MACs of the whole reduced model = the closed form over token_schedule's token counts + clustering."""
    model = seeded_vit(img_size=80)
    apply_token_reduction(model, spec)
    set_fused_attn(model, False)  # the counter sees the attention matmuls on the explicit path
    C, L, M = 32, 100, spec['num_clusters']
    macs = 3 * L * C * 8 * 8 + C * 10  # patch conv, head
    for block in token_schedule(model)['blocks']:
        n, n_mlp = block['attention'], block['mlp']
        macs += 4 * n * C * C + 2 * n * n * C + 8 * n_mlp * C * C
    macs += spec.get('iters', 5) * 2 * L * M * C
    if spec.get('reconstruct_location') is not None:
        macs += 2 * L * M * C
    with torch.no_grad():
        assert counted_flops(model, images(1)) == 2 * macs


# ------------------------------------------------------------------------------------------ (2) the schedule

L16, H14 = (512, 16, 1024, 24), (518, 14, 1280, 32)   # SWAG ViT-L/16 and ViT-H/14: img_size, patch, width, depth


@pytest.mark.parametrize('arch, location, clusters, tokens, depth', [
    (L16, 12, 529, 1025, 24),
    (L16, 6, 529, 1025, 24),
    (L16, 8, 256, 1025, 24),
    (H14, 10, 676, 1370, 32),
    (H14, 4, 625, 1370, 32),
    (H14, 8, 324, 1370, 32),
])
def test_schedule_at_the_swag_sizes(arch, location, clusters, tokens, depth):
    """Expedit-SWAG's rows on ViT-L/16 @512 (32x32 grid) and ViT-H/14 @518 (37x37), built on the meta device."""
    model = meta_vit(*arch)
    spec = dict(method='hourglass', location=location, num_clusters=clusters)
    schedule = token_schedule(model, spec)
    expected = [tokens] * location + [1 + clusters] * (depth - location)
    assert [b['attention'] for b in schedule['blocks']] == expected
    assert [b['mlp'] for b in schedule['blocks']] == expected
    assert (schedule['tokens_in'], schedule['tokens_out'], schedule['data_dependent']) == (tokens, 1 + clusters, False)
    rebuilt = token_schedule(model, {**spec, 'reconstruct_location': location + 3})
    assert [b['attention'] for b in rebuilt['blocks']] == \
        [tokens] * location + [1 + clusters] * 3 + [tokens] * (depth - location - 3)
    assert rebuilt['tokens_out'] == tokens
    at_end = token_schedule(model, {**spec, 'reconstruct_location': depth})
    assert [b['attention'] for b in at_end['blocks']] == expected and at_end['tokens_out'] == tokens


def test_blocks_see_the_scheduled_tokens():
    model = seeded_vit(img_size=80)
    spec = SPECS[3]
    apply_token_reduction(model, spec)
    seen = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: seen.append(('attention', args[0].shape[1])))
        block.mlp.register_forward_pre_hook(lambda m, args: seen.append(('mlp', args[0].shape[1])))
    with torch.no_grad():
        out = model.forward_features(images())
    expected = [(kind, b[kind]) for b in token_schedule(model)['blocks'] for kind in ('attention', 'mlp')]
    assert seen == expected == [('attention', 101), ('mlp', 101)] + [('attention', 17), ('mlp', 17)] * 2 + \
        [('attention', 101), ('mlp', 101)]
    assert out.shape[1] == 101


# -------------------------------------------------------------------------------------- (3) bad input

BAD = [  # (spec, what the one-line error must say)
    ({'num_clusters': 16}, "'location'"),                               # required
    ({'location': 1}, "'num_clusters'"),                                # required
    ({'location': 1, 'num_clusters': 50}, "'num_clusters'"),            # not a perfect square
    ({'location': 1, 'num_clusters': 0}, "'num_clusters'"),
    ({'location': 1, 'num_clusters': 16.0}, "'num_clusters'"),
    ({'location': 1, 'num_clusters': True}, "'num_clusters'"),
    ({'location': 1, 'num_clusters': 100}, "'num_clusters'"),           # 10x10: not smaller than the grid
    ({'location': 1, 'num_clusters': 121}, "'num_clusters'"),
    ({'location': 4, 'num_clusters': 16}, "'location'"),                # 4 blocks: 0..3
    ({'location': -1, 'num_clusters': 16}, "'location'"),
    ({'location': '1', 'num_clusters': 16}, "'location'"),
    ({'location': 1, 'num_clusters': 16, 'iters': 0}, "'iters'"),
    ({'location': 1, 'num_clusters': 16, 'temperature': 0}, "'temperature'"),
    ({'location': 1, 'num_clusters': 16, 'temperature': -1.0}, "'temperature'"),
    ({'location': 1, 'num_clusters': 16, 'temperature': 'hot'}, "'temperature'"),
    ({'location': 1, 'num_clusters': 16, 'window_size': 4}, "'window_size'"),
    ({'location': 1, 'num_clusters': 16, 'window_size': 0}, "'window_size'"),
    ({'location': 1, 'num_clusters': 16, 'window_size': 5.0}, "'window_size'"),
    ({'location': 1, 'num_clusters': 16, 'reconstruct_location': 1}, "'reconstruct_location'"),
    ({'location': 2, 'num_clusters': 16, 'reconstruct_location': 1}, "'reconstruct_location'"),
    ({'location': 1, 'num_clusters': 16, 'reconstruct_location': 5}, "'reconstruct_location'"),
    ({'location': 1, 'num_clusters': 16, 'reconstruct_k': 0}, "'reconstruct_k'"),
    ({'location': 1, 'num_clusters': 16, 'reconstruct_k': 17}, "'reconstruct_k'"),
    ({'location': 1, 'num_clusters': 16, 'reconstruct_temperature': 0.0}, "'reconstruct_temperature'"),
    ({'location': 1, 'num_clusters': 16, 'num_cluster': 16}, 'unknown parameter num_cluster;'),  # upstream's flag name
]


@pytest.mark.parametrize('spec, word', BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_specs_are_one_line_errors(spec, word):
    model = seeded_vit(img_size=80)
    with pytest.raises(ValueError) as error:
        apply_token_reduction(model, {'method': 'hourglass', **spec})
    message = str(error.value)
    assert word in message and '\n' not in message, message
    assert model.token_reduction is None  # the model is unchanged


def test_schedule_at_another_input_size_checks_the_grid():
    model = seeded_vit(img_size=80)
    spec = dict(method='hourglass', location=1, num_clusters=49)
    assert token_schedule(model, spec, input_size=128)['tokens_out'] == 50   # 16x16 grid
    with pytest.raises(ValueError, match="'num_clusters' 49"):
        token_schedule(model, spec, input_size=56)                            # 7x7 grid


# ------------------------------------------------------------------------------------------ (4) float16
# (round trip, copy, pickle, bf16 and batch independence: tests/test_token_contract.py)

def test_float16_autocast_runs_and_is_close_to_fp32():
    """Under float16 autocast the reconstructed grid keeps its 101 tokens and the logits stay close to fp32."""
    model = seeded_vit(img_size=80)
    apply_token_reduction(model, SPECS[4])
    x = images(2)
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast('cpu', dtype=torch.float16):
            half = model(x)
            tokens = model.forward_features(x)
    assert tokens.shape[1] == 101 and torch.isfinite(half).all()
    assert (half.float() - fp32).abs().max() < 0.05 * fp32.abs().max()
