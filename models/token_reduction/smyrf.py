"""SMYRF: asymmetric-LSH clustered attention (Daras et al., NeurIPS 2020), as Expedit-SWAG runs it on SWAG ViTs.

Blocks ``location``..last replace dense attention, per image and head, by:
1. XBOX+: queries get two extra coordinates [0, sqrt(MQ² + MK² − |q|²)], keys [sqrt(MQ² + MK² − |k|²), 0] (MQ, MK
   the largest query and key norms), so every transformed vector has the same norm and q·k is unchanged;
2. E2LSH: ``n_hashes`` Gaussian projections of the transformed vectors plus offsets ~ U(0, 1): real sort keys;
3. per round, queries and keys are sorted by their key and cut into consecutive chunks of ``q_cluster_size`` and
   ``k_cluster_size``; query chunk i attends (dense softmax, scaled by 1/sqrt(head_dim)) to key chunk i only;
4. the rounds' outputs are un-sorted and averaged with weights softmax over rounds of each round's log-sum-exp.

Chunks never straddle two images or heads (variant ``original``). Upstream cuts the flattened (round, image·head,
token) sequence, so when N is not a multiple of the chunk size a chunk mixes the end of one row (head or image) with
the start of the next.
Here, when N is not a multiple of the size, each row's last query chunk holds the N mod q_cluster_size top-sorted
queries and its key chunk the last k_cluster_size sorted keys (overlapping the previous key chunk): every query
still attends to a full chunk of its own row's keys, and the matmuls are exactly upstream's (N x k_cluster_size per
round, image and head), so Expedit-SWAG's published GFLOPs are reproduced. Image x head rows are processed in groups of
about ``MAX_CHUNK_ELEMENTS`` intermediate elements, so memory stays bounded at any batch; the ops are the same.
``variant: "expedit-swag"`` cuts the flattened sequence as upstream does (:func:`upstream_smyrf_attention`): the
same output as Expedit-SWAG's code under the same projections; it needs equal cluster sizes dividing
rounds x images x heads x N, as upstream.
"""
import math
from typing import Callable, List, Optional, Tuple

import torch

from .act import e2lsh_projections, make_generator
from .core import (TokenReduction, TokenState, check_block_index, choice_param, int_param, register_method,
                   seed_param)

# elements (rounds x tokens x channels, summed over the intermediates) processed at once; ~0.5 GB in fp32
MAX_CHUNK_ELEMENTS = 2 ** 27
MAX_HASHES = 256
# a chunk of N or more tokens is already dense attention: larger sizes change nothing
MAX_CLUSTER_SIZE = 65536
CLUSTER_SIZE_WHY = 'no effect past N tokens: one chunk of N is dense attention'


# ------------------------------------------------------------------------------------------------- pure functions

