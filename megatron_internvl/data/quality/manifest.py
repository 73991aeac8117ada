"""What a filter-data run folder records about its inputs, shared by the run and the review.

`manifest.json` (one per `--out` folder) names the meta file, the settings' fingerprint, the
scorer and, per dataset, the input annotation's size and modification time. The run refuses
to resume over other inputs; `filter-apply` refuses to apply decisions to an input that
changed since it was filtered. `flagged.jsonl` holds one flagged sample per line.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

MANIFEST = "manifest.json"


class FilterError(RuntimeError):
    """The output folder or the input cannot be used as asked."""


def input_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_input_unchanged(entry: dict) -> None:
    """Raise FilterError if a manifest entry's annotation file is gone or changed."""
    path = entry["input"]["path"]
    if not os.path.isfile(path):
        raise FilterError(f"annotation {path} of dataset {entry['name']!r} no longer exists.")
    now = input_stamp(path)
    if (now["size"], now["mtime_ns"]) != (entry["input"]["size"], entry["input"]["mtime_ns"]):
        raise FilterError(f"annotation {path} of dataset {entry['name']!r} changed since it was filtered "
                          f"(size or modification time differ); filter it again into a fresh --out folder.")


def read_flagged(path: str) -> Iterator[dict]:
    """The records of a flagged.jsonl file (or of a chunk's part of it)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
