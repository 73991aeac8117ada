"""`logging.profile_steps: [first, last]`: a torch.profiler trace of those training steps, one
Chrome trace per rank in `RUN_DIR/profile/` (open in chrome://tracing or Perfetto), and the
operator table beside it (`rank<R>_ops.json`: calls and self time per operator, as
`key_averages()` counts them)."""

from __future__ import annotations

import json

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, run_dir: Path, steps: list, rank: int):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.path = Path(run_dir) / "profile" / f"rank{rank}.json"
        self.prof = None

    def begin(self, step: int) -> None:
        """Before training step ``step`` (1-based)."""
        if self.first is not None and step == self.first and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()

    def end(self, step: int) -> None:
        """After training step ``step``; writes the trace after the last profiled step."""
        if self.prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.path))
            ops = self.path.with_name(self.path.stem + "_ops.json")
            ops.write_text(json.dumps(operator_records(self.prof), indent=0))
            self.prof = None


def operator_records(prof) -> list[dict]:
    """Per operator: calls, self and total CPU seconds (and CUDA seconds where recorded),
    largest self CPU time first."""
    rows = []
    for e in prof.key_averages():
        row = {"name": e.key, "count": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
               "cpu_s": e.cpu_time_total / 1e6}
        device = getattr(e, "self_device_time_total", 0) or 0
        if device:
            row["self_device_s"] = device / 1e6
        rows.append(row)
    return sorted(rows, key=lambda r: -r["self_cpu_s"])
