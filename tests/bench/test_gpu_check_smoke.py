"""The GPU check (bench/gpu/run.sh) end to end on CPU with tiny shapes, so it cannot rot between
the rare runs on a GPU. No performance figure is asserted; correctness figures must be in limits,
and the steps that need Transformer Engine, CUDA or Triton are reported as skipped by name."""

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
                          capture_output=True, text=True, timeout=900)
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

    training = res["training"]  # BF16 against fp32, both on the CPU here
    assert training["steps"] == len(training["losses"]) == len(training["fp32_losses"]) == 10
    assert training["ok"] and 0 < training["max_rel_diff"] <= training["limit"]

    specs = res["specs"]
    dali = {"rank_decode"} if res["env"]["dali"] else set()   # DALI-CPU runs the rank-decode step here
    assert set(specs["skipped"]) == {"host_syncs[te]", "layer_grads[te]", "triton_ce", "te_resume",
                                     "fp8_vs_bf16", "rank_decode", "fa3_varlen"} - dali, specs["skipped"]
    assert specs["skipped"]["fa3_varlen"].endswith("no CUDA device")
    assert set(specs["checks"]) == {"host_syncs[local]", "layer_grads[local]"} | dali
    if dali:
        decode = specs["checks"]["rank_decode"]
        assert decode["ok"] and decode["batch_equals_single"] and 0 < decode["max_abs"] <= decode["tolerance"]["max"]
    syncs = specs["checks"]["host_syncs[local]"]
    assert syncs["ok"] and len(set(syncs["reads_per_step"].values())) == 1  # 2 and 4 LLM layers
    grads = specs["checks"]["layer_grads[local]"]
    assert grads["ok"] and 0 < max(grads["grad_rel_l2"].values()) <= grads["limit"]
    summary_text = summary.with_suffix(".md").read_text()
    assert "te_resume: skipped (needs CUDA and transformer_engine)" in summary_text

    (pair,) = res["throughput"].values()
    ours, theirs = pair["ours"], pair["transformers"]
    assert ours["tokens_per_step"] == theirs["tokens_per_step"] > 0  # the same samples
    assert ours["tiles_per_step"] == theirs["tiles_per_step"] > 0
    assert ours["tokens_per_s"] > 0 and theirs["tokens_per_s"] > 0 and pair["ratio_tokens_per_s"] > 0
    assert "| tiny | ours |" in summary.with_suffix(".md").read_text()
    assert (out / "profile.txt").read_text().count("aten::") > 5
