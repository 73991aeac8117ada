"""Images to normalised ViT tiles: decoding, dynamic tiling, JPEG augmentation.

Two decoding backends produce the same tiles:

* ``PILDecoder``: Pillow (libjpeg-turbo) decode and bicubic resize, as InternVL does.
* ``DALIDecoder``: NVIDIA DALI decode and cubic resize; on a GPU node the JPEG is decoded by
  nvJPEG (``device="mixed"``, the hardware decoder where there is one) and resized on the GPU.

Both hand back ``uint8`` tiles; cutting the grid into tiles and normalising are shared code, so
the backends can only differ in decode and resize. Training keeps the tiles ``uint8 [T,3,S,S]``
(:func:`decode_image_tiles`) until the rank's device, where the ViT's input is normalised
(``models/pixels.py``); :func:`load_image_tiles` normalises at once, with the same arithmetic. On CPU the decode is bit-identical
(both use libjpeg-turbo); the resize differs slightly because Pillow rounds to 8 bits between
its horizontal and vertical passes and DALI does not. The measured gap and the tolerance the
tests hold it to are in ``docs/data.md``.

The random JPEG re-compression (quality uniform in [75, 100] per tile) draws its qualities from a
caller-supplied generator before any backend runs, so a data-loader resume that restores the
generator reproduces the same tiles with either backend.

With ``data.decode_on: rank`` a worker does not decode a JPEG: :func:`encode_image_tiles` reads
its bytes and header and returns :class:`EncodedTiles` (the bytes, the tile grid, the thumbnail
and the drawn JPEG qualities: a :class:`TilePlan` per image), which stands in for the uint8 tile
tensor until ``.to(device)`` decodes it in the training process (DALI's ``mixed`` nvJPEG decoder
on a GPU; DALI-CPU or Pillow elsewhere) with the same arithmetic as the worker would have used.
"""

from __future__ import annotations

import gc
import io
import logging
import os
from abc import ABC, abstractmethod
import weakref
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megatron_internvl.data.tiling import DEFAULT_IMAGE_SIZE, choose_grid
from megatron_internvl.models.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels  # noqa: F401
JPEG_QUALITY_MIN = 75
JPEG_QUALITY_MAX = 100  # inclusive

logger = logging.getLogger("megatron_internvl.data")

Rng = Union[np.random.Generator, torch.Generator]
ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class MediaDecodeError(Exception):
    """A sample's image or video cannot be used; the dataset layer catches this and counts it.

    Carries the offending ``source`` (a path, or ``"<bytes>"``) and a short ``reason`` so a
    skipped-sample report can say which file to look at.
    """

    kind = "media"

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"cannot decode {self.kind} {self.source}: {reason}")

    def __reduce__(self):  # keep (source, reason) when raised inside a data-loader worker
        return (type(self), (self.source, self.reason))


class ImageDecodeError(MediaDecodeError):
    """An image file is missing, unreadable, truncated or not an image."""

    kind = "image"


def read_image_source(path_or_bytes: ImageSource) -> tuple[bytes, str]:
    """Return ``(encoded bytes, name for messages)``; a missing file is an ImageDecodeError."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, source = bytes(path_or_bytes), "<bytes>"
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        source = os.fspath(path_or_bytes)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ImageDecodeError(source, "file not found") from None
        except OSError as e:
            raise ImageDecodeError(source, f"cannot read file ({e.strerror or e})") from None
    else:
        raise TypeError(
            f"an image must be given as a path or encoded bytes, got {type(path_or_bytes).__name__}"
        )
    if not data:
        raise ImageDecodeError(source, "empty file")
    return data, source


def _open_header(data: bytes, source: str) -> Image.Image:
    """Parse the header only (no pixel decode): size and mode for the grid choice."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(source, "not an image in a format Pillow can read") from None
    except Exception as e:  # DecompressionBombError, OSError, ...
        raise ImageDecodeError(source, f"{type(e).__name__}: {e}") from None


