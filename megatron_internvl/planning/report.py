"""Text of a plan and of a layout search, as `megatron-internvl plan` prints them."""

from __future__ import annotations

from .layout import Plan
from .memory import GiB
from .search import Candidate


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def format_plan(config, plan: Plan, nodes: int, gpus_per_node: int) -> str:
    p, t, d = config.parallel, config.training, config.data
    vpp = p.virtual_pipeline_parallel or 1
    lines = [
        f"# layout: TP={p.tensor_parallel} PP={p.pipeline_parallel} VPP={vpp} "
        f"CP={p.context_parallel} DP={plan.data_parallel} on {nodes} x {gpus_per_node} GPUs; "
        f"{plan.micro_batches} micro-batches per rank per step",
        f"# stage {t.stage}, recompute {config.model.recompute}, sequence parallel "
        f"{'on' if p.sequence_parallel else 'off'}, fused loss {'on' if config.model.fused_loss else 'off'}, "
        f"packs of {d.max_tokens} tokens / {d.max_tiles} tiles, global batch {t.global_batch_size} packs",
        "",
        "memory per GPU (GiB), busiest rank of each pipeline stage:",
    ]
    names = list(plan.stages[0].terms())
    header = f"  {'term':32s}" + "".join(f"{'stage ' + str(s.stage):>9s}" for s in plan.stages)
    lines.append(header)
    lines.append(f"  {'LLM layers':32s}" + "".join(f"{s.params.llm_layers:9d}" for s in plan.stages))
    lines.append(f"  {'parameters (M, trainable)':32s}"
                 + "".join(f"{s.params.trainable / 1e6:9.1f}" for s in plan.stages))
    lines.append(f"  {'parameters (M, frozen)':32s}"
                 + "".join(f"{s.params.frozen / 1e6:9.1f}" for s in plan.stages))
    lines.append(f"  {'micro-batches in flight':32s}"
                 + "".join(f"{s.micro_batches_in_flight:9.2f}" for s in plan.stages))
    for name in names:
        if name != "peak" and not any(s.terms()[name] for s in plan.stages):
            continue  # e.g. no MPO reference model
        lines.append(f"  {name:32s}" + "".join(f"  {_gib(s.terms()[name])}" for s in plan.stages))
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"peak {plan.peak_bytes / GiB:.1f} GiB of {plan.hardware.gpu_mem_gib:g} GiB: {verdict}")
    lines.append("")
    hw = plan.hardware
    lines.append(f"FLOPs per step {plan.flops_per_step:.3e} (models/flops.py, packs of samples of "
                 f"{d.synthetic.sample_tokens} tokens)")
    lines.append(f"step time at MFU {hw.mfu:.2f} of {hw.peak_tflops:g} TFLOP/s: "
                 f"{plan.step_seconds:.2f} s with the pipeline bubble and stage balance "
                 f"{plan.balance:.2f} (slowest / mean stage), {plan.ideal_seconds:.2f} s ideal")
    for note in plan.notes:
        lines.append(f"note: {note}")
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def format_search(found: list[Candidate], top: int) -> str:
    if not found:
        return "no layout fits: lower data.max_tokens / data.max_tiles or add nodes"
    lines = [f"{len(found)} layouts fit; the {min(top, len(found))} fastest:",
             f"  {'TP':>3s} {'PP':>3s} {'VPP':>3s} {'CP':>3s} {'DP':>4s} {'first':>5s} {'recompute':>9s}"
             f" {'peak GiB':>8s} {'step s':>7s} {'balance':>7s}"]
    for c in found[:top]:
        o, plan = c.overrides, c.plan
        first = o["parallel.first_stage_llm_layers"]
        lines.append(
            f"  {o['parallel.tensor_parallel']:3d} {o['parallel.pipeline_parallel']:3d} "
            f"{o['parallel.virtual_pipeline_parallel'] or 1:3d} {o['parallel.context_parallel']:3d} "
            f"{plan.data_parallel:4d} {'-' if first is None else first:>5} {o['model.recompute']:>9s} "
            f"{plan.peak_bytes / 2**30:8.1f} {plan.step_seconds:7.2f} {plan.balance:7.2f}")
    lines.append(f"best as overrides: {found[0].override_args()}")
    return "\n".join(lines)
