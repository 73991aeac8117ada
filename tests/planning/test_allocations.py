"""The planner's weight, gradient and optimizer terms against what the real model, megatron DDP
and the (distributed) optimizer allocate on CPU, for a tiny config on 2 gloo ranks in one spawn:
DP=2 (optimizer sharded), TP=2 (padded vocabulary, padded ViT heads with QK-norm), PP=2 with an
uneven first stage under the MLP warm-up (frozen parameters: no gradient, no state), and a
partly trainable ViT with the plain (unsharded) optimizer."""

import math

import pytest

from harness import run_ranks
from megatron_internvl.planning.memory import static_bytes
from megatron_internvl.planning.params import stage_params
from planning.workers import LAYOUTS, allocated_bytes, tiny_config


@pytest.fixture(scope="module")
def allocated():
    return run_ranks(allocated_bytes, 2, timeout=300)


@pytest.mark.parametrize("name", [name for name, _ in LAYOUTS])
def test_weight_gradient_and_optimizer_bytes(allocated, name):
    config = tiny_config(dict(LAYOUTS)[name])
    p = config.parallel
    dp_cp = 2 // (p.tensor_parallel * p.pipeline_parallel)
    stages = stage_params(config.model, p, config.training)
    ranks = [rank[name] for rank in allocated]
    for got in ranks:
        planned = stages[got["pp_rank"]]
        # Parameter counts and weight bytes: exact (padding rows and heads included).
        assert got["params"] == planned.total
        assert got["trainable"] == planned.trainable
        weights, grads, optimizer = static_bytes(planned, "bf16", p.distributed_optimizer, dp_cp)
        assert got["weight_bytes"] == weights
        # The fp32 gradient buffer: the trainable parameters plus megatron's alignment (each
        # parameter starts on 64 elements, each bucket ends on lcm(DP, 128) elements under the
        # distributed optimizer), which the planner leaves out.
        slack = 4 * (64 * got["trainable_tensors"] + math.lcm(dp_cp, 128) * got["buckets"])
        assert grads <= got["grad_bytes"] <= grads + (slack if p.distributed_optimizer else 0)
    # Adam m, v and the fp32 master weights: 12 bytes per trainable parameter, split over the
    # data-parallel ranks by the distributed optimizer (each rank near its 1/DP share).
    by_stage = {}
    for got in ranks:
        by_stage.setdefault(got["pp_rank"], []).append(got)
    for stage, group in by_stage.items():
        planned = stages[stage]
        if p.distributed_optimizer and dp_cp > 1:
            assert sum(g["optimizer_bytes"] for g in group) == 12 * planned.trainable
            for g in group:
                share = static_bytes(planned, "bf16", True, dp_cp)[2]
                assert abs(g["optimizer_bytes"] - share) <= 12 * 64 * g["trainable_tensors"]
        else:
            for g in group:
                assert g["optimizer_bytes"] == static_bytes(planned, "bf16", False, dp_cp)[2]
