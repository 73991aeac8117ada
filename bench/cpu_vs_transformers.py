"""One training step on the CPU: this project against transformers, on the same work.

    python bench/cpu_vs_transformers.py [--steps 10] [--warmup 2] [--threads 2] [--profile]

A small random InternVL (InternViT-300M-style ViT on 224 px tiles -> pixel unshuffle -> MLP ->
Qwen2-style LLM, ~10M parameters) is built in transformers, saved, and imported with this
project's converter (`convert import`, fp32). Both sides then train it in fp32 on the same
samples in the same order, from the tiny built-in dataset (real photos, dynamic tiling, captions,
multi-image and text-only conversations; examples/tiny/make_dataset.py):

- **ours**: `megatron_internvl.train` (the real entry point, a fresh process) with packed
  micro-batches, loss = token average over the global batch;
- **transformers** `InternVLForConditionalGeneration` (SDPA attention), a fresh process per
  batching: the same global batches unpacked into samples, right-padded micro-batches of
  `--hf-batch` samples (4 and 1 by default), the token-averaged loss accumulated over the
  micro-batches.

Same Adam (AdamW: betas 0.9/0.999, eps 1e-8, weight decay 0.01, constant learning rate), same
clipping (1.0), same number of threads. The step-1 losses must agree (relative 1e-5) before any
time is reported: otherwise the two sides did not do the same work. Step times are the medians
after `--warmup` steps; tokens/s counts real (unpadded) tokens. The load average is recorded
before and after each side (the ratio is only meaningful on a quiet machine).

`--profile` adds a torch.profiler operator table of one step of each side (ours from
`logging.profile_steps`, which writes `profile/rank0_ops.json` next to the trace) and the
attribution by category that docs/performance.md quotes. Results: `bench/results/
cpu_vs_transformers.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The model: InternViT-300M-style ViT at 224 px (256 patches -> 64 tokens per tile) and a
# Qwen2-style LLM; small enough for a few CPU steps a second.
VISION = dict(hidden_size=128, num_layers=4, num_heads=4, ffn_hidden_size=512, image_size=224,
              patch_size=14, norm="layernorm", qkv_bias=True)
LANGUAGE = dict(arch="qwen2", hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=1024, vocab_size=512, rope_theta=10000.0, qkv_bias=True,
                max_position_embeddings=4096)
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0


def recipe(work: Path, data: Path, steps: int, gbs: int, max_tokens: int) -> dict:
    return {
        "model": {"vision": VISION, "language": LANGUAGE, "image_token_id": 5, "spec": "local"},
        "parallel": {"tensor_parallel": 1, "pipeline_parallel": 1},
        "data": {"meta_path": str(data / "meta.json"), "tokenizer_path": str(data / "tokenizer.json"),
                 "template": "internvl2_5", "image_size": 224, "num_image_token": 64,
                 "max_dynamic_patch": 4, "max_tokens": max_tokens, "max_tiles": 24, "pad_to_multiple": 1,
                 "loss_reduction": "token", "num_workers": 0, "seed": 1234},
        "training": {"stage": "full", "train_steps": steps, "global_batch_size": gbs, "precision": "fp32",
                     "clip_grad": CLIP, "log_interval": 1, "seed": 1234},
        "optimizer": {"lr": LR, "min_lr": LR, "weight_decay": WEIGHT_DECAY, "warmup_steps": 0,
                      "decay_style": "constant"},
        "checkpoint": {"keep_last": 1},
        "logging": {"run_dir": str(work / "ours"), "tensorboard": False, "progress": False},
    }


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# --- preparation (parent process) ----------------------------------------------------------------
def build_hf_model(work: Path, cfg) -> tuple[Path, int]:
    """A random transformers InternVL in the recipe's shape, saved; seeded."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_internvl.convert.hf_config import export_config

    hf_cfg = InternVLConfig(**export_config("transformers", cfg.model, None, tied=False, dtype="float32"))
    torch.manual_seed(7)
    model = InternVLForConditionalGeneration(hf_cfg)
    out = work / "hf"
    model.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def global_batches(cfg, steps: int) -> list[list[dict]]:
    """The packs of each step exactly as the trainer's loader hands them over (DP=1)."""
    from megatron_internvl.data.balance import CostModel
    from megatron_internvl.data.build import build_data_loader

    n_micro = cfg.training.global_batch_size // cfg.training.micro_batch_size
    loader = build_data_loader(cfg.data, None, 0, 1, packs_per_step=n_micro,
                               cost=CostModel.for_model(cfg.model, None))
    return [[next(loader) for _ in range(n_micro)] for _ in range(steps)]


