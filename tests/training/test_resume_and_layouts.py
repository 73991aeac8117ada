"""The training loop: layout invariance, exact resume, resharded resume (CPU, fp32)."""

import pytest
import torch

from megatron_internvl.checkpoint import verify_checkpoint
from training.runner import step_records


def _close(a, b, what, rtol=1e-5):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=0, msg=lambda m: f"{what}\n{m}")


@pytest.fixture(scope="module")
def reference(trainer, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    trainer(run, 1)
    recs = step_records(run)
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    assert recs[6]["loss"] < recs[1]["loss"] - 0.5, "the tiny model must learn"
    return recs


def test_tp2_layout_and_exact_resume(trainer, reference, tmp_path):
    full = tmp_path / "tp2"
    trainer(full, 2, "parallel.tensor_parallel=2")
    tp2 = step_records(full)
    _close([tp2[s]["loss"] for s in range(1, 7)], [reference[s]["loss"] for s in range(1, 7)], "TP=2 losses")
    _close([tp2[s]["grad_norm"] for s in range(1, 7)], [reference[s]["grad_norm"] for s in range(1, 7)],
           "TP=2 grad norms")

    # Same layout, interrupted after step 3 (exit code 42 = "requeue me") and resumed. Saves are
    # asynchronous, every step: background writers race the next optimizer steps.
    part = tmp_path / "tp2-resumed"
    saving = ("checkpoint.async_save=true", "checkpoint.save_interval=1", "checkpoint.keep_last=10")
    trainer(part, 2, "parallel.tensor_parallel=2", "training.exit_interval=3", *saving, expect_rc=42)
    assert sorted(step_records(part)) == [1, 2, 3]
    ckpts = part / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_0000003", "the exit save must be published"
    out = trainer(part, 2, "parallel.tensor_parallel=2", *saving)
    assert "resumed from" in out.stderr
    resumed = step_records(part)
    for s in (4, 5, 6):
        assert resumed[s]["loss"] == tp2[s]["loss"], f"step {s}: resume is not bitwise exact"
        assert resumed[s]["grad_norm"] == tp2[s]["grad_norm"]
    assert sorted(p.name for p in ckpts.iterdir()) == [f"iter_000000{i}" for i in range(1, 7)] + ["latest"]
    assert all(verify_checkpoint(ckpts / f"iter_000000{i}") is None for i in range(1, 7))

    # Resharded: the TP=2 checkpoint of step 2 (written in the background while step 3 trained)
    # continues at TP=1 on one process.
    single = tmp_path / "tp1-from-tp2"
    trainer(single, 1, f"checkpoint.load={ckpts / 'iter_0000002'}")
    r = step_records(single)
    assert sorted(r) == [3, 4, 5, 6]
    _close([r[s]["loss"] for s in (3, 4, 5, 6)], [tp2[s]["loss"] for s in (3, 4, 5, 6)],
           "TP=2 -> TP=1 resume")


def test_pp2_and_dp2_layouts_and_pp_reshard(trainer, reference, tmp_path):
    pp = tmp_path / "pp2"
    trainer(pp, 2, "parallel.pipeline_parallel=2", "training.exit_interval=2", expect_rc=42)
    r = step_records(pp)
    _close([r[s]["loss"] for s in (1, 2)], [reference[s]["loss"] for s in (1, 2)], "PP=2 losses")
    _close([r[s]["grad_norm"] for s in (1, 2)], [reference[s]["grad_norm"] for s in (1, 2)], "PP=2 grad norms")

    dp = tmp_path / "dp2"
    trainer(dp, 2, "training.exit_interval=2", expect_rc=42)
    r = step_records(dp)
    _close([r[s]["loss"] for s in (1, 2)], [reference[s]["loss"] for s in (1, 2)], "DP=2 losses")
    _close([r[s]["grad_norm"] for s in (1, 2)], [reference[s]["grad_norm"] for s in (1, 2)], "DP=2 grad norms")

    # PP=2 checkpoint (step 2) resumed at PP=1: model and optimizer state reshard.
    single = tmp_path / "pp1-from-pp2"
    trainer(single, 1, f"checkpoint.load={pp / 'checkpoints' / 'iter_0000002'}")
    r = step_records(single)
    assert sorted(r) == [3, 4, 5, 6]
    _close([r[s]["loss"] for s in (3, 4, 5, 6)], [reference[s]["loss"] for s in (3, 4, 5, 6)],
           "PP=2 -> PP=1 resume")


def test_interleaved_pipeline_layout(trainer, tmp_path):
    """PP=2 x virtual PP=2 (interleaved 1F1B over 4 LLM layers) against one process."""
    deeper = ("model.language.num_layers=4", "training.exit_interval=2")
    one = tmp_path / "pp1"
    trainer(one, 1, *deeper, expect_rc=42)
    vpp = tmp_path / "pp2-vpp2"
    trainer(vpp, 2, *deeper, "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2",
            expect_rc=42)
    a, b = step_records(one), step_records(vpp)
    assert sorted(a) == sorted(b) == [1, 2]
    _close([b[s]["loss"] for s in (1, 2)], [a[s]["loss"] for s in (1, 2)], "PP=2 x VPP=2 losses")
    _close([b[s]["grad_norm"] for s in (1, 2)], [a[s]["grad_norm"] for s in (1, 2)], "PP=2 x VPP=2 grad norms")


def test_synthetic_packs_train_without_files(trainer, tmp_path):
    """data.synthetic: no dataset or tokenizer is read; every step sees full packs of the set shape."""
    run = tmp_path / "synthetic"
    trainer(run, 1, "data.synthetic.enabled=true", "data.synthetic.sample_tokens=64",
            "data.synthetic.tiles_per_sample=2", "data.meta_path=/nonexistent/meta.json",
            "data.tokenizer_path=/nonexistent", "training.exit_interval=3", "training.peak_tflops=1.0",
            expect_rc=42)
    recs = step_records(run)
    assert sorted(recs) == [1, 2, 3]
    for r in recs.values():
        assert r["tokens"] == 2 * 256 and r["tiles"] == 2 * 8  # 2 packs of 4 samples x 64 tokens
        assert r["dataset_loss"].keys() == {"synthetic"} and r["mfu"] == r["tflops_per_gpu"]
