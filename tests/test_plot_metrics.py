"""tools/plot_metrics.py: the running mean drawn over the raw loss points."""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from plot_metrics import plot, running_mean  # noqa: E402


def test_running_mean_matches_a_trailing_window():
    values = list(np.random.default_rng(0).normal(size=37))
    for window in (1, 3, 5, 37, 50):
        ref = [np.mean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
        np.testing.assert_allclose(running_mean(values, window), ref, rtol=1e-12)


def test_loss_panel_shows_points_and_their_running_mean(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    losses = 6.0 - 0.05 * np.arange(50) + np.random.default_rng(1).normal(scale=0.5, size=50)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "loss": float(loss), "grad_norm": 1.0}) + "\n")
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    plot(tmp_path, tmp_path / "plots")
    loss_ax = figures[0].axes[0]
    raw, mean = loss_ax.get_lines()
    np.testing.assert_allclose(raw.get_ydata(), losses)
    np.testing.assert_allclose(mean.get_ydata(), running_mean(list(losses), 5))
    assert mean.get_ydata()[-1] < mean.get_ydata()[4] - 1.0  # the trend a reader should see


def test_validation_curve_and_time_breakdown(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "loss": 5.0 - 0.1 * step, "grad_norm": 1.0,
                                "dataset_loss": {"a": 5.0}, "time_data_s": 0.5, "time_forward_backward_s": 1.0,
                                "time_optimizer_s": 0.25, "time_checkpoint_s": 2.0 if step == 5 else 0.0}) + "\n")
            if step % 5 == 0:
                f.write(json.dumps({"step": step, "val_loss": 6.0 - 0.1 * step,
                                    "val_dataset_loss": {"a": 6.0}}) + "\n")
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    paths = plot(tmp_path, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png", "grad_norm.png", "throughput.png", "time.png"]
    loss_ax, ds_ax = figures[0].axes[:2]
    val_line = [line for line in loss_ax.get_lines() if line.get_label() == "validation"]
    assert len(val_line) == 1 and list(val_line[0].get_xdata()) == [5, 10]
    np.testing.assert_allclose(val_line[0].get_ydata(), [5.5, 5.0])
    assert any(line.get_label() == "validation" for line in ds_ax.get_lines())
    time_ax = figures[3].axes[0]
    # the stacked areas: data, forward-backward, optimizer, checkpoint; the top edge is the sum
    tops = time_ax.collections[-1].get_paths()[0].vertices[:, 1].max()
    assert abs(tops - 3.75) < 1e-9
    assert [t.get_text() for t in time_ax.get_legend().get_texts()] == [
        "waiting for data", "forward-backward", "optimizer", "checkpoint"]
