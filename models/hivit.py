"""HiViT: A Simpler and More Efficient Design of Hierarchical Vision Transformer (Zhang et al., ICLR 2023).

Matches mmpretrain 1.2.0 ``HiViT`` + ``ImageClassifier`` (GAP neck, linear head):
- a 16x16-pixel **mask unit** is the main-stage token. A conv (kernel = stride = 16 / 4) embeds 4x4 inner patches per
  unit; tensors in the stem are ``(B, N_units, s, s, C_stage)`` with units and inner patches both row-major;
- stem: per stage ``2 * depths[i]`` MLP-only blocks (``x + DropPath(MLP(LN(x)))``, ratio 3) and a PatchMerge (2x2 inside
  each unit, concat order [even-row/even-col, odd-row/even-col, even-row/odd-col, odd-row/odd-col], LN, bias-free
  Linear 4d -> 2d). Nothing ever mixes units, so the stem is a per-unit network;
- after the stem each unit is one token: (B, 14*14, C) at 224 px. A learnable ``pos_embed`` is added once there, then
  ``depths[-1]`` pre-norm global-attention blocks, each with its own Swin-style relative position bias table over the
  whole unit grid ((2*14-1)^2 x heads at 224);
- no class token and no final norm: mean over tokens, optional ``fc_norm`` (the authors' code has it, mmpretrain has
  not), linear head.

``blocks`` is one ModuleList in construction order (stem MLP blocks, merge, stem MLP blocks, merge, attention blocks),
as in both upstream codebases, so checkpoint keys ``blocks.{i}.*`` map one to one. Tiny: blocks 0-1 MLP(96), 2 merge,
3-4 MLP(192), 5 merge, 6-15 attention(384).

Beyond upstream, on purpose: any input that is a multiple of 16 works with the relative position bias on (tables and
the absolute embedding are resized bicubically at run time when the unit grid differs from the built one), and
``checkpoint_filter`` resizes both kinds of position table when a checkpoint from another resolution is loaded.
Run-time resizing uses timm's ``resample_abs_pos_embed`` (bicubic to the target size, antialiased), so at other sizes
with ``rpe=False`` the output differs slightly from mmpretrain's per-forward ``scale_factor`` interpolation.
Dropout (``drop_rate``, 0 in every config) follows timm's ``Mlp``, i.e. after fc1 and fc2 as in the authors' code;
mmpretrain drops after fc2 only. Not supported: layer scale (off in every upstream config), the authors' unused 4-stage
branch, and MAE token masking.
"""
import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_

from .layers import Attention, Block, init_vit_weights, square_grid_side
from .registry import register_model

Grid = Tuple[int, int]


