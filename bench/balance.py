"""Balanced global batches: estimated cost imbalance, fill and planning time, `none` vs `compute`.

On a generated InternVL-like mixture (single images with 1-12 tiles plus thumbnail, multi-image
samples up to 36 tiles, video, text-only chats, a long tail of long samples), for each DP size and
model shape, every step plans `DP x micro` packs of 16k tokens / 48 tiles and reports:

- `rank max/mean`: max over DP ranks of the rank's estimated step cost / the mean (the step waits
  for the slowest rank), median and worst over the steps;
- `micro max/mean`: the same over all packs of a step (under pipeline parallelism every
  micro-batch should cost the same);
- fill: real tokens / (packs x max_tokens);
- planning time per step (one process, CPU time), and as a share of the step's time budget:
  the step's model FLOPs per GPU at 40% of a 989 TFLOP/s BF16 peak (H100/H200).

`none` is today's packer (`TwoBudgetPacker` over the global stream, packs dealt round-robin);
`compute` the planner of `data/balance.py` with the FLOPs counter of the model. Costs are the
project's FLOPs counter (`models/flops.py`) in both columns.

    python bench/balance.py [--steps 6] [--dp 8 64 512] [--micro 4] [--out bench/results/balance]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_internvl.config.schema import LanguageConfig, ModelConfig, VisionConfig  # noqa: E402
from megatron_internvl.data.balance import CostModel, StepPlanner, Unit, deal, imbalance  # noqa: E402

MAX_TOKENS, MAX_TILES, TOKENS_PER_TILE = 16384, 48, 256

SHAPES = {
    # InternViT-300M + Qwen2.5-7B
    "InternVL3-8B": ModelConfig(
        vision=VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096),
        language=LanguageConfig(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                                ffn_hidden_size=18944, vocab_size=151674)),
    # InternViT-6B + Qwen2.5-72B
    "InternVL3-78B": ModelConfig(
        vision=VisionConfig(hidden_size=3200, num_layers=45, num_heads=25, ffn_hidden_size=12800,
                            norm="rmsnorm", qkv_bias=False, qk_norm=True),
        language=LanguageConfig(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                ffn_hidden_size=29568, vocab_size=151674)),
}

MIX = {"single_image": 0.42, "multi_image": 0.06, "video": 0.04, "text": 0.44, "long": 0.04}


def mixture(n: int, seed: int) -> list[Unit]:
    """Units (tokens after image expansion, tiles, one sequence each) of an InternVL-like SFT mix."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(MIX), size=n, p=list(MIX.values()))
    out = []
    for i, kind in enumerate(kinds):
        if kind == "single_image":
            g = int(rng.integers(1, 13))
            tiles = g + (g > 1)                         # + thumbnail
            text = int(rng.lognormal(5.0, 0.8))
        elif kind == "multi_image":
            k = int(rng.integers(2, 7))
            tiles = int(min(36, sum(int(rng.integers(1, 7)) for _ in range(k))))
            text = int(rng.lognormal(5.5, 0.7))
        elif kind == "video":
            tiles = int(rng.choice([8, 16]))
            text = int(rng.lognormal(4.8, 0.6))
        elif kind == "text":
            tiles = 0
            text = int(rng.lognormal(6.0, 1.0))
        else:                                           # long tail: 4k-16k tokens, a few tiles at most
            tiles = int(rng.choice([0, 0, 0, 1, 4, 13]))
            text = int(rng.uniform(4000, MAX_TOKENS - tiles * (TOKENS_PER_TILE + 2) - 64))
        tokens = min(MAX_TOKENS, max(8, text) + tiles * TOKENS_PER_TILE + 2 * (tiles > 0))
        out.append(Unit((i, 0), tokens, tiles, (tokens,)))
    return out


