"""Run a function on N local gloo ranks (spawned processes) for the converters.

A converted checkpoint for a TP x PP layout is written by TP x PP ranks together
(``dist_checkpointing.save``), each holding only its own model chunk. On one machine without a
launcher the converter starts those ranks itself. Ranks report progress lines to the parent,
which prints them; the first failing rank's error is raised in the parent and the other ranks
are stopped (they would otherwise wait forever in a collective). Conversion is CPU work: the
ranks never see a GPU (gloo, the CPU execution layer), also on GPU nodes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import sys
import time
import traceback

from . import ConversionError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Reporter:
    def __init__(self, queue, rank):
        self.queue, self.rank = queue, rank

    def __call__(self, text: str) -> None:
        self.queue.put((self.rank, "progress", text))


def _worker(fn, rank, world_size, port, threads, args, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",  # read at CUDA's first use
    )
    try:
        import torch

        torch.set_num_threads(threads)
        result = fn(*args, report=_Reporter(queue, rank))
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        user_error = isinstance(exc, ConversionError)
        queue.put((rank, "error", (user_error, str(exc) if user_error else traceback.format_exc())))
    finally:
        try:
            from megatron_internvl.parallel import distributed

            distributed.destroy()
        except Exception:
            pass


def run_on_ranks(fn, world_size: int, *args, timeout: float | None = None, log=None) -> list:
    """``fn(*args, report=...)`` on ``world_size`` spawned ranks; their results in rank order.

    ``fn`` must be importable at module level. ``log(text)`` receives progress lines (default:
    stderr). A :class:`ConversionError` raised on a rank is re-raised as is; any other failure
    is raised with the rank's traceback.
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, threads, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(results) < world_size:
            if deadline is not None and time.monotonic() > deadline:
                raise ConversionError(f"ranks did not finish within {timeout:.0f} s")
            try:
                rank, status, value = queue.get(timeout=1.0)
            except Exception:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(
                        f"rank(s) {dead} died without a result (exit codes "
                        f"{[procs[r].exitcode for r in dead]}; out of memory?)"
                    )
                continue
            if status == "progress":
                log(value)
            elif status == "ok":
                results[rank] = pickle.loads(value)
            else:
                user_error, text = value
                if user_error:
                    raise ConversionError(text)
                raise RuntimeError(f"rank {rank} failed:\n{text}")
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
