"""ACT (Zheng et al., "End-to-End Object Detection with Adaptive Clustering Transformer", BMVC 2021): E2LSH query
clustering, prototype attention, broadcast back.

The reference below follows the step list per image and head with explicit loops (a dict from code to members), with
the same seeded projection draws, and must give the model's logits; the clustering is checked against plain grouping
on wide codes where upstream's 2-bit packing would merge distinct codes."""

import pytest
import torch

from models import apply_token_reduction, create_model, token_schedule
from models.token_reduction.act import (ACT, BUCKET_WIDTH, cluster_identical_codes, dense_rank,
                                        e2lsh_projections)
from vit_reference import meta_vit, seeded_vit

SEED = 7


def capture_states(model):
    """Keep each forward's token state (the FLOPs tool reads the cluster counts from it the same way)."""
    states = []
    make = model.token_reduction.new_state
    model.token_reduction.new_state = lambda *args: states.append(make(*args)) or states[-1]
    return states


def embed(model, images):
    tokens = model.patch_embed(images)
    tokens = torch.cat([model.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    return tokens + model.pos_embed


def identical_code_groups(vectors, w, b):
    """Token indices grouped by their E2LSH code, one token at a time."""
    groups = {}
    for token in range(vectors.shape[0]):
        code = tuple(int(c) for c in torch.floor((vectors[token] @ w + b) / BUCKET_WIDTH).tolist())
        groups.setdefault(code, []).append(token)
    return list(groups.values())


def reference_logits(model, images, q_hashes, start=0, end=None, group_k=False, k_hashes=32, seed=SEED):
    """ACT step by step: per image and head, cluster the scaled queries by identical code, prototype = mean of the
    member queries, softmax(prototype·keys)·V (keys clustered, means and size-weighted softmax with group_k), every
    member takes its prototype's output. Returns logits and the cluster counts per ACT block."""
    generator = torch.Generator().manual_seed(seed)
    end = len(model.blocks) - 1 if end is None else end
    tokens = embed(model, images)
    counts = []
    for index, block in enumerate(model.blocks):
        if not start <= index <= end:
            tokens = block(tokens)
            continue
        attn = block.attn
        batch, num_tokens, width = tokens.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        qkv = attn.qkv(block.norm1(tokens)).reshape(batch, num_tokens, 3, heads, head_dim)
        w, b = e2lsh_projections(head_dim, q_hashes, generator)
        if group_k:
            wk, bk = e2lsh_projections(head_dim, k_hashes, generator)
        out = torch.zeros(batch, num_tokens, heads, head_dim)
        block_counts = []
        for image in range(batch):
            for head in range(heads):
                q, k, v = (qkv[image, :, i, head] for i in range(3))
                if group_k:
                    key_groups = identical_code_groups(k, wk, bk)
                    keys = torch.stack([k[members].mean(0) for members in key_groups])
                    values = torch.stack([v[members].mean(0) for members in key_groups])
                    sizes = torch.tensor([float(len(members)) for members in key_groups])
                else:
                    keys, values, sizes = k, v, torch.ones(num_tokens)
                query_groups = identical_code_groups(q * attn.scale, w, b)
                block_counts.append(len(query_groups))
                for members in query_groups:
                    prototype = q[members].mean(0) * attn.scale
                    weights = torch.softmax(keys @ prototype, dim=0) * sizes   # upstream's WeightedSoftMax
                    out[image, members, head] = (weights / weights.sum()) @ values
        counts.append(block_counts)
        tokens = tokens + attn.proj(out.reshape(batch, num_tokens, width))
        tokens = tokens + block.mlp(block.norm2(tokens))
    return model.head(model.norm(tokens)[:, 0]), counts


@pytest.mark.parametrize('spec', [
    dict(q_hashes=4),
    dict(q_hashes=3, start=1, end=1),
    dict(q_hashes=4, group_k=True, k_hashes=3),
])
def test_act_equals_step_by_step_reference(spec):
    model = seeded_vit(depth=3, qkv_gain=10.0)
    images = torch.randn(2, 3, 32, 32)
    apply_token_reduction(model, {'method': 'act', 'seed': SEED, **spec})
    states = capture_states(model)
    with torch.no_grad():
        logits = model(images)
        expected, counts = reference_logits(model, images, **spec)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    state = states[0]
    act_blocks = [i for i, p in enumerate(state.prototypes) if p is not None]
    assert act_blocks == list(range(spec.get('start', 0), spec.get('end', 2) + 1))
    assert [state.prototypes[i] for i in act_blocks] == [max(c) for c in counts]
    assert [state.mean_clusters[i] for i in act_blocks] == pytest.approx([sum(c) / len(c) for c in counts])
    # the test is only meaningful when clusters are neither all singletons nor one per row
    assert all(1 < sum(c) / len(c) < 17 for c in counts)


def test_clusters_are_identical_codes_where_2bit_packing_merges():
    torch.manual_seed(1)
    # wide codes: ranges far above 2 bits, and one round beyond fp32's exact integers (the rank fallback)
    codes = torch.randint(-3, 4, (3, 60, 40)).float()
    codes[:, :, 5] *= 1000
    codes[:, :, 9] = torch.randint(0, 2, (3, 60)).float() * 2.0 ** 30
    codes[:, 30:] = codes[:, :30]   # every code appears at least twice in a row
    labels, clusters = cluster_identical_codes(codes)
    for row in range(3):
        groups = {}
        for token in range(60):
            groups.setdefault(tuple(codes[row, token].tolist()), set()).add(token)
        ours = {}
        for token in range(60):
            ours.setdefault(int(labels[row, token]), set()).add(token)
        assert sorted(map(sorted, groups.values())) == sorted(map(sorted, ours.values()))
        assert clusters[row] == len(groups) and sorted(ours) == list(range(len(groups)))
    # upstream's packing (round i shifted by 2*i bits after subtracting its minimum) collides on (4, 0) vs (0, 1)
    pair = torch.tensor([[[4., 0.], [0., 1.], [0., 0.]]])
    shifted = (pair - pair.amin(dim=1, keepdim=True)).long()
    upstream = (shifted << (2 * torch.arange(2))).sum(-1)
    assert upstream[0, 0] == upstream[0, 1]
    labels, clusters = cluster_identical_codes(pair)
    assert labels[0, 0] != labels[0, 1] and clusters.tolist() == [3]


def test_dense_rank_numbers_distinct_values_in_order():
    keys = torch.tensor([[5, 1, 5, 9], [2, 2, 2, 2]])
    labels, distinct = dense_rank(keys)
    assert labels.tolist() == [[1, 0, 1, 2], [0, 0, 0, 0]] and distinct.tolist() == [3, 1]


def test_seed_reproducible_batch_independent_and_random_without_seed():
    model = seeded_vit(depth=3, qkv_gain=10.0)
    images = torch.randn(3, 3, 32, 32)
    apply_token_reduction(model, {'method': 'act', 'q_hashes': 4, 'seed': 3})
    with torch.no_grad():
        first, second = model(images), model(images)
        singles = torch.cat([model(images[i:i + 1]) for i in range(3)])
    assert torch.equal(first, second)
    torch.testing.assert_close(singles, first, atol=1e-5, rtol=1e-5)
    apply_token_reduction(model, {'method': 'act', 'q_hashes': 4})
    torch.manual_seed(0)
    with torch.no_grad():
        a = model(images)
        b = model(images)
    torch.manual_seed(0)
    with torch.no_grad():
        again = model(images)
    assert not torch.equal(a, b)   # fresh projections every forward, from the global RNG
    assert torch.equal(a, again)


def test_schedule_at_the_real_sizes_without_allocating():
    for img_size, patch, width, depth, tokens in ((512, 16, 1024, 24, 1025), (518, 14, 1280, 32, 1370)):
        model = meta_vit(img_size, patch, width, depth)
        schedule = token_schedule(model, {'method': 'act', 'q_hashes': 16})
        assert schedule['data_dependent'] is True
        assert schedule['tokens_in'] == schedule['tokens_out'] == tokens
        assert [(b['attention'], b['mlp']) for b in schedule['blocks']] == [(tokens, tokens)] * depth
    assert ACT.data_dependent


@pytest.mark.parametrize('spec, word', [
    ({'q_hashes': 0}, 'q_hashes'), ({'q_hashes': 2.5}, 'q_hashes'), ({'k_hashes': -1}, 'k_hashes'),
    ({'group_k': 'yes'}, 'group_k'), ({'start': 12}, 'start'), ({'start': -1}, 'start'), ({'end': 12}, 'end'),
    ({'start': 5, 'end': 4}, 'end'), ({'seed': -3}, 'seed'), ({'seed': 1.5}, 'seed'), ({'q_hash': 4}, 'q_hash'),
])
def test_bad_specs_are_one_line_errors_naming_the_parameter(spec, word):
    model = seeded_vit(embed_dim=16, depth=12)
    with pytest.raises(ValueError) as error:
        apply_token_reduction(model, {'method': 'act', **spec})
    message = str(error.value)
    assert word in message and '\n' not in message
    assert model.token_reduction is None


def test_act_spec_defaults_on_deit_tiny():
    model = apply_token_reduction(create_model('deit_tiny', img_size=64), {'method': 'act', 'end': 5})
    assert model.token_reduction.spec() == {'method': 'act', 'q_hashes': 32, 'k_hashes': 32, 'group_k': False,
                                            'start': 0, 'end': 5, 'seed': None}


def test_prototype_count_never_exceeds_tokens_and_singletons_give_plain_attention():
    """With one round per token-distinguishing direction the clusters are singletons: ACT is then dense attention."""
    model = seeded_vit(depth=3, qkv_gain=400.0)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
    apply_token_reduction(model, {'method': 'act', 'q_hashes': 64, 'seed': 0})
    states = capture_states(model)
    with torch.no_grad():
        reduced = model(images)
    assert states[0].prototypes == [17, 17, 17] and states[0].mean_clusters == [17.0] * 3
    torch.testing.assert_close(reduced, plain, atol=1e-4, rtol=1e-4)
