"""Render ``slurm/train.sbatch`` for one recipe and one cluster; optionally submit it.

    megatron-internvl slurm RECIPE.yaml --nodes N --gpus-per-node G [--partition P --time T
        --account A --container IMAGE --container-mounts M ...] [section.key=value ...]
        [--dry-run | --submit]

The template stays a working script (``sbatch slurm/train.sbatch RECIPE`` with its defaults);
rendering replaces its ``#SBATCH`` lines and its settings block with literal values, so the job
does not depend on the environment it was submitted from: the interpreter path, the recipe and
the overrides are written into the script. The recipe is validated for the job's world size
before anything is written, so a layout that cannot run is refused on the login node.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The top-level slurm/ folder, installed as this package (setup.py): found the same way in a
# wheel, a non-editable install and an editable one.
TEMPLATES = "megatron_internvl.slurm"
SETTINGS = re.compile(r"^# >>> settings.*?^# <<< settings\n", re.S | re.M)
SBATCH_LINE = re.compile(r"^#SBATCH .*\n", re.M)


class SlurmError(ValueError):
    """A request that cannot become a working job (the message says what to change)."""


@dataclass
class JobRequest:
    recipe: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one per GPU
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None  # default: the node's cores per GPU (GPU jobs)
    cpus_per_node: int | None = None  # default: asked of sinfo for the partition
    job_name: str | None = None
    log_dir: str | None = None  # default: RUN_DIR/slurm
    container: str | None = None
    container_mounts: str | None = None
    launcher: str = "srun"
    python: str | None = None  # default: this interpreter, or `python` inside a container
    signal_lead_s: int = 180
    sbatch_args: list[str] = field(default_factory=list)
    chdir: str | None = None  # default: the current directory

    def processes_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        if self.gpus_per_node < 1:
            raise SlurmError("--gpus-per-node 0 (a CPU job) needs --tasks-per-node N")
        return self.gpus_per_node


def node_cpus(partition: str | None) -> int | None:
    """CPUs of the partition's smallest node, from ``sinfo``; None where Slurm cannot tell."""
    cmd = ["sinfo", "--noheader", "--format=%c"] + ([f"--partition={partition}"] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = [int(m) for m in re.findall(r"^(\d+)", out.stdout, re.M)] if out.returncode == 0 else []
    return min(counts) if counts else None


def cpus_per_task(req: JobRequest) -> int | None:
    """--cpus-per-task: given, or the node's cores per GPU times the GPUs a task drives (one
    under srun, the node's under torchrun). Without it Slurm allocates one core per task, and
    with CPU binding a reader rank's decoding workers share that core with the rank itself.
    None for CPU jobs (no GPU to divide by) or when the node's CPUs are unknown."""
    if req.cpus_per_task is not None:
        return req.cpus_per_task
    if not req.gpus_per_node:
        return None
    cpus = req.cpus_per_node or node_cpus(req.partition)
    if cpus is None:
        return None
    per_gpu = max(1, cpus // req.gpus_per_node)
    return per_gpu * (req.processes_per_node() if req.launcher == "torchrun" else 1)


def _check(req: JobRequest):
    """Validate the request and the recipe at the job's world size; return the loaded config."""
    from megatron_internvl.config import ConfigError, load_config

    if req.nodes < 1:
        raise SlurmError(f"--nodes {req.nodes}: a job needs at least one node")
    if req.gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node {req.gpus_per_node} is negative")
    per_node = req.processes_per_node()
    if per_node < 1:
        raise SlurmError(f"--tasks-per-node {per_node}: at least one process per node")
    if req.launcher not in ("srun", "torchrun"):
        raise SlurmError(f"--launcher {req.launcher}: choose srun or torchrun")
    for name in ("cpus_per_task", "cpus_per_node"):
        if getattr(req, name) is not None and getattr(req, name) < 1:
            raise SlurmError(f"--{name.replace('_', '-')} {getattr(req, name)}: at least 1")
    if req.signal_lead_s < 1:
        raise SlurmError(f"--signal-lead {req.signal_lead_s}: seconds before the time limit, at least 1")
    if not Path(req.recipe).is_file():
        raise SlurmError(f"recipe {req.recipe} not found")
    world = req.nodes * per_node
    try:
        return load_config(req.recipe, req.overrides, world_size=world)
    except ConfigError as exc:
        raise SlurmError(f"the recipe does not run on {req.nodes} x {per_node} processes: {exc}") from exc


def _directives(req: JobRequest, config) -> list[str]:
    per_node = req.processes_per_node()
    recipe = Path(req.recipe)
    name = req.job_name or f"{recipe.resolve().parent.name}-{recipe.stem}"
    lines = [
        f"--job-name={name}",
        f"--nodes={req.nodes}",
        f"--ntasks-per-node={1 if req.launcher == 'torchrun' else per_node}",
    ]
    if req.gpus_per_node:
        lines.append(f"--gpus-per-node={req.gpus_per_node}")
    for option, value in (("partition", req.partition), ("time", req.time), ("account", req.account),
                          ("qos", req.qos), ("cpus-per-task", cpus_per_task(req))):
        if value is not None:
            lines.append(f"--{option}={value}")
    lines += [
        f"--signal=B:USR1@{req.signal_lead_s}",
        "--requeue",
        "--open-mode=append",
        f"--chdir={_chdir(req)}",
        f"--output={_log_dir(req, config)}/%x-%j.out",
    ]
    lines += list(req.sbatch_args)
    for line in lines:
        if any(c.isspace() for c in line):
            raise SlurmError(f"sbatch option {line!r} contains whitespace, which #SBATCH lines cannot carry")
    return [f"#SBATCH {line}\n" for line in lines]


def _chdir(req: JobRequest) -> str:
    return str(Path(req.chdir or os.getcwd()).resolve())


def _log_dir(req: JobRequest, config) -> str:
    return req.log_dir or str(Path(config.logging.run_dir) / "slurm")


def _settings(req: JobRequest, config) -> str:
    python = req.python or ("python" if req.container else sys.executable)
    q = shlex.quote
    values = [
        ("MI_PYTHON", python), ("MI_LAUNCHER", req.launcher),
        ("MI_GPUS_PER_NODE", str(req.processes_per_node())),
        ("MI_CPUS_PER_TASK", str(cpus_per_task(req) or "")),
        ("MI_CONTAINER_IMAGE", req.container or ""), ("MI_CONTAINER_MOUNTS", req.container_mounts or ""),
        ("MI_LOG_DIR", _log_dir(req, config)),
    ]
    args = [str(Path(req.recipe).resolve())] + list(req.overrides)
    return ("# >>> settings (written by megatron-internvl slurm)\n"
            + "".join(f"{k}={q(v)}\n" for k, v in values)
            + "MI_ARGS=(" + " ".join(q(a) for a in args) + ")\n"
            + "# <<< settings\n")


@dataclass
class Rendered:
    script: str
    job_name: str
    log_dir: Path  # absolute: Slurm needs it to exist before the job starts


def render(req: JobRequest, template: str = "train.sbatch") -> Rendered:
    config = _check(req)
    path = importlib.resources.files(TEMPLATES) / template
    if not path.is_file():
        raise SlurmError(f"template {template} not found in {TEMPLATES}: reinstall the package "
                         f"(pip install . from a clone installs slurm/*.sbatch)")
    text = path.read_text()
    sbatch = SBATCH_LINE.findall(text)
    if not sbatch or not SETTINGS.search(text):
        raise SlurmError(f"{path} has lost its #SBATCH lines or its settings block")
    first = text.index(sbatch[0])
    text = SBATCH_LINE.sub("", text)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    header = (f"# Rendered {stamp} from slurm/{template} by:\n"
              f"#   megatron-internvl slurm {shlex.join(req_command(req))}\n")
    text = text[:first] + header + "".join(_directives(req, config)) + text[first:]
    script = SETTINGS.sub(lambda _: _settings(req, config), text, count=1)
    name = re.search(r"^#SBATCH --job-name=(\S+)", script, re.M).group(1)
    return Rendered(script, name, Path(_chdir(req)) / _log_dir(req, config))


def req_command(req: JobRequest) -> list[str]:
    """The arguments that render this request again (recorded in the script's header)."""
    args = [req.recipe, "--nodes", str(req.nodes), "--gpus-per-node", str(req.gpus_per_node)]
    for flag, value in (("--tasks-per-node", req.tasks_per_node), ("--partition", req.partition),
                        ("--time", req.time), ("--account", req.account), ("--qos", req.qos),
                        ("--cpus-per-task", req.cpus_per_task), ("--cpus-per-node", req.cpus_per_node),
                        ("--container", req.container),
                        ("--container-mounts", req.container_mounts)):
        if value is not None:
            args += [flag, str(value)]
    if req.launcher != "srun":
        args += ["--launcher", req.launcher]
    return args + list(req.overrides)


def submit(script: str, path: Path) -> str:
    """Write the script and submit it; return the job id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run on a Slurm login node, or use --dry-run") from None
    if out.returncode != 0:
        raise SlurmError(f"sbatch refused {path}: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-internvl slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, passed to the job")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU job (with --tasks-per-node)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="processes per node (default: one per GPU)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 24:00:00")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--cpus-per-task", type=int,
                   help="cores per task (default: the node's cores per GPU, x GPUs per node under torchrun)")
    p.add_argument("--cpus-per-node", type=int,
                   help="the nodes' CPUs, where sinfo cannot tell (rendering away from the cluster)")
    p.add_argument("--job-name")
    p.add_argument("--log-dir", help="batch and per-rank logs (default RUN_DIR/slurm)")
    p.add_argument("--container", help="pyxis/enroot image (srun --container-image)")
    p.add_argument("--container-mounts", help="srun --container-mounts, e.g. /lustre:/lustre")
    p.add_argument("--launcher", choices=("srun", "torchrun"), default="srun",
                   help="srun: one task per GPU (default); torchrun: one task per node")
    p.add_argument("--python", help="the job's interpreter (default: this one; `python` in a container)")
    p.add_argument("--signal-lead", type=int, default=180, dest="signal_lead_s",
                   help="seconds before the time limit at which the job saves and requeues")
    p.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args", metavar="OPTION",
                   help="one more #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable)")
    p.add_argument("--chdir", help="the job's working directory (default: the current one)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script (the default)")
    mode.add_argument("--submit", action="store_true", help="write the script into the log folder and sbatch it")
    p.add_argument("--out", type=Path, help="where --submit writes the script (default LOG_DIR/JOB_NAME.sbatch)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("dry_run", "submit", "out")}
    req = JobRequest(**fields)
    try:
        job = render(req)
        if req.gpus_per_node and cpus_per_task(req) is None:
            print("megatron-internvl slurm: note: sinfo could not tell the nodes' CPUs, so the job asks for "
                  "Slurm's default cores per task; give --cpus-per-task or --cpus-per-node", file=sys.stderr)
        if not args.submit:
            print(job.script, end="")
            return 0
        job.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm cannot create the batch log's folder
        path = args.out or job.log_dir / f"{job.job_name}.sbatch"
        job_id = submit(job.script, path)
    except SlurmError as exc:
        print(f"megatron-internvl slurm: {exc}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}: {path}; logs in {job.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
