"""Distributed initialisation: launcher environment -> process group -> megatron parallel state.

Works under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) and under
a bare ``srun`` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODELIST), and as a single
process with no launcher at all. Picks nccl with CUDA, gloo otherwise (installing the CPU
execution layer of :mod:`.cpu`), then builds megatron-core's TP x CP x DP x PP groups.
"""

from __future__ import annotations

import datetime
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from . import cpu


@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. ``gpu[01-03,07],login1``."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(\[([^\]]*)\])?", nodelist):
        prefix, _, ranges = match.groups()
        prefix = prefix.strip()
        if not prefix:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}")
    return hosts


def read_launch_env(environ=None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        hosts = expand_slurm_nodelist(nodelist)
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR", hosts[0] if hosts else "127.0.0.1"),
            # Derived from the job id so two jobs sharing a node do not collide.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    # A single process needs a store too: a free port unless one is given, so that several
    # single-process runs (tests, tools) can share a machine.
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compute_device() -> torch.device:
    """Where this rank computes and where its collectives' tensors must live (NCCL: the GPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed every RNG of this rank. megatron's tracker adds the TP-rank offsets on top."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize(parallel, seed: int = 1234) -> LaunchEnv:
    """Initialise torch.distributed and megatron-core's parallel state from a ParallelConfig
    (``parallel.timeout_minutes`` for the default process group and megatron's groups)."""
    from megatron.core import parallel_state

    timeout_minutes = parallel.timeout_minutes

    launch = read_launch_env()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu.install()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        if use_cuda:
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel.validate_world_size(launch.world_size)
    _destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=getattr(parallel, "expert_parallel", 1),
        distributed_timeout_minutes=max(1, round(timeout_minutes)),
    )
    seed_everything(seed)
    return launch


def _destroy_model_parallel() -> None:
    """Forget megatron's groups and close them.

    ``parallel_state.destroy_model_parallel`` only drops megatron's references; each gloo group
    keeps its threads (three per group) and sockets until it is destroyed, so a process that
    re-initialises for several layouts in turn (converters, evaluation, tests) would pile up
    hundreds of idle threads per layout. Every group but the default one is megatron's or was
    derived from its layout, so all of them go.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        from torch.distributed.distributed_c10d import GroupMember, _world

        for group in list(_world.pg_map):
            if group is not GroupMember.WORLD:
                torch.distributed.destroy_process_group(group)


def destroy() -> None:
    _destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
