"""`megatron-internvl slurm`: what the rendered sbatch script asks Slurm for and runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_internvl.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "examples" / "tiny" / "full.yaml")


def render(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli_main(["slurm", RECIPE, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def directives(script: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)$", script, re.M)


def settings(script: str) -> dict:
    """Run the rendered settings block in bash and read back what the job would use."""
    block = re.search(r"^# >>> settings.*?^# <<< settings$", script, re.S | re.M).group(0)
    probe = block + '\nprintf "%s\\n" "$MI_PYTHON" "$MI_LAUNCHER" "$MI_CONTAINER_IMAGE" "$MI_LOG_DIR"; printf "[%s]\\n" "${MI_ARGS[@]}"'
    lines = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    return {"python": lines[0], "launcher": lines[1], "container": lines[2], "log_dir": lines[3],
            "args": [a[1:-1] for a in lines[4:]]}


def test_gpu_job_directives_and_settings(capsys, tmp_path):
    rc, script, err = render(capsys, "--nodes", "4", "--gpus-per-node", "8", "--partition", "h100",
                             "--time", "24:00:00", "--account", "proj", "--signal-lead", "300",
                             "parallel.tensor_parallel=2", "training.global_batch_size=64",
                             f"logging.run_dir={tmp_path / 'run'}", f"checkpoint.load={tmp_path / 'a ckpt'}",
                             "--sbatch-arg=--exclusive", "--dry-run")
    assert rc == 0, err
    d = directives(script)
    for want in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=h100",
                 "--time=24:00:00", "--account=proj", "--signal=B:USR1@300", "--requeue",
                 "--exclusive", f"--chdir={Path.cwd().resolve()}"):
        assert want in d, (want, d)
    assert sum(x.startswith("--signal") for x in d) == 1
    s = settings(script)
    assert s["python"] == sys.executable  # the job's interpreter is the renderer's
    assert s["launcher"] == "srun" and s["container"] == ""
    # The overrides reach the job as separate words, spaces included.
    assert s["args"] == [RECIPE, "parallel.tensor_parallel=2", "training.global_batch_size=64",
                         f"logging.run_dir={tmp_path / 'run'}", f"checkpoint.load={tmp_path / 'a ckpt'}"]
    assert s["log_dir"] == str(tmp_path / "run" / "slurm")
    assert f"--output={tmp_path / 'run' / 'slurm'}/%x-%j.out" in d  # one batch log per job


def test_torchrun_and_container(capsys):
    rc, script, err = render(capsys, "--nodes", "2", "--gpus-per-node", "4", "--launcher", "torchrun",
                             "--container", "nvcr.io#nvidia/pytorch:25.10-py3", "--container-mounts",
                             "/lustre:/lustre", "training.global_batch_size=64")
    assert rc == 0, err
    d = directives(script)
    assert "--ntasks-per-node=1" in d and "--gpus-per-node=4" in d  # one torchrun per node
    s = settings(script)
    assert s["launcher"] == "torchrun" and s["container"] == "nvcr.io#nvidia/pytorch:25.10-py3"
    assert s["python"] == "python"  # the container's own interpreter, not this machine's path
    assert "MI_CONTAINER_MOUNTS=/lustre:/lustre" in script


def test_cpu_job_needs_tasks_per_node(capsys):
    rc, _, err = render(capsys, "--nodes", "1", "--gpus-per-node", "0")
    assert rc == 2 and "--tasks-per-node" in err
    rc, script, err = render(capsys, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
                             "parallel.tensor_parallel=2")
    assert rc == 0, err
    d = directives(script)
    assert "--ntasks-per-node=2" in d and not any(x.startswith("--gpus") for x in d)


@pytest.mark.parametrize("args, field", [
    (["--nodes", "1", "--gpus-per-node", "8", "parallel.tensor_parallel=3"], "parallel.tensor_parallel"),
    # TP=2 x PP=1 on 3 processes: no integer data-parallel size.
    (["--nodes", "1", "--gpus-per-node", "3", "parallel.tensor_parallel=2"], "3"),
    (["--nodes", "1", "--gpus-per-node", "8", "training.no_such_key=1"], "no_such_key"),
])
def test_broken_layout_is_refused_before_any_script(capsys, args, field):
    rc, script, err = render(capsys, *args)
    assert rc == 2 and script == ""
    assert "megatron-internvl slurm:" in err and field in err, err


def test_submit_without_slurm_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on PATH
    rc, _, err = render(capsys, "--nodes", "1", "--gpus-per-node", "8", f"logging.run_dir={tmp_path}",
                        "training.global_batch_size=64", "--submit")
    assert rc == 2 and "sbatch not found" in err
    assert (tmp_path / "slurm" / "tiny-full.sbatch").is_file()  # the script it would have submitted


BATCH = "training.global_batch_size=64"  # divisible by every data-parallel size below


def _fake_sinfo(tmp_path, monkeypatch, cpus: str | None) -> None:
    """`sinfo` that reports nodes of `cpus` CPUs (None: Slurm cannot be reached)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    body = f'printf "{cpus}\\n"' if cpus is not None else 'echo "sinfo: fatal: no configuration" >&2; exit 1'
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def _cpus_settings(script: str) -> tuple[str, str]:
    block = re.search(r"^# >>> settings.*?^# <<< settings$", script, re.S | re.M).group(0)
    env = subprocess.run(["bash", "-c", block + '\nprintf "%s" "$MI_CPUS_PER_TASK"'], capture_output=True,
                         text=True, check=True).stdout
    return env, re.search(r'^export TRITON_CACHE_DIR=(.*)$', script, re.M).group(1)


