"""The README's first command works end to end (dataset, TP=2 training, plot, export, reload)."""

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), str(tmp_path / "qs")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, MASTER_PORT=str(port)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "== loss: first 5 steps" in out.stdout
    assert "no missing or unexpected keys" in out.stdout
    for name in ("loss.png", "grad_norm.png", "throughput.png"):
        assert (tmp_path / "qs" / "train" / "plots" / name).stat().st_size > 1000
    assert (tmp_path / "qs" / "train" / "checkpoints" / "iter_0000050" / "complete.json").is_file()
    assert (tmp_path / "qs" / "hf" / "config.json").is_file()
