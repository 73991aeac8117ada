"""Media readers: images and videos -> tiles (`MediaLoader`), or only the tile counts that the
decoder would produce, read from headers (`HeaderOnlyMedia`, for planning and dry runs).

Tiles are `uint8 [T, 3, S, S]`: they stay one byte per channel through the workers, the pinned
host buffers and the tensor-parallel broadcast, and are normalised on the rank's device
(`models/pixels.py`)."""

from __future__ import annotations

import numpy as np
import torch

from .images import decode_image_tiles
from .tiling import tiles_for_image
from .video import VideoDecodeError, count_video_frames, decode_video_tiles


class MediaLoader:
    """Decodes images and videos into uint8 tiles. Tests inject a fake with the same two methods
    (float tiles from a fake are taken as normalised)."""

    def __init__(self, image_size: int, use_thumbnail: bool = True, backend: str = "pil",
                 num_video_frames: int = 8):
        self.image_size = image_size
        self.use_thumbnail = use_thumbnail
        self.backend = backend
        self.num_video_frames = num_video_frames

    def image_tiles(self, path: str, *, max_tiles: int, min_tiles: int, augment: bool,
                    rng: np.random.Generator) -> torch.Tensor:
        return decode_image_tiles(path, max_tiles=max_tiles, min_tiles=min_tiles, image_size=self.image_size,
                                  use_thumbnail=self.use_thumbnail, jpeg_augment=augment, rng=rng,
                                  backend=self.backend)

    def video_frames(self, path: str, *, rng: np.random.Generator) -> torch.Tensor:
        # frames are the middle of equal segments: deterministic, no rng needed
        return decode_video_tiles(path, num_frames=self.num_video_frames, image_size=self.image_size)



class HeaderOnlyMedia(MediaLoader):
    """Tile counts from image headers, no pixels: for dry runs over whole datasets.

    Returns [T, 3, 0, 0] tensors; T is what the decoder would produce (the same grid rule).
    Files PIL cannot even open are reported as corrupt; truncated bodies go unnoticed.
    A video always yields `num_video_frames` tiles (short ones repeat frames): its container is
    opened for its frame count (metadata, or its packets where the metadata has none), nothing
    is decoded.
    """

    def image_tiles(self, path, *, max_tiles, min_tiles, augment, rng):
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        n = tiles_for_image(w, h, min_tiles, max_tiles, self.image_size, self.use_thumbnail)
        return torch.empty((n, 3, 0, 0), dtype=torch.uint8)

    def video_frames(self, path, *, rng):
        if count_video_frames(path) < 1:
            raise VideoDecodeError(path, "no frames")
        return torch.empty((self.num_video_frames, 3, 0, 0), dtype=torch.uint8)
