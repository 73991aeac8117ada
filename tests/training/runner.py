"""Run the training entry point on the tiny recipe in subprocesses; read its metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "tiny"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. Not a process-group kill: torchrun starts each
    rank in a session of its own."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


class Trainer:
    """Runs `megatron_internvl.train` on the tiny recipe in a subprocess (torchrun for N > 1)."""

    def __init__(self, data):
        self.data = data

    def command(self, run_dir, nproc, overrides, recipe="full"):
        base = [
            f"data.meta_path={self.data / 'meta.json'}", f"data.tokenizer_path={self.data / 'tokenizer.json'}",
            f"logging.run_dir={run_dir}", "logging.progress=false", "logging.tensorboard=false",
            "data.balance=none", "training.train_steps=6",
        ]
        recipe = str(ROOT / "examples" / "tiny" / f"{recipe}.yaml")
        if nproc == 1:
            launcher = [sys.executable, "-m", "megatron_internvl.train"]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                        f"--master-port={free_port()}", "-m", "megatron_internvl.train"]
        return launcher + [recipe] + base + list(overrides)

    def env(self):
        return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def __call__(self, run_dir, nproc=1, *overrides, expect_rc=0, recipe="full", timeout=300):
        # On a timeout every rank dies too (no CPU-eating orphans left for the rest of the suite).
        proc = subprocess.Popen(self.command(run_dir, nproc, overrides, recipe), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env(), cwd=ROOT)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"training did not finish in {timeout} s\n{stderr[-6000:]}") from None
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        rc = out.returncode
        if nproc > 1 and rc == 1 and f"exitcode  : {expect_rc} " in out.stderr:
            rc = expect_rc  # torchrun reports a worker's non-zero exit as its own exit code 1
        if rc != expect_rc:
            raise AssertionError(f"exit code {out.returncode} != {expect_rc}\n{out.stderr[-6000:]}")
        return out
