"""Every user error ends in one message naming the field or path, exit code 2, no traceback
(`--debug` / MI_DEBUG=1 shows it)."""

import pytest

from megatron_internvl import cli
from training.runner import ROOT

RECIPE = str(ROOT / "examples" / "tiny" / "full.yaml")

# (override, what the one message must name): each refused while the config is loaded.
CONFIG_ERRORS = [
    ("optimizer.adam_beta1=1.5", "optimizer.adam_beta1=1.5"),
    ("optimizer.adam_beta2=-0.1", "optimizer.adam_beta2=-0.1"),
    ("optimizer.adam_eps=0", "optimizer.adam_eps=0"),
    ("optimizer.lr=-1e-4", "optimizer.lr=-0.0001"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps=-1"),
    ("optimizer.lr_mult.vision=-1", "optimizer.lr_mult.vision=-1"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0"),
    ("checkpoint.save_interval=0", "checkpoint.save_interval=0"),
    ("training.log_interval=0", "training.log_interval=0"),
    ("training.clip_grad=-1", "training.clip_grad=-1"),
    ("training.max_nonfinite_in_row=0", "training.max_nonfinite_in_row=0"),
    ("training.loss_spike_factor=0.5", "training.loss_spike_factor=0.5"),
    ("training.exit_interval=0", "training.exit_interval=0"),
    ("training.time_limit_minutes=-5", "training.time_limit_minutes=-5"),
    ("training.train_steps=0", "training.train_steps=0"),
    ("training.stage=bogus", "training.stage='bogus'"),
    ("parallel.tensor_parallel=0", "parallel.tensor_parallel=0"),
    ("data.max_tokens=0", "data.max_tokens=0"),
    ("training.trian_steps=5", "training.train_steps"),
    ("training.train_steps=abc", "training.train_steps"),
]


def _one_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("override,named", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_error_is_one_message(override, named, capsys):
    assert cli.main(["train", RECIPE, override]) == 2
    assert named in _one_error(capsys.readouterr().err)


def test_missing_recipe(capsys):
    assert cli.main(["train", "no/such/recipe.yaml"]) == 2
    assert "no/such/recipe.yaml" in _one_error(capsys.readouterr().err)


def test_plan_and_verify_report_the_same_way(capsys, tmp_path):
    assert cli.main(["plan", RECIPE, "optimizer.adam_eps=-1"]) == 2
    assert "optimizer.adam_eps=-1" in _one_error(capsys.readouterr().err)
    assert cli.main(["verify-checkpoint", str(tmp_path / "none")]) == 2
    assert str(tmp_path / "none") in _one_error(capsys.readouterr().err)
    assert cli.main(["verify-checkpoint", str(tmp_path)]) == 2  # a folder without checkpoints
    assert "holds no checkpoint" in _one_error(capsys.readouterr().err)


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MI_DEBUG", "0")  # --debug sets it for child processes: restored afterwards
    assert cli.main(["verify-checkpoint", str(tmp_path / "none"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith(f"error: {tmp_path / 'none'} does not exist")


# Errors found once the run is set up (one process each: they stop before the model is built or
# in the first step).
RUN_ERRORS = [
    ("data.tokenizer_path={missing}/tokenizer.json", "tokenizer.json"),
    ("data.meta_path={missing}/meta.json", "meta.json"),
    ("data.max_tokens=16", "skipped"),
]


@pytest.mark.parametrize("override,named", RUN_ERRORS, ids=["tokenizer", "meta", "packing-budget"])
def test_run_error_is_one_message(trainer, tmp_path, override, named):
    override = override.format(missing=tmp_path / "missing")
    out = trainer(tmp_path / "run", 1, override, "training.train_steps=1", "optimizer.warmup_steps=0",
                  expect_rc=2, timeout=240)
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and named in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
