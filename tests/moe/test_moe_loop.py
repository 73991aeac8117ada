"""A tiny Qwen3-MoE InternVL through the real training loop: the MoE record of metrics.jsonl
(training/moe_metrics.py: router loss, per-layer expert load), the fused output-layer loss equal
to the plain one, the checkpoint of one process at EP=2 (weights resharded; the optimizer state is
refused by name: megatron chains a separate expert optimizer only above EP=1), and the MPO stage from its checkpoint (the reference model is the policy at step 1:
DPO = log 2). The metrics' values equal one process in every expert-parallel layout
(tests/moe/test_moe_training.py)."""

import math
import sys

import pytest

from training.runner import ROOT, Trainer, step_records

sys.path.insert(0, str(ROOT / "examples" / "tiny"))

MOE = ["model.language.arch=qwen3_moe", "model.language.qkv_bias=false", "model.language.qk_norm=true",
       "model.language.num_experts=4", "model.language.moe_top_k=2", "model.language.moe_ffn_hidden_size=32",
       "training.train_steps=2", "optimizer.warmup_steps=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from make_dataset import build

    work = tmp_path_factory.mktemp("moe-loop")
    data = build(work / "data")
    trainer = Trainer(data)
    trainer(work / "plain", 1, *MOE, "training.train_steps=3", "checkpoint.save_interval=2")
    ep2 = ("training.train_steps=3", "parallel.expert_parallel=2", "checkpoint.save_interval=null",
           f"checkpoint.load={work / 'plain' / 'checkpoints' / 'iter_0000002'}")
    refused = trainer(work / "ep2-resume", 2, *MOE, *ep2, expect_rc=2)
    (work / "ep2-refused.txt").write_text(refused.stderr)
    trainer(work / "ep2", 2, *MOE, *ep2, "checkpoint.finetune=true", "training.train_steps=1")
    trainer(work / "ep1-finetune", 1, *MOE, *ep2[2:], "checkpoint.finetune=true", "training.train_steps=1")
    trainer(work / "fused", 1, *MOE, "model.fused_loss=true", "checkpoint.save_interval=null")
    trainer(work / "mpo", 1, *MOE, f"data.meta_path={data / 'meta_mpo.json'}", "training.train_steps=1",
            f"checkpoint.load={work / 'plain' / 'checkpoints'}", "checkpoint.save_interval=null", recipe="mpo")
    return work


def test_loop_logs_router_loss_and_expert_load(runs):
    records = step_records(runs / "plain")
    assert sorted(records) == [1, 2, 3]
    for record in records.values():
        moe = record["moe"]
        assert moe["load_balancing_loss"] > 0 and "z_loss" not in moe  # z-loss off by default
        layers = [moe[f"layer{i}_load_max_over_mean"] for i in range(2)]
        assert all(1.0 <= x <= 2.0 for x in layers)  # even .. every token on the same 2 of 4 experts
        assert moe["load_max_over_mean"] == max(layers)


def test_fused_output_layer_loss_equals_the_plain_one(runs):
    plain, fused = step_records(runs / "plain"), step_records(runs / "fused")
    for step in (1, 2):
        for key in ("loss", "grad_norm"):
            assert fused[step][key] == pytest.approx(plain[step][key], rel=1e-5), (step, key)
        assert fused[step]["moe"] == pytest.approx(plain[step]["moe"], rel=1e-5)


def test_ep1_checkpoint_at_ep2(runs):
    # Resuming the optimizer state across EP=1 / EP>1 is refused, naming the fix ...
    refused = (runs / "ep2-refused.txt").read_text()
    assert "expert_parallel=1" in refused and "checkpoint.finetune=true" in refused, refused[-2000:]
    # ... and the weights reshard: a fine-tune from it at EP=2 (experts split over two ranks) takes
    # the step of a fine-tune from it in one process.
    ep2, single = step_records(runs / "ep2"), step_records(runs / "ep1-finetune")
    assert sorted(ep2) == sorted(single) == [1]
    for key in ("loss", "grad_norm"):
        assert ep2[1][key] == pytest.approx(single[1][key], rel=1e-5), key
    assert ep2[1]["moe"] == pytest.approx(single[1]["moe"], rel=1e-5)


def test_mpo_from_the_moe_checkpoint(runs):
    first = step_records(runs / "mpo")[1]
    assert first["mpo"]["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["mpo"]["reward_chosen"] == first["mpo"]["reward_rejected"] == 0.0
    assert math.isfinite(first["loss"]) and first["moe"]["load_balancing_loss"] > 0
