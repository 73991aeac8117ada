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
    """All ``(cols, rows)`` with ``min_tiles <= cols*rows <= max_tiles``, in InternVL's order.

    InternVL builds a Python set of the grids (looping over the tile count ``n``, then ``cols``,
    then ``rows``) and sorts it by area; the sort is stable, so inside one area the order is the
    set's iteration order. That order is reproducible: small-int tuples hash the same in every
    process (``PYTHONHASHSEED`` only affects str and bytes), so the same insertions give the
    same set. The set is built here the same way so that ties inside one area, which only
    occur with ``min_tiles > 1``, go the same way as in InternVL.
    """
    min_tiles, max_tiles = _as_int("min_tiles", min_tiles), _as_int("max_tiles", max_tiles)
    _check_tile_range(min_tiles, max_tiles)
    grids = set(
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(
    width: int,
    height: int,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> tuple[int, int]:
    """Return ``(cols, rows)`` for an image of ``width x height`` pixels.

    The grid whose ``cols/rows`` is closest to ``width/height`` wins. When two grids are as
    close, the later (larger) one replaces the earlier only if the image has more than half the
    pixels of that grid (``W*H > 0.5 * image_size**2 * cols*rows``): a small image is not blown
    up to many tiles just because a big grid has the same shape.

    "Closest" and "as close" are decided in floating point with InternVL's own operations, in
    its order (``abs(W/H - cols/rows)``, strict ``<`` to take a new best, ``==`` for the area
    rule): the models were trained and are served (InternVL's chat code, transformers, LMDeploy,
    vLLM) with that arithmetic. Where ``W/H`` lies exactly between two grid ratios, rounding can
    make one side a hair closer, and then the area rule is not applied; e.g. 56x48 with up to 12
    tiles gets 4x3 (13 tiles with the thumbnail), as in InternVL, where exact arithmetic would
    apply the area rule and give 1x1.
    """
    width, height = _as_int("width", width), _as_int("height", height)
    image_size = _as_int("image_size", image_size)
    for name, value in (("width", width), ("height", height), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
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
