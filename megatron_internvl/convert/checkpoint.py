"""Converter helpers over a checkpoint directory: staging and committing an output directory,
reading its model config for a command-line tool, building / loading its model at any layout.

What the directory holds is :mod:`megatron_internvl.checkpoint.layout`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from megatron_internvl.checkpoint.layout import MODEL_YAML, saved_model_config

from . import ConversionError


# --- the directory --------------------------------------------------------------------------------
def staging_dir(out: Path, overwrite: bool) -> Path:
    """A fresh sibling directory to write into before the final rename."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"output directory {out} exists: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))


def commit_dir(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` into place (replacing ``out`` only when asked to)."""
    out = Path(out)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)


def read_model_config(ckpt):
    from megatron_internvl.config import ModelConfig, build_dataclass

    path = Path(ckpt) / MODEL_YAML
    model = saved_model_config(ckpt)
    if model is None:
        raise ConversionError(
            f"{path} not found: --ckpt must be a directory written by 'convert import' "
            f"(or a checkpoint with the model.yaml of its model next to it)"
        )
    return build_dataclass(ModelConfig, model, "model")


def check_checkpoint_dir(ckpt) -> Path:
    ckpt = Path(ckpt)
    if not (ckpt / "metadata.json").is_file():
        raise ConversionError(
            f"{ckpt} is not a megatron distributed checkpoint (no metadata.json): check the path, "
            f"or whether the command that wrote it was interrupted"
        )
    return ckpt


# --- the model ------------------------------------------------------------------------------------
def check_layout(model_cfg, parallel) -> None:
    """Raise a ConversionError naming the field when the layout does not fit the model."""
    from megatron_internvl.config import ConfigError

    try:
        parallel.validate(model_cfg)
    except ConfigError as exc:
        raise ConversionError(f"the layout does not fit the model: {exc}") from exc


def build_chunk(model_cfg, parallel, precision: str):
    """This rank's model chunk (stage of the pipeline, TP slice)."""
    from megatron.core import parallel_state as ps

    from megatron_internvl.models import factory

    pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    # Every tensor is loaded right after: no initial weights to draw.
    return factory.build_internvl_model(model_cfg, parallel, precision, pre_process=pre, post_process=post,
                                        initialize=False)


def sharded_state(model) -> dict:
    # The same top-level key the training checkpoints use, so a converted checkpoint loads there.
    return {"model": model.sharded_state_dict()}


def load_weights(model, ckpt) -> None:
    """Load a checkpoint saved at any layout into this rank's chunk."""
    from megatron_internvl.checkpoint.io import load_sharded

    ckpt = check_checkpoint_dir(ckpt)
    # Either spec's checkpoint: TE's _extra_state (FP8 metadata) is the only difference allowed.
    loaded = load_sharded(sharded_state(model), ckpt)
    model.load_state_dict(loaded["model"])
