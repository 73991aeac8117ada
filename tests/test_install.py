"""A non-editable install works away from the source tree: `pip install .` into a fresh virtualenv,
then the command line, the kernels and a tiny training run from a folder outside the checkout.

The fresh virtualenv gets no pip and no downloads: the test environment's site-packages is listed
in a .pth file for the dependencies (torch, megatron-core, ...). A path line in a .pth file is
added to sys.path without reading the .pth files inside it, so the editable install of this
checkout there (a finder hook started from its own .pth) stays inactive, and the package must come
from the new install. The build runs on a copy of the checkout's files, which stays untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "recipes" / "internvl3" / "8b" / "sft.yaml"
TINY = ROOT / "examples" / "tiny"


def copy_checkout(dest: Path) -> None:
    """The files git would carry (tracked, and new ones not ignored), without build outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # deleted but still tracked: skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_non_editable_install_outside_the_checkout(tmp_path):
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    copy_checkout(src)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"

    run([sys.executable, "-m", "venv", "--without-pip", venv], work, env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], work, env).stdout.strip())
    deps = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (purelib / "test-environment.pth").write_text("".join(d + "\n" for d in deps))
    # The test environment's pip and setuptools run inside the new venv and install into it.
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed",
         "--no-cache-dir", "--disable-pip-version-check", src], work, env)

    where = run([python, "-c", "import megatron_internvl, megatron_internvl.kernels.fused_linear_ce as k, "
                 "importlib.resources as r; print(megatron_internvl.__file__); print(k.__file__); "
                 "print(r.files('megatron_internvl.slurm') / 'train.sbatch')"], work, env).stdout.split()
    for path in map(Path, where):
        assert purelib in path.parents and ROOT not in path.parents, where
        assert path.is_file()

    # An sbatch script for 2 x 8 GPUs, its template read from the installed package.
    script = run([bin_dir / "megatron-internvl", "slurm", RECIPE, "--nodes", "2", "--gpus-per-node", "8",
                  "--dry-run"], work, env).stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "srun" in script and f"MI_PYTHON={python}" in script

    plan = run([bin_dir / "megatron-internvl", "plan", RECIPE, "--nodes", "4", "--gpus-per-node", "8"], work, env).stdout
    assert "on 4 x 8 GPUs" in plan and "peak" in plan and "FLOPs per step" in plan

    # The tiny quick-start model: dataset, then 3 training steps of the installed trainer.
    data, run_dir = work / "data", work / "run"
    run([python, TINY / "make_dataset.py", data], work, env)
    run([bin_dir / "megatron-internvl", "train", TINY / "full.yaml", "training.train_steps=3", "optimizer.warmup_steps=1",
         f"data.meta_path={data / 'meta.json'}", f"data.tokenizer_path={data / 'tokenizer.json'}",
         f"logging.run_dir={run_dir}", "logging.progress=false", "logging.tensorboard=false",
         "checkpoint.save_interval=null"], work, env)
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses), losses

    # inspect-data is part of the package too (it once ran tools/ from the clone).
    report = json.loads(run([bin_dir / "megatron-internvl", "inspect-data", "--meta", data / "meta.json",
                             "--tokenizer", data / "tokenizer.json", "--max-tokens", "256", "--max-tiles", "8",
                             "--image-size", "56", "--num-image-token", "4", "--num-samples", "10", "--json"],
                            work, env).stdout)
    assert report["samples"] == 10 and report["tokens"] > 0, report
