"""Validation loss (training/evaluate.py): layout invariance, equality with the training loss on
the same packs, broken samples counted, `megatron-internvl evaluate`; and the step-time breakdown,
profiler trace and sample answers recorded by the same runs (CPU, fp32)."""

import json
import subprocess
import sys

import pytest
import torch

from training.runner import ROOT, read_metrics, step_records

# 4 LLM layers so that PP=2 x VPP=2 has a layer per virtual stage; 2 steps (exit after step 2).
# The training data is the validation set itself, streamed unbalanced: the first validation
# evaluation (before step 1, iters=2 = the global batch) sees exactly step 1's packs.
COMMON = ("model.language.num_layers=4", "training.exit_interval=2", "evaluation.initial=true",
          "evaluation.interval=2", "evaluation.iters=2")


def _overrides(data):
    return (f"data.meta_path={data / 'val_meta.json'}", f"evaluation.meta_path={data / 'val_meta.json'}",
            *COMMON)


def _val(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "val_loss" in r}


def _close(a, b, what, rtol=1e-5):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=0, msg=lambda m: f"{what}\n{m}")


@pytest.fixture(scope="module")
def reference(trainer, val_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    trainer(run, 1, *_overrides(val_data), "logging.profile_steps=[2,2]", "logging.tensorboard=true",
            f"evaluation.samples={val_data / 'samples.jsonl'}", "evaluation.max_new_tokens=4", expect_rc=42)
    return run


def test_validation_equals_training_loss_and_records_time(reference):
    val, train = _val(reference), step_records(reference)
    assert sorted(val) == [0, 2] and sorted(train) == [1, 2]
    # Before step 1 the weights are those step 1's loss was computed with, on the same packs.
    _close(val[0]["val_loss"], train[1]["loss"], "validation loss vs the training loss on the same packs")
    assert set(val[0]["val_dataset_loss"]) == set(train[1]["dataset_loss"])
    for name, v in train[1]["dataset_loss"].items():
        _close(val[0]["val_dataset_loss"][name], v, f"dataset {name}")
    assert val[2]["val_loss"] < val[0]["val_loss"], "two steps on the validation packs must lower their loss"
    assert val[0]["val_packs"] == 2
    # The missing image is counted, not fatal (every sample of the small set is read to fill 2 packs).
    assert val[0]["val_skipped"] == 1 and val[0]["val_samples"] == 15

    for r in train.values():  # where the step's time went
        parts = [r[f"time_{k}_s"] for k in ("data", "forward_backward", "optimizer", "checkpoint")]
        assert all(p >= 0 for p in parts)
        assert r["time_forward_backward_s"] > 0 and r["time_optimizer_s"] > 0 and r["step_cpu_s"] > 0
        assert sum(parts[:3]) <= r["step_time_s"] * 1.001 + 1e-3
    trace = json.loads((reference / "profile" / "rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names), "the profiler trace must hold the step's ops"
    ops = json.loads((reference / "profile" / "rank0_ops.json").read_text())
    by_name = {o["name"]: o for o in ops}
    assert by_name["aten::mm"]["count"] > 0 and by_name["aten::mm"]["self_cpu_s"] > 0, "the operator table"
    assert [o["self_cpu_s"] for o in ops] == sorted((o["self_cpu_s"] for o in ops), reverse=True)


@pytest.mark.parametrize("layout", [("parallel.tensor_parallel=2",),
                                    ("parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2"),
                                    ()], ids=["tp2", "pp2-vpp2", "dp2"])
def test_validation_loss_at_any_layout(trainer, val_data, reference, tmp_path, layout):
    run = tmp_path / "run"
    trainer(run, 2, *_overrides(val_data), *layout, expect_rc=42)
    a, b = _val(reference), _val(run)
    assert sorted(b) == [0, 2]
    for step in (0, 2):
        _close(b[step]["val_loss"], a[step]["val_loss"], f"{layout} step {step} validation loss")
        for name, v in a[step]["val_dataset_loss"].items():
            _close(b[step]["val_dataset_loss"][name], v, f"{layout} step {step} dataset {name}")
        assert (b[step]["val_packs"], b[step]["val_skipped"]) == (2, 1)


def test_evaluate_command_on_a_saved_checkpoint(trainer, val_data, reference, tmp_path):
    cmd = [sys.executable, "-m", "megatron_internvl.cli", "evaluate"] + trainer.command(tmp_path, 1, _overrides(val_data))[3:]
    cmd += [f"checkpoint.load={reference / 'checkpoints'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=trainer.env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["checkpoint"].endswith("iter_0000002") and record["step"] == 2
    _close(record["val_loss"], _val(reference)[2]["val_loss"], "evaluate vs the in-training evaluation", rtol=1e-12)
    assert json.loads((tmp_path / "eval.jsonl").read_text())["val_loss"] == record["val_loss"]


def test_validation_packs_are_dealt_independently_of_dp(val_data):
    """The packs of DP ranks 0 and 1 interleave to the single-process list (odd counts too)."""
    from megatron_internvl.config import load_config
    from megatron_internvl.data.build import build_tokenizer
    from megatron_internvl.training.evaluate import validation_data_config, validation_packs

    config = load_config(str(ROOT / "examples" / "tiny" / "full.yaml"),
                         [f"data.tokenizer_path={val_data / 'tokenizer.json'}",
                          f"evaluation.meta_path={val_data / 'val_meta.json'}"])
    cfg, tok = validation_data_config(config), build_tokenizer(config.data)
    one, names, skips = validation_packs(cfg, tok, None, 0, 1)
    assert names == ["val_chat", "val_more"] and skips == {"read": 15, "skipped": 1}
    assert len(one) == 14  # the whole set: one ~200-token sample per 256-token pack
    for limit, first in ((5, one[:5]),):  # an odd count: an uneven deal
        r0, _, _ = validation_packs(cfg, tok, limit, 0, 2)
        r1, _, _ = validation_packs(cfg, tok, limit, 1, 2)
        assert len(r0) + len(r1) == len(first)
        for i, pack in enumerate(first):
            other = (r0, r1)[i % 2][i // 2]
            assert torch.equal(pack["input_ids"], other["input_ids"])
            assert torch.equal(pack["pixel_values"], other["pixel_values"])


def test_sample_answers_logged_at_each_evaluation(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (reference / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in records] == [
        (0, "Describe the image."), (0, "Compare them."), (2, "Describe the image."), (2, "Compare them.")]
    assert [len(r["images"]) for r in records] == [1, 2, 1, 2]
    assert all(isinstance(r["answer"], str) and r["answer"] for r in records)
    events = EventAccumulator(str(reference / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("samples/1/text_summary")] == [0, 2]
    assert [e.step for e in events.Scalars("val_loss")] == [0, 2]
