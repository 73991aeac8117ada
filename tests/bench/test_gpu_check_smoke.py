"""The GPU check (bench/gpu/run.sh) end to end on CPU with tiny shapes, so it cannot rot between
the rare runs on a GPU. No performance figure is asserted; correctness figures must be in limits."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "bench/gpu/run.sh", "--cpu-smoke", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (out / "check.log").read_text()[-4000:] if (out / "check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log

    (summary,) = out.glob("cpu-smoke_*.json")
    assert summary.with_suffix(".md").exists()
    res = json.loads(summary.read_text())
    for name in ("env.json", "correctness.json", "throughput.json"):
        assert json.loads((out / name).read_text())
    assert res["ok"] and res["env"]["torch"] and res["env"]["spec_auto"].startswith("local")
    # run.sh installed the checkout into its own virtualenv; the check did not import the checkout.
    assert ROOT not in Path(res["env"]["megatron_internvl"]).parents

    forward = res["forward"]
    assert set(forward["batches"]) == {"text", "image"}
    for figures in forward["batches"].values():
        assert figures["finite"] and 0 < figures["rel_l2"] <= 2e-2  # bf16 vs transformers fp32
    assert "packed:per_sample" in forward["backends_used"]  # the LLM ran as one THD pack

    training = res["training"]
    assert training["steps"] == len(training["losses"]) == 30
    assert training["last5_mean"] < training["first"] - 0.5

    (pair,) = res["throughput"].values()
    ours, theirs = pair["ours"], pair["transformers"]
    assert ours["tokens_per_step"] == theirs["tokens_per_step"] > 0  # the same samples
    assert ours["tiles_per_step"] == theirs["tiles_per_step"] > 0
    assert ours["tokens_per_s"] > 0 and theirs["tokens_per_s"] > 0 and pair["ratio_tokens_per_s"] > 0
    assert "| tiny | ours |" in summary.with_suffix(".md").read_text()
    profile = res["profile"]
    assert profile["host_reads_per_step"] >= 0 and (out / "profile.txt").read_text().count("aten::") > 5