@functools.lru_cache(maxsize=8)
def _relative_position_index(grid: Grid) -> torch.Tensor:
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device='cpu'), torch.arange(w, device='cpu'), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (h - 1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    return dy * (2 * w - 1) + dx


def relative_position_index(grid: Grid) -> torch.Tensor:
    """(N, N) int64 index into a ((2H-1)*(2W-1), heads) table, N = H*W tokens in row-major order.

    Token i at (yi, xi), token j at (yj, xj): ``(yi - yj + H - 1) * (2W - 1) + (xi - xj + W - 1)`` (Swin's indexing
    with one window covering the whole grid; the index mmpretrain and the authors' code register). Cached per grid;
    every call returns a fresh copy on the CPU.
    """
    return _relative_position_index((int(grid[0]), int(grid[1]))).clone()


def resize_rel_pos_bias_table(table: torch.Tensor, old_grid: Grid, new_grid: Grid) -> torch.Tensor:
    """((2H-1)*(2W-1), heads) -> ((2H'-1)*(2W'-1), heads): bicubic over the 2-D grid of offsets, per head.

    Both offset grids have odd sizes, so offset (0, 0) stays at the centre; other offsets scale with the grid, as the
    absolute embedding does.
    """
    old_size = (2 * old_grid[0] - 1, 2 * old_grid[1] - 1)
    new_size = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    if old_size == new_size:
        return table
    if table.shape[0] != old_size[0] * old_size[1]:
        raise ValueError(f'relative position bias table has {table.shape[0]} rows, expected '
                         f'{old_size[0]}*{old_size[1]} for a {old_grid[0]}x{old_grid[1]} grid')
    heads = table.shape[1]
    grid = table.float().t().reshape(1, heads, *old_size)
    grid = F.interpolate(grid, size=new_size, mode='bicubic', align_corners=False)
    return grid.reshape(heads, -1).t().contiguous().to(table.dtype)


def _square_grid(num_positions: int, what: str) -> Grid:
    """Side of a square grid with ``num_positions`` cells (position tables in checkpoints are square)."""
    side = square_grid_side(num_positions)
    if side is None:
        raise ValueError(f'cannot resize {what}: {num_positions} entries is not a square grid')
    return side, side


class UnitPatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, N, s, s, C0): conv with kernel = stride = patch_size / s, then LayerNorm (``patch_norm``).

    N = (H/16) * (W/16) mask units in row-major order, each holding an s x s (4 x 4) row-major grid of inner patches.
    """

    def __init__(self, patch_size: int = 16, inner_patches: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_eps: float = 1e-5, patch_norm: bool = True):
        super().__init__()
        if patch_size % inner_patches:
            raise ValueError(f'patch_size {patch_size} is not divisible by the {inner_patches} inner patches per side')
        self.patch_size = patch_size
        self.inner_patches = inner_patches
        kernel = patch_size // inner_patches
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.inner_patches
        x = rearrange(self.proj(x), 'b c (gh sh) (gw sw) -> b (gh gw) sh sw c', sh=s, sw=s)
        return self.norm(x)


class StemBlock(nn.Module):
    """MLP-only block inside each unit: ``x + DropPath(MLP(LN(x)))`` on (B, N, s, s, d).

    Key names are those of the MLP half of :class:`Block` (``norm2``, ``mlp.fc1``, ``mlp.fc2``), as upstream.
    """

    def __init__(self, dim: int, mlp_ratio: float = 3., proj_drop: float = 0., drop_path: float = 0.,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerge(nn.Module):
    """2x2 merge inside each unit: (B, N, s, s, d) -> (B, N, s/2, s/2, 2d).

    Channel concat order [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]] (rows first, as Swin and
    upstream HiViT), then LayerNorm(4d) and a bias-free Linear(4d -> 2d).
    """

    def __init__(self, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]],
                      dim=-1)
        return self.reduction(self.norm(x))


class RelPosAttention(Attention):
    """:class:`Attention` plus a learnable relative position bias over a unit grid (``grid_size=None``: no bias).

    ``relative_position_bias_table`` is ((2H-1)*(2W-1), heads) for the built grid (H, W); the (N, N) index is a
    non-persistent buffer (deterministic, so never read from checkpoints). :meth:`relative_position_bias` gives the
    (heads, N, N) bias for any grid, resizing the table bicubically when the grid differs from the built one.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: Optional[Grid], **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        if self.grid_size is None:
            self.relative_position_bias_table = None
        else:
            h, w = self.grid_size
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), num_heads))
            self.register_buffer('relative_position_index', relative_position_index(self.grid_size), persistent=False)

    def relative_position_bias(self, grid: Grid) -> Optional[torch.Tensor]:
        table = self.relative_position_bias_table
        if table is None:
            return None
        if tuple(grid) == self.grid_size:
            index = self.relative_position_index
        else:
            table = resize_rel_pos_bias_table(table, self.grid_size, grid)
            index = relative_position_index(grid).to(table.device)
        n = grid[0] * grid[1]
        return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


class HiViTBlock(Block):
    """Main-stage pre-norm block (global attention over all units) whose attention carries its own relative
    position bias; ``forward(x, grid)`` takes the (H, W) unit grid of the current input."""

    def __init__(self, dim: int, num_heads: int, grid_size: Optional[Grid], mlp_ratio: float = 4.,
                 qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_eps: float = 1e-5):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                         attn_drop=attn_drop, drop_path=drop_path, norm_eps=norm_eps)
        self.attn = RelPosAttention(dim, num_heads, grid_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=proj_drop)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return super().forward(x, attn_bias=self.attn.relative_position_bias(grid))