def decode_rgb(data: bytes, source: str = "<bytes>") -> Image.Image:
    """Fully decode with Pillow to RGB (no EXIF rotation, as InternVL's loader does not rotate)."""
    image = _open_header(data, source)
    try:
        image.load()  # truncated / corrupt data fails here, not at open
        # convert() copies even when the mode is already RGB; skipping it saves ~40% of decode
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        raise ImageDecodeError(source, f"{type(e).__name__}: {e}") from None


def _cut_grid(grid: np.ndarray, cols: int, rows: int, image_size: int) -> np.ndarray:
    """Split an ``(rows*S, cols*S, 3)`` image into ``[cols*rows, S, S, 3]`` tiles, row-major."""
    s = image_size
    if grid.shape != (rows * s, cols * s, 3):
        raise RuntimeError(f"resized image has shape {grid.shape}, expected {(rows * s, cols * s, 3)}")
    return np.ascontiguousarray(
        grid.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
    )


@dataclass(frozen=True)
class TilePlan:
    """How one image becomes tiles, known from its header alone: the ``cols x rows`` grid of
    ``image_size`` squares, whether a thumbnail follows, and the JPEG qualities of the
    augmentation (one per tile, drawn where the sample is built; None without augmentation)."""

    cols: int
    rows: int
    image_size: int
    thumbnail: bool
    qualities: tuple[int, ...] | None = None

    @classmethod
    def of(cls, width: int, height: int, min_tiles: int, max_tiles: int, image_size: int,
           use_thumbnail: bool) -> "TilePlan":
        cols, rows = choose_grid(width, height, min_tiles, max_tiles, image_size)
        return cls(cols, rows, image_size, use_thumbnail and cols * rows > 1)

    @property
    def tiles(self) -> int:
        return self.cols * self.rows + int(self.thumbnail)


def _pil_planned_tiles(image: Image.Image, plan: TilePlan) -> np.ndarray:
    s = plan.image_size
    resized = image.resize((s * plan.cols, s * plan.rows), Image.Resampling.BICUBIC)
    tiles = _cut_grid(np.asarray(resized), plan.cols, plan.rows, s)
    if plan.thumbnail:
        thumb = np.asarray(image.resize((s, s), Image.Resampling.BICUBIC))
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    return tiles


def _pil_tile_array(
    image: Image.Image, min_tiles: int, max_tiles: int, image_size: int, use_thumbnail: bool
) -> np.ndarray:
    plan = TilePlan.of(image.width, image.height, min_tiles, max_tiles, image_size, use_thumbnail)
    return _pil_planned_tiles(image, plan)


