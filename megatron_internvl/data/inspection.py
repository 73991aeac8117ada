"""Inspection: a dry run over a data mixture (tile counts from headers, counts of everything)."""

from __future__ import annotations

from typing import Any

import torch

from .loader import PackedDataLoader
from .samples import MediaLoader
from .tiling import tiles_for_image


class HeaderOnlyMedia(MediaLoader):
    """Tile counts from image headers, no pixels: for dry runs over whole datasets.

    Returns [T, 3, 0, 0] tensors; T is what the decoder would produce (the same grid rule).
    Files PIL cannot even open are reported as corrupt; truncated bodies go unnoticed.
    Videos are decoded for real (their frame count needs the container).
    """

    def image_tiles(self, path, *, max_tiles, min_tiles, augment, rng):
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        n = tiles_for_image(w, h, min_tiles, max_tiles, self.image_size, self.use_thumbnail)
        return torch.empty((n, 3, 0, 0))

    def video_frames(self, path, *, rng):
        n = int(super().video_frames(path, rng=rng).shape[0])
        return torch.empty((n, 3, 0, 0))


def inspect_stream(loader: PackedDataLoader) -> dict[str, Any]:
    """Run a finite loader to the end; counts of samples, tiles, tokens, packs, skips, fill."""
    tokens = image_tokens = 0
    for b in loader:
        tokens += b["num_tokens"]
        image_tokens += int(b["num_tiles"].sum()) * loader.cfg.num_image_token
    st = loader.stats()
    return {
        "samples": st["samples_read"],
        "samples_packed": st["packed_samples"],
        "samples_skipped": st["samples_skipped"],
        "skips_by_reason": st["skips_by_reason"],
        "skips": st["skips"],
        "tiles": st["tiles"],
        "tokens": tokens,
        "image_tokens": image_tokens,
        "packs": st["packs"],
        "max_tokens": loader.cfg.max_tokens,
        "max_tiles": loader.cfg.max_tiles,
        "fill_ratio": st["fill_ratio"],
    }
