"""A full disk: refused before a save (free space vs the expected size, both named), or met
during one (ENOSPC reported as such, the partial folder removed, the previous checkpoints and
`latest` untouched, exit code 4)."""

import errno
import subprocess
import time

import pytest

from faults.test_retention import _fake_save
from megatron_internvl.checkpoint import LATEST, verify_checkpoint
from megatron_internvl.checkpoint import manager as manager_module
from megatron_internvl.checkpoint.manager import CheckpointManager, DiskFullError
from training.runner import ROOT


def test_too_little_space_before_a_save(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=2)
    _fake_save(m, 1)
    tmp = tmp_path / "iter_0000002.tmp"
    tmp.mkdir()
    usage = manager_module.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(manager_module.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DiskFullError) as info:
        m._check_free_space([], tmp)
    size = sum(p.stat().st_size for p in (tmp_path / "iter_0000001").iterdir())
    assert "has 0.00 GiB free" in str(info.value) and "the size of iter_0000001" in str(info.value)
    assert info.value.exit_code == 4 and size > 1000
    assert not tmp.exists() and verify_checkpoint(tmp_path / "iter_0000001") is None


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1024 vs 960"),
])
def test_enospc_while_writing_is_reported(tmp_path, monkeypatch, error):
    m = CheckpointManager(tmp_path, keep_last=2)
    _fake_save(m, 1)
    if isinstance(error, RuntimeError):  # torch's zip writer hides the errno: the disk is full
        usage = manager_module.shutil.disk_usage(tmp_path)
        monkeypatch.setattr(manager_module.shutil, "disk_usage", lambda p: usage._replace(free=0))
    tmp = tmp_path / "iter_0000002.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(DiskFullError, match="no space left on device while writing checkpoint iter_0000002.tmp"):
        with m._disk_full_reported(tmp):
            raise error
    assert not tmp.exists() and (tmp_path / LATEST).read_text() == "iter_0000001"


def test_other_write_errors_are_not_disk_full(tmp_path):
    m = CheckpointManager(tmp_path)
    with pytest.raises(RuntimeError, match="something else"):
        with m._disk_full_reported(tmp_path / "x.tmp"):
            raise RuntimeError("something else")


DRIVER = '''
import errno, os, sys
from megatron.core import dist_checkpointing
real, calls = dist_checkpointing.save, []

def save(state, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:  # the second save: a partial shard, then the disk is full
        with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        raise RuntimeError("unexpected pos 64 vs 0") from OSError(errno.ENOSPC, "No space left on device")
    return real(state, path, *args, **kwargs)

if __name__ == "__main__":  # megatron's writer spawns helpers that import this file again
    dist_checkpointing.save = save
    from megatron_internvl.training.main import main
    sys.exit(main(sys.argv[1:]))
'''


def test_disk_full_during_a_training_save(trainer, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    cmd = trainer.command(run, 1, ["training.train_steps=2", "checkpoint.save_interval=1", "optimizer.warmup_steps=0"])
    cmd[1:3] = [str(driver)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=trainer.env(), cwd=ROOT, timeout=300)
    assert out.returncode == 4, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no space left on device while writing checkpoint iter_0000002.tmp" in errors[0]
    assert "resume from iter_0000001" in errors[0] and "Traceback" not in out.stderr
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000001", "latest"]
    assert verify_checkpoint(ckpts / "iter_0000001") is None
