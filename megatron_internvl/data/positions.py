"""Per-token position ids: plain integers, or V2PE's variable visual position encoding.

V2PE: a text token advances the position by 1, each visual token (an `<IMG_CONTEXT>` of an
image) by that image's delta; after the image the position is rounded up and text goes on
by +1. So `<img>` at p, its N visual tokens at p + k*delta (k = 1..N), `</img>` at
ceil(p + N*delta) + 1. With delta = 1 this is exactly 0, 1, 2, ...
Positions up to 2**24 / 256 = 65536 with delta >= 1/256 are exact in float32.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

# 1, 1/2, ..., 1/256: the deltas V2PE trains with.
V2PE_DELTAS = tuple(1.0 / 2**k for k in range(9))


def draw_v2pe_deltas(num_images: int, rng: np.random.Generator) -> list[float]:
    return [V2PE_DELTAS[int(k)] for k in rng.integers(0, len(V2PE_DELTAS), size=num_images)]


def image_deltas(mode: str, num_images: int, rng: Optional[np.random.Generator], fixed_delta: float) -> Optional[list[float]]:
    """Deltas for `mode` in off / random / fixed (None means integer positions)."""
    if mode == "off" or num_images == 0:
        return None
    if mode == "fixed":
        return [float(fixed_delta)] * num_images
    if rng is None:
        raise ValueError("v2pe='random' needs the sample's rng")
    return draw_v2pe_deltas(num_images, rng)


def position_ids(num_tokens: int, image_spans: Sequence[tuple[int, int]],
                 deltas: Optional[Sequence[float]] = None) -> np.ndarray:
    """float32 [num_tokens]; `image_spans` are the [start, end) runs of visual tokens."""
    if deltas is None:
        return np.arange(num_tokens, dtype=np.float32)
    if len(deltas) != len(image_spans):
        raise ValueError(f"{len(deltas)} deltas for {len(image_spans)} images")
    pos = np.empty(num_tokens, dtype=np.float64)
    cur = -1.0  # position of the previous token
    t = 0
    for (s, e), d in zip(image_spans, deltas):
        if s < t or e < s or e > num_tokens:
            raise ValueError(f"bad image span {(s, e)} for {num_tokens} tokens")
        pos[t:s] = cur + 1.0 + np.arange(s - t, dtype=np.float64)
        if s > t:
            cur = pos[s - 1]
        pos[s:e] = cur + d * np.arange(1, e - s + 1, dtype=np.float64)
        if e > s:
            cur = float(math.ceil(pos[e - 1]))
        t = e
    pos[t:] = cur + 1.0 + np.arange(num_tokens - t, dtype=np.float64)
    return pos.astype(np.float32)
