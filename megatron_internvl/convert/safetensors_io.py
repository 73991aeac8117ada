"""Lazy safetensors reading and sharded writing (Hugging Face layout)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import ConversionError

INDEX = "model.safetensors.index.json"

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class SafetensorsReader:
    """Names, shapes and (on demand) values of a HF checkpoint's tensors.

    Nothing is read until :meth:`get`: headers give the names and shapes, and ``safe_open`` maps
    the files, so a rank materialises only the tensors it asks for. ``aliases`` are (prefix,
    replacement) pairs applied to the stored names (transformers 5 in-memory names).
    """

    def __init__(self, hf_dir, aliases=()):
        self.dir = Path(hf_dir)
        self.aliases = tuple(aliases)
        self._files: dict[str, str] = {}  # name -> file
        self._stored: dict[str, str] = {}  # name -> the name in the file
        self._handles: dict[str, object] = {}
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for stored, file in weight_map.items():
                if not (self.dir / file).is_file():
                    raise ConversionError(
                        f"{index} lists {file} (for tensor {stored}) but the file is missing"
                    )
                self._add(stored, file)
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.dir.glob("*.bin"))
                hint = (
                    f" (found {', '.join(bins)}: re-save it with save_pretrained(..., "
                    f"safe_serialization=True))" if bins else ""
                )
                raise ConversionError(f"no *.safetensors files in {self.dir}{hint}")
            for file in files:
                for stored in self._handle(file).keys():
                    self._add(stored, file)

    def _canonical(self, stored: str) -> str:
        for prefix, repl in self.aliases:
            if stored.startswith(prefix):
                return repl + stored[len(prefix):]
        return stored

    def _add(self, stored, file):
        name = self._canonical(stored)
        if name in self._files:
            raise ConversionError(
                f"tensor {name} is stored twice ({self._stored[name]} in {self._files[name]} and "
                f"{stored} in {file})"
            )
        self._files[name] = file
        self._stored[name] = stored

    def _handle(self, file):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.dir / file), framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._files)

    def _slice(self, name):
        if name not in self._files:
            raise ConversionError(f"missing tensor {name} in {self.dir}")
        return self._handle(self._files[name]).get_slice(self._stored[name])

    def shape(self, name) -> tuple:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name) -> torch.dtype | None:
        return _DTYPES.get(self._slice(name).get_dtype())

    def get(self, name) -> torch.Tensor:
        self._slice(name)  # existence check with a clear message
        return self._handle(self._files[name]).get_tensor(self._stored[name])


class ShardedWriter:
    """Write tensors into ``model-0000k-of-0000n.safetensors`` files of at most ``max_bytes``
    each (a tensor larger than that gets a file of its own) plus the index."""

    def __init__(self, out_dir, max_bytes: int = 5 * 2**30):
        self.dir = Path(out_dir)
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []  # temporary file, names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._parts):
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        # Own, contiguous storage: safetensors refuses views and shared storage.
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self):
        if not self._pending:
            return
        part = f"part-{len(self._parts):05d}.safetensors.tmp"
        save_file(self._pending, str(self.dir / part), metadata={"format": "pt"})
        self._parts.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        self._flush()
        n = len(self._parts)
        weight_map = {}
        files = []
        for k, (part, names) in enumerate(self._parts):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / part, self.dir / final)
            files.append(final)
            for name in names:
                weight_map[name] = final
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files
