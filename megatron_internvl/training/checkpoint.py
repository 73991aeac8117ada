"""Distributed checkpoints (megatron-core ``dist_checkpointing``, ``torch_dist`` format).

Every rank saves its shards together; loading reshards, so a checkpoint written at one TP x PP
layout loads into any other. Writes go to a temporary directory that is renamed into place only
when complete, so an interrupted save never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing


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
