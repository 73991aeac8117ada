"""Exact token, label and position sequences for each template, on a real photo.

The expected sequences are written out by hand from the template definitions in
shared/reference/internvl-facts.md and tokenized piece by piece with the *raw* backend
(tokenizers / sentencepiece, no project code), positions are computed token by token in
float64.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from megatron_internvl.data.dataset import build_data_loader
from megatron_internvl.data.positions import V2PE_DELTAS
from megatron_internvl.data.templates import TEMPLATES
from megatron_internvl.data.tokenizer import load_tokenizer

from .helpers import train_bpe, train_sentencepiece, write_jsonl

PHOTO = os.path.join(os.path.dirname(__import__("matplotlib").__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
S = 28          # tile size for the test (the real model uses 448)
TOK_PER_TILE = 4
# grace_hopper.jpg is 512x600: with 12 tiles the closest grid is 3 cols x 4 rows (+ thumbnail).
PHOTO_TILES = 13
N_CTX = PHOTO_TILES * TOK_PER_TILE
SYS_25 = TEMPLATES["internvl2_5"].system_message
SYS_2 = TEMPLATES["internlm2-chat"].system_message


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(str(tmp_path_factory.mktemp("bpe") / "tokenizer.json"))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(str(tmp_path_factory.mktemp("spm") / "tok"))


def one_sample(tmp_path, tokenizer_path, record, *, kind="chat", **cfg_kw):
    """Run one annotation line through the real loader (real image decoding); return the pack."""
    from megatron_internvl.config.data import DataConfig, DatasetSpec

    ann = write_jsonl(str(tmp_path / "ann.jsonl"), [record])
    spec = DatasetSpec(name="d", annotation=ann, root=os.path.dirname(PHOTO), kind=kind, max_dynamic_patch=12)
    kw = dict(datasets=[spec], tokenizer_path=tokenizer_path, image_size=S, num_image_token=TOK_PER_TILE,
              max_tokens=4096, max_tiles=48, pad_to_multiple=1, num_workers=0, seed=3)
    kw.update(cfg_kw)
    loader = build_data_loader(DataConfig(**kw), stop_after=1)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["num_samples"] == 1
    return batches[0], loader.tokenizer


def hand_positions(ids, ctx_id, deltas):
    """Token-by-token V2PE in float64 (deltas=None: plain integers)."""
    out, p, prev_visual, k = [], -1.0, False, -1
    for t in ids:
        if deltas is not None and t == ctx_id:
            if not prev_visual:
                k += 1
            p = p + deltas[k]
            prev_visual = True
        else:
            if prev_visual:
                p = math.ceil(p)
            p = p + 1
            prev_visual = False
        out.append(p)
    return np.array(out, dtype=np.float64)


def shifted(labels):
    return labels[1:] + [-100]


PHOTO_RECORD = {
    "image": "grace_hopper.jpg",
    "conversations": [
        {"from": "human", "value": "Who is this?"},
        {"from": "gpt", "value": "Grace Hopper."},
        {"from": "human", "value": "What did she write?"},
        {"from": "gpt", "value": "A compiler."},
    ],
}


def _bpe_pieces(raw, tok):
    S_, E_ = raw.token_to_id("<|im_start|>"), raw.token_to_id("<|im_end|>")
    enc = lambda s: raw.encode(s, add_special_tokens=False).ids  # noqa: E731
    img = [tok.img_start_id] + [tok.img_context_id] * N_CTX + [tok.img_end_id]
    return S_, E_, enc, img


def test_special_tokens_added_after_vocab(bpe, spm_model):
    from tokenizers import Tokenizer as Raw

    raw = Raw.from_file(bpe)
    tok = load_tokenizer(bpe)
    V = raw.get_vocab_size(with_added_tokens=True)
    added = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
    assert [tok.token_id(t) for t in added] == list(range(V, V + len(added)))
    assert tok.token_id("<|im_start|>") == raw.token_to_id("<|im_start|>")   # present: kept
    assert tok.encode("a<box>b</box>") == (raw.encode("a", add_special_tokens=False).ids + [V + 7]
                                           + raw.encode("b", add_special_tokens=False).ids + [V + 8])
    assert tok.decode(tok.encode("<ref>fox</ref><IMG_CONTEXT>")) == "<ref>fox</ref><IMG_CONTEXT>"

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    stok = load_tokenizer(spm_model)
    n = sp.get_piece_size()
    assert [stok.token_id(t) for t in added] == list(range(n, n + len(added)))
    assert stok.token_id("<|im_end|>") == sp.piece_to_id("<|im_end|>")
    assert stok.vocab_size == n + len(added)


@pytest.mark.parametrize("v2pe", ["off", "fixed", "random"])
def test_internvl2_5_photo_exact(tmp_path, bpe, v2pe):
    from tokenizers import Tokenizer as Raw

    batch, tok = one_sample(tmp_path, bpe, PHOTO_RECORD, v2pe=v2pe, v2pe_delta=0.25)
    raw = Raw.from_file(bpe)
    S_, E_, enc, img = _bpe_pieces(raw, tok)
    # <image>\n is prepended to the first user turn: the sample has an image but no placeholder.
    parts = [  # (ids, supervised)
        ([S_] + enc("system\n" + SYS_25) + [E_] + enc("\n"), False),
        ([S_] + enc("user\n"), False), (img, False), (enc("\nWho is this?") + [E_] + enc("\n"), False),
        ([S_] + enc("assistant\n"), False), (enc("Grace Hopper.") + [E_], True), (enc("\n"), False),
        ([S_] + enc("user\nWhat did she write?") + [E_] + enc("\n"), False),
        ([S_] + enc("assistant\n"), False), (enc("A compiler.") + [E_], True), (enc("\n"), False),
    ]
    ids = [t for p, _ in parts for t in p]
    unshifted = [t if sup else -100 for p, sup in parts for t in p]
    text = (f"<|im_start|>system\n{SYS_25}<|im_end|>\n<|im_start|>user\n<img>{'<IMG_CONTEXT>' * N_CTX}</img>\n"
            "Who is this?<|im_end|>\n<|im_start|>assistant\nGrace Hopper.<|im_end|>\n<|im_start|>user\n"
            "What did she write?<|im_end|>\n<|im_start|>assistant\nA compiler.<|im_end|>\n")
    assert tok.decode(ids) == text
    # and it is what HF itself makes of the whole string with the image tokens added
    raw.add_special_tokens(["<img>", "</img>", "<IMG_CONTEXT>"])
    assert raw.encode(text, add_special_tokens=False).ids == ids

    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == shifted(unshifted)
    assert batch["cu_seqlens"].tolist() == [0, len(ids)]
    assert batch["pixel_values"].shape == (PHOTO_TILES, 3, S, S)
    assert batch["num_tiles"].tolist() == [PHOTO_TILES]

    pos = batch["position_ids"][0].double().numpy()
    assert batch["position_ids"].dtype == torch.float32
    if v2pe == "off":
        np.testing.assert_array_equal(pos, np.arange(len(ids)))
    else:
        s = ids.index(tok.img_context_id)
        delta = pos[s] - pos[s - 1]
        if v2pe == "fixed":
            assert delta == 0.25
        assert delta in V2PE_DELTAS
        np.testing.assert_array_equal(pos, hand_positions(ids, tok.img_context_id, [delta]))
        # <img> at p, last visual token at p + 52 * delta, </img> one past its ceiling
        e = s + N_CTX
        assert pos[e] == math.ceil(pos[s - 1] + N_CTX * delta) + 1


def test_v2pe_random_deltas_vary_per_image(tmp_path):
    """Random V2PE draws one delta per image from {1, 1/2, ..., 1/256} with the sample's rng."""
    from megatron_internvl.data.positions import image_deltas, position_ids

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        d = image_deltas("random", 3, rng, 0.25)
        assert len(d) == 3 and set(d) <= set(V2PE_DELTAS)
        seen.update(d)
    assert len(seen) >= 6
    # two images, two deltas, checked token by token in float64
    ids = [1, 2, 9, 5, 5, 5, 10, 3, 9, 5, 5, 10, 4]
    spans = [(3, 6), (9, 11)]
    deltas = [1 / 8, 1 / 256]
    np.testing.assert_array_equal(position_ids(len(ids), spans, deltas).astype(np.float64),
                                  hand_positions(ids, 5, deltas))
    # hand values: <img> at 2, 2.125 2.25 2.375, </img> at 4, 5, <img> 6, 6+1/256, 6+2/256, </img> 8, 9
    assert position_ids(len(ids), spans, deltas).tolist() == [
        0, 1, 2, 2.125, 2.25, 2.375, 4, 5, 6, 6 + 1 / 256, 6 + 2 / 256, 8, 9]


