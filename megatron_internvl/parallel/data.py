"""One data reader per model replica: the packs are built once and broadcast.

Every rank of a tensor x pipeline group trains on the same packs. Building them means decoding
and tiling images, the most CPU-hungry part of the input pipeline, so only the first rank of the
group (tensor rank 0 of the first pipeline stage) reads data; the others receive each micro-batch:

* tokens, labels, positions, weights, ``cu_seqlens`` and the rest go to the whole group as one
  pickled object (a few hundred KB for a 16k-token pack);
* pixels (uint8 tiles: 28 MB for a 48-tile pack) go only to the tensor-parallel ranks of the
  first stage, the only ones that run the ViT, as one tensor on the compute device. Later stages
  get a ``[tiles, 3, 0, 0]`` placeholder that keeps the tile count for metrics.

``next(loader)`` does both. The training step instead takes the step's micro-batches with
:meth:`BroadcastLoader.next_deferred` (the small part, broadcast to every rank of the group at the
step's start, where all of them are at the same point of their program) and moves each one's
pixels to the device when megatron's schedule asks for it (:class:`MicroBatchFeed`, a bounded
number ahead), so a step's tiles are never all on the device at once. The tensor-parallel ranks
of the first stage run the same schedule, so their pixel broadcasts line up.

An error while reading (skip-ratio exceeded, unreadable annotation) is raised on every rank of
the group, so no rank is left waiting in a broadcast. Context-parallel ranks each have their own
group (and reader): they need the same packs, which each reader builds identically.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Iterator, Sequence

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

    def close(self) -> None:
        """Stop the reader's worker processes (a local call: no collective)."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def __next__(self) -> dict[str, Any]:
        """The next micro-batch with its pixels on this rank's device (first stage)."""
        batch = self.next_deferred()
        batch[_PIXELS] = self.fetch_pixels(batch)
        return batch

    def next_deferred(self) -> dict[str, Any]:
        """The next micro-batch without moving its pixels: on the source they stay on the host
        (pinned by the loader's workers on a GPU node), on the other first-stage ranks a tensor
        on the ``meta`` device stands for them (shape and dtype only), later stages get the
        placeholder. :meth:`fetch_pixels` brings them to the device."""
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
        elif self.is_source:
            meta[_PIXELS] = batch[_PIXELS]
        else:
            meta[_PIXELS] = torch.empty(shape, dtype=dtype, device="meta")
        return meta

    def fetch_pixels(self, batch: dict[str, Any]) -> torch.Tensor:
        """A :meth:`next_deferred` batch's pixels on this rank's device: the source copies them
        (asynchronously from pinned memory), the other tensor-parallel ranks of the first stage
        receive them; every such rank must call this for the same batches in the same order.
        With ``data.decode_on: rank`` the source's pixels are the workers' encoded images
        (``data.images.EncodedTiles``, same shape and dtype), and ``.to`` decodes them here."""
        pixels = batch[_PIXELS]
        if not self.needs_pixels:
            return pixels
        if not self.is_source:
            pixels = torch.empty(pixels.shape, dtype=pixels.dtype, device=compute_device())
        pixels = pixels.to(compute_device(), non_blocking=True)
        if pixels.numel():
            torch.distributed.broadcast(pixels, src=self.pixel_src, group=self.pixel_group)
        return pixels

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


class MicroBatchFeed:
    """A step's micro-batches for megatron's schedule, pixels moved to the device on demand.

    ``batches`` hold everything but the pixels on the device already (small); the pixels of
    micro-batch ``m`` are fetched (``fetch``: :meth:`BroadcastLoader.fetch_pixels`) when the
    schedule first asks for ``m``, together with those of the next ``prefetch`` micro-batches,
    and dropped once handed over, so at most ``1 + prefetch`` micro-batches' tiles wait on the
    device (plus those the ViT's backward still holds). On a GPU the copies and broadcasts run on
    a side stream, so the copy of ``m + 1`` overlaps the computation of ``m``.

    Only the model chunk that runs the ViT (the first) receives pixels: with virtual pipeline
    stages, the other chunks of the first rank get the ``[tiles, 3, 0, 0]`` placeholder.
    """

    def __init__(self, batches: Sequence[dict], fetch: Callable[[dict], torch.Tensor], prefetch: int):
        self.batches, self.fetch, self.prefetch = list(batches), fetch, prefetch
        self._ready: dict[int, tuple[torch.Tensor, Any]] = {}
        self._next = 0  # the first micro-batch not fetched yet
        self._stream = torch.cuda.Stream() if compute_device().type == "cuda" else None

    def _start(self, upto: int) -> None:
        while self._next < min(upto, len(self.batches)):
            m, self._next = self._next, self._next + 1
            if self._stream is None:
                self._ready[m] = (self.fetch(self.batches[m]), None)
                continue
            with torch.cuda.stream(self._stream):
                pixels = self.fetch(self.batches[m])
                done = torch.cuda.Event()
                done.record()
            self._ready[m] = (pixels, done)

    def pixels(self, m: int) -> torch.Tensor:
        self._start(m + 1 + self.prefetch)
        pixels, done = self._ready.pop(m)
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
            pixels.record_stream(torch.cuda.current_stream())
        return pixels

    def iterator(self, chunk: int) -> Iterator[dict]:
        for m, b in enumerate(self.batches):
            if chunk == 0:
                yield dict(b, **{_PIXELS: self.pixels(m)})
            else:
                yield dict(b, **{_PIXELS: torch.empty((b[_PIXELS].shape[0], 3, 0, 0), dtype=torch.uint8)})


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
