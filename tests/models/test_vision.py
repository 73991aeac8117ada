"""InternViT against an independent float64 forward; drop-path; activation recomputation."""

import pytest
import torch

from megatron_internvl.config import VisionConfig
from models.reference import vit_forward


@pytest.mark.parametrize("variant", ["vit300m", "vit6b"])
def test_vit_matches_float64_reference(single, variant):
    r = single[variant]
    vision = VisionConfig(**r["vision"])
    ref = vit_forward(r["sd"], vision, r["pix"])
    assert r["out"].shape == ref.shape == (2, 17, vision.hidden_size)
    torch.testing.assert_close(r["out"].double(), ref, rtol=1e-5, atol=1e-5)
    # Other input sizes: the 4x4 position grid is interpolated bicubically (84x56 -> 6x4).
    ref_other = vit_forward(r["sd"], vision, r["pix_other"])
    assert r["out_other"].shape == ref_other.shape == (1, 25, vision.hidden_size)
    torch.testing.assert_close(r["out_other"].double(), ref_other, rtol=1e-5, atol=1e-5)


def test_vit_canonical_names(single):
    sd = single["vit6b"]["sd"]
    v = single["vit6b"]["vision"]
    hd = v["hidden_size"] // v["num_heads"]
    assert sd["vision_model.decoder.layers.1.self_attention.linear_qkv.weight"].shape == (3 * v["num_heads"] * hd, v["hidden_size"])
    assert "vision_model.decoder.layers.1.self_attention.linear_qkv.bias" not in sd  # 6B: no qkv bias
    assert sd["vision_model.decoder.layers.0.self_attention.q_layernorm.weight"].shape == (v["hidden_size"],)
    assert sd["vision_model.embeddings.position_embedding"].shape == (1, 17, v["hidden_size"])
    assert "vision_model.decoder.final_layernorm.weight" not in sd  # no final norm
    sd300 = single["vit300m"]["sd"]
    assert "vision_model.decoder.layers.0.self_attention.linear_qkv.bias" in sd300
    assert "vision_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_bias" in sd300
    assert not any("q_layernorm" in k for k in sd300)


def test_drop_path_only_in_training(single):
    # rate 0.5 at the last layer: training drops branches, eval equals the model without drop-path
    assert (single["drop_path_train_out"] - single["drop_path_eval_out"]).abs().max() > 1e-2
    assert torch.equal(single["drop_path_eval_out"], single["no_drop_path_eval_out"])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_same_gradients(single, mode):
    grads = single["recompute_grads"]
    assert grads[mode].keys() == grads["none"].keys()
    assert any(g.abs().max() > 0 for k, g in grads["none"].items() if k.startswith("vision_model."))
    for name, ref in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], ref, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
