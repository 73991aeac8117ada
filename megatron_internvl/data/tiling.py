"""Dynamic high-resolution tiling: which grid of square tiles an image is cut into.

InternVL (1.5 and later) resizes an image to a grid of ``cols x rows`` tiles of
``image_size`` pixels, choosing the grid whose aspect ratio is closest to the image's, and
appends a whole-image thumbnail when the grid has more than one tile. This module holds only
that arithmetic, so that the dataset, the packer (which budgets tiles) and the decoders agree
on tile counts without decoding anything.
"""

from __future__ import annotations

import operator
from functools import lru_cache

DEFAULT_IMAGE_SIZE = 448


def _as_int(name: str, value) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _check_tile_range(min_tiles: int, max_tiles: int) -> None:
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(
            f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}; "
            "check the dataset's max_dynamic_patch / min_dynamic_patch settings"
        )


@lru_cache(maxsize=256)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All ``(cols, rows)`` with ``min_tiles <= cols*rows <= max_tiles``, smallest area first.

    The order decides exact ties in :func:`choose_grid`, so it is fixed completely: by area,
    then by ascending ``cols``. (InternVL orders a Python set by area, which leaves the order
    inside one area to hashing; with ``min_tiles == 1`` no tie is ever decided inside one area,
    checked exhaustively for ``max_tiles`` up to 48, so the two agree there.)
    """
    min_tiles, max_tiles = _as_int("min_tiles", min_tiles), _as_int("max_tiles", max_tiles)
    _check_tile_range(min_tiles, max_tiles)
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles // cols + 1)
        if cols * rows >= min_tiles
    ]
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], g[0])))


def choose_grid(
    width: int,
    height: int,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> tuple[int, int]:
    """Return ``(cols, rows)`` for an image of ``width x height`` pixels.

    The grid whose ``cols/rows`` is closest to ``width/height`` wins. When two grids are
    exactly as close, the later (larger) one replaces the earlier only if the image has more
    than half the pixels of that grid (``W*H > 0.5 * image_size**2 * cols*rows``): a small image
    is not blown up to many tiles just because a big grid has the same shape.

    Distances are compared exactly in integers (``|W*r - H*c| / (H*r)`` cross-multiplied).
    InternVL's reference compares floats, so at an exact midpoint between two grid ratios a
    one-ulp rounding picks a side instead of applying the area rule; this happens for about
    1 in 13,000 random sizes (e.g. 56x48 with max 12: floats give 4x3, 13 tiles for a tiny
    image; exact arithmetic gives 1x1).
    """
    width, height = _as_int("width", width), _as_int("height", height)
    image_size = _as_int("image_size", image_size)
    for name, value in (("width", width), ("height", height), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    best: tuple[int, int] | None = None
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        if best is None:
            best = (cols, rows)
            continue
        best_cols, best_rows = best
        # |W/H - c/r| < |W/H - bc/br|  <=>  |W*r - H*c| * br < |W*br - H*bc| * r   (H, r > 0)
        new = abs(width * rows - height * cols) * best_rows
        old = abs(width * best_rows - height * best_cols) * rows
        if new < old:
            best = (cols, rows)
        elif new == old and 2 * width * height > image_size * image_size * cols * rows:
            best = (cols, rows)
    assert best is not None  # candidate_grids is never empty once the range is valid
    return best


def num_tiles(cols: int, rows: int, use_thumbnail: bool) -> int:
    """Tiles the ViT sees for a grid: a thumbnail is added only when the grid has several tiles,
    because a 1x1 grid already is the whole image."""
    if cols < 1 or rows < 1:
        raise ValueError(f"a grid needs cols >= 1 and rows >= 1, got {cols}x{rows}")
    grid = cols * rows
    return grid + 1 if (use_thumbnail and grid > 1) else grid


def tile_budget_per_image(n_max: int, n_images: int) -> int:
    """Per-image ``max_tiles`` for a sample with ``n_images`` images sharing a budget ``n_max``.

    Every image keeps at least one tile, so a sample with more images than ``n_max`` exceeds the
    budget rather than dropping images (the packer's tile budget handles the overflow).
    """
    if n_max < 1:
        raise ValueError(f"n_max (the dataset's max tiles) must be >= 1, got {n_max}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    return max(1, n_max // n_images)


def tiles_for_image(
    width: int,
    height: int,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> int:
    """Tile count of an image from its size alone (e.g. read from a header or an index)."""
    cols, rows = choose_grid(width, height, min_tiles, max_tiles, image_size)
    return num_tiles(cols, rows, use_thumbnail)
