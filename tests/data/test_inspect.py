"""tools/inspect_data.py, run as a program."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_internvl.config.data import DataConfig
from megatron_internvl.data.dataset import build_data_loader, inspect_stream

from .helpers import make_toy_data, train_bpe

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "inspect_data.py")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    meta = make_toy_data(str(d), real_videos=True)
    with open(os.path.join(d, "ann", "single.jsonl"), "a") as f:
        f.write('{"image": "img1.png", "conversations": [\n')           # line 41: malformed
    return meta, train_bpe(str(d / "tok" / "tokenizer.json"))


ARGS = ["--max-tokens", "512", "--max-tiles", "12", "--image-size", "8", "--num-image-token", "4",
        "--max-dynamic-patch", "6", "--pack-buffer-size", "8"]


def test_inspect_json_matches_a_decoding_run(toy):
    meta, tok = toy
    out = subprocess.run([sys.executable, TOOL, "--meta", meta, "--tokenizer", tok, *ARGS, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    # one epoch: 41 + 2 x 12 + round(0.5 x 20) + 8 + 10 + 20 lines
    assert rep["samples"] == 41 + 24 + 10 + 8 + 10 + 20
    assert rep["skips_by_reason"] == {"malformed_json": 1}
    assert rep["skips"] == {"single/malformed_json": 1}
    assert rep["samples_packed"] >= rep["samples"] - 1
    assert rep["fill_ratio"] == pytest.approx(rep["tokens"] / (rep["packs"] * 512))
    assert 0 < rep["fill_ratio"] <= 1
    assert rep["image_tokens"] == rep["tiles"] * 4

    # header-only tile counting agrees with really decoding every image and video
    cfg = DataConfig(meta_path=meta, tokenizer_path=tok, image_size=8, num_image_token=4, max_dynamic_patch=6,
                     max_tokens=512, max_tiles=12, pad_to_multiple=1, pack_buffer_size=8, num_workers=0,
                     max_skip_ratio=1.0)
    real = inspect_stream(build_data_loader(cfg, stop_after=rep["samples"]))
    assert real == rep


def test_inspect_text_output_and_errors(toy, tmp_path):
    meta, tok = toy
    out = subprocess.run([sys.executable, TOOL, "--meta", meta, "--tokenizer", tok, *ARGS, "--num-samples", "30"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split(None, 1) for line in out.stdout.strip().splitlines())
    assert rows["samples"] == "30" and "fill_ratio" in rows and "packs" in rows

    out = subprocess.run([sys.executable, TOOL, "--meta", str(tmp_path / "none.json"), "--tokenizer", tok, *ARGS],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_tiny_native_pretrain_mixture_reads_without_skips(tmp_path):
    # examples/tiny/native_pretrain.yaml's data: interleaved image-text lines and a text corpus
    # (the pretrain lines were once written as conversations, and every one was skipped).
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tiny"))
    from make_dataset import build

    data = build(tmp_path / "tiny")
    out = subprocess.run([sys.executable, TOOL, "--meta", str(data / "meta_native.json"), "--tokenizer",
                          str(data / "tokenizer.json"), "--max-tokens", "256", "--max-tiles", "8",
                          "--image-size", "56", "--num-image-token", "4", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    lines = sum(len((data / f).read_text().splitlines()) for f in ("pretrain.jsonl", "text.jsonl"))
    assert rep["samples_skipped"] == 0 and rep["samples"] == lines, rep
    assert rep["tiles"] > 0 and rep["image_tokens"] > 0, rep
