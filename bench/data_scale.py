"""The data path at cluster scale: one data reader's cost per step at DP 8, 64 and 512, the planned
loader's metadata pass (today) against the offline sample index (data/index.py), in the same run.

A synthetic mixture of real annotation lines (default 1M: captions with one image, multi-image
chats, text chats, interleaved documents, a text corpus; 16 JPEGs reused) is written and indexed
with `build_index` (the `index-data` command's function). Then, for each DP size, one reader
(DP rank 0 of DP; every reader does the same planning work, so one stands for all) runs the
planned loader with `micro` packs per rank per step (G = DP x micro packs per step) and reports:

- start-up: building the loader until it can plan (annotation offsets, order, index checks);
- per step, CPU time of the reader (one process, `num_workers=0`, so everything is counted)
  split into `metadata` (the samples of the global batch: templating + tokenization + image
  headers today; index rows with the index), `decode` (its own packs: pixels, the same in both)
  and `plan`, the rest of the step (forming the G packs, their costs, dealing them, the step's
  statistics: the same in both);
- files opened per step (every `open`, PIL's image opens included);
- bytes per tile from worker to rank (the pixel tensor of a micro-batch / its tiles).

The first step (which fills the planner's look-ahead pool) is reported apart; per-step figures
are the mean over the next `--steps` steps.

    python bench/data_scale.py [--samples 1000000] [--dp 8 64 512] [--micro 2] [--steps 2]
        [--workers 2] [--work /tmp/data_scale] [--out bench/results/data_scale]
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "tiny"))

from megatron_internvl.config.data import DataConfig  # noqa: E402
from megatron_internvl.data import planned  # noqa: E402
from megatron_internvl.data.build import build_data_loader  # noqa: E402
from megatron_internvl.data.indexing import build_index  # noqa: E402

WORDS = ("the a image picture shows person people street building car dog cat tree sky water "
         "table chart graph number value answer question what where how many color red blue green "
         "left right top bottom text sign written document page figure shown above below between "
         "large small old new two three four five year total increase decrease compared").split()
# (aspect w, h) x scale: 1 to 6 tiles at 448 px with max_dynamic_patch 6
IMAGE_SIZES = [(448, 448), (640, 480), (800, 600), (1024, 768), (480, 640), (896, 448), (1280, 720),
               (720, 1280), (1024, 1024), (600, 400), (1344, 448), (448, 896), (960, 540), (512, 384),
               (1200, 900), (900, 1200)]
MIX = {"caption": 0.45, "multi": 0.05, "chat": 0.35, "interleaved": 0.05, "corpus": 0.10}
SETTINGS = dict(image_size=448, num_image_token=256, max_dynamic_patch=6, max_tokens=8192, max_tiles=24,
                pad_to_multiple=16, template="internvl2_5", pack_buffer_size=64, num_workers=0, seed=11,
                max_skip_ratio=1.0)


def make_mixture(work: Path, n: int, seed: int = 0) -> Path:
    """Annotation lines of every kind (real JSON, random text), images reused; returns meta.json."""
    from PIL import Image
    from make_dataset import train_tokenizer   # the quick start's BPE tokenizer (examples/tiny)

    meta = work / "meta.json"
    if meta.is_file():
        return meta
    rng = np.random.default_rng(seed)
    (work / "images").mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate(IMAGE_SIZES):
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] + np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
        px = (x + rng.integers(0, 40, (h, w, 3))).astype(np.uint8) % 255
        Image.fromarray(px).save(work / "images" / f"im{k}.jpg", quality=90)
    train_tokenizer(work)
    words = np.array(WORDS)

    def text(lo, hi):
        return " ".join(words[rng.integers(0, len(words), int(rng.integers(lo, hi)))])

    counts = {k: int(round(n * p)) for k, p in MIX.items()}
    counts["caption"] += n - sum(counts.values())
    (work / "ann").mkdir(exist_ok=True)
    for name, count in counts.items():
        with open(work / "ann" / f"{name}.jsonl", "w") as f:
            for _ in range(count):
                img = lambda: f"im{rng.integers(len(IMAGE_SIZES))}.jpg"  # noqa: E731
                if name == "caption":
                    rec = {"image": img(), "conversations": [
                        {"from": "human", "value": "<image>\n" + text(4, 16)}, {"from": "gpt", "value": text(8, 80)}]}
                elif name == "multi":
                    k = int(rng.integers(2, 4))
                    rec = {"image": [img() for _ in range(k)], "conversations": [
                        {"from": "human", "value": "".join(f"Image-{i + 1}: <image>\n" for i in range(k)) + text(4, 12)},
                        {"from": "gpt", "value": text(10, 60)}]}
                elif name == "chat":
                    turns = []
                    for _ in range(int(rng.integers(1, 4))):
                        turns += [{"from": "human", "value": text(4, 30)}, {"from": "gpt", "value": text(10, 120)}]
                    rec = {"conversations": turns}
                elif name == "interleaved":
                    rec = {"image": [img(), img()], "text": f"{text(20, 80)} <image> {text(40, 160)} <image> {text(10, 60)}"}
                else:
                    rec = {"text": text(50, 400)}
                f.write(json.dumps(rec) + "\n")
    entries = {
        "caption": {"root": "images", "annotation": "ann/caption.jsonl"},
        "multi": {"root": "images", "annotation": "ann/multi.jsonl"},
        "chat": {"annotation": "ann/chat.jsonl"},
        "interleaved": {"root": "images", "annotation": "ann/interleaved.jsonl", "kind": "pretrain"},
        "corpus": {"annotation": "ann/corpus.jsonl", "kind": "text"},
    }
    meta.write_text(json.dumps(entries, indent=1))
    return meta


def index_mixture(cfg: DataConfig, work: Path, workers: int) -> tuple[dict, float]:
    """`build_index` over the mixture; its wall time is kept in the work folder, so a later run
    that finds the index complete (nothing rebuilt) reports the time of the build it reuses."""
    record = work / "index_build.json"
    t = time.perf_counter()
    report = build_index(cfg, str(work / "index"), workers=workers)
    index_s = time.perf_counter() - t
    if report["chunks_built"]:
        record.write_text(json.dumps({"index_s": index_s, "workers": workers}))
    elif record.is_file():
        saved = json.loads(record.read_text())
        report = {**report, "reused": True, "reused_open_s": index_s, "workers": saved["workers"]}
        index_s = saved["index_s"]
    return report, index_s


class OpenCounter:
    """Counts every builtins.open (PIL opens image files through it) while active."""

    def __init__(self):
        self.n, self._open = 0, builtins.open

    def __enter__(self):
        def counting(*a, **k):
            self.n += 1
            return self._open(*a, **k)

        builtins.open = counting
        return self

    def __exit__(self, *exc):
        builtins.open = self._open


def measure_reader(cfg: DataConfig, dp: int, micro: int, steps: int) -> dict:
    t0w, t0c = time.perf_counter(), time.process_time()
    with OpenCounter() as opened:
        loader = build_data_loader(cfg, dp_rank=0, dp_size=dp, packs_per_step=dp * micro)
        loader.order.locate(0)   # the first epoch's order: part of being ready to plan
    startup = {"wall_s": time.perf_counter() - t0w, "cpu_s": time.process_time() - t0c, "files_opened": opened.n}

    # CPU time of the metadata reads (a sample at a time today; the global batch's index rows at
    # once with the index) and of decoding this reader's own packs; planning is the rest of the
    # step: forming the G packs, their costs, dealing them, the step's statistics.
    cpu = {"metadata": 0.0, "decode": 0.0}

    def timed(fn, part):
        def call(*a):
            t = time.process_time()
            try:
                return fn(*a)
            finally:
                cpu[part] += time.process_time() - t
        return call

    loader._read_sample = timed(loader._read_sample, "metadata")
    if hasattr(loader, "_read_units"):
        loader._read_units = timed(loader._read_units, "metadata")
    getitem = planned._PackBuilder.__getitem__
    planned._PackBuilder.__getitem__ = timed(getitem, "decode")
    rows, bytes_per_tile, dtype = [], None, None
    try:
        for s in range(steps + 1):
            cpu.update(metadata=0.0, decode=0.0)
            c0 = time.process_time()
            with OpenCounter() as opened:
                for _ in range(micro):
                    b = next(loader)
                    px = b["pixel_values"]
                    if px.shape[0]:
                        bytes_per_tile, dtype = px.element_size() * px[0].numel(), str(px.dtype)
            total = time.process_time() - c0
            rows.append({"cpu_s": total, "metadata_s": cpu["metadata"],
                         "plan_s": total - cpu["metadata"] - cpu["decode"], "decode_s": cpu["decode"],
                         "files_opened": opened.n, "samples_read": loader.skips.seen})
    finally:
        planned._PackBuilder.__getitem__ = getitem
    first, rest = rows[0], rows[1:]
    mean = {k: float(np.mean([r[k] for r in rest])) for k in ("cpu_s", "metadata_s", "plan_s", "decode_s", "files_opened")}
    mean["samples_per_step"] = (rest[-1]["samples_read"] - first["samples_read"]) / len(rest)
    return {"startup": startup, "first_step": first, "per_step": mean, "bytes_per_tile": bytes_per_tile,
            "pixel_dtype": dtype}


def startup_at_scale(work: Path, cfg: DataConfig, copies: int) -> dict:
    """Start-up over `copies` x the mixture's lines (each annotation file repeated): today's loader
    for real (it scans the files); the indexed reader's start-up is, whatever the line count,
    opening the index (index.json, tokenizer hash, a stat and memory maps per file) plus the
    epoch order over all lines: both measured here, the first on the mixture's own index."""
    from megatron_internvl.data.index import SampleIndex
    from megatron_internvl.data.order import GlobalOrder
    from megatron_internvl.data.sources import all_specs
    from megatron_internvl.data.tokenizer import load_tokenizer

    big = work / f"x{copies}"
    (big / "ann").mkdir(parents=True, exist_ok=True)
    meta = json.loads((work / "meta.json").read_text())
    for name, e in meta.items():
        src = work / e["annotation"]
        with open(big / "ann" / src.name, "wb") as f:
            for _ in range(copies):
                f.write(src.read_bytes())
        e["annotation"] = f"ann/{src.name}"
        if "root" in e:
            e["root"] = str(work / e["root"])
    (big / "meta.json").write_text(json.dumps(meta))
    today_cfg = DataConfig(**{**cfg.__dict__, "meta_path": str(big / "meta.json")})
    t = time.perf_counter()
    loader = build_data_loader(today_cfg, dp_rank=0, dp_size=8, packs_per_step=16)
    loader.order.locate(0)
    today = time.perf_counter() - t
    lines = loader.order.samples_per_epoch
    specs = all_specs(cfg.datasets, cfg.meta_path)
    t = time.perf_counter()
    index = SampleIndex.open(str(work / "index"), cfg, specs, load_tokenizer(cfg.tokenizer_path).path)
    index.jsonl_files(specs)
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    GlobalOrder(specs, [len(p) * copies for p in index.parts], cfg.seed, cfg.text_weight).locate(0)
    order_s = time.perf_counter() - t
    return {"lines": lines, "today_s": today, "index_open_s": open_s, "order_s": order_s,
            "indexed_s": open_s + order_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--dp", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--micro", type=int, default=2, help="packs per rank per step")
    p.add_argument("--steps", type=int, default=2, help="measured steps after the first")
    p.add_argument("--workers", type=int, default=2, help="index-data processes")
    p.add_argument("--max-tokens", type=int, default=SETTINGS["max_tokens"])
    p.add_argument("--max-tiles", type=int, default=SETTINGS["max_tiles"])
    p.add_argument("--work", default="/tmp/data_scale")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--startup-copies", type=int, default=0,
                   help="also time start-up over this many copies of the mixture's lines")
    args = p.parse_args(argv)

    work = Path(args.work) / str(args.samples)
    t = time.perf_counter()
    meta = make_mixture(work, args.samples)
    made_s = time.perf_counter() - t
    settings = {**SETTINGS, "max_tokens": args.max_tokens, "max_tiles": args.max_tiles}
    cfg = DataConfig(meta_path=str(meta), tokenizer_path=str(work / "tokenizer.json"), **settings)
    report, index_s = index_mixture(cfg, work, args.workers)
    print(f"mixture {made_s:.1f} s, index {index_s:.1f} s ({report['lines']} lines, {report['skipped']} skipped, "
          f"{report['chunks_built']} chunks built{', reused' if report.get('reused') else ''})", flush=True)
    indexed = DataConfig(**{**cfg.__dict__, "index_path": str(work / "index")})
    results = []
    for dp in args.dp:
        for name, c in (("today", cfg), ("indexed", indexed)):
            r = measure_reader(c, dp, args.micro, args.steps)
            r.update(dp=dp, loader=name)
            results.append(r)
            ps = r["per_step"]
            print(f"DP={dp:4d} {name:8s} start-up {r['startup']['wall_s']:6.2f} s | per step cpu {ps['cpu_s']:.3f} s "
                  f"(metadata {ps['metadata_s']:.3f}, plan {ps['plan_s']:.3f}, decode {ps['decode_s']:.3f}), "
                  f"{ps['files_opened']:.0f} files, {ps['samples_per_step']:.0f} samples", flush=True)
    scale = startup_at_scale(work, cfg, args.startup_copies) if args.startup_copies > 1 else None
    if scale:
        print(f"start-up at {scale['lines']} lines: today {scale['today_s']:.2f} s, indexed "
              f"{scale['indexed_s']:.2f} s (index {scale['index_open_s']:.2f} + order {scale['order_s']:.2f})", flush=True)
    out = {"samples": args.samples, "startup_at_scale": scale, "dp": args.dp, "micro": args.micro, "steps": args.steps,
           "settings": settings, "mixture": MIX, "mixture_s": made_s, "index_s": index_s,
           "index_workers": args.workers, "index": report, "results": results,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_avg_end": os.getloadavg()[0]}}
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=1))
        Path(args.out).with_suffix(".md").write_text(render(out))
    return 0


