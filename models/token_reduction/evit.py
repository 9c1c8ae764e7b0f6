"""EViT: keep the attentive tokens, optionally fuse the rest (Liang et al., ICLR 2022), as Expedit-SWAG runs it.

At each reduction location, after the attention residual, the patch tokens are scored by attention and only the
ceil(keep_rate * (N - 1)) best ones go on, sorted by score, class token first; the MLP of that block already runs on
the reduced set. ``score='mean'`` is the mean attention a token receives from every query, heads averaged (what
Expedit-SWAG's code computes and what its tables used: it needs the whole map, so those blocks take the explicit
attention path); ``score='cls'`` is the class token's attention row, heads averaged (the EViT paper; one query row
beside the fused kernel). With ``fuse`` the dropped tokens are summed, weighted by their scores, into one extra token
placed last (the EViT code's ``extra_token``; its weights are not renormalised there either).

Training (the EViT code's ``adjust_keep_rate``): with ``shrink_epochs`` > 0 the keep rate of a training forward is 1
for the first ``shrink_start_epoch`` epochs, then follows a half cosine from 1 down to ``keep_rate`` over
``shrink_epochs`` epochs (per step), then stays at ``keep_rate``; EViT trains DeiT with 10 and 100. The training loop
tells the forward where it is (``core.training_progress``); evaluation always runs ``keep_rate``. The top-k choice is
discrete; the kept tokens, and the fused token through its attention-score weights, carry gradients, as upstream.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch

from .core import (TokenReduction, TokenState, bool_param, check_block_index, choice_param, class_attention,
                   float_param, gather_tokens, int_list_param, int_param, mean_received_attention, register_method)


def default_locations(depth: int) -> List[int]:
    """Blocks depth/4, depth/2, 3·depth/4 (rounded down, repeats dropped): EViT's [3, 6, 9] for 12 blocks and
    Expedit-SWAG's [6, 12, 18] (24 blocks) and [8, 16, 24] (32 blocks) are this rule."""
    return sorted({depth * quarter // 4 for quarter in (1, 2, 3)})


def kept_patch_count(num_tokens: int, keep_rate: float) -> int:
    """Patch tokens kept out of ``num_tokens`` (class token included): ceil(keep_rate · (N - 1)), upstream's float
    arithmetic. Equal to N - 1 means the location leaves the tokens as they are."""
    return math.ceil(keep_rate * (num_tokens - 1))


def shrinking_keep_rate(progress: Optional[float], keep_rate: float, shrink_start_epoch: int,
                        shrink_epochs: int) -> float:
    """The keep rate at ``progress`` epochs into training (None: not training -> ``keep_rate``): the EViT code's
    ``adjust_keep_rate`` (1 before ``shrink_start_epoch``, a half cosine from 1 to ``keep_rate`` over
    ``shrink_epochs``, then ``keep_rate``), with its iteration count as fractional epochs."""
    if progress is None or shrink_epochs == 0 or progress >= shrink_start_epoch + shrink_epochs:
        return keep_rate
    if progress < shrink_start_epoch:
        return 1.0
    done = (progress - shrink_start_epoch) / shrink_epochs
    return keep_rate + (1 - keep_rate) * (math.cos(done * math.pi) + 1) * 0.5


def evit_schedule(num_tokens: int, depth: int, keep_rate: float, locations: Sequence[int],
                  fuse: bool) -> List[Tuple[int, int]]:
    """(tokens seen by attention, tokens seen by the MLP) of each block."""
    pairs = []
    for index in range(depth):
        attention_tokens = num_tokens
        if index in locations:
            keep = kept_patch_count(num_tokens, keep_rate)
            if keep < num_tokens - 1:
                num_tokens = 1 + keep + int(fuse)
        pairs.append((attention_tokens, num_tokens))
    return pairs


def select_tokens(x: torch.Tensor, patch_scores: torch.Tensor, keep: int, fuse: bool) -> torch.Tensor:
    """Tokens ``x`` (B, N, C), scores of its patch tokens (B, N - 1) -> (B, 1 + keep [+ 1], C): the class token, the
    ``keep`` best-scored patch tokens in descending score order, and with ``fuse`` the score-weighted sum of the
    others (taken in index order, as upstream's ``complement_idx``)."""
    patches = x[:, 1:]
    top = patch_scores.topk(keep, dim=1, largest=True, sorted=True).indices
    kept = [x[:, :1], gather_tokens(patches, top)]
    if fuse:
        num_patches = patches.shape[1]
        index = torch.arange(num_patches, device=x.device).expand(x.shape[0], -1)
        rest = index.scatter(1, top, torch.full_like(top, num_patches)).sort(dim=1).values[:, :num_patches - keep]
        weights = patch_scores.gather(1, rest).unsqueeze(-1)
        kept.append((gather_tokens(patches, rest) * weights).sum(dim=1, keepdim=True))
    return torch.cat(kept, dim=1)


class EViTState(TokenState):
    def __init__(self, method, grid_size, depth):
        super().__init__(method, grid_size, depth)
        # this forward's keep rate: ``keep_rate``, or the shrink schedule's value in a training forward
        self.keep_rate = shrinking_keep_rate(self.progress, method.keep_rate, method.shrink_start_epoch,
                                             method.shrink_epochs)
        self.patch_scores: Optional[torch.Tensor] = None   # (B, N - 1), set by a reduction block's attention


@register_method
class EViT(TokenReduction):
    name = 'evit'
    params = {
        'keep_rate': float_param(0., 1., low_open=True),
        'locations': int_list_param(0, default=None, allow_none=True),
        'fuse': bool_param(False),
        'score': choice_param(('mean', 'cls'), 'mean'),
        'shrink_start_epoch': int_param(0, 0),
        'shrink_epochs': int_param(0, 0),
    }
    main_param = 'keep_rate'

    def block_locations(self, depth: int) -> List[int]:
        return list(self.locations) if self.locations is not None else default_locations(depth)

    def check(self, depth, grid_size):
        if self.locations is None:
            return
        for index in self.locations:
            check_block_index(self.name, 'locations', index, depth)
        if len(set(self.locations)) != len(self.locations):
            raise ValueError(f"token_reduction evit: 'locations' {list(self.locations)} repeats a block; "
                             f"give each reduction block once")

    def schedule(self, num_tokens, grid_size, depth):
        return evit_schedule(num_tokens, depth, self.keep_rate, self.block_locations(depth), self.fuse)

    def new_state(self, x, grid_size, depth):
        return EViTState(self, grid_size, depth)

    def reduces_here(self, num_tokens: int, state: EViTState) -> bool:
        return (state.index in self.block_locations(state.depth)
                and kept_patch_count(num_tokens, state.keep_rate) < num_tokens - 1)

    def attention(self, attn, x, state):
        if not self.reduces_here(x.shape[1], state):
            return attn(x)
        q, k, v = attn.project_qkv(x)
        if self.score == 'mean':
            out, attn_map = attn.attend(q, k, v, return_attn=True)
            state.patch_scores = mean_received_attention(attn_map)[:, 1:]
        else:
            out = attn.attend(q, k, v)
            state.patch_scores = class_attention(q, k, attn.scale).mean(dim=1)[:, 1:]
        return attn.project_out(out)

    def after_attention(self, block, x, state):
        if state.patch_scores is None:
            return x
        keep = kept_patch_count(x.shape[1], state.keep_rate)
        if state.recording:  # the same top-k as select_tokens: class token, then the kept patches
            top = state.patch_scores.topk(keep, dim=1, largest=True, sorted=True).indices
            state.record_kept(torch.cat([top.new_zeros(top.shape[0], 1), top + 1], dim=1), x.shape[1])
        x = select_tokens(x, state.patch_scores, keep, self.fuse)
        state.patch_scores = None
        return x