def check_positions(batch, ids, ctx_id, v2pe, delta):
    pos = batch["position_ids"][0].double().numpy()
    expected = hand_positions(ids, ctx_id, None if v2pe == "off" else [delta] * ids.count(ctx_id))
    np.testing.assert_array_equal(pos, expected)
    if v2pe == "off":
        np.testing.assert_array_equal(pos, np.arange(len(ids)))


@pytest.mark.parametrize("v2pe", ["off", "fixed"])
def test_hermes2_exact(tmp_path, bpe, v2pe):
    from tokenizers import Tokenizer as Raw

    rec = {"image": "grace_hopper.jpg", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\n Who is this? "},
        {"from": "gpt", "value": " Grace Hopper. "}]}
    batch, tok = one_sample(tmp_path, bpe, rec, template="Hermes-2", v2pe=v2pe, v2pe_delta=1 / 8)
    raw = Raw.from_file(bpe)
    S_, E_, enc, img = _bpe_pieces(raw, tok)
    # MPT-style ChatML: no newline after <|im_end|>; values are stripped; the sample's own
    # system turn replaces the default one.
    parts = [
        ([S_] + enc("system\nBe brief.") + [E_] + [S_] + enc("user\n"), False), (img, False),
        (enc("\n Who is this?") + [E_] + [S_] + enc("assistant\n"), False),
        (enc("Grace Hopper.") + [E_], True),
    ]
    ids = [t for p, _ in parts for t in p]
    unshifted = [t if sup else -100 for p, sup in parts for t in p]
    assert tok.decode(ids) == (f"<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<img>"
                               f"{'<IMG_CONTEXT>' * N_CTX}</img>\n Who is this?<|im_end|><|im_start|>assistant\n"
                               "Grace Hopper.<|im_end|>")
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == shifted(unshifted)
    check_positions(batch, ids, tok.img_context_id, v2pe, 1 / 8)


