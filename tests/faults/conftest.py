import json
import shutil
import sys

import pytest

from training.runner import ROOT, Trainer

sys.path.insert(0, str(ROOT / "examples" / "tiny"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from make_dataset import build

    return build(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def trainer(tiny_data):
    return Trainer(tiny_data)


@pytest.fixture(scope="session")
def tiny_run(trainer, tmp_path_factory):
    """One tiny 1-process run of 2 steps with a checkpoint after each (iter_1, iter_2), written by
    the background writer (which hashes the shards): the checkpoints the damage tests break."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    trainer(run, 1, "training.train_steps=2", "checkpoint.save_interval=1", "checkpoint.keep_last=3",
            "optimizer.warmup_steps=0", "checkpoint.async_save=true")
    for step in (1, 2):
        record = json.loads((run / "checkpoints" / f"iter_000000{step}" / "complete.json").read_text())
        shards = [name for name in record["files"] if name.endswith(".distcp")]
        assert shards and all(len(record["files"][n]["blake2b"]) == 32 for n in shards), record
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A fresh copy of the tiny run (its run directory and checkpoints) to damage."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def damage(path) -> None:
    """Overwrite a file with other bytes of the same length."""
    data = path.read_bytes()
    path.write_bytes(bytes((b + 1) % 256 for b in data))
