"""Megatron distributed checkpoint (any layout) -> Hugging Face directory.

One process (a torch.distributed world of one) loads the checkpoint into a TP=1, PP=1 model (dist_checkpointing reshards), so every
parameter is a full tensor; each is turned into its HF tensors by the format's table and streamed
into size-limited safetensors shards. Peak memory: one model plus one shard. The original
config.json and tokenizer files kept at import time are restored; a config for the other format
is generated from model.yaml. Output goes to ``OUT.tmp-*`` and is renamed at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from megatron_internvl.checkpoint.layout import HF_SUBDIR, read_info

from . import ConversionError
from .checkpoint import check_checkpoint_dir, read_model_config
from .hf_config import FORMATS, REMOTE_CODE, TRANSFORMERS, export_config, parse
from .mapping import Mapping
from .safetensors_io import ShardedWriter
from .tables import output_tied_to

# Files of the kept HF directory that are rewritten rather than copied.
_NOT_COPIED = {"config.json"}
# Remote code only works in its own format; tokenizers and generation settings work in both.
_REMOTE_CODE_FILES = (".py",)


def export_on_rank(ckpt: str, staging: str, fmt: str, max_shard_bytes: int, report=None) -> dict:
    """Rank side (a world of one): load at TP=1 PP=1, write the HF tensors. Returns facts the
    parent needs (dtype, tied)."""
    import torch

    from megatron_internvl.config import ParallelConfig
    from megatron_internvl.parallel import distributed
    from megatron_internvl.parallel.sharding import _local_index, canonical_name, full_shape, iter_shards

    from .checkpoint import build_chunk, load_weights

    report = report or (lambda text: None)
    t0 = time.monotonic()
    model_cfg = read_model_config(ckpt)
    info = read_info(ckpt)
    precision = info.get("precision", "fp32")
    parallel = ParallelConfig()
    distributed.initialize(parallel)
    model = build_chunk(model_cfg, parallel, precision)
    report(f"[export] loading {ckpt} at TP=1 PP=1")
    load_weights(model, ckpt)

    shards: dict[str, list] = {}
    for sh in iter_shards(model):
        shards.setdefault(canonical_name(sh), []).append(sh)

    def full(name):
        parts = shards[name]
        shape = full_shape(parts[0])
        if len(parts) == 1 and tuple(parts[0].data.shape) == shape:
            return parts[0].data
        whole = torch.empty(shape, dtype=parts[0].data.dtype)  # SwiGLU fc1: gate and up halves
        for sh in parts:
            whole[_local_index(sh)] = sh.data
        return whole

    out_name, emb_name = output_tied_to()
    tied = (bool(info.get("tied_embeddings")) and out_name in shards
            and torch.equal(full(out_name), full(emb_name)))
    mapping = Mapping(fmt, model_cfg, tied=tied)
    writer = ShardedWriter(Path(staging), max_shard_bytes)
    written = []
    for name in mapping.entries:
        if name not in shards:
            raise ConversionError(f"the checkpoint has no tensor {name} (model.yaml and the weights disagree)")
        if tied and name == out_name:
            continue
        for hf_name, tensor in mapping.to_hf(name, full(name)):
            writer.add(hf_name, tensor)
            written.append(hf_name)
    unmapped = sorted(set(shards) - set(mapping.entries))
    if unmapped:
        raise ConversionError(f"the {fmt} table has no row for megatron tensor(s) {unmapped[:8]}")
    files = writer.close()
    report(f"[export] wrote {len(written)} tensors in {len(files)} file(s) "
           f"({writer.total_bytes / 2**20:.1f} MiB, {time.monotonic() - t0:.0f} s)")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {"dtype": dtype, "tied": tied, "tensors": len(written)}


def run_export(ckpt, out, fmt: str, overwrite: bool = False, max_shard_size: str = "5GB",
               log=print, in_process: bool = False) -> Path:
    """The whole ``export`` command. ``in_process``: load the model in this process (which then
    holds a torch.distributed world of one) instead of a spawned one -- what the CLI does."""
    from .checkpoint import commit_dir, staging_dir
    from .launch import run_on_ranks

    t0 = time.monotonic()
    if fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    ckpt = check_checkpoint_dir(ckpt)
    model_cfg = read_model_config(ckpt)
    kept = ckpt / HF_SUBDIR
    source = parse(kept, image_token_id=model_cfg.image_token_id) if (kept / "config.json").is_file() else None
    if fmt == TRANSFORMERS and model_cfg.language.arch == "internlm2":
        raise ConversionError(
            "transformers' InternVL has no InternLM2 language model: export --format remote-code"
        )
    out = Path(out)
    staging = staging_dir(out, overwrite)
    try:
        args = (str(ckpt), str(staging), fmt, _parse_size(max_shard_size))
        if in_process:
            result = _export_here(*args, log=log)
        else:
            (result,) = run_on_ranks(export_on_rank, 1, *args, log=log)
        cfg = export_config(fmt, model_cfg, source, result["tied"], result["dtype"])
        (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if kept.is_dir():
            for path in sorted(kept.iterdir()):
                if path.name in _NOT_COPIED or not path.is_file():
                    continue
                if path.suffix in _REMOTE_CODE_FILES and fmt != REMOTE_CODE:
                    continue
                shutil.copy2(path, staging / path.name)
        if fmt == REMOTE_CODE and not any(staging.glob("modeling_*.py")):
            log("[export] note: remote-code loading needs OpenGVLab's modeling_*.py / "
                "configuration_*.py files next to config.json; the source checkpoint had none")
        commit_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"[export] wrote {out} ({fmt}) in {time.monotonic() - t0:.1f} s")
    return out


def _export_here(*args, log):
    import os

    import torch

    from megatron_internvl.parallel import distributed

    from .launch import free_port

    if torch.distributed.is_initialized():
        raise RuntimeError("in-process export needs a process without torch.distributed")
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    saved = {k: os.environ.get(k) for k in keys}
    # A CPU job (gloo) like import; hiding GPUs works as long as CUDA was not used yet.
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="")
    try:
        return export_on_rank(*args, report=log)
    finally:
        distributed.destroy()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _parse_size(text: str) -> int:
    text = str(text).strip().upper()
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