def dynamic_preprocess(
    image: Image.Image,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """InternVL's dynamic high-resolution split of an RGB PIL image into PIL tiles.

    The image is resized (bicubic) to the chosen ``cols x rows`` grid of ``image_size`` squares
    and cut row-major; a whole-image thumbnail is appended when there is more than one tile.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    tiles = _pil_tile_array(image, min_tiles, max_tiles, image_size, use_thumbnail)
    return [Image.fromarray(t) for t in tiles]


def tiles_chw(tiles: np.ndarray | Sequence[Image.Image]) -> torch.Tensor:
    """``uint8 [T,S,S,3]`` (or PIL tiles) to ``uint8 [T,3,S,S]``: the layout the ViT reads, still
    one byte per channel (what workers, host buffers and broadcasts carry)."""
    if not isinstance(tiles, np.ndarray):
        tiles = np.stack([np.asarray(t.convert("RGB")) for t in tiles])
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 tiles [T,S,S,3], got {tiles.dtype} {tiles.shape}")
    if not tiles.flags.writeable:  # e.g. a view of a PIL buffer; torch wants writable memory
        tiles = tiles.copy()
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()


def normalize_tiles(tiles: np.ndarray | Sequence[Image.Image]) -> torch.Tensor:
    """``uint8 [T,S,S,3]`` (or PIL tiles) to ImageNet-normalised ``float32 [T,3,S,S]``.

    Same float32 operations as torchvision's ``ToTensor`` + ``Normalize`` (divide by 255, then
    subtract the mean and divide by the std), so checkpoints trained on InternVL's pipeline see
    the same numbers; the code is the one training runs on the rank's device
    (:func:`megatron_internvl.models.pixels.normalize_pixels`).
    """
    return normalize_pixels(tiles_chw(tiles))


def draw_jpeg_qualities(rng: Rng, n: int) -> list[int]:
    """One JPEG quality per tile, uniform over [75, 100], consuming only ``rng``.

    Drawn before decoding and independent of the backend, so restoring the generator's state on
    resume replays exactly the same qualities.
    """
    if isinstance(rng, np.random.Generator):
        q = rng.integers(JPEG_QUALITY_MIN, JPEG_QUALITY_MAX + 1, size=n)
    elif isinstance(rng, torch.Generator):
        q = torch.randint(JPEG_QUALITY_MIN, JPEG_QUALITY_MAX + 1, (n,), generator=rng).numpy()
    else:
        raise TypeError(
            "JPEG augmentation needs rng=numpy.random.Generator or torch.Generator (seeded by the "
            f"data loader so that resume is exact), got {type(rng).__name__}"
        )
    return [int(v) for v in q]


def jpeg_roundtrip(tile: np.ndarray, quality: int) -> np.ndarray:
    """Encode one ``uint8 [S,S,3]`` tile as JPEG at ``quality`` and decode it again (Pillow)."""
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


class TileDecoder(ABC):
    """Encoded image bytes -> ``uint8 [T,S,S,3]`` tiles, and the per-tile JPEG augmentation.

    ``tiles`` chooses the grid from the header and calls ``planned_tiles``, which follows a
    :class:`TilePlan`; ``device_tiles`` decodes a batch of planned images (augmentation
    included) into ``uint8 [T,3,S,S]`` tensors on a device, for ``data.decode_on: rank``.
    Instances are per process (see :func:`get_decoder`, :func:`rank_decoder`) and not
    thread-safe; data-loader parallelism is by worker processes.
    """

    name: str

    def tiles(self, data, source, *, min_tiles, max_tiles, image_size, use_thumbnail) -> np.ndarray:
        header = _open_header(data, source)
        plan = TilePlan.of(header.width, header.height, min_tiles, max_tiles, image_size, use_thumbnail)
        return self.planned_tiles(data, source, plan, header)

    @abstractmethod
    def planned_tiles(self, data: bytes, source: str, plan: TilePlan, header: Image.Image) -> np.ndarray: ...

    @abstractmethod
    def jpeg_compress(self, tiles: np.ndarray, qualities: Sequence[int]) -> np.ndarray: ...

    def device_tiles(self, images: Sequence["EncodedImage"], device: torch.device) -> list[torch.Tensor]:
        """Each image's tiles, augmented by its plan's qualities, as ``uint8 [T,3,S,S]`` on
        ``device``: the worker's arithmetic, run here (backends with a device path override)."""
        out = []
        for im in images:
            data = im.data.numpy().tobytes()
            tiles = self.planned_tiles(data, im.source, im.plan, _open_header(data, im.source))
            if im.plan.qualities is not None:
                tiles = self.jpeg_compress(tiles, im.plan.qualities)
            out.append(tiles_chw(tiles).to(device, non_blocking=True))
        return out


class PILDecoder(TileDecoder):
    """Pillow decode + bicubic resize: InternVL's own preprocessing."""

    name = "pil"

    def planned_tiles(self, data, source, plan, header):
        return _pil_planned_tiles(decode_rgb(data, source), plan)

    def jpeg_compress(self, tiles, qualities):
        return np.stack([jpeg_roundtrip(t, q) for t, q in zip(tiles, qualities, strict=True)])


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def dali_decodes(data: bytes, header: Image.Image) -> bool:
    """Whether DALI decodes this image itself: a JPEG in RGB or greyscale. Other formats and
    CMYK JPEGs go through Pillow, so that colour conversion never differs between backends."""
    return _is_jpeg(data) and header.mode in ("RGB", "L")


def _dali_reason(exc: Exception) -> str:
    """DALI's errors carry the pipeline-definition traceback; keep only what went wrong."""
    text = str(exc)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and "no longer valid" not in ln and not ln.startswith("Critical error")
    ]
    return "DALI: " + (" ".join(lines)[:300] or type(exc).__name__)


