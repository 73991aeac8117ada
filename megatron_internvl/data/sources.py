"""Reading sources: InternVL meta JSON files and random access into jsonl annotation files.

Meta JSON (InternVL's format, with optional extensions `kind`, `template`,
`min_dynamic_patch`, `text_field`):

    {"name": {"root": "images/", "annotation": "train.jsonl", "data_augment": true,
              "max_dynamic_patch": 12, "repeat_time": 1, "length": 12345}}

Relative `root` and `annotation` paths are taken relative to the meta file's folder.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from megatron_internvl.config.data import DatasetSpec
from megatron_internvl.config.errors import InternVLError

_META_KEYS = {"root", "annotation", "data_augment", "max_dynamic_patch", "min_dynamic_patch",
              "repeat_time", "length", "kind", "template", "text_field"}


class SourceError(InternVLError, ValueError):
    pass


def load_meta(path: str) -> list[DatasetSpec]:
    if not os.path.isfile(path):
        raise SourceError(f"meta file {path!r} does not exist; set data.meta_path to InternVL's meta JSON.")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise SourceError(f"meta file {path}: not valid JSON ({e}).") from e
    if not isinstance(meta, dict) or not meta:
        raise SourceError(f"meta file {path}: expected a non-empty object {{name: {{root, annotation, ...}}}}.")
    base = os.path.dirname(os.path.abspath(path))
    specs = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise SourceError(f"meta file {path}: entry {name!r} needs at least an 'annotation' path.")
        unknown = set(entry) - _META_KEYS
        if unknown:
            raise SourceError(f"meta file {path}: entry {name!r} has unknown keys {sorted(unknown)}; known: {sorted(_META_KEYS)}.")
        ann = entry["annotation"]
        root = entry.get("root", "") or ""
        spec = DatasetSpec(
            name=name,
            annotation=ann if os.path.isabs(ann) else os.path.join(base, ann),
            root=root if (not root or os.path.isabs(root)) else os.path.join(base, root),
            kind=entry.get("kind", "chat"),
            template=entry.get("template"),
            max_dynamic_patch=entry.get("max_dynamic_patch"),
            min_dynamic_patch=int(entry.get("min_dynamic_patch", 1)),
            data_augment=bool(entry.get("data_augment", False)),
            repeat_time=float(entry.get("repeat_time", 1.0)),
            length=entry.get("length"),
            text_field=entry.get("text_field", "text"),
        )
        spec.validate(where=f"meta {path}")
        specs.append(spec)
    return specs


class JsonlFile:
    """Byte offsets of the non-empty lines of a jsonl file, for random access by index."""

    # scanned in pieces: annotation files can be larger than the memory one should spend on them
    CHUNK = 1 << 26

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise SourceError(f"annotation file {path!r} does not exist.")
        self.path = path
        newlines = []
        with open(path, "rb") as f:
            size = 0
            while True:
                buf = f.read(self.CHUNK)
                if not buf:
                    break
                newlines.append(np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10) + size)
                size += len(buf)
        nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
        starts = np.concatenate(([0], nl + 1)).astype(np.int64)
        ends = np.concatenate((nl, [size])).astype(np.int64)
        line_no = np.arange(1, starts.size + 1, dtype=np.int64)
        length = ends - starts
        # drop empty lines (and a lone "\r") so a trailing newline is not a bad record
        keep = length > 0
        one = np.flatnonzero(keep & (length == 1))
        if one.size:
            with open(path, "rb") as f:
                for k in one:
                    f.seek(int(starts[k]))
                    if f.read(1) == b"\r":
                        keep[k] = False
        self.starts = starts[keep]
        self.ends = ends[keep]
        self.line_no = line_no[keep]
        self._fh = None
        self._pid = None

    @classmethod
    def from_offsets(cls, path: str, starts, ends, line_no) -> "JsonlFile":
        """Random access from offsets found before (the sample index), without scanning the file."""
        if not os.path.isfile(path):
            raise SourceError(f"annotation file {path!r} does not exist.")
        f = cls.__new__(cls)
        f.path, f.starts, f.ends, f.line_no = path, starts, ends, line_no
        f._fh = f._pid = None
        return f

    def __len__(self) -> int:
        return int(self.starts.size)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fh"] = None
        d["_pid"] = None
        return d

    def read(self, i: int) -> tuple[int, bytes]:
        """(1-based line number, raw bytes) of the i-th non-empty line."""
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        s, e = int(self.starts[i]), int(self.ends[i])
        self._fh.seek(s)
        return int(self.line_no[i]), self._fh.read(e - s)


def parse_record(raw: bytes) -> dict:
    """json.loads a line; raises ValueError (a malformed line) on anything but an object."""
    rec = json.loads(raw)
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    return rec


def resolve_media(root: str, rel: str) -> str:
    if os.path.isabs(rel) or not root:
        return rel
    return os.path.join(root, rel)


def all_specs(datasets: list[DatasetSpec], meta_path: Optional[str]) -> list[DatasetSpec]:
    specs = list(datasets)
    if meta_path:
        specs.extend(load_meta(meta_path))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SourceError(f"dataset names {dup} appear more than once across data.datasets and the meta file.")
    return specs
