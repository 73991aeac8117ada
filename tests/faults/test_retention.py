"""Retention cannot lose the last good checkpoint; complete.json records content hashes."""

import json
import time

import pytest

from megatron_internvl.checkpoint import COMPLETE, LATEST, verify_checkpoint
from megatron_internvl.checkpoint.manager import CheckpointManager
from megatron_internvl.config import ConfigError, load_config


def _fake_save(manager: CheckpointManager, step: int) -> None:
    """What a save leaves in iter_N.tmp before publishing (shards, common state), then publish."""
    target = manager.dir / manager.name(step)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True)
    (tmp / "__0_0.distcp").write_bytes(bytes([step]) * 1000)
    (tmp / "common.pt").write_bytes(b"common" * step)
    manager._publish(tmp, target, None, time.monotonic())


def _published(save_dir):
    return sorted(p.name for p in save_dir.glob("iter_*"))


@pytest.mark.parametrize("keep_last", [1, 2])
def test_keep_last_keeps_newest(tmp_path, keep_last):
    m = CheckpointManager(tmp_path, keep_last=keep_last)
    for step in (1, 2, 3):
        _fake_save(m, step)
        assert (tmp_path / LATEST).read_text() == m.name(step)
        assert verify_checkpoint(tmp_path / m.name(step)) is None
    assert _published(tmp_path) == [m.name(s) for s in (1, 2, 3)][-keep_last:]


def test_keep_last_zero_at_runtime_still_keeps_newest(tmp_path):
    # The schema refuses keep_last < 1; a manager built by hand with 0 still keeps the newest.
    m = CheckpointManager(tmp_path, keep_last=0)
    _fake_save(m, 1)
    _fake_save(m, 2)
    assert _published(tmp_path) == [m.name(2)]
    assert (tmp_path / (tmp_path / LATEST).read_text()).is_dir()


def test_checkpoint_latest_names_is_never_deleted(tmp_path):
    # `latest` names an older checkpoint than the newest step on disk (e.g. a newer one from
    # another run left there): neither the newly published one nor latest's is deleted.
    m = CheckpointManager(tmp_path, keep_last=3)
    _fake_save(m, 5)
    _fake_save(m, 9)
    m.keep_last = 1
    (tmp_path / LATEST).write_text(m.name(5))
    m._retire_old(tmp_path / m.name(9))
    assert _published(tmp_path) == [m.name(5), m.name(9)]


def test_unpublished_save_deletes_nothing(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=1)
    _fake_save(m, 1)
    (tmp_path / (m.name(2) + ".tmp")).mkdir()  # a save that never finished
    assert _published(tmp_path) == [m.name(1), m.name(2) + ".tmp"]
    assert m.latest_valid() == tmp_path / m.name(1)


def test_keep_last_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint.keep_last=0 must be >= 1"):
        load_config(None, ["checkpoint.keep_last=0"], require_data=False)


def test_complete_json_hashes_and_same_size_damage(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    _fake_save(m, 1)
    _fake_save(m, 2)
    record = json.loads((tmp_path / m.name(2) / COMPLETE).read_text())
    assert record["format"] == 2 and set(record["files"]) == {"__0_0.distcp", "common.pt"}
    assert all(len(f["blake2b"]) == 32 for f in record["files"].values())
    assert not (tmp_path / m.name(2) / ".hashes").exists()
    shard = tmp_path / m.name(2) / "__0_0.distcp"
    shard.write_bytes(b"\x00" * shard.stat().st_size)  # same size, other bytes
    problem = verify_checkpoint(tmp_path / m.name(2))
    assert "__0_0.distcp is damaged" in problem
    assert verify_checkpoint(tmp_path / m.name(2), content=False) is None  # sizes alone miss it
    assert m.latest_valid() == tmp_path / m.name(1)  # falls back to the previous complete one
    from megatron_internvl.checkpoint import CheckpointDamagedError

    with pytest.raises(CheckpointDamagedError, match="__0_0.distcp is damaged"):
        m.latest_valid(strict=True)


def test_sizes_only_complete_json_still_verifies(tmp_path):
    # complete.json from before hashes were recorded: {"files": {name: size}}.
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / "common.pt").write_bytes(b"x" * 10)
    (ckpt / COMPLETE).write_text(json.dumps({"files": {"common.pt": 10}}))
    assert verify_checkpoint(ckpt) is None
    (ckpt / "common.pt").write_bytes(b"x" * 9)
    assert "9 bytes, 10 were written" in verify_checkpoint(ckpt)


def test_every_checkpoint_damaged_stops_instead_of_starting_over(tmp_path):
    from megatron_internvl.checkpoint import CheckpointDamagedError

    m = CheckpointManager(tmp_path, keep_last=2)
    _fake_save(m, 1)
    (tmp_path / m.name(1) / "common.pt").write_bytes(b"COMMON")  # same size, other bytes
    with pytest.raises(CheckpointDamagedError, match="no usable checkpoint in"):
        m.latest_valid()
