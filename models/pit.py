"""PiT: Pooling-based Vision Transformer (Heo et al., "Rethinking Spatial Dimensions of Vision Transformers",
ICCV 2021).

Matches naver-ai/pit ``pit.py``, with the official state-dict layout:

- ``patch_embed.conv``: Conv2d(3 -> C0, kernel = patch_size, stride = stride, no padding). The output stays a spatial
  map (B, C0, H0, W0), H0 = floor((H - patch) / stride) + 1: 27 x 27 at 224 px for ti/xs/s (16/8), 31 x 31 for b (14/7);
- ``pos_embed``: a learnable (1, C0, H0, W0) map added to that map once (the class tokens never get one);
- ``cls_token``: (1, T, C0) with T = 1, or T = 2 for distilled models (index 0 class, index 1 distillation token),
  carried apart from the map and put in front of the spatial tokens in every stage;
- ``transformers.{i}.blocks.{j}``: 3 stages of pre-norm ViT blocks (LayerNorm eps 1e-6, qkv bias, MLP ratio 4), width
  ``base_dims[i] * heads[i]``. Tokens per stage at 224 px: 730 / 197 / 50 (ti/xs/s), 962 / 257 / 65 (b); one more each
  when distilled;
- ``pools.{i}``: between stage i and i + 1, ``conv`` is a depthwise Conv2d(C -> 2C, kernel 3, stride 2, padding 1,
  groups C, i.e. channel multiplier 2) on the map, H -> floor((H + 2 - 3) / 2) + 1 (27 -> 14 -> 7, 31 -> 16 -> 8), and
  ``fc`` is a Linear(C -> 2C) on the class tokens; no norm, no activation, no residual;
- ``norm``: LayerNorm(eps 1e-6) on the class tokens only; ``head`` on token 0, ``head_dist`` on token 1 (distilled).

Upstream behaviour that is matched: PyTorch default init for every Linear and Conv (unlike DeiT/ViT), trunc-normal(0.02)
for ``pos_embed`` and ``cls_token``, LayerNorm 1/0; distilled models return ``(cls_logits, dist_logits)`` in training
(what DeiT's ``DistillationLoss`` unpacks) and ``(cls_logits + dist_logits) / 2`` in eval. timm 0.9.0 - 1.0.24 fed
token 0 to ``head_dist``; here token 1 goes there, as in the official code and timm >= 1.0.25. With the same weights the
logits equal timm 1.0.31's ``pit_*_224`` / ``pit_*_distilled_224`` (eval mode).

Differences from upstream, on purpose:
- ``pos_embed`` is resized (bicubic, antialiased, 2-D like a CNN feature map) when a checkpoint from another resolution
  is loaded, and at run time when an input of another size arrives; upstream accepts only the size it was built for;
- drop path rises linearly over all blocks as ``linspace(0, drop_path_rate, total_blocks)`` (timm's rule, so the last
  block gets exactly ``drop_path_rate``; the official code uses ``rate * k / total`` and never reaches it);
- ``drop_rate`` is used as in the official code (after ``pos_embed`` and in the blocks' proj / MLP outputs); there is no
  dropout before the heads (timm uses ``drop_rate`` for head dropout only);
- distilled models can return the averaged logits in training too, after ``set_distilled_training(False)`` (timm's
  switch; timm defaults to that, the official code and this one to the tuple).
"""
import re
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_

from .layers import Block
from .registry import register_model

__all__ = ['PiT', 'PiTStage', 'ConvHeadPooling', 'ConvEmbedding', 'resize_pos_embed_2d']

Size2 = Union[int, Tuple[int, int]]




