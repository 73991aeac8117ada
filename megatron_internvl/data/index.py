"""The offline sample index: per annotation line, what the planner needs, read without the line.

`megatron-internvl index-data` (data/indexing.py) runs the metadata pass once, offline: every
line is templated, tokenized and its images' headers read exactly as the planner's header-only
pass would, and the numbers are written as columns (numpy `.npy` files, memory-mapped on load).
A training reader then plans each step from the index rows of its global batch: small integers,
no tokenization, no media file opened, and no annotation file scanned for its line offsets.

On disk, `INDEX/index.json` names one part per dataset, `INDEX/parts/<key>/`, whose key hashes
everything its numbers depend on: the global fingerprint (below), the dataset's own settings and
the annotation file's path, size and modification time. Re-indexing after one file changed redoes
that file's part only. A part holds, per non-empty line (rows in file order):

    starts, ends, line_no   int64   byte range of the line (no newline) and its 1-based number
    kind                    int8    KINDS
    skip                    int8    -1, or the SKIP_REASONS position of a line the builder skips
    tokens, tiles           int32   the line's tokens after templating and truncation, its tiles
    piece_start             int64   [rows + 1]: the line's pieces are piece_start[r]:piece_start[r+1]
    piece_tokens, piece_tiles, piece_supervised
                            int32   per piece: LLM tokens (its one sequence length), ViT tiles and
                                    supervised tokens (labels not ignored, after the shift)

and `skips.json` (row -> message of each skipped line) and `part.json` (counts; written last).

The global fingerprint holds the tokenizer files' hashes, the default template, the system
message, the tiling settings (image size, thumbnail, dynamic patch range, video frames), tokens
per tile and the packing budgets. A stale or mismatched index is refused naming what differs.
Image files are not checked (their headers were read once); a sample whose decoded tile count
disagrees with the index is left out of its pack at decode and counted (`metadata_mismatch`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_internvl.config.data import DataConfig, DatasetSpec
from megatron_internvl.config.errors import InternVLError

from .samples import SKIP_REASONS
from .sources import JsonlFile

INDEX_VERSION = 1
KINDS = ("unknown", "text", "image", "multi_image", "video", "interleaved", "corpus")
LINE_COLUMNS = {"starts": np.int64, "ends": np.int64, "line_no": np.int64, "kind": np.int8, "skip": np.int8,
                "tokens": np.int32, "tiles": np.int32, "piece_start": np.int64}
PIECE_COLUMNS = {"piece_tokens": np.int32, "piece_tiles": np.int32, "piece_supervised": np.int32}


class SampleIndexError(InternVLError, ValueError):
    """The sample index is missing, stale, or was built for other settings."""


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_files(tokenizer_file: str) -> list[str]:
    """The files a `Tokenizer` reads: its vocabulary file and the tokenizer_config.json beside it."""
    side = os.path.join(os.path.dirname(os.path.abspath(tokenizer_file)), "tokenizer_config.json")
    return [tokenizer_file] + ([side] if os.path.isfile(side) else [])


def fingerprint(cfg: DataConfig, tokenizer_file: str) -> dict:
    """Everything the index's numbers depend on beyond each dataset's own settings."""
    return {
        "version": INDEX_VERSION,
        "tokenizer": {os.path.basename(p): _hash_file(p) for p in tokenizer_files(tokenizer_file)},
        "template": cfg.template,
        "system_message": cfg.system_message,
        "image_size": cfg.image_size,
        "use_thumbnail": cfg.use_thumbnail,
        "max_dynamic_patch": cfg.max_dynamic_patch,
        "min_dynamic_patch": cfg.min_dynamic_patch,
        "num_video_frames": cfg.num_video_frames,
        "num_image_token": cfg.num_image_token,
        "max_tokens": cfg.max_tokens,
        "max_tiles": cfg.max_tiles,
    }


def dataset_settings(spec: DatasetSpec, cfg: DataConfig) -> dict:
    return {"annotation": os.path.abspath(spec.annotation), "root": spec.root, "kind": spec.kind,
            "template": spec.resolved_template(cfg.template), "max_dynamic_patch": spec.max_dynamic_patch,
            "min_dynamic_patch": spec.min_dynamic_patch, "text_field": spec.text_field}


def file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def part_key(fp: dict, settings: dict, identity: dict) -> str:
    blob = json.dumps([fp, settings, identity], sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def build_command(cfg: DataConfig, out: str) -> str:
    """The `index-data` command line that builds the index these settings need."""
    args = ["megatron-internvl", "index-data", "--meta", cfg.meta_path or "META.json",
            "--tokenizer", cfg.tokenizer_path, "--out", out, "--template", cfg.template,
            "--image-size", str(cfg.image_size), "--num-image-token", str(cfg.num_image_token),
            "--max-dynamic-patch", str(cfg.max_dynamic_patch), "--min-dynamic-patch", str(cfg.min_dynamic_patch),
            "--num-video-frames", str(cfg.num_video_frames), "--max-tokens", str(cfg.max_tokens),
            "--max-tiles", str(cfg.max_tiles)]
    if not cfg.use_thumbnail:
        args.append("--no-thumbnail")
    if cfg.system_message is not None:
        args += ["--system-message", cfg.system_message]
    return " ".join(shlex.quote(a) for a in args)


class IndexedFile:
    """One dataset's part: the columns, memory-mapped."""

    def __init__(self, folder: str):
        self.folder = folder
        for name in (*LINE_COLUMNS, *PIECE_COLUMNS):
            setattr(self, name, np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r"))
        self._messages: Optional[dict] = None

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def message(self, row: int) -> str:
        if self._messages is None:
            with open(os.path.join(self.folder, "skips.json"), encoding="utf-8") as f:
                self._messages = json.load(f)
        return self._messages.get(str(row), "")


@dataclass
class IndexedLine:
    """An index row: a skip (reason, message) or its pieces' (tokens, tiles)."""

    line_no: int
    skip: Optional[str]
    message: str
    pieces: list


class SampleIndex:
    """An index checked against a run's settings; rows looked up by (dataset, line)."""

    def __init__(self, path: str, datasets: list[dict], parts: list[IndexedFile]):
        self.path, self.datasets, self.parts = path, datasets, parts

    @classmethod
    def open(cls, path: str, cfg: DataConfig, specs: Sequence[DatasetSpec], tokenizer_file: str) -> "SampleIndex":
        """Open the index at `path`; refused naming what differs if it was built for other settings
        or older annotation files."""
        rebuild = f"build it with: {build_command(cfg, path)}"
        meta = os.path.join(path, "index.json")
        if not os.path.isfile(meta):
            raise SampleIndexError(f"data.index_path={path!r} holds no sample index (no index.json); {rebuild}")
        with open(meta, encoding="utf-8") as f:
            saved = json.load(f)
        rebuild = f"rebuild it (only what changed is redone): {build_command(cfg, path)}"
        if saved.get("version") != INDEX_VERSION:
            raise SampleIndexError(f"sample index {path} has format version {saved.get('version')}, this "
                                   f"release reads {INDEX_VERSION}; {rebuild}")
        mine = fingerprint(cfg, tokenizer_file)
        diff = [f"{k}: index {saved['fingerprint'].get(k)!r}, this run {v!r}"
                for k, v in mine.items() if saved["fingerprint"].get(k) != v]
        if diff:
            raise SampleIndexError(f"sample index {path} was built for other settings ({'; '.join(diff)}); {rebuild}")
        names = [d["name"] for d in saved["datasets"]]
        if names != [s.name for s in specs]:
            raise SampleIndexError(f"sample index {path} holds datasets {names}, this run reads "
                                   f"{[s.name for s in specs]}; {rebuild}")
        parts = []
        for d, spec in zip(saved["datasets"], specs):
            settings = dataset_settings(spec, cfg)
            diff = [f"{k}: index {d['settings'].get(k)!r}, this run {v!r}"
                    for k, v in settings.items() if d["settings"].get(k) != v]
            if diff:
                raise SampleIndexError(f"sample index {path}: dataset {spec.name!r} was indexed with other "
                                       f"settings ({'; '.join(diff)}); {rebuild}")
            if not os.path.isfile(spec.annotation):
                raise SampleIndexError(f"annotation file {spec.annotation!r} of dataset {spec.name!r} does not exist.")
            now = file_identity(spec.annotation)
            if now != d["identity"]:
                raise SampleIndexError(
                    f"annotation file {spec.annotation} of dataset {spec.name!r} changed since it was indexed "
                    f"(size {d['identity']['size']} -> {now['size']} bytes, modified "
                    f"{d['identity']['mtime_ns']} -> {now['mtime_ns']} ns); {rebuild}")
            parts.append(IndexedFile(os.path.join(path, d["part"])))
        return cls(path, saved["datasets"], parts)

    def jsonl_files(self, specs: Sequence[DatasetSpec]) -> list[JsonlFile]:
        """Random access into the annotation files from the indexed offsets (no scan)."""
        return [JsonlFile.from_offsets(s.annotation, p.starts, p.ends, p.line_no) for s, p in zip(specs, self.parts)]

    def lookup_columns(self, ds: np.ndarray, line: np.ndarray) -> "IndexedRows":
        """The rows of (dataset, line) pairs as columns, in their order (numpy, per dataset)."""
        ds, line = np.asarray(ds, dtype=np.int64), np.asarray(line, dtype=np.int64)
        n = ds.size
        line_no, skip, counts = np.zeros(n, np.int64), np.zeros(n, np.int8), np.zeros(n, np.int64)
        p0 = np.zeros(n, np.int64)
        for d in np.unique(ds).tolist():
            part = self.parts[d]
            where = np.flatnonzero(ds == d)
            rows = line[where]
            line_no[where], skip[where] = part.line_no[rows], part.skip[rows]
            p0[where] = part.piece_start[rows]
            counts[where] = part.piece_start[rows + 1] - p0[where]
        offsets = np.cumsum(counts) - counts
        total = int(counts.sum())
        # flat piece position -> (row, piece of the row)
        row_of = np.repeat(np.arange(n), counts)
        piece = np.arange(total) - offsets[row_of]
        tokens, tiles = np.zeros(total, np.int64), np.zeros(total, np.int64)
        for d in np.unique(ds).tolist():
            part = self.parts[d]
            flat = np.flatnonzero(ds[row_of] == d)
            src = p0[row_of[flat]] + piece[flat]
            tokens[flat], tiles[flat] = part.piece_tokens[src], part.piece_tiles[src]
        return IndexedRows(self, ds, line, line_no, skip, counts, offsets, row_of, piece, tokens, tiles)

    def lookup(self, ds: np.ndarray, line: np.ndarray) -> list[IndexedLine]:
        """The rows of (dataset, line) pairs, in their order, one object per row."""
        cols = self.lookup_columns(ds, line)
        tok, til = cols.tokens.tolist(), cols.tiles.tolist()
        out = []
        for k, (ln, s, f, c) in enumerate(zip(cols.line_no.tolist(), cols.skip.tolist(), cols.offsets.tolist(),
                                              cols.counts.tolist())):
            if s >= 0:
                out.append(IndexedLine(ln, SKIP_REASONS[s], cols.message(k), []))
            else:
                out.append(IndexedLine(ln, None, "", list(zip(tok[f:f + c], til[f:f + c]))))
        return out


@dataclass
class IndexedRows:
    """Index rows as columns: per row its dataset, line, line number, skip code (-1: none), piece
    count and first piece (`offsets`); per piece (rows in order) its row, its position in that
    row, LLM tokens and ViT tiles."""

    index: SampleIndex
    ds: np.ndarray
    line: np.ndarray
    line_no: np.ndarray
    skip: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    row: np.ndarray
    piece: np.ndarray
    tokens: np.ndarray
    tiles: np.ndarray

    def message(self, k: int) -> str:
        return self.index.parts[int(self.ds[k])].message(int(self.line[k]))

    def row_tokens(self) -> np.ndarray:
        """Each row's tokens (its pieces' sum; 0 for a skipped line)."""
        cum = np.concatenate([[0], np.cumsum(self.tokens)])
        return cum[self.offsets + self.counts] - cum[self.offsets]