def unpack(batches, num_image_token: int, image_token_id: int) -> list[list[dict]]:
    """Each step's packs -> its samples in order: input_ids, labels (already shifted), uint8 tiles."""
    from megatron_internvl.training.step import sample_lengths

    steps = []
    for packs in batches:
        samples = []
        for pack in packs:
            tile = 0
            start = 0
            for n in sample_lengths(pack):
                ids = pack["input_ids"][0, start:start + n].clone()
                tiles = int((ids == image_token_id).sum()) // num_image_token
                samples.append({"input_ids": ids, "labels": pack["labels"][0, start:start + n].clone(),
                                "pixels": pack["pixel_values"][tile:tile + tiles].clone()})
                tile += tiles
                start += n
            assert tile == pack["pixel_values"].shape[0], "tiles do not match the image tokens"
        steps.append(samples)
    return steps


# --- the two sides (fresh processes) ---------------------------------------------------------------
def run_ours(work: Path, recipe_path: Path, ckpt: Path, threads: int, profile_step: int | None) -> dict:
    run_dir = work / "ours"
    overrides = [f"checkpoint.load={ckpt}"]
    if profile_step:
        overrides.append(f"logging.profile_steps=[{profile_step},{profile_step}]")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    before = load_avg()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megatron_internvl.train", str(recipe_path), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"our trainer failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    out = {"losses": [r["loss"] for r in steps], "step_time_s": [r["step_time_s"] for r in steps],
           "step_cpu_s": [r["step_cpu_s"] for r in steps],
           "tokens": [r["tokens"] for r in steps], "wall_s": time.perf_counter() - t0,
           "load_before": before, "load_after": load_avg()}
    ops = run_dir / "profile" / "rank0_ops.json"
    if profile_step and ops.exists():
        out["ops"] = json.loads(ops.read_text())
    return out


def hf_side(work: Path, batch: int, threads: int, profile_step: int | None) -> dict:
    """transformers' InternVL on the saved samples: padded micro-batches of ``batch`` samples."""
    import torch
    import torch.nn.functional as F
    from transformers import InternVLForConditionalGeneration

    from megatron_internvl.models.pixels import normalize_pixels

    torch.set_num_threads(threads)
    steps = torch.load(work / "samples.pt")
    model = InternVLForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float32,
                                                             attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)

    def micro_batches(samples):
        for i in range(0, len(samples), batch):
            group = samples[i:i + batch]
            longest = max(len(s["input_ids"]) for s in group)
            ids = torch.zeros(len(group), longest, dtype=torch.long)
            labels = torch.full((len(group), longest), -100, dtype=torch.long)
            mask = torch.zeros(len(group), longest, dtype=torch.long)
            for row, s in enumerate(group):
                n = len(s["input_ids"])
                ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
            tiles = [s["pixels"] for s in group if len(s["pixels"])]
            pixels = normalize_pixels(torch.cat(tiles)) if tiles else None
            yield ids, labels, mask, pixels

    def step(samples):
        total = sum(int((s["labels"] >= 0).sum()) for s in samples)
        value = 0.0
        for ids, labels, mask, pixels in micro_batches(samples):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum") / total
            loss.backward()
            value += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    losses, times, cpu, tokens, ops = [], [], [], [], None
    before = load_avg()
    for k, samples in enumerate(steps, start=1):
        t0, cpu0 = time.perf_counter(), time.process_time()
        if profile_step == k:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                value = step(samples)
            ops = op_records(prof)
        else:
            value = step(samples)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - cpu0)
        losses.append(value)
        tokens.append(sum(len(s["input_ids"]) for s in samples))
    return {"losses": losses, "step_time_s": times, "step_cpu_s": cpu, "tokens": tokens, "load_before": before,
            "load_after": load_avg(), **({"ops": ops} if ops else {})}


def op_records(prof) -> list[dict]:
    from megatron_internvl.training.profiling import operator_records

    return operator_records(prof)


