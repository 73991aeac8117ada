"""A converted checkpoint directory, and building / loading its model at any layout.

Layout of a directory written by ``import``::

    OUT/metadata.json, common.pt, *.distcp   megatron dist_checkpointing (torch_dist), key "model"
    OUT/model.yaml                           the project's ``model:`` section (usable as a recipe base)
    OUT/conversion.json                      source format, dtype, tied embeddings, layout saved at
    OUT/hf/                                  the original config.json, tokenizer and other small
                                             files, so that export can restore them
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from . import ConversionError

MODEL_YAML = "model.yaml"
CONVERSION_JSON = "conversion.json"
HF_SUBDIR = "hf"
# Small files of a HF model directory worth keeping (weights are not).
_HF_KEEP_SUFFIXES = (".json", ".py", ".model", ".txt", ".tiktoken", ".jinja", ".md")
_HF_SKIP = ("model.safetensors.index.json", "pytorch_model.bin.index.json")



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


def copy_hf_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and code files (never weights) from ``src`` to ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and path.name.endswith(_HF_KEEP_SUFFIXES) and path.name not in _HF_SKIP:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def write_sidecars(directory: Path, model_cfg, info: dict, hf_dir=None) -> None:
    directory = Path(directory)
    (directory / MODEL_YAML).write_text(yaml.safe_dump({"model": asdict(model_cfg)}, sort_keys=False))
    (directory / CONVERSION_JSON).write_text(json.dumps(info, indent=2) + "\n")
    if hf_dir is not None:
        copy_hf_files(Path(hf_dir), directory / HF_SUBDIR)


def read_model_config(ckpt):
    from megatron_internvl.config import ModelConfig, build_dataclass

    path = Path(ckpt) / MODEL_YAML
    if not path.is_file():
        raise ConversionError(
            f"{path} not found: --ckpt must be a directory written by 'convert import' "
            f"(or a checkpoint with the model.yaml of its model next to it)"
        )
    data = yaml.safe_load(path.read_text()) or {}
    return build_dataclass(ModelConfig, data.get("model", data), "model")


def read_info(ckpt) -> dict:
    path = Path(ckpt) / CONVERSION_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


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
    from megatron.core import dist_checkpointing

    ckpt = check_checkpoint_dir(ckpt)
    loaded = dist_checkpointing.load(sharded_state(model), str(ckpt))
    model.load_state_dict(loaded["model"])
