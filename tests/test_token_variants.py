"""The ``variant`` parameter of ATS and SMYRF: ``original`` (bugs fixed) and ``expedit-swag`` (Expedit-SWAG's code as it
runs), each against a reference written here from the step list of the upstream code (docs/token_reduction.md):
one image at a time, explicit attention maps, Python loops for the sampling and the chunks."""
import json
import math

import pytest
import torch

import flops
from framework import counting
from models import apply_token_reduction, token_schedule
from models.token_reduction.act import e2lsh_projections
from models.token_reduction.smyrf import upstream_smyrf_attention
from models.vit import VisionTransformer
from vit_reference import merge_heads, split_heads


def peaky_vit(seed=1, depth=6):
    """8x8 patches (65 tokens), 2 heads, large qkv weights: attention is concentrated, so the sampler draws the
    same token several times and drops a data-dependent number of tokens."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if 'qkv' in name else 0.15)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------ ATS

def reference_ats(model, image, locations, num_tokens, upstream, drop_tokens=True):
    """One image (1, 3, H, W) -> (logits, tokens after each block).

    ``upstream`` follows Expedit-SWAG's ATS block: softmax with eps (weights (e + eps/N) / (sum + eps)), N0 - 1
    heights from linspace, the residual is the normed tokens, and without ``drop_tokens`` the duplicates' slots stay
    as zero rows that the later blocks attend to; else the fixed ATS (plain softmax, block input as the residual,
    min(N, num_tokens) - 1 heights, only the kept tokens go on)."""
    x = model.patch_embed(image)
    x = torch.cat([model.cls_token, x], dim=1) + model.pos_embed
    first_tokens = x.shape[1]
    real = torch.ones(first_tokens)  # upstream's policy: 0 for the zero rows left by an earlier ATS block
    counts = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        normed = block.norm1(x)
        q, k, v = split_heads(attn, normed)
        N = x.shape[1]
        if upstream and index in locations:  # the policy masks q, k, v and the keys (each query keeps its own)
            q, k, v = (t * real[:, None] for t in (q, k, v))
        logits = (q / math.sqrt(attn.head_dim)) @ k.transpose(-2, -1)
        if upstream and index in locations:
            e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
            e = e * torch.maximum(real[None, :].expand(N, N), torch.eye(N))
            weights = (e + 1e-6 / N) / (e.sum(dim=-1, keepdim=True) + 1e-6)
        else:
            weights = logits.softmax(dim=-1)
        if index not in locations:
            x = x + merge_heads(attn, weights @ v)
            x = x + block.mlp(block.norm2(x))
            counts.append(N)
            continue
        value_norm = v[0].transpose(0, 1).reshape(N, -1).norm(dim=-1)
        score = (weights[0, :, 0, :].sum(dim=0) * value_norm)[1:]
        score = score / score.sum()
        order = sorted(range(N - 1), key=lambda j: (score[j].item(), j))
        cdf = score[order].cumsum(dim=0)
        cdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
        start = cdf[cdf > 0].min()
        draws = first_tokens - 1 if upstream else min(N, num_tokens) - 1
        if upstream:  # create_ys: linspace(0, 1) rescaled, in upstream's float ops
            steps = torch.arange(draws, dtype=torch.float32)
            heights = start + ((torch.linspace(0, 1, draws) * (draws - 1) - start * steps) / (draws - 1))
        else:
            heights = start + torch.arange(draws) * (1 - start) / max(draws - 1, 1)
        picks = (heights[:, None] - cdf[None, :]).abs().argmin(dim=1)
        kept = [0] + [order[p] + 1 for p in sorted(set(picks.tolist()))]
        out = merge_heads(attn, weights[:, :, kept, :] @ v)
        x = (normed if upstream else x)[:, kept] + out
        x = x + block.mlp(block.norm2(x))
        counts.append(len(kept))
        real = torch.ones(len(kept))
        if upstream and not drop_tokens:  # zero rows for the duplicates, attended to from the next block on
            x = torch.cat([x, x.new_zeros(1, N - len(kept), x.shape[2])], dim=1)
            real = torch.cat([torch.ones(len(kept)), torch.zeros(N - len(kept))])
    return model.head(model.norm(x)[:, 0]), counts


def run(model, images):
    with torch.no_grad():
        return model(images)


ATS_SETTINGS = [([2], 1000), ([1, 4], 65), ([0, 3], 100)]


@pytest.mark.parametrize('variant', ['original', 'expedit-swag'])
@pytest.mark.parametrize('locations,num_tokens', ATS_SETTINGS)
def test_ats_variants_match_their_reference_at_batch_1(variant, locations, num_tokens):
    model = peaky_vit()
    images = torch.randn(4, 3, 32, 32)
    upstream = variant == 'expedit-swag'
    for drop_tokens in (True, False):
        apply_token_reduction(model, {'method': 'ats', 'locations': locations, 'num_tokens': num_tokens,
                                      'variant': variant, 'drop_tokens': drop_tokens})
        finals = []
        for i in range(4):
            with torch.no_grad():
                expected, counts = reference_ats(model, images[i:i + 1], locations, num_tokens, upstream,
                                                 drop_tokens)
            got = run(model, images[i:i + 1])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            finals.append(counts[-1])
            if drop_tokens:
                assert model.forward_features(images[i:i + 1]).shape[1] == counts[-1]
        if drop_tokens:
            assert min(finals) < 65  # tokens were dropped


def test_ats_expedit_swag_differs_from_original_and_pads_unmasked_in_a_batch():
    """The upstream residual changes the result; in a batch, upstream's later blocks attend to the padded slots, so
    an image's result depends on its batch (the original variant's does not)."""
    model = peaky_vit()
    images = torch.randn(4, 3, 32, 32)
    spec = {'method': 'ats', 'locations': [1], 'num_tokens': 1000}
    apply_token_reduction(model, {**spec, 'variant': 'original'})
    original = run(model, images)
    original_single = torch.cat([run(model, images[i:i + 1]) for i in range(4)])
    apply_token_reduction(model, {**spec, 'variant': 'expedit-swag'})
    upstream = run(model, images)
    upstream_single = torch.cat([run(model, images[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(original, original_single, rtol=1e-4, atol=1e-4)
    assert (upstream_single - original_single).abs().max() > 1e-2
    assert (upstream - upstream_single).abs().max() > 1e-4


def test_ats_expedit_swag_budget_rules():
    """Upstream raises a budget below 8 to 8 and crashes on a budget below N: a tiny model (5 tokens) takes any
    budget, a larger one refuses a budget below its tokens in one line; the original variant takes both."""
    tiny = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
    apply_token_reduction(tiny, {'method': 'ats', 'locations': [0], 'num_tokens': 2, 'variant': 'expedit-swag'})
    assert torch.isfinite(run(tiny, torch.randn(1, 3, 8, 8))).all()
    model = peaky_vit()
    with pytest.raises(ValueError) as error:
        apply_token_reduction(model, {'method': 'ats', 'locations': [1], 'num_tokens': 30, 'variant': 'expedit-swag'})
    assert 'num_tokens' in str(error.value) and 'expedit-swag' in str(error.value) and '\n' not in str(error.value)
    apply_token_reduction(model, {'method': 'ats', 'locations': [1], 'num_tokens': 30})
    with pytest.raises(ValueError, match='variant'):
        apply_token_reduction(model, {'method': 'ats', 'locations': [1], 'num_tokens': 30, 'variant': 'seed'})


def test_ats_expedit_swag_counts_the_whole_attention_map():
    """Under the expedit convention the ATS block's attention matmuls are upstream's: q·kᵀ over all N x N and the
    gathered N attention rows times v (2·N²·width), and the later blocks run on the kept tokens."""
    model = peaky_vit(depth=4)
    image = counting.example_input(32)
    apply_token_reduction(model, {'method': 'ats', 'locations': [1], 'num_tokens': 1000, 'variant': 'expedit-swag'})
    kept = model.forward_features(image).shape[1]
    assert kept < 65
    details = counting.detail(model, 32, 'expedit')
    attn = [b['attn_macs'] for b in details['blocks']]

    def fused(n):  # a plain block's attention under the expedit convention: q scaling, q·kᵀ, attn·v, softmax
        return n * 32 + 2 * n * n * 32 + 5 * 2 * n * n
    assert attn == [fused(65), 2 * 65 * 65 * 32, fused(kept), fused(kept)]
    # up to a few one-element ops on traced sizes (eps / N, offsets), which upstream's trace has as well
    assert abs(details['blocks'][1]['macs'] - upstream_ats_block_count(65, kept, 65, 32, 2)) <= 16
    schedule = token_schedule(model)
    assert schedule['data_dependent'] and schedule['tokens_out'] == 65


def upstream_ats_block_count(N, M, N0, D, h):
    """What Expedit-SWAG's counter counts for its ATS block (batch 1, drop_tokens): N tokens in, M kept, N0 model
    tokens, width D, h heads; one MAC = 1, a linear's bias one more input, element-wise ops one per element."""
    attention = (4 * N * D                  # ln_1
                 + N * 3 * D * (D + 1)      # in-projection
                 + 3 * N * D + N * D        # q, k, v times the policy; q / sqrt(head_dim)
                 + 2 * N * N * D)           # q·kᵀ over the whole map, and the N gathered rows times v
    softmax = 2 * N * N + 5 * h * N * N + h * N   # policy mask with the eye; sub, exp_, mul, + eps/N, div; sum + eps
    sampling = (N * D + N + 4 * (N - 1) + 2    # ||v||, score x ||v||, / sum, cumsum, min-max (sub, sub, /1.0, div)
                + 2 * (N - 1)                   # the 1e8 stand-in for zero CDF values (mul, add)
                + 5 * (N0 - 1)                  # the heights from linspace (mul, mul, sub, div, add)
                + (N0 - 1) ** 2 + (N0 - 1)      # |heights - CDF|, picks - offset
                + 2 * (N0 - 1)                  # de-duplication (sub, pad value x ones)
                + 4 * M)                        # compaction indices (mul, add, twice)
    out = M * D * (D + 1) + 4 * M * D           # out-projection; dropout, x policy, residual add, x policy
    mlp = (4 * M * D + M * 4 * D * (D + 1) + 2 * M * 4 * D   # ln_2, linear_1, GELU, dropout
           + M * D * (4 * D + 1) + 3 * M * D)                 # linear_2, dropout, residual add, x policy
    return attention + softmax + sampling + out + mlp


