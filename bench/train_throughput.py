"""Training throughput and MFU of the real loop on synthetic packs, variants against a baseline.

Runs `megatron_internvl.train` (torchrun) once per variant in one invocation, on the same recipe,
and reports the median over the steps after the warm-up of tokens/s, TFLOP/s per GPU, MFU, step
time and peak memory, plus each variant's ratio to the first one. Results go to
bench/results/train_throughput_<tag>.{json,md} with the device named.

  # GPU: BF16 baseline vs FP8, InternVL3-1B shape
  python bench/train_throughput.py examples/bench/internvl3_1b_synthetic.yaml --nproc 1 \\
      --variant bf16: --variant fp8:training.precision=fp8 --tag h100
  # CPU smoke of the script itself (tiny model)
  python bench/train_throughput.py examples/tiny/full.yaml --cpu-tiny --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_SYNTHETIC = ["data.synthetic.enabled=true", "data.synthetic.sample_tokens=64",
                  "data.synthetic.tiles_per_sample=2", "data.meta_path=null"]
METRICS = ("tokens_per_s", "tiles_per_s", "tflops_per_gpu", "mfu", "step_time_s", "peak_memory_gb")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_variant(recipe: str, overrides: list[str], nproc: int, steps: int, run_dir: Path) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "--master-port=29533", "-m", "megatron_internvl.train"]
    cmd = launcher + [recipe, f"logging.run_dir={run_dir}", f"training.train_steps={steps}",
                      "logging.progress=false", "logging.tensorboard=false",
                      "checkpoint.save_interval=null", f"checkpoint.save={run_dir}/ckpt"] + overrides
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The loop saves at the last step; a throughput run does not need it, but it is timed after
    # the last logged step, so it does not touch the numbers.
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"variant {overrides} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def summarise(records: list[dict], warmup: int) -> dict:
    steady = [r for r in records if r["step"] > warmup]
    out = {"steps_measured": len(steady), "final_loss": records[-1]["loss"]}
    for key in METRICS:
        values = [r[key] for r in steady if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the medians")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,key=value (the first is the baseline); default: one 'base'")
    ap.add_argument("--cpu-tiny", action="store_true", help="synthetic packs for the tiny recipe")
    ap.add_argument("--tag", default=None, help="results file suffix (default: cpu or gpu)")
    args = ap.parse_args(argv)
    if args.warmup >= args.steps:
        ap.error(f"--warmup={args.warmup} must be below --steps={args.steps}")
    variants = []
    for spec in args.variant or ["base:"]:
        name, _, rest = spec.partition(":")
        variants.append((name, [kv for kv in rest.split(",") if kv]))
    extra = TINY_SYNTHETIC if args.cpu_tiny else []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants:
            records = run_variant(str(Path(args.recipe).resolve()), extra + overrides, args.nproc,
                                  args.steps, Path(tmp) / name)
            results[name] = {"overrides": overrides, **summarise(records, args.warmup)}
    base = results[variants[0][0]]
    for r in results.values():
        r["ratio_tokens_per_s"] = r["tokens_per_s"] / base["tokens_per_s"]
    report = {"device": device_name(), "recipe": args.recipe, "nproc": args.nproc, "steps": args.steps,
              "warmup": args.warmup, "extra_overrides": extra, "variants": results}
    import torch

    tag = args.tag or ("gpu" if torch.cuda.is_available() else "cpu")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"train_throughput_{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = ["| variant | tokens/s | ratio | TFLOP/s/GPU | MFU | step s | peak GiB | final loss |",
            "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for name, r in results.items():
        rows.append(f"| {name} | {fmt(r['tokens_per_s'], '.0f')} | {r['ratio_tokens_per_s']:.3f} | "
                    f"{fmt(r['tflops_per_gpu'], '.3f')} | {fmt(r['mfu'], '.3f')} | {fmt(r['step_time_s'], '.3f')} | "
                    f"{fmt(r['peak_memory_gb'], '.2f')} | {r['final_loss']:.4f} |")
    text = (f"# Training throughput ({tag})\n\nDevice: {report['device']}; recipe `{args.recipe}`; "
            f"{args.nproc} process(es); {args.steps} steps, medians over steps > {args.warmup}.\n"
            f"Command: `python bench/train_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
            + "\n".join(rows) + "\n")
    (out_dir / f"train_throughput_{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
