"""The GPU check: proves both layer specs on a GPU node and measures the local one against
transformers on the same GPU, in one run. Started by ``bench/gpu/run.sh`` (see docs/performance.md).

  bash bench/gpu/run.sh [OUT_DIR]               # GPU: under 8 minutes on one H200
  bash bench/gpu/run.sh --cpu-smoke [OUT_DIR]   # the same steps on CPU, tiny shapes, no claims

Steps (each in its own process; a failing step is recorded and the others still run):
1. environment: GPU, versions, the spec ``model.spec=auto`` builds and its attention kernels;
2. correctness: a tiny random transformers InternVL imported by the converter; its BF16 forward
   as one packed THD micro-batch (varlen_attn / fused SDPA on CUDA) against transformers' fp32
   forward on the CPU (relative L2 of the logits, limit 2e-2); 30 BF16 training steps of the
   tiny recipe, each loss within 5% of the same step of an fp32 run on the CPU;
   for each spec the node builds (local always, Transformer Engine where it is importable): the
   host reads of one training step (the same for 2 and 4 LLM layers, within a written budget) and
   one LLM layer in BF16 against fp32 (logits and every gradient); the compiled Triton
   cross-entropy kernel against the torch path in BF16; where DALI is importable: real JPEGs decoded
   in this process by ``data.decode_on: rank``'s path (nvJPEG ``mixed``) against Pillow's official
   transform (max / mean abs difference of the normalised tiles); with TE only: the converter's checkpoint
   loaded into the TE spec, 20 BF16 steps with an async save at step 10, the process killed,
   resumed, losses of steps 11-20 bitwise those of an uninterrupted run; and FP8 for 50 steps
   within 2% of BF16 at every step. What a node cannot run is listed as skipped, by name;
3. throughput: InternVL3-1B and -2B shapes (random weights, synthetic packs of 16384 tokens /
   48 tiles) trained by this project's loop and by transformers' InternVLForConditionalGeneration
   (SDPA, the same samples as one padded micro-batch, bf16 autocast, fp32 AdamW); tokens/s,
   TFLOP/s per GPU and MFU from the project's FLOPs counter for both, peak memory, ratio;
4. tests/gpu where their dependencies exist, the others listed as skipped by name.

5. profile of the largest shape (forward + backward of one pack, torch.profiler) while time allows.

Everything lands in OUT_DIR: env.json, correctness.json, throughput.json, profile.txt,
tests_gpu.log, check.log and the summary ``gpu_<gpu>_<date>.{md,json}`` (``cpu-smoke_<date>`` in smoke mode).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FORWARD_LIMIT = 2e-2
TRAIN_STEPS = 30  # BF16 steps of the tiny recipe, each against fp32 on the CPU (10 in the smoke)
TRAIN_LIMIT = 0.05  # relative difference of the BF16 and fp32 losses, at every step
GRAD_LIMIT = 5e-2  # one layer in BF16 vs fp32: relative L2 of each gradient
CE_LIMITS = {"loss": 1e-4, "ce": 1e-3, "grad_hidden": 1e-2, "grad_weight": 1e-2}  # Triton vs torch, BF16
FA3_LIMIT = 2e-2  # packed attention with FA3 vs PyTorch's default (FA2), BF16: output and q/k/v grads
# Host reads of one training step (training/host_reads.py; tests/training/test_host_syncs.py).
SYNC_MICRO_BATCHES, READS_PER_MICRO_BATCH, READS_PER_STEP = 2, 5, 12
RESUME_STEPS, RESUME_AT = 20, 10  # TE spec: steps, and the async save the kill follows
FP8_STEPS, FP8_LIMIT = 50, 0.02  # FP8 against BF16 at equal steps
PROFILE_IF_BEFORE_S = 360  # the profile starts only if the check is this young (8-minute budget)
LOSS_MEMORY_IF_BEFORE_S = 400  # likewise the loss-memory bench (GPU only; about a minute)
TINY_RECIPE = ROOT / "examples" / "tiny" / "full.yaml"
SHAPES = {  # name: (recipe, overrides)
    "InternVL3-1B": (ROOT / "examples" / "bench" / "internvl3_1b_synthetic.yaml", []),
    "InternVL3-2B": (HERE / "internvl3_2b_synthetic.yaml", []),
}
# One pack of 16384 tokens / 48 tiles per step; the LR warm-up shorter than the few steps run.
ONE_PACK = ["training.global_batch_size=1", "data.max_tokens=16384", "data.max_tiles=48",
            "optimizer.warmup_steps=1"]
SMOKE_SHAPE = {"tiny": (TINY_RECIPE, ["data.synthetic.enabled=true", "data.synthetic.sample_tokens=64",
                                      "data.synthetic.tiles_per_sample=2", "data.meta_path=null",
                                      "training.global_batch_size=1", "optimizer.warmup_steps=1"])}
# tests/gpu: the test functions that need a package the node may lack.
GPU_TEST_NEEDS = {
    "test_te_spec_bf16_matches_transformers_and_local_spec": "transformer_engine",
    "test_te_bf16_training_follows_fp32": "transformer_engine",  # runs model.spec=te
    "test_fp8_training_follows_bf16": "transformer_engine",
    "test_dali_gpu_decode_matches_pil": "nvidia.dali",
}


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _python_env() -> dict:
    # The package is the installed one (run.sh installs the checkout): the processes below start
    # in the checkout, where `python -m` would otherwise put it first on sys.path.
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")


def _worker(args: list[str], out_json: Path, logf, timeout: float, env=None) -> dict:
    """Run ``check.py <args>`` in a fresh process; its result is the json it writes."""
    cmd = [sys.executable, str(Path(__file__).resolve())] + args + ["--result", str(out_json)]
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env or _python_env(), stdout=logf, stderr=subprocess.STDOUT,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not out_json.exists():
        return {"error": f"exit code {proc.returncode} (see check.log)"}
    return json.loads(out_json.read_text())


def _step_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")[:-1]  # complete lines only: the last one may still be written
    return [r for r in map(json.loads, lines) if "loss" in r]


def _train(recipe: Path, overrides: list[str], steps: int, run_dir: Path, logf, timeout: float,
           stop_when_logged: bool = False, env=None, kill_when=None) -> list[dict]:
    """This project's training loop (one process, as `megatron-internvl train`); its step records.

    ``stop_when_logged``: end the process once the last step is logged. The loop then saves a
    checkpoint, which is no part of a throughput measurement and would write ~35 GB (weights and
    Adam state) for the 2B shape: minutes of the budget and half the node's disk.
    ``kill_when``: a test polled while it runs; when it holds, the process is killed (SIGKILL, as
    a node failure would) and the records so far are returned.
    """
    cmd = [sys.executable, "-m", "megatron_internvl.train", str(recipe), f"logging.run_dir={run_dir}",
           f"training.train_steps={steps}", "logging.progress=false", "logging.tensorboard=false",
           "checkpoint.save_interval=null", f"checkpoint.save={run_dir}/ckpt", "training.log_interval=1"]
    cmd += overrides
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _python_env(), stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                proc.kill()
                proc.wait()
                logf.write("[gpu-check] killed the training process (kill_when held)\n")
                return _step_records(run_dir)
            if stop_when_logged and len(_step_records(run_dir)) >= steps:
                proc.kill()
                proc.wait()
                logf.write(f"[gpu-check] stopped after step {steps} was logged (no final checkpoint)\n")
                return _step_records(run_dir)
            if time.monotonic() > deadline:
                raise TimeoutError(f"training did not finish in {timeout:.0f} s")
            time.sleep(0.05 if kill_when is not None else 0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"training exited with {proc.returncode} (see check.log)")
    return _step_records(run_dir)


# --- 1. environment -------------------------------------------------------------------------------
def doctor_report() -> dict:
    from megatron_internvl.launch.doctor import report

    return report()


def environment() -> dict:
    import torch
    import transformers

    import megatron_internvl
    from megatron_internvl.models import attention
    from megatron_internvl.models.specs import describe_spec

    def version(name):
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return None

    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "triton": version("triton"), "transformers": transformers.__version__,
        "megatron_core": version("megatron-core"),
        "megatron_internvl": str(Path(megatron_internvl.__file__).resolve().parent),
        "transformer_engine": version("transformer-engine") if _has("transformer_engine") else None,
        "dali": _has("nvidia.dali"),
        "spec_auto": describe_spec("auto"),
        "varlen_attn": (attention.VARLEN_ATTN.describe() if isinstance(attention.VARLEN_ATTN, attention.VarlenAdapter)
                        else f"unavailable: {attention.VARLEN_ATTN}"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "doctor": doctor_report(),  # what `megatron-internvl doctor` says about this machine
    }


# --- 2. correctness ---------------------------------------------------------------------------------
def import_tiny(work: Path) -> dict:
    """A tiny random transformers InternVL (tests/convert/models.py), imported by the converter
    on the CPU (the GPU is hidden from this process)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from convert import models

    from megatron_internvl.convert.importer import run_import

    hf_dir, ckpt = work / "hf", work / "ckpt"
    models.save_tiny(hf_dir, "qwen2", models.VIT_300M, seed=1)
    run_import(hf_dir, ckpt, precision="fp32")  # the `convert import` command
    return {"hf_dir": str(hf_dir), "ckpt": str(ckpt)}


