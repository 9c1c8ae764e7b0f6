"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023), as Expedit-SWAG's vendored copy runs it.

After each block's attention residual, r tokens are merged away: the keys of that attention, averaged over heads and
L2-normalised, are the similarity metric; tokens at even positions (class token included, never merged) are matched
to their most similar odd-position token, and the r best-matched even tokens are averaged into their matches,
weighted by how many original tokens each one already stands for (its size). Proportional attention adds log(size)
of every key to the attention logits, as an additive mask, so the fused kernel stays in use.
"""
from typing import List, Tuple

import torch

from .core import REQUIRED, Param, TokenReduction, TokenState, _fail, bool_param, is_int, register_method


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match ``metric`` (B, N, C) tokens, class token (index 0) protected; r is capped at (N - 1) // 2.

    Returns (kept_even, merged_even, their_odd_match): (B, N_even - r), (B, r), (B, r) indices into the even and odd
    halves. Kept even tokens stay in their original order, so the class token stays first. The matching is discrete
    and runs without autograd, as ToMe's ``torch.no_grad()`` block: in training the gradient flows through the
    size-weighted averages of :func:`merge_tokens`, not through the choice."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        even, odd = metric[:, ::2], metric[:, 1::2]
        scores = even @ odd.transpose(-1, -2)
        scores[:, 0, :] = -torch.inf
        best_score, best_odd = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)
        merged_even, kept_even = order[:, :r], order[:, r:].sort(dim=-1).values
        return kept_even, merged_even, best_odd.gather(1, merged_even)


def merge_tokens(x: torch.Tensor, kept_even: torch.Tensor, merged_even: torch.Tensor,
                 odd_match: torch.Tensor) -> torch.Tensor:
    """Sum each merged even token into its odd match: (B, N, C) -> (B, N - r, C) = [kept even tokens, odd tokens]."""
    channels = x.shape[-1]
    even, odd = x[:, ::2], x[:, 1::2]
    kept = even.gather(1, kept_even.unsqueeze(-1).expand(-1, -1, channels))
    moved = even.gather(1, merged_even.unsqueeze(-1).expand(-1, -1, channels))
    odd = odd.scatter_add(1, odd_match.unsqueeze(-1).expand(-1, -1, channels), moved)
    return torch.cat([kept, odd], dim=1)


def merged_positions(kept_even: torch.Tensor, merged_even: torch.Tensor, odd_match: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:
    """Where each of the ``num_tokens`` tokens lands in :func:`merge_tokens`' output: (B, num_tokens) indices (a
    merged even token lands on its odd match). Composed over the blocks, this is ToMe's source tracking."""
    kept = kept_even.shape[1]
    slots = torch.arange(num_tokens, device=kept_even.device).expand(kept_even.shape[0], -1)
    positions = torch.empty_like(slots)
    positions[:, ::2] = torch.empty_like(positions[:, ::2]).scatter(1, kept_even, slots[:, :kept]) \
        .scatter(1, merged_even, kept + odd_match)
    positions[:, 1::2] = kept + slots[:, :num_tokens // 2]
    return positions


def merge_weighted_average(x: torch.Tensor, size: torch.Tensor, r: int, metric: torch.Tensor):
    """Merge r tokens of ``x`` (B, N, C) with sizes ``size`` (B, N, 1): size-weighted average of each merged group,
    sizes summed. Returns the merged (x, size). The size rides along as one more channel, so one gather/scatter
    moves both (half the small kernels of merging them apart; the step is launch-bound on GPUs at DeiT-S size)."""
    kept_even, merged_even, odd_match = bipartite_soft_matching(metric, r)
    merged = merge_tokens(torch.cat([x * size, size], dim=-1), kept_even, merged_even, odd_match)
    size = merged[..., -1:].detach()   # counts of original tokens: no gradient, as when merged on their own
    return merged[..., :-1] / size, size


def _r_param() -> Param:
    def check(method, name, value):
        if is_int(value) and value >= 0:
            return
        if isinstance(value, (list, tuple)) and value and all(is_int(v) and v >= 0 for v in value):
            return
        _fail(method, name, 'an integer >= 0 or a list of them (one per block)', value)
    return Param(REQUIRED, check)


class ToMeState(TokenState):
    def __init__(self, method, grid_size, depth):
        super().__init__(method, grid_size, depth)
        self.size = None     # (B, N, 1): original tokens each token stands for; None until the first merge
        self.metric = None   # (B, N, head_dim): this block's head-averaged keys


@register_method
class ToMe(TokenReduction):
    name = 'tome'
    params = {'r': _r_param(), 'prop_attn': bool_param(True)}
    main_param = 'r'

    def per_block_r(self, depth: int) -> List[int]:
        return list(self.r) if isinstance(self.r, tuple) else [self.r] * depth

    def check(self, depth, grid_size):
        if isinstance(self.r, tuple) and len(self.r) != depth:
            raise ValueError(f"token_reduction tome: 'r' has {len(self.r)} values; give one per block ({depth}) "
                             f"or a single integer")
        patches = grid_size[0] * grid_size[1]
        if sum(self.per_block_r(depth)) >= patches:
            raise ValueError(f"token_reduction tome: 'r' {self.values['r']!r} would remove every patch token "
                             f"({patches} patches, {depth} blocks); use at most {(patches - 1) // depth} per block")

    def schedule(self, num_tokens, grid_size, depth):
        pairs = []
        for r in self.per_block_r(depth):
            r = min(r, (num_tokens - 1) // 2)
            pairs.append((num_tokens, num_tokens - r))
            num_tokens -= r
        return pairs

    def new_state(self, x, grid_size, depth):
        return ToMeState(self, grid_size, depth)

    def attention(self, attn, x, state):
        q, k, v = attn.project_qkv(x)
        bias = None
        if self.prop_attn and state.size is not None:
            bias = state.size.log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, N): log size of every key
        state.metric = k.mean(dim=1)
        return attn.project_out(attn.attend(q, k, v, bias))

    def after_attention(self, block, x, state):
        r = min(self.per_block_r(state.depth)[state.index], (x.shape[1] - 1) // 2)
        if r <= 0:
            return x
        size = state.size if state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        if state.recording:  # the same matching as merge_weighted_average's: where each token goes
            state.record_moved(merged_positions(*bipartite_soft_matching(state.metric, r), x.shape[1]))
        x, state.size = merge_weighted_average(x, size, r, state.metric)
        return x
