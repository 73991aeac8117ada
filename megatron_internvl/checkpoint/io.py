"""Model weights in megatron-core distributed checkpoints (``dist_checkpointing``, ``torch_dist``).

Every rank saves its shards together; loading reshards, so a checkpoint written at one TP x PP
layout loads into any other. Writes go to a temporary directory that is renamed into place only
when complete, so an interrupted save never leaves something that looks like a checkpoint.

The model chunks sit under ``"model"`` (one chunk) or ``"model0"``, ``"model1"``, ... (virtual
pipeline stages), in training and converter checkpoints alike.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from .layout import CheckpointError


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
    loaded = dist_checkpointing.load(model_sharded_state_dict(models), str(directory))
    if len(models) == 1:
        models[0].load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(models):
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
