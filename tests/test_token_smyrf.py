"""SMYRF (Daras et al., "SMYRF: Efficient Attention using Asymmetric Clustering", NeurIPS 2020): XBOX+ asymmetric LSH,
attention inside sorted chunks, rounds by log-sum-exp.

The reference loops over images, heads, rounds and chunks with the same seeded projections and must give the model's
logits, also when N (17) is not a multiple of the cluster sizes; the counted matmuls are upstream's
(2 · n_hashes · N · k_cluster_size · width per block) whatever N is."""
import math

import pytest
import torch

from framework import counting
from models import apply_token_reduction, create_model, token_schedule
from models.token_reduction.act import e2lsh_projections
from models.token_reduction.smyrf import chunk_pairs, smyrf_attention
from vit_reference import meta_vit, seeded_vit

SEED = 5


def embed(model, images):
    tokens = model.patch_embed(images)
    tokens = torch.cat([model.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    return tokens + model.pos_embed


def reference_head(q, k, v, alpha, beta, q_cluster_size, k_cluster_size):
    """One image and head, q, k, v (N, d): XBOX+, per round sort by E2LSH projection, query chunk i attends to key
    chunk i (the last key chunk = the last k_cluster_size sorted keys), rounds weighted by softmax of log-sum-exp."""
    num_tokens, dim = q.shape
    q_norm, k_norm = q.norm(dim=1), k.norm(dim=1)
    squared_max = q_norm.max() ** 2 + k_norm.max() ** 2
    zeros = torch.zeros(num_tokens, 1)
    q_aug = torch.cat([q, zeros, (squared_max - q_norm ** 2).sqrt().unsqueeze(1)], dim=1)
    k_aug = torch.cat([k, (squared_max - k_norm ** 2).sqrt().unsqueeze(1), zeros], dim=1)
    torch.testing.assert_close(q_aug @ k_aug.T, q @ k.T)   # XBOX+ keeps the inner products
    chunks = math.ceil(num_tokens / q_cluster_size)
    outputs, log_norms = [], []
    for r in range(alpha.shape[1]):
        q_order = (q_aug @ alpha + beta)[:, r].argsort()
        k_order = (k_aug @ alpha + beta)[:, r].argsort()
        out, log_norm = torch.zeros(num_tokens, dim), torch.zeros(num_tokens)
        for c in range(chunks):
            queries = q_order[c * q_cluster_size:(c + 1) * q_cluster_size]
            keys = k_order[c * k_cluster_size:(c + 1) * k_cluster_size] if c < chunks - 1 \
                else k_order[-min(k_cluster_size, num_tokens):]
            logits = q[queries] @ k[keys].T / math.sqrt(dim)
            out[queries] = logits.softmax(dim=1) @ v[keys]
            log_norm[queries] = logits.logsumexp(dim=1)
        outputs.append(out)
        log_norms.append(log_norm)
    weights = torch.stack(log_norms).softmax(dim=0)
    return (torch.stack(outputs) * weights.unsqueeze(-1)).sum(dim=0)


def reference_logits(model, images, location, n_hashes, q_cluster_size, k_cluster_size, seed=SEED):
    generator = torch.Generator().manual_seed(seed)
    tokens = embed(model, images)
    for index, block in enumerate(model.blocks):
        if index < location:
            tokens = block(tokens)
            continue
        attn = block.attn
        batch, num_tokens, width = tokens.shape
        qkv = attn.qkv(block.norm1(tokens)).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
        alpha, beta = e2lsh_projections(attn.head_dim + 2, n_hashes, generator)
        out = torch.zeros(batch, num_tokens, attn.num_heads, attn.head_dim)
        for image in range(batch):
            for head in range(attn.num_heads):
                q, k, v = (qkv[image, :, i, head] for i in range(3))
                out[image, :, head] = reference_head(q, k, v, alpha, beta, q_cluster_size, k_cluster_size)
        tokens = tokens + attn.proj(out.reshape(batch, num_tokens, width))
        tokens = tokens + block.mlp(block.norm2(tokens))
    return model.head(model.norm(tokens)[:, 0])


@pytest.mark.parametrize('location, n_hashes, q_size, k_size', [
    (1, 3, 5, 5),      # 17 = 3 chunks of 5 + 2: the last 2 queries attend to the top 5 keys
    (0, 2, 6, 8),      # 3 query chunks (6, 6, 5) and 3 key chunks (8, 8 and the last 8, overlapping)
    (2, 4, 17, 17),    # exact: one chunk
])
def test_smyrf_equals_step_by_step_reference(location, n_hashes, q_size, k_size):
    model = seeded_vit(depth=3, qkv_gain=4.0)
    images = torch.randn(2, 3, 32, 32)
    apply_token_reduction(model, {'method': 'smyrf', 'location': location, 'n_hashes': n_hashes,
                                  'q_cluster_size': q_size, 'k_cluster_size': k_size, 'seed': SEED})
    with torch.no_grad():
        logits = model(images)
        expected = reference_logits(model, images, location, n_hashes, q_size, k_size)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


def test_one_chunk_is_dense_attention_and_small_chunks_are_not():
    model = seeded_vit(depth=3, qkv_gain=4.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
        apply_token_reduction(model, {'method': 'smyrf', 'location': 0, 'n_hashes': 3, 'q_cluster_size': 32,
                                      'k_cluster_size': 32})
        dense = model(images)
        apply_token_reduction(model, {'method': 'smyrf', 'location': 0, 'n_hashes': 3, 'q_cluster_size': 4,
                                      'k_cluster_size': 4})
        chunked = model(images)
    torch.testing.assert_close(dense, plain, atol=1e-5, rtol=1e-5)
    assert (chunked - plain).abs().max() > 1e-3


def test_chunks_never_straddle_rows_and_row_groups_change_nothing():
    """Each image x head row is attended on its own: a row's output does not move when the others change, and
    processing the rows one at a time (bounded memory) gives the same result as all at once."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 37, 8) * 2 for _ in range(3))
    alpha, beta = e2lsh_projections(10, 4, torch.Generator().manual_seed(0))
    together = smyrf_attention(q, k, v, alpha, beta, 8, 8)
    one_by_one = smyrf_attention(q, k, v, alpha, beta, 8, 8, max_elements=1)
    torch.testing.assert_close(one_by_one, together, atol=1e-6, rtol=1e-6)
    alone = smyrf_attention(q[2:3], k[2:3], v[2:3], alpha, beta, 8, 8)
    torch.testing.assert_close(alone[0], together[2], atol=1e-6, rtol=1e-6)


def test_chunk_pairs_cover_every_query_once():
    for num_tokens, q_size, k_size in ((1025, 64, 64), (1370, 32, 32), (1370, 16, 16), (17, 6, 8), (16, 4, 4),
                                       (5, 64, 64)):
        pairs = chunk_pairs(num_tokens, q_size, k_size)
        queries = [i for q_slice, _, _ in pairs for i in range(num_tokens)[q_slice]]
        assert queries == list(range(num_tokens))
        for q_slice, k_slice, chunks in pairs:
            keys = len(range(num_tokens)[k_slice])
            assert keys == chunks * min(k_size, num_tokens) and k_slice.stop <= num_tokens


def test_counted_matmuls_are_upstreams():
    """fvcore MACs: each SMYRF block trades dense attention's 2·N²·width for 2·n_hashes·N·k_cluster_size·width
    (the chunk products, as upstream's flattened chunks count them) plus the two E2LSH projections
    heads·N·(head_dim + 2)·n_hashes each; N = 17 is not a multiple of the cluster size."""
    model = seeded_vit(depth=4, qkv_gain=4.0)
    plain, _ = counting.count_macs(model, 32)
    location, rounds, size, tokens, width, heads = 1, 3, 5, 17, 32, 2
    apply_token_reduction(model, {'method': 'smyrf', 'location': location, 'n_hashes': rounds,
                                  'q_cluster_size': size, 'k_cluster_size': size})
    reduced, _ = counting.count_macs(model, 32)
    per_block = (-2 * tokens ** 2 * width + 2 * rounds * tokens * size * width
                 + 2 * heads * tokens * (width // heads + 2) * rounds)
    assert reduced == plain + (4 - location) * per_block


def test_seed_reproducible_batch_independent_and_random_without_seed():
    model = seeded_vit(depth=3, qkv_gain=4.0)
    images = torch.randn(3, 3, 32, 32)
    spec = {'method': 'smyrf', 'location': 0, 'n_hashes': 3, 'q_cluster_size': 4, 'k_cluster_size': 4}
    apply_token_reduction(model, {**spec, 'seed': 11})
    with torch.no_grad():
        first, second = model(images), model(images)
        singles = torch.cat([model(images[i:i + 1]) for i in range(3)])
    assert torch.equal(first, second)
    torch.testing.assert_close(singles, first, atol=1e-5, rtol=1e-5)
    apply_token_reduction(model, spec)
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))


def test_schedule_and_checks_at_the_real_sizes_without_allocating():
    for img_size, patch, width, depth, tokens, location in ((512, 16, 1024, 24, 1025, 12),
                                                           (518, 14, 1280, 32, 1370, 16)):
        model = meta_vit(img_size, patch, width, depth)
        for size in (64, 32, 16):
            schedule = token_schedule(model, {'method': 'smyrf', 'location': location, 'q_cluster_size': size,
                                              'k_cluster_size': size})
            assert schedule['data_dependent'] is False
            assert schedule['tokens_in'] == schedule['tokens_out'] == tokens
            assert [(b['attention'], b['mlp']) for b in schedule['blocks']] == [(tokens, tokens)] * depth
        with pytest.raises(ValueError, match='location'):
            token_schedule(model, {'method': 'smyrf', 'location': depth})


@pytest.mark.parametrize('spec, words', [
    ({}, ['location', 'required']), ({'location': 12}, ['location']), ({'location': -1}, ['location']),
    ({'location': 1.0}, ['location']), ({'location': 0, 'n_hashes': 0}, ['n_hashes']),
    ({'location': 0, 'q_cluster_size': 0}, ['q_cluster_size']),
    ({'location': 0, 'k_cluster_size': 'big'}, ['k_cluster_size']),
    # 17 tokens: 4 query chunks of 5 but 3 key chunks of 6
    ({'location': 0, 'q_cluster_size': 5, 'k_cluster_size': 6}, ['q_cluster_size', 'k_cluster_size']),
    ({'location': 0, 'seed': -1}, ['seed']), ({'location': 0, 'rounds': 4}, ['rounds']),
])
def test_bad_specs_are_one_line_errors_naming_the_parameter(spec, words):
    model = seeded_vit(embed_dim=16, depth=12)
    with pytest.raises(ValueError) as error:
        apply_token_reduction(model, {'method': 'smyrf', **spec})
    message = str(error.value)
    assert all(word in message for word in words) and '\n' not in message
    assert model.token_reduction is None


def test_smyrf_spec_defaults_on_deit_tiny():
    model = apply_token_reduction(create_model('deit_tiny', img_size=64), {'method': 'smyrf', 'location': 6})
    assert model.token_reduction.spec() == {'method': 'smyrf', 'location': 6, 'n_hashes': 32,
                                            'q_cluster_size': 64, 'k_cluster_size': 64, 'seed': None,
                                            'variant': 'original'}
