"""`logging.profile_steps: [first, last]`: a torch.profiler trace of those training steps, one
Chrome trace per rank in `RUN_DIR/profile/` (open in chrome://tracing or Perfetto)."""

from __future__ import annotations

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
            self.prof = None
