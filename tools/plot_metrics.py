"""Plot a run's metrics.jsonl: loss (with the validation loss beside it), grad norm, throughput and
where each step's time went (and the MPO terms and rewards of an MPO run) as PNG files.

    python tools/plot_metrics.py RUN_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


MPO_SERIES = [("dpo", "DPO term"), ("bco", "BCO term"), ("sft", "SFT term"),
              ("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin"),
              ("reward_chosen", "chosen reward"), ("reward_rejected", "rejected reward"), ("delta", "BCO delta")]


TIME_PARTS = [("data", "waiting for data"), ("forward_backward", "forward-backward"),
              ("optimizer", "optimizer"), ("checkpoint", "checkpoint")]


def load_all(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The step records and the validation records (`val_loss`)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_metrics: {path} not found: RUN_DIR must be a training run directory")
    records, validation = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            print(f"plot_metrics: skipping malformed line {n} of {path}", file=sys.stderr)
            continue
        if "loss" in rec:
            records.append(rec)
        elif "val_loss" in rec:
            validation.append(rec)
    if not records:
        raise SystemExit(f"plot_metrics: {path} has no step records yet")
    return records, validation


def load(run_dir: Path) -> list[dict]:
    return load_all(run_dir)[0]


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each point and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw(ax, pts: list[tuple[float, float]]) -> None:
    """Raw points faint, their running mean on top: a tiny run's per-step loss is jagged (each
    step sees other images), the trend is what a reader looks for."""
    steps, values = zip(*pts)
    window = max(1, len(values) // 10)
    if window < 3:
        ax.plot(steps, values, marker=".")
        return
    ax.plot(steps, values, marker=".", linestyle="none", alpha=0.35, label="per step")
    ax.plot(steps, running_mean(list(values), window), label=f"running mean of {window}")
    ax.legend(loc="best", fontsize="small")


def plot(run_dir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs, val = load_all(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in recs]
    panels = {
        "loss": [("loss", "loss")] + sorted({(f"dataset_loss.{k}", f"loss [{k}]")
                                             for r in recs for k in r.get("dataset_loss", {})}),
        "grad_norm": [("grad_norm", "grad norm")],
        "throughput": [("tokens_per_s", "tokens/s"), ("tflops_per_gpu", "TFLOP/s per GPU")],
    }
    if any("time_data_s" in r for r in recs):  # where the step's time went
        panels["time"] = [("time", "seconds per step")]
    if any("mpo" in r for r in recs):  # the MPO stage (docs/mpo.md)
        panels["mpo"] = [(f"mpo.{k}", label) for k, label in MPO_SERIES]
    written = []
    for name, series in panels.items():
        fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), squeeze=False)
        for ax, (key, label) in zip(axes[:, 0], series):
            if key.startswith("mpo."):
                pts = [(r["step"], r["mpo"][key[4:]]) for r in recs if key[4:] in r.get("mpo", {})]
            elif key.startswith("dataset_loss."):
                ds = key.split(".", 1)[1]
                pts = [(r["step"], r["dataset_loss"][ds]) for r in recs if ds in r.get("dataset_loss", {})]
            elif key == "time":
                pts = []
                stacked = [[r.get(f"time_{k}_s") or 0.0 for r in recs] for k, _ in TIME_PARTS]
                ax.stackplot(steps, *stacked, labels=[label for _, label in TIME_PARTS], alpha=0.8)
                ax.legend(loc="upper left", fontsize="small")
            else:
                pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                draw(ax, pts)
            vkey = "val_loss" if key == "loss" else key.split(".", 1)[1] if key.startswith("dataset_loss.") else None
            vpts = [(v["step"], v["val_loss"] if vkey == "val_loss" else v["val_dataset_loss"].get(vkey))
                    for v in val] if vkey else []
            vpts = [(x, y) for x, y in vpts if y is not None]
            if vpts:
                ax.plot(*zip(*vpts), marker="o", color="tab:red", label="validation")
                ax.legend(loc="best", fontsize="small")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{run_dir.name}: {name} (steps {steps[0]}-{steps[-1]})")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    for path in plot(args.run_dir, args.out or args.run_dir / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
