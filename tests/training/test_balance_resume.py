"""The planned loader in training (balance=compute, the default): a DP=2 checkpoint resumed at DP=1
and at DP=4 continues with the losses of the uninterrupted DP=2 run, so DP=1, 2 and 4 train on the
same global batches with equal losses; the imbalance metrics are logged every step."""

import torch

from training.runner import step_records

BATCH = ("training.global_batch_size=4", "training.train_steps=4", "optimizer.warmup_steps=1",
         "data.balance=compute")


def _close(a, b, what, rtol=1e-5):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=0, msg=lambda m: f"{what}\n{m}")


def test_resume_at_another_dp_size(trainer, tmp_path):
    two = tmp_path / "dp2"
    trainer(two, 2, *BATCH, "checkpoint.save_interval=2")
    b = step_records(two)
    assert sorted(b) == [1, 2, 3, 4]
    for r in b.values():
        assert r["data_imbalance"] >= 1.0 and r["plan_rank_imbalance"] >= 1.0 and 0 < r["plan_fill"] <= 1

    ckpt = two / "checkpoints" / "iter_0000002"
    for dp in (1, 4):
        run = tmp_path / f"dp{dp}-from-dp2"
        out = trainer(run, dp, *BATCH, f"checkpoint.load={ckpt}")
        assert "resumed from" in out.stderr
        r = step_records(run)
        assert sorted(r) == [3, 4]
        _close([r[s]["loss"] for s in (3, 4)], [b[s]["loss"] for s in (3, 4)], f"DP=2 -> DP={dp} losses")
        _close([r[s]["grad_norm"] for s in (3, 4)], [b[s]["grad_norm"] for s in (3, 4)],
               f"DP=2 -> DP={dp} grad norms")
