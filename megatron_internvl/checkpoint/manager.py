"""Training checkpoints: model + optimizer + scheduler + RNG + data state, atomic, keep-last-k.

``save_dir/iter_0000010/`` directories plus a ``latest`` marker (:mod:`.layout`). A save is
written to ``iter_N.tmp``, gets a ``complete.json`` listing every file and its size, is renamed
and only then named by ``latest``; resume takes the newest checkpoint that verifies, so a
requeued job whose last save was cut short continues from the one before.
"""

from __future__ import annotations

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

from .io import barrier, chunks_sharded_state_dict, is_rank0, load_chunks
from .layout import COMPLETE, HF_SUBDIR, LATEST, CheckpointError, copy_hf_files, write_model_yaml
from .optimizer_compat import prime_optimizer_state, skip_torch_adam_step_on_load, unshare_adam_steps

logger = logging.getLogger("megatron_internvl.checkpoint")

# Canonical per-parameter optimizer state: resumable under another TP, PP or DP size.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


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


def _write_complete_marker(directory: Path) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != COMPLETE}
    (directory / COMPLETE).write_text(json.dumps({"files": files}, indent=0))


def verify_checkpoint(directory: Path) -> str | None:
    """None if the checkpoint is complete, else what is wrong with it."""
    marker = directory / COMPLETE
    if not marker.is_file():
        return "no complete.json (the save that wrote it did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable complete.json ({exc})"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"file {name} has {path.stat().st_size} bytes, {size} were written"
    return None


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

    @staticmethod
    def name(step: int) -> str:
        return f"iter_{step:07d}"

    def candidates(self) -> list[Path]:
        """Checkpoints newest first: the ``latest`` marker's, then the others by step."""
        if not self.dir.is_dir():
            return []
        found = sorted((p for p in self.dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")),
                       reverse=True)
        marker = self.dir / LATEST
        if marker.is_file():
            named = self.dir / marker.read_text().strip()
            if named in found:
                found.remove(named)
                found.insert(0, named)
        return found

    def latest_valid(self) -> Path | None:
        for path in self.candidates():
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            logger.warning("checkpoint %s is unusable (%s); trying the previous one", path, problem)
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
        state = chunks_sharded_state_dict(chunks)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=_OPTIM_METADATA)
        state.update(_per_rank_objects(data_state, with_rng=True, data_global=data_global))
        state["common"] = {"step": step, "scheduler": scheduler.state_dict(), "layout": _layout(),
                           "data_global": data_global,
                           **(common or {})}
        model_cfg = (common or {}).get("config", {}).get("model")
        publish = functools.partial(self._publish, tmp, target, model_cfg, time.monotonic())
        if not self.async_save:
            dist_checkpointing.save(state, str(tmp))
            barrier()
            publish()
            barrier()
            return target
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(publish)
        self._queue().schedule_async_request(request)
        return target

    def _publish(self, tmp: Path, target: Path, model_cfg: dict | None, started: float) -> None:
        """Rank 0, after every rank's files are on disk: sidecar, complete.json, rename, latest."""
        if not is_rank0():
            return
        if model_cfg is not None:
            # Same sidecar as converted checkpoints: `convert export` works on this directory.
            write_model_yaml(tmp, model_cfg)
        if self.hf_files is not None:
            copy_hf_files(self.hf_files, tmp / HF_SUBDIR)
        _write_complete_marker(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        if self.hf_files is not None:
            self.hf_files = target / HF_SUBDIR
        marker_tmp = self.dir / (LATEST + ".tmp")
        marker_tmp.write_text(target.name)
        os.replace(marker_tmp, self.dir / LATEST)
        for old in self.candidates()[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s complete (%.1f s after the save began)", target,
                    time.monotonic() - started)

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
            self._async_queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until a background save is written and published."""
        if self.pending:
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
        if finetune:
            # Weights only: also what a converter checkpoint (`convert import`) holds, which has
            # no common training state to read.
            loaded = dist_checkpointing.load(state, str(path))
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
        prime_optimizer_state(optimizer)
        skip_torch_adam_step_on_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
        state.update(_per_rank_objects({} if data_state_wanted else None, with_rng=same_layout,
                                       data_global=saved_global))
        loaded = dist_checkpointing.load(state, str(path))
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
