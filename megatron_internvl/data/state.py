"""The data stream's bookkeeping shared by every loader: skip counting and its limit, and the
errors raised when a checkpointed data state cannot be restored."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from megatron_internvl.config.data import DataConfig
from megatron_internvl.config.errors import InternVLError

from .samples import Skip

logger = logging.getLogger("megatron_internvl.data")


class DataSkipRatioError(InternVLError, RuntimeError):
    """Too large a share of the samples read so far were skipped (met by one data reader)."""

    every_rank = False


class DataResumeError(InternVLError, RuntimeError):
    """A checkpointed data state cannot be restored onto this configuration or data."""


def passthrough(item):
    """DataLoader collate function: the workers already yield whole packs."""
    return item


def close_workers(owner) -> None:
    """Stop the data-loader worker processes of the iterators ``owner`` holds, now.

    Left to the garbage collector (our loaders hold their DataLoader in a reference cycle), torch
    tears an iterator down after parts of it are gone, and each worker then waits out a 5 s join
    timeout before it is killed: seconds per worker at the end of training or evaluation."""
    for name, value in list(vars(owner).items()):
        shutdown = getattr(value, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
            setattr(owner, name, None)


@dataclass
class SkipStats:
    """Skips counted per (dataset, reason), with the last file:line seen for each."""

    seen: int = 0
    skipped: int = 0
    counts: dict = field(default_factory=dict)     # "dataset/reason" -> n
    last: dict = field(default_factory=dict)       # "dataset/reason" -> "file:line"

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, n in self.counts.items():
            r = k.rsplit("/", 1)[1]
            out[r] = out.get(r, 0) + n
        return out

    def record(self, s: Skip, cfg: DataConfig, where: str, log: bool = True) -> None:
        """Count one skip, log it (rate-limited), and enforce data.max_skip_ratio."""
        self.skipped += 1
        k = f"{s.dataset}/{s.reason}"
        self.counts[k] = self.counts.get(k, 0) + 1
        self.last[k] = f"{s.file}:{s.line}"
        n = self.counts[k]
        if log and n <= cfg.skip_warnings:
            logger.warning("%s", s)
        elif log and n & (n - 1) == 0:
            logger.warning("%s (%d %r skips so far in %r; logging every power of two from now on)",
                           s, n, s.reason, s.dataset)
        if self.seen >= cfg.skip_ratio_warmup and self.skipped > cfg.max_skip_ratio * self.seen:
            detail = ", ".join(f"{key}: {c} (last {self.last[key]})" for key, c in sorted(self.counts.items()))
            raise DataSkipRatioError(
                f"{self.skipped} of {self.seen} samples read {where} were skipped "
                f"({self.skipped / self.seen:.1%} > data.max_skip_ratio={cfg.max_skip_ratio}). "
                f"By dataset/reason: {detail}. Fix or remove the bad data, or raise data.max_skip_ratio."
            )

    def state_dict(self) -> dict:
        return {"seen": self.seen, "skipped": self.skipped, "counts": dict(self.counts), "last": dict(self.last)}

    def load_state_dict(self, d: dict) -> None:
        self.seen, self.skipped = int(d["seen"]), int(d["skipped"])
        self.counts, self.last = dict(d["counts"]), dict(d["last"])