def _pack_rows(batch: dict, device) -> dict:
    """The rows of a padded batch as one packed THD micro-batch (each row its own sample)."""
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    ids = batch["input_ids"]
    rows, seq = ids.shape
    cu = torch.arange(rows + 1, dtype=torch.int32) * seq
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.to(device), cu_seqlens_kv=cu.to(device),
                             max_seqlen_q=seq, max_seqlen_kv=seq)
    pos = torch.arange(seq, dtype=torch.float32).repeat(rows)[None]
    pix = batch.get("pixel_values")
    return {"input_ids": ids.reshape(1, -1).to(device), "position_ids": pos.to(device),
            "pixel_values": None if pix is None else pix.to(device), "packed_seq_params": params}


def forward(work: Path) -> dict:
    """BF16 packed forward of the imported checkpoint on the compute device vs transformers fp32 (CPU)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from convert import models
    from transformers import InternVLForConditionalGeneration

    from megatron_internvl.config import ParallelConfig
    from megatron_internvl.convert.checkpoint import build_chunk, load_weights, read_model_config
    from megatron_internvl.models import attention
    from megatron_internvl.models.internvl import gather_logits
    from megatron_internvl.parallel import distributed

    batches = models.inputs()
    hf = InternVLForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float32).eval()
    ref = models.reference_logits(hf, batches)
    del hf
    model_cfg = read_model_config(work / "ckpt")
    parallel = ParallelConfig()
    distributed.initialize(parallel)
    device = distributed.compute_device()
    model = build_chunk(model_cfg, parallel, "bf16").to(device)
    load_weights(model, work / "ckpt")
    model.eval()
    used = set()
    select = attention.select_backend

    def recording_select(*args, **kwargs):  # which kernels this forward really took
        out = select(*args, **kwargs)
        used.add(f"{'packed' if kwargs.get('packed', args[2] if len(args) > 2 else False) else 'padded'}:{out}")
        return out

    attention.select_backend = recording_select
    out = {}
    with torch.no_grad():
        for name, b in batches.items():
            p = _pack_rows(b, device)
            logits = model(p["input_ids"], p["position_ids"], pixel_values=p["pixel_values"],
                           packed_seq_params=p["packed_seq_params"])
            full = gather_logits(logits, model_cfg.language.vocab_size)  # [T, 1, V]
            full = full[:, 0].float().cpu().reshape(ref[name].shape)
            out[name] = {"rel_l2": models.rel_l2(full, ref[name]), "finite": bool(torch.isfinite(full).all())}
    attention.select_backend = select
    return {"device": str(device), "dtype": "bf16", "batches": out, "backends_used": sorted(used),
            "limit": FORWARD_LIMIT,
            "ok": all(v["finite"] and v["rel_l2"] <= FORWARD_LIMIT for v in out.values())}


def training(work: Path, logf, timeout: float, steps: int) -> dict:
    """BF16 steps of the tiny recipe on the tiny built-in dataset against the same steps in fp32
    with the GPU hidden (same weights, same data): the BF16 loss must follow the fp32 one at
    every step, which a wrong gradient, attention or loss would not."""
    sys.path.insert(0, str(ROOT / "examples" / "tiny"))
    from make_dataset import build

    data = build(work / "tiny-data")
    base = [f"data.meta_path={data / 'meta.json'}", f"data.tokenizer_path={data / 'tokenizer.json'}"]
    bf16 = _train(TINY_RECIPE, base + ["training.precision=bf16", "model.spec=auto"], steps, work / "tiny-run",
                  logf, timeout)
    fp32 = _train(TINY_RECIPE, base + ["training.precision=fp32", "model.spec=local"], steps, work / "tiny-fp32",
                  logf, timeout, env=dict(_python_env(), CUDA_VISIBLE_DEVICES=""))
    losses, reference = [r["loss"] for r in bf16], [r["loss"] for r in fp32]
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, reference)]
    finite = all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    return {"steps": len(losses), "losses": losses, "fp32_losses": reference,
            "max_rel_diff": max(rel) if rel else None, "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None, "limit": TRAIN_LIMIT,
            "criterion": f"BF16 loss within {TRAIN_LIMIT:.0%} of the fp32 CPU run at every step",
            "ok": finite and len(losses) == len(reference) == steps and max(rel) <= TRAIN_LIMIT}


# --- 2b. per spec: host reads, one-layer gradients, the Triton loss kernel --------------------------
def specs_here() -> dict:
    """Which layer specs this node can build, and why not the others."""
    import torch

    from megatron_internvl.models.specs import transformer_engine_available

    te = torch.cuda.is_available() and transformer_engine_available()
    return {"local": None, "te": None if te else "needs CUDA and transformer_engine"}


def host_syncs(spec: str, work: Path) -> dict:
    """Reads that make the host wait for the device (training/host_reads.py) during one training
    step of the tiny model (2 micro-batches, fused loss), with 2 LLM / 1 ViT layers and 4 / 2:
    the same count for both, within the written budget (no read per layer)."""
    import torch

    sys.path.insert(0, str(ROOT / "examples" / "tiny"))
    from make_dataset import build

    from megatron_internvl.config.loader import load_config
    from megatron_internvl.data.build import build_data_loader, build_tokenizer
    from megatron_internvl.models.factory import build_model_chunks
    from megatron_internvl.parallel import distributed
    from megatron_internvl.training.host_reads import HostReads, optimizer_host_tensors
    from megatron_internvl.training.setup import build_optimizer
    from megatron_internvl.training.stages import apply_stage
    from megatron_internvl.training.step import train_step

    data = work / "sync-data"
    if not (data / "meta.json").exists():
        build(data)
    cuda = torch.cuda.is_available()
    precision, dtype = ("bf16", torch.bfloat16) if cuda else ("fp32", torch.float32)
    counts = {}
    for llm, vit in ((2, 1), (4, 2)):
        cfg = load_config(TINY_RECIPE, [f"data.meta_path={data / 'meta.json'}",
                                        f"data.tokenizer_path={data / 'tokenizer.json'}", f"model.spec={spec}",
                                        f"model.language.num_layers={llm}", f"model.vision.num_layers={vit}",
                                        f"training.precision={precision}", "data.max_tokens=1024"])
        distributed.initialize(cfg.parallel, seed=cfg.training.seed)
        chunks = build_model_chunks(cfg, under_ddp=True)  # as training builds them
        apply_stage(chunks, cfg.training)
        ddp, optimizer, scheduler = build_optimizer(cfg, chunks)
        loader = build_data_loader(cfg.data, build_tokenizer(cfg.data))
        for _ in range(2):  # the first step creates the optimizer state; the second is counted
            batches = [next(loader) for _ in range(SYNC_MICRO_BATCHES)]
            with HostReads(ignore=optimizer_host_tensors(optimizer)) as reads:
                train_step(ddp, optimizer, scheduler, batches, dtype=dtype, num_datasets=1, fused_loss=True)
        counts[f"llm{llm}_vit{vit}"] = dict(reads.counts)
    totals = {k: sum(v.values()) for k, v in counts.items()}
    budget = READS_PER_MICRO_BATCH * SYNC_MICRO_BATCHES + READS_PER_STEP
    return {"spec": spec, "precision": precision, "micro_batches": SYNC_MICRO_BATCHES, "counts": counts,
            "reads_per_step": totals, "budget_per_step": budget,
            "criterion": "the same count for 2 and 4 LLM layers (1 and 2 ViT layers), within the budget",
            "ok": len(set(totals.values())) == 1 and max(totals.values()) <= budget}


def _packed_llm_input(vocab: int, device):
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    gen = torch.Generator().manual_seed(5)
    samples = [37, 90, 12, 61]
    cu = torch.tensor([0] + samples).cumsum(0).to(torch.int32)
    ids = torch.randint(0, vocab, (1, sum(samples)), generator=gen)
    labels = torch.randint(0, vocab, (sum(samples),), generator=gen)
    positions = torch.cat([torch.arange(n, dtype=torch.float32) for n in samples])[None]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.to(device), cu_seqlens_kv=cu.to(device),
                             max_seqlen_q=max(samples), max_seqlen_kv=max(samples))
    return ids.to(device), positions.to(device), labels.to(device), params


def layer_grads(spec: str) -> dict:
    """One LLM layer (embedding, layer, norm, output layer) in BF16 against the local spec in fp32
    (SDPA per sample) with the same weights, both on the compute device: logits and every
    gradient of one packed THD micro-batch, relative L2."""
    import torch
    import torch.nn.functional as F

    from megatron_internvl.config.loader import load_config
    from megatron_internvl.models.factory import language_transformer_config, model_padded_vocab_size
    from megatron_internvl.models.language import LanguageModel
    from megatron_internvl.models.specs import decoder_layer_spec
    from megatron_internvl.parallel import distributed

    cfg = load_config(TINY_RECIPE, ["model.language.num_layers=1", "model.spec=local"], world_size=1,
                      require_data=False)
    distributed.initialize(cfg.parallel, seed=1)
    device = distributed.compute_device()
    lang = cfg.model.language
    vocab = lang.vocab_size

    def build(precision):
        config = language_transformer_config(cfg.model, cfg.parallel, precision)  # no DDP: no main_grad
        return LanguageModel(config, decoder_layer_spec(cfg.model.spec), vocab_size=vocab,
                             rope_theta=lang.rope_theta, max_sequence_length=lang.max_position_embeddings,
                             padded_vocab_size=model_padded_vocab_size(cfg.model, cfg.parallel))

    reference = build("fp32").to(device)
    cfg.model.spec = spec
    model = build("bf16").to(device)
    fused = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    params = dict(model.named_parameters())
    names = {}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            target = name
            if name not in params:
                for old, new in fused.items():
                    target = target.replace(old, new)
            params[target].copy_(p)
            names[name] = target

    def run(m, dev):
        ids, positions, labels, packed = _packed_llm_input(vocab, dev)
        logits = m(ids, positions, packed_seq_params=packed)[:, 0, :vocab].float()
        F.cross_entropy(logits, labels).backward()
        return logits.detach().cpu()

    want, got = run(reference, device), run(model, device)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))

    grads = {name: rel(params[t].grad.cpu(), p.grad.cpu()) for name, p in reference.named_parameters()
             for t in [names[name]]}
    worst = max(grads, key=grads.get)
    return {"spec": spec, "device": str(device), "logits_rel_l2": rel(got, want), "grad_rel_l2": grads,
            "worst_grad": worst, "limit": GRAD_LIMIT,
            "ok": rel(got, want) <= FORWARD_LIMIT and grads[worst] <= GRAD_LIMIT}


def triton_ce() -> dict:
    """The compiled Triton cross-entropy kernel against the torch path, BF16 hidden states and
    output weight (the fused loss's shapes at 1B scale: 8192 tokens, hidden 1536, vocab 151674)."""
    import torch

    from megatron_internvl.kernels.fused_linear_ce import weighted_linear_cross_entropy

    torch.manual_seed(0)
    tokens, hidden, vocab = 8192, 1536, 151674
    h = (torch.randn(tokens, hidden, device="cuda") * 0.5).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    weights = torch.rand(tokens, device="cuda")
    weights[::5] = 0
    out = {}
    for backend in ("triton", "torch"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = weighted_linear_cross_entropy(hh, ww, labels, weights, backend=backend)
        res.loss.backward()
        torch.cuda.synchronize()
        out[backend] = {"loss": res.loss.detach().double(), "ce": res.ce.double(), "grad_h": hh.grad.float(),
                        "grad_w": ww.grad.float(), "seconds": time.perf_counter() - t0}

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    t, r = out["triton"], out["torch"]
    errs = {"loss": rel(t["loss"], r["loss"]), "ce": rel(t["ce"], r["ce"]),
            "grad_hidden": rel(t["grad_h"], r["grad_h"]), "grad_weight": rel(t["grad_w"], r["grad_w"])}
    return {"shape": [tokens, hidden, vocab], "rel_l2": errs, "limits": CE_LIMITS,
            "seconds": {"triton": t["seconds"], "torch": r["seconds"]},
            "ok": all(errs[k] <= CE_LIMITS[k] for k in CE_LIMITS)}


def fa3_varlen() -> dict:
    """The local spec's packed attention (``varlen_attn`` through models/attention.py's adapter:
    causal, GQA, five segments) with FlashAttention-3 activated as ``model.flash_attention=auto``
    activates it, against PyTorch's default kernel on the same inputs: relative L2 of the output
    and of the q/k/v gradients, and the time of forward + backward of each (after a warm-up)."""
    import math

    import torch
    from torch.nn import attention as torch_attention

    from megatron_internvl.models import attention as attn

    torch.manual_seed(0)
    lens, hq, hkv, d = [700, 1500, 37, 2048, 811], 16, 2, 128
    cu = torch.tensor([0] + [sum(lens[:k + 1]) for k in range(len(lens))], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens), hq, d, device="cuda").bfloat16()
    k, v = (torch.randn(sum(lens), hkv, d, device="cuda").bfloat16() for _ in range(2))
    grad = torch.randn(sum(lens), hq, d, device="cuda").bfloat16()

    def run():
        times = []
        for _ in range(4):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = attn.require_varlen()(qq, kk, vv, cu, max(lens), True, 1 / math.sqrt(d))
            out.backward(grad)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return [x.float() for x in (out, qq.grad, kk.grad, vv.grad)], statistics.median(times[1:])

    default, default_s = run()
    torch_attention.activate_flash_attention_impl("FA3")
    try:
        active = torch_attention.current_flash_attention_impl()
        fa3, fa3_s = run()
    finally:
        torch_attention.restore_flash_attention_impl()
    errs = {name: float((a - b).norm() / b.norm()) for name, a, b in zip(("out", "dq", "dk", "dv"), fa3, default)}
    return {"active": active, "segments": lens, "heads": [hq, hkv], "head_dim": d, "rel_l2": errs,
            "limit": FA3_LIMIT, "seconds": {"fa3": fa3_s, "default": default_s},
            "ok": active == "FA3" and all(e <= FA3_LIMIT for e in errs.values())}


def spec_checks(work: Path) -> dict:
    """Host reads and one-layer gradients for each spec this node builds; the Triton kernel where
    CUDA and triton are. What cannot run here is listed by name with the reason."""
    import torch

    out, skipped = {}, {}
    for spec, missing in specs_here().items():
        for name, fn in ((f"host_syncs[{spec}]", lambda: host_syncs(spec, work)),
                         (f"layer_grads[{spec}]", lambda: layer_grads(spec))):
            if missing:
                skipped[name] = missing
                continue
            try:
                out[name] = fn()
            except Exception as exc:
                traceback.print_exc()
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    if torch.cuda.is_available() and _has("triton"):
        try:
            out["triton_ce"] = triton_ce()
        except Exception as exc:
            traceback.print_exc()
            out["triton_ce"] = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        skipped["triton_ce"] = "needs CUDA and triton"
    from megatron_internvl.models.flash import plan_flash_attention

    fa3 = plan_flash_attention("auto")  # what a model build on this node activates, and why not
    if fa3.impl == "FA3":
        try:
            out["fa3_varlen"] = fa3_varlen()
        except Exception as exc:
            traceback.print_exc()
            out["fa3_varlen"] = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        skipped["fa3_varlen"] = f"needs FlashAttention-3 on a Hopper GPU: {fa3.reason}"
    if _has("nvidia.dali"):
        try:
            out["rank_decode"] = rank_decode()
        except Exception as exc:
            traceback.print_exc()
            out["rank_decode"] = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        skipped["rank_decode"] = "needs NVIDIA DALI (nvidia.dali not importable)"
    return {"checks": out, "skipped": skipped}


RANK_DECODE_TOL = {"max": 0.35, "mean": 0.005}  # DALI-CPU's measured bounds (docs/data.md); GPU: measured here


def _photos() -> dict[str, Path]:
    """The real photos the data tests use (tests/data/test_images.py), where their packages are."""
    where = {"grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
             "china": ("sklearn", "datasets/images/china.jpg"), "flower": ("sklearn", "datasets/images/flower.jpg")}
    out = {}
    for name, (package, rel) in where.items():
        spec = importlib.util.find_spec(package)
        if spec is not None and (Path(spec.submodule_search_locations[0]) / rel).is_file():
            out[name] = Path(spec.submodule_search_locations[0]) / rel
    return out


def rank_decode() -> dict:
    """``data.decode_on: rank`` in this process: JPEG bytes (as workers hand them over) decoded with
    DALI on the GPU (``mixed``: nvJPEG, GPU resize, tiles cut on the device), normalised there,
    against Pillow's official transform on the CPU; and one batched decode of all the images
    against the images decoded one by one. On CPU (smoke) DALI-CPU runs the same code."""
    import torch

    from megatron_internvl.data.images import concat_tiles, encode_image_tiles, load_image_tiles
    from megatron_internvl.models.pixels import normalize_pixels

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    photos = _photos()
    if not photos:
        return {"error": "no test photos (matplotlib / scikit-learn sample images) on this node"}
    rows, encoded, singles = [], [], []
    for name, path in photos.items():
        for max_tiles in (1, 6, 12):
            enc = encode_image_tiles(path, max_tiles=max_tiles, backend="dali")
            got = enc.to(device)
            want = load_image_tiles(path, max_tiles=max_tiles, backend="pil")
            diff = (normalize_pixels(got).cpu() - want).abs()
            rows.append({"photo": name, "max_tiles": max_tiles, "tiles": int(got.shape[0]),
                         "max_abs": float(diff.max()), "mean_abs": float(diff.mean())})
            encoded.append(enc)
            singles.append(got)
    concat_tiles(encoded).to(device)   # warm-up: the pipeline is rebuilt for the larger batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    batch = concat_tiles(encoded).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    worst = max(rows, key=lambda r: r["max_abs"])
    mean = max(r["mean_abs"] for r in rows)
    same = bool(torch.equal(batch, torch.cat(singles)))
    return {"device": str(device), "rows": rows, "max_abs": worst["max_abs"], "worst": f"{worst['photo']} "
            f"max_tiles={worst['max_tiles']}", "mean_abs": mean, "tolerance": RANK_DECODE_TOL,
            "batch_equals_single": same, "batch_tiles": int(batch.shape[0]), "batch_seconds": seconds,
            "ok": same and worst["max_abs"] <= RANK_DECODE_TOL["max"] and mean <= RANK_DECODE_TOL["mean"]}


# --- 2c. the Transformer Engine spec: resume and FP8 ------------------------------------------------
def _te_recipe(work: Path, ckpt: Path) -> Path:
    """The tiny recipe with the converted checkpoint's model section, on synthetic packs."""
    recipe = work / "te-recipe.yaml"
    recipe.write_text(json.dumps({
        "defaults": [str(TINY_RECIPE), str(ckpt / "model.yaml")],
        "data": {"meta_path": None, "synthetic": {"enabled": True, "sample_tokens": 96, "tiles_per_sample": 1}},
        "training": {"global_batch_size": 2, "precision": "bf16"},
        "optimizer": {"warmup_steps": 2},
        "checkpoint": {"load": str(ckpt), "finetune": True},
    }) + "\n")
    return recipe


def te_resume(work: Path, ckpt: Path, logf, timeout: float, spec: str = "te", precision: str = "bf16") -> dict:
    """converter output (CPU) -> the TE spec -> 20 BF16 steps with an async save at step 10 ->
    the process killed once that save is published -> the same command again (it resumes) ->
    losses of steps 11-20 bitwise those of an uninterrupted run."""
    from megatron_internvl import checkpoint as ckpt_lib

    recipe = _te_recipe(work, ckpt)
    extra = [f"model.spec={spec}", f"training.precision={precision}", f"checkpoint.save_interval={RESUME_AT}",
             "checkpoint.async_save=true"]
    whole = _train(recipe, extra, RESUME_STEPS, work / "te-whole", logf, timeout)
    cut = work / "te-cut"

    def published():
        save = cut / "ckpt"
        return save.exists() and ckpt_lib.CheckpointManager(save).latest_valid() is not None

    first = _train(recipe, extra, RESUME_STEPS, cut, logf, timeout, kill_when=published)
    # The steps may outrun the background writer: what matters is that the killed run's newest
    # published checkpoint is step 10's, so that the next run resumes there.
    logged = len(_step_records(cut))
    resumed = _train(recipe, extra, RESUME_STEPS, cut, logf, timeout)[logged:]
    resumed_from = resumed[0]["step"] - 1 if resumed else None
    by_step = {r["step"]: r["loss"] for r in resumed}
    want = {r["step"]: r["loss"] for r in whole}
    after = sorted(s for s in want if s > RESUME_AT)
    return {"steps": RESUME_STEPS, "save_at": RESUME_AT,
            "killed_after_step": max((r["step"] for r in first), default=0), "resumed_from": resumed_from,
            "whole": [want[s] for s in after], "resumed": [by_step.get(s) for s in after],
            "criterion": f"resumed from step {RESUME_AT}, losses of steps {RESUME_AT + 1}-{RESUME_STEPS} bitwise equal",
            "ok": resumed_from == RESUME_AT and len(after) == RESUME_STEPS - RESUME_AT
            and all(by_step.get(s) == want[s] for s in after)}


def fp8_vs_bf16(work: Path, ckpt: Path, logf, timeout: float) -> dict:
    """50 steps of the TE spec in FP8 (hybrid, delayed scaling) and in BF16 from the same
    weights and data: the FP8 loss within 2% of the BF16 loss at every step."""
    recipe = _te_recipe(work, ckpt)
    runs = {}
    for precision in ("bf16", "fp8"):
        records = _train(recipe, ["model.spec=te", f"training.precision={precision}"], FP8_STEPS,
                         work / f"te-{precision}", logf, timeout)
        runs[precision] = [r["loss"] for r in records]
    rel = [abs(a - b) / abs(b) for a, b in zip(runs["fp8"], runs["bf16"])]
    return {"steps": FP8_STEPS, "bf16": runs["bf16"], "fp8": runs["fp8"], "max_rel_diff": max(rel) if rel else None,
            "limit": FP8_LIMIT, "criterion": f"FP8 loss within {FP8_LIMIT:.0%} of BF16 at every step",
            "ok": len(rel) == FP8_STEPS and max(rel) <= FP8_LIMIT}


# --- 3. throughput --------------------------------------------------------------------------------
def _median(records, key, warmup):
    vals = [r[key] for r in records[warmup:] if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def ours(recipe: Path, overrides: list[str], steps: int, warmup: int, work: Path, logf, timeout) -> dict:
    import torch

    records = _train(recipe, overrides + ["training.precision=bf16", "model.spec=auto"], steps, work, logf, timeout,
                     stop_when_logged=True)
    shutil.rmtree(work / "ckpt", ignore_errors=True)  # a save the stop may have cut short
    step_s = _median(records, "step_time_s", warmup)
    return {"steps": len(records), "warmup": warmup, "final_loss": records[-1]["loss"],
            "tokens_per_step": records[-1]["tokens"], "tiles_per_step": records[-1]["tiles"],
            "step_time_s": step_s, "tokens_per_s": _median(records, "tokens_per_s", warmup),
            "tflops_per_gpu": _median(records, "tflops_per_gpu", warmup), "mfu": _median(records, "mfu", warmup),
            "peak_memory_gb": _median(records, "peak_memory_gb", warmup) if torch.cuda.is_available() else None}


def hf_train(recipe: Path, overrides: list[str], steps: int, warmup: int) -> dict:
    """transformers' InternVL on the same packs as padded micro-batches, bf16 autocast, fp32 AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_internvl.config.loader import load_config
    from megatron_internvl.convert.hf_config import export_config
    from megatron_internvl.data.synthetic import SyntheticPackLoader
    from megatron_internvl.models.flops import StepShapes, device_peak_tflops, step_flops
    from megatron_internvl.training.step import sample_lengths

    config = load_config(recipe, overrides, world_size=1, require_data=False)
    model_cfg = config.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.training.seed)
    hf_cfg = InternVLConfig(**export_config("transformers", model_cfg, None, tied=False, dtype="float32"))
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa",
                                                               dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay,
                            fused=device.type == "cuda")
    loader = SyntheticPackLoader(config.data, model_cfg.language.vocab_size, model_cfg.image_token_id)
    trainable = {"vision": True, "projector": True, "language": True}
    peak = device_peak_tflops(config.training.peak_tflops)
    records = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        pack = next(loader)
        lengths = sample_lengths(pack)
        longest = max(lengths)
        ids = torch.zeros(len(lengths), longest, dtype=torch.long)
        labels = torch.full((len(lengths), longest), -100, dtype=torch.long)
        mask = torch.zeros(len(lengths), longest, dtype=torch.long)
        start = 0
        for row, n in enumerate(lengths):  # right padding; the pack's labels are already shifted
            ids[row, :n] = pack["input_ids"][0, start:start + n]
            labels[row, :n] = pack["labels"][0, start:start + n]
            mask[row, :n] = 1
            start += n
        pixels = pack["pixel_values"]
        ids, labels, mask, pixels = (t.to(device, non_blocking=True) for t in (ids, labels, mask, pixels))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.clip_grad or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss)  # waits for the step
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        flops = step_flops(model_cfg, StepShapes(lengths, int(pixels.shape[0])), trainable)
        tflops = flops / elapsed / 1e12
        records.append({"loss": value, "step_time_s": elapsed, "tokens": sum(lengths), "tiles": int(pixels.shape[0]),
                        "tokens_per_s": sum(lengths) / elapsed, "tflops_per_gpu": tflops,
                        "mfu": tflops / peak if peak else None, "padded_tokens": int(ids.numel())})
    return {"steps": len(records), "warmup": warmup, "final_loss": records[-1]["loss"],
            "tokens_per_step": records[-1]["tokens"], "tiles_per_step": records[-1]["tiles"],
            "padded_tokens_per_step": records[-1]["padded_tokens"],
            "step_time_s": _median(records, "step_time_s", warmup),
            "tokens_per_s": _median(records, "tokens_per_s", warmup),
            "tflops_per_gpu": _median(records, "tflops_per_gpu", warmup), "mfu": _median(records, "mfu", warmup),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def profile(recipe: Path, overrides: list[str], table_path: Path, iters: int = 2) -> dict:
    """torch.profiler over forward + backward of one pack (optimizer excluded): the kernel
    table, and how often the host waited for the device (``aten::_local_scalar_dense`` is every
    ``.item()`` / ``int(tensor)``; per-layer read-backs would show here as a multiple of the layers)."""
    import torch
    from megatron.core import tensor_parallel
    from torch.profiler import ProfilerActivity

    from megatron_internvl.config.loader import load_config
    from megatron_internvl.data.synthetic import SyntheticPackLoader
    from megatron_internvl.models.factory import build_internvl_model
    from megatron_internvl.parallel import distributed
    from megatron_internvl.training.step import packed_seq_params, to_device

    config = load_config(recipe, overrides, world_size=1, require_data=False)
    distributed.initialize(config.parallel)
    device = distributed.compute_device()
    model = build_internvl_model(config.model, config.parallel, "bf16").to(device).train()
    loader = SyntheticPackLoader(config.data, config.model.language.vocab_size, config.model.image_token_id)
    b = to_device(next(loader), device)

    def step():
        params = packed_seq_params(b)
        logits = model(b["input_ids"], b["position_ids"], pixel_values=b["pixel_values"].to(torch.bfloat16),
                       packed_seq_params=params)
        labels = b["labels"].t().contiguous().clamp(min=0)
        tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean().backward()

    step()  # warm-up: kernels chosen, memory pools filled
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table_path.write_text(averages.table(sort_by=sort, row_limit=40))
    reads = sum(e.count for e in averages if e.key == "aten::_local_scalar_dense") / iters
    return {"device": str(device), "iterations": iters, "host_reads_per_step": reads,
            "llm_layers": config.model.language.num_layers, "vit_layers": config.model.vision.num_layers,
            "table": table_path.name}


# --- 4. tests/gpu -------------------------------------------------------------------------------------
def loss_memory(work: Path, logf, timeout: float) -> dict:
    """bench/loss_memory.py on this GPU: the output layer + loss of the 1B and 8B shapes at 16384
    tokens in BF16, logits path vs fused (TP=1: one GPU), peaks from the CUDA allocator."""
    cmd = [sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--shape", "1b", "--shape", "8b",
           "--tp", "1", "--dtype", "bfloat16", "--tag", "gpu", "--out", str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout,
                          env=_python_env())
    if proc.returncode:
        return {"error": f"bench/loss_memory.py exited with {proc.returncode} (see check.log)"}
    return json.loads((work / "loss_memory_gpu.json").read_text())


def gpu_tests(out_dir: Path, timeout: float) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"ran": [], "skipped": {}, "note": "not collected: no CUDA device (tests/gpu/conftest.py)"}
    logp = out_dir / "tests_gpu.log"
    collect = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "--collect-only", "-q"], cwd=ROOT,
                             env=_python_env(), capture_output=True, text=True, timeout=300)
    ids = [line.strip() for line in collect.stdout.splitlines() if "::" in line]
    skipped, run = {}, []
    for node in ids:
        func = node.split("::")[-1].split("[")[0]
        need = GPU_TEST_NEEDS.get(func)
        if need and not _has(need):
            skipped[node] = f"needs {need}, not installed"
        else:
            run.append(node)
    result = {"ran": run, "skipped": skipped}
    with open(logp, "w") as f:
        f.write(collect.stdout + collect.stderr)
        if not run:
            result["note"] = "nothing left to run"
            return result
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-s", "-rA"] + run, cwd=ROOT,
                                  env=_python_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            result["exit_code"] = proc.returncode
        except subprocess.TimeoutExpired:
            result["exit_code"] = f"timed out after {timeout:.0f} s"
    text = logp.read_text()
    # pytest -rA's summary lines: "PASSED tests/gpu/test_gpu.py::test_name[param]"
    result["outcomes"] = {node: status for status, node in
                          re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) (\S+)", text, re.M)}
    return result


# --- the whole check --------------------------------------------------------------------------------
def _fmt(v, f):
    return "-" if v is None else format(v, f)


def summary_md(res: dict, smoke: bool) -> str:
    env = res["env"]
    title = "CPU smoke of the GPU check (no performance claims)" if smoke else f"GPU check on {env.get('gpu')}"
    lines = [f"# {title}", "", f"Date (UTC): {env.get('date_utc')}. Command: `{res['command']}`. "
             f"Total {res['wall_s']:.0f} s.", "",
             f"torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, transformers "
             f"{env.get('transformers')}, megatron-core {env.get('megatron_core')}, Transformer Engine "
             f"{env.get('transformer_engine') or 'absent'}, DALI {'present' if env.get('dali') else 'absent'}.",
             f"Spec built by model.spec=auto: {env.get('spec_auto')}.", "", "## Correctness", ""]
    fw = res.get("forward", {})
    if "error" in fw:
        lines.append(f"- forward: ERROR {fw['error']}")
    else:
        for name, v in fw.get("batches", {}).items():
            lines.append(f"- BF16 packed forward ({fw['device']}) vs transformers fp32 CPU, `{name}` batch: "
                         f"rel L2 {v['rel_l2']:.2e} (limit {FORWARD_LIMIT:g})")
        lines.append(f"- attention kernels taken: {', '.join(fw.get('backends_used', []))}")
    tr = res.get("training", {})
    lines.append(f"- BF16 training steps (tiny recipe): ERROR {tr['error']}" if "error" in tr else
                 f"- {tr['steps']} BF16 training steps (tiny recipe), loss {_fmt(tr['first'], '.3f')} -> "
                 f"{_fmt(tr['last'], '.3f')}: at most {_fmt(tr['max_rel_diff'], '.2%')} from the fp32 CPU run "
                 f"(limit {TRAIN_LIMIT:.0%}), {'OK' if tr['ok'] else 'FAIL'}")
    sp = res.get("specs", {})
    if "error" in sp:
        lines.append(f"- per-spec checks: ERROR {sp['error']}")
    for name, c in sp.get("checks", {}).items():
        if "error" in c:
            lines.append(f"- {name}: ERROR {c['error']}")
        elif name.startswith("host_syncs"):
            lines.append(f"- {name}: host reads per training step of {c['micro_batches']} micro-batches "
                         f"{c['reads_per_step']} (budget {c['budget_per_step']}), {'OK' if c['ok'] else 'FAIL'}")
        elif name.startswith("layer_grads"):
            lines.append(f"- {name}: one layer BF16 vs local fp32 on {c['device']}: logits rel L2 "
                         f"{c['logits_rel_l2']:.2e}, worst gradient {c['worst_grad']} "
                         f"{c['grad_rel_l2'][c['worst_grad']]:.2e} (limit {c['limit']:g}), {'OK' if c['ok'] else 'FAIL'}")
        elif name == "triton_ce":
            errs = ", ".join(f"{k} {v:.1e}" for k, v in c["rel_l2"].items())
            lines.append(f"- triton_ce: Triton vs torch, BF16 {c['shape']}: {errs}; "
                         f"{c['seconds']['triton']:.3f} s vs {c['seconds']['torch']:.3f} s, {'OK' if c['ok'] else 'FAIL'}")
        elif name == "rank_decode":
            lines.append(f"- rank_decode: JPEG bytes decoded in the training process by DALI on {c['device']} vs "
                         f"Pillow's official transform, normalised tiles: max abs {c['max_abs']:.3f} ({c['worst']}), "
                         f"mean abs at most {c['mean_abs']:.4f} (limits {c['tolerance']['max']} / "
                         f"{c['tolerance']['mean']}); one batch of {c['batch_tiles']} tiles in {c['batch_seconds']:.3f} s, "
                         f"{'equal' if c['batch_equals_single'] else 'NOT equal'} to one by one, "
                         f"{'OK' if c['ok'] else 'FAIL'}")
        elif name == "fa3_varlen":
            errs = ", ".join(f"{k} {v:.1e}" for k, v in c["rel_l2"].items())
            lines.append(f"- fa3_varlen: packed attention with {c['active']} vs PyTorch's default kernel, BF16 "
                         f"{c['segments']} tokens, heads {c['heads']}: {errs} (limit {c['limit']:g}); forward + "
                         f"backward {c['seconds']['fa3'] * 1e3:.2f} ms vs {c['seconds']['default'] * 1e3:.2f} ms, "
                         f"{'OK' if c['ok'] else 'FAIL'}")
        elif name == "te_resume":
            lines.append(f"- te_resume: TE spec from the converter, killed after step {c['killed_after_step']} was "
                         f"logged (async save at {c['save_at']}), resumed from step {c['resumed_from']}: "
                         f"{c['criterion']}, {'OK' if c['ok'] else 'FAIL'}")
        elif name == "fp8_vs_bf16":
            lines.append(f"- fp8_vs_bf16: {c['steps']} steps, FP8 at most {_fmt(c['max_rel_diff'], '.2%')} from BF16 "
                         f"(limit {c['limit']:.0%}), {'OK' if c['ok'] else 'FAIL'}")
    for name, why in sp.get("skipped", {}).items():
        lines.append(f"- {name}: skipped ({why})")
    lines += ["", "## Throughput", "",
              "| shape | trainer | tokens/s | TFLOP/s/GPU | MFU | step s | peak GiB | final loss | ours / transformers |",
              "|---|---|---|---|---|---|---|---|---|"]
    for shape, pair in res.get("throughput", {}).items():
        for who in ("ours", "transformers"):
            r = pair.get(who, {})
            if "error" in r:
                lines.append(f"| {shape} | {who} | ERROR: {r['error']} | | | | | | |")
                continue
            ratio = pair.get("ratio_tokens_per_s") if who == "ours" else None
            lines.append(f"| {shape} | {who} | {_fmt(r.get('tokens_per_s'), '.0f')} | {_fmt(r.get('tflops_per_gpu'), '.3g')} | "
                         f"{_fmt(r.get('mfu'), '.3f')} | {_fmt(r.get('step_time_s'), '.3f')} | "
                         f"{_fmt(r.get('peak_memory_gb'), '.1f')} | {_fmt(r.get('final_loss'), '.3f')} | {_fmt(ratio, '.2f')} |")
    lines += ["", "Tokens and tiles are the real ones of each step (padding not counted); FLOPs by "
              "`megatron_internvl/models/flops.py` for both trainers; MFU against "
              f"{res.get('peak_tflops') or '-'} TFLOP/s dense BF16; medians over the steps after the warm-up.",
              "", "## Profile", ""]
    pr = res.get("profile", {})
    if "error" in pr or "skipped" in pr:
        lines.append(f"- {pr.get('error') or pr.get('skipped')}")
    elif pr:
        lines.append(f"- {pr['shape']}, forward + backward of one pack on {pr['device']}: "
                     f"{pr['host_reads_per_step']:g} host read-backs per step "
                     f"({pr['llm_layers']} LLM layers, {pr['vit_layers']} ViT layers); kernel table in profile.txt")
    lines += ["", "## Loss memory (bench/loss_memory.py)", ""]
    lm = res.get("loss_memory", {})
    if "error" in lm or "skipped" in lm:
        lines.append(f"- {lm.get('error') or lm.get('skipped')}")
    for r in lm.get("rows", []):
        if r["path"] == "fused":
            lines.append(f"- {r['shape']} output layer, {r['tokens']} tokens, TP={r['tp']}, {r['dtype']}: fused "
                         f"{_fmt(r['peak_gib'], '.2f')} GiB, {r['seconds']:.3f} s; logits path / fused memory "
                         f"{_fmt(r.get('memory_ratio_today_over_fused'), '.1f')}x, fused / logits time "
                         f"{_fmt(r.get('time_ratio_fused_over_today'), '.2f')}x")
    lines += ["", "## tests/gpu", ""]
    gt = res.get("gpu_tests", {})
    if "error" in gt:
        lines.append(f"- ERROR {gt['error']}")
    for node in gt.get("ran", []):
        lines.append(f"- {node}: {gt.get('outcomes', {}).get(node, 'see tests_gpu.log')}")
    for node, why in gt.get("skipped", {}).items():
        lines.append(f"- {node}: skipped ({why})")
    if gt.get("note"):
        lines.append(f"- {gt['note']}")
    lines += ["", f"Overall: {'PASS' if res['ok'] else 'FAIL'}", ""]
    return "\n".join(lines)


def run_all(out_dir: Path, smoke: bool, steps: int, warmup: int, command: str) -> int:
    import torch

    from megatron_internvl.models.flops import device_peak_tflops

    t_start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not smoke and not torch.cuda.is_available():
        log("no CUDA device: use --cpu-smoke on a CPU machine")
        return 2
    res = {"mode": "cpu-smoke" if smoke else "gpu", "command": command}
    res["env"] = environment()
    res["peak_tflops"] = device_peak_tflops()
    (out_dir / "env.json").write_text(json.dumps(res["env"], indent=1) + "\n")
    log(f"environment: {res['env']['gpu'] or 'CPU'}; {res['env']['spec_auto']}")
    shapes = SMOKE_SHAPE if smoke else {k: (r, o + ONE_PACK) for k, (r, o) in SHAPES.items()}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, open(out_dir / "check.log", "w") as logf:
        work = Path(tmp)
        cpu_env = dict(_python_env(), CUDA_VISIBLE_DEVICES="")
        log("correctness: converter import of a tiny transformers InternVL")
        imp = _worker(["import-tiny", "--work", str(work)], work / "import.json", logf, 300, env=cpu_env)
        if "error" in imp:
            res["forward"] = {"error": f"import: {imp['error']}"}
        else:
            log("correctness: BF16 packed forward vs transformers fp32")
            res["forward"] = _worker(["forward", "--work", str(work)], work / "forward.json", logf, 300)
        train_steps = 10 if smoke else TRAIN_STEPS
        log(f"correctness: {train_steps} BF16 training steps against fp32 on the CPU")
        try:
            res["training"] = training(work, logf, 400, train_steps)
        except Exception as exc:
            traceback.print_exc(file=logf)
            res["training"] = {"error": f"{type(exc).__name__}: {exc}"}
        log("correctness per spec: host reads of a step, one-layer gradients, the Triton loss kernel")
        res["specs"] = _worker(["spec-checks", "--work", str(work)], work / "specs.json", logf, 400)
        skipped = res["specs"].setdefault("skipped", {})
        te_missing = specs_here()["te"]
        for name, fn in (("te_resume", lambda: te_resume(work, Path(imp["ckpt"]), logf, 300)),
                         ("fp8_vs_bf16", lambda: fp8_vs_bf16(work, Path(imp["ckpt"]), logf, 300))):
            if te_missing:
                skipped[name] = te_missing
            elif "error" in imp:
                res["specs"].setdefault("checks", {})[name] = {"error": f"import: {imp['error']}"}
            elif name == "fp8_vs_bf16" and torch.cuda.get_device_capability() < (8, 9):
                skipped[name] = "needs compute capability 8.9+ (Ada, Hopper) for FP8"
            else:
                log(f"Transformer Engine spec: {name}")
                try:
                    res["specs"].setdefault("checks", {})[name] = fn()
                except Exception as exc:
                    traceback.print_exc(file=logf)
                    res["specs"].setdefault("checks", {})[name] = {"error": f"{type(exc).__name__}: {exc}"}
        (out_dir / "correctness.json").write_text(json.dumps(
            {"forward": res["forward"], "training": res["training"], "specs": res["specs"]}, indent=1) + "\n")
        res["throughput"] = {}
        for shape, (recipe, overrides) in shapes.items():
            pair = res["throughput"][shape] = {"recipe": str(Path(recipe).relative_to(ROOT)), "overrides": overrides}
            log(f"throughput {shape}: this project ({steps} steps)")
            try:
                pair["ours"] = ours(Path(recipe), overrides, steps, warmup, work / f"ours-{shape}", logf, 420)
            except Exception as exc:
                traceback.print_exc(file=logf)
                pair["ours"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"throughput {shape}: transformers ({steps} steps)")
            args = ["hf-train", "--recipe", str(recipe), "--steps", str(steps), "--warmup", str(warmup)]
            args += [f"--override={o}" for o in overrides]
            pair["transformers"] = _worker(args, work / f"hf-{shape}.json", logf, 420)
            a, b = pair["ours"].get("tokens_per_s"), pair["transformers"].get("tokens_per_s")
            pair["ratio_tokens_per_s"] = a / b if a and b else None
        (out_dir / "throughput.json").write_text(json.dumps(res["throughput"], indent=1) + "\n")
        # The largest shape, profiled while the 8-minute budget allows.
        shape, (recipe, overrides) = list(shapes.items())[-1]
        if time.monotonic() - t_start < PROFILE_IF_BEFORE_S or smoke:
            log(f"profile {shape}: forward + backward of one pack")
            args = ["profile", "--recipe", str(recipe), "--table", str(out_dir / "profile.txt")]
            args += [f"--override={o}" for o in overrides]
            res["profile"] = dict(_worker(args, work / "profile.json", logf, 240), shape=shape)
        else:
            res["profile"] = {"skipped": f"over {PROFILE_IF_BEFORE_S} s already spent"}
        if smoke:
            res["loss_memory"] = {"skipped": "GPU only (CPU figures: bench/results/loss_memory_cpu-*.md)"}
        elif time.monotonic() - t_start < LOSS_MEMORY_IF_BEFORE_S:
            log("loss memory: logits path vs fused, 1B and 8B output layers, 16384 tokens, BF16")
            try:
                res["loss_memory"] = loss_memory(work, logf, 150)
            except Exception as exc:
                traceback.print_exc(file=logf)
                res["loss_memory"] = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            res["loss_memory"] = {"skipped": f"over {LOSS_MEMORY_IF_BEFORE_S} s already spent"}
    log("tests/gpu")
    try:
        res["gpu_tests"] = gpu_tests(out_dir, 240)
    except Exception as exc:
        res["gpu_tests"] = {"error": f"{type(exc).__name__}: {exc}"}
    fw, tr = res["forward"], res["training"]
    throughput_ok = all("error" not in p.get(w, {"error": 1}) for p in res["throughput"].values()
                        for w in ("ours", "transformers"))
    checks = res["specs"].get("checks", {})
    specs_ok = "error" not in res["specs"] and bool(checks) and all(c.get("ok") for c in checks.values())
    res["ok"] = bool(fw.get("ok")) and bool(tr.get("ok")) and throughput_ok and specs_ok
    res["wall_s"] = time.monotonic() - t_start
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", (res["env"]["gpu"] or "cpu").replace("NVIDIA ", "")).strip("-")
    stem = (f"cpu-smoke_{time.strftime('%Y-%m-%d')}" if smoke else f"gpu_{gpu}_{time.strftime('%Y-%m-%d')}")
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    text = summary_md(res, smoke)
    (out_dir / f"{stem}.md").write_text(text)
    print(text)
    log(f"done in {res['wall_s']:.0f} s: {out_dir / stem}.{{md,json}}")
    return 0 if res["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole check")
    r.add_argument("--out", required=True)
    r.add_argument("--cpu-smoke", action="store_true")
    r.add_argument("--steps", type=int, default=None, help="throughput steps per trainer (GPU 15, smoke 4)")
    r.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (GPU 5, smoke 1)")
    r.add_argument("--command", default="bash bench/gpu/run.sh")
    for name in ("import-tiny", "forward", "spec-checks"):
        w = sub.add_parser(name)
        w.add_argument("--work", required=True)
        w.add_argument("--result", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--recipe", required=True)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--table", required=True)
    p.add_argument("--result", required=True)
    h = sub.add_parser("hf-train")
    h.add_argument("--recipe", required=True)
    h.add_argument("--override", action="append", default=[])
    h.add_argument("--steps", type=int, required=True)
    h.add_argument("--warmup", type=int, required=True)
    h.add_argument("--result", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        steps = args.steps or (4 if args.cpu_smoke else 15)
        warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 5)
        return run_all(Path(args.out), args.cpu_smoke, steps, warmup, args.command)
    if args.cmd == "import-tiny":
        result = import_tiny(Path(args.work))
    elif args.cmd == "forward":
        result = forward(Path(args.work))
    elif args.cmd == "spec-checks":
        result = spec_checks(Path(args.work))
    elif args.cmd == "profile":
        result = profile(Path(args.recipe), args.override, Path(args.table))
    else:
        result = hf_train(Path(args.recipe), args.override, args.steps, args.warmup)
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
