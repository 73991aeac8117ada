"""Distributed checkpoints (megatron-core ``dist_checkpointing``, ``torch_dist`` format).

Every rank saves its shards together; loading reshards, so a checkpoint written at one TP x PP
layout loads into any other. Writes go to a temporary directory that is renamed into place only
when complete, so an interrupted save never leaves something that looks like a checkpoint.
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
from megatron.core import dist_checkpointing

from megatron_internvl.convert.checkpoint import HF_SUBDIR, copy_hf_files


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def model_sharded_state_dict(models) -> dict:
    if not isinstance(models, (list, tuple)):
        models = [models]
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def save_model_checkpoint(models, directory: str | os.PathLike, extra_sharded: dict | None = None,
                          overwrite: bool = False) -> Path:
    """Save the model chunks (and optional extra sharded state) atomically into ``directory``."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"checkpoint directory {directory} exists; refusing to overwrite it")
    tmp = directory.with_name(directory.name + ".tmp")
    if _is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    state = model_sharded_state_dict(models)
    if extra_sharded:
        state.update(extra_sharded)
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _is_rank0():
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    _barrier()
    return directory


def load_model_checkpoint(models, directory: str | os.PathLike) -> None:
    """Load model weights from a checkpoint written at any parallel layout."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{directory} is not a megatron distributed checkpoint (no metadata.json): "
            f"check the path, or whether the save that wrote it was interrupted"
        )
    if not isinstance(models, (list, tuple)):
        models = [models]
    loaded = dist_checkpointing.load(model_sharded_state_dict(models), str(directory))
    if len(models) == 1:
        models[0].load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(models):
            m.load_state_dict(loaded[f"model{i}"])


# --------------------------------------------------------------------------------------------
# Training checkpoints: model + optimizer + scheduler + RNG + data state, atomic, keep-last-k.


logger = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "complete.json"
# Model fields that may change between a checkpoint and a resume (they do not change weights).
_RESUMABLE_MODEL_FIELDS = {"spec", "recompute", "fused_loss", "vision.drop_path_rate"}


# Canonical per-parameter optimizer state: resumable under another TP, PP or DP size.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
    }


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank_objects(data_state, with_rng: bool, data_global: bool = False) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

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


def _model_state(chunks) -> dict:
    modules = [getattr(c, "module", c) for c in chunks]
    return model_sharded_state_dict(modules)


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


def _flatten_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def check_model_config_matches(saved: dict, current: dict, path) -> None:
    a, b = _flatten_dict(saved), _flatten_dict(current)
    for key in sorted(set(a) | set(b)):
        if key in _RESUMABLE_MODEL_FIELDS:
            continue
        if a.get(key) != b.get(key):
            raise CheckpointError(
                f"checkpoint {path} was trained with model.{key}={a.get(key)!r} but the config has "
                f"model.{key}={b.get(key)!r}: use the checkpoint's model settings (see its "
                f"config in the run directory), or start a new run directory"
            )


def is_training_checkpoint(path: Path) -> bool:
    """True for a checkpoint with optimizer/scheduler/data state, False for weights only."""
    try:
        return "common" in dist_checkpointing.load_common_state_dict(str(path))
    except Exception:  # no common.pt: written by save_model_checkpoint without extras
        return False


def saved_model_config(path: Path) -> dict | None:
    """The model section a checkpoint was written with (training or converter checkpoints)."""
    import yaml

    from megatron_internvl.convert.checkpoint import MODEL_YAML

    sidecar = Path(path) / MODEL_YAML
    if sidecar.is_file():
        data = yaml.safe_load(sidecar.read_text()) or {}
        return data.get("model", data)
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
        if _is_rank0():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        state = _model_state(chunks)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=_OPTIM_METADATA)
        state.update(_per_rank_objects(data_state, with_rng=True, data_global=data_global))
        state["common"] = {"step": step, "scheduler": scheduler.state_dict(), "layout": _layout(),
                           "data_global": data_global,
                           **(common or {})}
        model_cfg = (common or {}).get("config", {}).get("model")
        publish = functools.partial(self._publish, tmp, target, model_cfg, time.monotonic())
        if not self.async_save:
            dist_checkpointing.save(state, str(tmp))
            _barrier()
            publish()
            _barrier()
            return target
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(publish)
        self._queue().schedule_async_request(request)
        return target

    def _publish(self, tmp: Path, target: Path, model_cfg: dict | None, started: float) -> None:
        """Rank 0, after every rank's files are on disk: sidecar, complete.json, rename, latest."""
        if not _is_rank0():
            return
        if model_cfg is not None:
            # Same sidecar as converted checkpoints: `convert export` works on this directory.
            import yaml

            from megatron_internvl.convert.checkpoint import MODEL_YAML

            (tmp / MODEL_YAML).write_text(yaml.safe_dump({"model": model_cfg}, sort_keys=False))
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
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

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
        state = _model_state(chunks)
        if finetune:
            # Weights only: also what a converter checkpoint (`convert import`) holds, which has
            # no common training state to read.
            loaded = dist_checkpointing.load(state, str(path))
            _load_models(chunks, loaded)
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
        _prime_optimizer_state(optimizer)
        _skip_torch_adam_step_on_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
        state.update(_per_rank_objects({} if data_state_wanted else None, with_rng=same_layout,
                                       data_global=saved_global))
        loaded = dist_checkpointing.load(state, str(path))
        _load_models(chunks, loaded)
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
        scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        result = dict(common)
        if data_state_wanted:
            result["data_state"] = loaded["data_state"]
        return result