def test_cpus_per_task_is_cores_per_gpu_and_triton_cache_is_node_local(capsys, tmp_path, monkeypatch):
    _fake_sinfo(tmp_path, monkeypatch, "96\n128")  # two node kinds: the smaller one counts
    rc, script, err = render(capsys, "--nodes", "2", "--gpus-per-node", "8", "--partition", "h100", BATCH)
    assert rc == 0, err
    assert "--cpus-per-task=12" in directives(script)
    cpus, triton = _cpus_settings(script)
    assert cpus == "12" and '--cpus-per-task="$MI_CPUS_PER_TASK"' in script  # srun gets it too
    assert "TMPDIR:-/tmp" in triton and "HOME" not in triton
    # torchrun: one task drives the node's 8 GPUs; an explicit value wins.
    rc, script, err = render(capsys, "--nodes", "1", "--gpus-per-node", "8", "--launcher", "torchrun", BATCH)
    assert "--cpus-per-task=96" in directives(script)
    rc, script, err = render(capsys, "--nodes", "1", "--gpus-per-node", "8", "--cpus-per-task", "6", BATCH)
    assert "--cpus-per-task=6" in directives(script) and _cpus_settings(script)[0] == "6"


def test_cpus_per_task_without_slurm(capsys, tmp_path, monkeypatch):
    _fake_sinfo(tmp_path, monkeypatch, None)
    rc, script, err = render(capsys, "--nodes", "1", "--gpus-per-node", "4", BATCH)
    assert rc == 0 and not any(d.startswith("--cpus-per-task") for d in directives(script))
    assert "--cpus-per-task or --cpus-per-node" in err  # said, not silently dropped
    rc, script, err = render(capsys, "--nodes", "1", "--gpus-per-node", "4", "--cpus-per-node", "64", BATCH)
    assert "--cpus-per-task=16" in directives(script)
    rc, script, err = render(capsys, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2")
    assert not any(d.startswith("--cpus-per-task") for d in directives(script))  # CPU job: Slurm's default
    rc, script, err = render(capsys, "--nodes", "1", "--gpus-per-node", "4", "--cpus-per-task", "0", BATCH)
    assert rc == 2 and "--cpus-per-task 0" in err
