"""Checkpoints are verified by content: a damaged file of the right size is named; a resume falls
back to the previous complete checkpoint (and continues bitwise); an explicit checkpoint.load
that is damaged stops; `megatron-internvl verify-checkpoint` runs the same check."""

from faults.conftest import damage
from megatron_internvl import cli
from megatron_internvl.checkpoint import LATEST, verify_checkpoint
from training.runner import step_records


def test_resume_skips_damaged_common_state(trainer, run_copy):
    ckpts = run_copy / "checkpoints"
    loss_2 = step_records(run_copy)[2]["loss"]
    damage(ckpts / "iter_0000002" / "common.pt")
    out = trainer(run_copy, 1, "training.train_steps=2", "checkpoint.save_interval=1",
                  "checkpoint.keep_last=3", "optimizer.warmup_steps=0")
    assert "iter_0000002 is unusable (file common.pt is damaged" in out.stderr, out.stderr[-3000:]
    assert "using the previous complete checkpoint" in out.stderr
    assert "iter_0000001 at step 1" in out.stderr
    assert "Traceback" not in out.stderr
    # Step 2 again from iter_1: the same loss bitwise, and a new good iter_2 replaces the damaged one.
    assert step_records(run_copy)[2]["loss"] == loss_2
    assert verify_checkpoint(ckpts / "iter_0000002") is None
    assert (ckpts / LATEST).read_text() == "iter_0000002"


def test_explicit_load_of_damaged_shard_stops(trainer, run_copy, tmp_path):
    source = run_copy / "checkpoints" / "iter_0000002"
    shard = sorted(source.glob("*.distcp"))[0]
    damage(shard)
    out = trainer(tmp_path / "new", 1, f"checkpoint.load={source}", expect_rc=4)
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out.stderr[-3000:]
    assert f"file {shard.name} is damaged" in errors[0] and str(source) in errors[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_verify_checkpoint_command(run_copy, capsys):
    ckpts = run_copy / "checkpoints"
    assert cli.main(["verify-checkpoint", str(ckpts)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 2 and "a resume would start from" in out and "iter_0000002" in out
    shard = sorted((ckpts / "iter_0000001").glob("*.distcp"))[0]
    damage(shard)
    assert cli.main(["verify-checkpoint", str(ckpts / "iter_0000001")]) == 4
    out = capsys.readouterr().out
    assert f"DAMAGED {ckpts / 'iter_0000001'}: file {shard.name} is damaged" in out
    assert cli.main(["verify-checkpoint", str(ckpts)]) == 4
    assert "a resume would start from " + str(ckpts / "iter_0000002") in capsys.readouterr().out
