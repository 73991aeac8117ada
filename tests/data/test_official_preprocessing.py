"""Preprocessing identical to InternVL's official code where the two used to differ (issue 10).

* Grid choice at floating-point ties: checked against a reimplementation of InternVL's
  ``dynamic_preprocess`` / ``find_closest_aspect_ratio`` written here from the published
  semantics (no project code), and against transformers' InternVL image processor.
* BOS from the tokenizer's own ``add_bos_token`` / ``bos_token`` for every template.
* The order in which missing special tokens are appended (InternVL's order).
* Qwen-style BPE: what the split at supervision boundaries changes when an answer starts with
  a line break.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest

from megatron_internvl.data.templates import TEMPLATES, render_chat, tokenize_conversation, tokenize_plain
from megatron_internvl.data.tiling import candidate_grids, choose_grid, tiles_for_image
from megatron_internvl.data.tokenizer import load_tokenizer

from .helpers import train_bpe, train_sentencepiece

# --------------------------------------------------------------------------- grid choice


def official_grid(width, height, min_num, max_num, image_size=448):
    """InternVL's rule as published: the candidate set, sorted by area, scanned with a running
    best on float differences (strict ``<`` replaces, ``==`` applies the area rule)."""
    aspect_ratio = width / height
    targets = official_candidates(min_num, max_num)
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for i, j in targets:
        ratio_diff = abs(aspect_ratio - i / j)
        if ratio_diff < best_diff:
            best_diff, best = ratio_diff, (i, j)
        elif ratio_diff == best_diff and area > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def exact_grid(width, height, min_num, max_num, image_size=448):
    """The same rule in exact rationals (what the project used to do): for contrast only."""
    best, best_diff = None, None
    for g in official_candidates(min_num, max_num):
        d = abs(Fraction(width, height) - Fraction(*g))
        if best is None or d < best_diff:
            best, best_diff = g, d
        elif d == best_diff and 2 * width * height > image_size**2 * g[0] * g[1]:
            best = g
    return best


@lru_cache(maxsize=None)
def official_candidates(min_num, max_num):
    """InternVL's target ratios: a set filled n by n, i by i, j by j, sorted (stably) by area."""
    targets = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    targets.add((i, j))
    return sorted(targets, key=lambda ij: ij[0] * ij[1])


# (width, height, min_tiles, max_tiles, official grid, tiles with thumbnail, exact-arithmetic grid)
FLOAT_TIES = [
    (56, 48, 1, 12, (4, 3), 13, (1, 1)),    # 7/6 midway between 1/1 and 4/3
    (88, 176, 3, 6, (2, 3), 7, (1, 3)),     # 1/2 midway between 1/3 and 2/3
    (28, 48, 1, 12, (2, 3), 7, (1, 2)),     # 7/12 midway between 1/2 and 2/3
    (34, 48, 1, 12, (3, 4), 13, (2, 3)),    # 17/24 midway between 2/3 and 3/4
    (22, 120, 1, 12, (1, 6), 7, (1, 5)),    # 11/60 midway between 1/6 and 1/5
]


@pytest.mark.parametrize("w,h,lo,hi,grid,tiles,exact", FLOAT_TIES)
def test_float_tie_table(w, h, lo, hi, grid, tiles, exact):
    assert official_grid(w, h, lo, hi) == grid          # the table itself is the official answer
    assert exact_grid(w, h, lo, hi) == exact != grid    # and really is a float/exact disagreement
    assert choose_grid(w, h, lo, hi) == grid
    assert tiles_for_image(w, h, lo, hi) == tiles


def test_transformers_processor_agrees_on_the_tie_table():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for w, h, lo, hi, grid, _, _ in FLOAT_TIES:
        # (height, width) in, (cols, rows) out
        assert get_optimal_tiled_canvas((h, w), (448, 448), lo, hi) == grid


