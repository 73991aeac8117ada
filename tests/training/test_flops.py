"""FLOPs / MFU accounting against hand-computed values (docs/training.md conventions)."""

import pytest

from megatron_internvl.config import ModelConfig, build_dataclass
from megatron_internvl.models.flops import StepShapes, step_flops

MODEL = build_dataclass(ModelConfig, {
    "vision": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 64,
               "image_size": 56, "patch_size": 14},
    "language": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                 "ffn_hidden_size": 128, "vocab_size": 512},
})
SHAPES = StepShapes(sample_lengths=[10, 6], tiles=3)

# LLM forward, by hand: per token per layer 2*(64*(64+2*32) + 64*64) + 2*3*64*128 = 73728;
# causal attention 2*64*(10^2 + 6^2) = 17408 per layer; logits 2*16*64*512 = 1048576.
LLM = 2 * (16 * 73728 + 17408) + 1048576  # 3442688
# ViT forward per 56-px tile: 17 tokens (16 patches + class); per layer
# 2*17*4*32^2 + 2*17*2*32*64 + 4*17^2*32 = 315520; patch conv 2*16*(3*14*14)*32 = 602112.
VIT = 3 * (2 * 315520 + 602112)  # 3699456
# Projector: 12 image tokens, 128 -> 64 -> 64.
PROJ = 2 * 12 * (128 * 64 + 64 * 64)  # 294912


def test_full_training_counts_everything_three_times():
    flops = step_flops(MODEL, SHAPES, {"vision": True, "projector": True, "language": True})
    assert flops == 3 * (VIT + PROJ + LLM) == 22311168


def test_mlp_warmup_multipliers():
    # frozen ViT: forward only; projector trained: x3; frozen LLM under it: forward + data grads.
    flops = step_flops(MODEL, SHAPES, {"vision": False, "projector": True, "language": False})
    assert flops == VIT + 3 * PROJ + 2 * LLM


def test_padding_is_not_counted_and_packing_is_not_one_long_sequence():
    packed = step_flops(MODEL, StepShapes([10, 6], 0), {"vision": True, "projector": True, "language": True})
    one_long = step_flops(MODEL, StepShapes([16], 0), {"vision": True, "projector": True, "language": True})
    assert one_long - packed == pytest.approx(3 * 2 * 2 * 64 * (16**2 - 136))


def test_moe_counts_the_router_and_the_active_experts_and_the_balancer_follows():
    from megatron_internvl.data.balance import CostModel

    moe = build_dataclass(ModelConfig, {
        "vision": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 64,
                   "image_size": 56, "patch_size": 14},
        "language": {"arch": "qwen3_moe", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                     "num_kv_heads": 2, "qk_norm": True, "qkv_bias": False, "ffn_hidden_size": 128,
                     "vocab_size": 512, "num_experts": 16, "moe_top_k": 2, "moe_ffn_hidden_size": 32},
    })
    train = {"vision": True, "projector": True, "language": True}
    # per token per layer: attention projections as the dense model, then a router 2*64*16 and
    # 2 of 16 experts of width 32: 2 * 2*3*64*32 (instead of the dense 2*3*64*128)
    per_token_layer = 2 * (64 * (64 + 2 * 32) + 64 * 64) + 2 * 64 * 16 + 2 * 2 * 3 * 64 * 32
    llm = 2 * (16 * per_token_layer + 17408) + 1048576
    assert step_flops(moe, SHAPES, train) == 3 * (VIT + PROJ + llm)
    # the balanced-batch cost model is read off the same counter: a token costs the active experts
    cost = CostModel.for_model(moe, train)
    assert cost.per_token == pytest.approx(3 * (2 * per_token_layer + 2 * 64 * 512))
    assert cost.per_token < CostModel.for_model(MODEL, train).per_token
