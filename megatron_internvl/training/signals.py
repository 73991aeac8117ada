"""Graceful stop: SIGTERM / SIGUSR1 or a time limit -> checkpoint at the next step boundary.

Slurm sends SIGUSR1 (``--signal=USR1@120``) or SIGTERM before a job's end; every rank saves at the
same step (the stop request is all-reduced) and the process exits with :data:`EXIT_REQUEUE` so the
sbatch script can requeue the job, which then resumes from the checkpoint.

:func:`install` runs first thing in the entry point, long before the model is built: a signal
that arrives while the ranks import and load is remembered (not fatal) and stops the run after
its first step.
"""

from __future__ import annotations

import signal
import time

EXIT_REQUEUE = 42
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: str | None = None


def _handler(signum, frame):
    global _received
    _received = signal.Signals(signum).name


def install() -> None:
    """Remember SIGTERM / SIGUSR1 from now on instead of dying of them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


class StopRequest:
    def __init__(self, time_limit_minutes: float | None = None):
        self.start = time.monotonic()
        self.limit_s = None if time_limit_minutes is None else 60.0 * time_limit_minutes
        install()

    @property
    def received(self) -> str | None:
        return _received

    def local_reason(self) -> str | None:
        if self.received:
            return self.received
        if self.limit_s is not None and time.monotonic() - self.start >= self.limit_s:
            return "time limit"
        return None

    def should_stop(self) -> str | None:
        """Agreed across all ranks: any rank's request stops everyone at the same step, and every
        rank names the same reason (the first of :data:`REASONS` any rank has), so rank 0 logs the
        signal even where the launcher delivered it to another rank first."""
        import torch

        from megatron_internvl.parallel.distributed import compute_device

        reason = self.local_reason()
        code = torch.tensor([len(REASONS) - REASONS.index(reason) if reason else 0], device=compute_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        code = int(code.item())
        return REASONS[len(REASONS) - code] if code else None


# Stop reasons, most telling first: one rank's signal names the stop on every rank.
REASONS = tuple(s.name for s in STOP_SIGNALS) + ("time limit",)
