"""Stochastic depth across ranks: masks differ between data-parallel replicas, agree on one
replica's TP ranks, and repeat when the generator is restored (resume, activation recompute)."""

import pytest
import torch
from megatron.core import parallel_state

from megatron_internvl.models.vision import drop_path


def _masks(monkeypatch, replicas: int, replica: int, state: torch.Tensor) -> torch.Tensor:
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: replicas)
    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: replica)
    torch.set_rng_state(state)  # every rank seeds the default generator alike
    out = drop_path(torch.ones(5, 64, 3), 0.5)  # [tokens, tiles, hidden]
    assert torch.all((out == 0) | (out == 2)) and torch.all(out == out[:1, :, :1]), "whole tiles"
    return out[0, :, 0] > 0


def test_replicas_differ_tp_ranks_agree_and_resume_repeats(monkeypatch):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    masks = [_masks(monkeypatch, 4, r, state) for r in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(masks[a], masks[b]), f"replicas {a} and {b} drop the same tiles"
    # A TP peer of replica 2 (same replica, generator in the same state) and a resumed run
    # (the checkpoint restores the generator) draw the same mask.
    assert torch.equal(_masks(monkeypatch, 4, 2, state), masks[2])
    # Each replica drops about p of its tiles.
    assert 0.3 < 1 - torch.stack(masks).float().mean() < 0.7


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_expected_value_is_kept(monkeypatch, p):
    torch.manual_seed(0)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    x = torch.ones(1, 20000, 1)
    assert abs(float(drop_path(x, p).mean()) - 1.0) < 0.03
