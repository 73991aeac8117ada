"""Qwen3-MoE trains the same in every expert-parallel layout as in one process.

The tiny MoE decoder (tests/moe/workers.py: 4 experts, top-2, router aux and z-losses on) runs
3 optimizer steps on the same global batches: losses, grad norms, first-step gradients and final
parameters must equal the single-process run (fp32 reduction-order tolerance) at EP=2, EP=2 x
PP=2 and EP=2 x DP=2 (experts replicated over an expert-data-parallel group of 2, whose expert
gradients megatron reduces there).
"""

import pytest
import torch

from harness import run_ranks
from moe.workers import train_moe


@pytest.fixture(scope="module")
def baseline():
    return run_ranks(train_moe, 1, 1, 1, 1)[0]


def _compare(baseline, result, what):
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(baseline["losses"]),
                               rtol=1e-5, atol=0, msg=lambda m: f"{what}: losses differ\n{m}")
    torch.testing.assert_close(torch.tensor(result["grad_norms"]), torch.tensor(baseline["grad_norms"]),
                               rtol=1e-5, atol=0, msg=lambda m: f"{what}: grad norms differ\n{m}")
    assert result["grads"].keys() == baseline["grads"].keys()
    for name, ref in baseline["grads"].items():
        torch.testing.assert_close(result["grads"][name], ref, rtol=1e-4, atol=1e-7,
                                   msg=lambda m: f"{what}: gradient {name}\n{m}")
    for name, ref in baseline["params"].items():
        torch.testing.assert_close(result["params"][name], ref, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{what}: parameter {name}\n{m}")
    # metrics.jsonl's MoE record (training/moe_metrics.py) is a property of the model, not the layout
    assert result["routed"] == baseline["routed"]
    for got, want in zip(result["moe"], baseline["moe"]):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5), f"{what}: {key}"


def test_baseline_routes_to_every_expert_and_learns(baseline):
    assert baseline["losses"][0] != baseline["losses"][-1]
    experts = [n for n in baseline["grads"] if ".local_experts." in n]
    assert len(experts) == 2 * 4 * 2  # layers x experts x (fc1, fc2)
    # Every expert received tokens (a non-zero gradient), and the router is trained.
    assert all(baseline["grads"][n].abs().sum() > 0 for n in experts)
    assert all(baseline["grads"][f"decoder.layers.{i}.mlp.router.weight"].abs().sum() > 0 for i in range(2))
    # The MoE metrics: every routed token counted once per layer; both router losses logged; a
    # load ratio between even (1) and every token on the same top_k experts (experts / top_k = 2).
    routed, expected = baseline["routed"]
    assert routed == expected
    for record in baseline["moe"]:
        assert {"load_balancing_loss", "z_loss", "load_max_over_mean",
                "layer0_load_max_over_mean", "layer1_load_max_over_mean"} == record.keys()
        assert 1.0 <= record["layer0_load_max_over_mean"] <= 2.0 and record["load_balancing_loss"] > 0


@pytest.mark.parametrize("tp,pp,ep,world,what", [
    (1, 1, 2, 2, "EP=2"),
    (1, 2, 2, 4, "EP=2 x PP=2"),
    (1, 1, 2, 4, "EP=2 x DP=2 (expert-data-parallel 2)"),
])
def test_expert_parallel_matches_single_process(baseline, tp, pp, ep, world, what):
    for rank_result in run_ranks(train_moe, world, tp, pp, ep, timeout=400):
        _compare(baseline, rank_result, what)