class DALIDecoder(TileDecoder):
    """NVIDIA DALI decode + antialiased cubic resize (the same filter Pillow's BICUBIC uses).

    ``device="auto"`` uses the GPU (nvJPEG, hardware JPEG decoding where the GPU has it) when
    torch sees CUDA, else a CPU-only pipeline. CUDA cannot be used in a process forked from a
    parent that already initialised it (the usual data-loader worker), so there "auto" means
    CPU; GPU decoding needs the main process or spawn-started workers. ``device_id`` defaults
    to ``LOCAL_RANK`` (torchrun), else 0. DALI is used for baseline/progressive JPEGs in
    RGB or greyscale; other formats (PNG, GIF, WebP, CMYK JPEG, ...) go through Pillow so that
    colour conversion stays identical to the PIL backend. ``stats`` counts which path ran.

    The pipelines are built lazily on first use. They are shut down just before any
    ``os.fork()`` (data-loader workers), because a DALI pipeline's threads do not exist in the
    child and touching or even freeing the inherited copy there crashes; parent and child each
    rebuild on next use (about 10 ms). They are also rebuilt after a decode error, because DALI
    invalidates a pipeline that raised.
    """

    name = "dali"

    def __init__(self, device: str = "auto", num_threads: int = 1, device_id: int | None = None):
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"DALIDecoder device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise ModuleNotFoundError(
                "backend='dali' needs NVIDIA DALI: pip install 'megatron-internvl[dali-cuda13]' (CUDA 13 "
                "driver; [dali-cuda12] for CUDA 12, [dali-cpu] without a GPU); use backend='pil' otherwise"
            ) from None
        if device == "auto":
            forked_from_cuda = getattr(torch.cuda, "_is_in_bad_fork", lambda: False)()
            device = "gpu" if torch.cuda.is_available() and not forked_from_cuda else "cpu"
        self.device = device
        if device == "gpu" and device_id is None:
            device_id = int(os.environ.get("LOCAL_RANK", 0))
        self.device_id = device_id if device == "gpu" else None
        self.num_threads = num_threads
        self.stats: Counter[str] = Counter()
        _LIVE_DALI_DECODERS.add(self)
        self._image_pipe = None
        self._image_capacity = 0
        self._tile_pipe = None
        self._tile_capacity = 0

    # --- pipelines -------------------------------------------------------------------------

    def _release_pipelines(self) -> None:
        for pipe in (self._image_pipe, self._tile_pipe):
            # DALI has no public close(); its destructor calls _shutdown(). Call it here so the
            # threads are joined now, before a fork, whatever else still references the pipe.
            shutdown = getattr(pipe, "_shutdown", None)
            if shutdown is not None:
                shutdown()
        self._image_pipe = self._tile_pipe = None
        self._image_capacity = self._tile_capacity = 0

    def _new_pipeline(self, batch_size: int):
        from nvidia.dali import Pipeline

        # Synchronous and unbuffered: one request in, its result out, nothing read ahead.
        return Pipeline(
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            exec_pipelined=False,
            exec_async=False,
            prefetch_queue_depth=1,
        )

    def _build_image_pipe(self, capacity: int = 1):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        pipe = self._new_pipeline(batch_size=capacity)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            sizes = {
                k: fn.external_source(name=k, dtype=types.FLOAT, ndim=0)
                for k in ("grid_w", "grid_h", "thumb_w", "thumb_h")
            }
            image = fn.decoders.image(
                encoded,
                device="mixed" if self.device == "gpu" else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,  # Pillow/InternVL ignore EXIF orientation too
            )
            resize = dict(interp_type=types.INTERP_CUBIC, antialias=True)
            grid = fn.resize(image, resize_x=sizes["grid_w"], resize_y=sizes["grid_h"], **resize)
            thumb = fn.resize(image, resize_x=sizes["thumb_w"], resize_y=sizes["thumb_h"], **resize)
            pipe.set_outputs(grid, thumb)
        pipe.build()
        return pipe

    def _build_tile_pipe(self, capacity: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        pipe = self._new_pipeline(batch_size=capacity)
        with pipe:
            tiles = fn.external_source(
                name="tiles", dtype=types.UINT8, ndim=3, layout="HWC",
                device="gpu" if self.device == "gpu" else "cpu",
            )
            quality = fn.external_source(name="quality", dtype=types.INT32, ndim=0)
            pipe.set_outputs(fn.jpeg_compression_distortion(tiles, quality=quality))
        pipe.build()
        return pipe

    @staticmethod
    def _host_arrays(tensor_list) -> list[np.ndarray]:
        if hasattr(tensor_list, "as_cpu"):
            tensor_list = tensor_list.as_cpu()
        # Copy: DALI reuses its output buffers on the next run.
        return [np.array(tensor_list[i], copy=True) for i in range(len(tensor_list))]

    def _to_torch(self, tensor, device: torch.device) -> torch.Tensor:
        """One DALI output sample as a torch tensor on ``device`` (a copy: DALI reuses its
        buffers). A GPU sample is copied on torch's current stream (the feed's side stream)."""
        from nvidia.dali.backend import TensorGPU

        if isinstance(tensor, TensorGPU):
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
            return out
        return torch.from_numpy(np.array(tensor, copy=True)).to(device)

    def _run_images(self, encoded: Sequence[np.ndarray], plans: Sequence[TilePlan]):
        """Decode and resize a batch: the grid and the thumbnail of each image (DALI outputs)."""
        n = len(encoded)
        if self._image_pipe is None or n > self._image_capacity:
            self._image_capacity = 1 << max(n - 1, 0).bit_length()   # 1, 2, 4, ...: few rebuilds
            self._image_pipe = self._build_image_pipe(self._image_capacity)
        pipe = self._image_pipe
        try:
            pipe.feed_input("encoded", list(encoded))
            for name, values in (
                ("grid_w", [p.image_size * p.cols for p in plans]),
                ("grid_h", [p.image_size * p.rows for p in plans]),
                # a 1x1 thumbnail costs ~nothing; dropped when the plan has none
                ("thumb_w", [p.image_size if p.thumbnail else 1 for p in plans]),
                ("thumb_h", [p.image_size if p.thumbnail else 1 for p in plans]),
            ):
                pipe.feed_input(name, [np.float32(v) for v in values])
            return pipe.run()
        except Exception:
            self._image_pipe = None   # DALI invalidates a pipeline that raised
            raise

    # --- TileDecoder -----------------------------------------------------------------------

    def planned_tiles(self, data, source, plan, header):
        if not dali_decodes(data, header):
            self.stats["pil_fallback"] += 1
            return PILDecoder().planned_tiles(data, source, plan, header)
        try:
            grid_out, thumb_out = self._run_images([np.frombuffer(data, dtype=np.uint8)], [plan])
            grid = self._host_arrays(grid_out)[0]
            thumb = self._host_arrays(thumb_out)[0] if plan.thumbnail else None
        except Exception as e:
            raise ImageDecodeError(source, _dali_reason(e)) from None
        self.stats["dali"] += 1
        tiles = _cut_grid(grid, plan.cols, plan.rows, plan.image_size)
        if thumb is not None:
            tiles = np.concatenate([tiles, thumb[None]], axis=0)
        return tiles

    def jpeg_compress(self, tiles, qualities):
        return np.stack(self._host_arrays(self._run_tiles([np.ascontiguousarray(t) for t in tiles], qualities)))

    def _run_tiles(self, tiles: Sequence, qualities: Sequence[int], **feed):
        if len(tiles) != len(qualities):
            raise ValueError(f"{len(tiles)} tiles but {len(qualities)} JPEG qualities")
        if self._tile_pipe is None or len(tiles) > self._tile_capacity:
            self._tile_capacity = max(64, len(tiles))
            self._tile_pipe = self._build_tile_pipe(self._tile_capacity)
        pipe = self._tile_pipe
        try:
            pipe.feed_input("tiles", list(tiles), layout="HWC", **feed)
            pipe.feed_input("quality", [np.int32(q) for q in qualities])
            (out,) = pipe.run()
            return out
        except Exception:
            self._tile_pipe = None
            raise

    def device_tiles(self, images, device):
        """The batch decoded and resized in one pipeline run; on a GPU the bytes are decoded by
        nvJPEG (``mixed``), resized, cut into tiles and augmented without leaving the device.
        Images DALI does not decode itself (see :func:`dali_decodes`) never get here."""
        if not images:
            return []
        encoded = [im.data.numpy() for im in images]   # pinned where the loader pinned them
        try:
            grid_out, thumb_out = self._run_images(encoded, [im.plan for im in images])
        except Exception as e:   # one bad image fails the batch: the caller retries one by one
            where = images[0].source if len(images) == 1 else f"<one of {len(images)} images>"
            raise ImageDecodeError(where, _dali_reason(e)) from None
        self.stats["dali"] += len(images)
        grids = []
        for i, im in enumerate(images):
            p, s = im.plan, im.plan.image_size
            grid = self._to_torch(grid_out[i], device)
            if tuple(grid.shape) != (p.rows * s, p.cols * s, 3):
                raise RuntimeError(f"resized image has shape {tuple(grid.shape)}, expected {(p.rows * s, p.cols * s, 3)}")
            tiles = grid.reshape(p.rows, s, p.cols, s, 3).permute(0, 2, 1, 3, 4).reshape(p.rows * p.cols, s, s, 3)
            if p.thumbnail:
                tiles = torch.cat([tiles, self._to_torch(thumb_out[i], device)[None]])
            grids.append(tiles)
        self._copied(device)
        out = []
        for im, tiles in zip(images, grids):
            if im.plan.qualities is not None:
                fed, feed = list(tiles.contiguous().unbind(0)), {}
                if device.type == "cuda":   # DALI reads torch's CUDA tensors on the stream they were made on
                    feed = {"cuda_stream": torch.cuda.current_stream(device)}
                else:
                    fed = [t.numpy() for t in fed]
                compressed = self._run_tiles(fed, im.plan.qualities, **feed)
                tiles = torch.stack([self._to_torch(compressed[k], device) for k in range(len(fed))])
                self._copied(device)
            out.append(tiles.permute(0, 3, 1, 2).contiguous())
        return out

    @staticmethod
    def _copied(device: torch.device) -> None:
        """Wait for the copies out of DALI's GPU buffers: its next run reuses them, on its own stream."""
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


_LIVE_DALI_DECODERS: "weakref.WeakSet[DALIDecoder]" = weakref.WeakSet()


def _release_dali_pipelines_before_fork() -> None:
    decoders = list(_LIVE_DALI_DECODERS)
    for decoder in decoders:
        decoder._release_pipelines()
    if decoders:
        # A pipeline dropped earlier can still wait for the cycle collector (e.g. one held by an
        # exception's traceback): collected in the child, its destructor would shut down threads
        # that do not exist there (a segfault of a forked worker, seen once in CI). Collect such
        # garbage here, in the parent.
        gc.collect()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_release_dali_pipelines_before_fork)