def render(out: dict) -> str:
    by = {(r["dp"], r["loader"]): r for r in out["results"]}
    sc = out.get("startup_at_scale")
    startup_flag = f" --startup-copies {sc['lines'] // out['samples']}" if sc else ""
    lines = [
        "# The data path at cluster scale: one reader's cost per step",
        "",
        f"`python bench/data_scale.py --samples {out['samples']} --micro {out['micro']} --steps {out['steps']}"
        f"{startup_flag}`; "
        f"{out['samples']:,} annotation lines ({', '.join(f'{k} {v:.0%}' for k, v in out['mixture'].items())}), "
        f"16 JPEGs reused; packs of {out['settings']['max_tokens']} tokens / {out['settings']['max_tiles']} tiles, "
        f"448 px tiles, {out['micro']} packs per rank per step (G = DP x {out['micro']}). Index built in "
        f"{out['index_s']:.0f} s with {out['index'].get('workers', out['index_workers'])} processes"
        f"{' (an earlier run of the same command; reused here)' if out['index'].get('reused') else ''}. "
        f"One process per reader "
        f"(`num_workers=0`), CPU time; load average {out['machine']['load_avg_end']:.1f} at the end on "
        f"{out['machine']['cpus']} cores (other jobs ran).",
        "",
        "| DP | loader | start-up s | samples/step | metadata s | plan s | decode s | CPU s/step | files/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dp in out["dp"]:
        for name in ("today", "indexed"):
            r = by[(dp, name)]
            ps = r["per_step"]
            lines.append(f"| {dp} | {name} | {r['startup']['wall_s']:.2f} | {ps['samples_per_step']:.0f} | "
                         f"{ps['metadata_s']:.3f} | {ps['plan_s']:.3f} | {ps['decode_s']:.3f} | {ps['cpu_s']:.3f} | "
                         f"{ps['files_opened']:.0f} |")
    lines += ["", "| DP | metadata today / indexed | metadata + plan today / indexed | step CPU today / indexed | files today / indexed |",
              "|---|---|---|---|---|"]
    for dp in out["dp"]:
        a, b = by[(dp, "today")]["per_step"], by[(dp, "indexed")]["per_step"]
        lines.append(f"| {dp} | {a['metadata_s'] / max(b['metadata_s'], 1e-9):.0f}x | "
                     f"{(a['metadata_s'] + a['plan_s']) / max(b['metadata_s'] + b['plan_s'], 1e-9):.1f}x | "
                     f"{a['cpu_s'] / max(b['cpu_s'], 1e-9):.1f}x | {a['files_opened']:.0f} / {b['files_opened']:.0f} |")
    if sc:
        lines += ["", f"Start-up at {sc['lines']:,} lines (each annotation file repeated): today's loader "
                  f"{sc['today_s']:.2f} s (scanning the files for line offsets, the epoch order); indexed "
                  f"{sc['indexed_s']:.2f} s = opening the index {sc['index_open_s']:.2f} s (index.json, tokenizer "
                  f"hash, a stat and memory maps per file: independent of the line count) + the epoch order over "
                  f"all lines {sc['order_s']:.2f} s."]
    r = out["results"][0]
    lines += ["", f"Bytes per tile from worker to rank: {r['bytes_per_tile']:,} ({r['pixel_dtype']}); float32 tiles "
              f"would be {3 * 448 * 448 * 4:,}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