# --- attribution ------------------------------------------------------------------------------------
CATEGORIES = [
    # (category, predicate on an operator name); the first match wins.
    ("attention", lambda n: "attention" in n or "sdpa" in n or "_efficient_attention" in n or "flash" in n),
    ("loss", lambda n: any(k in n for k in ("cross_entropy", "nll_loss", "log_softmax", "_softmax_backward",
                                            "logsumexp"))),
    ("optimizer and gradient buffers", lambda n: any(k in n for k in ("_foreach", "adam", "optimizer", "clip",
                                                                       "zero_", "fill_", "copy_", "_to_copy",
                                                                       "norm", "addcmul", "addcdiv", "lerp")) and
     "layer_norm" not in n and "rms" not in n),
    ("linear layers", lambda n: any(k in n for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                                                      "aten::matmul", "convolution", "aten::t", "transpose",
                                                      "aten::baddbmm", "slow_conv", "mkldnn"))),
    ("norms and activations", lambda n: any(k in n for k in ("layer_norm", "rms", "silu", "gelu", "aten::mul",
                                                              "aten::add", "aten::pow", "aten::mean",
                                                              "rsqrt", "aten::div", "aten::sigmoid",
                                                              "aten::neg", "aten::cos", "aten::sin",
                                                              "aten::cat", "aten::sub", "threshold"))),
    ("collectives and CPU execution layer", lambda n: any(k in n for k in ("gloo", "c10d", "all_reduce",
                                                                           "broadcast", "allgather",
                                                                           "reduce_scatter", "record_param_comms"))),
]


def attribute(ops: list[dict], step_s: float) -> dict:
    """Self CPU time per category (seconds per step); "other operators" for the rest and "Python
    and framework overhead" for the step time no operator accounts for."""
    cats: dict[str, float] = {c: 0.0 for c, _ in CATEGORIES}
    cats["other operators"] = 0.0
    for op in ops:
        name = op["name"].lower()
        for cat, match in CATEGORIES:
            if match(name):
                cats[cat] += op["self_cpu_s"]
                break
        else:
            cats["other operators"] += op["self_cpu_s"]
    cats["Python and framework overhead"] = max(0.0, step_s - sum(cats.values()))
    return {k: round(v, 4) for k, v in cats.items()}


def top_ops(ops: list[dict], n: int = 12) -> list[dict]:
    return sorted(ops, key=lambda o: -o["self_cpu_s"])[:n]


