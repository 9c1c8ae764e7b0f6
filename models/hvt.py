"""HVT: Scalable Vision Transformers with Hierarchical Pooling (Pan et al., ICCV 2021).

Matches MonashAI/HVT ``models.py``:
- conv patch embedding, **no class token**, a learnable (1, N0, C) position embedding added once;
- pre-norm blocks (LayerNorm eps 1e-6, qkv with bias, MLP ratio 4, exact GELU);
- block ``i`` pools at its end iff ``i % pool_block_width == 0`` (so block 0 always pools): a ``MaxPool1d`` over the
  raster-order token sequence, then a **fresh** learnable position embedding ``blocks.{i}.pos_embed`` of the new length;
- final LayerNorm, **mean over tokens**, linear head.

Differences from upstream, on purpose: ``pool_stride`` is honoured (upstream hard-codes 2), ``pool_block_width=0``
means no pooling (HVT-S-0, which upstream cannot express), and the model takes its settings as constructor arguments
instead of reading global argparse state. With 224 px, patch 16 and kernel 3 the token counts are
196 -> 97 -> 48 -> 23 -> 11.
"""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from .layers import Block, PatchEmbed, init_vit_weights, square_grid_side, tokens_after_pool
from .registry import register_model


class HVTBlock(Block):
    """A pre-norm block that may end with max-pooling over tokens plus a new position embedding."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, pool_tokens: int = 0, pool_kernel_size: int = 3,
                 pool_stride: int = 2, **kwargs):
        super().__init__(dim, num_heads, head_dim=head_dim, **kwargs)
        self.pool = None
        if pool_tokens:
            self.pool = nn.MaxPool1d(pool_kernel_size, stride=pool_stride)
            self.pos_embed = nn.Parameter(torch.zeros(1, pool_tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.pool is not None:
            x = self.pool(x.transpose(1, 2)).transpose(1, 2) + self.pos_embed
        return x


class HVT(nn.Module):
    """Hierarchical-pooling ViT. ``embed_dim = num_heads * head_dim``; ``pool_block_width = 0`` disables pooling."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 num_heads: int = 3, head_dim: int = 64, num_blocks: int = 12, mlp_ratio: float = 4.,
                 pool_kernel_size: int = 3, pool_stride: int = 2, pool_block_width: int = 4,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = dim = num_heads * head_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.token_counts = self.pooled_token_counts(self.patch_embed.num_patches, num_blocks, pool_block_width,
                                                     pool_kernel_size, pool_stride)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, num_blocks, device='cpu').tolist()
        blocks = []
        for i in range(num_blocks):
            pools = pool_block_width > 0 and i % pool_block_width == 0
            blocks.append(HVTBlock(dim, num_heads, head_dim, pool_tokens=self.token_counts[i + 1] if pools else 0,
                                   pool_kernel_size=pool_kernel_size, pool_stride=pool_stride, mlp_ratio=mlp_ratio,
                                   proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i]))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        for name, param in self.named_parameters():
            if name.endswith('pos_embed'):
                trunc_normal_(param, std=.02)
        self.apply(init_vit_weights)

    @staticmethod
    def pooled_token_counts(num_patches: int, num_blocks: int, pool_block_width: int, kernel_size: int,
                            stride: int) -> List[int]:
        """Token count entering each block, plus the output count: ``counts[i]`` is block i's input length."""
        if kernel_size < 1 or stride < 1:
            raise ValueError(f'pool_kernel_size ({kernel_size}) and pool_stride ({stride}) must be >= 1')
        if pool_block_width < 0:
            raise ValueError(f'pool_block_width must be >= 0 (0 = no pooling), got {pool_block_width}')
        counts = [num_patches]
        for i in range(num_blocks):
            n = counts[-1]
            if pool_block_width > 0 and i % pool_block_width == 0:
                n = tokens_after_pool(n, kernel_size, stride)
                if n < 1:
                    raise ValueError(
                        f'pooling leaves no tokens: block {i} gets {counts[-1]} tokens and pools them with kernel '
                        f'{kernel_size}, stride {stride}; use a larger input, a smaller patch, or a larger '
                        f'pool_block_width')
            counts.append(n)
        return counts

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'blocks.*.pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(x.mean(dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """Official HVT keys equal ours. Position embeddings of another length (another input size) are resampled:
        the patch grid one in 2-D (bicubic), the per-stage ones linearly along the token sequence they index."""
        for name, param in self.named_parameters():
            if not name.endswith('pos_embed') or name not in state_dict:
                continue
            old = state_dict[name]
            if old.shape == param.shape or old.shape[-1] != param.shape[-1]:
                continue
            if name == 'pos_embed':
                state_dict[name] = _resize_grid_pos_embed(old, self.patch_embed.grid_size)
            else:
                state_dict[name] = F.interpolate(old.transpose(1, 2), size=param.shape[1], mode='linear',
                                                 align_corners=False).transpose(1, 2)
        return state_dict


def _resize_grid_pos_embed(pos: torch.Tensor, grid) -> torch.Tensor:
    """(1, old*old, C) -> (1, grid[0]*grid[1], C): 2-D bicubic, antialiased (timm's resampling, no class token)."""
    old = square_grid_side(pos.shape[1])
    if old is None:
        raise ValueError(f'cannot resize a position embedding of {pos.shape[1]} tokens: not a square grid')
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=[old, old], num_prefix_tokens=0)


def _hvt(kwargs: dict, num_heads: int, pool_block_width: int) -> HVT:
    """A published HVT variant; any constructor argument in ``kwargs`` (e.g. from a config) overrides it."""
    arch = dict(patch_size=16, num_heads=num_heads, head_dim=64, num_blocks=12, pool_kernel_size=3,
                pool_block_width=pool_block_width)
    return HVT(**{**arch, **kwargs})


@register_model(HVT)
def hvt_model(**kwargs):
    """The configurable HVT of the official configs (``"model": "hvt_model"``); upstream's no-config defaults."""
    return _hvt(kwargs, 3, 4)


@register_model(HVT)
def hvt_ti_1(**kwargs):
    """HVT-Ti-1: 3 heads (192 wide), one pooling after block 0. 5,735,656 params."""
    return _hvt(kwargs, 3, 12)


@register_model(HVT)
def hvt_s_0(**kwargs):
    """HVT-S-0: 6 heads (384 wide), no pooling (196 tokens throughout). 22,049,896 params."""
    return _hvt(kwargs, 6, 0)


@register_model(HVT)
def hvt_s_1(**kwargs):
    """HVT-S-1: pools after block 0. 22,087,144 params."""
    return _hvt(kwargs, 6, 12)


@register_model(HVT)
def hvt_s_2(**kwargs):
    """HVT-S-2: pools after blocks 0 and 6. 22,105,576 params."""
    return _hvt(kwargs, 6, 6)


@register_model(HVT)
def hvt_s_3(**kwargs):
    """HVT-S-3: pools after blocks 0, 4, 8. 22,114,408 params."""
    return _hvt(kwargs, 6, 4)


@register_model(HVT)
def hvt_s_4(**kwargs):
    """HVT-S-4: pools after blocks 0, 3, 6, 9 (196 -> 97 -> 48 -> 23 -> 11 tokens). 22,118,632 params."""
    return _hvt(kwargs, 6, 3)


@register_model(HVT)
def scale_hvt_ti_4(**kwargs):
    """Scale HVT-Ti-4: DeiT-Ti doubled in width with 4 pooling stages; the same network as HVT-S-4."""
    return _hvt(kwargs, 6, 3)
