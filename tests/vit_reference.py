"""A plain ViT written out step by step from a ``models.vit.VisionTransformer``'s weights, for token-reduction tests.

Everything is explicit (conv patch embedding, LayerNorm, q·kᵀ, softmax, MLP), so a test can interleave a method's
steps between these pieces and compare with the model's own (fused, batched) forward.
"""
import torch
import torch.nn.functional as F

from models.vit import VisionTransformer


def tiny_vit(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, seed=0) -> VisionTransformer:
    """A small ViT whose weights are large enough that attention and keys differ clearly between tokens (DeiT's
    init leaves attention almost uniform, so every token would score alike)."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, num_classes=10)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'norm' in name and name.endswith('weight'):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


def seeded_vit(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, seed=0, qkv_gain=1.0,
               std=None, qkv_std=None) -> VisionTransformer:
    """A small ViT in eval mode (10 classes) built after ``torch.manual_seed(seed)``: DeiT's init with the qkv weights
    times ``qkv_gain`` (queries and keys spread apart), or with ``std`` every parameter redrawn from N(0, std) and the
    qkv ones from N(0, qkv_std) (concentrated attention)."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, num_classes=10).eval()
    with torch.no_grad():
        if std is not None:
            for name, param in model.named_parameters():
                param.normal_(0, qkv_std if 'qkv' in name else std)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(qkv_gain)
    return model


def embed(model, images):
    """Patch embedding, class token, position embedding: (B, 3, H, W) -> (B, 1 + HW/p², C)."""
    proj = model.patch_embed.proj
    patches = F.conv2d(images, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
    cls = model.cls_token.expand(images.shape[0], -1, -1)
    return torch.cat([cls, patches], dim=1) + model.pos_embed


def layer_norm(norm, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def split_heads(attn, x):
    """q, k, v of ``attn`` for tokens ``x`` (B, N, C): each (B, heads, N, head_dim)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(attn, out):
    """(B, heads, N, head_dim) -> the output projection of the concatenated heads (B, N, C)."""
    B, _, N, _ = out.shape
    return attn.proj(out.transpose(1, 2).reshape(B, N, -1))


def attention(block, x, key_bias=None):
    """The attention branch on the residual stream ``x`` (B, N, C), explicit softmax(q·kᵀ/√d + key_bias)·v.

    ``key_bias`` (B, N) is added to the logits of every query for that key. Returns (branch output (B, N, C),
    attention map (B, heads, N, N), keys (B, heads, N, head_dim))."""
    attn = block.attn
    B, N, C = x.shape
    y = layer_norm(block.norm1, x)
    qkv = y @ attn.qkv.weight.t() + attn.qkv.bias
    q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / attn.head_dim ** 0.5
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    attn_map = torch.exp(logits - logits.amax(-1, keepdim=True))
    attn_map = attn_map / attn_map.sum(-1, keepdim=True)
    heads = attn_map @ v
    out = heads.transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.t() + attn.proj.bias
    return out, attn_map, k


def mlp(block, x):
    y = layer_norm(block.norm2, x)
    hidden = F.gelu(y @ block.mlp.fc1.weight.t() + block.mlp.fc1.bias)
    return hidden @ block.mlp.fc2.weight.t() + block.mlp.fc2.bias


def head(model, x):
    """Final norm and class-token head: (B, N, C) -> logits."""
    x = layer_norm(model.norm, x)
    return x[:, 0] @ model.head.weight.t() + model.head.bias


def plain_forward(model, images):
    x = embed(model, images)
    for block in model.blocks:
        x = x + attention(block, x)[0]
        x = x + mlp(block, x)
    return head(model, x)


def expedit_gmacs(pairs, embed_dim, num_heads, patch_size, img_size, extra=0, num_classes=1000):
    """Expedit-SWAG's "GFLOPs" of a SWAG ViT in closed form (what its tools/flop_count.py counts) from the (attention
    tokens, MLP tokens) of each block: MACs with a linear's bias as one more input, plus LayerNorm 4, softmax 5, GELU,
    adds, scaling and dropout per element; ``extra`` adds a method's own counted ops."""
    D, h = embed_dim, num_heads
    total = 0
    for n, n_mlp in pairs:
        total += 3 * n * D * (D + 1) + n * D * (D + 1) + 2 * n * n * D + 5 * h * n * n + 7 * n * D
        total += n_mlp * 4 * D * (D + 1) + n_mlp * D * (4 * D + 1) + 14 * n_mlp * D
    total += img_size * img_size * D * 3 + 2 * pairs[0][0] * D + 4 * pairs[-1][1] * D + num_classes * (D + 1)
    return (total + extra) / 1e9


def meta_vit(img_size, patch_size, embed_dim, depth, num_heads=16) -> VisionTransformer:
    """A ViT of the SWAG L/16 or H/14 geometry on the meta device (no weights allocated): for token schedules."""
    with torch.device('meta'):
        return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads)


def pairs(schedule) -> list:
    """(attention tokens, MLP tokens) of each block of a ``token_schedule``."""
    return [(block['attention'], block['mlp']) for block in schedule['blocks']]