_DECODERS: dict[tuple[int, str], TileDecoder] = {}


def get_decoder(backend: str) -> TileDecoder:
    """The process's decoder for ``backend`` ("pil" or "dali"), created on first use."""
    key = (os.getpid(), backend)
    if key not in _DECODERS:
        if backend == "pil":
            _DECODERS[key] = PILDecoder()
        elif backend == "dali":
            _DECODERS[key] = DALIDecoder()
        else:
            raise ValueError(f"unknown image backend {backend!r}: choose 'pil' or 'dali'")
    return _DECODERS[key]


def rank_decoder(backend: str, device: torch.device) -> TileDecoder:
    """The training process's decoder for tiles decoded on its ``device`` (``decode_on: rank``):
    DALI on that GPU (nvJPEG, ``mixed``) or DALI-CPU, or Pillow."""
    key = (os.getpid(), f"{backend}@{device}")
    if key not in _DECODERS:
        if backend == "dali":
            on_gpu = device.type == "cuda"
            index = device.index if device.index is not None or not on_gpu else torch.cuda.current_device()
            _DECODERS[key] = DALIDecoder(device="gpu" if on_gpu else "cpu", device_id=index if on_gpu else None)
        else:
            _DECODERS[key] = get_decoder(backend)
    return _DECODERS[key]


