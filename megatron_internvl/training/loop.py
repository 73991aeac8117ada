"""The training loop over a set-up run (`setup.py`): steps, metrics, the non-finite and loss-spike
watch, saves, and stops (a signal, the time limit or `training.exit_interval`, each followed by
a save and the requeue exit code)."""

from __future__ import annotations

import sys
import time

import torch
from megatron.core import parallel_state as ps

from megatron_internvl.config.errors import InternVLError
from megatron_internvl.config.loader import config_to_dict

from .metrics import MetricsLogger
from .moe_metrics import MoeMonitor
from .profiling import StepProfiler
from .records import step_record
from .setup import DTYPES, TrainingRun
from .signals import EXIT_REQUEUE, StopRequest
from .step import StepResult, train_step


class TrainingAborted(InternVLError, RuntimeError):
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
                            progress=config.logging.progress, wandb=config.logging.wandb,
                            config=config_to_dict(config))
    stop, health = StopRequest(t.time_limit_minutes), HealthWatch(t, run.save_dir)
    save_every = config.checkpoint.save_interval
    profiler = StepProfiler(run.run_dir, config.logging.profile_steps, torch.distributed.get_rank())
    moe = MoeMonitor(run.ddp, config.model.language) if config.model.language.num_experts else None
    step, exit_code, finished, save_s = run.start_step, 0, False, 0.0
    try:
        if run.evaluator is not None:
            run.evaluator.maybe_run(step, run.start_step, run.ddp, metrics)
        while step < t.train_steps:
            run.manager.poll()
            profiler.begin(step + 1)
            t0, cpu0 = time.monotonic(), time.process_time()
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
            # the step's micro-batches; their tiles go to the device as the schedule needs them
            batches = [run.loader.next_deferred() for _ in range(n_micro)]
            data_s = time.monotonic() - t0
            result = train_step(run.ddp, run.optimizer, run.scheduler, batches, dtype=DTYPES[t.precision],
                                num_datasets=len(run.loader.dataset_names),
                                inject_nan=(step + 1) in t.inject_nan_steps,
                                fused_loss=config.model.fused_loss, mpo=run.mpo,
                                fetch_pixels=run.loader.fetch_pixels, prefetch=t.micro_batch_prefetch)
            step += 1
            elapsed, cpu_s = time.monotonic() - t0, time.process_time() - cpu0
            profiler.end(step)
            health.check(step, result, metrics)
            if step % t.log_interval == 0 or step == t.train_steps:
                metrics.log(step_record(run, step, result, lr, elapsed, {"data": data_s, "checkpoint": save_s},
                                        moe, cpu_s=cpu_s))
                save_s = 0.0
            if run.evaluator is not None:
                run.evaluator.maybe_run(step, run.start_step, run.ddp, metrics)
            reason = stop_reason(stop, t, step)
            t_save = time.monotonic()
            if reason:
                run.save(step)
                metrics.event(step, stopped=reason, exit_code=EXIT_REQUEUE)
                exit_code = EXIT_REQUEUE
                break
            if (save_every and step % save_every == 0) or step == t.train_steps:
                run.save(step)
            save_s += time.monotonic() - t_save
        finished = True
    finally:
        # Every rank reaches here together after a normal end, a stop request or TrainingAborted
        # (agreed over ranks): publish the background save. After any other error, collectives
        # could hang: kill the writer; the previous checkpoint stays `latest`.
        if finished or isinstance(sys.exc_info()[1], TrainingAborted):
            run.manager.wait()
        else:
            run.manager.abort()
        profiler.close()
        metrics.close()
        run.loader.close()  # data workers stop now, not at the interpreter's exit
    return exit_code
