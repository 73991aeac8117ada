"""Run a function on N gloo ranks in spawned processes, with a hard timeout.

Each spawned process pays ~6.5 s of torch + megatron-core imports on 2 cores, so tests group
several checks into one call. A hang (a collective one rank never joins) kills every rank and
fails the test: it can never block CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, kwargs, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        result = fn(*args, **kwargs)
        # Plain pickle copies tensor data; the queue's own pickler would share memory with a
        # process that is about to exit.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # reported to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_internvl.parallel import distributed

            distributed.destroy()
        except Exception:
            pass


class RanksFailed(AssertionError):
    pass


def run_ranks(fn, world_size: int, *args, timeout: float = 240.0, **kwargs) -> list:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the per-rank results.

    ``fn`` must be importable (module level). Raises :class:`RanksFailed` with every failing
    rank's traceback, or on timeout.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, kwargs, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RanksFailed(
                    f"timeout after {timeout:.0f} s: ranks {sorted(set(range(world_size)) - set(results))} "
                    f"did not finish (a hang or a too slow test); finished: {sorted(results)}"
                )
            try:
                rank, status, value = queue.get(timeout=min(remaining, 1.0))
            except Exception:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise RanksFailed(f"ranks {dead} died without a result (exit codes "
                                      f"{[procs[i].exitcode for i in dead]})")
                continue
            results[rank] = (status, value)
            if status == "error":
                raise RanksFailed(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [pickle.loads(results[r][1]) for r in range(world_size)]
