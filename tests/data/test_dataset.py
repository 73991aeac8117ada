"""Sources, sampling order, repeat factors, data-parallel sharding and DataLoader workers."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np
import pytest

from megatron_internvl.config.data import DataConfig, DatasetSpec
from megatron_internvl.data.dataset import GlobalOrder, build_data_loader
from megatron_internvl.data.sources import JsonlFile, SourceError, load_meta

from .helpers import FakeMedia, batch_digest, make_toy_data, toy_config, train_bpe, write_image, write_jsonl


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return make_toy_data(str(d)), train_bpe(str(d / "tok" / "tokenizer.json"))


def test_meta_file_parsing(toy, tmp_path):
    meta, _ = toy
    specs = load_meta(meta)
    by = {s.name: s for s in specs}
    assert list(by) == ["single", "multi", "text", "video", "pretrain", "corpus"]
    assert by["single"].data_augment is True and by["single"].max_dynamic_patch == 6
    assert by["multi"].repeat_time == 2.0 and by["text"].repeat_time == 0.5
    assert by["pretrain"].kind == "pretrain" and by["corpus"].kind == "text"
    assert by["single"].annotation.endswith("ann/single.jsonl") and by["single"].root.endswith("images")
    assert len(JsonlFile(by["single"].annotation)) == 40

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"annotation": "a.jsonl", "repeat_time": 5}}))
    with pytest.raises(ValueError, match=r"repeat_time=5.0 must be in \(0, 4\]"):
        load_meta(str(bad))
    bad.write_text(json.dumps({"x": {"annotation": "a.jsonl", "max_patch": 5}}))
    with pytest.raises(SourceError, match="unknown keys"):
        load_meta(str(bad))


@pytest.mark.parametrize("chunk", [1 << 26, 3, 1])
def test_jsonl_index_skips_blank_lines(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(JsonlFile, "CHUNK", chunk)
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"a": 2}\r\n\r\n{"a": 3}')
    f = JsonlFile(str(p))
    assert len(f) == 3
    assert [f.read(i) for i in range(3)] == [(1, b'{"a": 1}'), (3, b'{"a": 2}\r'), (5, b'{"a": 3}')]


def test_config_validate_messages(toy):
    meta, tok = toy
    DataConfig(meta_path=meta, tokenizer_path=tok).validate()
    cases = [
        (dict(meta_path=None), "data.datasets is empty"),
        (dict(tokenizer_path=""), "data.tokenizer_path"),
        (dict(template="chatml"), "data.template"),
        (dict(max_tokens=1000, pad_to_multiple=16), r"data.max_tokens=1000 is not a multiple.*992"),
        (dict(loss_reduction="mean"), "data.loss_reduction"),
        (dict(v2pe="fixed", v2pe_delta=2.0), "data.v2pe_delta"),
        (dict(num_image_token=0), "data.num_image_token"),
        (dict(max_skip_ratio=1.5), "data.max_skip_ratio"),
        (dict(datasets=[DatasetSpec("a", "x.jsonl", repeat_time=0)]), r"repeat_time=0 must be in \(0, 4\]"),
    ]
    for kw, msg in cases:
        cfg = DataConfig(**{**dict(meta_path=meta, tokenizer_path=tok), **kw})
        with pytest.raises(ValueError, match=msg):
            cfg.validate()


def test_repeat_factors_and_deterministic_order():
    specs = [DatasetSpec("a", "a", repeat_time=1), DatasetSpec("b", "b", repeat_time=2.5),
             DatasetSpec("c", "c", repeat_time=0.3)]
    sizes = [10, 8, 20]
    order = GlobalOrder(specs, sizes, seed=5)
    per_epoch = 10 + 20 + 6
    assert order.samples_per_epoch == per_epoch
    for e in range(3):
        got = [order.locate(e * per_epoch + k) for k in range(per_epoch)]
        assert {x[2] for x in got} == {e}
        c = Counter(x[0] for x in got)
        assert c == {0: 10, 1: 20, 2: 6}
        lines_a = Counter(x[1] for x in got if x[0] == 0)
        assert lines_a == {i: 1 for i in range(10)}
        lines_b = Counter(x[1] for x in got if x[0] == 1)
        assert all(lines_b[i] in (2, 3) for i in range(8)) and sum(lines_b.values()) == 20
        lines_c = [x[1] for x in got if x[0] == 2]
        assert len(set(lines_c)) == 6                 # r < 1: a subset without repeats
    again = GlobalOrder(specs, sizes, seed=5)
    assert [order.locate(i) for i in range(200)] == [again.locate(i) for i in range(200)]
    other = GlobalOrder(specs, sizes, seed=6)
    assert [order.locate(i) for i in range(36)] != [other.locate(i) for i in range(36)]
    # the down-sampled subset changes from epoch to epoch (all of c is seen eventually)
    seen_c = {order.locate(i)[1] for i in range(per_epoch * 10) if order.locate(i)[0] == 2}
    assert len(seen_c) > 15


def test_text_weight_interleaves_exactly():
    specs = [DatasetSpec("img", "a"), DatasetSpec("corpus", "b", kind="text")]
    order = GlobalOrder(specs, [50, 1000], seed=1, text_weight=0.3)
    ds = [order.locate(i)[0] for i in range(1000)]
    assert ds.count(1) == 300
    for n in (10, 77, 500):
        assert ds[:n].count(1) == math.floor(n * 0.3)


def test_data_parallel_shards_are_disjoint_and_complete(toy):
    meta, tok = toy
    cfg = toy_config(meta, tok)
    seen = []
    for rank in range(3):
        loader = build_data_loader(cfg, dp_rank=rank, dp_size=3, media_loader=FakeMedia(cfg.image_size),
                                   stop_after=30)
        # local sample j of rank r is global sample 3j + r
        assert [loader.order.locate(3 * j + rank) for j in range(30)] == [
            loader.order.locate(i) for i in range(rank, 90, 3)]
        keys = [k for b in loader for k in b["sample_keys"]]
        seen.extend((3 * j + rank, p) for j, p in keys)
        assert loader.stats()["samples_read"] == 30
    globals_ = sorted({g for g, _ in seen})
    assert len(seen) == len(set(seen))             # nothing twice
    assert globals_ == list(range(90))             # nothing lost (the toy data has no bad lines)
    one = build_data_loader(cfg, dp_rank=0, dp_size=1, media_loader=FakeMedia(cfg.image_size), stop_after=90)
    single = sorted({k[0] for b in one for k in b["sample_keys"]})
    assert globals_ == single                      # 3 ranks together read what 1 rank reads


@pytest.mark.timeout(120)
def test_workers_do_not_change_the_stream(toy):
    meta, tok = toy
    runs = []
    for workers in (0, 1, 3):
        cfg = toy_config(meta, tok, num_workers=workers, v2pe="random")
        loader = build_data_loader(cfg, media_loader=FakeMedia(cfg.image_size), stop_after=120)
        runs.append([batch_digest(b) for b in loader])
        assert loader.stats()["samples_read"] == 120
    assert runs[0] == runs[1] == runs[2]
    keys = [tuple(k) for b in runs[0] for e in b if e[0] == "sample_keys" for k in e[1]]
    assert len(keys) == len(set(keys))             # no sample twice
    assert {k[0] for k in keys} == set(range(120))  # none lost to a worker


def test_all_kinds_are_read(toy):
    meta, tok = toy
    cfg = toy_config(meta, tok)
    loader = build_data_loader(cfg, media_loader=FakeMedia(cfg.image_size), stop_after=400)
    per_ds = Counter()
    for b in loader:
        cu = b["cu_seqlens"].tolist()
        for k in range(b["num_samples"]):
            per_ds[loader.dataset_names[int(b["token_dataset"][0, cu[k]])]] += 1
    assert set(per_ds) == {"single", "multi", "text", "video", "pretrain", "corpus"}
    assert loader.stats()["samples_skipped"] == 0


class RecordingMedia(FakeMedia):
    def __init__(self, image_size):
        super().__init__(image_size)
        self.calls = []

    def image_tiles(self, path, *, max_tiles, min_tiles, augment, rng):
        self.calls.append((os.path.basename(path), max_tiles, augment))
        return super().image_tiles(path, max_tiles=max_tiles, min_tiles=min_tiles, augment=augment, rng=rng)


def test_per_dataset_tile_budget_augmentation_and_template(tmp_path, toy):
    _, tok = toy
    root = str(tmp_path / "img")
    for k in range(10):
        write_image(os.path.join(root, f"{k}.png"), 400, 20)          # wide: wants many tiles
    three = {"image": ["0.png", "1.png", "2.png"], "conversations": [
        {"from": "human", "value": "<image><image><image>\nq"}, {"from": "gpt", "value": "a"}]}
    ten = {"image": [f"{k}.png" for k in range(10)], "conversations": [
        {"from": "human", "value": "<image>" * 10 + "\nq"}, {"from": "gpt", "value": "a"}]}
    a = write_jsonl(str(tmp_path / "a.jsonl"), [three])
    b = write_jsonl(str(tmp_path / "b.jsonl"), [ten])
    specs = [DatasetSpec("a", a, root=root, max_dynamic_patch=8, data_augment=True),
             DatasetSpec("b", b, root=root, max_dynamic_patch=8, template="Hermes-2")]
    media = RecordingMedia(8)
    cfg = DataConfig(datasets=specs, tokenizer_path=tok, image_size=8, num_image_token=4, max_tokens=1024,
                     max_tiles=48, pad_to_multiple=8, num_workers=0, system_message="S",
                     shard_by="sample")  # one media call per image (the planned loader adds header reads)
    loader = build_data_loader(cfg, media_loader=media, stop_after=2)
    batches = list(loader)
    # each image of a multi-image sample gets max(1, n_max // n_images) tiles
    assert sorted(media.calls) == sorted([(f"{k}.png", 2, True) for k in range(3)]
                                         + [(f"{k}.png", 1, False) for k in range(10)])
    from megatron_internvl.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    texts = [t.decode(b["input_ids"][0, a_:b_].tolist()) for b in batches
             for a_, b_ in zip(b["cu_seqlens"][:-1].tolist(), b["cu_seqlens"][1:].tolist())]
    assert any(x.startswith("<|im_start|>system\nS<|im_end|><|im_start|>user") for x in texts)   # Hermes-2
    assert any(x.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user") for x in texts)  # internvl2_5


@pytest.mark.parametrize("shard_by", ["global", "sample"])
def test_close_stops_the_worker_processes_at_once(toy, shard_by):
    import multiprocessing

    meta, tok = toy
    cfg = toy_config(meta, tok, shard_by=shard_by, num_workers=2)
    loader = build_data_loader(cfg, media_loader=FakeMedia(cfg.image_size), packs_per_step=2)
    next(loader)
    workers = multiprocessing.active_children()
    assert len(workers) >= 2
    loader.close()
    assert all(w.exitcode is not None for w in workers), "close() must join the workers"
