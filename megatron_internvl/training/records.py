"""What a logged training step records: loss, rates, FLOPs and MFU, the data balance, and where
the step's time went (waiting for data, forward-backward, optimizer, checkpointing)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from megatron_internvl.models.flops import device_peak_tflops, step_flops
from megatron_internvl.parallel.distributed import compute_device

from .setup import TrainingRun
from .step import StepResult


def throughput(run: TrainingRun, result: StepResult, elapsed: float) -> dict:
    """FLOPs-based rates over the data-parallel ranks, and how long they wait for the dearest one."""
    config = run.config
    flops = step_flops(config.model, result.shapes, run.trainable)
    if run.mpo is not None and config.mpo.reference == "model":  # + the reference's forward pass
        flops += step_flops(config.model, result.shapes, dict.fromkeys(run.trainable, False))
    flops = torch.tensor([flops], dtype=torch.float64, device=compute_device())
    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    slowest = flops.clone()
    torch.distributed.all_reduce(flops, group=dp_group)
    torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX, group=dp_group)
    imbalance = float(slowest) * torch.distributed.get_world_size(dp_group) / float(flops) if float(flops) > 0 else 1.0
    tflops_per_gpu = float(flops) / elapsed / run.world_size / 1e12
    peak = device_peak_tflops(config.training.peak_tflops)
    return {"tflops_per_gpu": tflops_per_gpu, "mfu": tflops_per_gpu / peak if peak else None,
            "data_imbalance": imbalance}


def step_record(run: TrainingRun, step: int, result: StepResult, lr: float, elapsed: float,
                times: dict, moe=None, cpu_s: float | None = None) -> dict:
    """``times``: seconds of this step waiting for data (``data``) and, since the previous
    record, saving checkpoints (``checkpoint``); the step adds forward-backward and optimizer.
    ``moe``: a :class:`.moe_metrics.MoeMonitor`: router losses and expert load since the last record.
    ``cpu_s``: this process's CPU seconds (all its threads) over the step: on a shared CPU machine
    the measure that other processes disturb least."""
    loader = run.loader
    rates = throughput(run, result, elapsed)
    plan = getattr(loader.inner, "step_stats", None)  # the planned loader's balance (reading rank)
    return {
        "step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": lr,
        "tokens_per_s": result.tokens / elapsed, "tiles_per_s": result.tiles / elapsed,
        "tflops_per_gpu": rates["tflops_per_gpu"], "mfu": rates["mfu"], "step_time_s": elapsed,
        **({"step_cpu_s": cpu_s} if cpu_s is not None else {}),
        "tokens": result.tokens, "tiles": result.tiles,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "dataset_loss": {loader.dataset_names[i]: v for i, v in result.dataset_loss.items()},
        "data_imbalance": rates["data_imbalance"],
        **({f"plan_{k}": v for k, v in plan().items()} if plan is not None else {}),
        **({"mpo": result.mpo} if run.mpo is not None else {}),
        **({"moe": moe.read()} if moe is not None else {}),
        **{f"time_{k}_s": v for k, v in {**times, **result.times}.items()},
    }
