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
                                             complete.json (every file, its size and BLAKE2b
                                             hash), written last

:func:`verify_checkpoint` checks a checkpoint against its ``complete.json`` (``megatron-internvl
verify-checkpoint DIR``). Checkpoints written before hashes were recorded (sizes only) still verify
by size.

This module imports no megatron code at module level: the converters' parent process reads these
files without paying megatron's import.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import yaml

from megatron_internvl.config.errors import FaultError, InternVLError

MODEL_YAML = "model.yaml"
CONVERSION_JSON = "conversion.json"
HF_SUBDIR = "hf"
LATEST = "latest"
COMPLETE = "complete.json"
# Small files of a HF model directory worth keeping (weights are not).
_HF_KEEP_SUFFIXES = (".json", ".py", ".model", ".txt", ".tiktoken", ".jinja", ".md")
_HF_SKIP = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Model fields that may change between a checkpoint and a resume (they do not change weights).
_RESUMABLE_MODEL_FIELDS = {"spec", "flash_attention", "recompute", "fused_loss", "vision.drop_path_rate"}


class CheckpointError(InternVLError, RuntimeError):
    """A checkpoint that does not fit this run (settings, layout, data state) or is not there."""


class CheckpointDamagedError(CheckpointError, FaultError):
    """A checkpoint whose files do not match its ``complete.json``; the message names the file."""


# complete.json: {"format": 2, "hash": "blake2b-128", "files": {name: {"size": n, "blake2b": hex}}};
# format 1 (no "format" key) was {"files": {name: size}}.
COMPLETE_FORMAT = 2
_HASH_CHUNK = 8 << 20


def hash_file(path: Path) -> str:
    """BLAKE2b (128-bit digest) of a file's bytes; hashlib releases the GIL, so threads scale."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths, threads: int = 4) -> dict[Path, str]:
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        return dict(zip(paths, pool.map(hash_file, paths)))


def write_complete_marker(directory: Path, known: dict[str, str] | None = None) -> int:
    """Write ``complete.json`` for every file under ``directory``; hashes already computed (by the
    ranks that wrote the shards) come in ``known``, the rest are hashed here. Returns the bytes."""
    directory = Path(directory)
    known = known or {}
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != COMPLETE]
    names = {p: str(p.relative_to(directory)) for p in paths}
    todo = hash_files([p for p in paths if names[p] not in known])
    files = {names[p]: {"size": p.stat().st_size, "blake2b": known.get(names[p]) or todo[p]} for p in paths}
    tmp = directory / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"format": COMPLETE_FORMAT, "hash": "blake2b-128", "files": files}, indent=0))
    tmp.replace(directory / COMPLETE)
    return sum(f["size"] for f in files.values())


def read_complete_marker(directory: Path) -> dict[str, dict]:
    """``{name: {"size": n, "blake2b": hex or None}}`` from either format; raises ValueError/KeyError."""
    files = json.loads((Path(directory) / COMPLETE).read_text())["files"]
    return {name: v if isinstance(v, dict) else {"size": int(v), "blake2b": None} for name, v in files.items()}


def checkpoint_size(directory: Path) -> int | None:
    """Bytes of a complete checkpoint (from its complete.json), None if unknown."""
    try:
        return sum(int(v["size"]) for v in read_complete_marker(directory).values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(save_dir: Path) -> list[Path]:
    """The published checkpoints of a save directory, newest first: ``latest``'s, then by step."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = sorted((p for p in save_dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")),
                   reverse=True)
    marker = save_dir / LATEST
    if marker.is_file():
        named = save_dir / marker.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def verify_report(path: Path) -> tuple[list[str], bool]:
    """``megatron-internvl verify-checkpoint``: one line per checkpoint (a single checkpoint or
    every one in a save directory), and whether all of them verify."""
    path = Path(path)
    if not path.exists():
        raise InternVLError(f"{path} does not exist")
    found = [path] if (path / COMPLETE).is_file() or (path / "metadata.json").is_file() else list_checkpoints(path)
    if not found:
        raise InternVLError(f"{path} holds no checkpoint (no complete.json, metadata.json or iter_* folders)")
    lines, ok, resume = [], True, None
    for ckpt in found:
        if not (ckpt / COMPLETE).is_file() and (ckpt / "metadata.json").is_file():
            lines.append(f"UNVERIFIED {ckpt}: no complete.json (a converter output or an older save): "
                         f"nothing to check it against")
            continue
        problem = verify_checkpoint(ckpt)
        if problem is None:
            resume = resume or ckpt
            lines.append(f"OK {ckpt} ({len(read_complete_marker(ckpt))} files, "
                         f"{checkpoint_size(ckpt) / 2**30:.2f} GiB)")
        else:
            ok = False
            lines.append(f"DAMAGED {ckpt}: {problem}")
    if len(found) > 1:
        lines.append(f"a resume would start from {resume}" if resume else "no usable checkpoint here")
    return lines, ok


def verify_checkpoint(directory: Path, content: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """None if the checkpoint is complete and (with ``content``) every file has its recorded hash,
    else what is wrong with it, naming the file. ``share=(i, n)``: hash only every n-th file from
    the i-th (each rank checks its share; sizes are always checked in full)."""
    directory = Path(directory)
    if not (directory / COMPLETE).is_file():
        return "no complete.json (the save that wrote it did not finish)"
    try:
        files = read_complete_marker(directory)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable complete.json ({exc})"
    for name, rec in files.items():
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != rec["size"]:
            return f"file {name} has {path.stat().st_size} bytes, {rec['size']} were written"
    if not content:
        return None
    index, count = share
    todo = {directory / name: rec["blake2b"] for i, (name, rec) in enumerate(sorted(files.items()))
            if rec["blake2b"] and i % count == index}
    for path, digest in hash_files(todo).items():
        if digest != todo[path]:
            return (f"file {path.relative_to(directory)} is damaged (its content hash differs from "
                    f"the one recorded when it was written)")
    return None


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
