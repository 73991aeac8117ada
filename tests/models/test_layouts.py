"""Parallel layouts equal one process: TP=2 x PP=2 (SP, ViT on stage 0 with one LLM layer),
TP=4 ViT (5 heads padded to 8, one rank of dummies only), DP=4 with overlapped gradient
reduction and text-only ranks, PP=2 with no LLM layer on the first stage; a TP=2 x PP=2
distributed checkpoint loads at TP=1."""

import torch


def test_tp2_pp2_logits_equal_single_process(single, multi):
    # ranks 0,1: stage 0 (ViT + 1 LLM layer); ranks 2,3: stage 1 (3 LLM layers)
    assert [r["first_stage"] for r in multi] == [True, True, False, False]
    assert [r["llm_layers_here"] for r in multi] == [1, 1, 3, 3]
    assert [r["num_image_token"] for r in multi] == [4, 4, 4, 4]  # also without the ViT
    for rank in (2, 3):
        assert len(multi[rank]["logits"]) == 2
        for got, ref in zip(multi[rank]["logits"], single["ref_logits"]):
            assert got.shape == ref.shape and got.shape[-1] == 203
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


def test_tp2_pp2_gradients_equal_single_process(single, multi):
    grads = multi[0]["grads"]
    assert grads.keys() == single["ref_grads"].keys()
    for name, ref in single["ref_grads"].items():
        assert grads[name].shape == ref.shape, name  # canonical shapes: no padding
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_canonical_shapes_are_unpadded(multi):
    shapes = multi[0]["shapes"]
    assert shapes["language_model.embedding.word_embeddings.weight"] == (203, 64)
    assert shapes["vision_model.decoder.layers.0.self_attention.linear_qkv.weight"] == (120, 40)
    assert shapes["vision_model.decoder.layers.0.self_attention.linear_proj.weight"] == (40, 40)
    assert shapes["vision_model.decoder.layers.1.self_attention.q_layernorm.weight"] == (40,)
    assert multi[2]["shapes"]["language_model.output_layer.weight"] == (203, 64)


def test_dummy_heads_stay_zero(multi):
    # TP=2: rank 1 holds 2 real heads + 1 dummy (in both ViT layers)
    worst, count = multi[1]["dummy_after_step"]
    assert count > 0 and worst == 0.0
    assert multi[1]["dummy_grad"] == (0.0, count)
    assert multi[0]["dummy_after_step"] == (0.0, 0)
    # TP=4: 5 heads -> 8: rank 2 has 1 real + 1 dummy, rank 3 only dummies
    assert [r["vit_tp4_real_heads"] for r in multi] == [2, 2, 1, 0]
    for r in multi:
        worst, count = r["vit_tp4_dummy_after_step"]
        assert worst == 0.0 and r["vit_tp4_dummy_grad"] == (0.0, count)
        assert r["vit_tp4_real_changed"]
    assert multi[3]["vit_tp4_dummy_after_step"][1] == 2 * multi[2]["vit_tp4_dummy_after_step"][1] > 0


def test_tp4_vit_equals_tp1(single, multi):
    torch.testing.assert_close(multi[0]["vit_tp4_out"], single["vit6b"]["out"], rtol=1e-5, atol=1e-5)
    ref_sd = single["vit6b"]["sd"]
    for name, t in multi[0]["vit_tp4_sd"].items():
        assert torch.equal(t, ref_sd["vision_model." + name]), name


def test_text_only_ranks_with_overlapped_grad_reduce(single, multi):
    # DP=4, overlap_grad_reduce with small buckets; ranks 0 and 2 had text-only micro-batches
    ref = single["ref_mixed_grads"]
    for r in multi:
        assert r["mixed_grads"].keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(r["mixed_grads"][name], g, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name}: {m}")
    assert any(g.abs().max() > 0 for k, g in ref.items() if k.startswith("vision_model."))


def test_checkpoint_reshards_from_tp2_pp2_to_tp1_and_tp4(multi):
    # the vision tower of the same checkpoint read at TP=4 (a rank with only dummy heads)
    saved = multi[0]["params_after_step"]
    for r in multi:
        assert r["vit_tp4_dummy_after_load"][0] == 0.0
        for name, t in r["vit_tp4_loaded"].items():
            assert torch.equal(t, saved["vision_model." + name]), name
    for r in multi:
        assert "All keys matched" in r["load_report"]
        assert r["params_loaded"].keys() == r["params_after_step"].keys()
        for name, t in r["params_after_step"].items():
            assert torch.equal(r["params_loaded"][name], t), name


def test_first_stage_without_llm_layers(single, multi):
    # PP=2 x DP=2, parallel.first_stage_llm_layers=0: stage 0 = ViT + projector + embedding
    assert [r["first0_llm_layers_here"] for r in multi] == [0, 0, 4, 4]
    for rank, ref in ((2, single["ref_logits"][0]), (3, single["ref_logits"][1])):
        torch.testing.assert_close(multi[rank]["first0_logits"][0], ref, rtol=1e-5, atol=2e-5)
    for name, ref in single["ref_grads"].items():
        torch.testing.assert_close(multi[0]["first0_grads"][name], ref, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_split_vit_qk_norms_beside_qwen3_qk_norms_equal_single_process(single, multi):
    # The ViT-6B's QK norms are TP-split, the Qwen3 LLM's replicated: only the latter are TP-summed.
    ref = single["ref_qwen3_grads"]
    names = [n for n in ref if "q_layernorm" in n or "k_layernorm" in n]
    assert any(n.startswith("vision_model.") for n in names)
    assert any(n.startswith("language_model.") for n in names)
    for rank in range(4):
        grads = multi[rank]["qwen3_grads"]
        assert grads.keys() == ref.keys()
        for name, want in ref.items():
            torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