def _check_augment(jpeg_augment: bool, rng: Rng | None) -> None:
    if jpeg_augment and rng is None:
        raise ValueError(
            "jpeg_augment=True needs rng (a seeded numpy or torch Generator) so that the "
            "augmentation is reproducible on resume"
        )


def _decode(data, source, decoder: TileDecoder, *, max_tiles, min_tiles, image_size, use_thumbnail,
            jpeg_augment, rng) -> torch.Tensor:
    tiles = decoder.tiles(
        data, source, min_tiles=min_tiles, max_tiles=max_tiles,
        image_size=image_size, use_thumbnail=use_thumbnail,
    )
    if jpeg_augment:
        tiles = decoder.jpeg_compress(tiles, draw_jpeg_qualities(rng, len(tiles)))
    return tiles_chw(tiles)


def decode_image_tiles(
    path_or_bytes: ImageSource,
    *,
    max_tiles: int,
    min_tiles: int = 1,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
    jpeg_augment: bool = False,
    rng: Rng | None = None,
    backend: str | TileDecoder = "pil",
) -> torch.Tensor:
    """Decode an image into ViT tiles, ``uint8 [T, 3, image_size, image_size]`` (not normalised).

    ``T`` is the grid's tile count plus one thumbnail when the grid has several tiles. With
    ``jpeg_augment`` every tile (thumbnail included) is JPEG re-compressed at a quality drawn
    from ``rng``. Raises :class:`ImageDecodeError` for a missing or undecodable image.
    """
    _check_augment(jpeg_augment, rng)
    decoder = backend if isinstance(backend, TileDecoder) else get_decoder(backend)
    data, source = read_image_source(path_or_bytes)
    return _decode(data, source, decoder, max_tiles=max_tiles, min_tiles=min_tiles, image_size=image_size,
                   use_thumbnail=use_thumbnail, jpeg_augment=jpeg_augment, rng=rng)


