"""Two-budget packing: the bisect search against a brute-force reference, fill, the THD
micro-batch contract and the loss weights it carries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_internvl.data.dataset import build_data_loader
from megatron_internvl.data.loss_weights import square_average_weights
from megatron_internvl.data.packing import PackedSample, TwoBudgetPacker, collate_pack, first_fit_pack
from megatron_internvl.data.tokenizer import load_tokenizer

from .helpers import FakeMedia, make_toy_data, toy_config, train_bpe


class BruteForcePacker:
    """The paper's steps with a linear scan instead of a sorted buffer and bisect."""

    def __init__(self, L, T, cap):
        self.L, self.T, self.cap = L, T, cap
        self.buf = []   # [tokens, tiles, uid, items]
        self.uid = 0

    def add(self, item, l, t):
        fits = [b for b in self.buf if b[0] + l <= self.L and b[1] + t <= self.T]
        if fits:
            best = max(fits, key=lambda b: (b[0], b[1], b[2]))
            self.buf.remove(best)
            items, l, t = best[3] + [item], l + best[0], t + best[1]
        else:
            items = [item]
        if l >= self.L:
            return items
        self.buf.append([l, t, self.uid, items])
        self.uid += 1
        if len(self.buf) > self.cap:
            big = max(self.buf, key=lambda b: (b[0], b[1], b[2]))
            self.buf.remove(big)
            return big[3]
        return None


