"""ACT: adaptive clustering attention (Zheng et al. 2020), the query clustering that Expedit-SWAG runs on SWAG ViTs.

In blocks ``start``..``end`` (inclusive), per image and head, the scaled queries are hashed with ``q_hashes`` rounds
of E2LSH (Gaussian projection w, offset b ~ U[0, 1), bucket width 8: code = floor((q·w + b) / 8)); queries whose
codes agree in every round form one cluster, whose prototype is the mean of its queries. The prototypes attend to
all keys (fused attention, prototypes as the queries) and every query takes its prototype's output. With ``group_k``
the keys are clustered the same way (``k_hashes`` rounds, on the keys): key and value prototypes are their cluster
means and each key prototype's logit gets log(cluster size), which is upstream's size-weighted softmax.

Upstream packs the rounds of a code into one integer, round i shifted by 2·i bits after subtracting the round's
minimum. A round whose range exceeds 3 then spills into the next round's bits (and rounds past 31 overflow int64),
so distinct codes can share an integer and their queries get merged. Here the packing is collision-free (mixed radix,
re-ranked before it could overflow), which is exactly "identical codes form a cluster". Upstream needs a compiled CUDA extension
(``ada_cluster``, ``weighted_sum``, ``broadcast``); this is plain PyTorch (scatter_add for the means, a gather for the
broadcast), batched over images and heads, on any device.
"""
from typing import Callable, List, Optional, Tuple

import torch

from .core import (TokenReduction, TokenState, bool_param, check_block_index, int_param, register_method,
                   seed_param)

BUCKET_WIDTH = 8.0
FLOAT_EXACT = 2 ** 24   # integers below this are exact in fp32
INT64_SAFE = 2 ** 62
# hash rounds: each round adds a code per token, image and head
MAX_HASHES = 256
HASHES_WHY = 'memory: every round holds a code per token, image and head; upstream uses 16 to 32'


# ------------------------------------------------------------------------------------------------- pure functions

def make_generator(seed: Optional[int], device) -> Optional[torch.Generator]:
    """A generator on ``device`` seeded with ``seed``, or None (draw from the global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def e2lsh_projections(dim: int, rounds: int, generator: Optional[torch.Generator] = None,
                      device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One E2LSH draw: Gaussian projections w (dim, rounds) ~ N(0, 1), then offsets b (rounds,) ~ U[0, 1), fp32.

    Shared by every image and head of a block, as upstream draws them; the draw order (w, then b) is part of the
    contract: a test seeding the same generator reproduces them."""
    w = torch.randn(dim, rounds, generator=generator, device=device)
    b = torch.rand(rounds, generator=generator, device=device)
    return w, b


def e2lsh_codes(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, width: float = BUCKET_WIDTH) -> torch.Tensor:
    """Bucket codes floor((x·w + b) / width): (..., N, dim) -> (..., N, rounds), integers held in fp32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        projected = x.float() @ w + b
    return torch.floor(projected / width)


def dense_rank(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Number each row's distinct values 0, 1, ... in increasing order: keys (rows, N) -> labels (rows, N) int64,
    distinct values per row (rows,)."""
    ordered, order = keys.sort(dim=1)
    ranks = torch.zeros(keys.shape, dtype=torch.long, device=keys.device)
    ranks[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).cumsum(dim=1)
    return torch.empty_like(ranks).scatter_(1, order, ranks), ranks[:, -1] + 1


def cluster_identical_codes(codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row's tokens by identical code: codes (rows, N, rounds), integer-valued -> labels (rows, N)
    int64 numbered 0 .. clusters-1 within each row, and clusters per row (rows,).

    Each round's values are shifted to start at 0 and the rounds packed in mixed radix (radix = the round's range),
    which is collision-free: runs of rounds are packed in fp32 while exact (< 2**24), then appended to the int64
    label, which is re-ranked within its row (< N) before it could overflow. Same clusters as comparing the code
    rows whole; integer ops stay on (rows, N), the per-round work is fp32."""
    rows, num_tokens, rounds = codes.shape
    shifted = codes - codes.amin(dim=1, keepdim=True)
    radices = [int(r) for r in (shifted.amax(dim=(0, 1)) + 1).tolist()]
    labels, bound = torch.zeros(rows, num_tokens, dtype=torch.long, device=codes.device), 1
    start = 0
    while start < rounds:
        stop, size = start, 1
        while stop < rounds and size * radices[stop] <= FLOAT_EXACT:
            size *= radices[stop]
            stop += 1
        if stop == start:  # one round too wide to pack: its ranks separate the same tokens as its values
            packed, size, stop = dense_rank(shifted[..., start])[0], num_tokens, start + 1
        else:
            place = [1]
            for radix in radices[start:stop - 1]:
                place.append(place[-1] * radix)
            place = torch.tensor(place, dtype=codes.dtype, device=codes.device)
            packed = (shifted[..., start:stop] * place).sum(dim=-1).long()
        if bound * size > INT64_SAFE:
            labels, bound = dense_rank(labels)[0], num_tokens
        labels = labels * size + packed
        bound *= size
        start = stop
    return dense_rank(labels)


def flat_labels(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Per-row labels (rows, N) -> indices into the flattened (rows · num_clusters) clusters, (rows · N,)."""
    row_start = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1) * num_clusters
    return (labels + row_start).reshape(-1)


