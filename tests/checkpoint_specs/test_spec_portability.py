"""Checkpoints move between the local and Transformer Engine specs, and resume under TE's FusedAdam.

Stand-ins (standins.py) give the local spec TE's extra-state contract and megatron-core TE's
FusedAdam state layout, so both contracts are exercised on CPU. The training runs chain
local spec -> stand-in spec -> local spec and torch Adam -> FusedAdam -> FusedAdam through
``checkpoint.load`` of training checkpoints; every resumed step must be bitwise the uninterrupted
local run's (the stand-ins compute what the local modules and torch's AdamW compute).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_specs import workers
from harness import run_ranks
from training.runner import ROOT, kill_tree, step_records

HERE = Path(__file__).resolve().parent
COMMON = ["data.synthetic.enabled=true", "data.synthetic.sample_tokens=64", "data.synthetic.tiles_per_sample=1",
          "data.meta_path=/nonexistent/meta.json", "data.tokenizer_path=/nonexistent",
          "logging.progress=false", "logging.tensorboard=false", "data.balance=none",
          "optimizer.warmup_steps=1", "training.train_steps=6", "checkpoint.save_interval=2",
          "checkpoint.keep_last=5"]


def train(run_dir, standins, *overrides, expect_rc=0) -> dict:
    """One process of the training entry point with the stand-ins installed; what set_extra_state
    saw, and under "log" the process's log."""
    report = Path(run_dir).with_suffix(".restored.json")
    cmd = [sys.executable, str(HERE / "train_with_standins.py"), ",".join(standins) or "-",
           str(ROOT / "examples" / "tiny" / "full.yaml"), f"logging.run_dir={run_dir}", *COMMON, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", STANDIN_REPORT=str(report))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise
    assert proc.returncode == expect_rc, f"exit {proc.returncode}\n{err[-4000:]}"
    return {**json.loads(report.read_text()), "log": err}


def losses(run_dir) -> dict:
    return {s: (r["loss"], r["grad_norm"]) for s, r in step_records(run_dir).items()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    work = tmp_path_factory.mktemp("specs")
    local = work / "local"  # the reference: local spec, torch Adam, 6 steps
    train(local, [])
    te = work / "te"  # TE contracts, from the local step-2 checkpoint; saves at 4 and stops
    te_restored = train(te, ["te_extra_state", "fused_adam"],
                        f"checkpoint.load={local}/checkpoints/iter_0000002",
                        "training.exit_interval=4", expect_rc=42)
    return work, local, te, te_restored


def test_resume_across_specs_and_adams_is_bitwise(chain):
    work, local, te, te_restored = chain
    ref = losses(local)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    # local -> stand-in: the core attention's extra state is absent from the checkpoint (None
    # restored), the linears' is megatron's local None; torch Adam's state -> FusedAdam's layout.
    assert te_restored.get("none", 0) > 0 and "fp8" not in te_restored, te_restored
    assert "optimizer: standins.FusedAdam" in te_restored["log"]  # what megatron-core built
    got = losses(te)
    assert sorted(got) == [3, 4] and all(got[s] == ref[s] for s in (3, 4)), (got, ref)

    saved = te / "checkpoints" / "iter_0000004"
    common = torch.load(saved / "common.pt", weights_only=False)
    groups = common["optimizer"]["optimizer"]["param_groups"]
    assert {g["step"] for g in groups} == {4}, "FusedAdam keeps the step count in its param groups"
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    keys = load_sharded_metadata(str(saved))
    assert not any(".step." in k or k.endswith(".step") for k in keys), \
        "torch Adam's per-parameter step must not be written under FusedAdam"
    assert any("core_attention._extra_state" in k for k in keys)

    # stand-in -> local spec (FP8 metadata ignored), FusedAdam resumed from its own layout.
    back = train(work / "local-again", ["fused_adam"], f"checkpoint.load={saved}")
    assert back.get("fp8", 0) == 0
    got = losses(work / "local-again")
    assert sorted(got) == [5, 6] and all(got[s] == ref[s] for s in (5, 6)), (got, ref)


@pytest.fixture(scope="module")
def outside(chain, tmp_path_factory):
    work, local, te, _ = chain
    return run_ranks(workers.portability, 1, str(local / "checkpoints" / "iter_0000002"),
                     str(te / "checkpoints" / "iter_0000004"), str(tmp_path_factory.mktemp("outside")),
                     timeout=300)[0]


def test_loads_outside_training_across_specs(outside):
    """MPO reference, export, init_language / init_vision: local <-> stand-in."""
    out = outside
    assert out["local_ref_equal"] and out["standin_ref_equal"], out
    assert out["export_tensors"] > 0 and out["export_has_embedding"], out
    assert out["standin_has_extra_state"] and out["standin_ref_restored"].get("none", 0) > 0, out
    assert out["standin_from_standin_restored"].get("fp8", 0) > 0, out  # TE -> TE keeps FP8 metadata
    assert out["init_language"] and out["init_language_kept_vision"] and out["init_vision"], out


def test_other_mismatches_stop_the_load_naming_the_tensor(outside):
    out = outside
    assert "lacks 1 tensors" in out["lacking_error"] and "projector.linear_fc1.bias" in out["lacking_error"]
    assert "language_model.decoder.layers.surplus.weight" in out["surplus_error"]
    assert "language_model.decoder.layers.surplus.weight" in out["surplus_component_error"]
    assert out["surplus_other_component"] > 0  # a surplus tensor of another component is not read


def test_process_group_timeout_is_the_configured_one(outside):
    # parallel.timeout_minutes=7 in the worker's config (the default is 30).
    assert outside["timeouts"] == {"default": 7.0, "tensor_parallel": 7.0}
