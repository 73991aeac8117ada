"""Data-pipeline benchmarks; results go to bench/results/data_pipeline.{md,json}.

Each benchmark is a *section*: a function ``(args) -> dict`` with keys ``title``, ``markdown``
and ``results`` (JSON-able), listed in ``SECTIONS``. ``main()`` runs the selected sections and
merges them into the result files by name, so one section can be re-run without losing the
others. To add one (e.g. packing), write ``bench_packing(args)`` here or in
``bench/data_pipeline_packing.py`` (picked up automatically if present) and add it to
``SECTIONS``.

    python bench/data_pipeline.py                      # all sections
    python bench/data_pipeline.py --sections decode --min-time 1 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from typing import Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_info() -> dict:
    """What the numbers were measured on; CPU-time throughput still depends on the CPU model."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": model,
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    for mod in ("torch", "PIL", "nvidia.dali", "av"):
        try:
            info[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            info[mod] = None
    return info


# --- tile decoding --------------------------------------------------------------------------


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"the decode benchmark needs {package} for its sample photos")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def decode_inputs(tmpdir: str) -> list[tuple[str, bytes]]:
    """The three photos shipped in matplotlib / scikit-learn, plus each resized to common camera
    and screen sizes and saved as JPEG (quality 90), so that throughput is seen per input size."""
    from PIL import Image

    photos = {
        "grace_hopper": _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
        "china": _package_file("sklearn", "datasets", "images", "china.jpg"),
        "flower": _package_file("sklearn", "datasets", "images", "flower.jpg"),
    }
    inputs = []
    for name, path in photos.items():
        with open(path, "rb") as f:
            data = f.read()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs.append((f"{name} {image.width}x{image.height}", data))
        for w, h in ((640, 480), (1920, 1080), (3000, 2000)):
            out = os.path.join(tmpdir, f"{name}_{w}x{h}.jpg")
            image.resize((w, h), Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
            with open(out, "rb") as f:
                inputs.append((f"{name} {w}x{h}", f.read()))
    return inputs


def _measure(fn: Callable[[], int], seconds: float) -> tuple[int, int, float, float]:
    """Call ``fn`` (returns tiles made) at least once and until ``seconds`` of wall time pass."""
    tiles = calls = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while calls == 0 or time.perf_counter() - wall0 < seconds:
        tiles += fn()
        calls += 1
    return tiles, calls, time.process_time() - cpu0, time.perf_counter() - wall0


def _summarise(samples: list[tuple[int, int, float, float]]) -> dict:
    rounds = sorted(samples, key=lambda x: x[0] / x[2])  # by tiles per CPU-second
    tiles, calls, cpu, _ = rounds[len(rounds) // 2]
    return {
        "rounds": len(samples),
        "calls": sum(n for _, n, _, _ in samples),
        "tiles_per_cpu_s": round(tiles / cpu, 2),
        "tiles_per_cpu_s_min": round(rounds[0][0] / rounds[0][2], 2),
        "tiles_per_cpu_s_max": round(rounds[-1][0] / rounds[-1][2], 2),
        "ms_per_image_cpu": round(1000 * cpu / calls, 2),
        "tiles_per_wall_s": round(sum(x[0] for x in samples) / sum(x[3] for x in samples), 2),
    }


def bench_decode(args) -> dict:
    """Tiles/s per CPU core for the PIL and DALI (CPU) backends, with and without the JPEG
    augmentation, and the DALI-vs-PIL difference on each input.

    Throughput is tiles per CPU-second of this process (all its threads): the per-core figure,
    which stays meaningful on a shared machine. The cells of one input are measured in
    interleaved rounds and the median round is reported, so a burst of load elsewhere hits all
    backends alike instead of one.
    """
    import numpy as np
    import torch

    from megatron_internvl.data.images import PILDecoder, load_image_tiles, read_image_source

    torch.set_num_threads(1)  # one core per decoder, as in a data-loader worker
    decoders = {"pil": PILDecoder()}
    try:
        from megatron_internvl.data.images import DALIDecoder

        decoders["dali"] = DALIDecoder(device="cpu", num_threads=1)
    except ModuleNotFoundError as e:
        print(f"skipping DALI: {e}", file=sys.stderr)

    kw = dict(max_tiles=args.max_tiles, min_tiles=1, image_size=448, use_thumbnail=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        inputs = decode_inputs(tmpdir)
        for name, data in inputs:
            row = {"input": name, "bytes": len(data)}
            cells = {}
            for backend, decoder in decoders.items():
                for key, augment in ((backend, False), (backend + "_jpeg_aug", True)):
                    seeds = itertools.count(1)  # a fresh generator per call, as per sample

                    def run(decoder=decoder, augment=augment, seeds=seeds):
                        rng = np.random.default_rng(next(seeds)) if augment else None
                        x = load_image_tiles(
                            data, jpeg_augment=augment, rng=rng, backend=decoder, **kw
                        )
                        return int(x.shape[0])

                    cells[key] = run
            samples = {key: [] for key in cells}
            for fn in cells.values():
                fn()  # warm-up: pipeline build, first-touch allocations
            for _ in range(args.rounds):
                for key, fn in cells.items():
                    samples[key].append(_measure(fn, args.min_time / args.rounds))
            for key in cells:
                row[key] = _summarise(samples[key])

            outputs = {b: load_image_tiles(data, backend=d, **kw) for b, d in decoders.items()}
            row["tiles_per_image"] = int(outputs["pil"].shape[0])
            if "dali" in outputs:
                d = (outputs["pil"] - outputs["dali"]).abs()
                raw, source = read_image_source(data)
                u8 = np.abs(
                    decoders["pil"].tiles(raw, source, **_tile_kw(kw)).astype(int)
                    - decoders["dali"].tiles(raw, source, **_tile_kw(kw)).astype(int)
                )
                row["dali_vs_pil"] = {
                    "max_abs_normalised": round(d.max().item(), 4),
                    "mean_abs_normalised": round(d.mean().item(), 5),
                    "max_abs_uint8": int(u8.max()),
                    "mean_abs_uint8": round(float(u8.mean()), 4),
                    "frac_uint8_over_2": round(float((u8 > 2).mean()), 6),
                }
            rows.append(row)
            print(_row_line(row), file=sys.stderr)

    backends = list(decoders)
    totals = {}
    for key in cells:
        # all inputs together: total tiles over total CPU time, from the median rounds
        tiles = sum(r["tiles_per_image"] for r in rows)
        cpu = sum(r["tiles_per_image"] / r[key]["tiles_per_cpu_s"] for r in rows)
        totals[key] = round(tiles / cpu, 2)
    return {
        "title": "Tile decoding (images -> normalised 448px tiles)",
        "markdown": _decode_markdown(rows, backends, totals, args),
        "results": {"max_tiles": args.max_tiles, "rows": rows, "tiles_per_cpu_s_all_inputs": totals},
    }


def _tile_kw(kw: dict) -> dict:
    return {k: kw[k] for k in ("min_tiles", "max_tiles", "image_size", "use_thumbnail")}


def _row_line(row: dict) -> str:
    parts = [f"{row['input']:<24}"]
    for key in ("pil", "dali", "pil_jpeg_aug", "dali_jpeg_aug"):
        if key in row:
            parts.append(f"{key} {row[key]['tiles_per_cpu_s']:7.1f} t/cpu-s")
    return "  ".join(parts)


def _decode_markdown(rows, backends, totals, args) -> str:
    out = [
        "Method: `load_image_tiles(bytes, max_tiles="
        f"{args.max_tiles}, image_size=448, use_thumbnail=True)` from encoded bytes in memory "
        "(decode, grid resize, thumbnail, crop, ImageNet normalisation to float32), one thread "
        "(`torch.set_num_threads(1)`, DALI `num_threads=1`, CPU pipeline). Each cell: one "
        f"warm-up call, then {args.rounds} rounds interleaving all cells of the input, each cell "
        f"timed for {args.min_time / args.rounds:.2f} s per round; the median round is shown "
        "(min-max of the rounds in the JSON). Throughput is tiles per CPU-second of the process "
        "(all threads), i.e. per core, which stays meaningful on a shared machine. "
        "`+jpeg` adds the per-tile JPEG re-compression "
        "(quality drawn from [75, 100]). Inputs: the three sample photos and each resized with "
        "Pillow and saved as JPEG quality 90.",
        "",
    ]
    head = ["input", "tiles"]
    for b in backends:
        head += [f"{b} tiles/s", f"{b} ms/img", f"{b}+jpeg tiles/s"]
    if "dali" in backends:
        head += ["DALI-PIL max / mean (normalised)", "uint8 max / mean"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in rows:
        cells = [r["input"], str(r["tiles_per_image"])]
        for b in backends:
            cells += [
                f"{r[b]['tiles_per_cpu_s']:.1f}",
                f"{r[b]['ms_per_image_cpu']:.1f}",
                f"{r[b + '_jpeg_aug']['tiles_per_cpu_s']:.1f}",
            ]
        if "dali_vs_pil" in r:
            d = r["dali_vs_pil"]
            cells += [
                f"{d['max_abs_normalised']:.3f} / {d['mean_abs_normalised']:.4f}",
                f"{d['max_abs_uint8']} / {d['mean_abs_uint8']:.3f}",
            ]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    summary = ", ".join(
        f"{b} {totals[b]:.1f} (+jpeg {totals[b + '_jpeg_aug']:.1f})" for b in backends
    )
    out.append(f"All inputs together, tiles per CPU-second: {summary}.")
    return "\n".join(out)


# --- sections -------------------------------------------------------------------------------

# name -> function(args) returning {"title", "markdown", "results"}; main() runs them in order.
SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {"decode": bench_decode}

try:  # the packing benchmark lives in its own file when there is one
    from data_pipeline_packing import bench_packing  # type: ignore[import-not-found]

    SECTIONS["packing"] = bench_packing
except ImportError:
    pass


def _write(results: dict) -> None:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "data_pipeline.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    m = results["machine"]
    lines = [
        "# Data pipeline benchmarks",
        "",
        f"Generated by `python bench/data_pipeline.py` on {m['date']}: {m['cpu_model']}, "
        f"{m['cpus_usable']} usable cores ({m['cpus_online']} online), load average at start "
        f"{m['load_average_at_start']}; Python {m['python']}, torch {m['torch']}, Pillow "
        f"{m['PIL']}, DALI {m['nvidia.dali']}, PyAV {m['av']}.",
        "",
    ]
    for name, section in results["sections"].items():
        lines += [f"## {section['title']}", "", section["markdown"], ""]
        if section.get("machine") and section["machine"] != m:
            sm = section["machine"]
            lines += [f"(This section was measured on {sm['date']}, {sm['cpu_model']}.)", ""]
    with open(os.path.join(RESULTS_DIR, "data_pipeline.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from: {', '.join(SECTIONS)}")
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument("--min-time", type=float, default=2.5,
                        help="seconds of measurement per cell, split over the rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; available: {list(SECTIONS)}")

    path = os.path.join(RESULTS_DIR, "data_pipeline.json")
    results = {"machine": None, "sections": {}}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    machine = machine_info()
    for name in chosen:
        section = SECTIONS[name](args)
        section["machine"] = machine
        results["sections"][name] = section
    results["machine"] = machine
    _write(results)
    print(f"wrote {os.path.join(RESULTS_DIR, 'data_pipeline.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