def cluster_means(x: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means of the tokens of each cluster: x (rows, N, C), labels (rows, N) -> (rows, num_clusters, C) in x's dtype
    (summed in fp32; empty clusters, the padding of rows with fewer clusters, are zero) and sizes (rows, clusters)."""
    rows, num_tokens, channels = x.shape
    index = flat_labels(labels, num_clusters)
    sizes = torch.bincount(index, minlength=rows * num_clusters).float()
    sums = torch.zeros(rows * num_clusters, channels, device=x.device).index_add_(
        0, index, x.reshape(rows * num_tokens, channels).float())
    means = sums / sizes.clamp(min=1).unsqueeze(-1)
    return means.view(rows, num_clusters, channels).to(x.dtype), sizes.view(rows, num_clusters)


def broadcast_clusters(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each token takes its cluster's row: values (rows, clusters, C), labels (rows, N) -> (rows, N, C)."""
    rows, num_clusters, channels = values.shape
    index = flat_labels(labels, num_clusters)
    return values.reshape(rows * num_clusters, channels).index_select(0, index).view(rows, -1, channels)


def cluster(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, hash_scale: float = 1.0):
    """E2LSH-cluster the tokens of every row of x (rows, N, C), hashing x·hash_scale: labels (rows, N), prototypes
    (rows, clusters, C) padded to the largest row's count, sizes (rows, clusters), clusters per row (rows,)."""
    labels, clusters_per_row = cluster_identical_codes(e2lsh_codes(x * hash_scale, w, b))
    num_clusters = int(clusters_per_row.max())
    prototypes, sizes = cluster_means(x, labels, num_clusters)
    return labels, prototypes, sizes, clusters_per_row


def act_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  q_projections: Tuple[torch.Tensor, torch.Tensor],
                  k_projections: Optional[Tuple[torch.Tensor, torch.Tensor]], attend: Callable):
    """ACT attention per image and head. q, k, v: (B, heads, N, head_dim); ``scale`` the attention scale (queries
    are hashed after scaling, as upstream); ``attend(q, k, v, bias)`` computes softmax(q·kᵀ·scale + bias)·v (the
    block's fused attention). Keys are clustered when ``k_projections`` is given.

    Returns the per-head output (B, heads, N, head_dim) and the query clusters per image x head (B·heads,)."""
    batch, heads, num_tokens, head_dim = q.shape
    rows = batch * heads
    q_labels, q_prototypes, _, q_clusters = cluster(q.reshape(rows, num_tokens, head_dim), *q_projections,
                                                    hash_scale=scale)
    bias = None
    if k_projections is not None:
        k_labels, k, k_sizes, _ = cluster(k.reshape(rows, num_tokens, head_dim), *k_projections)
        v, _ = cluster_means(v.reshape(rows, num_tokens, head_dim), k_labels, k.shape[1])
        k, v = k.view(batch, heads, -1, head_dim), v.view(batch, heads, -1, head_dim)
        bias = k_sizes.log().view(batch, heads, 1, -1)  # log size of each key prototype, -inf for padding
    out = attend(q_prototypes.view(batch, heads, -1, head_dim), k, v, bias)
    out = broadcast_clusters(out.reshape(rows, -1, head_dim), q_labels)
    return out.view(batch, heads, num_tokens, head_dim), q_clusters


# ---------------------------------------------------------------------------------------------------- the method

class ACTState(TokenState):
    def __init__(self, method, grid_size, depth, generator):
        super().__init__(method, grid_size, depth)
        self.generator = generator   # seeded torch.Generator on the tokens' device, or None (global RNG)
        # per block: query prototypes the attention ran on (the largest count over images x heads, what the
        # matmuls see) and the mean count over images x heads; None for blocks without ACT
        self.prototypes: List[Optional[int]] = [None] * depth
        self.mean_clusters: List[Optional[float]] = [None] * depth

    def counts(self):
        """Query clusters (prototypes) per block, mean over images x heads; None for blocks without ACT."""
        return {'what': 'clusters', 'per_block': list(self.mean_clusters)}


@register_method
class ACT(TokenReduction):
    name = 'act'
    params = {'q_hashes': int_param(1, 32, high=MAX_HASHES, why=HASHES_WHY),
              'k_hashes': int_param(1, 32, high=MAX_HASHES, why=HASHES_WHY), 'group_k': bool_param(False),
              'start': int_param(0, 0), 'end': int_param(0, None, allow_none=True), 'seed': seed_param()}
    main_param = 'q_hashes'
    data_dependent = True

    def check(self, depth, grid_size):
        check_block_index(self.name, 'start', self.start, depth)
        if self.end is not None:
            check_block_index(self.name, 'end', self.end, depth)
            if self.end < self.start:
                raise ValueError(f"token_reduction act: 'end' {self.end} is before 'start' {self.start}; "
                                 f"use {self.start} to {depth - 1}, or null for the last block")

    def last_block(self, depth: int) -> int:
        return depth - 1 if self.end is None else self.end

    def new_state(self, x, grid_size, depth):
        return ACTState(self, grid_size, depth, make_generator(self.seed, x.device))

    def attention(self, attn, x, state):
        if not self.start <= state.index <= self.last_block(state.depth):
            return attn(x)
        q, k, v = attn.project_qkv(x)
        head_dim = q.shape[-1]
        q_projections = e2lsh_projections(head_dim, self.q_hashes, state.generator, x.device)
        k_projections = (e2lsh_projections(head_dim, self.k_hashes, state.generator, x.device)
                         if self.group_k else None)
        out, clusters = act_attention(q, k, v, attn.scale, q_projections, k_projections, attn.attend)
        if state.recording:  # the query clusters act_attention formed (same projections), patches only
            labels = cluster_identical_codes(e2lsh_codes(q * attn.scale, *q_projections).flatten(0, 1))[0]
            state.record(clusters=labels.view(q.shape[0], q.shape[1], -1)[..., 1:])
        counts = clusters.tolist()
        state.prototypes[state.index] = max(counts)
        state.mean_clusters[state.index] = sum(counts) / len(counts)
        return attn.project_out(out)
