"""The planner's memory terms against hand-computed cases (docs/cluster.md, "Plan a layout")."""

import pytest

from megatron_internvl.config import ModelConfig, build_dataclass
from megatron_internvl.config.loader import apply_overrides
from megatron_internvl.config.schema import Config
from megatron_internvl.planning.memory import (ACT_BYTES, FUSED_CE_CHUNK_BYTES, in_flight,
                                               llm_layer_activation_bytes, llm_layer_input_bytes,
                                               loss_bytes, static_bytes, vit_layer_activation_bytes)
from megatron_internvl.planning.params import (StageParams, llm_layer_params, stage_llm_layers,
                                               stage_params, total_params)

QWEN25_7B = {"hidden_size": 3584, "num_layers": 28, "num_heads": 28, "num_kv_heads": 4,
             "ffn_hidden_size": 18944}
INTERNLM3_8B = {"hidden_size": 4096, "num_layers": 48, "num_heads": 32, "num_kv_heads": 2,
                "ffn_hidden_size": 10240, "vocab_size": 128512, "qkv_bias": False}
VIT_6B = {"hidden_size": 3200, "num_layers": 45, "num_heads": 25, "ffn_hidden_size": 12800,
          "norm": "rmsnorm", "qkv_bias": False, "qk_norm": True}


def model(language=None, vision=None, **extra):
    return build_dataclass(ModelConfig, {"language": language or {}, "vision": vision or {}, **extra})


def test_qwen25_7b_layer_by_hand():
    # q/k/v rows (28 + 2*4) * 128 = 4608: weight 4608*3584 + bias 4608; proj 3584^2;
    # SwiGLU fc1 2*18944*3584, fc2 3584*18944; two norms 2*3584.
    lang = model(QWEN25_7B).language
    assert llm_layer_params(lang, 1) == 16_515_072 + 4_608 + 12_845_056 + 135_790_592 + 67_895_296 + 7_168
    # TP=4: the split matrices and the QKV bias by 4, the norms whole.
    assert llm_layer_params(lang, 4) == (16_515_072 + 4_608 + 12_845_056 + 135_790_592 + 67_895_296) // 4 + 7_168


@pytest.mark.parametrize("language,vision,card", [
    # InternVL3 model card: total / ViT / MLP / LLM parameters (millions, two decimals).
    ({}, {}, (938.19, 304.01, 4.48, 629.70)),  # 1B: the schema defaults (Qwen2.5-0.5B)
    (dict(QWEN25_7B), {}, (7940, 304.01, 27.54, 7610)),  # 8B (card: 7.94B / 7.61B)
    (dict(INTERNLM3_8B), {}, (9140, 304.01, 33.57, 8800)),  # 9B (card: 9.14B / 8.80B)
    ({"hidden_size": 8192, "num_layers": 80, "num_heads": 64, "num_kv_heads": 8,
      "ffn_hidden_size": 29568}, VIT_6B, (78410, 5540, 172.01, 72700)),  # 78B
])
def test_parameter_counts_match_the_model_card(language, vision, card):
    m = model(language, vision)
    total, vit, mlp, llm = card
    stages = stage_params(m, build_dataclass(Config, {}).parallel, build_dataclass(Config, {}).training)
    parts = stages[0].by_component
    got_vit = sum(parts["vision"]) / 1e6
    got_mlp = sum(parts["projector"]) / 1e6
    assert got_vit == pytest.approx(vit, abs=0.006 if vit < 1000 else 5)
    assert got_mlp == pytest.approx(mlp, abs=0.006)
    got_llm = (total_params(m) - sum(parts["vision"]) - sum(parts["projector"])) / 1e6
    assert got_llm == pytest.approx(llm, abs=0.006 if llm < 1000 else 5)
    assert total_params(m) / 1e6 == pytest.approx(total, abs=0.006 if total < 1000 else 5)


def test_static_terms_by_hand():
    params = StageParams(stage=0, llm_layers=1, trainable=1000, frozen=500, by_component={})
    # bf16, distributed optimizer over DP x CP = 4: weights 2 B x 1500, fp32 gradients of the
    # trainable 1000, Adam m + v + fp32 master = 12 B x 1000 / 4.
    assert static_bytes(params, "bf16", True, 4) == (3000, 4000, 3000)
    # fp32 weights are their own master copy; without the distributed optimizer nothing is sharded.
    assert static_bytes(params, "fp32", False, 4) == (6000, 4000, 8000)


def test_llm_activations_by_hand():
    lang = model(QWEN25_7B).language
    # TP=4 with sequence parallelism, 16384 tokens. Per token: 4 * 3584 / 4 = 3584 elements
    # outside the TP region; q (3584) + k, v (2 * 512) + attention output (3584) + SwiGLU in
    # (2 * 18944) and out (18944) = 65024 / 4 = 16256 inside; 2 bytes each.
    assert llm_layer_activation_bytes(lang, 16384, 4, True) == 16384 * (3584 + 16256) * 2
    # Without SP the 4h outside the TP region is held whole on every rank.
    assert llm_layer_activation_bytes(lang, 16384, 4, False) == 16384 * (4 * 3584 + 16256) * 2
    # Full recomputation keeps the layer input only.
    assert llm_layer_input_bytes(lang, 16384, 4, True) == 16384 * 3584 / 4 * 2


