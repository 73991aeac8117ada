"""One data reader per model replica: the packs are built once and broadcast.

Every rank of a tensor x pipeline group trains on the same packs. Building them means decoding
and tiling images, the most CPU-hungry part of the input pipeline, so only the first rank of the
group (tensor rank 0 of the first pipeline stage) reads data; the others receive each micro-batch:

* tokens, labels, positions, weights, ``cu_seqlens`` and the rest go to the whole group as one
  pickled object (a few hundred KB for a 16k-token pack);
* pixels (up to ~100 MB for a 48-tile pack) go only to the tensor-parallel ranks of the first
  stage, the only ones that run the ViT, as one tensor on the compute device. Later stages get a
  ``[tiles, 3, 0, 0]`` placeholder that keeps the tile count for metrics.

An error while reading (skip-ratio exceeded, unreadable annotation) is raised on every rank of
the group, so no rank is left waiting in a broadcast. Context-parallel ranks each have their own
group (and reader): they need the same packs, which each reader builds identically.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable

import torch

from .distributed import compute_device

_PIXELS = "pixel_values"


class BroadcastLoader:
    """Wraps the reader's loader on the source rank; receives on the others.

    ``build`` is called on the source rank only. The iterator, ``state_dict``,
    ``load_state_dict`` and ``dataset_names`` behave as the wrapped loader's on every rank
    (``state_dict`` on a receiving rank is a marker: checkpoints store the source's state, which
    is the main replica of the data state).
    """

    def __init__(self, build: Callable[[], Any]):
        from megatron.core import parallel_state as ps

        self.group = ps.get_model_parallel_group()
        ranks = torch.distributed.get_process_group_ranks(self.group)
        first_stage = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.is_source = first_stage and ps.get_tensor_model_parallel_rank() == 0
        flags = [None] * len(ranks)
        torch.distributed.all_gather_object(flags, self.is_source, group=self.group)
        sources = [r for r, f in zip(ranks, flags) if f]
        if len(sources) != 1:
            raise RuntimeError(f"model-parallel group {ranks} has {len(sources)} data readers, expected 1")
        self.src = sources[0]
        self.needs_pixels = first_stage
        self.pixel_group = ps.get_tensor_model_parallel_group()
        self.pixel_src = ps.get_tensor_model_parallel_src_rank()
        self.inner = None
        message: list[Any] = [None]
        if self.is_source:
            try:
                self.inner = build()
                message[0] = ("ok", self.inner.dataset_names)
            except BaseException as exc:
                message[0] = ("error", _sendable(exc))
        self.dataset_names = self._receive(message)[1]

    def __iter__(self) -> "BroadcastLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        message: list[Any] = [None]
        if self.is_source:
            try:
                batch = next(self.inner)
            except BaseException as exc:  # StopIteration included: every rank stops together
                message[0] = ("error", _sendable(exc))
            else:
                pixels = batch[_PIXELS]
                meta = {k: v for k, v in batch.items() if k != _PIXELS}
                message[0] = ("batch", meta, tuple(pixels.shape), pixels.dtype)
        _, meta, shape, dtype = self._receive(message)
        if not self.needs_pixels:
            meta[_PIXELS] = torch.empty((shape[0], 3, 0, 0), dtype=dtype)
            return meta
        if self.is_source:
            pixels = batch[_PIXELS]
        else:
            pixels = torch.empty(shape, dtype=dtype, device=compute_device())
        if pixels.numel():
            pixels = pixels.to(compute_device(), non_blocking=True)
            torch.distributed.broadcast(pixels, src=self.pixel_src, group=self.pixel_group)
        meta[_PIXELS] = pixels
        return meta

    def _receive(self, message: list) -> tuple:
        torch.distributed.broadcast_object_list(message, src=self.src, group=self.group)
        if message[0][0] == "error":
            raise message[0][1]
        return message[0]

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict() if self.is_source else {"receives_broadcast": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.is_source:
            self.inner.load_state_dict(state)

    def stats(self) -> dict[str, Any] | None:
        return self.inner.stats() if self.is_source else None


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
