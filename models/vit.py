"""Plain ViT with a class token: DeiT-Ti/S/B (Touvron et al. 2021), SWAG ViT-L/16 and ViT-H/14 (Singh et al. 2022).

Parameter names equal timm's ``VisionTransformer``, so timm/DeiT checkpoints load as they are; SWAG and torchvision
ViT state dicts are renamed by :func:`swag_to_timm`. Position embeddings are resampled (bicubic, class token kept)
when the checkpoint was trained at another resolution.
"""
import re

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_

from .convert import CheckpointError
from .layers import Block, PatchEmbed, init_vit_weights, square_grid_side
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
        """Map a timm/DeiT, SWAG or torchvision ViT state dict onto this model; resample ``pos_embed`` to this
        model's grid (timm's ``resample_abs_pos_embed``: bicubic, antialiased, class token kept)."""
        state_dict = swag_to_timm(state_dict)
        pos = state_dict.get('pos_embed')
        if pos is not None and pos.shape != self.pos_embed.shape and pos.ndim == 3 and pos.shape[0] == 1 \
                and pos.shape[2] == self.embed_dim:
            old_patches = pos.shape[1] - self.num_prefix_tokens
            old_grid = square_grid_side(old_patches)
            if old_grid is None:
                raise CheckpointError(f'position embedding of {pos.shape[1]} tokens is not a class token plus a '
                                      f'square patch grid; cannot resize it to {self.patch_embed.grid_size}')
            state_dict['pos_embed'] = resample_abs_pos_embed(
                pos, new_size=self.patch_embed.grid_size, old_size=(old_grid, old_grid),
                num_prefix_tokens=self.num_prefix_tokens)
        return state_dict


# SWAG (facebookresearch/SWAG) and torchvision ``VisionTransformer`` names -> ours (timm's). Top-level prefixes:
_SWAG_TOP_LEVEL = (
    ('class_token', 'cls_token'),
    ('conv_proj.', 'patch_embed.proj.'),
    ('encoder.pos_embedding', 'pos_embed'),
    ('encoder.ln.', 'norm.'),
    ('head.layers.head.', 'head.'),  # SWAG's VisionTransformerHead
    ('heads.head.', 'head.'),  # torchvision
)
# inside an encoder layer (``encoder.layers.layer_{i}.`` in SWAG, ``encoder.layers.encoder_layer_{i}.`` in torchvision)
_SWAG_IN_LAYER = (
    ('ln_1.', 'norm1.'),
    ('self_attention.in_proj_weight', 'attn.qkv.weight'),  # packed q, k, v as timm's qkv
    ('self_attention.in_proj_bias', 'attn.qkv.bias'),
    ('self_attention.out_proj.', 'attn.proj.'),
    ('ln_2.', 'norm2.'),
    ('mlp.linear_1.', 'mlp.fc1.'),  # SWAG, and torchvision's legacy (version 1) MLPBlock
    ('mlp.linear_2.', 'mlp.fc2.'),
    ('mlp.0.', 'mlp.fc1.'),  # torchvision
    ('mlp.3.', 'mlp.fc2.'),
)
_SWAG_LAYER = re.compile(r'^encoder\.layers\.(?:encoder_)?layer_(\d+)\.(.+)$')
_PRE_LOGITS = ('heads.pre_logits.', 'head.layers.pre_logits.')


def _rename(key: str, table) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def swag_to_timm(state_dict: dict) -> dict:
    """Rename a SWAG or torchvision ViT state dict to timm's names; any other state dict is returned as it is.

    SWAG stores the position embedding sequence-first, ``[S, 1, D]``; it becomes ``[1, S, D]``. Keys this mapping does
    not know pass through unchanged (and are reported as unexpected by ``load_pretrained``)."""
    if not any(k == 'class_token' or k.startswith(('conv_proj.', 'encoder.layers.')) for k in state_dict):
        return state_dict
    pre_logits = [k for k in state_dict if k.startswith(_PRE_LOGITS)]
    if pre_logits:
        raise CheckpointError(f'checkpoint has a pre-logits layer ({pre_logits[0]}); these ViTs have a plain linear '
                              f'head (representation_size None)')
    out = {}
    for key, value in state_dict.items():
        layer = _SWAG_LAYER.match(key)
        if layer:
            key = f'blocks.{layer.group(1)}.' + _rename(layer.group(2), _SWAG_IN_LAYER)
        else:
            key = _rename(key, _SWAG_TOP_LEVEL)
        if key == 'pos_embed' and value.ndim == 3 and value.shape[1] == 1 and value.shape[0] > 1:
            value = value.permute(1, 0, 2)  # SWAG: [S, 1, D] -> [1, S, D]
        out[key] = value
    return out


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


def _swag(kwargs: dict, img_size: int, patch_size: int, embed_dim: int, depth: int) -> VisionTransformer:
    arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=16, mlp_ratio=4.)
    return VisionTransformer(**{**arch, **kwargs})


@register_model(VisionTransformer, input_size=512, crop_pct=1.0)
def swag_vit_l16(**kwargs):
    """SWAG ViT-L/16 at 512 px (32x32 patches + class token = 1025 tokens): 1024 wide, 24 blocks, 16 heads, MLP 4096,
    LayerNorm eps 1e-6, class-token head without pre-logits. 305,174,504 params at 1000 classes."""
    return _swag(kwargs, 512, 16, 1024, 24)


@register_model(VisionTransformer, input_size=518, crop_pct=1.0)
def swag_vit_h14(**kwargs):
    """SWAG ViT-H/14 at 518 px (37x37 patches + class token = 1370 tokens): 1280 wide, 32 blocks, 16 heads, MLP 5120,
    LayerNorm eps 1e-6, class-token head without pre-logits. 633,470,440 params at 1000 classes."""
    return _swag(kwargs, 518, 14, 1280, 32)
