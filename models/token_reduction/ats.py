"""ATS: adaptive token sampling (Fayyaz et al., ECCV 2022), as Expedit-SWAG's ``models/ops/ats.py`` runs it, with its
batch and residual bugs fixed.

In each block of ``locations`` the attention branch keeps the class token and a data-dependent subset of the patch
tokens:
  1. significance of patch token j = (class attention to j summed over heads) x ||v_j|| (v over all heads),
     normalised to sum 1 and sorted ascending (ties by position);
  2. its CDF, min-max normalised to [0, 1];
  3. D = min(T, num_tokens) - 1 evenly spaced heights from the smallest non-zero CDF value up to 1 (T = the image's
     real tokens, class included); each picks the token whose CDF value is nearest (inverse transform sampling);
  4. duplicate picks are dropped: the class token plus the unique picks (ascending significance) are kept.
Only the kept tokens' queries are attended (the fused kernel, every key), then out-projection, residual and MLP run on
the kept tokens. With ``drop_tokens`` the batch is compacted to its largest kept count; without, to the upper bound
min(num_tokens, N) (no saving, as upstream). Padded slots are zero and masked out of every later block's attention
(an additive key-padding bias), so an image's result does not depend on the other images of its batch.

Upstream differences (bugs fixed): the SWAG port adds the attention output to the layer-normed tokens in the ATS block
(``raw_x`` is the ``ln_1`` output) instead of the residual stream; later blocks attend to the padded slots; a budget
below N crashes (the sampler draws N0 - 1 heights but gathers ``num_tokens`` - 1 rows); values below 8 are silently
raised to 8 (here ``num_tokens`` is taken as given, at least 2); the attention softmax adds eps / N to every weight.

``variant: "expedit-swag"`` runs Expedit-SWAG's ``models/ops/ats.py`` as it is, bugs included (what its published
ATS rows measured): the residual of the ATS block is the layer-normed tokens; the attention map is the whole N x N
one, softmax(with the policy mask) + eps / N over (sum + eps), eps = 1e-6; q, k and v are multiplied by the policy;
the heights are N0 - 1 (N0 = the model's input tokens) and the picks the dense nearest-CDF argmin; padded slots
(duplicates, and batch compaction) are zeroed in the ATS block only and attended to by every later block; a budget
is raised to 8, and one below the tokens N reaching the block is refused (upstream crashes there).
"""
from typing import Optional, Tuple

import torch

import torch.nn.functional as F

from .core import (TokenReduction, TokenState, _fail, bool_param, check_block_index, choice_param, class_attention,
                   gather_tokens, int_param, is_int, Param, REQUIRED, register_method)

NO_NONZERO_CDF = 1e8  # upstream's stand-in when the normalised CDF has no non-zero value (a single patch token)
UPSTREAM_EPS = 1e-6   # Expedit-SWAG's softmax_with_policy eps
UPSTREAM_MIN_BUDGET = 8  # Expedit-SWAG raises smaller budgets to 8


def padding_bias(padding: torch.Tensor) -> torch.Tensor:
    """Key-padding mask (B, N), True = padded slot -> additive attention bias (B, 1, 1, N): 0 or -inf."""
    bias = torch.zeros(padding.shape, dtype=torch.float32, device=padding.device)
    return bias.masked_fill(padding, float('-inf'))[:, None, None, :]


