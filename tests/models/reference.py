"""Independent float64 InternViT forward in plain torch, from canonical full tensors.

Written from the architecture description (docs/model.md, the InternVL facts), not from the
model code: pre-norm layers with layer scale, one QK RMSNorm over all heads (6B), bidirectional
attention, exact GELU, no final norm. ``linear_qkv`` rows are megatron's per-head groups
[q_h; k_h; v_h].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _norm(x, sd, key, kind, eps):
    w = sd[key + "weight"].double()
    if kind == "layernorm":
        b = sd[key + "bias"].double()
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w


def vit_forward(sd: dict, vision, pixel_values: torch.Tensor, prefix: str = "vision_model.") -> torch.Tensor:
    """[T, 3, H, W] -> [T, 1 + gh*gw, C] in float64."""
    g = lambda k: sd[prefix + k].double()  # noqa: E731
    p = vision.patch_size
    x = F.conv2d(pixel_values.double(), g("embeddings.patch_embedding.weight"),
                 g("embeddings.patch_embedding.bias"), stride=p)
    t, c, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = g("embeddings.position_embedding")
    grid = vision.image_size // p
    if (gh, gw) != (grid, grid):
        patch = pos[:, 1:].reshape(1, grid, grid, c).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], patch.flatten(2).transpose(1, 2)], dim=1)
    x = torch.cat([g("embeddings.class_embedding").expand(t, 1, c), x], dim=1) + pos
    heads = vision.num_heads
    d = c // heads
    eps = vision.norm_eps
    for i in range(vision.num_layers):
        L = f"{prefix}decoder.layers.{i}."
        h = _norm(x, sd, L + "self_attention.linear_qkv.layer_norm_", vision.norm, eps)
        qkv = h @ sd[L + "self_attention.linear_qkv.weight"].double().T
        if vision.qkv_bias:
            qkv = qkv + sd[L + "self_attention.linear_qkv.bias"].double()
        qkv = qkv.reshape(t, -1, heads, 3, d)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [T, S, heads, d]
        if vision.qk_norm:
            def rms(y, key):
                flat = y.reshape(t, -1, heads * d)
                flat = flat / torch.sqrt((flat**2).mean(-1, keepdim=True) + eps)
                return (flat * sd[L + key].double()).reshape(y.shape)

            q = rms(q, "self_attention.q_layernorm.weight")
            k = rms(k, "self_attention.k_layernorm.weight")
        scores = torch.einsum("tqhd,tkhd->thqk", q, k) / d**0.5
        attn = torch.einsum("thqk,tkhd->tqhd", scores.softmax(-1), v).reshape(t, -1, heads * d)
        out = attn @ sd[L + "self_attention.linear_proj.weight"].double().T
        out = out + sd[L + "self_attention.linear_proj.bias"].double()
        x = x + out * sd[L + "ls1"].double()
        h = _norm(x, sd, L + "mlp.linear_fc1.layer_norm_", vision.norm, eps)
        h = F.gelu(h @ sd[L + "mlp.linear_fc1.weight"].double().T + sd[L + "mlp.linear_fc1.bias"].double())
        h = h @ sd[L + "mlp.linear_fc2.weight"].double().T + sd[L + "mlp.linear_fc2.bias"].double()
        x = x + h * sd[L + "ls2"].double()
    return x
