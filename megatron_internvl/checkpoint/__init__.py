"""Checkpoints on disk: megatron-core distributed checkpoints of InternVL models, and training state.

- :mod:`.layout`: what is in a checkpoint directory (``model.yaml``, ``conversion.json``, ``hf/``,
  ``latest``, ``complete.json``) and reading it without loading tensors;
- :mod:`.io`: saving and loading model chunks at any TP x PP layout (``dist_checkpointing``);
- :mod:`.manager`: training checkpoints (optimizer, scheduler, RNG, data state), published
  atomically, verified on resume, newest ``keep_last`` kept, optionally written in the background;
- :mod:`.optimizer_compat`: megatron-core 0.16.1 workarounds for torch Adam's optimizer state.

Below :mod:`megatron_internvl.convert` and :mod:`megatron_internvl.training`, which both use it.
The names below are loaded on first use: reading a directory's layout (the converters' parent
process) does not import megatron.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointDamagedError": "layout",
    "CheckpointError": "layout",
    "COMPLETE": "layout",
    "CONVERSION_JSON": "layout",
    "HF_SUBDIR": "layout",
    "LATEST": "layout",
    "MODEL_YAML": "layout",
    "check_model_config_matches": "layout",
    "copy_hf_files": "layout",
    "is_training_checkpoint": "layout",
    "read_info": "layout",
    "saved_model_config": "layout",
    "write_sidecars": "layout",
    "verify_checkpoint": "layout",
    "load_component": "io",
    "load_model_checkpoint": "io",
    "save_model_checkpoint": "io",
    "CheckpointManager": "manager",
    "DiskFullError": "manager",
    "verify_everywhere": "manager",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
