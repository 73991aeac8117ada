"""The offline sample index (data/index.py, data/indexing.py) and the planner reading it.

The index's numbers are checked against the planner's own metadata pass (the header-only
`SampleBuilder`, line by line), the plans against a loader without the index (every micro-batch
bitwise), and its refusals (missing, other settings, a changed annotation file) by message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_internvl.data.build import build_data_loader
from megatron_internvl.data.index import SampleIndex, SampleIndexError
from megatron_internvl.data.indexing import build_index, main as index_main, read_chunk_lines
from megatron_internvl.data.media import HeaderOnlyMedia
from megatron_internvl.data.samples import SampleBuilder, Skip
from megatron_internvl.data.sources import JsonlFile, all_specs
from megatron_internvl.data.templates import IGNORE_INDEX
from megatron_internvl.data.tokenizer import load_tokenizer

from .helpers import FakeMedia, batch_digest, make_toy_data, toy_config, train_bpe

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
G = 4


class HeaderFake(FakeMedia):
    """FakeMedia's tile counts without pixels (as the planner's header-only view)."""

    def image_tiles(self, path, *, max_tiles, min_tiles, augment, rng):
        from PIL import Image

        with Image.open(path) as im:
            w = im.size[0]
        return torch.empty((min(max_tiles, max(min_tiles, w // 16)), 3, 0, 0))

    def video_frames(self, path, *, rng):
        return torch.empty((int(open(path).read().split()[1]), 3, 0, 0))


class IndexedFake(FakeMedia):
    def header_only(self):
        return HeaderFake(self.image_size)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    meta = make_toy_data(str(d), n_single=24, n_multi=8, n_text=10, n_video=4, n_pretrain=4, n_corpus=8)
    # bad lines of several kinds, so that skips (and their messages) go through the index
    with open(os.path.join(d, "ann", "single.jsonl"), "a") as f:
        f.write("{not json\n\n\r\n" + json.dumps({"image": "nope.png", "conversations": []}) + "\n")
        f.write(json.dumps({"image": "img1.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}))
    tok = train_bpe(str(d / "tok.json"))
    return meta, tok, str(d)


def _cfg(meta, tok, **kw):
    return toy_config(meta, tok, **{"shard_by": "global", "max_tokens": 256, "max_tiles": 8, "v2pe": "random", **kw})


def _metadata_pass(cfg, media):
    """Per dataset, per line: the header-only builder's (skip reason) or [(tokens, tiles, supervised)]."""
    specs = all_specs(cfg.datasets, cfg.meta_path)
    files = [JsonlFile(s.annotation) for s in specs]
    b = SampleBuilder(cfg, load_tokenizer(cfg.tokenizer_path), specs, files, media)
    out = []
    for ds, f in enumerate(files):
        rows = []
        for line in range(len(f)):
            res = b.build(ds, line, 0, 0)
            rows.append((f.line_no[line], res.reason) if isinstance(res, Skip) else
                        (f.line_no[line], [(p.num_tokens, p.tiles, int((p.labels != IGNORE_INDEX).sum()))
                                           for p in res]))
        out.append((files, rows))
    return specs, files, out


def _index_rows(index, specs):
    out = []
    for ds, part in enumerate(index.parts):
        lines = np.arange(len(part))
        rows = index.lookup(np.full(lines.size, ds), lines)
        sup = part.piece_supervised
        got = []
        for r, row in zip(lines, rows):
            if row.skip is not None:
                got.append((row.line_no, row.skip))
            else:
                p0 = int(part.piece_start[r])
                got.append((row.line_no, [(t, n, int(sup[p0 + k])) for k, (t, n) in enumerate(row.pieces)]))
        out.append(got)
    return out


