"""The training loop logs the MoE record (training/moe_metrics.py) in metrics.jsonl: the router's
load-balancing loss and each layer's expert load. Its values are checked against one process in
every expert-parallel layout by tests/moe/test_moe_training.py; here, that the loop writes them."""

import sys

from training.runner import ROOT, Trainer, step_records

sys.path.insert(0, str(ROOT / "examples" / "tiny"))

MOE = ["model.language.arch=qwen3_moe", "model.language.qkv_bias=false", "model.language.qk_norm=true",
       "model.language.num_experts=4", "model.language.moe_top_k=2", "model.language.moe_ffn_hidden_size=32"]


def test_loop_logs_router_loss_and_expert_load(tmp_path):
    from make_dataset import build

    data = build(tmp_path / "data")
    run = tmp_path / "run"
    Trainer(data)(run, 1, "training.train_steps=2", "optimizer.warmup_steps=0",
                         "checkpoint.save_interval=null", *MOE)
    records = step_records(run)
    assert sorted(records) == [1, 2]
    for record in records.values():
        moe = record["moe"]
        assert moe["load_balancing_loss"] > 0 and "z_loss" not in moe  # z-loss off by default
        layers = [moe[f"layer{i}_load_max_over_mean"] for i in range(2)]
        assert all(1.0 <= x <= 2.0 for x in layers)  # even .. every token on the same 2 of 4 experts
        assert moe["load_max_over_mean"] == max(layers)
