"""Plain ViT with a class token: DeiT-Ti/S/B (Touvron et al. 2021).

Parameter names equal timm's ``VisionTransformer``, so timm/DeiT checkpoints load as they are; position embeddings are
resampled (bicubic, class token kept) when the checkpoint was trained at another resolution.
"""
import math

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from .layers import Block, PatchEmbed, init_vit_weights, trunc_normal_
from .registry import register_model


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        # a models.token_reduction method (set by apply_token_reduction; never changed during a forward), or None
        self.token_reduction = None
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normed tokens (B, 1 + N, C); fewer tokens when a token-reduction method removes some."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        method = self.token_reduction
        if method is None:
            x = self.blocks(x)
        else:
            state = method.new_state(x, self.patch_embed.grid_size, len(self.blocks))
            for index, block in enumerate(self.blocks):
                state.index = index
                x = block(x, state=state)
            x = method.finish(x, state)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(x[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """Map a timm/DeiT state dict onto this model: resample ``pos_embed`` to this model's grid."""
        pos = state_dict.get('pos_embed')
        if pos is not None and pos.shape != self.pos_embed.shape:
            old_grid = int(math.sqrt(pos.shape[1] - self.num_prefix_tokens))
            state_dict['pos_embed'] = resample_abs_pos_embed(
                pos, new_size=self.patch_embed.grid_size, old_size=(old_grid, old_grid),
                num_prefix_tokens=self.num_prefix_tokens)
        return state_dict


def _deit(kwargs: dict, embed_dim: int, num_heads: int) -> VisionTransformer:
    arch = dict(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads)
    return VisionTransformer(**{**arch, **kwargs})


@register_model(VisionTransformer)
def deit_tiny(**kwargs):
    """DeiT-Ti/16: 192 wide, 3 heads, 5,717,416 params at 1000 classes."""
    return _deit(kwargs, 192, 3)


@register_model(VisionTransformer)
def deit_small(**kwargs):
    """DeiT-S/16: 384 wide, 6 heads, 22,050,664 params at 1000 classes."""
    return _deit(kwargs, 384, 6)


@register_model(VisionTransformer)
def deit_base(**kwargs):
    """DeiT-B/16: 768 wide, 12 heads, 86,567,656 params at 1000 classes."""
    return _deit(kwargs, 768, 12)