def test_candidate_order_is_internvls():
    for lo in range(1, 13):
        for hi in range(lo, 25):
            assert list(candidate_grids(lo, hi)) == official_candidates(lo, hi), (lo, hi)
    # Inside one area the order decides ties (only possible with min_tiles > 1): for 5x2 with
    # exactly 4 tiles, InternVL's set order gives (4, 1); transformers' processor, which lists
    # (1, 4), (2, 2), (4, 1), gives (2, 2). The training code is followed.
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    assert official_grid(5, 2, 4, 4) == choose_grid(5, 2, 4, 4) == (4, 1)
    assert tuple(get_optimal_tiled_canvas((2, 5), (448, 448), 4, 4)) == (2, 2)


def test_sweep_agrees_with_official_everywhere():
    checked = disagree_with_exact = 0
    # every size up to 128 px (small images are where the area rule and the ties bite)
    for w in range(1, 129):
        for h in range(1, 129):
            got = choose_grid(w, h, 1, 12)
            assert got == official_grid(w, h, 1, 12), (w, h)
            checked += 1
    # random sizes and settings
    rng = np.random.default_rng(10)
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(1, 8000, size=2))
        hi = int(rng.choice([1, 2, 4, 6, 12, 24, 36]))
        lo = int(rng.choice([1, 1, 1, 2, 3, hi]))
        lo = min(lo, hi)
        size = int(rng.choice([224, 448]))
        assert choose_grid(w, h, lo, hi, size) == official_grid(w, h, lo, hi, size), (w, h, lo, hi, size)
        checked += 1
    # every exact midpoint between two grid ratios, at several scales (both sides of the area rule)
    for lo, hi in [(1, 6), (1, 12), (2, 4), (4, 4), (4, 5), (5, 6), (3, 16)]:
        grids = candidate_grids(lo, hi)
        for a in grids:
            for b in grids:
                mid = (Fraction(*a) + Fraction(*b)) / 2
                if a >= b or mid in (Fraction(*a), Fraction(*b)):
                    continue
                for scale in (1, 7, 400):
                    w, h = mid.numerator * scale, mid.denominator * scale
                    official = official_grid(w, h, lo, hi)
                    assert choose_grid(w, h, lo, hi) == official, (w, h, lo, hi)
                    disagree_with_exact += official != exact_grid(w, h, lo, hi)
                    checked += 1
    print(f"grid sweep: {checked} cases agree with the official rule; {disagree_with_exact} of the "
          "midpoints are float ties where exact arithmetic would differ")
    assert checked > 20_000 and disagree_with_exact > 20