@pytest.mark.parametrize("v2pe", ["off", "fixed"])
def test_internlm2_chat_sentencepiece_exact(tmp_path, spm_model, v2pe):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    batch, tok = one_sample(tmp_path, spm_model, PHOTO_RECORD, template="internlm2-chat", v2pe=v2pe,
                            v2pe_delta=0.5)
    S_, E_ = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    enc = sp.encode
    img = [tok.img_start_id] + [tok.img_context_id] * N_CTX + [tok.img_end_id]
    # <s> first; no newline after <|im_end|>; each piece between special tokens is encoded
    # on its own (sentencepiece adds its dummy prefix to each), as InternLM2's tokenizer does.
    parts = [
        ([sp.bos_id(), S_] + enc("system\n" + SYS_2) + [E_] + [S_] + enc("user\n"), False), (img, False),
        (enc("\nWho is this?") + [E_] + [S_] + enc("assistant\n"), False), (enc("Grace Hopper.") + [E_], True),
        ([S_] + enc("user\nWhat did she write?") + [E_] + [S_] + enc("assistant\n"), False),
        (enc("A compiler.") + [E_], True),
    ]
    ids = [t for p, _ in parts for t in p]
    unshifted = [t if sup else -100 for p, sup in parts for t in p]
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == shifted(unshifted)
    check_positions(batch, ids, tok.img_context_id, v2pe, 0.5)
    if v2pe == "fixed":
        pos = batch["position_ids"][0].double().numpy()
        s = ids.index(tok.img_context_id)
        assert pos[s + N_CTX] == pos[s - 1] + math.ceil(N_CTX * 0.5) + 1


