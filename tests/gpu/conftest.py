"""GPU checks: collected only where torch sees CUDA (CI machines have none, so nothing here is
collected there, and nothing is reported as skipped in place of a CPU test)."""

import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]