def load_image_tiles(path_or_bytes: ImageSource, **kw) -> torch.Tensor:
    """:func:`decode_image_tiles` (same arguments), normalised: ``float32 [T, 3, S, S]``."""
    return normalize_pixels(decode_image_tiles(path_or_bytes, **kw))


# --- decoding in the training process (data.decode_on: rank) ----------------------------------


@dataclass(frozen=True)
class EncodedImage:
    """One image as a worker hands it to the rank: its encoded bytes (``uint8 [n]``, a tensor so
    that it travels through shared memory and can be pinned), its name, and its plan."""

    data: torch.Tensor
    source: str
    plan: TilePlan


def travels_encoded(data: bytes, header: Image.Image) -> bool:
    """Whether an image is left for the rank to decode: a complete JPEG (ends with its EOI
    marker, so a truncated file is still found, and skipped, in the worker) that DALI decodes
    itself. Everything else is decoded in the worker, as with ``decode_on: worker``."""
    return dali_decodes(data, header) and data.endswith(b"\xff\xd9")


class EncodedTiles:
    """The ``uint8 [T, 3, S, S]`` tiles of a sample or a pack, not decoded yet.

    Parts are :class:`EncodedImage` (decoded on the rank) or uint8 tile tensors (decoded in the
    worker: videos, non-JPEG images). It stands in for the tensor it becomes wherever the data
    path handles tiles without reading them: ``shape``/``dtype``, slicing along the tiles at
    image boundaries, :func:`concat_tiles`, ``pin_memory()`` (the DataLoader's pinning), and
    ``to(device)``, which decodes on ``device`` with ``backend``'s :func:`rank_decoder` and
    returns the tensor. An image whose body fails to decode there (its header was fine) gets
    zero tiles and a warning naming the file: its tokens are already in the pack.
    """

    dtype = torch.uint8

    def __init__(self, parts: Sequence[EncodedImage | torch.Tensor], backend: str, image_size: int):
        self.parts, self.backend, self.image_size = list(parts), backend, image_size

    @staticmethod
    def _count(part) -> int:
        return part.plan.tiles if isinstance(part, EncodedImage) else int(part.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(map(self._count, self.parts)), 3, self.image_size, self.image_size))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> "EncodedTiles":
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"EncodedTiles are sliced along their tiles only, got {index!r}")
        lo, hi, _ = index.indices(len(self))
        out, at = [], 0
        for part in self.parts:
            n = self._count(part)
            a, b = max(lo - at, 0), min(hi - at, n)
            if a < b:
                if isinstance(part, EncodedImage):
                    if (a, b) != (0, n):
                        raise ValueError(f"tiles [{lo}, {hi}) cut through the {n} tiles of {part.source}")
                    out.append(part)
                else:
                    out.append(part[a:b])
            at += n
        return EncodedTiles(out, self.backend, self.image_size)

    def contiguous(self) -> "EncodedTiles":
        return self

    def pin_memory(self) -> "EncodedTiles":
        return EncodedTiles([replace(p, data=p.data.pin_memory()) if isinstance(p, EncodedImage) else p.pin_memory()
                             for p in self.parts], self.backend, self.image_size)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        images = [p for p in self.parts if isinstance(p, EncodedImage)]
        decoded = iter(_decode_on(rank_decoder(self.backend, device), images, device))
        tiles = [next(decoded) if isinstance(p, EncodedImage) else p.to(device, non_blocking=non_blocking)
                 for p in self.parts]
        if not tiles:
            return torch.zeros(tuple(self.shape), dtype=torch.uint8, device=device)
        return torch.cat(tiles)

    def __repr__(self) -> str:
        n = sum(isinstance(p, EncodedImage) for p in self.parts)
        return f"EncodedTiles({len(self)} tiles, {n} encoded images, backend={self.backend!r})"


