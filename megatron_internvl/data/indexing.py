"""Building the sample index (data/index.py): one metadata pass, parallel and shardable.

    megatron-internvl index-data --meta META.json --tokenizer DIR --out INDEX [--workers N]
        [--shard K/N] [--max-tokens ... --max-tiles ... the data settings the numbers depend on]

Work is cut into chunks of `--chunk-mb` bytes of an annotation file; a chunk holds the lines that
start in its byte range, so no process reads a whole file to find line boundaries. A chunk's rows
are built by the same `SampleBuilder` the planner's header-only pass uses (templating,
tokenization, image headers, container metadata of videos), in `--workers` processes. With
`--shard K/N` a process does every N-th chunk starting at K (a Slurm array over nodes) and leaves
its chunks under the part's folder; a run without `--shard` does whatever chunk is still missing,
merges the chunks of each file into its part and writes `index.json`. Parts whose key (settings,
file path, size and modification time) is already complete are reused as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Optional

import numpy as np

from megatron_internvl.config.data import DataConfig, DatasetSpec

from .index import (
    INDEX_VERSION,
    KINDS,
    LINE_COLUMNS,
    PIECE_COLUMNS,
    SampleIndexError,
    dataset_settings,
    file_identity,
    fingerprint,
    part_key,
)
from .media import HeaderOnlyMedia
from .samples import SKIP_REASONS, SampleBuilder, Skip
from .sources import all_specs, parse_record
from .templates import IGNORE_INDEX
from .tokenizer import load_tokenizer

logger = logging.getLogger("megatron_internvl.data")

CHUNK_BYTES = 16 << 20


class _AnnotationPath:
    """What `SampleBuilder` needs of a file when the line is handed to it: the path for skips."""

    def __init__(self, path: str):
        self.path = path


def _kind(spec: DatasetSpec, raw: bytes) -> int:
    if spec.kind == "text":
        return KINDS.index("corpus")
    if spec.kind == "pretrain":
        return KINDS.index("interleaved")
    try:
        rec = parse_record(raw)
    except (ValueError, UnicodeDecodeError):
        return KINDS.index("unknown")
    if rec.get("video"):
        return KINDS.index("video")
    img = rec.get("image")
    n = 0 if not img else (1 if isinstance(img, str) else len(img) if isinstance(img, list) else 0)
    return KINDS.index("text" if n == 0 else "image" if n == 1 else "multi_image")


def read_chunk_lines(path: str, lo: int, hi: int):
    """(start, end, physical line number within the chunk, raw) of the non-empty lines that start
    in [lo, hi), and the number of physical lines starting there (as `JsonlFile` counts them)."""
    out, n = [], 0
    with open(path, "rb") as f:
        if lo:
            f.seek(lo - 1)
            f.readline()   # the rest of the line that started before lo
        pos = f.tell()
        while pos < hi:
            raw = f.readline()
            if not raw:
                break
            n += 1
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if body and body != b"\r":
                out.append((pos, pos + len(body), n, body))
            pos += len(raw)
    return out, n


class ChunkIndexer:
    """Builds the rows of one chunk (runs in the worker processes)."""

    def __init__(self, cfg: DataConfig, specs: list[DatasetSpec], media: Any):
        self.specs = specs
        self.builder = SampleBuilder(cfg, load_tokenizer(cfg.tokenizer_path), specs,
                                     [_AnnotationPath(s.annotation) for s in specs], media)

    def __call__(self, job: tuple) -> tuple:
        ds, lo, hi, dest = job
        spec = self.specs[ds]
        lines, n_physical = read_chunk_lines(spec.annotation, lo, hi)
        cols = {k: [] for k in (*LINE_COLUMNS, *PIECE_COLUMNS)}
        messages = {}
        n_pieces = 0
        for row, (start, end, line_no, raw) in enumerate(lines):
            res = self.builder.build_line(ds, line_no, raw, 0, 0)
            cols["starts"].append(start)
            cols["ends"].append(end)
            cols["line_no"].append(line_no)
            cols["kind"].append(_kind(spec, raw))
            cols["piece_start"].append(n_pieces)
            if isinstance(res, Skip):
                if res.reason not in SKIP_REASONS:
                    raise RuntimeError(f"skip reason {res.reason!r} is not in SKIP_REASONS")
                cols["skip"].append(SKIP_REASONS.index(res.reason))
                cols["tokens"].append(0)
                cols["tiles"].append(0)
                messages[row] = res.message
                continue
            cols["skip"].append(-1)
            cols["tokens"].append(sum(p.num_tokens for p in res))
            cols["tiles"].append(sum(p.tiles for p in res))
            for p in res:
                cols["piece_tokens"].append(p.num_tokens)
                cols["piece_tiles"].append(p.tiles)
                cols["piece_supervised"].append(int((p.labels != IGNORE_INDEX).sum()))
            n_pieces += len(res)
        arrays = {k: np.asarray(v, dtype={**LINE_COLUMNS, **PIECE_COLUMNS}[k]) for k, v in cols.items()}
        tmp = dest + ".tmp.npz"
        np.savez(tmp, physical_lines=np.int64(n_physical), messages=json.dumps(messages), **arrays)
        os.replace(tmp, dest)
        return len(lines), len(messages)


_worker: Optional[ChunkIndexer] = None


def _init_worker(cfg, specs, media):
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = ChunkIndexer(cfg, specs, media)


def _run_chunk(job):
    return _worker(job)


def _merge(folder: str, n_chunks: int) -> dict:
    """Concatenate a part's chunks into its columns; returns its counts (part.json)."""
    chunks = [np.load(os.path.join(folder, "chunks", f"{c:06d}.npz")) for c in range(n_chunks)]
    lines_before = pieces_before = rows_before = 0
    cols = {k: [] for k in (*LINE_COLUMNS, *PIECE_COLUMNS)}
    messages = {}
    for ch in chunks:
        for k in cols:
            v = ch[k]
            if k == "line_no":
                v = v + lines_before
            elif k == "piece_start":
                v = v + pieces_before
            cols[k].append(v)
        messages.update({str(int(r) + rows_before): m for r, m in json.loads(str(ch["messages"])).items()})
        lines_before += int(ch["physical_lines"])
        pieces_before += int(ch["piece_tokens"].shape[0])
        rows_before += int(ch["starts"].shape[0])
    cols["piece_start"].append(np.asarray([pieces_before], np.int64))
    for k, parts in cols.items():
        np.save(os.path.join(folder, f"{k}.npy"),
                np.concatenate(parts).astype({**LINE_COLUMNS, **PIECE_COLUMNS}[k], copy=False))
    with open(os.path.join(folder, "skips.json"), "w", encoding="utf-8") as f:
        json.dump(messages, f)
    counts = {"lines": rows_before, "pieces": pieces_before, "skipped": len(messages)}
    with open(os.path.join(folder, "part.json.tmp"), "w") as f:
        json.dump(counts, f)
    os.replace(os.path.join(folder, "part.json.tmp"), os.path.join(folder, "part.json"))
    shutil.rmtree(os.path.join(folder, "chunks"))
    return counts


