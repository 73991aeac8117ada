"""logging.wandb in offline mode (no network): the step and validation records, the resolved
config, and a resumed run (same run directory) continuing the same W&B run id."""

import json

import pytest

from megatron_internvl.config.schema import WandbConfig
from megatron_internvl.training.metrics import MetricsLogger

wandb = pytest.importorskip("wandb")


def test_wandb_offline_records_config_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = WandbConfig(project="tiny", mode="offline")
    config = {"training": {"train_steps": 4}, "model": {"language": {"hidden_size": 64}}}
    ids = []
    for first, last in ((1, 2), (3, 4)):  # a run, then its resume in the same run directory
        m = MetricsLogger(tmp_path, 4, enabled=True, tensorboard=False, progress=False, wandb=cfg, config=config)
        ids.append(m.wandb.id)
        for step in range(first, last + 1):
            m.log({"step": step, "loss": 5.0 - step, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 10.0,
                   "dataset_loss": {"chat": 4.0}})
        m.log_validation({"step": last, "val_loss": 6.0 - last, "val_dataset_loss": {"chat": 5.0},
                          "val_packs": 2, "val_samples": 3, "val_skipped": 1, "val_time_s": 0.1})
        m.close()
    assert ids[0] == ids[1] == (tmp_path / "wandb_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{ids[0]}"))
    assert len(runs) == 2, runs
    # the runs' record logs (protobuf): the resolved config, the step and validation series
    log = b"".join(next(run.glob("*.wandb")).read_bytes() for run in runs)
    for key in (b"train_steps", b"hidden_size", b"grad_norm", b"val_loss", b"dataset_loss/chat", ids[0].encode()):
        assert key in log, key
