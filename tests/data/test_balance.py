"""Balanced global batches (data/balance.py, data/planned.py): the planner and the planned loader."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_internvl.data.balance import (
    CostModel,
    StepPlanner,
    Unit,
    UnitColumns,
    deal,
    form_packs,
    imbalance,
    sequential_sums,
)
from megatron_internvl.data.build import build_data_loader
from megatron_internvl.models.flops import StepShapes, step_flops

from .helpers import FakeMedia, batch_digest, make_toy_data, toy_config, train_bpe

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from balance import SHAPES, mixture  # noqa: E402  (the bench's InternVL-like mixture)

MAX_TOKENS, MAX_TILES = 16384, 48
# The figure documented in docs/data.md: rank max/mean of the estimated cost per step.
DOCUMENTED_RANK_IMBALANCE = 1.03


def test_cost_model_is_the_flops_counter():
    model = SHAPES["InternVL3-8B"]
    cost = CostModel.for_model(model)
    tr = {"vision": True, "projector": True, "language": True}
    u = Unit((0, 0), 3000, 7, (1000, 2000))  # two sequences, e.g. a preference pair
    want = step_flops(model, StepShapes([1000, 2000], 7), tr)
    assert cost.of(u) == pytest.approx(want, rel=1e-12)
    frozen_vit = {"vision": False, "projector": True, "language": True}
    assert CostModel.for_model(model, frozen_vit).of(u) == pytest.approx(
        step_flops(model, StepShapes([1000, 2000], 7), frozen_vit), rel=1e-12)
    assert CostModel.tokens().of(u) == 3000


def _run_planner(units, G, dp, mode, cost, steps=None):
    planner = StepPlanner(G, MAX_TOKENS, MAX_TILES, mode, cost if mode != "none" else None, 64)
    it = iter(units)

    def read():
        u = next(it, None)
        return None if u is None else [u]

    out = []
    while steps is None or len(out) < steps:
        packs = planner.plan(read)
        if not packs:
            break
        out.append(packs)
    return out


def test_planner_budgets_exactly_once_imbalance_and_fill():
    """On the bench mixture, DP=16 x 4 packs per rank: budgets hold, every unit is placed exactly
    once over a finite stream, rank imbalance stays under the documented figure while today's
    packer (`none`) does not reach it, and fill stays >= 0.99 of today's."""
    cost = CostModel.for_model(SHAPES["InternVL3-8B"])
    units = mixture(12_000, seed=3)
    G, dp = 64, 16
    stats = {}
    for mode in ("none", "compute"):
        steps = _run_planner(units, G, dp, mode, cost)
        placed = Counter(u.key for packs in steps for p in packs for u in p)
        assert set(placed) == {u.key for u in units} and max(placed.values()) == 1, mode
        for packs in steps:
            for p in packs:
                assert sum(u.tokens for u in p) <= MAX_TOKENS and sum(u.tiles for u in p) <= MAX_TILES
        full = steps[:-2]   # the last steps of a finite stream are partial
        rank = [imbalance([sum(cost.of_units(packs[k]) for k in r) for r in deal(
            [cost.of_units(p) for p in packs], dp, mode != "none")]) for packs in full]
        fill = sum(u.tokens for packs in full for p in packs for u in p) / (len(full) * G * MAX_TOKENS)
        stats[mode] = (float(np.median(rank)), max(rank), fill)
    print("rank max/mean (median, worst), fill:", stats)
    assert stats["compute"][1] < DOCUMENTED_RANK_IMBALANCE
    assert stats["compute"][0] < stats["none"][0]
    assert stats["compute"][2] >= 0.99 * stats["none"][2]


def test_form_packs_and_deal_properties():
    rng = np.random.default_rng(0)
    pool = [Unit((i, 0), int(rng.integers(50, 3000)), int(rng.integers(0, 12))) for i in range(400)]
    cost = CostModel(1.0, 1e-4, 300.0)
    packs, left = form_packs(pool, 8, 4096, 20, cost, forced=5)
    assert sorted([i for p in packs for i in p] + left) == list(range(400))
    for p in packs:
        assert sum(pool[i].tokens for i in p) <= 4096 and sum(pool[i].tiles for i in p) <= 20
    assert all(i in {j for p in packs for j in p} for i in range(5)), "forced units go first"
    assert form_packs(pool, 8, 4096, 20, cost, forced=5) == (packs, left), "deterministic"
    ranks = deal([5.0, 1.0, 4.0, 2.0, 3.0, 3.0], 3, balanced=True)
    assert sorted(len(r) for r in ranks) == [2, 2, 2] and sorted(k for r in ranks for k in r) == list(range(6))
    assert deal(list(range(6)), 3, balanced=False) == [[0, 3], [1, 4], [2, 5]]


