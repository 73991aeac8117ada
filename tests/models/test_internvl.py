"""InternVLModel on one rank: splicing, packing, V2PE, text-only micro-batches, vocab padding,
freezing."""

import torch

from models.workers import IMG, VOCAB


def test_num_image_token_matches_config(single):
    assert single["num_image_token"] == (4, 4)


def test_image_features_overwrite_img_context_embeddings_in_order(single):
    s = single["splice"]
    ids, spliced, plain, feats = s["ids"], s["spliced"], s["plain"], s["features"]
    is_img = ids == IMG
    # sample 0 has 1 tile, sample 1 has 2 tiles: features are taken sample-major, token order
    got = spliced.transpose(0, 1)[is_img]
    assert got.shape == feats.shape == (12, spliced.shape[-1])
    assert torch.equal(got, feats)
    assert torch.equal(spliced.transpose(0, 1)[~is_img], plain.transpose(0, 1)[~is_img])
    assert not torch.equal(feats[:4], feats[4:8])


def test_image_token_count_mismatch_names_both_counts(single):
    msg = single["mismatch_error"]
    assert msg is not None
    assert "11 <IMG_CONTEXT> tokens" in msg and "1 tiles x 4" in msg and "= 4 image features" in msg


def test_packed_samples_equal_samples_alone(single):
    cu = single["packed_cu"].tolist()
    logits = single["packed_logits"]
    assert len(single["alone_logits"]) == 2 and cu[-1] > cu[-2]  # a trailing padding segment
    for (start, end), alone in zip(zip(cu[:-1], cu[1:]), single["alone_logits"]):
        assert alone.shape[0] == end - start
        torch.testing.assert_close(logits[start:end], alone, rtol=1e-5, atol=2e-5)


def test_v2pe_delta_one_is_bitwise_integer_positions(single):
    v = single["v2pe"]
    assert torch.equal(v["pos1"], torch.arange(v["pos1"].shape[1], dtype=torch.float32)[None])
    assert torch.equal(v["d1"], v["int"])
    # fractional visual positions do reach the attention
    assert (v["d4"] - v["int"]).abs().max() > 1e-4
    assert v["pos4"].max() < v["pos1"].max()


def test_vocab_padding_is_minus_inf_and_hidden(single):
    assert single["padded_vocab"] == (VOCAB, 208)
    raw = single["raw_logits"]
    assert raw.shape[-1] == 208
    assert torch.isinf(raw[..., VOCAB:]).all() and (raw[..., VOCAB:] < 0).all()
    assert torch.isfinite(raw[..., :VOCAB]).all()
    assert single["packed_logits"].shape[-1] == VOCAB


def test_text_only_microbatch(single):
    t = single["text_only_train"]
    # training: one blank tile through the ViT so every trainable parameter gets a zero gradient
    assert t["vit_calls"] == 1
    assert t["missing_grads"] == 0
    assert t["max_abs_grad"] == 0.0
    assert t["llm_grad"] > 0
    # eval: the ViT does not run
    assert single["text_only_eval_vit_calls"] == 0


def test_freeze_mlp_warmup(single):
    r = single["mlp_warmup"]
    for name, changed in r["changed"].items():
        trainable = name.startswith("projector.")
        assert r["requires_grad"][name] == trainable, name
        assert r["has_main_grad"][name] == trainable, name  # no DDP buffer for frozen params
        assert changed == trainable, name
    assert r["buffer_numel"] == r["trainable_numel"]


def test_freeze_vit_last_layers(single):
    r = single["vit_last1"]
    for name, changed in r["changed"].items():
        trainable = name.startswith(("projector.", "vision_model.decoder.layers.1."))
        assert r["requires_grad"][name] == trainable, name
        assert changed == trainable, name
    assert r["buffer_numel"] == r["trainable_numel"]
