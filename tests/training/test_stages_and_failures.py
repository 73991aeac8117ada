"""Stages freeze what they should; NaN steps are skipped; SIGTERM leaves a loadable checkpoint."""

import signal
import subprocess
import time

import pytest

from harness import run_ranks
from megatron_internvl.checkpoint import verify_checkpoint
from training.runner import kill_tree, read_metrics, step_records
from training.workers import stage_changes


def _component(name):
    return name.split(".")[0]


def test_stages_freeze_and_train(tiny_data):
    res = run_ranks(stage_changes, 1, str(tiny_data), timeout=300)[0]
    expect = {
        "mlp_warmup": {"vision_model": False, "projector": True, "language_model": False},
        "vit_incremental": {"vision_model": True, "projector": True, "language_model": False},
        "full": {"vision_model": True, "projector": True, "language_model": True},
    }
    for stage, per_component in expect.items():
        changed = res[stage]["changed"]
        assert not res[stage]["frozen_with_state"], f"{stage}: frozen params with grads/optimizer state"
        for name, did in changed.items():
            trains = per_component[_component(name)]
            if trains:
                assert did, f"{stage}: trainable {name} did not change"
            else:
                assert not did, f"{stage}: frozen {name} changed"
    # Per-component LR multipliers; no weight decay on norms and biases.
    lr = 3.0e-3
    for params, max_lr, wd_mult in res["full"]["groups"]:
        for n in params:
            want = {"vision_model": 0.1 * lr, "projector": 2.0 * lr, "language_model": lr}[_component(n)]
            assert max_lr == pytest.approx(want), (n, max_lr)
            is_1d = n.endswith("bias") or "norm" in n or n.endswith(("ls1", "ls2"))
            if n.endswith("bias") or "layernorm" in n:
                assert wd_mult == 0.0, n
            elif not is_1d and not n.endswith(("class_embedding", "position_embedding")):
                assert wd_mult == 1.0, n
    last = res["vit_last_layer"]["changed"]
    for name, did in last.items():
        if name.startswith("vision_model."):
            assert did == name.startswith("vision_model.decoder.layers.1."), name
        elif name.startswith("language_model."):
            assert not did, name


def test_nan_loss_is_skipped_then_run_stops_after_too_many(trainer, tmp_path):
    run = tmp_path / "nan"
    trainer(run, 1, "training.train_steps=5", "optimizer.warmup_steps=1", "training.inject_nan_steps=[2]")
    events = [r for r in read_metrics(run) if "event" in r]
    assert [e["step"] for e in events if "skipped_update" in e["event"]] == [2]
    steps = step_records(run)
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert steps[2]["grad_norm"] is None and all(steps[s]["grad_norm"] is not None for s in (1, 3, 4, 5))

    run = tmp_path / "nan-abort"
    out = trainer(run, 1, "training.train_steps=6", "training.inject_nan_steps=[2,3]",
                  "training.max_nonfinite_in_row=2", expect_rc=2)
    assert "2 non-finite steps in a row" in out.stderr and "max_nonfinite_in_row" in out.stderr


def test_sigterm_saves_a_loadable_checkpoint(trainer, tmp_path):
    run = tmp_path / "sig"
    cmd = trainer.command(run, 1, ["training.train_steps=500"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=trainer.env(), cwd=str(run.parent))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(step_records(run)) < 2:
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 42, err[-3000:]
    stopped = [r for r in read_metrics(run) if "stopped" in r.get("event", {})]
    assert stopped and stopped[0]["event"]["stopped"] == "SIGTERM"
    ckpt = run / "checkpoints" / f"iter_{stopped[0]['step']:07d}"
    assert verify_checkpoint(ckpt) is None
    # It loads: the next run resumes from it and takes one more step.
    out = trainer(run, 1, "training.train_steps=500", "training.exit_interval=1", expect_rc=42)
    assert "resumed from" in out.stderr
    assert max(step_records(run)) == stopped[0]["step"] + 1


def test_corrupt_latest_checkpoint_falls_back_and_model_mismatch_is_named(trainer, tmp_path):
    run = tmp_path / "ck"
    trainer(run, 1, "checkpoint.save_interval=2", "training.exit_interval=4", expect_rc=42)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_0000004"
    shard = sorted((ckpts / "iter_0000004").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated write
    out = trainer(run, 1, "checkpoint.save_interval=2", "training.exit_interval=3", expect_rc=42)
    assert "iter_0000004 is unusable" in out.stderr and "bytes" in out.stderr
    assert "resumed from" in out.stderr and "iter_0000002 at step 2" in out.stderr
    # A model that does not match the checkpoint: the error names the field.
    out = trainer(run, 1, "model.language.ffn_hidden_size=96", expect_rc=2)
    assert "model.language.ffn_hidden_size=128" in out.stderr and "=96" in out.stderr


def test_killed_during_async_saves_loses_no_checkpoint(trainer, tmp_path):
    """SIGKILL of every rank while background saves are in flight: whatever the moment, each
    published checkpoint is complete, `latest` names one, and the run resumes from it."""
    run = tmp_path / "kill"
    cmd = trainer.command(run, 2, ["parallel.tensor_parallel=2", "training.train_steps=500",
                                   "checkpoint.async_save=true", "checkpoint.save_interval=1",
                                   "checkpoint.keep_last=2"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=trainer.env(), cwd=str(run.parent))
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(step_records(run)) < 4:
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    kill_tree(proc.pid)  # torchrun, both ranks and their background checkpoint writers
    proc.communicate(timeout=60)
    published = sorted(p for p in ckpts.glob("iter_*") if not p.name.endswith(".tmp"))
    print(f"[kill] published {[p.name for p in published]}, unfinished "
          f"{[p.name for p in ckpts.glob('iter_*.tmp')]}")  # shown with -s
    assert published, "at least one save must have been published before step 4 was logged"
    assert all(verify_checkpoint(p) is None for p in published), published
    latest = ckpts / (ckpts / "latest").read_text()
    assert latest in published
    out = trainer(run, 2, "parallel.tensor_parallel=2", "training.train_steps=500",
                  "training.exit_interval=1", expect_rc=42)
    step = int(latest.name.split("_")[1])
    assert f"resumed from {latest} at step {step}" in out.stderr
