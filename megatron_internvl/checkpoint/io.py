"""Model weights in megatron-core distributed checkpoints (``dist_checkpointing``, ``torch_dist``).

Every rank saves its shards together; loading reshards, so a checkpoint written at one TP x PP
layout loads into any other. Writes go to a temporary directory that is renamed into place only
when complete, so an interrupted save never leaves something that looks like a checkpoint.

The model chunks sit under ``"model"`` (one chunk) or ``"model0"``, ``"model1"``, ... (virtual
pipeline stages), in training and converter checkpoints alike.

Both layer specs store the same tensors under the same keys (models/specs.py); they differ only in
Transformer Engine's ``_extra_state`` objects (FP8 scaling metadata of TE linears and attention;
megatron's local linears store ``None`` under the linears' names, the project's local attention
stores nothing). Every model load goes through :func:`load_sharded`, which makes that the only
allowed difference: an ``_extra_state`` the checkpoint lacks is restored as ``None`` (TE's
``set_extra_state(None)`` restores nothing), one the model does not want is ignored, and any other
tensor missing on either side stops the load, naming it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory
from megatron.core.dist_checkpointing.validation import StrictHandling

from .layout import CheckpointError

EXTRA_STATE = "_extra_state"  # TE's per-module state; "_extra_state1", ... for grouped GEMMs


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def model_sharded_state_dict(models) -> dict:
    if not isinstance(models, (list, tuple)):
        models = [models]
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def chunks_sharded_state_dict(chunks) -> dict:
    """:func:`model_sharded_state_dict` of training chunks (DDP-wrapped or not)."""
    modules = [getattr(c, "module", c) for c in chunks]
    return model_sharded_state_dict(modules)


def load_chunks(chunks, loaded: dict) -> None:
    """Copy the model part of a loaded state into the chunks (DDP-wrapped or not)."""
    modules = [getattr(c, "module", c) for c in chunks]
    if len(modules) == 1:
        modules[0].load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(modules):
            m.load_state_dict(loaded[f"model{i}"])


def prepare_writer() -> None:
    """Give megatron's checkpoint writer its results queue before the first save.

    megatron-core 0.16 creates it on the first save as a ``Manager`` in a *spawned* process, which
    re-imports the launching module (``megatron_internvl.train``: torch, megatron-core, the model
    code) before it answers: every process's first save waited that long (7-18 s of a 2-core
    machine's time per process; the whole import on a cluster's rank). A ``Manager`` in a forked
    process needs no import; megatron forks its file writers from this process on every save
    anyway. Kept where megatron keeps it, so its own code finds it; a no-op if a later
    megatron-core stores it elsewhere."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def is_extra_state(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith(EXTRA_STATE)


def _sharded_keys(tree) -> list[str]:
    """The checkpoint keys a (nested) sharded state dict reads; a factory's are those it builds
    (the ViT's TP padding trim is one: its per-layer keys come from the build)."""
    if isinstance(tree, ShardedTensorFactory):
        return _sharded_keys(tree.build())
    if isinstance(tree, ShardedBase):
        return [tree.key]
    if isinstance(tree, dict):
        return [k for v in tree.values() for k in _sharded_keys(v)]
    if isinstance(tree, (list, tuple)):
        return [k for v in tree for k in _sharded_keys(v)]
    return []


def _restore_absent_as_none(request, loaded, absent: set[str]) -> None:
    """Put ``None`` where the request asked for an object the checkpoint lacks (megatron dropped
    it from the request), so that ``load_state_dict`` hands it to the module's ``set_extra_state``."""
    for name, value in request.items():
        if isinstance(value, ShardedBase) and value.key in absent:
            loaded[name] = None
        elif isinstance(value, dict):
            _restore_absent_as_none(value, loaded.setdefault(name, {}), absent)


