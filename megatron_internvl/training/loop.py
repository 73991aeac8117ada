"""The training loop over a set-up run (`setup.py`): steps, metrics, the non-finite and loss-spike
watch, saves, and stops (a signal, the time limit or `training.exit_interval`, each followed by
a save and the requeue exit code)."""

from __future__ import annotations

import sys
import time

import torch
from megatron.core import parallel_state as ps

from megatron_internvl.models.flops import device_peak_tflops, step_flops
from megatron_internvl.parallel.distributed import compute_device

from .metrics import MetricsLogger
from .setup import DTYPES, TrainingRun
from .signals import EXIT_REQUEUE, StopRequest
from .step import StepResult, train_step


class TrainingAborted(RuntimeError):
    """Training cannot go on (non-finite steps in a row); the message says what to do."""


class HealthWatch:
    """Counts non-finite steps in a row (aborting past the limit) and flags loss spikes against a
    running mean of the good steps."""

    def __init__(self, training, save_dir):
        self.t, self.save_dir = training, save_dir
        self.nonfinite_in_row, self.loss_avg = 0, None

    def check(self, step: int, result: StepResult, metrics: MetricsLogger) -> None:
        t = self.t
        if not result.updated:
            self.nonfinite_in_row += 1
            metrics.event(step, skipped_update="non-finite loss or gradients", loss=result.loss,
                          in_a_row=self.nonfinite_in_row)
            if self.nonfinite_in_row >= t.max_nonfinite_in_row:
                raise TrainingAborted(
                    f"{self.nonfinite_in_row} non-finite steps in a row (training.max_nonfinite_in_row="
                    f"{t.max_nonfinite_in_row}): lower the learning rate or check the data; "
                    f"the last good checkpoint is in {self.save_dir}")
            return
        self.nonfinite_in_row = 0
        if self.loss_avg is not None and result.loss > t.loss_spike_factor * self.loss_avg:
            metrics.event(step, loss_spike=result.loss, running_mean=self.loss_avg)
        self.loss_avg = result.loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * result.loss


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


def step_record(run: TrainingRun, step: int, result: StepResult, lr: float, elapsed: float) -> dict:
    loader = run.loader
    rates = throughput(run, result, elapsed)
    plan = getattr(loader.inner, "step_stats", None)  # the planned loader's balance (reading rank)
    return {
        "step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": lr,
        "tokens_per_s": result.tokens / elapsed, "tiles_per_s": result.tiles / elapsed,
        "tflops_per_gpu": rates["tflops_per_gpu"], "mfu": rates["mfu"], "step_time_s": elapsed,
        "tokens": result.tokens, "tiles": result.tiles,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "dataset_loss": {loader.dataset_names[i]: v for i, v in result.dataset_loss.items()},
        "data_imbalance": rates["data_imbalance"],
        **({f"plan_{k}": v for k, v in plan().items()} if plan is not None else {}),
        **({"mpo": result.mpo} if run.mpo is not None else {}),
    }


def stop_reason(stop: StopRequest, training, step: int) -> str | None:
    reason = stop.should_stop()
    if not reason and training.exit_interval and step % training.exit_interval == 0 and step < training.train_steps:
        reason = f"training.exit_interval={training.exit_interval}"
    return reason


def train(run: TrainingRun) -> int:
    """Run steps until training.train_steps or a stop; the exit code (EXIT_REQUEUE after a stop)."""
    config, t = run.config, run.config.training
    n_micro = t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())
    metrics = MetricsLogger(run.run_dir, t.train_steps, enabled=run.rank0, tensorboard=config.logging.tensorboard,
                            progress=config.logging.progress)
    stop, health = StopRequest(t.time_limit_minutes), HealthWatch(t, run.save_dir)
    save_every = config.checkpoint.save_interval
    step, exit_code, finished = run.start_step, 0, False
    try:
        while step < t.train_steps:
            run.manager.poll()
            t0 = time.monotonic()
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
            batches = [next(run.loader) for _ in range(n_micro)]
            result = train_step(run.ddp, run.optimizer, run.scheduler, batches, dtype=DTYPES[t.precision],
                                num_datasets=len(run.loader.dataset_names),
                                inject_nan=(step + 1) in t.inject_nan_steps,
                                fused_loss=config.model.fused_loss, mpo=run.mpo)
            step += 1
            elapsed = time.monotonic() - t0
            health.check(step, result, metrics)
            if step % t.log_interval == 0 or step == t.train_steps:
                metrics.log(step_record(run, step, result, lr, elapsed))
            reason = stop_reason(stop, t, step)
            if reason:
                run.save(step)
                metrics.event(step, stopped=reason, exit_code=EXIT_REQUEUE)
                exit_code = EXIT_REQUEUE
                break
            if (save_every and step % save_every == 0) or step == t.train_steps:
                run.save(step)
        finished = True
    finally:
        # Every rank reaches here together after a normal end, a stop request or TrainingAborted
        # (agreed over ranks): publish the background save. After any other error, collectives
        # could hang: kill the writer; the previous checkpoint stays `latest`.
        if finished or isinstance(sys.exc_info()[1], TrainingAborted):
            run.manager.wait()
        else:
            run.manager.abort()
        metrics.close()
    return exit_code