def test_sweep_agrees_with_transformers_for_min_one():
    """With min_tiles = 1 the order inside one area never decides, so transformers' processor
    (the inference side) must agree with us on every size."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(11)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 4000, size=(1500, 2))]
    sizes += [(w, h) for w, h, lo, *_ in FLOAT_TIES if lo == 1]
    for hi in (6, 12, 24):
        for w, h in sizes:
            assert choose_grid(w, h, 1, hi) == tuple(get_optimal_tiled_canvas((h, w), (448, 448), 1, hi)), (w, h, hi)


# --------------------------------------------------------------------------- tokenizer and BOS

TURNS = [("user", "Who is this?"), ("assistant", "Grace Hopper."), ("user", "And?"), ("assistant", "A compiler.")]


def with_config(src_file: str, folder, config) -> str:
    """A copy of a tokenizer file with a tokenizer_config.json beside it (None: no config)."""
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, os.path.basename(src_file))
    with open(src_file, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return dst


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bos")
    bpe = train_bpe(str(root / "src_bpe" / "tokenizer.json"))
    spm = train_sentencepiece(str(root / "src_spm_tok"))   # InternLM2-like: <s> = 1
    out = {}
    for name, cfg_bpe, cfg_spm in [
        ("true", {"add_bos_token": True, "bos_token": "<|endoftext|>"}, {"add_bos_token": True, "bos_token": "<s>"}),
        ("false", {"add_bos_token": False, "bos_token": "<|endoftext|>"}, {"add_bos_token": False, "bos_token": "<s>"}),
        ("absent", None, None),
    ]:
        out["bpe", name] = with_config(bpe, root / f"bpe_{name}", cfg_bpe)
        out["spm", name] = with_config(spm, root / f"spm_{name}", cfg_spm)
    return out


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_bos_follows_the_tokenizer_config(tokenizer_files, kind, template):
    tpl = TEMPLATES[template]
    images = []
    no = tokenize_conversation(load_tokenizer(tokenizer_files[kind, "false"]), tpl, TURNS, images)
    yes_tok = load_tokenizer(tokenizer_files[kind, "true"])
    yes = tokenize_conversation(yes_tok, tpl, TURNS, images)
    bos = 1 if kind == "spm" else yes_tok.token_id("<|endoftext|>")
    assert yes_tok.bos_id == bos
    # add_bos_token true: BOS first and never a target, the rest unchanged; false: no BOS,
    # whatever the template's default
    assert yes.input_ids.tolist() == [bos] + no.input_ids.tolist()
    assert yes.labels.tolist() == [-100] + no.labels.tolist()
    assert no.input_ids[0] != bos
    assert [e + 1 for e in no.turn_ends] == yes.turn_ends
    # no config: the template's default (internlm2-chat starts with <s>, as InternLM2's
    # tokenizer class does by default; the others do not)
    absent_tok = load_tokenizer(tokenizer_files[kind, "absent"])
    if not tpl.bos:
        assert tokenize_conversation(absent_tok, tpl, TURNS, images).input_ids.tolist() == no.input_ids.tolist()
    elif kind == "spm":
        assert tokenize_conversation(absent_tok, tpl, TURNS, images).input_ids.tolist() == yes.input_ids.tolist()
    else:  # this BPE has no BOS token at all: said, not guessed
        with pytest.raises(ValueError, match="tokenizer has no BOS token"):
            tokenize_conversation(absent_tok, tpl, TURNS, images)


def test_bos_is_the_tokenizer_bos_in_segments_and_plain_text(tokenizer_files):
    """The InternVL2.5 2B/8B/26B case: internvl2_5 with an InternLM2.5-like tokenizer
    (sentencepiece, add_bos_token true): the rendered sample is '<s>' + the ChatML text, as
    InternVL builds it (bos_token prepended to the first piece)."""
    import sentencepiece as spmlib

    path = tokenizer_files["spm", "true"]
    tok = load_tokenizer(path)
    sp = spmlib.SentencePieceProcessor(model_file=path)
    segs = render_chat(TEMPLATES["internvl2_5"], TURNS)
    got = tokenize_conversation(tok, TEMPLATES["internvl2_5"], TURNS, [])
    assert got.input_ids[0] == sp.bos_id() == 1 and sp.id_to_piece(1) == "<s>"
    assert segs[0][0].startswith("<|im_start|>system\n")
    plain = tokenize_plain(tok, "Grace Hopper wrote one of the first compilers.", [])
    assert plain.input_ids[0] == 1 and plain.labels[0] == -100
    assert plain.input_ids[1:-1].tolist() == sp.encode("Grace Hopper wrote one of the first compilers.")
    assert plain.input_ids[-1] == sp.eos_id()


def test_add_bos_without_a_bos_token_is_a_clear_error(tmp_path):
    from megatron_internvl.data.tokenizer import TokenizerError

    src = train_bpe(str(tmp_path / "src" / "tokenizer.json"))
    path = with_config(src, tmp_path / "t", {"add_bos_token": True, "bos_token": "<s>"})  # not in the vocabulary
    with pytest.raises(TokenizerError, match="add_bos_token=true but names no bos_token"):
        load_tokenizer(path)


# Appended when the vocabulary lacks them, in InternVL's order. For Qwen2.5 (151,665 tokens with
# its own added ones) this gives InternVL2.5's ids: <img> 151665 ... </box> 151673, vocab 151674.
OFFICIAL_ORDER = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def test_added_special_tokens_get_internvls_ids(tmp_path):
    from tokenizers import Tokenizer as Raw

    bpe = train_bpe(str(tmp_path / "tokenizer.json"))   # has <|endoftext|>, <|im_start|>, <|im_end|>
    V = Raw.from_file(bpe).get_vocab_size(with_added_tokens=True)
    tok = load_tokenizer(bpe)
    assert {t: tok.token_id(t) for t in OFFICIAL_ORDER} == {t: V + k for k, t in enumerate(OFFICIAL_ORDER)}
    assert tok.vocab_size == V + len(OFFICIAL_ORDER)

    import sentencepiece as spmlib

    model = train_sentencepiece(str(tmp_path / "spm"))    # has <|im_start|>, <|im_end|>
    n = spmlib.SentencePieceProcessor(model_file=model).get_piece_size()
    stok = load_tokenizer(model)
    assert [stok.token_id(t) for t in OFFICIAL_ORDER] == list(range(n, n + 9))


def test_tokens_already_present_keep_their_ids_and_the_rest_follow_in_order(tmp_path):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Raw

    src = train_bpe(str(tmp_path / "src.json"))
    raw = Raw.from_file(src)
    raw.add_special_tokens([AddedToken(t, special=True) for t in ["<img>", "</img>", "<IMG_CONTEXT>"]])
    path = str(tmp_path / "tokenizer.json")
    raw.save(path)
    V = raw.get_vocab_size(with_added_tokens=True)
    tok = load_tokenizer(path)
    assert [tok.token_id(t) for t in OFFICIAL_ORDER[:3]] == [raw.token_to_id(t) for t in OFFICIAL_ORDER[:3]]
    assert [tok.token_id(t) for t in OFFICIAL_ORDER[3:]] == list(range(V, V + 6))


# --------------------------------------------------------------------------- Qwen-style BPE split


@pytest.fixture(scope="module")
def qwen_style(tmp_path_factory):
    """transformers' Qwen2 tokenizer (its own pre-tokenizer) over a byte alphabet plus one
    merge, 'ĊĊ' (two line breaks), the case that matters."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĊĊ"] = len(vocab)
    hf = Qwen2Tokenizer(vocab=vocab, merges=[("Ċ", "Ċ")])
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    folder = str(tmp_path_factory.mktemp("qwen"))
    hf.save_pretrained(folder)
    return hf, load_tokenizer(folder)


