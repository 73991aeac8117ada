"""The InternVL3.5 recipes: released hyper-parameters, and megatron-core accepts their configs."""

from pathlib import Path

import pytest

from megatron_internvl.config import load_config

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes" / "internvl3_5"
SIZES = ("1b", "2b", "4b", "8b", "14b", "38b", "30b_a3b", "241b_a28b")
DROP_PATH = {"1b": 0.0, "2b": 0.0, "4b": 0.0, "8b": 0.1, "14b": 0.1, "30b_a3b": 0.1, "38b": 0.4, "241b_a28b": 0.4}


@pytest.mark.parametrize("size", SIZES)
def test_released_settings_and_transformer_config(size):
    from megatron_internvl.models.factory import language_transformer_config, vision_transformer_config

    sft, mpo = load_config(RECIPES / size / "sft.yaml"), load_config(RECIPES / size / "mpo.yaml")
    lang = sft.model.language
    assert lang.arch == ("qwen3_moe" if "_a" in size else "qwen3")
    assert (lang.head_dim, lang.qk_norm, lang.qkv_bias, lang.vocab_size) == (128, True, False, 151936)
    assert sft.model.image_token_id == 151671 and sft.data.max_tokens == 32768
    assert sft.optimizer.lr == (2e-5 if size == "241b_a28b" else 8e-5)
    assert sft.training.global_batch_size == 512 and sft.model.vision.drop_path_rate == DROP_PATH[size]
    assert (mpo.training.stage, mpo.optimizer.lr, mpo.training.global_batch_size) == ("mpo", 2e-7, 256)
    assert list(mpo.mpo.weights) == [0.8, 0.2, 1.0]
    for cfg in (sft, mpo):
        cfg.parallel.validate(cfg.model)
        tc = language_transformer_config(cfg.model, cfg.parallel, "bf16", initialize=False)
        assert tc.kv_channels == 128 and tc.qk_layernorm
        if lang.num_experts:
            assert (tc.num_moe_experts, tc.moe_router_topk) == (128, 8)
            assert tc.expert_model_parallel_size == cfg.parallel.expert_parallel > 1
        vision_transformer_config(cfg.model, cfg.parallel, "bf16", initialize=False)
