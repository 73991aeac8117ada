"""Hugging Face checkpoint -> megatron distributed checkpoint at a TP x PP layout.

The parent process reads only config.json and the safetensors headers: it detects the format,
checks the layout and that the tensor names are exactly those the format's table expects, then
starts TP x PP ranks. Each rank builds its model chunk, asks for the full value of every tensor
it holds (read lazily from the safetensors files, transformed per the table, then sliced for the
rank by :func:`megatron_internvl.parallel.sharding.load_full_state_dict`), and all ranks save
together. Everything is written into ``OUT.tmp-*`` and renamed to ``OUT`` at the end.
"""

from __future__ import annotations

import math

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_internvl.checkpoint.io import prepare_writer
from megatron_internvl.checkpoint.layout import write_sidecars

from . import ConversionError
from .hf_config import HFModel, parse
from .mapping import Mapping
from .safetensors_io import SafetensorsReader
from .tables import HF_ALIASES, output_tied_to

_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp32"}


@dataclass
class ImportJob:
    hf_dir: str
    out_dir: str  # where the ranks save (the staging directory)
    fmt: str
    model: dict  # ModelConfig as a dict (picklable, version independent)
    tied: bool
    tp: int
    pp: int
    first_stage_layers: int | None
    precision: str  # fp32 | bf16
    ep: int = 1  # MoE experts split over this many ranks (of the data-parallel ones)


def plan(hf_dir, tp: int, pp: int, first_stage_layers=None, precision: str = "auto",
         image_token_id=None, ep: int = 1) -> tuple[HFModel, ImportJob, Mapping]:
    """Everything that can be checked before any rank starts."""
    from megatron_internvl.config import ParallelConfig

    from .checkpoint import check_layout

    hf = parse(hf_dir, image_token_id=image_token_id)
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                              first_stage_llm_layers=first_stage_layers)
    # The ViT's heads need not divide TP: the model pads them with dummy heads.
    check_layout(hf.model, parallel)
    reader = SafetensorsReader(hf_dir, HF_ALIASES)
    names = set(reader.names())
    mapping = Mapping(hf.fmt, hf.model)
    out_name, emb_name = output_tied_to()
    if hf.tied and mapping.entries[out_name][1][0] not in names:
        # Tied and stored once: the output layer starts as a copy of the embedding. (A tied
        # config with an lm_head tensor of its own is treated as untied, as transformers does.)
        mapping = Mapping(hf.fmt, hf.model, tied=True)
    hf.tied = mapping.tied
    mapping.check_names(names)
    if precision == "auto":
        dtype = reader.dtype(mapping.entries[emb_name][1][0])  # the LLM embedding's
        precision = _DTYPE_NAMES.get(str(dtype), "fp32")
    if precision not in ("fp32", "bf16"):
        raise ConversionError(f"--dtype {precision}: use auto, fp32 or bf16")
    job = ImportJob(
        hf_dir=str(hf_dir), out_dir="", fmt=hf.fmt, model=asdict(hf.model), tied=hf.tied,
        tp=tp, pp=pp, first_stage_layers=first_stage_layers, precision=precision, ep=ep,
    )
    return hf, job, mapping


def convert_on_rank(job: ImportJob, report=None) -> list[str]:
    """Rank side: build this rank's chunk, fill it from the HF files, save with all ranks.

    Runs in any torch.distributed world whose size is a multiple of TP x PP (extra ranks are
    data-parallel replicas; dist_checkpointing writes each shard once). Returns the canonical
    names this rank loaded.
    """
    import torch
    from megatron.core import dist_checkpointing

    from megatron_internvl.config import ModelConfig, ParallelConfig, build_dataclass
    from megatron_internvl.parallel import distributed
    from megatron_internvl.parallel.sharding import iter_shards, load_full_state_dict

    from .checkpoint import build_chunk, sharded_state

    report = report or (lambda text: None)
    model_cfg = build_dataclass(ModelConfig, job.model, "model")
    parallel = ParallelConfig(tensor_parallel=job.tp, pipeline_parallel=job.pp, expert_parallel=job.ep,
                              first_stage_llm_layers=job.first_stage_layers)
    distributed.initialize(parallel)
    rank = torch.distributed.get_rank()
    t0 = time.monotonic()
    model = build_chunk(model_cfg, parallel, job.precision)
    mapping = Mapping(job.fmt, model_cfg, tied=job.tied)
    reader = SafetensorsReader(job.hf_dir, HF_ALIASES)
    total = sum(1 for _ in iter_shards(model))
    done = [0]
    cache: dict = {}
    step = max(1, total // 10)

    def get_full(name, shape):
        done[0] += 1
        if rank == 0 and (done[0] % step == 0 or done[0] == total):
            report(f"[import] rank 0: {done[0]}/{total} tensors loaded ({time.monotonic() - t0:.0f} s)")
        if name not in cache:  # SwiGLU's fc1 is asked for twice (its gate and up halves)
            cache.clear()
            cache[name] = mapping.to_megatron(name, shape, reader)
        return cache[name]

    with torch.no_grad():
        loaded = load_full_state_dict(model, get_full)
    cache.clear()
    if rank == 0:
        report(f"[import] saving the distributed checkpoint ({torch.distributed.get_world_size()} ranks)")
    prepare_writer()
    dist_checkpointing.save(sharded_state(model), job.out_dir)
    torch.distributed.barrier()
    return sorted(loaded)


def run_import(hf_dir, out, tp: int = 1, pp: int = 1, first_stage_layers=None,
               precision: str = "auto", overwrite: bool = False, image_token_id=None,
               log=print, ep: int = 1) -> Path:
    """The whole ``import`` command: checks, TP x PP ranks, atomic output directory."""
    from .checkpoint import commit_dir, staging_dir
    from .launch import run_on_ranks

    t0 = time.monotonic()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"output directory {out} exists: choose another --out or pass --overwrite")
    hf, job, mapping = plan(hf_dir, tp, pp, first_stage_layers, precision, image_token_id, ep)
    lang = hf.model.language
    log(
        f"[import] {hf_dir}: {hf.fmt} format, {lang.arch} LLM ({lang.num_layers} layers), "
        f"ViT {hf.model.vision.num_layers} layers; {len(mapping.hf_names())} tensors -> "
        f"TP={tp} x PP={pp}" + (f" x EP={ep}" if ep > 1 else "") + f" ({job.precision})"
    )
    staging = staging_dir(out, overwrite)
    try:
        job.out_dir = str(staging)
        # Experts split over data-parallel ranks: enough ranks for both TP and EP groups.
        results = run_on_ranks(convert_on_rank, math.lcm(tp, ep) * pp, job, log=log)
        loaded = set().union(*results)
        unused = sorted(set(mapping.entries) - loaded)
        if unused:
            raise ConversionError(
                f"no rank's model has the megatron tensor(s) {unused[:8]} that the {hf.fmt} table "
                f"maps: the model built from config.json does not match the table"
            )
        write_sidecars(staging, hf.model, {
            "source_format": hf.fmt, "source": str(Path(hf_dir).resolve()),
            "precision": job.precision, "tied_embeddings": hf.tied,
            "saved_layout": {"tp": tp, "pp": pp, "ep": ep, "first_stage_layers": first_stage_layers},
        }, hf_dir=hf_dir)
        commit_dir(staging, out)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"[import] wrote {out} in {time.monotonic() - t0:.1f} s")
    return out
