"""mpo_loss and the reward shift against float64 formulas written here (TRL's DPO sigmoid / BCO pair)."""

import math

import pytest
import torch

from megatron_internvl.training.mpo import RewardShift, mpo_loss


def _logsig(x):
    return -torch.log1p(torch.exp(-x))  # float64, no torch.nn.functional


def _reference(pc, pr, rc, rr, sft, delta, beta, weights, eps):
    h = beta * ((pc - rc) - (pr - rr))
    dpo = -(1 - eps) * _logsig(h) - eps * _logsig(-h)
    bco = -_logsig(beta * (pc - rc) - delta) - _logsig(-(beta * (pr - rr) - delta))
    return weights[0] * dpo + weights[1] * bco + weights[2] * sft, dpo, bco


@pytest.mark.parametrize("beta,weights,eps", [(0.1, (0.8, 0.2, 1.0), 0.0), (0.5, (1.0, 0.3, 0.5), 0.1)])
def test_terms_and_gradients_match_float64(beta, weights, eps):
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-40 * torch.rand(7, generator=gen, dtype=torch.float64) for _ in range(4))
    sft = torch.rand(7, generator=gen, dtype=torch.float64)
    delta = 0.37
    inputs32 = [t.float().requires_grad_() for t in (pc, pr, sft)]
    out = mpo_loss(inputs32[0], inputs32[1], rc.float(), rr.float(), inputs32[2], delta, beta=beta,
                   weights=weights, label_smoothing=eps)
    inputs64 = [t.clone().requires_grad_() for t in (pc, pr, sft)]
    total, dpo, bco = _reference(inputs64[0], inputs64[1], rc, rr, inputs64[2], delta, beta, weights, eps)
    for got, want in ((out.total, total), (out.dpo, dpo), (out.bco, bco), (out.sft, inputs64[2])):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    out.total.sum().backward()
    total.sum().backward()
    for a, b in zip(inputs32, inputs64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)


def test_reference_equal_to_policy_gives_log2_and_two_log2():
    p = torch.tensor([-12.5, -3.0, -40.0])
    out = mpo_loss(p, p - 1, p, p - 1, torch.zeros(3), 0.0)
    torch.testing.assert_close(out.dpo, torch.full((3,), math.log(2)))
    torch.testing.assert_close(out.bco, torch.full((3,), 2 * math.log(2)))
    torch.testing.assert_close(out.total, torch.full((3,), 0.8 * math.log(2) + 0.2 * 2 * math.log(2)))


def test_reward_shift_is_the_running_mean_of_micro_batch_means():
    shift = RewardShift()
    means = [0.5, -0.25, 1.0, 0.125]
    # step 1: one DP rank, one micro-batch; step 2: two ranks' micro-batches counted together
    assert shift.update(means[0], 1) == means[0]
    assert shift.update(means[1] + means[2], 2) == pytest.approx(sum(means[:3]) / 3, abs=1e-15)
    assert shift.update(means[3], 1) == pytest.approx(sum(means) / 4, abs=1e-15)
    restored = RewardShift()
    restored.load_state_dict(shift.state_dict())
    assert restored == shift
