"""Shared transformer pieces: attention (SDPA with an explicit path), pre-norm block, patch embedding.

State-dict names follow timm's ViT (``qkv``, ``proj``, ``norm1``, ``mlp.fc1`` ...), so timm, DeiT, HVT and PiT
checkpoints map onto these modules without renaming the block internals.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

__all__ = ['Attention', 'Block', 'PatchEmbed', 'init_vit_weights', 'set_fused_attn', 'square_grid_side',
           'tokens_after_pool']


class Attention(nn.Module):
    """Multi-head self-attention.

    ``fused_attn=True`` runs ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels). The explicit path
    (``q @ k^T``, softmax, ``@ v``) gives the same result and is used when a caller needs the attention map
    (``return_attn=True``) or flips ``fused_attn`` off with :func:`set_fused_attn`.
    ``attn_bias`` (broadcastable to ``(B, heads, N, N)``) is added to the scaled logits, e.g. a relative position bias.
    """

    def __init__(self, dim: int, num_heads: int = 8, head_dim: Optional[int] = None, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., fused_attn: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, inner_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: torch.Tensor):
        """(B, N, C) -> q, k, v, each (B, heads, N, head_dim)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (B, heads, N, head_dim) -> (B, N, C) through ``proj``."""
        B, _, N, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
               return_attn: bool = False):
        """softmax(q·kᵀ·scale + attn_bias)·v per head: the fused kernel, or the explicit path when the map is needed
        (``return_attn``) or ``fused_attn`` is off. Returns the per-head output, and the map when asked."""
        if self.fused_attn and not return_attn:
            if attn_bias is not None:
                attn_bias = attn_bias.to(q.dtype)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop.p if self.training else 0.)
            return x
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_bias is not None:
            attn = attn + attn_bias
        attn = attn.softmax(dim=-1)
        # dropout only where it acts: in eval it is the identity, and a traced no-op would be counted as an op
        x = (self.attn_drop(attn) if self.training else attn) @ v
        return (x, attn) if return_attn else x

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None, return_attn: bool = False):
        q, k, v = self.project_qkv(x)
        if return_attn:
            x, attn = self.attend(q, k, v, attn_bias, return_attn=True)
            return self.project_out(x), attn
        return self.project_out(self.attend(q, k, v, attn_bias))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                              attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None, state=None) -> torch.Tensor:
        """``state`` (a ``models.token_reduction.TokenState``, made afresh for each forward) carries a token-reduction
        method whose hooks run here: before the block, the attention branch with its residual (by default the
        ``attention`` hook on the normed tokens, with this block's ``attn`` module), after the attention residual,
        after the block. Without it: the plain block.
        The methods change which tokens attend, so an ``attn_bias`` (e.g. a relative position bias over a fixed
        grid) cannot follow them: a block given both refuses in one line."""
        if state is not None and attn_bias is not None:
            raise ValueError(f'token_reduction: {type(self).__name__} passes an attention bias (such as a relative '
                             f'position bias), which the token-reduction methods cannot carry; use a plain ViT')
        if state is None:
            x = x + self.drop_path(self.attn(self.norm1(x), attn_bias=attn_bias))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        hooks = state.method
        x = hooks.before_block(self, x, state)
        x = hooks.attention_residual(self, x, state)
        x = hooks.after_attention(self, x, state)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return hooks.after_block(self, x, state)


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding: (B, 3, H, W) -> (B, H/P * W/P, C), row-major token order."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'input size {img_size} is not divisible by patch size {patch_size}; '
                             f'use an input size that is a multiple of {patch_size}')
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_vit_weights(module: nn.Module) -> None:
    """timm/DeiT init: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0. Convs keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    """Switch every :class:`Attention` in ``model`` between SDPA (True) and explicit matmuls (False)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = enabled


def tokens_after_pool(num_tokens: int, kernel_size: int, stride: int) -> int:
    """Output length of a 1-D pooling (no padding): floor((N - k) / s) + 1."""
    return (num_tokens - kernel_size) // stride + 1


def square_grid_side(num_cells: int) -> Optional[int]:
    """The side of a square grid of ``num_cells`` cells (a position table's patches), or None when there is none."""
    side = math.isqrt(num_cells)
    return side if side * side == num_cells else None
