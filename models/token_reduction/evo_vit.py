"""Evo-ViT: slow-fast token evolution (Xu et al., AAAI 2022), as Expedit-SWAG's ``models/evo_vit.py`` runs it.

Every block computes the class token's attention row, averaged over heads, and folds it into a running score of
the patch tokens: block 0 sets it, later blocks take new = (1 - tradeoff) * old + tradeoff * current. Before block
``location`` the update covers every patch token. From ``location`` on, each block runs attention and MLP only on
the class token plus the top int(P * keep_ratio) patch tokens by running score (P = patch tokens, class token
excluded: that is what reproduces the published GFLOPs); the other tokens pass through unchanged and keep their old
score, so a token can come back into the top set later. The sequence length never changes.

Upstream physically re-sorts the patch tokens by score in every block; here they stay in grid order and the same
top-k set is gathered and scattered back, so ``forward_features`` returns the patch tokens in grid order (attention
and MLP do not depend on token order: the logits are the same up to float summation order). Ties in the score are
broken by grid position (a stable sort), where upstream's unstable argsort leaves them to the kernel.
"""
from typing import Optional

import torch

from .core import (TokenReduction, TokenState, class_attention, float_param, gather_tokens,
                   int_param, register_method)


def kept_patch_count(num_patches: int, keep_ratio: float) -> int:
    """Patch tokens updated per block from ``location`` on: int(P * keep_ratio), as upstream (P excludes the class
    token)."""
    return int(num_patches * keep_ratio)


def top_patch_tokens(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the ``keep`` patch tokens with the highest running score (B, P), highest first; ties go to
    the lower grid position."""
    return torch.argsort(score, dim=1, descending=True, stable=True)[:, :keep]


def update_running_score(score: Optional[torch.Tensor], current: torch.Tensor, tradeoff: float,
                         kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The running class attention of the patch tokens after one block.

    ``current`` is this block's head-averaged class row over the patch tokens it saw: (B, P) for a full block, (B, k)
    in the order of ``kept`` (B, k) for a pruned one. Block 0 (``score`` None) starts the score; later blocks take
    (1 - tradeoff) * old + tradeoff * current on the tokens they saw; the others keep their old score."""
    if score is None:
        return current
    if kept is None:
        return (1 - tradeoff) * score + tradeoff * current
    blended = (1 - tradeoff) * score.gather(1, kept) + tradeoff * current
    return score.scatter(1, kept, blended)


def with_class_token(patch_index: torch.Tensor) -> torch.Tensor:
    """Patch indices (B, k) -> sequence indices (B, 1 + k): the class token (0) first, then the patches (+1)."""
    return torch.cat([patch_index.new_zeros(patch_index.shape[0], 1), patch_index + 1], dim=1)


def scatter_tokens(full: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``full`` (B, N, C) with rows ``index`` (B, k) replaced by ``tokens`` (B, k, C); a new tensor."""
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]), tokens.to(full.dtype))


class EvoViTState(TokenState):
    def __init__(self, method, grid_size, depth):
        super().__init__(method, grid_size, depth)
        self.score = None       # (B, P) running class attention of the patch tokens, grid order
        self.kept = None        # (B, k) patch indices updated by the current block; None in a full block
        self.full = None        # (B, N, C) the whole sequence entering the current pruned block


@register_method
class EvoViT(TokenReduction):
    name = 'evo_vit'
    params = {'location': int_param(), 'keep_ratio': float_param(0, 1, low_open=True),
              'tradeoff': float_param(0, 1, default=0.5)}
    main_param = 'keep_ratio'

    def check(self, depth, grid_size):
        if not 1 <= self.location <= depth - 1:
            raise ValueError(f"token_reduction evo_vit: 'location' {self.location} is outside the blocks that can "
                             f"prune; use 1 to {depth - 1} (block 0 starts the running class attention)")

    def schedule(self, num_tokens, grid_size, depth):
        kept = 1 + kept_patch_count(num_tokens - 1, self.keep_ratio)
        return [(num_tokens, num_tokens) if index < self.location else (kept, kept) for index in range(depth)]

    def output_tokens(self, num_tokens, grid_size, depth):
        return num_tokens  # placeholders pass through: the sequence keeps every token

    def new_state(self, x, grid_size, depth):
        return EvoViTState(self, grid_size, depth)

    def before_block(self, block, x, state):
        num_patches = x.shape[1] - 1
        keep = kept_patch_count(num_patches, self.keep_ratio)
        if state.index < self.location or keep >= num_patches:
            state.kept = None
            return x
        state.kept = top_patch_tokens(state.score, keep)
        state.full = x
        if state.recording:
            state.record(updated=torch.zeros_like(state.score, dtype=torch.bool).scatter(1, state.kept, True))
        return gather_tokens(x, with_class_token(state.kept))

    def attention(self, attn, x, state):
        q, k, v = attn.project_qkv(x)
        current = class_attention(q, k, attn.scale).mean(dim=1)[:, 1:]
        state.score = update_running_score(state.score, current, self.tradeoff, state.kept)
        return attn.project_out(attn.attend(q, k, v))

    def after_block(self, block, x, state):
        if state.kept is None:
            return x
        full = scatter_tokens(state.full, with_class_token(state.kept), x)
        state.full = state.kept = None
        return full