def _steps(loaders, n):
    """Per step, its packs (whichever rank got them) keyed by their samples -> everything in them."""
    out = []
    for _ in range(n):
        batches = [next(L) for L in loaders for _ in range(G // len(loaders))]
        out.append({tuple(b["sample_keys"]): batch_digest(b) for b in batches})
    return out


def test_index_equals_metadata_pass_and_plans_equal(toy, tmp_path):
    meta, tok, _ = toy
    cfg = _cfg(meta, tok)
    # small chunks in two processes: lines cut at chunk boundaries, merged in order
    report = build_index(cfg, str(tmp_path / "idx"), workers=2, media=HeaderFake(8), chunk_bytes=700)
    specs, files, ref = _metadata_pass(cfg, HeaderFake(8))
    index = SampleIndex.open(str(tmp_path / "idx"), cfg, specs, load_tokenizer(tok).path)
    assert report["lines"] == sum(len(f) for f in files) and report["skipped"] >= 3
    assert _index_rows(index, specs) == [rows for _, rows in ref]
    for f, g in zip(files, index.jsonl_files(specs)):
        assert [f.read(i) for i in range(len(f))] == [g.read(i) for i in range(len(g))]

    # planned steps: every micro-batch at DP=2 bitwise equal with and without the index
    with_index = _cfg(meta, tok, index_path=str(tmp_path / "idx"))
    plain = [build_data_loader(cfg, dp_rank=r, dp_size=2, media_loader=IndexedFake(8), packs_per_step=G)
             for r in range(2)]
    indexed = [build_data_loader(with_index, dp_rank=r, dp_size=2, media_loader=IndexedFake(8), packs_per_step=G)
               for r in range(2)]
    assert indexed[0].index is not None
    ref_steps = _steps(plain, 6)
    assert _steps(indexed, 3) == ref_steps[:3]
    state = indexed[0].state_dict()
    # resume the indexed state at DP=1 with the index and at DP=4 without it: the same batches
    again = [build_data_loader(with_index, media_loader=IndexedFake(8), packs_per_step=G, state=state)]
    assert _steps(again, 3) == ref_steps[3:]
    again = [build_data_loader(cfg, dp_rank=r, dp_size=4, media_loader=IndexedFake(8), packs_per_step=G,
                               state=state) for r in range(4)]
    assert _steps(again, 3) == ref_steps[3:]
    # the skip counts of the whole stream agree
    n = indexed[0].order.samples_per_epoch
    a = build_data_loader(with_index, media_loader=IndexedFake(8), packs_per_step=G, stop_after=n)
    b = build_data_loader(cfg, media_loader=IndexedFake(8), packs_per_step=G, stop_after=n)
    assert [batch_digest(x) for x in a] == [batch_digest(x) for x in b]
    assert a.stats() == b.stats() and a.stats()["samples_skipped"] > 0


def test_index_refusals_and_incremental_rebuild(toy, tmp_path):
    meta, tok, root = toy
    out = str(tmp_path / "idx")
    cfg = _cfg(meta, tok, index_path=out)
    specs = all_specs(cfg.datasets, cfg.meta_path)
    with pytest.raises(SampleIndexError, match="holds no sample index.*megatron-internvl index-data --meta"):
        build_data_loader(cfg, media_loader=IndexedFake(8), packs_per_step=G)
    build_index(cfg, out, media=HeaderFake(8))
    with pytest.raises(SampleIndexError, match=r"other settings \(max_tokens: index 256, this run 512\)"):
        build_data_loader(_cfg(meta, tok, index_path=out, max_tokens=512), media_loader=IndexedFake(8),
                          packs_per_step=G)
    with pytest.raises(SampleIndexError, match="template: index 'internvl2_5', this run 'Hermes-2'"):
        build_data_loader(_cfg(meta, tok, index_path=out, template="Hermes-2"), media_loader=IndexedFake(8),
                          packs_per_step=G)

    # one annotation file grows: refused naming it; a rebuild redoes that file only
    text = os.path.join(root, "ann", "text.jsonl")
    original = open(text, "rb").read()
    try:
        with open(text, "ab") as f:
            f.write(b'{"conversations": [{"from": "human", "value": "a b"}, {"from": "gpt", "value": "c"}]}\n')
        with pytest.raises(SampleIndexError, match=f"annotation file {text} of dataset 'text' changed"):
            build_data_loader(cfg, media_loader=IndexedFake(8), packs_per_step=G)
        report = build_index(cfg, out, media=HeaderFake(8))
        assert report["chunks_built"] == 1 and sorted(report["datasets_reused"]) == sorted(
            s.name for s in specs if s.name != "text")
        assert len(os.listdir(os.path.join(out, "parts"))) == len(specs)
        loader = build_data_loader(cfg, media_loader=IndexedFake(8), packs_per_step=G)
        assert len(loader.builder.files[specs.index(next(s for s in specs if s.name == "text"))]) == 11
    finally:
        with open(text, "wb") as f:
            f.write(original)


def test_sharded_build_equals_one_pass_and_chunk_lines(toy, tmp_path):
    meta, tok, root = toy
    cfg = _cfg(meta, tok)
    one = str(tmp_path / "one")
    build_index(cfg, one, media=HeaderFake(8), chunk_bytes=500)
    sharded = str(tmp_path / "sharded")
    done = [build_index(cfg, sharded, media=HeaderFake(8), chunk_bytes=500, shard=(k, 3)) for k in range(3)]
    assert not os.path.exists(os.path.join(sharded, "index.json")) and sum(r["chunks_built"] for r in done) > 3
    merged = build_index(cfg, sharded, media=HeaderFake(8), chunk_bytes=500)
    assert merged["chunks_built"] == 0
    a, b = json.load(open(os.path.join(one, "index.json"))), json.load(open(os.path.join(sharded, "index.json")))
    assert a == b
    for d in a["datasets"]:
        for name in os.listdir(os.path.join(one, d["part"])):
            x, y = os.path.join(one, d["part"], name), os.path.join(sharded, d["part"], name)
            if name.endswith(".npy"):
                np.testing.assert_array_equal(np.load(x), np.load(y))

    # chunks partition the lines as JsonlFile numbers them, whatever the cut points
    path = os.path.join(root, "ann", "single.jsonl")
    f, size = JsonlFile(path), os.path.getsize(path)
    for step in (1, 37, 4096):
        got, before = [], 0
        for lo in range(0, size, step):
            lines, n = read_chunk_lines(path, lo, lo + step)
            got += [(s, e, ln + before) for s, e, ln, _ in lines]
            before += n
        assert got == list(zip(f.starts.tolist(), f.ends.tolist(), f.line_no.tolist()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tiny", "make_dataset.py"), str(d)],
                   check=True, capture_output=True)
    return str(d)


def test_tiny_mixture_index_data_command(tiny, tmp_path, capsys):
    """The quick start's data with real images through `index-data` and the real header reader."""
    from megatron_internvl.config import load_config

    cfg = load_config(os.path.join(ROOT, "examples", "tiny", "base.yaml"),
                      [f"data.meta_path={tiny}/meta.json", f"data.tokenizer_path={tiny}/tokenizer.json"]).data
    out = str(tmp_path / "idx")
    argv = ["--meta", cfg.meta_path, "--tokenizer", cfg.tokenizer_path, "--out", out, "--workers", "2",
            "--template", cfg.template, "--image-size", str(cfg.image_size), "--num-image-token",
            str(cfg.num_image_token), "--max-dynamic-patch", str(cfg.max_dynamic_patch), "--max-tokens",
            str(cfg.max_tokens), "--max-tiles", str(cfg.max_tiles), "--chunk-mb", "0.001"]
    if cfg.system_message is not None:
        argv += ["--system-message", cfg.system_message]
    assert index_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["lines"] > 0
    header = HeaderOnlyMedia(cfg.image_size, cfg.use_thumbnail, cfg.image_backend, cfg.num_video_frames)
    specs, files, ref = _metadata_pass(cfg, header)
    index = SampleIndex.open(out, cfg, specs, load_tokenizer(cfg.tokenizer_path).path)
    assert _index_rows(index, specs) == [rows for _, rows in ref]

    cfg.num_workers = 0
    indexed = cfg.__class__(**{**cfg.__dict__, "index_path": out})
    a = build_data_loader(cfg, dp_rank=0, dp_size=2, packs_per_step=4)
    b = build_data_loader(indexed, dp_rank=0, dp_size=2, packs_per_step=4)
    for _ in range(4):
        assert batch_digest(next(a)) == batch_digest(next(b))


def test_video_frames_from_container_metadata(tmp_path, monkeypatch):
    from megatron_internvl.data import video
    from megatron_internvl.data.video import count_video_frames, read_video_frames

    from .helpers import write_video

    path = write_video(str(tmp_path / "v.mp4"), frames=5)
    media = HeaderOnlyMedia(16, num_video_frames=3)
    frames, _ = read_video_frames(path, 3)
    assert count_video_frames(path) == 5 and len(frames) == 3

    def no_decode(*a, **k):
        raise AssertionError("the header-only reader decoded a video")

    monkeypatch.setattr(video, "_decode_selected", no_decode)
    assert media.video_frames(path, rng=None).shape[0] == 3
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(video.VideoDecodeError):
        media.video_frames(str(tmp_path / "bad.mp4"), rng=None)


class HeaderRead(BaseException):
    """Not an Exception: the sample builder would turn one into a skip."""


class NoHeaders(FakeMedia):
    def image_tiles(self, path, **kw):
        raise HeaderRead(f"header read of {path} with an index")

    video_frames = image_tiles


class CountingIndexed(FakeMedia):
    def __init__(self, image_size):
        super().__init__(image_size)
        self.decoded = []

    def image_tiles(self, path, **kw):
        self.decoded.append(os.path.basename(path))
        return super().image_tiles(path, **kw)

    def header_only(self):
        return NoHeaders(self.image_size)


def test_indexed_reader_reads_no_metadata_and_decodes_only_its_packs(toy, tmp_path, monkeypatch):
    meta, tok, _ = toy
    out = str(tmp_path / "idx")
    build_index(_cfg(meta, tok), out, media=HeaderFake(8))
    cfg = _cfg(meta, tok, index_path=out)

    def no_scan(self, path):
        raise AssertionError(f"{path} scanned for line offsets with an index")

    monkeypatch.setattr(JsonlFile, "__init__", no_scan)
    ranks = [build_data_loader(cfg, dp_rank=r, dp_size=2, media_loader=CountingIndexed(8), packs_per_step=G)
             for r in range(2)]
    one = build_data_loader(cfg, media_loader=CountingIndexed(8), packs_per_step=G)
    for _ in range(4):
        mine = [next(L) for L in ranks for _ in range(G // 2)]
        assert sorted(tuple(b["sample_keys"]) for b in mine) == sorted(tuple(next(one)["sample_keys"]) for _ in range(G))
    # every pack decoded once over the ranks, as in one process: no rank decodes another's media
    assert sorted(ranks[0].builder.media.decoded + ranks[1].builder.media.decoded) == sorted(one.builder.media.decoded)
    assert ranks[0].builder.media.decoded and ranks[1].builder.media.decoded