def conv_out_size(size: int, kernel_size: int, stride: int, padding: int = 0) -> int:
    """Output length of a convolution along one axis: floor((size + 2 * padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel_size) // stride + 1


def _linear_rates(max_rate: float, count: int) -> List[float]:
    """``linspace(0, max_rate, count)`` in Python floats (no tensor, so the model also builds on the meta device)."""
    if count <= 1:
        return [0.] * count
    return [max_rate * k / (count - 1) for k in range(count)]


def resize_pos_embed_2d(pos_embed: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resample a (1, C, H, W) position-embedding map to (1, C, *size): bicubic, antialiased when shrinking."""
    if tuple(pos_embed.shape[-2:]) == tuple(size):
        return pos_embed
    out = F.interpolate(pos_embed.float(), size=size, mode='bicubic', align_corners=False, antialias=True)
    return out.to(pos_embed.dtype)


class ConvEmbedding(nn.Module):
    """Overlapping conv patch embedding: (B, 3, H, W) -> (B, C0, H0, W0); no padding, no norm."""

    def __init__(self, img_size: Size2 = 224, patch_size: int = 16, stride: int = 8, in_chans: int = 3,
                 embed_dim: int = 144):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.stride = stride
        self.grid_size = self.output_size(self.img_size)
        if min(self.grid_size) < 1:
            raise ValueError(f'input size {self.img_size} is smaller than the patch size {patch_size}')
        self.conv = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=0, bias=True)

    def output_size(self, img_size: Size2) -> Tuple[int, int]:
        h, w = to_2tuple(img_size)
        return conv_out_size(h, self.patch_size, self.stride), conv_out_size(w, self.patch_size, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvHeadPooling(nn.Module):
    """Pooling between stages: depthwise conv (channel multiplier ``out // in``) on the map, Linear on the class tokens.

    (B, C, H, W), (B, T, C) -> (B, C', H', W'), (B, T, C'); kernel stride + 1, padding stride // 2, so
    H' = floor((H + 2 * (stride // 2) - stride - 1) / stride) + 1 (stride 2: floor((H - 1) / 2) + 1).
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2):
        super().__init__()
        if out_dim % in_dim:
            raise ValueError(f'pooling width {out_dim} must be a multiple of the input width {in_dim}')
        self.stride = stride
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=stride + 1, stride=stride, padding=stride // 2,
                              groups=in_dim, bias=True)
        self.fc = nn.Linear(in_dim, out_dim)

    def output_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        k, s, p = self.stride + 1, self.stride, self.stride // 2
        return conv_out_size(size[0], k, s, p), conv_out_size(size[1], k, s, p)

    def forward(self, x: torch.Tensor, cls_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), self.fc(cls_tokens)


class PiTStage(nn.Module):
    """One stage: the class tokens go in front of the flattened map, ``depth`` pre-norm blocks run over all of them.

    ``forward(x, cls_tokens)`` takes the map (B, C, H, W) and the class tokens (B, T, C) and returns the token sequence
    (B, T + H * W, C) in row-major order; :meth:`split` turns it back into a map and class tokens.
    """

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 4., proj_drop: float = 0.,
                 attn_drop: float = 0., drop_path: Sequence[float] = ()):
        super().__init__()
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.Sequential(*[
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=proj_drop, attn_drop=attn_drop,
                  drop_path=drop_path[j], norm_eps=1e-6) for j in range(depth)])

    def forward(self, x: torch.Tensor, cls_tokens: torch.Tensor) -> torch.Tensor:
        # flatten(2).transpose is a view; the concatenation is the only copy
        return self.blocks(torch.cat([cls_tokens, x.flatten(2).transpose(1, 2)], dim=1))

    @staticmethod
    def split(tokens: torch.Tensor, num_cls: int, size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T + H * W, C) -> map (B, C, H, W) and class tokens (B, T, C), both views (the map is channels-last
        strided, which the depthwise pooling conv reads without a transpose copy)."""
        x = tokens[:, num_cls:].unflatten(1, size).permute(0, 3, 1, 2)
        return x, tokens[:, :num_cls]


class PiT(nn.Module):
    """Pooling-based ViT. Stage i is ``base_dims[i] * heads[i]`` wide with ``heads[i]`` heads of ``base_dims[i]``."""

    def __init__(self, img_size: Size2 = 224, patch_size: int = 16, stride: int = 8,
                 base_dims: Sequence[int] = (48, 48, 48), depth: Sequence[int] = (2, 6, 4),
                 heads: Sequence[int] = (3, 6, 12), mlp_ratio: float = 4., in_chans: int = 3, num_classes: int = 1000,
                 distilled: bool = False, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.):
        super().__init__()
        if not len(base_dims) == len(depth) == len(heads):
            raise ValueError(f'base_dims {base_dims}, depth {depth} and heads {heads} must have the same length')
        dims = [b * h for b, h in zip(base_dims, heads)]
        self.num_classes = num_classes
        self.distilled = distilled
        self.num_tokens = 2 if distilled else 1
        self.distilled_training = True  # official: distilled models return (cls, dist) logits while training
        self.embed_dim = self.num_features = dims[-1]
        self.dims = dims

        self.patch_embed = ConvEmbedding(img_size, patch_size, stride, in_chans, dims[0])
        self.grid_sizes = [self.patch_embed.grid_size]
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], *self.patch_embed.grid_size))
        self.cls_token = nn.Parameter(torch.zeros(1, self.num_tokens, dims[0]))
        self.pos_drop = nn.Dropout(drop_rate)

        rates = _linear_rates(drop_path_rate, sum(depth))
        stages, pools, start = [], [], 0
        for i, d in enumerate(depth):
            if i > 0:
                pools.append(ConvHeadPooling(dims[i - 1], dims[i], stride=2))
                self.grid_sizes.append(pools[-1].output_size(self.grid_sizes[-1]))
            stages.append(PiTStage(dims[i], heads[i], d, mlp_ratio, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                                   drop_path=rates[start:start + d]))
            start += d
        self.transformers = nn.ModuleList(stages)
        self.pools = nn.ModuleList(pools)

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        # Linear / Conv keep PyTorch's default init, as upstream; LayerNorms are 1/0 already
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer-decay groups: stem, then each block (or stage when ``coarse``) in order; ``pools.{i}`` joins the last
        block of stage i (suffix 99999 = timm's "same group as the previous one"), ``norm`` joins the last block."""
        blocks = r'^transformers\.(\d+)' if coarse else r'^transformers\.(\d+)\.blocks\.(\d+)'
        return dict(stem=r'^cls_token|^pos_embed|^patch_embed',
                    blocks=[(blocks, None), (r'^pools\.(\d+)', (99999,)), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """``False``: a distilled model returns the averaged logits in training too (fine-tuning with a plain loss)."""
        self.distilled_training = enable

    def get_classifier(self):
        return (self.head, self.head_dist) if self.distilled else self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.distilled:
            self.head_dist = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, size: Tuple[int, int]) -> torch.Tensor:
        if tuple(self.pos_embed.shape[-2:]) == tuple(size):
            return self.pos_embed
        return resize_pos_embed_2d(self.pos_embed, size)

    def forward_stages(self, x: torch.Tensor, return_maps: bool = False):
        """Stem and all stages. Returns the un-normed class tokens (B, T, C_last), plus the stage maps
        [(B, C_i, H_i, W_i)] when ``return_maps`` (views of the token sequences, channels-last strided)."""
        x = self.patch_embed(x)
        x = self.pos_drop(x + self._pos_embed(x.shape[-2:]))
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        maps = []
        last = len(self.transformers) - 1
        for i, stage in enumerate(self.transformers):
            if i > 0:
                x, cls_tokens = self.pools[i - 1](x, cls_tokens)
            size = x.shape[-2:]
            tokens = stage(x, cls_tokens)
            if i < last or return_maps:
                x, cls_tokens = stage.split(tokens, self.num_tokens, size)
                maps.append(x)
            else:
                cls_tokens = tokens[:, :self.num_tokens]
        return (cls_tokens, maps) if return_maps else cls_tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normed class tokens (B, T, C_last); the spatial map is never normed."""
        return self.norm(self.forward_stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Class tokens (B, T, C) -> logits. Distilled: ``head(token 0)`` and ``head_dist(token 1)``, returned as a
        tuple in training (unless ``set_distilled_training(False)``), averaged otherwise; ``pre_logits`` skips the
        heads."""
        if not self.distilled:
            x = x[:, 0]
            return x if pre_logits else self.head(x)
        x, x_dist = x[:, 0], x[:, 1]
        if not pre_logits:
            x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.training and self.distilled_training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """Map a PiT state dict onto the official layout used here and fit ``pos_embed`` to this model's grid.

        Accepted layouts: official naver-ai (``pools.{i}``), timm >= 0.9 (``transformers.{i+1}.pool``) and timm < 0.9
        (``transformers.{i}.pool``, recognised by a ``transformers.0.pool.`` key). Other keys pass through unchanged.
        """
        old_timm = any(k.startswith('transformers.0.pool.') for k in state_dict)
        shift = 0 if old_timm else 1
        pattern = re.compile(r'^transformers\.(\d+)\.pool\.')
        out = {}
        for key, value in state_dict.items():
            out[pattern.sub(lambda m: f'pools.{int(m.group(1)) - shift}.', key)] = value
        pos = out.get('pos_embed')
        if pos is not None and pos.ndim == 4 and pos.shape[:2] == self.pos_embed.shape[:2]:
            out['pos_embed'] = resize_pos_embed_2d(pos, self.patch_embed.grid_size)
        return out


def _pit(arch: dict, distilled: bool, **kwargs) -> PiT:
    return PiT(**{**arch, 'distilled': distilled, **kwargs})


_TI = dict(patch_size=16, stride=8, base_dims=(32, 32, 32), depth=(2, 6, 4), heads=(2, 4, 8), mlp_ratio=4.)
_XS = dict(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(2, 4, 8), mlp_ratio=4.)
_S = dict(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(3, 6, 12), mlp_ratio=4.)
_B = dict(patch_size=14, stride=7, base_dims=(64, 64, 64), depth=(3, 6, 4), heads=(4, 8, 16), mlp_ratio=4.)


@register_model(PiT)
def pit_ti(**kwargs):
    """PiT-Ti: widths 64/128/256, depth 2/6/4, 27x27 -> 14x14 -> 7x7 at 224 px. 4,847,272 params (1000 classes)."""
    return _pit(_TI, False, **kwargs)


@register_model(PiT)
def pit_xs(**kwargs):
    """PiT-XS: widths 96/192/384, depth 2/6/4, 27x27 -> 14x14 -> 7x7 at 224 px. 10,618,888 params (1000 classes)."""
    return _pit(_XS, False, **kwargs)


@register_model(PiT)
def pit_s(**kwargs):
    """PiT-S: widths 144/288/576, depth 2/6/4, 27x27 -> 14x14 -> 7x7 at 224 px. 23,461,912 params (1000 classes)."""
    return _pit(_S, False, **kwargs)


@register_model(PiT)
def pit_b(**kwargs):
    """PiT-B: patch 14 stride 7, widths 256/512/1024, depth 3/6/4, 31x31 -> 16x16 -> 8x8. 73,764,840 params."""
    return _pit(_B, False, **kwargs)


@register_model(PiT)
def pit_ti_distilled(**kwargs):
    """PiT-Ti with a distillation token and ``head_dist``. 5,104,336 params (1000 classes)."""
    return _pit(_TI, True, **kwargs)


@register_model(PiT)
def pit_xs_distilled(**kwargs):
    """PiT-XS with a distillation token and ``head_dist``. 11,003,984 params (1000 classes)."""
    return _pit(_XS, True, **kwargs)


@register_model(PiT)
def pit_s_distilled(**kwargs):
    """PiT-S with a distillation token and ``head_dist``. 24,039,056 params (1000 classes)."""
    return _pit(_S, True, **kwargs)


@register_model(PiT)
def pit_b_distilled(**kwargs):
    """PiT-B with a distillation token and ``head_dist``. 74,790,096 params (1000 classes)."""
    return _pit(_B, True, **kwargs)