def test_flops_cli_takes_the_ats_variant(capsys, tmp_path):
    config = tmp_path / 'tiny.json'
    config.write_text(json.dumps({'model': 'deit_tiny', 'input_size': 64}))
    spec = {'method': 'ats', 'locations': [10], 'num_tokens': 1000, 'variant': 'expedit-swag'}
    rows = {}
    for variant in ('original', 'expedit-swag'):
        code = flops.main(['--config', str(config), '--token-reduction', json.dumps({**spec, 'variant': variant}),
                           '--convention', 'expedit', '--json'])
        out = capsys.readouterr().out
        assert code == 0
        rows[variant] = json.loads(out)
        assert rows[variant]['token_reduction']['variant'] == variant
    # the whole 17 x 17 map in block 10 and upstream's element-wise ops (the original: the fused kernel)
    assert rows['expedit-swag']['macs'] != rows['original']['macs']


# ---------------------------------------------------------------------------------------------------------- SMYRF

def reference_upstream_smyrf(q, k, v, alpha, beta, size):
    """Expedit-SWAG's SMYRF on rows q, k, v (rows, N, d), step by step: XBOX+, E2LSH sort keys, the sorted positions
    of all rounds and rows flattened (round, row, token) and cut into chunks of ``size`` (straddling rows), softmax in
    each chunk, un-sort, rounds combined by softmax of the log-sum-exps."""
    rows, N, d = q.shape
    rounds = alpha.shape[1]
    q_norm, k_norm = q.norm(dim=-1, keepdim=True), k.norm(dim=-1, keepdim=True)
    extent = q_norm.max(dim=1, keepdim=True).values ** 2 + k_norm.max(dim=1, keepdim=True).values ** 2
    zeros = torch.zeros(rows, N, 1)
    q_aug = torch.cat([q, zeros, (extent - q_norm ** 2).sqrt()], dim=-1)
    k_aug = torch.cat([k, (extent - k_norm ** 2).sqrt(), zeros], dim=-1)
    q_pos = (q_aug @ alpha + beta).permute(2, 0, 1).argsort(dim=-1)   # (rounds, rows, N)
    k_pos = (k_aug @ alpha + beta).permute(2, 0, 1).argsort(dim=-1)
    q_flat = [(r, row, int(q_pos[r, row, t])) for r in range(rounds) for row in range(rows) for t in range(N)]
    k_flat = [(r, row, int(k_pos[r, row, t])) for r in range(rounds) for row in range(rows) for t in range(N)]
    out = torch.zeros(rounds, rows, N, d)
    lse = torch.zeros(rounds, rows, N)
    for start in range(0, len(q_flat), size):
        queries, keys = q_flat[start:start + size], k_flat[start:start + size]
        qs = torch.stack([q[row, t] for _, row, t in queries])
        ks = torch.stack([k[row, t] for _, row, t in keys])
        vs = torch.stack([v[row, t] for _, row, t in keys])
        logits = qs @ ks.T / math.sqrt(d)
        result = logits.softmax(dim=-1) @ vs
        for i, (r, row, t) in enumerate(queries):
            out[r, row, t] = result[i]
            lse[r, row, t] = logits[i].logsumexp(dim=0)
    weights = lse.softmax(dim=0)
    return (out * weights.unsqueeze(-1)).sum(dim=0)


