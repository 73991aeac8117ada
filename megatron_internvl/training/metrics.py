"""Step metrics: metrics.jsonl, TensorBoard, a progress line with ETA (rank 0 only)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, tensorboard: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.total = total_steps
        self.progress = progress
        self.start = time.monotonic()
        self.first_step = None
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: pip install tensorboard (metrics.jsonl is "
                      "still written)", file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key.replace(".", "/"), value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        self.writer.add_scalar(f"{key}/{sub}", v, step)
        if self.progress:
            if self.first_step is None:
                self.first_step, self.first_time = step, time.monotonic()
            done = step - self.first_step
            rate = (time.monotonic() - self.first_time) / done if done else float("nan")
            eta = rate * (self.total - step)
            pct = 100.0 * step / self.total
            extra = f" | {record['tflops_per_gpu']:.2f} TFLOP/s/GPU" if record.get("tflops_per_gpu") else ""
            print(f"[{pct:5.1f}%] step {step}/{self.total} | loss {record['loss']:.4f} | "
                  f"grad_norm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | "
                  f"{record['tokens_per_s']:.0f} tok/s{extra} | eta {_fmt_eta(eta)}",
                  file=sys.stderr, flush=True)

    def log_validation(self, record: dict) -> None:
        """A validation record (`training/evaluate.py`): the same file, TensorBoard under val_*."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            self.writer.add_scalar("val_loss", record["val_loss"], record["step"])
            for name, v in record["val_dataset_loss"].items():
                self.writer.add_scalar(f"val_dataset_loss/{name}", v, record["step"])
        if self.progress:
            print(f"[eval] step {record['step']} | val_loss {record['val_loss']:.4f} | "
                  f"{record['val_packs']} packs, {record['val_skipped']} of {record['val_samples']} samples "
                  f"skipped | {record['val_time_s']:.1f}s", file=sys.stderr, flush=True)

    def event(self, step: int, **fields) -> None:
        """Non-step events (skipped updates, loss spikes, stops) go to the same file."""
        if self.enabled:
            self.file.write(json.dumps({"step": step, "event": fields}) + "\n")
            self.file.flush()
            print(f"step {step}: {fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
