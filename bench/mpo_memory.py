"""Memory of the MPO stage by reference mode: a frozen reference model in the step vs a
precomputed table, against an SFT step on the same model (the baseline), in one run.

Each configuration trains a few steps in its own process (``megatron_internvl.train`` on the
tiny preference pairs with a larger LLM) and reports its peak memory: the peak resident set on
CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on a GPU. The numbers are ratios
against the SFT baseline measured in the same run.

    python bench/mpo_memory.py --out bench/results/mpo_memory_cpu [--hidden 1024 --layers 8 --vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "tiny"))

CHILD = r"""
import resource, runpy, sys, torch
args = sys.argv[1:]
module = args.pop(0) if args[0].startswith("megatron_internvl") else "megatron_internvl.train"
sys.argv = [module] + args
code = 0
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as e:
    code = e.code or 0
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PEAK_BYTES", peak, "RC", code, flush=True)
"""


def _run(args, env) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_BYTES"):
            _, peak, _, rc = line.split()
            if rc not in ("0", "None"):
                break
            return int(peak)
    raise RuntimeError(f"run failed:\n{out.stderr[-4000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results prefix (.json and .md are written)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv)
    from make_dataset import build

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = build(tmp / "data")
        model = [f"model.language.hidden_size={args.hidden}", f"model.language.num_layers={args.layers}",
                 f"model.language.ffn_hidden_size={args.hidden * 11 // 4}", "model.language.num_heads=16",
                 "model.language.num_kv_heads=4", f"model.language.vocab_size={args.vocab}"]
        common = [f"data.tokenizer_path={data / 'tokenizer.json'}", "logging.progress=false",
                  "logging.tensorboard=false", f"training.precision={args.precision}",
                  f"training.train_steps={args.steps}", "optimizer.warmup_steps=0", *model]
        # The starting point: an SFT checkpoint of this model (one SFT step), itself the baseline.
        sft = ["examples/tiny/full.yaml", f"data.meta_path={data / 'meta.json'}", "data.max_tokens=1024",
               f"logging.run_dir={tmp / 'sft'}", *common]
        results = {"sft": _run(sft, env)}
        mpo = ["examples/tiny/mpo.yaml", f"data.meta_path={data / 'meta_mpo.json'}",
               f"checkpoint.load={tmp / 'sft' / 'checkpoints'}", "checkpoint.save_interval=1000", *common]
        results["mpo_model"] = _run([*mpo, f"logging.run_dir={tmp / 'model'}", "mpo.reference=model"], env)
        table = [f"mpo.reference_file={tmp / 'reference.pt'}"]
        _run(["megatron_internvl.training.mpo.reference", *mpo, *table], env)
        results["mpo_precomputed"] = _run([*mpo, f"logging.run_dir={tmp / 'table'}", "mpo.reference=precomputed",
                                           *table], env)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (peak RSS)"
    record = {"device": device, "load_average": os.getloadavg(), "args": vars(args) | {"out": str(args.out)},
              "peak_gib": {k: v / 2**30 for k, v in results.items()},
              "ratio_to_sft": {k: v / results["sft"] for k, v in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"# MPO memory by reference mode ({device})", "",
             f"LLM hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.precision}, "
             f"{args.steps} steps on the tiny pairs; load average {record['load_average'][0]:.1f}.", "",
             "| run | peak GiB | x SFT step |", "|---|---|---|"]
    for k in results:
        lines.append(f"| {k} | {record['peak_gib'][k]:.2f} | {record['ratio_to_sft'][k]:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
