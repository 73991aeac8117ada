"""Media readers: images and videos -> tiles (`MediaLoader`), or only the tile counts that the
decoder would produce, read from headers (`HeaderOnlyMedia`, for planning and dry runs).

Tiles are `uint8 [T, 3, S, S]`: they stay one byte per channel through the workers, the pinned
host buffers and the tensor-parallel broadcast, and are normalised on the rank's device
(`models/pixels.py`). With `data.decode_on: rank` (`decode_site`, the one place that decides) the
workers hand over complete JPEGs still encoded (`images.EncodedTiles`), decoded by the training
process on its device when the step fetches the micro-batch."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from megatron_internvl.config import ConfigError
from megatron_internvl.config.data import DataConfig

from .images import decode_image_tiles, encode_image_tiles
from .tiling import tiles_for_image
from .video import VideoDecodeError, count_video_frames, decode_video_tiles


def decode_site(cfg: DataConfig) -> str:
    """Where training decodes images: "worker" (data-loader workers) or "rank" (the training
    process, on its device). `data.decode_on: auto` is "rank" where DALI's GPU decoder can run
    there (image_backend dali and CUDA), else "worker"."""
    if cfg.decode_on == "auto":
        return "rank" if cfg.image_backend == "dali" and torch.cuda.is_available() else "worker"
    if cfg.decode_on == "rank" and cfg.image_backend == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        raise ConfigError("data.decode_on=rank with data.image_backend=dali needs NVIDIA DALI in the training "
                          "process: pip install 'megatron-internvl[dali-cuda13]' (or [dali-cuda12]), or set "
                          "data.image_backend=pil")
    return cfg.decode_on


class MediaLoader:
    """Decodes images and videos into uint8 tiles (`decode_on="rank"`: images that travel encoded
    come back as `EncodedTiles`, see `decode_site`). Tests inject a fake with the same two
    methods (float tiles from a fake are taken as normalised)."""

    def __init__(self, image_size: int, use_thumbnail: bool = True, backend: str = "pil",
                 num_video_frames: int = 8, decode_on: str = "worker"):
        if decode_on not in ("worker", "rank"):
            raise ValueError(f"decode_on={decode_on!r}: resolve 'auto' with decode_site(cfg) first")
        self.image_size = image_size
        self.use_thumbnail = use_thumbnail
        self.backend = backend
        self.num_video_frames = num_video_frames
        self.decode_on = decode_on

    @classmethod
    def for_training(cls, cfg: DataConfig) -> "MediaLoader":
        """The reader a training run's loader uses: `cfg`'s settings, decoding where `decode_site` says."""
        return cls(cfg.image_size, cfg.use_thumbnail, cfg.image_backend, cfg.num_video_frames, decode_site(cfg))

    def image_tiles(self, path: str, *, max_tiles: int, min_tiles: int, augment: bool,
                    rng: np.random.Generator) -> torch.Tensor:
        read = encode_image_tiles if self.decode_on == "rank" else decode_image_tiles
        return read(path, max_tiles=max_tiles, min_tiles=min_tiles, image_size=self.image_size,
                    use_thumbnail=self.use_thumbnail, jpeg_augment=augment, rng=rng, backend=self.backend)

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
