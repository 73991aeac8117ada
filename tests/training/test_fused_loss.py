"""The training loop with the fused output-layer loss logs the losses of the unfused one."""

import torch

from training.runner import step_records

STEPS = ("training.exit_interval=3",)


def _close(a, b, what):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=1e-5, atol=0, msg=lambda m: f"{what}\n{m}")


def test_fused_loss_matches_unfused_at_tp2_sp_and_pp2(trainer, tmp_path):
    unfused = tmp_path / "unfused"
    trainer(unfused, 1, "model.fused_loss=false", *STEPS, expect_rc=42)
    ref = step_records(unfused)
    assert sorted(ref) == [1, 2, 3]
    for name, nproc, layout in (
        ("tp2-sp", 2, ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true")),
        ("pp2", 2, ("parallel.pipeline_parallel=2",)),
    ):
        run = tmp_path / name
        trainer(run, nproc, "model.fused_loss=true", *layout, *STEPS, expect_rc=42)
        got = step_records(run)
        assert sorted(got) == [1, 2, 3]
        for key in ("loss", "grad_norm"):
            _close([got[s][key] for s in (1, 2, 3)], [ref[s][key] for s in (1, 2, 3)], f"{name} {key}")
        for s in (1, 2, 3):
            assert got[s]["dataset_loss"].keys() == ref[s]["dataset_loss"].keys()
            _close(list(got[s]["dataset_loss"].values()), list(ref[s]["dataset_loss"].values()),
                   f"{name} per-dataset loss, step {s}")
