"""Training checkpoints: model + optimizer + scheduler + RNG + data state, atomic, keep-last-k.

``save_dir/iter_0000010/`` directories plus a ``latest`` marker (:mod:`.layout`). A save is
written to ``iter_N.tmp``, gets a ``complete.json`` listing every file, its size and its BLAKE2b
hash, is renamed and only then named by ``latest``; resume takes the newest checkpoint that
verifies (sizes and content), so a requeued job whose last save was cut short or damaged continues
from the one before.

Hashes are computed by the rank that wrote each shard right after writing it (inside the forked
writer with ``async_save``, off the training's critical path), from files still in the page
cache; rank 0 adds the small files when it publishes. Retention deletes old checkpoints only after
the new one is published, and never the newest or the one ``latest`` names.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from .io import barrier, chunks_sharded_state_dict, is_rank0, load_chunks, load_sharded, prepare_writer
from megatron_internvl.config.errors import FaultError
from megatron_internvl.parallel.distributed import compute_device

from .layout import (HF_SUBDIR, LATEST, CheckpointDamagedError, CheckpointError, checkpoint_size, copy_hf_files,
                     hash_files, list_checkpoints, verify_checkpoint, write_complete_marker, write_model_yaml)
from .optimizer_compat import prime_optimizer_state, skip_torch_adam_step_on_load, unshare_adam_steps

logger = logging.getLogger("megatron_internvl.checkpoint")

# Canonical per-parameter optimizer state: resumable under another TP, PP or DP size.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def optimizer_parts(optimizer) -> int:
    """How many optimizers megatron chained (dense, and experts when expert_parallel > 1): the
    structure of the saved optimizer state."""
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def _layout() -> dict:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
    }


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank_objects(data_state, with_rng: bool, data_global: bool = False) -> dict:
    out = {}
    if data_state is not None and data_global:
        # The planned loader's state is the position in the global plan, the same on every rank:
        # one object (global rank 0's), loadable at any DP size.
        out["data_state"] = ShardedObject("data_plan", data_state, (1,), (0,),
                                          replica_id=torch.distributed.get_rank())
    elif data_state is not None:
        tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        replica = tp + ps.get_tensor_model_parallel_world_size() * (
            pp + ps.get_pipeline_model_parallel_world_size() * ps.get_context_parallel_rank())
        out["data_state"] = ShardedObject(
            "data_state", data_state, (ps.get_data_parallel_world_size(),),
            (ps.get_data_parallel_rank(),), replica_id=replica)
    if with_rng:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        out["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return out


_HASHES = ".hashes"  # per-rank hash lists inside iter_N.tmp, merged into complete.json by rank 0


class DiskFullError(FaultError):
    """No room for a checkpoint (before or during the save); the previous ones are untouched."""


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _hash_own_shards(tmp: Path, rank: int) -> None:
    """Hash the shards this rank wrote (``__<rank>_*.distcp``) into ``.hashes/rank_<rank>.json``."""
    mine = sorted(tmp.glob(f"__{rank}_*"))
    digests = {str(p.relative_to(tmp)): d for p, d in hash_files(mine).items()}
    (tmp / _HASHES).mkdir(exist_ok=True)
    (tmp / _HASHES / f"rank_{rank}.json").write_text(json.dumps(digests))


def _write_then_hash(write_fn, tmp: Path, rank: int, *args, **kwargs):
    """The async writer's job: write this rank's shards, then hash them (in the forked writer)."""
    result = write_fn(*args, **kwargs) if write_fn is not None else None
    _hash_own_shards(tmp, rank)
    return result


def _collect_hashes(tmp: Path) -> dict[str, str]:
    known = {}
    folder = tmp / _HASHES
    for part in sorted(folder.glob("rank_*.json")) if folder.is_dir() else []:
        known.update(json.loads(part.read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    return known


def _is_disk_full(exc: BaseException, where: Path) -> bool:
    """ENOSPC anywhere in the exception chain, or a write error with (almost) no space left
    (torch's zip writer reports ENOSPC as ``RuntimeError: ... unexpected pos``)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where).free < (64 << 20)
    except OSError:
        return False


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def verify_everywhere(path: Path) -> str | None:
    """:func:`verify_checkpoint` with the hashing split over the ranks; all ranks get the verdict."""
    rank, world = _rank_world()
    problem = verify_checkpoint(path, share=(rank, world))
    if world == 1:
        return problem
    problems = [None] * world
    torch.distributed.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


class CheckpointManager:
    """``save_dir/iter_0000010/`` directories plus a ``latest`` marker, newest ``keep_last`` kept."""

    def __init__(self, save_dir: str | os.PathLike, keep_last: int = 3, async_save: bool = False,
                 hf_files: Path | None = None):
        self.dir = Path(save_dir)
        self.keep_last = keep_last
        self.async_save = async_save
        self._async_queue = None
        # The HF files (config.json, tokenizer, remote code) of the checkpoint this run started
        # from, carried into every save so that `convert export` restores them; afterwards taken
        # from the newest save (the starting checkpoint may be rotated away).
        self.hf_files = hf_files if hf_files is not None and Path(hf_files).is_dir() else None
        self._in_flight: Path | None = None

    @staticmethod
    def name(step: int) -> str:
        return f"iter_{step:07d}"

    def candidates(self) -> list[Path]:
        """Checkpoints newest first: the ``latest`` marker's, then the others by step."""
        return list_checkpoints(self.dir)

    def latest_valid(self, strict: bool = False) -> Path | None:
        """The newest checkpoint whose files match its complete.json (sizes and hashes, each rank
        hashing its share of the files). A damaged one is named and the previous one used; with
        ``strict`` (a checkpoint given explicitly) a damaged newest one is an error."""
        for path in self.candidates():
            problem = verify_everywhere(path)
            if problem is None:
                return path
            if strict:
                raise CheckpointDamagedError(
                    f"checkpoint {path} is unusable: {problem}. Give another checkpoint (an older "
                    f"iter_* directory) or run `megatron-internvl verify-checkpoint {path.parent}`")
            if _rank_world()[0] == 0:
                logger.warning("checkpoint %s is unusable (%s); using the previous complete checkpoint",
                               path, problem)
        if self.candidates():
            # Starting over would silently lose the run's progress (and rotate the evidence away).
            raise CheckpointDamagedError(
                f"no usable checkpoint in {self.dir}: every one is damaged (the warnings above name "
                f"the files). Restore one, or move them away to start from the beginning")
        return None

    def save(self, step: int, chunks, optimizer, scheduler, *, data_state=None, common=None,
             data_global: bool = False) -> Path:
        """Write ``iter_<step>`` (all ranks). With ``async_save`` the tensors are written by a
        background process and the checkpoint is published by a later :meth:`poll` or
        :meth:`wait`; until then ``latest`` still names the previous one."""
        self.wait()  # at most one save in flight: bounded host memory, ordered publication
        target = self.dir / self.name(step)
        tmp = target.with_name(target.name + ".tmp")
        if is_rank0():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        self._check_free_space(chunks, tmp)
        state = chunks_sharded_state_dict(chunks)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=_OPTIM_METADATA)
        state.update(_per_rank_objects(data_state, with_rng=True, data_global=data_global))
        state["common"] = {"step": step, "scheduler": scheduler.state_dict(), "layout": _layout(),
                           "data_global": data_global, "optimizer_parts": optimizer_parts(optimizer),
                           **(common or {})}
        model_cfg = (common or {}).get("config", {}).get("model")
        publish = functools.partial(self._publish, tmp, target, model_cfg, time.monotonic())
        rank = _rank_world()[0]
        prepare_writer()
        if not self.async_save:
            with self._disk_full_reported(tmp):
                dist_checkpointing.save(state, str(tmp))
                _hash_own_shards(tmp, rank)  # from the page cache: see docs/training.md for the cost
                barrier()
                publish()
            barrier()
            return target
        with self._disk_full_reported(tmp):
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request = request._replace(
            async_fn=functools.partial(_write_then_hash, request.async_fn, tmp, rank))
        request.add_finalize_fn(publish)
        self._in_flight = tmp
        self._queue().schedule_async_request(request)
        return target

    def _expected_size(self, chunks) -> tuple[int, str]:
        """Bytes the next save needs: the previous checkpoint's size, else an estimate from the
        parameter count (weights in their dtype + fp32 main weights and two Adam moments)."""
        for path in self.candidates():
            size = checkpoint_size(path)
            if size:
                return size, f"the size of {path.name}"
        params = [p for c in chunks for p in c.parameters()]
        local = torch.tensor([float(sum(p.numel() * (p.element_size() + 12) for p in params))],
                             dtype=torch.float64, device=compute_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(local)  # every rank's shards; DP replicas count once
            local /= ps.get_data_parallel_world_size()
        return int(local.item()), "an estimate from the parameter count"

    def _check_free_space(self, chunks, tmp: Path) -> None:
        """Stop before writing if the destination cannot hold the checkpoint (every rank agrees)."""
        expected, basis = self._expected_size(chunks)
        free = shutil.disk_usage(tmp).free
        short = torch.tensor([1.0 if free < expected else 0.0], device=compute_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(short, op=torch.distributed.ReduceOp.MAX)
        if not short.item():
            return
        message = (f"{self.dir} has {_gib(free)} free but the checkpoint needs about {_gib(expected)} "
                   f"({basis})")
        if basis.startswith("an estimate"):  # an upper bound (frozen weights have no Adam state)
            if is_rank0():
                logger.warning("%s; saving anyway", message)
            return
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(f"{message}: free space there (or lower checkpoint.keep_last); "
                            f"the previous checkpoints are untouched")

    @contextlib.contextmanager
    def _disk_full_reported(self, tmp: Path):
        """ENOSPC while writing: remove the partial folder, say so (the previous checkpoints and
        ``latest`` are untouched)."""
        try:
            yield
        except Exception as exc:
            if not _is_disk_full(exc, self.dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFullError(
                f"no space left on device while writing checkpoint {tmp.name} in {self.dir}: the "
                f"partial folder was removed and the previous checkpoints are untouched; free space "
                f"and restart the same command to resume from {self._newest_name()}") from exc

    def _newest_name(self) -> str:
        marker = self.dir / LATEST
        return marker.read_text().strip() if marker.is_file() else "the beginning (no checkpoint yet)"

    def _publish(self, tmp: Path, target: Path, model_cfg: dict | None, started: float) -> None:
        """Rank 0, after every rank's files are on disk: sidecar, complete.json, rename, latest."""
        if not is_rank0():
            return
        if model_cfg is not None:
            # Same sidecar as converted checkpoints: `convert export` works on this directory.
            write_model_yaml(tmp, model_cfg)
        if self.hf_files is not None:
            copy_hf_files(self.hf_files, tmp / HF_SUBDIR)
        write_complete_marker(tmp, _collect_hashes(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        if self.hf_files is not None:
            self.hf_files = target / HF_SUBDIR
        marker_tmp = self.dir / (LATEST + ".tmp")
        marker_tmp.write_text(target.name)
        os.replace(marker_tmp, self.dir / LATEST)
        self._retire_old(target)
        logger.info("checkpoint %s complete (%.1f s after the save began)", target,
                    time.monotonic() - started)

    def _retire_old(self, newest: Path) -> None:
        """Delete all but the newest ``keep_last`` (at least 1), only after ``newest`` is published;
        never ``newest`` nor the one ``latest`` names."""
        marker = self.dir / LATEST
        keep = {newest, self.dir / marker.read_text().strip()} if marker.is_file() else {newest}
        for old in self.candidates()[max(1, self.keep_last):]:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    # Asynchronous saves. Each call below is a collective: every rank calls it at the same point.
    def _queue(self):
        if self._async_queue is None:
            # Forked writers (not the persistent spawned worker): on CPU, tensors are not copied
            # before the write, and a fork is what keeps the optimizer's next updates out of them.
            self._async_queue = AsyncCallsQueue(persistent=False)
        return self._async_queue

    @property
    def pending(self) -> int:
        return 0 if self._async_queue is None else self._async_queue.get_num_unfinalized_calls()

    def poll(self) -> None:
        """Publish a background save if every rank has finished writing it (once per step)."""
        if self.pending:
            with self._disk_full_reported(self._in_flight):
                self._async_queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until a background save is written and published."""
        if self.pending:
            with self._disk_full_reported(self._in_flight):
                self._async_queue.maybe_finalize_async_calls(blocking=True)

    def abort(self) -> None:
        """Kill a background writer without publishing (after an error on some ranks, when
        collectives are unsafe); its ``.tmp`` directory is never taken for a checkpoint."""
        if self._async_queue is not None:
            self._async_queue.close(abort=True)
            self._async_queue = None

    @staticmethod
    def read_common(path: Path) -> dict:
        return dist_checkpointing.load_common_state_dict(str(path))["common"]

    @staticmethod
    def load(path: Path, chunks, optimizer, scheduler, *, data_state_wanted: bool,
             finetune: bool = False, data_global: bool = False) -> dict:
        """Load into the chunks (and optimizer, scheduler, RNG unless ``finetune``).

        Returns the checkpoint's common state plus ``data_state``: a global one (``data_global``,
        the planned loader) at any DP size, a per-rank one at the same DP size. RNG is restored
        only under the same layout."""
        state = chunks_sharded_state_dict(chunks)
        model_entries = tuple(state)
        if finetune:
            # Weights only: also what a converter checkpoint (`convert import`) holds, which has
            # no common training state to read.
            loaded = load_sharded(state, path, model_entries)
            load_chunks(chunks, loaded)
            return {"step": 0}
        common = CheckpointManager.read_common(path)
        same_layout = common["layout"] == _layout()
        same_dp = common["layout"]["dp"] == _layout()["dp"]
        saved_global = bool(common.get("data_global", False))
        if data_state_wanted and saved_global != data_global:
            raise CheckpointError(
                f"{path} holds a {'global (data.shard_by=global)' if saved_global else 'per-rank'} data "
                f"state but this run reads data {'globally' if data_global else 'per rank'}: resume with "
                f"the checkpoint's data.shard_by, or set checkpoint.finetune=true to start a new data "
                f"stream from these weights")
        if data_state_wanted and not same_dp and not data_global:
            raise CheckpointError(
                f"{path} was saved with data-parallel size {common['layout']['dp']} and this run has "
                f"{_layout()['dp']}: a per-rank data stream (data.shard_by=sample/pack) can only "
                f"resume at the same DP size (TP/PP may change). Keep the DP size, or set "
                f"checkpoint.finetune=true to start a new data stream from these weights (runs with "
                f"data.shard_by=global, the default, resume at any DP size)"
            )
        saved_parts = common.get("optimizer_parts")  # absent in checkpoints before it was recorded
        if saved_parts is not None and saved_parts != optimizer_parts(optimizer):
            raise CheckpointError(
                f"{path} holds the optimizer state of {saved_parts} optimizer(s) and this run builds "
                f"{optimizer_parts(optimizer)}: megatron keeps MoE experts in the dense optimizer at "
                f"parallel.expert_parallel=1 and in one of their own above 1, and cannot map one onto the "
                f"other. Resume with expert_parallel=1 on both sides or above 1 on both sides (any EP "
                f"size above 1 reshards), or set checkpoint.finetune=true to take the weights with a "
                f"fresh optimizer")
        prime_optimizer_state(optimizer)
        skip_torch_adam_step_on_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
        state.update(_per_rank_objects({} if data_state_wanted else None, with_rng=same_layout,
                                       data_global=saved_global))
        loaded = load_sharded(state, path, model_entries)
        load_chunks(chunks, loaded)
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
        scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        result = dict(common)
        if data_state_wanted:
            result["data_state"] = loaded["data_state"]
        return result
