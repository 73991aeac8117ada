"""Step metrics: metrics.jsonl, TensorBoard, Weights & Biases, a progress line with ETA (rank 0
only)."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def flat_scalars(record: dict) -> dict:
    """{"dataset_loss": {"a": 1.0}} -> {"dataset_loss/a": 1.0}; numbers only."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def start_wandb(cfg, run_dir: Path, config: dict | None):
    """A W&B run whose id is kept in RUN_DIR/wandb_id: a resumed (requeued) training run
    continues the same W&B run. The resolved config is recorded with it."""
    try:
        import wandb
    except ImportError as exc:
        raise RuntimeError("logging.wandb.project is set but wandb is not installed: pip install wandb "
                           "(or pip install megatron-internvl[wandb])") from exc
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=cfg.project, name=cfg.name or run_dir.name, entity=cfg.entity, mode=cfg.mode,
                      dir=str(run_dir), id=run_id, resume="allow", config=config)


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, tensorboard: bool = True,
                 progress: bool = True, wandb=None, config: dict | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total = total_steps
        self.progress = progress
        self.start = time.monotonic()
        self.first_step = None
        self.writer = None
        self.wandb = None
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
        if wandb is not None and wandb.project and wandb.mode != "disabled":
            self.wandb = start_wandb(wandb, run_dir, config)

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
        if self.wandb is not None:
            self.wandb.log(flat_scalars(record), step=step)
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
        if self.wandb is not None:
            self.wandb.log(flat_scalars(record), step=record["step"])
        if self.progress:
            print(f"[eval] step {record['step']} | val_loss {record['val_loss']:.4f} | "
                  f"{record['val_packs']} packs, {record['val_skipped']} of {record['val_samples']} samples "
                  f"skipped | {record['val_time_s']:.1f}s", file=sys.stderr, flush=True)

    def log_samples(self, records: list) -> None:
        """Sample answers (`evaluation.samples`): RUN_DIR/samples.jsonl and TensorBoard text."""
        if not self.enabled:
            return
        with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        if self.writer is not None:
            for i, r in enumerate(records):
                self.writer.add_text(f"samples/{i}", f"**{r['prompt']}** {r['images']}\n\n{r['answer']}", r["step"])
        if self.wandb is not None and records:
            import wandb

            table = wandb.Table(columns=["step", "images", "prompt", "answer"],
                                data=[[r["step"], " ".join(r["images"]), r["prompt"], r["answer"]] for r in records])
            self.wandb.log({"samples": table}, step=records[0]["step"])

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
            if self.wandb is not None:
                self.wandb.finish()