def build_index(cfg: DataConfig, out: str, *, workers: int = 0, shard: tuple[int, int] = (0, 1),
                media: Any = None, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Index the datasets of `cfg` into `out`. With shard (K, N), N > 1: build this shard's
    chunks only; otherwise build what is missing, merge and write index.json. Returns a report."""
    t0 = time.perf_counter()
    specs = all_specs(cfg.datasets, cfg.meta_path)
    for s in specs:
        s.validate()
        if not os.path.isfile(s.annotation):
            raise SampleIndexError(f"annotation file {s.annotation!r} of dataset {s.name!r} does not exist.")
    k, n = shard
    if not (0 <= k < n):
        raise SampleIndexError(f"--shard {k}/{n}: K must be in [0, N)")
    media = media or HeaderOnlyMedia(cfg.image_size, cfg.use_thumbnail, cfg.image_backend, cfg.num_video_frames)
    fp = fingerprint(cfg, load_tokenizer(cfg.tokenizer_path).path)
    entries, jobs, reused = [], [], []
    for ds, spec in enumerate(specs):
        settings, identity = dataset_settings(spec, cfg), file_identity(spec.annotation)
        key = part_key(fp, settings, identity)
        folder = os.path.join(out, "parts", key)
        n_chunks = max(1, -(-identity["size"] // chunk_bytes))
        entries.append({"name": spec.name, "settings": settings, "identity": identity,
                        "part": os.path.join("parts", key), "chunks": n_chunks})
        if os.path.isfile(os.path.join(folder, "part.json")):
            reused.append(spec.name)
            continue
        os.makedirs(os.path.join(folder, "chunks"), exist_ok=True)
        for c in range(n_chunks):
            jobs.append((ds, c * chunk_bytes, (c + 1) * chunk_bytes, os.path.join(folder, "chunks", f"{c:06d}.npz")))
    mine = [j for m, j in enumerate(jobs) if m % n == k and not os.path.isfile(j[3])]
    lines = skipped = 0
    if workers > 0 and len(mine) > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(workers, len(mine)), initializer=_init_worker, initargs=(cfg, specs, media)) as pool:
            for a, b in pool.imap_unordered(_run_chunk, mine):
                lines, skipped = lines + a, skipped + b
    elif mine:
        one = ChunkIndexer(cfg, specs, media)
        for job in mine:
            a, b = one(job)
            lines, skipped = lines + a, skipped + b
    report = {"out": out, "shard": f"{k}/{n}", "chunks_built": len(mine), "lines_indexed": lines,
              "lines_skipped": skipped, "datasets_reused": reused}
    if n > 1:
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return report
    datasets = []
    for e in entries:
        folder = os.path.join(out, e["part"])
        done = os.path.join(folder, "part.json")
        if not os.path.isfile(done):
            _merge(folder, e["chunks"])
        with open(done) as f:
            counts = json.load(f)
        datasets.append({**{x: e[x] for x in ("name", "settings", "identity", "part")}, **counts})
    keep = {os.path.basename(e["part"]) for e in entries}
    for old in os.listdir(os.path.join(out, "parts")):
        if old not in keep:   # parts of files since changed (or of other settings)
            shutil.rmtree(os.path.join(out, "parts", old))
    tmp = os.path.join(out, "index.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": INDEX_VERSION, "fingerprint": fp, "datasets": datasets}, f, indent=1)
    os.replace(tmp, os.path.join(out, "index.json"))
    report.update(lines=sum(d["lines"] for d in datasets), pieces=sum(d["pieces"] for d in datasets),
                  skipped=sum(d["skipped"] for d in datasets), seconds=round(time.perf_counter() - t0, 3))
    return report


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected K/N, e.g. 0/16") from None
    if not (n >= 1 and 0 <= k < n):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: K must be in [0, N)")
    return k, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="megatron-internvl index-data",
        description="Build the offline sample index of a meta file (docs/data.md, 'The sample index'): "
        "per annotation line its offsets, kind, tokens, tiles, pieces and skip reason. Give the same "
        "data settings as the training recipe (a mismatch is refused at start-up, naming the field).")
    p.add_argument("--meta", required=True, help="InternVL meta JSON")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, sentencepiece .model, or a folder")
    p.add_argument("--out", required=True, help="index folder (data.index_path)")
    p.add_argument("--workers", type=int, default=0, help="processes (0: this one)")
    p.add_argument("--shard", type=_shard, default=(0, 1),
                   help="K/N: build every N-th chunk from K, no merge; then run once without --shard")
    p.add_argument("--chunk-mb", type=float, default=CHUNK_BYTES / (1 << 20), help="MiB of annotation per chunk")
    d = DataConfig()
    p.add_argument("--template", default=d.template)
    p.add_argument("--system-message", default=None)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--num-image-token", type=int, default=d.num_image_token, help="LLM tokens per tile")
    p.add_argument("--max-dynamic-patch", type=int, default=d.max_dynamic_patch)
    p.add_argument("--min-dynamic-patch", type=int, default=d.min_dynamic_patch)
    p.add_argument("--no-thumbnail", action="store_true")
    p.add_argument("--num-video-frames", type=int, default=d.num_video_frames)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="l_max, LLM tokens per pack")
    p.add_argument("--max-tiles", type=int, default=d.max_tiles, help="t_max, ViT tiles per pack")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cfg = DataConfig(meta_path=args.meta, tokenizer_path=args.tokenizer, template=args.template,
                     system_message=args.system_message, image_size=args.image_size,
                     num_image_token=args.num_image_token, max_dynamic_patch=args.max_dynamic_patch,
                     min_dynamic_patch=args.min_dynamic_patch, use_thumbnail=not args.no_thumbnail,
                     num_video_frames=args.num_video_frames, max_tokens=args.max_tokens,
                     max_tiles=args.max_tiles, pad_to_multiple=1)
    try:
        cfg.validate()
    except SampleIndexError:
        raise
    except ValueError as e:   # a setting out of range: one line, like the other input errors
        raise SampleIndexError(str(e)) from None
    report = build_index(cfg, args.out, workers=args.workers, shard=args.shard,
                         chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))))
    print(json.dumps(report, sort_keys=True))
    return 0