def num_chunks(num_tokens: int, cluster_size: int) -> int:
    return -(-num_tokens // cluster_size)


def xbox_plus(q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """XBOX+ asymmetric transform per row: q, k (rows, N, d) -> (rows, N, d + 2) each, same inner products."""
    q_norm, k_norm = q.norm(dim=-1, keepdim=True), k.norm(dim=-1, keepdim=True)
    squared_max = q_norm.amax(dim=1, keepdim=True) ** 2 + k_norm.amax(dim=1, keepdim=True) ** 2
    q_extra = torch.sqrt((squared_max - q_norm ** 2).clamp(min=0))
    k_extra = torch.sqrt((squared_max - k_norm ** 2).clamp(min=0))
    zeros = torch.zeros_like(q_norm)
    return torch.cat([q, zeros, q_extra], dim=-1), torch.cat([k, k_extra, zeros], dim=-1)


def smyrf_sort_orders(q: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor,
                      beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per round, the order of each row's queries and keys by their E2LSH projection (XBOX+ vectors · alpha + beta):
    q, k (rows, N, d), alpha (d + 2, rounds), beta (rounds,) -> (rows, rounds, N) token indices, each."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q_aug, k_aug = xbox_plus(q.float(), k.float())
        q_keys = q_aug @ alpha + beta
        k_keys = k_aug @ alpha + beta
    return (q_keys.transpose(1, 2).contiguous().argsort(dim=-1),
            k_keys.transpose(1, 2).contiguous().argsort(dim=-1))


def flat_index(order: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Token indices per row (rows, ...) -> indices into the rows' flattened tokens (rows · N), flattened."""
    row_start = torch.arange(order.shape[0], device=order.device).view(-1, *[1] * (order.dim() - 1)) * num_tokens
    return (order + row_start).reshape(-1)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    dropout: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention inside each chunk, left unnormalised: q (..., Nq, d), k and v (..., Nk, d) -> exp(logits − peak)·v
    (..., Nq, d), the peak logit (..., Nq) and the log-sum-exp of the scaled logits (..., Nq).

    Dividing by the softmax sum is folded into the round weights (:func:`smyrf_rows`), which saves passes over the
    logits; the logits still see upstream's counted ops (a division by sqrt(d), one subtraction, dropout)."""
    logits = q @ k.transpose(-2, -1)
    scratch = reuse(logits)
    logits = torch.div(logits, math.sqrt(q.shape[-1]), out=scratch)
    peak = logits.amax(dim=-1, keepdim=True)
    weights = torch.exp(torch.sub(logits, peak, out=scratch), out=scratch)
    log_norm = peak + weights.sum(dim=-1, keepdim=True).log()
    if dropout is not None:
        weights = dropout(weights)
    return weights @ v, peak.squeeze(-1), log_norm.squeeze(-1)


def reuse(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x`` as the ``out=`` of the next elementwise op when no gradient needs it (inference), else None. An
    ``out=`` op traces as the same op (aten::div, aten::exp ...), so FLOP counters see no difference; it saves
    allocating and touching a fresh rounds x N x cluster_size tensor at every step."""
    return None if x.requires_grad else x


def chunk_pairs(num_tokens: int, q_cluster_size: int, k_cluster_size: int) -> List[Tuple[slice, slice, int]]:
    """Which sorted positions the query chunks and their key chunks take: [(query slice, key slice, chunks)].

    The full query chunks pair with consecutive key chunks; when N is not a multiple of both sizes, the last query
    chunk (the remaining top-sorted queries) pairs with the last min(k_cluster_size, N) sorted keys."""
    chunks = num_chunks(num_tokens, q_cluster_size)
    exact = num_tokens % q_cluster_size == 0 and num_tokens % k_cluster_size == 0
    full = chunks if exact else chunks - 1
    pairs = [(slice(0, full * q_cluster_size), slice(0, full * k_cluster_size), full)] if full else []
    if not exact:
        keys_seen = min(k_cluster_size, num_tokens)
        pairs.append((slice(full * q_cluster_size, num_tokens), slice(num_tokens - keys_seen, num_tokens), 1))
    return pairs


def smyrf_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_order: torch.Tensor, k_order: torch.Tensor,
               q_cluster_size: int, k_cluster_size: int, dropout: Optional[Callable] = None) -> torch.Tensor:
    """Sorted-chunk attention of every round, rounds combined: q, k, v (rows, N, d), orders (rows, rounds, N)
    -> (rows, N, d).

    Every round's output is weighted by softmax over rounds of its log-sum-exp and added straight into the token
    it belongs to (index_add), so the un-sorted per-round outputs are never stored."""
    rows, num_tokens, dim = q.shape
    rounds = q_order.shape[1]
    q_flat = q.reshape(rows * num_tokens, dim)
    kv_flat = torch.cat([k, v], dim=-1).reshape(rows * num_tokens, 2 * dim)   # keys and values move together
    parts = []
    for q_positions, k_positions, chunks in chunk_pairs(num_tokens, q_cluster_size, k_cluster_size):
        q_index = flat_index(q_order[:, :, q_positions], num_tokens)
        k_index = flat_index(k_order[:, :, k_positions], num_tokens)
        kv_sorted = kv_flat.index_select(0, k_index).view(rows, rounds, chunks, -1, 2 * dim)
        out, peak, log_norm = chunk_attention(
            q_flat.index_select(0, q_index).view(rows, rounds, chunks, -1, dim),
            kv_sorted[..., :dim], kv_sorted[..., dim:], dropout)
        parts.append((q_positions, q_index, out, peak.reshape(rows, rounds, -1), log_norm.reshape(rows, rounds, -1)))
    # each query's log-sum-exp in every round, in token order; then over rounds: the log of the weights' sum
    log_norm_sorted = torch.cat([part[4] for part in parts], dim=2)
    log_norm_tokens = torch.empty_like(log_norm_sorted).scatter_(2, q_order, log_norm_sorted)
    total = torch.logsumexp(log_norm_tokens, dim=1, keepdim=True).expand(-1, rounds, -1)
    result = torch.zeros(rows * num_tokens, dim, device=q.device, dtype=parts[0][2].dtype)
    for q_positions, q_index, out, peak, _ in parts:
        # softmax over rounds of the log-sum-exp, times 1 / (the round's softmax sum): exp(peak − total)
        weights = torch.exp(peak - total.gather(2, q_order[:, :, q_positions]))
        out = out.reshape(rows, rounds, -1, dim)
        weighted = torch.mul(out, weights.unsqueeze(-1), out=reuse(out))
        result.index_add_(0, q_index, weighted.reshape(-1, dim).to(result.dtype))
    return result.view(rows, num_tokens, dim)


def rows_per_group(rounds: int, num_tokens: int, dim: int, k_cluster_size: int,
                   max_elements: int = MAX_CHUNK_ELEMENTS) -> int:
    """How many image x head rows to process at once: per row, sorted q, k, v, the output and its weighted copy,
    and about three (rounds x N x k_cluster_size) logit tensors live together."""
    per_row = rounds * num_tokens * (5 * dim + 3 * min(k_cluster_size, num_tokens))
    return max(1, max_elements // per_row)


def smyrf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                    q_cluster_size: int, k_cluster_size: int, dropout: Optional[Callable] = None,
                    max_elements: int = MAX_CHUNK_ELEMENTS) -> torch.Tensor:
    """SMYRF attention of q, k, v (rows, N, d) with E2LSH projections alpha (d + 2, rounds), beta (rounds,)
    -> (rows, N, d). Rows (images x heads) are processed in groups so at most about ``max_elements`` intermediate
    elements live at once."""
    rows, num_tokens, dim = q.shape
    if num_chunks(num_tokens, q_cluster_size) != num_chunks(num_tokens, k_cluster_size):
        raise ValueError(chunk_count_error(num_tokens, q_cluster_size, k_cluster_size))
    q_order, k_order = smyrf_sort_orders(q, k, alpha, beta)
    group = rows_per_group(alpha.shape[1], num_tokens, dim, k_cluster_size, max_elements)
    outputs = [smyrf_rows(q[part], k[part], v[part], q_order[part], k_order[part], q_cluster_size,
                          k_cluster_size, dropout)
               for part in (slice(start, start + group) for start in range(0, rows, group))]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def upstream_smyrf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                             beta: torch.Tensor, cluster_size: int, dropout: Optional[Callable] = None,
                             max_elements: int = MAX_CHUNK_ELEMENTS) -> torch.Tensor:
    """Expedit-SWAG's SMYRF attention (variant ``expedit-swag``): q, k, v (rows, N, d) -> (rows, N, d).

    The sorted positions of every round and row are flattened in (round, row, token) order and cut into consecutive
    chunks of ``cluster_size``, so a chunk may straddle two rows (heads or images) or two rounds when N is not a
    multiple of it; logits are divided by sqrt(d), normalised with their log-sum-exp, and the rounds combined by
    softmax over rounds of the log-sum-exps, as upstream. Chunks are processed in groups of about ``max_elements``
    logits (the result does not depend on the grouping)."""
    rows, num_tokens, dim = q.shape
    rounds = alpha.shape[1]
    total = rounds * rows * num_tokens
    if total % cluster_size:
        raise ValueError(f"token_reduction smyrf: variant 'expedit-swag' cuts the {rounds} rounds x {rows} image-heads "
                         f"x {num_tokens} tokens into chunks of {cluster_size}, which do not divide {total} "
                         f"(upstream fails there); use a cluster size dividing it, or variant 'original'")
    q_order, k_order = smyrf_sort_orders(q, k, alpha, beta)                       # (rows, rounds, N)
    # indices into the rows' flattened tokens, in (round, row, sorted token) order
    q_index = flat_index(q_order, num_tokens).view(rows, rounds, num_tokens).transpose(0, 1).reshape(-1)
    k_index = flat_index(k_order, num_tokens).view(rows, rounds, num_tokens).transpose(0, 1).reshape(-1)
    q_flat, k_flat, v_flat = (t.reshape(rows * num_tokens, dim) for t in (q, k, v))
    chunks = total // cluster_size
    group = max(1, max_elements // (cluster_size * (cluster_size + 2 * dim)))
    outputs, log_norms = [], []
    for start in range(0, chunks, group):
        part = slice(start * cluster_size, min(chunks, start + group) * cluster_size)
        queries = q_flat.index_select(0, q_index[part]).view(-1, cluster_size, dim)
        keys = k_flat.index_select(0, k_index[part]).view(-1, cluster_size, dim)
        values = v_flat.index_select(0, k_index[part]).view(-1, cluster_size, dim)
        logits = queries @ keys.transpose(2, 1) / math.sqrt(dim)
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        weights = torch.exp(logits - log_norm)
        if dropout is not None:
            weights = dropout(weights)
        outputs.append((weights @ values).reshape(-1, dim))
        log_norms.append(log_norm.reshape(-1))
    sorted_out = torch.cat(outputs).view(rounds, rows * num_tokens, dim)
    sorted_log_norm = torch.cat(log_norms).view(rounds, rows * num_tokens)
    # undo the sort: the position of each (row, token) within its round
    unsort = q_index.view(rounds, rows * num_tokens).argsort(dim=1)
    out = sorted_out.gather(1, unsort.unsqueeze(-1).expand(-1, -1, dim))
    log_norm = sorted_log_norm.gather(1, unsort)
    probs = torch.exp(log_norm - torch.logsumexp(log_norm, dim=0, keepdim=True))
    return torch.sum(out * probs.unsqueeze(-1), dim=0).view(rows, num_tokens, dim)


def chunk_count_error(num_tokens: int, q_cluster_size: int, k_cluster_size: int) -> str:
    return (f"token_reduction smyrf: 'q_cluster_size' {q_cluster_size} and 'k_cluster_size' {k_cluster_size} cut "
            f"{num_tokens} tokens into {num_chunks(num_tokens, q_cluster_size)} query and "
            f"{num_chunks(num_tokens, k_cluster_size)} key chunks; the counts must be equal (equal sizes always are)")


# ---------------------------------------------------------------------------------------------------- the method

class SmyrfState(TokenState):
    def __init__(self, method, grid_size, depth, generator):
        super().__init__(method, grid_size, depth)
        self.generator = generator   # seeded torch.Generator on the tokens' device, or None (global RNG)


@register_method
class Smyrf(TokenReduction):
    name = 'smyrf'
    params = {'location': int_param(0),
              'n_hashes': int_param(1, 32, high=MAX_HASHES, why='memory: every round holds N x k_cluster_size '
                                                              'logits per image and head; upstream uses 32'),
              'q_cluster_size': int_param(1, 64, high=MAX_CLUSTER_SIZE, why=CLUSTER_SIZE_WHY),
              'k_cluster_size': int_param(1, 64, high=MAX_CLUSTER_SIZE, why=CLUSTER_SIZE_WHY),
              'variant': choice_param(('original', 'expedit-swag'), 'original'), 'seed': seed_param()}
    main_param = 'location'

    def check(self, depth, grid_size):
        check_block_index(self.name, 'location', self.location, depth)
        if self.variant == 'expedit-swag' and self.q_cluster_size != self.k_cluster_size:
            raise ValueError(f"token_reduction smyrf: variant 'expedit-swag' needs 'q_cluster_size' "
                             f"{self.q_cluster_size} == 'k_cluster_size' {self.k_cluster_size} (its flattened query "
                             f"and key chunks must pair one to one)")
        num_tokens = 1 + grid_size[0] * grid_size[1]
        if num_chunks(num_tokens, self.q_cluster_size) != num_chunks(num_tokens, self.k_cluster_size):
            raise ValueError(chunk_count_error(num_tokens, self.q_cluster_size, self.k_cluster_size))

    def new_state(self, x, grid_size, depth):
        return SmyrfState(self, grid_size, depth, make_generator(self.seed, x.device))

    def attention(self, attn, x, state):
        if state.index < self.location:
            return attn(x)
        q, k, v = attn.project_qkv(x)
        batch, heads, num_tokens, head_dim = q.shape
        alpha, beta = e2lsh_projections(head_dim + 2, self.n_hashes, state.generator, x.device)
        q, k, v = (t.reshape(-1, num_tokens, head_dim) for t in (q, k, v))
        if self.variant == 'expedit-swag':
            out = upstream_smyrf_attention(q, k, v, alpha, beta, self.q_cluster_size, attn.attn_drop)
        else:
            out = smyrf_attention(q, k, v, alpha, beta, self.q_cluster_size, self.k_cluster_size, attn.attn_drop)
        if state.recording:  # each query's chunk in the first hash round (same projections), patches only
            order = smyrf_sort_orders(q, k, alpha, beta)[0][:, 0]
            position = torch.arange(num_tokens, device=x.device).expand_as(order)
            if self.variant == 'expedit-swag':   # chunks run over the flattened (row, token) order
                position = position + num_tokens * torch.arange(order.shape[0], device=x.device)[:, None]
            chunk = position // self.q_cluster_size
            state.record(clusters=torch.empty_like(order).scatter(1, order, chunk).view(batch, heads, -1)[..., 1:])
        return attn.project_out(out.view(batch, heads, num_tokens, head_dim))