# --- main ------------------------------------------------------------------------------------------
def timed(values, warmup, profiled):
    """The timed steps: after the warm-up, without the profiled (last) one."""
    return values[warmup:len(values) - (1 if profiled else 0)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=2, help="packs per step (training.global_batch_size)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per pack (data.max_tokens)")
    p.add_argument("--hf-batch", type=int, action="append", help="samples per transformers micro-batch (4 and 1)")
    p.add_argument("--profile", action="store_true", help="operator tables + attribution of one step")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_cpu_vs_transformers")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--tag", default="cpu_vs_transformers")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one transformers side
    args = p.parse_args(argv)
    if args.side:
        batch, threads, profile_step = (int(v) for v in args.side.split(","))
        print(json.dumps(hf_side(args.work, batch, threads, profile_step or None)))
        return 0

    import shutil

    import torch
    import yaml

    from megatron_internvl.config.loader import load_config

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT / "examples" / "tiny"))
    import make_dataset

    data = make_dataset.build(work / "data")
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(work, data, args.steps, args.global_batch, args.max_tokens)))
    cfg = load_config(recipe_path, [], world_size=1)
    hf_dir, n_params = build_hf_model(work, cfg)
    ckpt = work / "imported"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf.py"), "import", "--hf-dir", str(hf_dir),
                    "--out", str(ckpt), "--dtype", "fp32"], cwd=ROOT, check=True, capture_output=True)
    steps = unpack(global_batches(cfg, args.steps), cfg.data.num_image_token, cfg.model.image_token_id)
    torch.save(steps, work / "samples.pt")
    samples = sum(len(s) for s in steps)
    if args.steps < args.warmup + 2 + args.profile:
        raise SystemExit(f"--steps {args.steps}: need warm-up + 2 timed steps (+ 1 profiled)")
    profile_step = args.steps if args.profile else None  # the last step, left out of the medians
    results = {"command": "python bench/cpu_vs_transformers.py " + " ".join(argv or sys.argv[1:]),
               "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "samples": samples,
               "parameters": n_params, "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "sides": {}}
    results["sides"]["ours"] = run_ours(work, recipe_path, ckpt, args.threads, profile_step)
    for batch in args.hf_batch or [4, 1]:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run([sys.executable, __file__, "--work", str(work),
                               "--side", f"{batch},{args.threads},{profile_step or 0}"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"transformers side (batch {batch}) failed:\n{proc.stderr[-4000:]}")
        results["sides"][f"transformers_batch{batch}"] = json.loads(proc.stdout.strip().splitlines()[-1])

    ref = results["sides"]["ours"]["losses"][0]
    for name, side in results["sides"].items():
        side["step1_rel_diff"] = abs(side["losses"][0] - ref) / abs(ref)
        if side["step1_rel_diff"] > 1e-5:
            raise SystemExit(f"step-1 losses differ: ours {ref} vs {name} {side['losses'][0]}: not the same work")
        keep = lambda v: timed(v, args.warmup, args.profile)  # noqa: E731
        side["median_step_s"] = statistics.median(keep(side["step_time_s"]))
        side["median_step_cpu_s"] = statistics.median(keep(side["step_cpu_s"]))
        side["tokens_per_s"] = statistics.median(keep([t / s for t, s in zip(side["tokens"], side["step_time_s"])]))
        side["tokens_per_cpu_s"] = statistics.median(keep([t / s for t, s in zip(side["tokens"], side["step_cpu_s"])]))
        if "ops" in side:
            # An operator's self time is the calling thread's wall time in it (its intra-op threads
            # run inside it), so the step's wall time is the total to attribute.
            side["attribution"] = attribute(side["ops"], side["step_time_s"][profile_step - 1])
            side["top_ops"] = top_ops(side["ops"])
            del side["ops"]
    best = max((s for n, s in results["sides"].items() if n != "ours"), key=lambda s: s["tokens_per_s"])
    results["ours_over_best_transformers"] = results["sides"]["ours"]["tokens_per_s"] / best["tokens_per_s"]
    best_cpu = max((s for n, s in results["sides"].items() if n != "ours"), key=lambda s: s["tokens_per_cpu_s"])
    results["ours_over_best_transformers_cpu"] = (results["sides"]["ours"]["tokens_per_cpu_s"]
                                                  / best_cpu["tokens_per_cpu_s"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{args.tag}.md").write_text(summary(results))
    print(summary(results))
    return 0


def summary(r: dict) -> str:
    lines = [f"# One CPU training step: this project vs transformers", "",
             f"`{r['command']}`; {r['date_utc']} UTC, torch {r['torch']}, {r['cpu_count']} cores, "
             f"{r['threads']} threads per side, fp32, {r['parameters'] / 1e6:.1f}M parameters, "
             f"{r['samples']} samples over {r['steps']} steps (medians after {r['warmup']}).", "",
             "| side | step-1 loss | rel. diff to ours | median step s | tokens/s | median step CPU s | "
             "tokens per CPU s | load avg before / after |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in r["sides"].items():
        lines.append(f"| {name} | {s['losses'][0]:.8f} | {s['step1_rel_diff']:.1e} | {s['median_step_s']:.3f} | "
                     f"{s['tokens_per_s']:.0f} | {s['median_step_cpu_s']:.3f} | {s['tokens_per_cpu_s']:.0f} | "
                     f"{s['load_before']} / {s['load_after']} |")
    lines += ["", f"**ours / best transformers batching: {r['ours_over_best_transformers']:.2f}x** (tokens/s, wall); "
              f"{r['ours_over_best_transformers_cpu']:.2f}x in tokens per CPU second (the process's CPU time, "
              f"all threads: what other load on the machine disturbs least)."]
    if any("attribution" in s for s in r["sides"].values()):
        names = [n for n, s in r["sides"].items() if "attribution" in s]
        cats = list(next(s for s in r["sides"].values() if "attribution" in s)["attribution"])
        lines += ["", "Self CPU seconds of one profiled step by category (torch.profiler; the profiler's own "
                  "overhead is in every row):", "", "| category | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for c in cats:
            lines.append(f"| {c} | " + " | ".join(f"{r['sides'][n]['attribution'][c]:.3f}" for n in names) + " |")
        for n in names:
            lines += ["", f"Top operators, {n}:", "", "| operator | calls | self CPU s |", "|---|---|---|"]
            lines += [f"| `{o['name']}` | {o['count']} | {o['self_cpu_s']:.4f} |" for o in r["sides"][n]["top_ops"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