def _decode_on(decoder: TileDecoder, images: list[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    try:
        return decoder.device_tiles(images, device)
    except ImageDecodeError:
        if len(images) > 1:
            return [t for im in images for t in _decode_on(decoder, [im], device)]
    (im,) = images
    logger.warning("cannot decode image %s on the rank (its header read fine in the worker); its %d "
                   "tiles are zeros in this pack", im.source, im.plan.tiles)
    s = im.plan.image_size
    return [torch.zeros((im.plan.tiles, 3, s, s), dtype=torch.uint8, device=device)]


def encode_image_tiles(
    path_or_bytes: ImageSource,
    *,
    max_tiles: int,
    min_tiles: int = 1,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
    jpeg_augment: bool = False,
    rng: Rng | None = None,
    backend: str | TileDecoder = "pil",
) -> EncodedTiles | torch.Tensor:
    """:func:`decode_image_tiles` for ``decode_on: rank``: an image that :func:`travels_encoded`
    comes back as :class:`EncodedTiles` (its bytes, header-chosen grid and drawn JPEG qualities:
    the same draws from ``rng`` as a decode), any other is decoded here. ``.to(device)`` of the
    result gives exactly the tensor :func:`decode_image_tiles` returns, for either backend."""
    _check_augment(jpeg_augment, rng)
    decoder = backend if isinstance(backend, TileDecoder) else get_decoder(backend)
    data, source = read_image_source(path_or_bytes)
    header = _open_header(data, source)
    if not travels_encoded(data, header):
        return _decode(data, source, decoder, max_tiles=max_tiles, min_tiles=min_tiles, image_size=image_size,
                       use_thumbnail=use_thumbnail, jpeg_augment=jpeg_augment, rng=rng)
    plan = TilePlan.of(header.width, header.height, min_tiles, max_tiles, image_size, use_thumbnail)
    if jpeg_augment:
        plan = replace(plan, qualities=tuple(draw_jpeg_qualities(rng, plan.tiles)))
    image = EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), source, plan)
    return EncodedTiles([image], decoder.name, image_size)


def concat_tiles(parts: Sequence[torch.Tensor | EncodedTiles]) -> torch.Tensor | EncodedTiles:
    """``torch.cat`` along the tiles, for tensors and :class:`EncodedTiles` alike."""
    encoded = [p for p in parts if isinstance(p, EncodedTiles)]
    if not encoded:
        return torch.cat(list(parts), dim=0)
    flat = [q for p in parts for q in (p.parts if isinstance(p, EncodedTiles) else [p]) if EncodedTiles._count(q)]
    return EncodedTiles(flat, encoded[0].backend, encoded[0].image_size)