def test_vit_activations_by_hand():
    vis = model(vision=VIT_6B).vision
    # 1025 tokens per tile; TP=8 pads 25 heads to 32: hp = 32 * 128 = 4096 channels. Per token:
    # 6 * 3200 replicated + (4 * 4096 + 2 * 12800) / 8 = 5248 split, 2 bytes each; QK-norm keeps
    # fp32 input and bf16 output of q and k: 2 * 6 * 4096 / 8 bytes.
    per_token = (6 * 3200 + 5248) * 2 + 2 * 6 * 4096 / 8
    assert vit_layer_activation_bytes(vis, 2, 8) == 2 * 1025 * per_token


def test_loss_terms_by_hand():
    parallel = build_dataclass(Config, {"parallel": {"tensor_parallel": 2}}).parallel
    m = model()  # Qwen2.5-0.5B head: 151674 -> 151808 rows at TP=2 (multiple of 256), 75904 per rank
    fused = m.language.hidden_size * 8192 * (2 + 4) + 75904 * 896 * 4 + FUSED_CE_CHUNK_BYTES
    assert loss_bytes(m, parallel, 8192) == fused
    m.fused_loss = False  # logits [8192, 75904] at 2 + 4 + 4 + 2 bytes
    assert loss_bytes(m, parallel, 8192) == 8192 * 75904 * 12


def test_micro_batches_in_flight_by_hand():
    # 1F1B: stage s of p holds p - s micro-batches (fewer if the step has fewer).
    assert in_flight(0, 4, 1, 8) == (4.0, 4) and in_flight(3, 4, 1, 8) == (1.0, 1)
    assert in_flight(0, 4, 1, 2) == (2.0, 2)
    # Interleaved, p=4, v=2, m=8, stage 0: 2 * 3 + 4 = 10 warm-up forwards + 1, each over half the
    # stage: 5.5 stage micro-batches; forwards run in groups of 4 per chunk (0-3 chunk 0, 4-7
    # chunk 1, 8-10 chunk 0): 7 of them are chunk 0, which holds the ViT.
    assert in_flight(0, 4, 2, 8) == (5.5, 7)
    assert in_flight(0, 1, 1, 8) == (1.0, 1)


def test_stage_layers_and_freezing():
    config = build_dataclass(Config, apply_overrides({}, [
        "parallel.pipeline_parallel=4", "parallel.first_stage_llm_layers=3", "training.stage=mlp_warmup"]))
    assert stage_llm_layers(config.parallel, 24) == [3, 7, 7, 7]
    stages = stage_params(config.model, config.parallel, config.training)
    # Only the projector trains in the MLP warm-up: it lives on the first stage.
    assert [s.trainable > 0 for s in stages] == [True, False, False, False]
    assert stages[0].trainable == sum(stages[0].by_component["projector"])
    assert ACT_BYTES == 2


def test_stage_flops_split_the_projects_count_and_step_time_by_hand():
    from megatron_internvl.planning import Hardware, make_plan
    from megatron_internvl.planning.layout import pack_shape, stage_flops
    from megatron_internvl.models.flops import step_flops
    from megatron_internvl.training.stages import stage_freeze_flags, trainable_components

    base = {"data": {"synthetic": {"sample_tokens": 2048, "tiles_per_sample": 6}},
            "training": {"global_batch_size": 8, "stage": "full"}}
    config = build_dataclass(Config, apply_overrides(base, [
        "parallel.pipeline_parallel=4", "parallel.first_stage_llm_layers=3"]))
    shapes = pack_shape(config)
    # 16384 tokens as 8 samples of 2048; 48 tiles (8 x 6 capped by the tile budget).
    assert shapes.sample_lengths == [2048] * 8 and shapes.tiles == 48
    trainable = trainable_components(stage_freeze_flags(config.training))
    assert sum(stage_flops(config, shapes)) == pytest.approx(step_flops(config.model, shapes, trainable), rel=1e-12)
    # One GPU, no pipeline, no TP, no DP: step time = packs x FLOPs per pack / (peak x MFU).
    single = build_dataclass(Config, base)
    hw = Hardware(peak_tflops=100.0, mfu=0.5)
    plan = make_plan(single, 1, 1, hw)
    per_pack = step_flops(single.model, pack_shape(single), trainable)
    assert plan.flops_per_step == 8 * per_pack
    assert plan.step_seconds == pytest.approx(8 * per_pack / 50e12, rel=1e-12)


def test_data_in_flight_by_hand():
    from megatron_internvl.planning.memory import data_bytes

    config = build_dataclass(Config, apply_overrides({}, [
        "data.max_tokens=16384", "data.max_tiles=48", "training.global_batch_size=8",
        "training.micro_batch_prefetch=1"]))
    # 8 micro-batches of 16384 tokens at 8 + 8 + 8 + 4 + 4 bytes each on every stage; on the first,
    # 2 packs of 48 uint8 tiles of 3 x 448 x 448 bytes (the one computed and one ahead) and one
    # pack of tiles normalised in float32.
    tokens, tile = 8 * 16384 * 32, 3 * 448 * 448
    assert data_bytes(config, 1, 8) == tokens
    assert data_bytes(config, 0, 8) == tokens + 2 * 48 * tile + 48 * tile * 4
    config.training.micro_batch_prefetch = 0
    assert data_bytes(config, 0, 8) == tokens + 48 * tile + 48 * tile * 4
    # MPO stages the whole step (its reference pass reads all of it); two more int64 per token
    config.training.stage = "mpo"
    assert data_bytes(config, 0, 8) == 8 * 16384 * 48 + 8 * 48 * tile + 48 * tile * 4