def test_vectorised_costs_are_the_per_unit_costs_bit_for_bit():
    """The planner's costs over the whole global batch (numpy) equal CostModel.of / of_units
    exactly, MPO-style units of two sequences included: plans cannot drift from the rounding."""
    rng = np.random.default_rng(1)
    units = [Unit((i, 0), int(t), int(rng.integers(0, 13)),
                  (int(t),) if i % 3 else (int(t) // 3, int(t) - int(t) // 3) if i % 2 else ())
             for i, t in enumerate(rng.integers(1, 9000, 500))]
    packs = [units[a:b] for a, b in [(0, 0), (0, 7), (7, 8), (8, 200), (200, 500)]]
    for cost in (CostModel.for_model(SHAPES["InternVL3-8B"]), CostModel.tokens(), CostModel(1.3, 7e-5, 311.7)):
        assert cost.of_columns(UnitColumns.of(units)).tolist() == [cost.of(u) for u in units]
        assert cost.of_packs(packs) == [cost.of_units(p) for p in packs]
    values = rng.standard_normal(50) * 1e6
    assert sequential_sums(values, [0, 3, 40, 7]) == [
        sum(values[a:b].tolist()) for a, b in [(0, 0), (0, 3), (3, 43), (43, 50)]]
    assert form_packs(UnitColumns.of(units), 9, 16384, 40, CostModel(1.3, 7e-5, 311.7), 4) == \
        form_packs(units, 9, 16384, 40, CostModel(1.3, 7e-5, 311.7), 4)


# --------------------------------------------------------------------------- the planned loader


class HeaderFake(FakeMedia):
    """FakeMedia's tile counts without pixels (the planner's header-only view)."""

    def image_tiles(self, path, *, max_tiles, min_tiles, augment, rng):
        from PIL import Image

        with Image.open(path) as im:
            w = im.size[0]
        return torch.empty((min(max_tiles, max(min_tiles, w // 16)), 3, 0, 0))

    def video_frames(self, path, *, rng):
        return torch.empty((int(open(path).read().split()[1]), 3, 0, 0))


class CountingMedia(FakeMedia):
    def __init__(self, image_size):
        super().__init__(image_size)
        self.decoded = Counter()

    def image_tiles(self, path, **kw):
        self.decoded[os.path.basename(path)] += 1
        return super().image_tiles(path, **kw)

    def video_frames(self, path, **kw):
        self.decoded[os.path.basename(path)] += 1
        return super().video_frames(path, **kw)

    def header_only(self):
        return HeaderFake(self.image_size)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    meta = make_toy_data(str(d), n_single=24, n_multi=8, n_text=10, n_video=4, n_pretrain=4, n_corpus=8)
    return meta, train_bpe(str(d / "tok" / "tokenizer.json"))


G = 4


def _loaders(toy, dp, workers=0, **kw):
    meta, tok = toy
    cfg = toy_config(meta, tok, shard_by="global", max_tokens=256, max_tiles=8, num_workers=workers,
                     v2pe="random", **kw)
    return [build_data_loader(cfg, dp_rank=r, dp_size=dp, media_loader=CountingMedia(8), packs_per_step=G)
            for r in range(dp)]


def _steps(loaders, n, media_of=None):
    """n steps: per step, the packs of all ranks keyed by their samples -> digest. With
    `media_of`, checks that each rank decoded exactly the media of the samples in its packs."""
    out = []
    for _ in range(n):
        step = {}
        for L in loaders:
            for _ in range(G // len(loaders)):
                b = next(L)
                assert b["num_tokens"] <= 256 and b["pixel_values"].shape[0] <= 8
                step[tuple(b["sample_keys"])] = batch_digest(b)
                if media_of is not None:
                    L.expected = getattr(L, "expected", Counter())
                    for i in {k[0] for k in b["sample_keys"]}:   # a split document is built whole
                        L.expected.update(media_of(L, i))
        out.append(step)
    return out


def _media_of(loader, i):
    ds, line, _ = loader.order.locate(i)
    rec = json.loads(loader.builder.files[ds].read(line)[1])
    media = rec.get("image") or rec.get("video") or []
    return [media] if isinstance(media, str) else media


def test_plan_independent_of_dp_resume_at_any_dp_and_decode_only_own(toy):
    # the same global batches at DP=1, 2, 4 (and the same bytes in each pack)
    ref_loaders = _loaders(toy, 1)
    ref = _steps(ref_loaders, 8)
    dp2 = _loaders(toy, 2, workers=1)
    got2 = _steps(dp2, 3)
    dp4 = _loaders(toy, 4)
    assert _steps(dp4, 8, _media_of) == ref
    assert got2 == ref[:3]

    # a rank decodes only the media of its own packs (counted per file), each pack once overall
    for L in dp4:
        assert L.builder.media.decoded == L.expected and sum(L.expected.values()) > 0
    assert sum((L.builder.media.decoded for L in dp4), Counter()) == ref_loaders[0].builder.media.decoded

    # resume the DP=2 state after 3 steps at DP=1 and DP=4: the same global batches from step 4
    state = dp2[0].state_dict()
    assert state["plan"] == dp2[1].state_dict()["plan"], "the data state is global"
    for dp in (1, 4):
        cfg = dp2[0].cfg
        resumed = [build_data_loader(cfg, dp_rank=r, dp_size=dp, media_loader=CountingMedia(8),
                                     packs_per_step=G, state=state) for r in range(dp)]
        assert _steps(resumed, 5) == ref[3:], f"resumed at DP={dp}"

    # same layout, mid-step (one of the two micro-batches of step 4 taken on rank 0): bitwise
    next(dp2[0])
    mid = dp2[0].state_dict()
    assert mid["consumed"] == 1
    again = build_data_loader(dp2[0].cfg, dp_rank=0, dp_size=2, media_loader=CountingMedia(8),
                              packs_per_step=G, state=mid)
    assert again.state_dict() == mid
    for _ in range(3):
        assert batch_digest(next(again)) == batch_digest(next(dp2[0]))
    with pytest.raises(Exception, match="step boundary"):
        build_data_loader(dp2[0].cfg, dp_rank=0, dp_size=4, media_loader=CountingMedia(8),
                          packs_per_step=G, state=mid)


def test_every_sample_once_per_epoch_and_balance_none_is_former_shard_by_pack(toy):
    meta, tok = toy
    cfg = toy_config(meta, tok, shard_by="global", max_tokens=256, max_tiles=8)
    loader = build_data_loader(cfg, media_loader=FakeMedia(8), packs_per_step=G)
    n = loader.order.samples_per_epoch
    one_epoch = build_data_loader(cfg, media_loader=FakeMedia(8), packs_per_step=G, stop_after=n)
    keys = Counter(k for b in one_epoch for k in b["sample_keys"])
    assert max(keys.values()) == 1
    skipped = one_epoch.stats()["samples_skipped"]
    assert len({k[0] for k in keys}) == n - skipped and skipped < n // 10

    none = toy_config(meta, tok, shard_by="global", balance="none", max_tokens=256, max_tiles=8)
    former = toy_config(meta, tok, shard_by="pack", max_tokens=256, max_tiles=8)
    for r in range(2):
        a = build_data_loader(none, dp_rank=r, dp_size=2, media_loader=FakeMedia(8), packs_per_step=G)
        b = build_data_loader(former, dp_rank=r, dp_size=2, media_loader=FakeMedia(8))
        for _ in range(10):
            assert batch_digest(next(a)) == batch_digest(next(b))


def test_balance_config_errors(toy):
    meta, tok = toy
    with pytest.raises(ValueError, match="data.balance='flops' must be 'none', 'tokens' or 'compute'"):
        toy_config(meta, tok, balance="flops").validate()
    with pytest.raises(ValueError, match="multiple of the data-parallel size 3"):
        build_data_loader(toy_config(meta, tok, shard_by="global"), dp_rank=0, dp_size=3, media_loader=FakeMedia(8),
                          packs_per_step=4)
