"""Inspection: a dry run over a data mixture (tile counts from headers, counts of everything)."""

from __future__ import annotations

from typing import Any

from .loader import PackedDataLoader


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
