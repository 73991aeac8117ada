"""Byte-range chunks of a jsonl file, read line by line, and atomic writes.

Chunk c of a file covers the lines that *start* in bytes [c*B, (c+1)*B): a reader seeks to
c*B, skips the rest of a line begun before it, and reads whole lines until one starts at or
after (c+1)*B. The chunks are disjoint and complete whatever B, and memory per reader is one
line. Line numbers are 1-based over all lines, empty ones included, like the trainer's
`file:line` messages.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator


def chunk_ranges(path: str, chunk_bytes: int) -> list[tuple[int, int]]:
    size = os.path.getsize(path)
    n = max(1, math.ceil(size / chunk_bytes))
    return [(c * chunk_bytes, min(size, (c + 1) * chunk_bytes)) for c in range(n)]


def read_lines(path: str, start: int, end: int) -> Iterator[bytes]:
    """Every line starting in [start, end), without its "\n" (empty lines included)."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            # only the "\n" goes: a "\r" before it stays, so rewritten lines keep their bytes
            yield line[:-1] if line.endswith(b"\n") else line


def is_blank(raw: bytes) -> bool:
    return not raw.strip()


def write_atomic(path: str, data: bytes | str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class AtomicWriter:
    """A file written line by line under a temporary name and renamed on `commit()`."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp.{os.getpid()}"
        self.f = open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
