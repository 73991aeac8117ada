"""The tiny MPO run end to end from a tiny SFT checkpoint: step 0, exact resume with delta,
reward accuracy up on the training pairs (subprocesses, one process each)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from training.runner import ROOT, Trainer, step_records


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("mpo-runs")
    trainer = Trainer(tiny_data)
    trainer(work / "sft", 1, "training.train_steps=3", "optimizer.warmup_steps=0")
    mpo = (f"data.meta_path={tiny_data / 'meta_mpo.json'}", f"checkpoint.load={work / 'sft' / 'checkpoints'}",
           "training.train_steps=8", "checkpoint.save_interval=4")
    trainer(work / "whole", 1, *mpo, recipe="mpo")
    trainer(work / "parts", 1, *mpo, "training.exit_interval=4", recipe="mpo", expect_rc=42)
    # The same command again, as a requeued job runs it: it continues from the MPO run's own
    # checkpoint (with its optimizer, data position and delta), not from checkpoint.load (the SFT
    # checkpoint, which stays the reference), although the recipe says checkpoint.finetune=true.
    out = trainer(work / "parts", 1, *mpo, recipe="mpo")
    assert f"resumed from {work / 'parts' / 'checkpoints' / 'iter_0000004'} at step 4\n" in out.stderr
    return trainer, work, mpo


def _reference_table(trainer, work, mpo, name, checkpoint, expect_rc=0):
    cmd = [sys.executable, "-m", "megatron_internvl.cli", "mpo-reference", str(ROOT / "examples/tiny/mpo.yaml"),
           *trainer.command(work / "unused", 1, mpo)[4:], f"mpo.reference_file={work / name}",
           f"mpo.reference_checkpoint={checkpoint}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=trainer.env(), cwd=ROOT, timeout=300)
    assert out.returncode == expect_rc, out.stderr[-4000:]
    return torch.load(work / name, weights_only=True)


def test_step_zero_is_log2_and_ties_count_as_wrong(runs):
    _, work, _ = runs
    first = step_records(work / "whole")[1]["mpo"]
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["bco"] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert first["reward_chosen"] == first["reward_rejected"] == first["delta"] == 0.0
    assert first["reward_accuracy"] == 0.0  # the reference is the policy: every pair is a tie


def test_resume_is_bitwise_with_delta(runs):
    _, work, _ = runs
    whole, parts = step_records(work / "whole"), step_records(work / "parts")
    assert sorted(whole) == sorted(parts) == list(range(1, 9))
    for s in range(1, 9):
        assert parts[s]["loss"] == whole[s]["loss"], f"step {s}"
        assert parts[s]["grad_norm"] == whole[s]["grad_norm"], f"step {s}"
        assert parts[s]["mpo"] == whole[s]["mpo"], f"step {s}"
    assert whole[4]["mpo"]["delta"] != 0 and whole[5]["mpo"]["delta"] != whole[4]["mpo"]["delta"]


def test_training_raises_reward_accuracy(runs):
    trainer, work, mpo = runs
    sft = _reference_table(trainer, work, mpo, "sft.pt", work / "sft" / "checkpoints")
    final = _reference_table(trainer, work, mpo, "final.pt", work / "whole" / "checkpoints")
    assert sft["ids"] == final["ids"] and len(sft["ids"]) == 17
    # Rewards of the trained policy on every training pair (the SFT model is the reference).
    reward = final["log_probs"].double() - sft["log_probs"].double()
    accuracy = float((reward[:, 0] > reward[:, 1]).double().mean())
    assert accuracy > 0.5 and float((reward[:, 0] - reward[:, 1]).mean()) > 0  # 0 before training
    assert json.loads(sft["fingerprint"])["checkpoint"]["path"].endswith("iter_0000003")