@pytest.mark.parametrize('rows,N,rounds,size', [(4, 17, 3, 6), (2, 17, 4, 17), (6, 10, 2, 4)])
def test_upstream_smyrf_equals_reference_with_straddling_chunks(rows, N, rounds, size):
    torch.manual_seed(0)
    q, k, v = (torch.randn(rows, N, 8) * 2 for _ in range(3))
    alpha, beta = e2lsh_projections(10, rounds, torch.Generator().manual_seed(3))
    expected = reference_upstream_smyrf(q, k, v, alpha, beta, size)
    got = upstream_smyrf_attention(q, k, v, alpha, beta, size)
    grouped = upstream_smyrf_attention(q, k, v, alpha, beta, size, max_elements=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, got, rtol=0, atol=1e-6)


def test_smyrf_variants_in_a_model():
    """With a chunk size that does not divide N the variants differ (upstream's chunks straddle heads and images:
    an image's result depends on its batch); the model's expedit-swag forward equals the reference per block."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    images = torch.randn(2, 3, 32, 32)   # 17 tokens, 2 heads, 2 images, 2 rounds: 136 = 17 chunks of 8
    spec = {'method': 'smyrf', 'location': 1, 'n_hashes': 2, 'q_cluster_size': 8, 'k_cluster_size': 8, 'seed': 4}
    apply_token_reduction(model, {**spec, 'variant': 'expedit-swag'})
    upstream = run(model, images)
    apply_token_reduction(model, spec)
    original = run(model, images)
    assert (upstream - original).abs().max() > 1e-4
    # the reference: block 0 plain, block 1 with the reference attention and the same seeded projections
    with torch.no_grad():
        x = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(images)], dim=1) + model.pos_embed
        x = model.blocks[0](x)
        block = model.blocks[1]
        q, k, v = split_heads(block.attn, block.norm1(x))
        alpha, beta = e2lsh_projections(18, 2, torch.Generator().manual_seed(4))
        heads = reference_upstream_smyrf(q.reshape(4, 17, 16), k.reshape(4, 17, 16), v.reshape(4, 17, 16),
                                         alpha, beta, 8)
        x = x + merge_heads(block.attn, heads.view(2, 2, 17, 16))
        x = x + block.mlp(block.norm2(x))
        expected = model.head(model.norm(x)[:, 0])
    torch.testing.assert_close(upstream, expected, rtol=1e-5, atol=1e-5)


def test_smyrf_expedit_swag_refusals():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    with pytest.raises(ValueError) as error:
        apply_token_reduction(model, {'method': 'smyrf', 'location': 0, 'q_cluster_size': 4, 'k_cluster_size': 8,
                                      'variant': 'expedit-swag'})
    assert 'k_cluster_size' in str(error.value) and '\n' not in str(error.value)
    apply_token_reduction(model, {'method': 'smyrf', 'location': 0, 'n_hashes': 1, 'q_cluster_size': 5,
                                  'k_cluster_size': 5, 'variant': 'expedit-swag'})
    with pytest.raises(ValueError, match='do not divide'):   # 1 round x 2 heads x 17 tokens = 34
        run(model, torch.randn(1, 3, 32, 32))