def _listed(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _union_over_ranks(*key_sets: set[str]) -> list[set[str]]:
    """The union over all ranks of each of a few sets of keys, in one collective. Only key strings
    travel (layers stack under one key, so a rank requests a few hundred model keys): megatron's
    own global check (``RETURN_ALL``) would gather every rank's full shard metadata, the
    optimizer's included."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [set(keys) for keys in key_sets]
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, [sorted(keys) for keys in key_sets])
    return [{k for part in every for k in part[i]} for i in range(len(key_sets))]


def load_sharded(request: dict, directory: str | os.PathLike, model_entries=("model",)) -> dict:
    """``dist_checkpointing.load`` that holds the model part to the portability contract above.

    ``model_entries``: the top-level entries of ``request`` that hold model chunks; checkpoint keys
    under the same components (``language_model.``, ``vision_model.``, ``projector.``) that no rank
    asked for are reported. Everything else in the checkpoint (optimizer, RNG, data state) may be
    left unread. A collective: every rank calls it with its own part of the request."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    model_keys = {k for e in model_entries if e in request for k in _sharded_keys(request[e])}
    in_checkpoint = {v.key for v in load_sharded_metadata(str(directory)).values()}
    # Requested here, not in the checkpoint (megatron drops them from the request). Every rank
    # learns what any rank lacks before any reads, so all of them stop together.
    absent_here = {k for k in _sharded_keys(request) if k not in in_checkpoint and not is_extra_state(k)}
    wanted, lacking = _union_over_ranks(model_keys, absent_here)
    components = tuple({k.split(".", 1)[0] + "." for k in wanted})
    surplus = sorted(k for k in in_checkpoint - wanted if k.startswith(components) and not is_extra_state(k))
    if lacking or surplus:
        parts = []
        if lacking:
            parts.append(f"it lacks {len(lacking)} tensors this model has ({_listed(lacking)})")
        if surplus:
            parts.append(f"it holds {len(surplus)} tensors this model does not have ({_listed(surplus)})")
        raise CheckpointError(
            f"{directory} does not fit this model: {'; '.join(parts)}. Checkpoints move between the "
            f"local and Transformer Engine specs (only TE's _extra_state differs); other differences "
            f"mean another model shape or architecture: compare model.* with the checkpoint's model.yaml")
    # megatron's "unexpected": requested, not in the checkpoint -- here only TE's _extra_state.
    loaded, _, absent = dist_checkpointing.load(request, str(directory), strict=StrictHandling.RETURN_UNEXPECTED)
    _restore_absent_as_none(request, loaded, set(absent))
    return loaded


def save_model_checkpoint(models, directory: str | os.PathLike, extra_sharded: dict | None = None,
                          overwrite: bool = False) -> Path:
    """Save the model chunks (and optional extra sharded state) atomically into ``directory``."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"checkpoint directory {directory} exists; refusing to overwrite it")
    tmp = directory.with_name(directory.name + ".tmp")
    if is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous interrupted save
        tmp.mkdir(parents=True)
    barrier()
    state = model_sharded_state_dict(models)
    if extra_sharded:
        state.update(extra_sharded)
    prepare_writer()
    dist_checkpointing.save(state, str(tmp))
    barrier()
    if is_rank0():
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    barrier()
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
    request = model_sharded_state_dict(models)
    load_chunks(models, load_sharded(request, directory, tuple(request)))


def load_component(chunks, directory: str | os.PathLike, prefixes: tuple[str, ...]) -> int:
    """Load only the parameters under ``prefixes`` (e.g. ``language_model.``) from a model
    checkpoint: component-wise initialisation (InternVL's progressive scaling reuses a ViT trained
    with a smaller LLM). Returns the number of tensors loaded on this rank.

    One load for all chunks, on every rank, even one that holds none of the component (a pipeline
    stage without the ViT): the load is a collective."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise CheckpointError(f"{directory} is not a megatron distributed checkpoint (no metadata.json)")
    modules = [getattr(c, "module", c) for c in chunks]
    request = {}
    for key, full in model_sharded_state_dict(modules).items():
        request[key] = {k: v for k, v in full.items() if k.startswith(prefixes)}
    loaded = load_sharded(request, directory, tuple(request))
    count = 0
    for module, key in zip(modules, request):
        if request[key]:
            missing, unexpected = module.load_state_dict(loaded[key], strict=False)
            if unexpected:
                raise CheckpointError(f"unexpected tensors from {directory}: {unexpected[:5]}")
            count += sum(not is_extra_state(k) for k in request[key])
    return count
