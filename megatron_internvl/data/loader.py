"""The per-rank packed loaders: `data.shard_by=sample` and `pack`.

`build_data_loader` (`data/build.py`) gives the planned loader of `data/planned.py` by default (global plan, any DP
size on resume). With `data.shard_by=sample` each rank instead packs its own share of the samples
(`PackedDataLoader`, below): the main process packs them in their global order (`TwoBudgetPacker`), so the packs do not
depend on the number of workers. The loader's state is the next local index, the keys of the
samples waiting in the pack buffer and the skip counters; on restore those samples are rebuilt
from their keys, so the stream continues bit-identically, with any number of workers. Skips are
counted per dataset and reason and bounded by `data.max_skip_ratio`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Optional, Sequence

import torch

from megatron_internvl.config.data import DataConfig, DatasetSpec

from .order import GlobalOrder
from .packing import PackedSample, TwoBudgetPacker, collate_pack
from .samples import SampleBuilder, Skip
from .state import DataResumeError, SkipStats, close_workers, passthrough
from .sources import JsonlFile
from .stream import SampleStream
from .tokenizer import Tokenizer

logger = logging.getLogger("megatron_internvl.data")


class PackedDataLoader:
    """Iterator of packed micro-batches (see `collate_pack` for the dict) with exact resume."""

    STATE_VERSION = 1

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, specs: Sequence[DatasetSpec],
                 files: Sequence[JsonlFile], dp_rank: int, dp_size: int, media: Any,
                 stop_after: Optional[int] = None):
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.specs = list(specs)
        self.dataset_names = [s.name for s in self.specs]
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.order = GlobalOrder(self.specs, [len(f) for f in files], cfg.seed, cfg.text_weight)
        self.builder = SampleBuilder(cfg, tokenizer, self.specs, files, media)
        self.stop_after = stop_after
        self.packer = TwoBudgetPacker(cfg.max_tokens, cfg.max_tiles, cfg.pack_buffer_size)
        self.skips = SkipStats()
        self._live: dict[tuple, PackedSample] = {}
        self._pending: list[PackedSample] = []
        self._next_j = 0
        self._stream: Optional[Iterator] = None
        self._loader = None
        self._exhausted = False
        self._drain: Optional[list] = None
        self.packs = 0
        self.real_tokens = 0
        self.tiles = 0
        self.samples_packed = 0

    # -- iteration

    def __iter__(self) -> "PackedDataLoader":
        return self

    def _open_stream(self) -> Iterator:
        stream = SampleStream(self.builder, self.order, self.dp_rank, self.dp_size, self._next_j, self.stop_after)
        W = self.cfg.num_workers
        if W == 0:
            return iter(stream)
        if self.cfg.num_workers and "TOKENIZERS_PARALLELISM" not in os.environ:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self._loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=W, collate_fn=passthrough,
            prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
        )
        return iter(self._loader)

    def close(self) -> None:
        """Stop the worker processes; the loader cannot be iterated afterwards."""
        close_workers(self)

    def _emit(self, keys: list) -> dict[str, Any]:
        samples = [self._live.pop(k) for k in keys]
        self.packs += 1
        n = sum(s.num_tokens for s in samples)
        self.real_tokens += n
        self.tiles += sum(s.tiles for s in samples)
        self.samples_packed += len(samples)
        return collate_pack(samples, image_size=self.cfg.image_size, pad_to_multiple=self.cfg.pad_to_multiple,
                            pad_id=self.tokenizer.pad_id, dataset_names=self.dataset_names)

    def _add(self, s: PackedSample) -> Optional[list]:
        self._live[s.key] = s
        return self.packer.add(s.key, s.num_tokens, s.tiles)

    def __next__(self) -> dict[str, Any]:
        while True:
            while self._pending:
                keys = self._add(self._pending.pop(0))
                if keys is not None:
                    return self._emit(keys)
            if self._exhausted:
                if self._drain is None:
                    self._drain = self.packer.flush()
                if not self._drain:
                    raise StopIteration
                return self._emit(self._drain.pop(0))
            if self._stream is None:
                self._stream = self._open_stream()
            try:
                j, res = next(self._stream)
            except StopIteration:
                self._exhausted = True
                continue
            if j != self._next_j:
                raise RuntimeError(f"data stream out of order: got sample {j}, expected {self._next_j}")
            self._next_j += 1
            self.skips.seen += 1
            if isinstance(res, Skip):
                self._record_skip(res)
                continue
            self._pending = list(res)

    def _record_skip(self, s: Skip) -> None:
        self.skips.record(s, self.cfg, f"on DP rank {self.dp_rank}")

    # -- statistics

    @property
    def fill_ratio(self) -> float:
        return self.real_tokens / (self.packs * self.cfg.max_tokens) if self.packs else 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "samples_read": self.skips.seen,
            "samples_skipped": self.skips.skipped,
            "skips_by_reason": self.skips.by_reason(),
            "skips": dict(self.skips.counts),
            "packs": self.packs,
            "packed_samples": self.samples_packed,
            "real_tokens": self.real_tokens,
            "tiles": self.tiles,
            "fill_ratio": self.fill_ratio,
        }

    # -- resume

    def state_dict(self) -> dict[str, Any]:
        if self._drain is not None:
            raise DataResumeError("cannot checkpoint a finite stream while it is being drained")
        return {
            "version": self.STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.cfg.seed,
            "datasets": list(self.dataset_names),
            "next_index": self._next_j,
            "pending": [list(s.key) for s in self._pending],
            "packer": self.packer.state_dict(),
            "skips": self.skips.state_dict(),
            "counters": [self.packs, self.real_tokens, self.tiles, self.samples_packed],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore before the first `next()`; rebuilds the buffered samples from their keys."""
        if self._stream is not None:
            raise DataResumeError("load_state_dict must be called before iterating the loader")
        if state.get("version") != self.STATE_VERSION:
            raise DataResumeError(f"data state version {state.get('version')} != {self.STATE_VERSION}")
        for k, mine in (("dp_rank", self.dp_rank), ("dp_size", self.dp_size), ("seed", self.cfg.seed),
                        ("datasets", self.dataset_names)):
            if state[k] != mine:
                raise DataResumeError(
                    f"data state was saved with {k}={state[k]!r} but this run has {mine!r}; "
                    "exact resume needs the same data-parallel layout, seed and datasets."
                )
        self._next_j = int(state["next_index"])
        self.packer.load_state_dict(state["packer"])
        self.skips.load_state_dict(state["skips"])
        self.packs, self.real_tokens, self.tiles, self.samples_packed = (int(x) for x in state["counters"])
        pending = [tuple(k) for k in state["pending"]]
        wanted = {tuple(k) for k in self.packer.buffered_items()} | set(pending)
        built: dict[tuple, PackedSample] = {}
        stream = SampleStream(self.builder, self.order, self.dp_rank, self.dp_size, 0)
        for j in sorted({k[0] for k in wanted}):
            res = stream.build(j)
            if isinstance(res, Skip):
                raise DataResumeError(f"sample {j} in the checkpointed pack buffer now fails to build: {res}")
            for s in res:
                built[tuple(s.key)] = s
        missing = wanted - set(built)
        if missing:
            raise DataResumeError(f"samples {sorted(missing)[:5]} of the checkpointed buffer no longer exist; "
                                  "did the data change since the checkpoint?")
        self._live = {k: built[k] for k in wanted - set(pending)}
        self._pending = [built[k] for k in pending]


class PackShardedLoader:
    """Every rank packs the global stream and keeps packs ``dp_rank, dp_rank + dp, ...``.

    The inner loader advances by ``dp_size`` packs per pack returned, so between micro-batches
    its state is the same on every rank, and a step's global batch does not depend on the DP size.
    """

    def __init__(self, inner: PackedDataLoader, dp_rank: int, dp_size: int):
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        self.inner, self.dp_rank, self.dp_size = inner, dp_rank, dp_size
        self.cfg, self.tokenizer, self.dataset_names = inner.cfg, inner.tokenizer, inner.dataset_names

    def __iter__(self) -> "PackShardedLoader":
        return self

    def close(self) -> None:
        self.inner.close()

    def __next__(self) -> dict[str, Any]:
        mine = None
        for i in range(self.dp_size):
            pack = next(self.inner)
            if i == self.dp_rank:
                mine = pack
        return mine

    def state_dict(self) -> dict[str, Any]:
        return {"shard_by": "pack", "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("shard_by") != "pack":
            raise DataResumeError("the data state was saved with data.shard_by=sample; resume with the same setting")
        self.inner.load_state_dict(state["inner"])

    @property
    def fill_ratio(self) -> float:
        return self.inner.fill_ratio

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()
