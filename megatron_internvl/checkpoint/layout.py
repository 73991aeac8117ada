"""What is in a checkpoint directory, and reading it without loading tensors.

A converter checkpoint (written by ``convert import``)::

    OUT/metadata.json, common.pt, *.distcp   megatron dist_checkpointing (torch_dist), key "model"
    OUT/model.yaml                           the project's ``model:`` section (usable as a recipe base)
    OUT/conversion.json                      source format, dtype, tied embeddings, layout saved at
    OUT/hf/                                  the original config.json, tokenizer and other small
                                             files, so that export can restore them

A training save directory (written by :class:`~.manager.CheckpointManager`)::

    SAVE/latest                              the name of the newest published checkpoint
    SAVE/iter_0000010/                       dist_checkpointing with "model" (or "model0", ...),
                                             "optimizer", "common" (step, scheduler, layout, config),
                                             RNG and data state; model.yaml and hf/ as above;
                                             complete.json (every file and its size), written last

This module imports no megatron code at module level: the converters' parent process reads these
files without paying megatron's import.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import yaml

MODEL_YAML = "model.yaml"
CONVERSION_JSON = "conversion.json"
HF_SUBDIR = "hf"
LATEST = "latest"
COMPLETE = "complete.json"
# Small files of a HF model directory worth keeping (weights are not).
_HF_KEEP_SUFFIXES = (".json", ".py", ".model", ".txt", ".tiktoken", ".jinja", ".md")
_HF_SKIP = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Model fields that may change between a checkpoint and a resume (they do not change weights).
_RESUMABLE_MODEL_FIELDS = {"spec", "recompute", "fused_loss", "vision.drop_path_rate"}


class CheckpointError(RuntimeError):
    pass


def copy_hf_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and code files (never weights) from ``src`` to ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and path.name.endswith(_HF_KEEP_SUFFIXES) and path.name not in _HF_SKIP:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def write_model_yaml(directory: Path, model: dict) -> None:
    """The ``model:`` section the checkpoint's weights were made with."""
    (Path(directory) / MODEL_YAML).write_text(yaml.safe_dump({"model": model}, sort_keys=False))


def write_sidecars(directory: Path, model_cfg, info: dict, hf_dir=None) -> None:
    directory = Path(directory)
    write_model_yaml(directory, asdict(model_cfg))
    (directory / CONVERSION_JSON).write_text(json.dumps(info, indent=2) + "\n")
    if hf_dir is not None:
        copy_hf_files(Path(hf_dir), directory / HF_SUBDIR)


def read_info(ckpt) -> dict:
    path = Path(ckpt) / CONVERSION_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def saved_model_config(path: Path) -> dict | None:
    """The model section a checkpoint was written with (training or converter checkpoints)."""
    sidecar = Path(path) / MODEL_YAML
    if sidecar.is_file():
        data = yaml.safe_load(sidecar.read_text()) or {}
        return data.get("model", data)
    return None


def is_training_checkpoint(path: Path) -> bool:
    """True for a checkpoint with optimizer/scheduler/data state, False for weights only."""
    from megatron.core import dist_checkpointing  # heavy: only when a checkpoint is opened

    try:
        return "common" in dist_checkpointing.load_common_state_dict(str(path))
    except Exception:  # no common.pt: written by save_model_checkpoint without extras
        return False


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
