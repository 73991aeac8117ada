"""Distributed checkpoints on CPU: save at one TP/PP layout, load into another, bitwise."""

import torch

from harness import run_ranks
from parallel.workers import reshard_roundtrips


def test_checkpoints_reshard_bitwise(tmp_path):
    results = run_ranks(reshard_roundtrips, 2, str(tmp_path), timeout=300)
    for rank, checks in enumerate(results):
        assert set(checks) == {"TP=2 -> TP=1", "TP=1 -> TP=2", "PP=2 -> PP=1", "PP=1 -> PP=2",
                               "TP=2 -> PP=2"}, checks
        for what, mismatched in checks.items():
            assert mismatched == [], f"rank {rank}, {what}: tensors not bitwise equal: {mismatched}"
