"""Every shell script of the project, and the scripts `megatron-internvl slurm` renders, pass
`bash -n` and shellcheck (apt-installed when missing; skipped only where that is impossible)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_internvl.launch.slurm import JobRequest, render

from .cluster import install_or_reason

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "examples" / "tiny" / "full.yaml")


def project_scripts() -> list[Path]:
    found = set(ROOT.glob("slurm/*.sbatch")) | set(ROOT.glob("scripts/*.sh")) | set(ROOT.glob("examples/**/*.sh"))
    found |= {ROOT / ".ci" / "run"}
    return sorted(found)


def rendered_scripts(folder: Path) -> list[Path]:
    requests = {
        "srun-cpu": JobRequest(RECIPE, ["parallel.tensor_parallel=2"], nodes=1, gpus_per_node=0, tasks_per_node=2),
        "srun-gpu": JobRequest(RECIPE, ["training.global_batch_size=64"],
                               nodes=4, gpus_per_node=8, partition="p", time="1:00:00", account="a"),
        "torchrun-container": JobRequest(RECIPE, ["training.global_batch_size=64"], nodes=2, gpus_per_node=4,
                                         launcher="torchrun", container="nvcr.io#nvidia/pytorch:25.10-py3",
                                         container_mounts="/lustre:/lustre"),
    }
    paths = []
    for name, req in requests.items():
        path = folder / f"{name}.sbatch"
        path.write_text(render(req).script)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shellcheck():
    reason = install_or_reason(packages=("shellcheck",),
                               binaries_missing=lambda: [] if shutil.which("shellcheck") else ["shellcheck"])
    if reason:
        pytest.skip(f"no shellcheck here: {reason}")
    return shutil.which("shellcheck")


def test_the_scripts_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in project_scripts()}
    assert {"slurm/train.sbatch", "slurm/convert.sbatch", "scripts/test.sh", "scripts/setup_env.sh",
            "examples/quickstart.sh", ".ci/run"} <= names, names


def test_bash_syntax_and_shellcheck(shellcheck, tmp_path):
    scripts = project_scripts() + rendered_scripts(tmp_path)
    for path in scripts:
        out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, f"bash -n {path}:\n{out.stderr}"
    # -x follows `source` of the project's own files; every severity counts, info and style too.
    out = subprocess.run([shellcheck, "-x", "--shell=bash", *map(str, scripts)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    command = first_block[first_block.index(next(l for l in first_block if l.startswith("# run the tests"))) + 1]
    assert command == "bash scripts/test.sh"
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert ci[-1] == command, ci