def test_qwen_answer_starting_with_a_line_break(qwen_style):
    """The project splits at '<|im_start|>assistant\\n' | answer. Qwen's pre-tokenizer joins
    line breaks (``\\s*[\\r\\n]+``), so tokenizing the whole turn, as InternVL's training code
    does, merges the newline after 'assistant' with an answer's leading newline into one token;
    the split keeps them apart, which is exactly what generation sees: the prompt ends with
    'assistant\\n' and the model then produces the answer's own tokens."""
    hf, tok = qwen_style
    nn = hf.convert_tokens_to_ids("ĊĊ")
    enc = lambda s: hf.encode(s, add_special_tokens=False)  # noqa: E731
    turns = [("user", "Hi"), ("assistant", "\nA list")]
    ours = tokenize_conversation(tok, TEMPLATES["internvl2_5"], turns, [], system_message="")
    sup = [int(t) for t, lab in zip(ours.input_ids, ours.labels) if lab != -100]
    prompt = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    whole = enc(prompt + "\nA list<|im_end|>")
    assert nn in whole                                   # whole-turn tokenization: one 'ĊĊ'
    assert nn not in ours.input_ids.tolist()             # ours: 'Ċ' | 'Ċ' ...
    assert ours.input_ids.tolist() == enc(prompt) + enc("\nA list<|im_end|>") + enc("\n")  # prompt, then answer
    assert sup == enc("\nA list<|im_end|>")
    # an answer that does not start with a line break tokenizes the same either way
    plain = tokenize_conversation(tok, TEMPLATES["internvl2_5"], [("user", "Hi"), ("assistant", "A\n\nlist")], [],
                                  system_message="")
    assert plain.input_ids.tolist() == enc(prompt + "A\n\nlist<|im_end|>\n")
