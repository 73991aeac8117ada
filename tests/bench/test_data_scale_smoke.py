"""bench/data_scale.py end to end on a few hundred lines, so it cannot rot between runs. No timing
is asserted (nor file counts: at this size a step reads a handful of samples); both loaders must
read the same samples per step and ship the same tiles."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_data_scale_smoke(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "bench/data_scale.py", "--samples", "300", "--dp", "2",
                           "--micro", "1", "--max-tokens", "2048", "--max-tiles", "8", "--steps", "1", "--workers", "0", "--work", str(tmp_path / "w"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["index"]["lines"] == 300 and "| 2 | indexed |" in out.with_suffix(".md").read_text()
    by = {(r["dp"], r["loader"]): r for r in res["results"]}
    today, indexed = by[(2, "today")], by[(2, "indexed")]
    assert today["per_step"]["samples_per_step"] == indexed["per_step"]["samples_per_step"] > 0
    assert today["bytes_per_tile"] == indexed["bytes_per_tile"] > 0