def _prime_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam a (zero) state with a ``step`` before loading into it.

    Without apex or TE, megatron's distributed optimizer reads ``step`` from the inner torch
    optimizer's state, which megatron's own state initialiser does not create, so loading into an
    optimizer that has not stepped yet fails on an assertion.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                st.setdefault("step", torch.tensor(0.0))


def _skip_torch_adam_step_on_load(optimizer) -> None:
    """megatron 0.16.1 without apex/TE keeps torch Adam's ``step`` inside the per-parameter state,
    but its fully-reshardable loader copies every state key from tensors that never contain
    ``step`` (it restores ``step`` from the param groups instead): skip that key."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or getattr(setter, "_skips_step", False):
            continue

        def patched(model_param, tensors, _opt=opt):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            state = _opt.optimizer.state[main_param]
            if "step" in state and "step" not in tensors and not \
                    _opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                main_param.detach().copy_(tensors["param"])
                for key, value in state.items():
                    if key != "step":
                        value.copy_(tensors[key])
                return
            return setter(model_param, tensors)

        patched._skips_step = True
        opt._set_main_param_and_optimizer_states = patched


def _unshare_adam_steps(optimizer) -> None:
    """After a load, megatron (no apex/TE) gives every parameter the *same* ``step`` tensor, which
    torch Adam then increments in place once per parameter: give each its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def _load_models(chunks, loaded: dict) -> None:
    modules = [getattr(c, "module", c) for c in chunks]
    if len(modules) == 1:
        modules[0].load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(modules):
            m.load_state_dict(loaded[f"model{i}"])


def load_component(chunks, directory: str | os.PathLike, prefixes: tuple[str, ...]) -> int:
    """Load only the parameters under ``prefixes`` (e.g. ``language_model.``) from a model
    checkpoint: component-wise initialisation (InternVL's progressive scaling reuses a ViT trained
    with a smaller LLM). Returns the number of tensors loaded."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise CheckpointError(f"{directory} is not a megatron distributed checkpoint (no metadata.json)")
    modules = [getattr(c, "module", c) for c in chunks]
    count = 0
    for i, module in enumerate(modules):
        key = "model" if len(modules) == 1 else f"model{i}"
        full = module.sharded_state_dict()
        wanted = {k: v for k, v in full.items() if k.startswith(prefixes)}
        if not wanted:
            continue
        loaded = dist_checkpointing.load({key: wanted}, str(directory))
        missing, unexpected = module.load_state_dict(loaded[key], strict=False)
        if unexpected:
            raise CheckpointError(f"unexpected tensors from {directory}: {unexpected[:5]}")
        count += len(wanted)
    return count
