"""The planned loader: every rank plans each step's global batch from metadata, decodes only its own packs.

Per optimizer step the global batch is `packs_per_step` (G) packs, whatever the DP size:

1. metadata: the samples of the global order are built with a header-only media reader
   (templating and tokenization, tile counts from image headers, no pixels) into `Unit`s, or,
   with a sample index (`data.index_path`, data/index.py), read from its rows: a reader then
   touches only the index rows of each global batch and the media of its own packs, and reads
   those rows as numpy columns, the global batch's worth at once (`_read_units`);
2. plan: `balance.form_packs` (or the streaming `TwoBudgetPacker` for `balance: none`) forms the
   G packs from the carried-over units plus new ones; every rank computes the same plan (costs
   as numpy over the global batch, equal bit for bit to the per-unit formula);
3. deal: `balance.deal` gives each DP rank G / DP packs (its micro-batches);
4. decode: the rank builds the samples of its own packs only (pixels, V2PE, loss weights),
   in DataLoader workers, and collates each pack.

The data state is the position in the plan: the step, the next global sample index, the units
not yet placed (keys and ages) and the metadata skip counts. It is the same on every rank, so a
checkpoint resumes at any DP size with the same global batches from the next step on, and at the
same DP size bitwise (mid-step too). Restoring rebuilds the metadata of the unplaced units.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_internvl.config.data import DataConfig, DatasetSpec

from .balance import CostModel, StepPlanner, Unit, deal, default_cost, imbalance
from .index import SampleIndex
from .order import GlobalOrder
from .packing import collate_pack
from .samples import SKIP_REASONS, SampleBuilder, Skip
from .sources import JsonlFile
from .state import DataResumeError, SkipStats, close_workers, passthrough
from .stream import SampleStream

logger = logging.getLogger("megatron_internvl.data")


def unit_of(piece) -> Unit:
    """The planner's view of a built sample piece (or any unit with the same three fields)."""
    return Unit(tuple(piece.key), int(piece.num_tokens), int(piece.tiles), tuple(piece.sample_lengths))


class _PackBuilder(torch.utils.data.Dataset):
    """Worker side: a pack's keys -> its collated micro-batch (pixels decoded here only)."""

    def __init__(self, builder: SampleBuilder, order: GlobalOrder, cfg: DataConfig, pad_id: int,
                 dataset_names: list, finish: Optional[Callable] = None):
        self.builder, self.order, self.cfg = builder, order, cfg
        self.pad_id, self.dataset_names, self.finish = pad_id, dataset_names, finish

    def __getitem__(self, item):
        step, micro, units = item
        wanted = {u.key: u for u in units}
        got, skips = {}, []
        for i in sorted({k[0] for k in wanted}):
            ds, line, _ = self.order.locate(i)
            res = self.builder.build(ds, line, i, i)
            if isinstance(res, Skip):   # the body failed where the header read fine
                skips.append(res)
                continue
            for s in res:
                u = wanted.get(tuple(s.key))
                if u is None:
                    continue
                if (s.num_tokens, s.tiles) != (u.tokens, u.tiles):
                    skips.append(Skip("metadata_mismatch", self.dataset_names[ds], self.builder.files[ds].path, line,
                                      f"decoded {s.num_tokens} tokens / {s.tiles} tiles, the header-only "
                                      f"read gave {u.tokens} / {u.tiles}; sample left out of its pack"))
                    continue
                got[u.key] = s
        samples = [got[u.key] for u in units if u.key in got]
        batch = collate_pack(samples, image_size=self.cfg.image_size, pad_to_multiple=self.cfg.pad_to_multiple,
                             pad_id=self.pad_id, dataset_names=self.dataset_names)
        if self.finish is not None:
            batch = self.finish(batch, samples)
        return step, micro, batch, skips


class _PlanSampler:
    """Main-process side: yields this rank's (step, micro, units) as the plan advances."""

    def __init__(self, loader: "PlannedLoader"):
        self.loader = loader

    def __iter__(self):
        return self.loader._my_packs()