def significance_scores(cls_attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Patch-token significance (B, P), float32, summing to 1 per image.

    ``cls_attn`` (B, heads, N): the class token's attention row (padded keys at 0); ``v`` (B, heads, N, head_dim).
    Score of token j = sum over heads of cls_attn[j] x ||v_j||, v_j concatenated over heads; the class token is
    dropped before normalising."""
    value_norm = torch.linalg.norm(v.transpose(1, 2).flatten(2).float(), ord=2, dim=-1)
    score = (cls_attn.float().sum(dim=1) * value_norm)[:, 1:]
    return score / score.sum(dim=1, keepdim=True)


def normalized_cdf(sorted_scores: torch.Tensor, num_real: torch.Tensor) -> torch.Tensor:
    """Min-max normalised cumulative sum of ascending scores (B, P) whose first ``num_real`` (B,) entries are real
    (the rest are padding with score 0): the real part spans [0, 1]. A single real token gives all zeros."""
    cdf = sorted_scores.cumsum(dim=1)
    low = cdf[:, :1]
    span = cdf.gather(1, (num_real - 1).unsqueeze(1)) - low
    return (cdf - low) / torch.where(span > 0, span, torch.ones_like(span))


def sample_heights(cdf: torch.Tensor, real_position: torch.Tensor, draws: torch.Tensor,
                   max_draws: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``draws`` (B,) evenly spaced heights per image, from its smallest non-zero CDF value up to 1 (upstream's
    ``create_ys``), in a (B, max_draws) tensor; returns (heights, valid), valid marking each image's first draws."""
    start = cdf.masked_fill((cdf == 0) | ~real_position, NO_NONZERO_CDF).min(dim=1, keepdim=True).values
    steps = torch.arange(max_draws, device=cdf.device)
    intervals = (draws - 1).clamp(min=1).unsqueeze(1).to(cdf.dtype)
    return start + steps.to(cdf.dtype) * (1 - start) / intervals, steps < draws.unsqueeze(1)


def nearest_positions(cdf: torch.Tensor, heights: torch.Tensor) -> torch.Tensor:
    """For each height (B, M), the first position of the non-decreasing ``cdf`` (B, P) with the smallest |cdf - height|:
    what argmin over the dense (B, M, P) distance gives, found by binary search."""
    length = cdf.shape[1]
    above = torch.searchsorted(cdf, heights, side='left')  # first position with cdf >= height
    below = above - 1
    value_below = cdf.gather(1, below.clamp(min=0))
    gap_below = torch.where(below >= 0, heights - value_below, torch.full_like(heights, float('inf')))
    gap_above = torch.where(above < length, cdf.gather(1, above.clamp(max=length - 1)) - heights,
                            torch.full_like(heights, float('inf')))
    first_below = torch.searchsorted(cdf, value_below, side='left')  # first of equal CDF values (zero scores)
    return torch.where(gap_below <= gap_above, first_below, above)


def adaptive_sample(score: torch.Tensor, patch_real: Optional[torch.Tensor], num_tokens: int,
                    length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse-transform sampling of the patch tokens by significance ``score`` (B, P).

    ``patch_real`` (B, P) marks real patch slots (None: all real). Each image draws min(T, num_tokens) - 1 heights,
    T = its real patch tokens + 1, and keeps its unique picks. Returns (index, real), both (B, K): sequence indices
    of the kept tokens (class token first, then the picks by ascending significance) and which slots are real; K is
    ``length`` if given, else 1 + the largest kept count of the batch."""
    batch, patches = score.shape
    if patch_real is None:
        patch_real = torch.ones_like(score, dtype=torch.bool)
    num_real = patch_real.sum(dim=1)
    order = torch.sort(score.masked_fill(~patch_real, float('inf')), dim=1, stable=True).indices
    sorted_scores = score.masked_fill(~patch_real, 0).gather(1, order)
    real_position = torch.arange(patches, device=score.device) < num_real.unsqueeze(1)
    cdf = normalized_cdf(sorted_scores, num_real)
    draws = (num_real + 1).clamp(max=num_tokens) - 1
    heights, valid = sample_heights(cdf, real_position, draws, min(patches, num_tokens - 1))
    picks = nearest_positions(cdf.masked_fill(~real_position, float('inf')), heights)
    picks = torch.where(valid, picks, patches)  # unused draws land on a spare column
    chosen = torch.zeros(batch, patches + 1, dtype=torch.bool, device=score.device)
    chosen = chosen.scatter(1, picks, torch.ones_like(picks, dtype=torch.bool))[:, :patches]  # traceable form
    count = chosen.sum(dim=1)
    kept = (length - 1) if length is not None else int(count.max())
    positions = torch.sort(chosen.to(torch.int32), dim=1, descending=True, stable=True).indices[:, :kept]
    index = torch.cat([order.new_zeros(batch, 1), order.gather(1, positions) + 1], dim=1)
    slot = torch.arange(kept + 1, device=score.device).unsqueeze(0)
    return index, (slot == 0) | (slot <= count.unsqueeze(1))


# ----------------------------------------------------------------- Expedit-SWAG's ATS block, as it runs (variant)

def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = UPSTREAM_EPS) -> torch.Tensor:
    """Expedit-SWAG's masked softmax: logits (B, heads, N, N), policy (B, N, 1) with 1 = real token -> weights
    (exp(l - max) x mask + eps / N) / (sum + eps), the mask keeping real keys and each query's own key."""
    batch, _, num_tokens, _ = logits.shape
    mask = policy.reshape(batch, 1, 1, num_tokens)
    eye = torch.eye(num_tokens, dtype=mask.dtype, device=mask.device).view(1, 1, num_tokens, num_tokens)
    mask = mask + (1.0 - mask) * eye
    peak = torch.max(logits, dim=-1, keepdim=True)[0]
    weights = (logits - peak).to(torch.float32).exp_() * mask.to(torch.float32)
    weights = (weights + eps / num_tokens) / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights.type_as(peak)


def upstream_heights(cdf: torch.Tensor, reference_tokens: int) -> torch.Tensor:
    """``create_ys``: reference_tokens - 1 heights from the smallest non-zero CDF value to 1, (B, reference_tokens - 1),
    computed with upstream's float ops."""
    batch, draws = cdf.shape[0], reference_tokens - 1
    heights = torch.linspace(0, 1.0, steps=draws, device=cdf.device).unsqueeze(0).repeat(batch, 1)
    start = torch.min(cdf + (cdf == 0).float() * NO_NONZERO_CDF, dim=1)[0].unsqueeze(-1).expand_as(heights)
    steps = torch.arange(0, draws, dtype=heights.dtype, device=cdf.device).unsqueeze(0).expand_as(start)
    return start + (((heights * (draws - 1)) - start * steps) / (draws - 1))


def upstream_unique(picks: torch.Tensor, pad_value: int) -> torch.Tensor:
    """``get_unique_indices``: sorted picks with every repeat but the last of a run set to ``pad_value``, sorted
    again (so the unique picks come first, ascending); the last pick is compared with 1, as upstream pads it."""
    ordered = torch.sort(picks, dim=1)[0]
    following = F.pad(ordered[:, 1:], (0, 1), value=1)
    unique = torch.where((following - ordered) == 0, pad_value * torch.ones_like(picks), ordered)
    return torch.sort(unique, dim=1)[0]


def upstream_sample(weights: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor, reference_tokens: int):
    """Expedit-SWAG's score assignment and inverse transform sampling on the whole attention map.

    weights (B, heads, N, N), v (B, heads, N, head_dim), tokens (B, N, C): the ATS block's normed tokens. Returns
    (rows, kept_tokens, policy): the attention rows (B, heads, N, N) and tokens (B, N, C) of the class token, then the
    unique picks by ascending significance, then zero rows; policy (B, N, 1), 1 for the real rows."""
    batch, heads, num_tokens, _ = weights.shape
    channels = tokens.shape[-1]
    value_norm = torch.linalg.norm(v.transpose(1, 2).reshape(batch, num_tokens, -1), ord=2, dim=2)
    score = (weights[:, :, 0].sum(dim=1) * value_norm)[:, 1:]
    score = score / score.sum(dim=1, keepdim=True)
    sorted_scores, order = torch.sort(score, descending=False, dim=1)
    cdf = torch.cumsum(sorted_scores, dim=1)
    low = cdf.min(dim=1)[0].unsqueeze(dim=1)
    cdf = (cdf - low) / ((cdf.max(dim=1)[0].unsqueeze(dim=1) - low) / 1.0)
    heights = upstream_heights(cdf, reference_tokens).unsqueeze(dim=2)
    offset = heights.shape[1] - (num_tokens - 1)  # a later ATS block: the CDF is left-padded to the first's length
    picks = torch.min(torch.abs(heights - F.pad(cdf.unsqueeze(dim=1), (offset, 0))), dim=2)[1] - offset
    unique = upstream_unique(picks, num_tokens - 1)[:, :num_tokens - 1]
    rows = weights[:, :, 1:].gather(2, order[:, None, :, None].expand(-1, heads, -1, num_tokens))
    rows = F.pad(rows, (0, 0, 0, 1), value=0.0).gather(2, unique[:, None, :, None].expand(-1, heads, -1, num_tokens))
    kept = F.pad(gather_tokens(tokens[:, 1:], order), (0, 0, 0, 1), value=0.0)
    kept = kept.gather(1, unique.unsqueeze(2).expand(-1, -1, channels))
    policy = F.pad((unique != num_tokens - 1).unsqueeze(-1).to(tokens.dtype), (0, 0, 1, 0), value=1.0)
    return torch.cat([weights[:, :, :1], rows], dim=2), torch.cat([tokens[:, :1], kept], dim=1), policy


def upstream_compact(out: torch.Tensor, kept: torch.Tensor, policy: torch.Tensor):
    """Upstream's ``drop_tokens`` compaction: every image's real rows (out (B, N, C), kept (B, N, C), policy
    (B, N, 1)) scattered into the batch's largest real count M, zero-padded: (B, M, C), (B, M, C), (B, M, 1)."""
    batch, num_tokens, channels = out.shape
    sampler = torch.nonzero(policy)
    size = int(policy.sum(1).max())
    target = (sampler[:, 0] * size + sampler[:, 1]).unsqueeze(-1).expand(-1, channels)
    source = (sampler[:, 0] * num_tokens + sampler[:, 1]).unsqueeze(-1).expand(-1, channels)
    out = out.new_zeros(batch * size, channels).scatter_add(0, target, out.reshape(-1, channels).gather(0, source))
    kept = kept.new_zeros(batch * size, channels).scatter_add(0, target, kept.reshape(-1, channels).gather(0, source))
    policy = policy.new_zeros(batch * size).scatter_add(0, target[:, 0], policy.new_ones(target.shape[0]))
    return out.view(batch, size, channels), kept.view(batch, size, channels), policy.view(batch, size, 1)


def _locations_param() -> Param:
    def check(method, name, value):
        if not isinstance(value, (list, tuple)) or not value or not all(is_int(v) for v in value):
            _fail(method, name, 'a non-empty list of block indices', value)
        if len(set(value)) != len(value):
            _fail(method, name, 'a list of distinct block indices', value)
    return Param(REQUIRED, check)


class ATSState(TokenState):
    def __init__(self, method, grid_size, depth, batch, num_tokens, device):
        super().__init__(method, grid_size, depth)
        self.padding = None      # (B, N) True where a slot is padding (after a compaction), None when none is
        self.bias = None         # (B, 1, 1, N) additive key-padding bias of ``padding``
        self.sampled = None      # (index, real) of the current ATS block, between attention and the residual
        self.tokens_in = torch.full((batch,), num_tokens, dtype=torch.long, device=device)
        self.kept_tokens = []    # per block, (B, 2): real tokens (class included) seen by its attention and its MLP
        self.reference_tokens = num_tokens  # the model's input tokens N0 (variant expedit-swag draws N0 - 1 heights)
        self.policy = None       # variant expedit-swag: upstream's (B, N, 1) policy of the last ATS block, or None

    def counts(self):
        """Tokens (class included) each block's attention saw, mean over the batch's images."""
        return {'what': 'tokens', 'per_block': [float(k[:, 0].float().mean()) for k in self.kept_tokens]}

    def real_tokens(self, length: int, batch: int, device) -> torch.Tensor:
        if self.padding is None:
            return torch.full((batch,), length, dtype=torch.long, device=device)
        return (~self.padding).sum(dim=1)


@register_method
class ATS(TokenReduction):
    name = 'ats'
    params = {'locations': _locations_param(), 'num_tokens': int_param(2), 'drop_tokens': bool_param(True),
              'variant': choice_param(('original', 'expedit-swag'), 'original')}
    main_param = 'num_tokens'
    data_dependent = True

    @property
    def upstream(self) -> bool:
        return self.variant == 'expedit-swag'

    def check(self, depth, grid_size):
        for index in self.locations:
            check_block_index(self.name, 'locations', index, depth)
        num_tokens = 1 + grid_size[0] * grid_size[1]
        if self.upstream and max(self.num_tokens, UPSTREAM_MIN_BUDGET) < num_tokens:
            raise ValueError(f"token_reduction ats: 'num_tokens' {self.num_tokens} is below the {num_tokens} tokens of "
                             f"the model; variant 'expedit-swag' takes a budget >= N only (Expedit-SWAG's sampler "
                             f"crashes below it), e.g. {num_tokens}, or use variant 'original'")

    def schedule(self, num_tokens, grid_size, depth):
        pairs = []
        for index in range(depth):
            kept = min(self.num_tokens, num_tokens) if index in self.locations else num_tokens
            pairs.append((num_tokens, kept))
            num_tokens = kept
        return pairs

    def new_state(self, x, grid_size, depth):
        return ATSState(self, grid_size, depth, x.shape[0], x.shape[1], x.device)

    def before_block(self, block, x, state):
        state.tokens_in = state.real_tokens(x.shape[1], x.shape[0], x.device)
        return x

    def attention_residual(self, block, x, state):
        if not (self.upstream and state.index in self.locations):
            return super().attention_residual(block, x, state)
        return self.upstream_ats_block(block, x, state)

    def upstream_ats_block(self, block, x, state):
        """Expedit-SWAG's ATS attention and residual: (B, N, C) -> (B, M, C), the normed kept tokens plus their
        attention output, zeroed at padded slots; M = N without ``drop_tokens``."""
        attn = block.attn
        tokens = block.norm1(x)
        batch, num_tokens, _ = tokens.shape
        policy = state.policy if state.policy is not None else tokens.new_ones(batch, num_tokens, 1)
        q, k, v = attn.project_qkv(tokens)
        mask = policy.unsqueeze(1)
        q, k, v = q * mask, k * mask, v * mask
        logits = (q / attn.head_dim ** 0.5) @ k.transpose(-2, -1)
        weights = softmax_with_policy(logits, policy)
        rows, kept, policy = upstream_sample(weights, v, tokens, state.reference_tokens)
        out = attn.attn_drop(rows) if attn.training else rows
        out = (out @ v).transpose(1, 2).reshape(batch, num_tokens, -1)
        if self.drop_tokens:
            out, kept, policy = upstream_compact(out, kept, policy)
        out = attn.proj_drop(attn.proj(out)) * policy
        state.policy = policy
        state.padding = None if bool((policy != 0).all()) else policy.squeeze(-1) == 0
        return (kept + block.drop_path(out)) * policy

    def attention(self, attn, x, state):
        q, k, v = attn.project_qkv(x)
        if state.index not in self.locations:
            return attn.project_out(attn.attend(q, k, v, state.bias))
        score = significance_scores(class_attention(q, k, attn.scale, state.bias), v)
        patch_real = None if state.padding is None else ~state.padding[:, 1:]
        length = None if self.drop_tokens else min(self.num_tokens, x.shape[1])
        index, real = adaptive_sample(score, patch_real, self.num_tokens, length)
        state.sampled = (index, real)
        kept_q = q.gather(2, index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
        out = attn.project_out(attn.attend(kept_q, k, v, state.bias))
        out = out * real.unsqueeze(-1).to(out.dtype)  # padded slots (pointing at real tokens) add nothing
        update = out.new_zeros(x.shape[0], x.shape[1], out.shape[-1])
        return update.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out)

    def after_attention(self, block, x, state):
        if state.sampled is None:
            return x
        index, real = state.sampled
        state.sampled = None
        if state.recording:
            state.record_kept(index, x.shape[1], real)
        x = gather_tokens(x, index) * real.unsqueeze(-1).to(x.dtype)
        state.padding = None if bool(real.all()) else ~real
        state.bias = None if state.padding is None else padding_bias(state.padding)
        return x

    def after_block(self, block, x, state):
        if self.upstream:
            if state.index in self.locations:
                x = x * state.policy  # upstream zeroes the padded slots in its ATS blocks only
        elif state.padding is not None:
            x = x * (~state.padding).unsqueeze(-1).to(x.dtype)  # padded slots stay zero
        tokens_out = state.real_tokens(x.shape[1], x.shape[0], x.device)
        state.kept_tokens.append(torch.stack([state.tokens_in, tokens_out], dim=1))
        return x