def plan(units, G, steps, mode, cost):
    """The loader's own planner (`StepPlanner`) over the units in order; CPU time per step."""
    planner = StepPlanner(G, MAX_TOKENS, MAX_TILES, mode, cost if mode != "none" else None, 64)
    it = iter(units)
    for _ in range(steps):
        t0 = time.process_time()
        packs = planner.plan(lambda: [next(it)])
        yield packs, time.process_time() - t0


def measure(name, gen, cost, dp, flops_per_gpu_step_budget, balanced):
    rank_r, micro_r, fills, times = [], [], [], []
    for packs, dt in gen:
        costs = [cost.of_units(p) for p in packs]
        ranks = deal(costs, dp, balanced)
        rank_r.append(imbalance([sum(costs[k] for k in r) for r in ranks]))
        micro_r.append(imbalance(costs))
        fills.append(sum(u.tokens for p in packs for u in p) / (len(packs) * MAX_TOKENS))
        times.append(dt)
    budget_s = flops_per_gpu_step_budget
    return {
        "mode": name, "rank_median": float(np.median(rank_r)), "rank_worst": float(np.max(rank_r)),
        "micro_median": float(np.median(micro_r)), "micro_worst": float(np.max(micro_r)),
        "fill": float(np.mean(fills)), "plan_s": float(np.median(times)),
        "plan_share": float(np.median(times)) / budget_s,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dp", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--micro", type=int, default=4, help="micro-batches (packs) per rank per step")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--min-packs", type=int, default=1536,
                    help="run at least this many packs (past the packers' warm-up) per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/balance")
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes:
        model = SHAPES[shape]
        cost = CostModel.for_model(model)
        for dp in args.dp:
            G = dp * args.micro
            steps = max(args.steps, -(-args.min_packs // G))
            n = int((steps + 2) * G * MAX_TOKENS / 1500) + 10_000   # mean unit ~2k tokens
            units = mixture(n, args.seed)
            # time budget of one step on one GPU: its share of the planned FLOPs at 40% of 989 TFLOP/s
            mean_pack = np.mean([cost.of(u) for u in units[:20_000]]) * MAX_TOKENS / np.mean(
                [u.tokens for u in units[:20_000]])
            step_s = args.micro * mean_pack / (0.4 * 989e12)
            for mode in ("none", "compute"):
                gen = plan(units, G, steps, mode, cost)
                r = measure(mode, gen, cost, dp, step_s, balanced=mode != "none")
                r.update(shape=shape, dp=dp, packs_per_step=G, steps=steps, step_budget_s=step_s)
                rows.append(r)
                print(json.dumps(r), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "machine": platform.processor() or platform.machine(),
                   "load_average_start": os.getloadavg()[0], "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"# Balanced global batches\n\n`python bench/balance.py {' '.join(argv or sys.argv[1:])}`; "
                f"{args.steps} steps, {args.micro} packs per rank per step, 16k tokens / 48 tiles per pack; "
                f"load average {os.getloadavg()[0]:.1f} at the end. Plan time is the CPU time of "
                f"`StepPlanner.plan` + `deal` per step in one process, from metadata already read (the "
                f"header-only metadata pass, i.e. tokenizing the samples, is not included). The step "
                f"budget is one GPU's share of the step's FLOPs at 40% of 989 TFLOP/s, i.e. one GPU "
                f"per DP rank; a 78B replica spans several GPUs (TP x PP), which shortens its step, "
                f"and raises the share, by that factor. The worst micro-batches are packs holding "
                f"one long sample (attention ~ length^2), which no plan can split.\n\n")
        f.write("| model | DP | mode | rank max/mean (median, worst) | micro max/mean (median, worst) | fill | "
                "plan s/step | share of step budget |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['shape']} | {r['dp']} | {r['mode']} | {r['rank_median']:.3f}, {r['rank_worst']:.3f} | "
                    f"{r['micro_median']:.3f}, {r['micro_worst']:.3f} | {r['fill']:.4f} | {r['plan_s']:.3f} | "
                    f"{100 * r['plan_share']:.1f}% (budget {r['step_budget_s']:.1f} s) |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