class HiViT(nn.Module):
    """HiViT classifier. ``depths[:-1]`` are stem stages (each ``2 * depth`` MLP blocks), ``depths[-1]`` the main
    attention blocks; stem stage i has width ``embed_dim / 2**(len(depths) - 1 - i)``.

    Defaults are mmpretrain's classification settings (LN eps 1e-5, ``ape`` and ``rpe`` on, no ``fc_norm``). The
    authors' supervised models are ``norm_eps=1e-6, fc_norm=True`` (their base also has ``depths=(2, 2, 20)``).
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 384, depths: Sequence[int] = (1, 1, 10),
                 num_heads: int = 6, stem_mlp_ratio: float = 3., mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 norm_eps: float = 1e-5, ape: bool = True, rpe: bool = True, patch_norm: bool = True,
                 fc_norm: bool = False):
        super().__init__()
        img_size = to_2tuple(img_size)
        depths = list(depths)
        if not depths:
            raise ValueError('depths needs at least one entry (the main stage)')
        inner_patches = 2 ** (len(depths) - 1)
        if embed_dim % inner_patches:
            raise ValueError(f'embed_dim {embed_dim} must be divisible by 2**(len(depths) - 1) = {inner_patches}')
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f'input size {img_size} is not a multiple of the {patch_size}-pixel mask unit')
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.depths = depths

        stem_dim = embed_dim // inner_patches
        self.patch_embed = UnitPatchEmbed(patch_size, inner_patches, in_chans, stem_dim, norm_eps, patch_norm)
        # one drop-path rate per MLP / attention block in construction order; merges take none
        rates = iter(torch.linspace(0, drop_path_rate, 2 * sum(depths[:-1]) + depths[-1], device='cpu').tolist())
        blocks = []
        dim = stem_dim
        for depth in depths[:-1]:
            blocks += [StemBlock(dim, stem_mlp_ratio, drop_rate, next(rates), norm_eps) for _ in range(2 * depth)]
            blocks.append(PatchMerge(dim, norm_eps))
            dim *= 2
        self.num_stem_blocks = len(blocks)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim)) if ape else None
        self.pos_drop = nn.Dropout(drop_rate)
        blocks += [HiViTBlock(embed_dim, num_heads, self.grid_size if rpe else None, mlp_ratio=mlp_ratio,
                              qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                              drop_path=next(rates), norm_eps=norm_eps) for _ in range(depths[-1])]
        self.blocks = nn.ModuleList(blocks)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        for name, param in self.named_parameters():
            if name == 'pos_embed' or name.endswith('relative_position_bias_table'):
                trunc_normal_(param, std=.02)
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', '*relative_position_bias_table'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer ids for layer-wise LR decay: patch_embed + pos_embed = 0, ``blocks.{i}`` = i + 1 (every stem MLP
        block, merge and attention block on its own), fc_norm + head = last."""
        return dict(stem=r'^pos_embed|^patch_embed', blocks=[(r'^blocks\.(\d+)', None)])

    def unit_grid(self, height: int, width: int) -> Grid:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f'input size {height}x{width} is not a multiple of the {self.patch_size}-pixel mask unit')
        return height // self.patch_size, width // self.patch_size

    def _pos_embed(self, grid: Grid) -> torch.Tensor:
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=grid, old_size=self.grid_size, num_prefix_tokens=0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/16 * W/16, C) main-stage tokens (row-major units; no final norm, as upstream)."""
        grid = self.unit_grid(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)
        for blk in self.blocks[:self.num_stem_blocks]:
            x = blk(x)
        x = x[:, :, 0, 0]  # the stem has merged each unit's inner grid down to 1x1
        if self.pos_embed is not None:
            x = x + self._pos_embed(grid)
        x = self.pos_drop(x)
        for blk in self.blocks[self.num_stem_blocks:]:
            x = blk(x, grid)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.fc_norm(x.mean(dim=1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """Map mmpretrain, authors' and our own checkpoints onto this model.

        - mmpretrain ImageClassifier: ``backbone.`` prefix stripped, ``head.fc.*`` -> ``head.*``;
        - authors' code: ``absolute_pos_embed`` -> ``pos_embed`` (``head.*``, ``fc_norm.*``, ``blocks.*`` already match;
          ``fc_norm.*`` stays unexpected when this model is built without ``fc_norm``);
        - every ``relative_position_index`` buffer (model-level or per attention) is dropped: ours are deterministic;
        - a ``pos_embed`` of another grid is resized (2-D bicubic over the unit grid) and every
          ``relative_position_bias_table`` of another length is resized over its 2-D offset grid, so a 224-px
          checkpoint fine-tunes at e.g. 256 px (16x16 units). Checkpoint tables are taken to be square.
        """
        out = {}
        for key, value in state_dict.items():
            if key.startswith('backbone.'):
                key = key[len('backbone.'):]
            if key.startswith('head.fc.'):
                key = 'head.' + key[len('head.fc.'):]
            if key == 'absolute_pos_embed':
                key = 'pos_embed'
            if key.endswith('relative_position_index'):
                continue
            out[key] = value
        own = dict(self.named_parameters())
        for key, value in out.items():
            if key not in own or value.shape == own[key].shape or value.ndim != own[key].ndim:
                continue
            if key == 'pos_embed' and value.shape[-1] == own[key].shape[-1]:
                out[key] = resample_abs_pos_embed(value, new_size=self.grid_size,
                                                  old_size=_square_grid(value.shape[1], key), num_prefix_tokens=0)
            elif key.endswith('relative_position_bias_table') and value.shape[1] == own[key].shape[1]:
                side = _square_grid(value.shape[0], key)[0]
                if side % 2 == 0:
                    raise ValueError(f'cannot resize {key}: {value.shape[0]} rows is not (2W-1)^2')
                old = ((side + 1) // 2, (side + 1) // 2)
                out[key] = resize_rel_pos_bias_table(value, old, self.grid_size)
        return out


def _hivit(arch: dict, **kwargs) -> HiViT:
    defaults = dict(patch_size=16, stem_mlp_ratio=3., mlp_ratio=4., norm_eps=1e-5, ape=True, rpe=True, fc_norm=False)
    return HiViT(**{**defaults, **arch, **kwargs})


@register_model(HiViT)
def hivit_tiny(**kwargs):
    """HiViT-T (mmpretrain ``hivit-tiny-p16_16xb64_in1k``): 96 -> 192 -> 384 wide, depths (1, 1, 10) = 2 + 2 MLP
    blocks and 10 attention blocks, 6 heads; drop_path 0.05 by default. 19,180,900 params, 4.60 GMACs at 224."""
    return _hivit(dict(embed_dim=384, depths=(1, 1, 10), num_heads=6, drop_path_rate=0.05), **kwargs)


@register_model(HiViT)
def hivit_small(**kwargs):
    """HiViT-S: 384 wide, depths (2, 2, 20) = 4 + 4 MLP blocks and 20 attention blocks, 6 heads; drop_path 0.3.
    37,525,696 params, 9.07 GMACs at 224."""
    return _hivit(dict(embed_dim=384, depths=(2, 2, 20), num_heads=6, drop_path_rate=0.3), **kwargs)


@register_model(HiViT)
def hivit_base(**kwargs):
    """HiViT-B as mmpretrain defines it: 512 wide, depths (2, 2, 24), 8 heads; drop_path 0.5. 79,050,792 params,
    18.47 GMACs at 224. (The authors' base has depths (2, 2, 20): 66.42M.)"""
    return _hivit(dict(embed_dim=512, depths=(2, 2, 24), num_heads=8, drop_path_rate=0.5), **kwargs)
