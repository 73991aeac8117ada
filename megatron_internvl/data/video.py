"""Videos to ViT tiles: a fixed number of frames, one tile each.

InternVL feeds a video as ``num_frames`` single-tile images (``Frame-1: <image>`` ...): every
frame is resized to one ``image_size`` square, with no thumbnail and never JPEG augmentation
(the compression artefacts of the video codec are already there).

Frame choice: the decoded frames ``0 .. N-1`` are cut into ``num_frames`` equal segments and the
frame in the middle of each is taken, ``index_i = floor((i + 0.5) * N / num_frames)``. A video
shorter than ``num_frames`` repeats frames, so the token count of a video sample is always
``num_frames * tokens_per_tile`` and the packer can budget it before decoding.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
import torch
from PIL import Image

from megatron_internvl.data.images import MediaDecodeError, _pil_tile_array, tiles_chw
from megatron_internvl.data.tiling import DEFAULT_IMAGE_SIZE
from megatron_internvl.models.pixels import normalize_pixels

VideoSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class VideoDecodeError(MediaDecodeError):
    """A video is missing, has no video stream or no frames, or FFmpeg cannot decode it."""

    kind = "video"


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Middle frame of each of ``num_frames`` equal segments of ``range(total_frames)``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    # floor((i + 1/2) * N / k), in integers
    return [((2 * i + 1) * total_frames) // (2 * num_frames) for i in range(num_frames)]


def _open(av, source: VideoSource, name: str):
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise VideoDecodeError(name, "empty input")
        return av.open(io.BytesIO(bytes(source)), mode="r")
    if not os.path.exists(source):
        raise VideoDecodeError(name, "file not found")
    return av.open(os.fspath(source), mode="r")


def _count_frames(av, source: VideoSource, name: str) -> int:
    """Frame count from the container, or by demuxing (no decoding) when it does not say."""
    with _open(av, source, name) as container:
        if not container.streams.video:
            raise VideoDecodeError(name, "no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _decode_selected(av, source: VideoSource, name: str, wanted: list[int]):
    """Decode frames in order, keeping the wanted indices; stops after the last one.

    Sequential decoding is exact for variable frame rate and needs no seek support; its cost
    grows with the position of the last wanted frame, so very long videos are best cut into
    clips offline. Returns ``(frames by index, number of frames decoded)``.
    """
    targets = set(wanted)
    last = max(wanted)
    picked: dict[int, Image.Image] = {}
    decoded = 0
    with _open(av, source, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in targets:
                picked[index] = frame.to_image()  # RGB
            if index >= last:
                break
    return picked, decoded


def count_video_frames(path_or_bytes: VideoSource) -> int:
    """Frames of a video from its container's metadata, or by demuxing packets (no decode) where
    the container does not say. Raises :class:`VideoDecodeError` if it cannot be opened."""
    name = "<bytes>" if isinstance(path_or_bytes, (bytes, bytearray, memoryview)) else os.fspath(path_or_bytes)
    import av

    try:
        return _count_frames(av, path_or_bytes, name)
    except MediaDecodeError:
        raise
    except Exception as e:  # av.FFmpegError, OSError
        raise VideoDecodeError(name, f"{type(e).__name__}: {e}") from None


def read_video_frames(
    path_or_bytes: VideoSource, num_frames: int
) -> tuple[list[Image.Image], list[int]]:
    """Decode the ``num_frames`` sampled frames as RGB PIL images; also return their indices."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        name = "<bytes>"
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        name = os.fspath(path_or_bytes)
    else:
        raise TypeError(
            f"a video must be given as a path or encoded bytes, got {type(path_or_bytes).__name__}"
        )
    import av

    try:
        total = _count_frames(av, path_or_bytes, name)
        if total < 1:
            raise VideoDecodeError(name, "no frames")
        wanted = sample_frame_indices(total, num_frames)
        picked, decoded = _decode_selected(av, path_or_bytes, name, wanted)
        if len(picked) < len(set(wanted)):
            # The container over-stated its frame count: sample again over what really decodes.
            if decoded < 1:
                raise VideoDecodeError(name, "no decodable frames")
            wanted = sample_frame_indices(decoded, num_frames)
            picked, _ = _decode_selected(av, path_or_bytes, name, wanted)
    except MediaDecodeError:
        raise
    except Exception as e:  # av.FFmpegError (invalid data, unknown codec, ...), OSError
        raise VideoDecodeError(name, f"{type(e).__name__}: {e}") from None
    return [picked[i] for i in wanted], wanted


def decode_video_tiles(
    path_or_bytes: VideoSource,
    *,
    num_frames: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> torch.Tensor:
    """``uint8 [num_frames, 3, S, S]``: one tile per sampled frame (not normalised).

    Each frame is resized whole to one square (bicubic), exactly as an image with
    ``max_tiles=1`` would be; there is deliberately no augmentation argument.
    Raises :class:`VideoDecodeError` for a missing or undecodable video.
    """
    frames, _ = read_video_frames(path_or_bytes, num_frames)
    tiles = np.concatenate(
        [_pil_tile_array(f, 1, 1, image_size, use_thumbnail=False) for f in frames], axis=0
    )
    return tiles_chw(tiles)


def load_video_tiles(
    path_or_bytes: VideoSource,
    *,
    num_frames: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> torch.Tensor:
    """``float32 [num_frames, 3, S, S]``: :func:`decode_video_tiles`, normalised."""
    return normalize_pixels(decode_video_tiles(path_or_bytes, num_frames=num_frames, image_size=image_size))
