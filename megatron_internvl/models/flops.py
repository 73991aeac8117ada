"""Model FLOPs of a training step, counted from the real packed lengths.

Conventions (documented in docs/training.md):
- a multiply-add is 2 FLOPs; only matmuls are counted (norms, activations, softmax are not);
- attention scores and the value product count ``4 * L^2 * h`` per layer for a bidirectional
  sequence of length L, half of that for a causal one (the lower triangle a flash kernel computes),
  summed over the samples of a pack: padding is never counted, and packed samples do not attend
  to each other;
- backward costs twice the forward for a component whose weights train (data + weight gradients),
  once for a frozen component that gradients must still flow through, zero for a frozen component
  with nothing trainable before it. So: ViT x3 trained, x1 frozen; a frozen LLM under a trained
  projector x2.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepShapes:
    """What one rank processed in one step: per-sample LLM lengths and the number of tiles."""

    sample_lengths: list
    tiles: int


def llm_forward_flops(lang, sample_lengths) -> float:
    h, layers = lang.hidden_size, lang.num_layers
    q = lang.num_heads * lang.kv_channels  # the query width (Qwen3: not the hidden size)
    kv = lang.num_kv_heads * lang.kv_channels
    tokens = float(sum(sample_lengths))
    if getattr(lang, "num_experts", 0):
        # MoE: the router, then only the top-k experts each token is sent to (MFU of an MoE is
        # over its active parameters).
        mlp = 2 * h * lang.num_experts + lang.moe_top_k * 2 * 3 * h * lang.moe_ffn_hidden_size
    else:
        mlp = 2 * 3 * h * lang.ffn_hidden_size
    per_token_layer = 2 * (h * (q + 2 * kv) + q * h) + mlp
    attention = sum(2.0 * q * L * L for L in sample_lengths)  # causal: half of 4*L^2*q
    logits = 2 * tokens * h * lang.vocab_size
    return layers * (tokens * per_token_layer + attention) + logits


def vit_forward_flops(vis, tiles: int) -> float:
    grid = vis.image_size // vis.patch_size
    n = 1 + grid * grid
    h = vis.hidden_size
    per_layer = 2 * n * 4 * h * h + 2 * n * 2 * h * vis.ffn_hidden_size + 4.0 * n * n * h
    patch = 2 * grid * grid * 3 * vis.patch_size**2 * h
    return tiles * (vis.num_layers * per_layer + patch)


def projector_forward_flops(model, tiles: int) -> float:
    scale = round(1 / model.downsample_ratio)
    d_in = model.vision.hidden_size * scale * scale
    h = model.language.hidden_size
    tokens = tiles * model.num_image_token
    return 2.0 * tokens * (d_in * h + h * h)


def component_flops(model, shapes: StepShapes, trainable: dict) -> dict:
    """Training FLOPs of one step per component (vision, projector, language). The ViT and the
    projector count each tile once: a preference pair's two responses share its tiles."""
    vit_mult = 3 if trainable["vision"] else 1
    proj_mult = 3 if trainable["projector"] else (2 if trainable["vision"] else 1)
    upstream = trainable["vision"] or trainable["projector"]
    llm_mult = 3 if trainable["language"] else (2 if upstream else 1)
    return {
        "vision": vit_mult * vit_forward_flops(model.vision, shapes.tiles),
        "projector": proj_mult * projector_forward_flops(model, shapes.tiles),
        "language": llm_mult * llm_forward_flops(model.language, shapes.sample_lengths),
    }


def step_flops(model, shapes: StepShapes, trainable: dict) -> float:
    """Training FLOPs of one step (forward + backward) for the given shapes."""
    parts = component_flops(model, shapes, trainable)
    return parts["vision"] + parts["projector"] + parts["language"]


# Dense BF16 tensor-core peaks (TFLOP/s) per device, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "B200": 2250.0}


def device_peak_tflops(override: float | None = None) -> float | None:
    if override:
        return float(override)
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None
