"""Time to build one InternVL model chunk with and without drawing initial weights.

  python bench/model_build.py [--layers N]   (single process, CPU or GPU)

The schema's default model (InternVL3-1B shape) on one rank; prints both times and the ratio.
Starting from a checkpoint (resume, converters) uses initialize=False.
"""

from __future__ import annotations

import argparse
import time

from megatron_internvl.config import ModelConfig, ParallelConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="LLM layers (default: the model's)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from megatron_internvl.models.factory import build_internvl_model
    from megatron_internvl.parallel import distributed

    parallel = ParallelConfig()
    distributed.initialize(parallel, seed=1)
    model = ModelConfig()
    if args.layers:
        model.language.num_layers = args.layers
    times = {}
    for initialize in (True, False):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            chunk = build_internvl_model(model, parallel, "bf16", initialize=initialize)
            best = min(best, time.perf_counter() - t0)
            del chunk
        times[initialize] = best
    params = sum(p.numel() for p in build_internvl_model(model, parallel, "bf16", initialize=False).parameters())
    print(f"{params / 1e9:.2f} B parameters; build with initial weights {times[True]:.1f} s, "
          f"without {times[False]:.1f} s; ratio {times[True] / times[False]:.1f}x (best of {args.repeats})")
    distributed.destroy()


if __name__ == "__main__":
    main()