def internvl_like(n, rng, L=16384, tok_per_tile=256):
    """Lengths/tiles of an InternVL-like mixture (the one bench/data_pipeline.py uses)."""
    kind = rng.choice(4, size=n, p=[0.3, 0.5, 0.12, 0.08])
    tiles = np.zeros(n, dtype=np.int64)
    text = rng.lognormal(5.5, 1.0, size=n).astype(np.int64) + 20
    tiles[kind == 1] = rng.integers(1, 14, size=(kind == 1).sum())
    tiles[kind == 2] = rng.integers(2, 5, size=(kind == 2).sum()) * rng.integers(1, 7, size=(kind == 2).sum())
    doc = kind == 3
    text[doc] = rng.integers(2000, L // 2, size=doc.sum())
    tiles[doc] = rng.integers(0, 8, size=doc.sum())
    tiles = np.minimum(tiles, 48)
    lengths = np.minimum(text + tiles * (tok_per_tile + 2), L)
    return lengths, tiles


def test_bisect_search_matches_brute_force():
    rng = np.random.default_rng(0)
    for L, T, cap in ((100, 6, 4), (1000, 12, 16), (64, 0, 3)):
        fast, slow = TwoBudgetPacker(L, T, cap), BruteForcePacker(L, T, cap)
        for k in range(3000):
            l = int(rng.integers(1, L + 1)) if rng.random() < 0.1 else int(rng.integers(1, L // 4 + 2))
            t = int(rng.integers(0, T + 1)) if T else 0
            assert fast.add(k, l, t) == slow.add(k, l, t), k
        assert sorted(map(tuple, fast.flush())) == sorted(tuple(b[3]) for b in slow.buf)


def test_packs_respect_both_budgets_and_keep_every_item():
    rng = np.random.default_rng(1)
    L, T = 16384, 48
    lengths, tiles = internvl_like(20000, rng)
    p = TwoBudgetPacker(L, T, 64)
    packs = [x for k in range(len(lengths)) if (x := p.add(k, int(lengths[k]), int(tiles[k]))) is not None]
    packs += p.flush()
    flat = sorted(i for pk in packs for i in pk)
    assert flat == list(range(len(lengths)))
    for pk in packs:
        assert lengths[pk].sum() <= L and tiles[pk].sum() <= T
    fill = lengths.sum() / (len(packs) * L)
    assert fill >= 0.97, fill
    greedy = first_fit_pack(lengths, tiles, L, T, open_packs=1)
    assert sorted(i for pk in greedy for i in pk) == list(range(len(lengths)))
    assert fill > lengths.sum() / (len(greedy) * L) + 0.05
    ff = first_fit_pack(lengths, tiles, L, T, open_packs=64)
    assert fill >= lengths.sum() / (len(ff) * L) - 0.002


def test_oversized_item_is_rejected():
    p = TwoBudgetPacker(100, 4, 8)
    with pytest.raises(ValueError, match="outside the budgets"):
        p.add("x", 101, 0)
    with pytest.raises(ValueError, match="outside the budgets"):
        p.add("y", 10, 5)
    assert p.add("z", 100, 4) == ["z"]        # exactly full: emitted at once


def _sample(key, ids, labels, tiles, ds, S=4):
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    return PackedSample(ids, labels, square_average_weights(labels, "square"),
                        np.arange(len(ids), dtype=np.float32), torch.full((sum(tiles), 3, S, S), float(key[0])),
                        list(tiles), ds, key)


def test_collate_contract():
    a = _sample((0, 0), [1, 2, 3, 4, 5], [2, 3, -100, 5, -100], [2, 1], 0)
    b = _sample((1, 0), [6, 7, 8], [-100, 8, -100], [], 1)
    out = collate_pack([a, b], image_size=4, pad_to_multiple=16, pad_id=0, dataset_names=["x", "y"])
    assert out["input_ids"].shape == (1, 16) and out["input_ids"].dtype == torch.long
    assert out["labels"].dtype == torch.long and out["loss_weights"].dtype == torch.float32
    assert out["position_ids"].dtype == torch.float32
    assert out["cu_seqlens"].dtype == torch.int32
    assert out["cu_seqlens"].tolist() == [0, 5, 8, 16]       # trailing padding is its own segment
    assert out["max_seqlen"] == 8
    assert out["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8] + [0] * 8
    assert out["labels"][0, 8:].eq(-100).all() and out["loss_weights"][0, 8:].eq(0).all()
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2] + list(range(8))
    assert out["token_dataset"][0].tolist() == [0] * 5 + [1] * 3 + [-1] * 8
    assert out["pixel_values"].shape == (3, 3, 4, 4)
    assert out["num_tiles"].tolist() == [2, 1] and out["image_flags"].tolist() == [1, 1, 1]
    assert out["num_samples"] == 2 and out["num_tokens"] == 8 and out["dataset_names"] == ["x", "y"]
    # exactly l_max: no padding segment
    out = collate_pack([_sample((2, 0), list(range(8)), [-100] * 8, [], 0)], image_size=4, pad_to_multiple=8)
    assert out["cu_seqlens"].tolist() == [0, 8]
    assert out["pixel_values"].shape == (0, 3, 4, 4)


@pytest.mark.parametrize("reduction,p", [("token", 0.0), ("sample", 1.0), ("square", 0.5)])
def test_loss_weights_sum_per_sample(reduction, p):
    rng = np.random.default_rng(2)
    for _ in range(20):
        labels = np.where(rng.random(50) < 0.4, rng.integers(0, 100, 50), -100)
        x = int((labels != -100).sum())
        w = square_average_weights(labels, reduction).astype(np.float64)
        assert (w[labels == -100] == 0).all()
        if x:
            assert w.sum() == pytest.approx(x ** (1 - p), rel=1e-6)
            np.testing.assert_allclose(w[labels != -100], 1.0 / x ** p, rtol=1e-7)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return make_toy_data(str(d)), train_bpe(str(d / "tok" / "tokenizer.json"))


def test_loader_packs_are_consistent(toy):
    meta, tok_path = toy
    cfg = toy_config(meta, tok_path, max_tokens=512, max_tiles=12, loss_reduction="square")
    tok = load_tokenizer(tok_path)
    loader = build_data_loader(cfg, tok, media_loader=FakeMedia(cfg.image_size), stop_after=300)
    n_packs = 0
    for b in loader:
        n_packs += 1
        ids, labels, w = b["input_ids"][0], b["labels"][0], b["loss_weights"][0]
        cu = b["cu_seqlens"].tolist()
        S_ = ids.shape[0]
        assert S_ % cfg.pad_to_multiple == 0 and S_ <= cfg.max_tokens
        assert cu[0] == 0 and cu[-1] == S_ and b["max_seqlen"] == max(np.diff(cu))
        assert b["pixel_values"].shape[0] == int(b["num_tiles"].sum()) <= cfg.max_tiles
        # image tokens are counted after expansion: one IMG_CONTEXT run of tiles*k per image
        n_ctx = int((ids == tok.img_context_id).sum())
        assert n_ctx == int(b["num_tiles"].sum()) * cfg.num_image_token
        assert (labels[ids == tok.img_context_id] == -100).all()
        assert ((w > 0) == (labels != -100)).all()
        pos = b["position_ids"][0]
        for k in range(len(cu) - 1):
            seg = slice(cu[k], cu[k + 1])
            assert pos[seg][0] == 0                    # positions restart per sample
            assert labels[seg][-1] == -100             # a sample's last token predicts nothing
            x = int((labels[seg] != -100).sum())
            if x and k < b["num_samples"]:
                assert float(w[seg].double().sum()) == pytest.approx(x ** 0.5, rel=1e-5)
            if k < b["num_samples"]:
                # shifted labels: the target at t is the input at t + 1 (within the sample)
                lab, nxt = labels[seg][:-1], ids[seg][1:]
                m = lab != -100
                assert torch.equal(lab[m], nxt[m])
        assert (b["token_dataset"][0][cu[b["num_samples"]]:] == -1).all()
    st = loader.stats()
    assert n_packs == st["packs"] and st["packed_samples"] >= 300 - st["samples_skipped"]
    assert 0.5 < st["fill_ratio"] <= 1.0