@pytest.mark.parametrize("v2pe", ["off", "fixed"])
def test_plain_pretraining_exact(tmp_path, bpe, v2pe):
    from tokenizers import Tokenizer as Raw

    rec = {"image": ["grace_hopper.jpg"], "text": "A photo: <image> Grace Hopper at work."}
    batch, tok = one_sample(tmp_path, bpe, rec, kind="pretrain", v2pe=v2pe, v2pe_delta=1 / 256)
    raw = Raw.from_file(bpe)
    _, _, enc, img = _bpe_pieces(raw, tok)
    eos = raw.token_to_id("<|endoftext|>")
    # no template; every text token (and the EOS) supervised, the image span never
    parts = [(enc("A photo: "), True), (img, False), (enc(" Grace Hopper at work."), True), ([eos], True)]
    ids = [t for p, _ in parts for t in p]
    unshifted = [t if sup else -100 for p, sup in parts for t in p]
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == shifted(unshifted)
    check_positions(batch, ids, tok.img_context_id, v2pe, 1 / 256)


def test_text_only_conversation_and_corpus(tmp_path, bpe):
    from tokenizers import Tokenizer as Raw

    rec = {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]}
    batch, tok = one_sample(tmp_path, bpe, rec, system_message="Sys.")
    raw = Raw.from_file(bpe)
    S_, E_, enc, _ = _bpe_pieces(raw, tok)
    ids = [S_] + enc("system\nSys.") + [E_] + enc("\n") + [S_] + enc("user\nHello") + [E_] + enc("\n") + [S_] \
        + enc("assistant\n") + enc("Hi.") + [E_] + enc("\n")
    assert batch["input_ids"][0].tolist() == ids
    assert batch["pixel_values"].shape == (0, 3, S, S)
    assert batch["num_tiles"].tolist() == []

    batch, _ = one_sample(tmp_path, bpe, {"text": "the lazy dog"}, kind="text")
    eos = raw.token_to_id("<|endoftext|>")
    ids = enc("the lazy dog") + [eos]
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == ids[1:] + [-100]


def test_video_frames_one_tile_each(tmp_path, bpe):
    from .helpers import write_video

    from megatron_internvl.config.data import DataConfig, DatasetSpec

    write_video(str(tmp_path / "clip.mp4"), frames=6)
    ann = write_jsonl(str(tmp_path / "v.jsonl"), [{"video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A fox runs."}]}])
    cfg = DataConfig(datasets=[DatasetSpec("v", ann, root=str(tmp_path), max_dynamic_patch=1, data_augment=True)],
                     tokenizer_path=bpe, image_size=8, num_image_token=4, max_tokens=512, pad_to_multiple=1,
                     num_workers=0, system_message="", num_video_frames=3)
    batch = list(build_data_loader(cfg, stop_after=1))[0]
    tok = load_tokenizer(bpe)
    text = tok.decode(batch["input_ids"][0].tolist())
    frame = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    assert text == (f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\nFrame-1: {frame}\nFrame-2: {frame}\n"
                    f"Frame-3: {frame}\nWhat happens?<|im_end|>\n<|im_start|>assistant\nA fox runs.<|im_end|>\n")
    assert batch["num_tiles"].tolist() == [1, 1, 1]
    px = batch["pixel_values"]
    assert px.shape == (3, 3, 8, 8) and px.dtype == torch.uint8  # normalised on the rank's device
    # frames 1, 3, 5 of 6 (middle of three segments), greys 40, 120, 200, never JPEG-augmented
    grey = px[:, 1].double().mean(dim=(1, 2))
    np.testing.assert_allclose(grey.numpy(), [40, 120, 200], atol=4)