class PlannedLoader:
    """Iterator of this rank's packed micro-batches (see `collate_pack`), planned globally."""

    STATE_VERSION = 1

    def __init__(self, cfg: DataConfig, tokenizer, specs: Sequence[DatasetSpec], files: Sequence[JsonlFile],
                 dp_rank: int, dp_size: int, media: Any, header_media: Any, packs_per_step: int,
                 cost: Optional[CostModel] = None, stop_after: Optional[int] = None,
                 builder_factory: Optional[Callable] = None, finish: Optional[Callable] = None,
                 index: Optional[SampleIndex] = None):
        """`builder_factory(media) -> builder` replaces `SampleBuilder` (another kind of unit, e.g.
        preference pairs: its pieces need `key`, `num_tokens`, `tiles`, `sample_lengths`);
        `finish(batch, samples) -> batch` runs after `collate_pack` (picklable: it runs in workers).
        `index` (of these specs, checked against `cfg`) replaces the metadata pass."""
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        if packs_per_step < 1 or packs_per_step % dp_size:
            raise ValueError(f"packs per step ({packs_per_step}, training.global_batch_size) must be a "
                             f"positive multiple of the data-parallel size {dp_size}.")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.specs = list(specs)
        self.dataset_names = [s.name for s in self.specs]
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.G, self.n_micro = packs_per_step, packs_per_step // dp_size
        self.balance = cfg.balance
        # `cost` is the configured model's (CostModel.for_model); imbalance is always reported in
        # its terms, whatever the planner balances
        self.metric_cost = cost if cost is not None else default_cost("compute")
        self.cost = {"compute": self.metric_cost, "tokens": CostModel.tokens(), "none": None}[self.balance]
        self.order = GlobalOrder(self.specs, [len(f) for f in files], cfg.seed, cfg.text_weight)
        make = builder_factory or (lambda m: SampleBuilder(cfg, tokenizer, self.specs, files, m))
        self.builder, self.meta, self.finish = make(media), make(header_media), finish
        self.stop_after = stop_after
        self.planner = StepPlanner(self.G, cfg.max_tokens, cfg.max_tiles, self.balance, self.cost,
                                   cfg.pack_buffer_size)
        self.step = 0                 # the step planned next
        self._next_i = 0              # the next global sample index the metadata stream yields
        self.skips = SkipStats()
        self._meta_stream: Optional[Iterator] = None
        self._meta_loader = None
        self.index = index
        # index rows read ahead (not state: derived from the position): the first's global index
        self._block, self._block_start, self._block_tokens = None, 0, None
        self._one: deque = deque()  # the block's samples for one-at-a-time reads (balance: none)
        # consumer side
        self._snapshots: dict[int, dict] = {}
        self._plan_stats: dict[int, dict] = {}
        self._restored_step = -1      # after a restore: the step it was saved in, and
        self._skip_micro = 0          # how many of this rank's micro-batches of it were taken
        self._stream: Optional[Iterator] = None
        self._at = (0, 0)             # (step, micro-batches of it delivered)
        self.decode_skips = SkipStats()
        self.packs = self.real_tokens = self.tiles = self.samples_packed = 0
        self.plan_real_tokens = self.plan_packs = 0

    # -- metadata

    def _open_meta(self) -> Iterator:
        stream = SampleStream(self.meta, self.order, 0, 1, self._next_i, self.stop_after)
        W = self.cfg.num_workers
        if W == 0:
            return iter(stream)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._meta_loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=W, collate_fn=passthrough,
            prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False)
        return iter(self._meta_loader)

    INDEX_READ_AHEAD = 4096

    def _index_rows(self, i: int, n: int) -> list:
        """(global index, units | Skip) of the samples i .. i + n - 1, from the index rows."""
        idx = np.arange(i, i + n, dtype=np.int64)
        ds, lines = self.order.locate_many(idx)
        out = []
        for j, d, row in zip(idx.tolist(), ds.tolist(), self.index.lookup(ds, lines)):
            if row.skip is not None:
                out.append((j, Skip(row.skip, self.dataset_names[d], self.builder.files[d].path, row.line_no,
                                    row.message)))
            else:
                out.append((j, [Unit((j, p), t, n_tiles, (t,)) for p, (t, n_tiles) in enumerate(row.pieces)]))
        return out

    def _index_block(self):
        """The read-ahead rows holding sample `_next_i` (read now if need be); None past the end."""
        block = self._block
        if block is not None and self._next_i - self._block_start < block.skip.size:
            return block
        n = self.INDEX_READ_AHEAD
        if self.stop_after is not None:
            n = min(n, self.stop_after - self._next_i)
        if n <= 0:
            return None
        ds, lines = self.order.locate_many(np.arange(self._next_i, self._next_i + n, dtype=np.int64))
        self._block, self._block_start = self.index.lookup_columns(ds, lines), self._next_i
        self._block_tokens = self._block.row_tokens()
        return self._block

    def _read_units(self, tokens: int) -> tuple[list[Unit], bool]:
        """The planner's bulk read from the index: the units of as many whole samples as calling
        `_read_sample` until they hold `tokens` tokens would give, with the samples' skips
        recorded, and whether the stream ended first. Numpy over the rows: no per-sample Python
        beyond the units themselves."""
        units: list[Unit] = []
        want = tokens
        self._one.clear()
        while True:
            block = self._index_block()
            if block is None:
                return units, True
            pos = self._next_i - self._block_start
            good = block.skip[pos:] < 0
            cum = np.cumsum(np.where(good, self._block_tokens[pos:], 0))
            hits = np.flatnonzero(good & (cum >= want))
            end = pos + int(hits[0]) + 1 if hits.size else pos + good.size
            units += self._block_units(block, pos, end)
            for k in (pos + np.flatnonzero(~good[:end - pos])).tolist():
                d = int(block.ds[k])
                self._record_skip(Skip(SKIP_REASONS[int(block.skip[k])], self.dataset_names[d],
                                       self.builder.files[d].path, int(block.line_no[k]), block.message(k)))
            self.skips.seen += end - pos
            self._next_i += end - pos
            if hits.size:
                return units, False
            want -= int(cum[-1]) if cum.size else 0

    def _block_samples(self, block, pos: int) -> list:
        """(units | Skip) of each row from `pos` to the block's end (the one-at-a-time reads)."""
        units = iter(self._block_units(block, pos, block.skip.size))
        out = []
        for k, (s, c) in enumerate(zip(block.skip[pos:].tolist(), block.counts[pos:].tolist()), pos):
            if s >= 0:
                d = int(block.ds[k])
                out.append(Skip(SKIP_REASONS[s], self.dataset_names[d], self.builder.files[d].path,
                                int(block.line_no[k]), block.message(k)))
            else:
                out.append([next(units) for _ in range(c)])
        return out

    def _block_units(self, block, a: int, b: int) -> list[Unit]:
        """The units of the rows a .. b - 1 that are not skipped: one per piece, key (sample, piece)."""
        lo = int(block.offsets[a])
        hi = int(block.offsets[b - 1] + block.counts[b - 1]) if b > a else lo
        row = block.row[lo:hi]
        keep = block.skip[row] < 0
        j = (row[keep] + self._block_start).tolist()
        t, v = block.tokens[lo:hi][keep].tolist(), block.tiles[lo:hi][keep].tolist()
        p = block.piece[lo:hi][keep].tolist()
        return [Unit((j_, p_), t_, v_, (t_,)) for j_, p_, t_, v_ in zip(j, p, t, v)]

    def _read_sample(self) -> Optional[list[Unit]]:
        """Units of the next sample that is not skipped; None at the end of a finite stream."""
        if self._meta_stream is None:
            self._meta_stream = self._one_indexed() if self.index is not None else self._open_meta()
        while True:
            try:
                i, res = next(self._meta_stream)
            except StopIteration:
                return None
            if i != self._next_i:
                raise RuntimeError(f"metadata stream out of order: got sample {i}, expected {self._next_i}")
            self._next_i += 1
            self.skips.seen += 1
            if isinstance(res, Skip):
                self._record_skip(res)
                continue
            return res if self.index is not None else [unit_of(p) for p in res]

    def _one_indexed(self) -> Iterator:
        """(global index, units | Skip) of the samples from `_next_i` on, from the index rows."""
        while True:
            if not self._one:
                block = self._index_block()
                if block is None:
                    return
                start = self._next_i
                self._one.extend(enumerate(self._block_samples(block, start - self._block_start), start))
            yield self._one.popleft()

    def _record_skip(self, s: Skip) -> None:
        # every rank reads the same metadata: one rank logs
        self.skips.record(s, self.cfg, "in the global stream", log=self.dp_rank == 0)

    # -- planning (main process, identical on every rank)

    def _my_packs(self):
        """Plan step after step; yield this rank's (step, micro, units)."""
        while True:
            s = self.step
            self._snapshots[s] = self._plan_state()
            packs = self.planner.plan(self._read_sample, self._read_units if self.index is not None else None)
            if not packs:
                return
            self.step += 1
            metric = self.metric_cost.of_packs(packs)
            costs = (metric if self.cost is self.metric_cost else self.cost.of_packs(packs)) if self.cost \
                else [0.0] * len(packs)
            ranks = deal(costs, self.dp_size, balanced=self.balance != "none")
            tokens = sum(u.tokens for p in packs for u in p)
            self._plan_stats[s] = {
                "rank_imbalance": imbalance([sum(metric[k] for k in r) for r in ranks]),
                "micro_imbalance": imbalance(metric),
                "fill": tokens / (len(packs) * self.cfg.max_tokens),
            }
            self.plan_packs += len(packs)
            self.plan_real_tokens += tokens
            for m, k in enumerate(ranks[self.dp_rank]):
                if s == self._restored_step and m < self._skip_micro:
                    continue
                yield s, m, packs[k]

    # -- iteration (consumer)

    def __iter__(self) -> "PlannedLoader":
        return self

    def _open(self) -> Iterator:
        ds = _PackBuilder(self.builder, self.order, self.cfg, self.tokenizer.pad_id, self.dataset_names,
                          self.finish)
        W = self.cfg.num_workers
        if W == 0:
            return (ds[item] for item in _PlanSampler(self))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # pinned on a GPU node (the loader's thread does it): the uint8 tiles then go to the
        # device asynchronously, when the schedule asks for them (parallel/data.py)
        self._loader = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=_PlanSampler(self), num_workers=W, collate_fn=passthrough,
            prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
            pin_memory=torch.cuda.is_available())
        return iter(self._loader)

    def __next__(self) -> dict[str, Any]:
        if self._stream is None:
            self._stream = self._open()
        step, micro, batch, skips = next(self._stream)
        self.decode_skips.seen += batch["num_samples"] + len(skips)
        for s in skips:   # the body failed where the header read fine: this rank's own
            self.decode_skips.record(s, self.cfg, f"at decode on DP rank {self.dp_rank}")
        self._at = (step, micro + 1)
        for old in [k for k in self._snapshots if k < step]:
            del self._snapshots[old]
        for old in [k for k in self._plan_stats if k < step]:
            del self._plan_stats[old]
        self.packs += 1
        self.real_tokens += batch["num_tokens"]
        self.tiles += int(batch["pixel_values"].shape[0])
        self.samples_packed += batch["num_samples"]
        return batch

    # -- statistics

    def step_stats(self) -> dict[str, float]:
        """Planned balance of the step the last micro-batch belongs to (compute-cost terms)."""
        return dict(self._plan_stats.get(self._at[0], {}))

    @property
    def fill_ratio(self) -> float:
        return self.real_tokens / (self.packs * self.cfg.max_tokens) if self.packs else 0.0

    def stats(self) -> dict[str, Any]:
        both = SkipStats(counts=dict(self.skips.counts))
        for k, n in self.decode_skips.counts.items():
            both.counts[k] = both.counts.get(k, 0) + n
        plan_room = self.plan_packs * self.cfg.max_tokens
        return {
            "samples_read": self.skips.seen,
            "samples_skipped": self.skips.skipped + self.decode_skips.skipped,
            "skips_by_reason": both.by_reason(),
            "skips": dict(both.counts),
            "packs": self.packs,
            "packed_samples": self.samples_packed,
            "real_tokens": self.real_tokens,
            "tiles": self.tiles,
            "fill_ratio": self.fill_ratio,
            "plan_fill_ratio": self.plan_real_tokens / plan_room if plan_room else 0.0,
        }

    # -- resume

    def _plan_state(self) -> dict[str, Any]:
        return {"step": self.step, "next_index": self._next_i, "skips": self.skips.state_dict(),
                **self.planner.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        step, consumed = self._at
        snap = self._snapshots[step] if step in self._snapshots else self._plan_state()
        if snap.get("exhausted"):
            raise DataResumeError("cannot checkpoint a finite stream at its end")
        return {
            "version": self.STATE_VERSION,
            "planned": True,
            "seed": self.cfg.seed,
            "datasets": list(self.dataset_names),
            "balance": self.balance,
            "packs_per_step": self.G,
            "dp_size": self.dp_size,
            "plan": snap,
            "consumed": consumed,
            "counters": [self.packs, self.real_tokens, self.tiles, self.samples_packed],
        }

    def close(self) -> None:
        """Stop the worker processes (metadata and decode); the loader cannot be iterated afterwards."""
        close_workers(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore before the first `next()`, at any DP size when saved at a step boundary."""
        if self._stream is not None:
            raise DataResumeError("load_state_dict must be called before iterating the loader")
        if not state.get("planned"):
            raise DataResumeError(
                "the data state was saved by the per-rank loader (data.shard_by=sample); resume with "
                "data.shard_by=sample, or set checkpoint.finetune=true to start a new data stream")
        if state.get("version") != self.STATE_VERSION:
            raise DataResumeError(f"data state version {state.get('version')} != {self.STATE_VERSION}")
        for k, mine in (("seed", self.cfg.seed), ("datasets", self.dataset_names)):
            if state[k] != mine:
                raise DataResumeError(f"data state was saved with {k}={state[k]!r} but this run has {mine!r}; "
                                      "resume needs the same seed and datasets.")
        consumed, old_micro = int(state["consumed"]), state["packs_per_step"] // state["dp_size"]
        same = state["dp_size"] == self.dp_size and state["packs_per_step"] == self.G
        if not same and consumed not in (0, old_micro):
            raise DataResumeError(
                f"the data state is {consumed} of {old_micro} micro-batches into a step; a different DP size "
                "or global batch can only resume at a step boundary (checkpoints are written there)")
        plan = state["plan"]
        self.step = self._restored_step = int(plan["step"])
        self._skip_micro = consumed if same else (self.n_micro if consumed else 0)
        self._next_i = int(plan["next_index"])
        self.skips.load_state_dict(plan["skips"])
        self.packs, self.real_tokens, self.tiles, self.samples_packed = (int(x) for x in state["counters"])
        self.planner.load_state_dict(plan, self._rebuild(self.planner.wanted_keys(plan)), state["balance"])
        self._at = (self.step, self._skip_micro)
        self._snapshots = {self.step: self._plan_state()}

    def _rebuild(self, keys: set) -> dict[tuple, Unit]:
        out: dict[tuple, Unit] = {}
        for i in sorted({k[0] for k in keys}):
            if self.index is not None:
                (_, res), = self._index_rows(i, 1)
            else:
                ds, line, _ = self.order.locate(i)
                res = self.meta.build(ds, line, i, i)
                res = res if isinstance(res, Skip) else [unit_of(p) for p in res]
            if isinstance(res, Skip):
                raise DataResumeError(f"sample {i} of the checkpointed plan now fails to build: {res}")
            out.update({u.key: u for u in res if u.key in keys})
        missing = keys - set(out)
        if missing:
            raise DataResumeError(f"samples {sorted(missing)[:5]} of the checkpointed plan no longer exist; "
                                  "did the data change since the checkpoint?")
        return out
