"""Peak memory and time of the loss (forward + backward): today's path vs the fused one.

Today's path is what the model did before ``model.fused_loss``: vocab-parallel logits from the
output layer, padded vocabulary rows set to -inf, ``training.loss.weighted_token_loss`` (megatron's
``vocab_parallel_cross_entropy`` on an fp32 copy), backward. The fused path is
``kernels.fused_linear_ce.weighted_linear_cross_entropy`` on the same hidden states and weight.

Each measurement runs in fresh processes (TP ranks on gloo, TP>1 emulated on one machine), so a
process's peak resident set (``ru_maxrss``) is that of one measurement: the figure reported is
``peak RSS - RSS before the loss`` (inputs, weight and imports excluded; the weight gradient,
which both paths allocate, included), the maximum over TP ranks. On a GPU, the allocator's
peak (``torch.cuda.max_memory_allocated``) is used instead, after one untimed warm-up call
(cuBLAS and Triton compile once).

    python bench/loss_memory.py                                   # the issue's full grid
    python bench/loss_memory.py --shape 1b --tokens 16384 --tp 1 --tag cpu
Writes bench/results/loss_memory_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {"1b": 896, "8b": 3584}  # InternVL3-1B / -8B LLM hidden sizes
VOCAB = 151674


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(path: str, hidden_size: int, tokens: int, tp: int, dtype_name: str, threads: int) -> dict:
    """One rank's measurement (called in a spawned rank by tests/harness.run_ranks)."""
    import torch

    torch.set_num_threads(threads)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_internvl.config import ParallelConfig
    from megatron_internvl.parallel import distributed

    distributed.initialize(ParallelConfig(tensor_parallel=tp), seed=0)
    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    padded = -(-VOCAB // (128 * tp)) * 128 * tp
    local = padded // tp
    rank = ps.get_tensor_model_parallel_rank()
    real = max(0, min(local, VOCAB - rank * local))
    gen = torch.Generator(device=device).manual_seed(rank)
    hidden = torch.empty(tokens, hidden_size, dtype=dtype, device=device).normal_(generator=gen)
    weight = torch.empty(local, hidden_size, dtype=dtype, device=device).normal_(std=0.02, generator=gen)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    labels = torch.randint(0, VOCAB, (tokens,), device=device, generator=gen)
    weights = torch.ones(tokens, device=device)  # every token supervised: the worst case

    def loss_once():
        h = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        if path == "today":
            from megatron_internvl.training.loss import weighted_token_loss

            logits = h @ weight.t()
            if real < local:
                pad = torch.zeros(local, dtype=torch.bool, device=device)
                pad[real:] = True
                logits = logits.masked_fill(pad, float("-inf"))
            loss = weighted_token_loss(logits[:, None, :], labels[None], weights[None]).sum()
            del logits
        else:
            from megatron_internvl.kernels.fused_linear_ce import weighted_linear_cross_entropy

            loss = weighted_linear_cross_entropy(h, weight, labels, weights, ps.get_tensor_model_parallel_group(),
                                                 vocab_size=VOCAB).loss
        loss.backward()
        return loss

    if device.type == "cuda":  # cuBLAS and Triton compile once, outside the measurement
        loss_once()
        hidden.grad = weight.grad = None
    torch.distributed.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss = loss_once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = peak_after - before
        if peak_after <= peak_before:  # the loss never exceeded an earlier high-water mark
            peak = None
    return {"rank": rank, "peak_bytes": peak, "seconds": seconds, "loss": float(loss),
            "grad_norm": float(weight.grad.float().norm())}


def run_one(path, shape, tokens, tp, dtype, threads):
    from harness import run_ranks

    ranks = run_ranks(measure, tp, path, SHAPES[shape], tokens, tp, dtype, threads, timeout=3600)
    peaks = [r["peak_bytes"] for r in ranks]
    return {"path": path, "shape": shape, "hidden": SHAPES[shape], "tokens": tokens, "tp": tp,
            "dtype": dtype, "peak_gib": None if None in peaks else max(peaks) / 2**30,
            "seconds": max(r["seconds"] for r in ranks), "loss": ranks[0]["loss"],
            "grad_norm_rank0": ranks[0]["grad_norm"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: 1b and 8b")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--tp", type=int, action="append", help="default: 1 and 2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / TP)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternate today/fused this many times; median time, first run's memory")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    rows = []
    load_start = os.getloadavg()[0]
    for shape in args.shape or ["1b", "8b"]:
        for tp in args.tp or [1, 2]:
            threads = args.threads or max(1, (os.cpu_count() or 1) // tp)
            runs = {"today": [], "fused": []}
            for _ in range(args.repeats):  # alternating, so a change in machine load hits both
                for p in runs:
                    runs[p].append(run_one(p, shape, args.tokens, tp, args.dtype, threads))
            t, f = (dict(runs[p][0], seconds=statistics.median(r["seconds"] for r in runs[p]),
                         repeats=args.repeats) for p in ("today", "fused"))
            f["memory_ratio_today_over_fused"] = (t["peak_gib"] / f["peak_gib"]
                                                  if t["peak_gib"] and f["peak_gib"] else None)
            f["time_ratio_fused_over_today"] = f["seconds"] / t["seconds"]
            rows += [t, f]
            print(json.dumps(f), flush=True)
    import torch

    env = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           # Other work on the machine skews the times (both paths alternate to share it).
           "load_average_start_end": [round(load_start, 1), round(os.getloadavg()[0], 1)],
           "command": "python bench/loss_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"loss_memory_{args.tag}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [f"# Loss memory: today's path vs fused ({env['device']}, {env['cpus']} cores, torch {env['torch']})",
             "", f"`{env['command']}` (load average {env['load_average_start_end'][0]} at start, "
             f"{env['load_average_start_end'][1]} at end)", "",
             "| shape | hidden | tokens | TP | dtype | path | peak loss memory (GiB) | time (s) | memory today/fused | time fused/today |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        mr = r.get("memory_ratio_today_over_fused")
        tr = r.get("time_ratio_fused_over_today")
        lines.append(f"| {r['shape']} | {r['hidden']} | {r['tokens']} | {r['tp']} | {r['dtype']} | {r['path']} | "
                     f"{mem} | {r['seconds']:.1f} | {'' if mr is None else f'{mr:.1f}x'} | "
                     f"{'' if tr is None else f'{tr:.2f}x'} |")
    (out / f"loss_memory_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
