"""Grid choice for dynamic tiling: the reference vectors, an exact brute-force re-derivation away
from float ties, and the helpers. Float ties and InternVL's candidate order are checked against a
reimplementation of the official code in test_official_preprocessing.py."""

from fractions import Fraction

import numpy as np
import pytest

from megatron_internvl.data.tiling import (
    candidate_grids,
    choose_grid,
    num_tiles,
    tile_budget_per_image,
    tiles_for_image,
)

# (width, height, max_tiles, grid, tiles with thumbnail), from the InternVL facts (min_tiles = 1)
VECTORS = [
    (500, 500, 12, (1, 1), 1),
    (1000, 1000, 12, (3, 3), 10),
    (800, 600, 12, (4, 3), 13),
    (1920, 1080, 12, (4, 2), 9),
    (1080, 1920, 12, (2, 4), 9),
    (1000, 100, 12, (10, 1), 11),
    (3000, 400, 12, (8, 1), 9),
    (1280, 720, 6, (2, 1), 3),
    (640, 480, 6, (3, 2), 7),
]


@pytest.mark.parametrize("width,height,max_tiles,grid,tiles", VECTORS)
def test_reference_vectors(width, height, max_tiles, grid, tiles):
    assert choose_grid(width, height, 1, max_tiles) == grid
    assert tiles_for_image(width, height, 1, max_tiles) == tiles
    assert num_tiles(*grid, use_thumbnail=True) == tiles


def brute_force_grid(width, height, min_tiles, max_tiles, image_size):
    """Independent statement of the rule, in exact rationals and without a running best.

    The closest grids form a tie set, ordered by area then cols. Its first member wins unless a
    later member has at most twice the image's pixel area (W*H > 0.5 * S^2 * cols*rows); then
    the last such member wins. Exact arithmetic differs from the official float rule only at
    midpoints between grid ratios, which the seeded random sizes below never hit.
    """
    grids = [
        (c, r)
        for c in range(1, max_tiles + 1)
        for r in range(1, max_tiles + 1)
        if min_tiles <= c * r <= max_tiles
    ]
    aspect = Fraction(width, height)
    distance = {g: abs(aspect - Fraction(g[0], g[1])) for g in grids}
    closest = min(distance.values())
    tied = sorted((g for g in grids if distance[g] == closest), key=lambda g: (g[0] * g[1], g[0]))
    eligible = [
        g for g in tied[1:] if Fraction(width * height) > Fraction(image_size**2 * g[0] * g[1], 2)
    ]
    return eligible[-1] if eligible else tied[0]


def test_brute_force_random_sizes():
    rng = np.random.default_rng(1234)
    for _ in range(400):
        w, h = (int(v) for v in rng.integers(1, 6000, size=2))
        max_tiles = int(rng.choice([1, 2, 4, 6, 12, 24, 36]))
        min_tiles = int(rng.choice([1, 1, 1, 2, 3])) if max_tiles >= 3 else 1
        size = int(rng.choice([224, 448]))
        assert choose_grid(w, h, min_tiles, max_tiles, size) == brute_force_grid(
            w, h, min_tiles, max_tiles, size
        ), (w, h, min_tiles, max_tiles, size)


def test_tie_rule_prefers_small_grid_for_small_image():
    # 2.5 is exactly between 2x1 and 3x1 (and 5x2 is out of reach with max 4)
    assert choose_grid(250, 100, 1, 4) == (2, 1)  # far fewer pixels than half of 3 tiles
    assert choose_grid(2500, 1000, 1, 4) == (3, 1)  # enough pixels: the larger grid wins
    # 7/6 is exactly between 1x1 and 4x3, but in floats 4x3 is closer by one ulp, so InternVL
    # (and therefore we) take 4x3 without applying the area rule.
    assert choose_grid(56, 48, 1, 12) == (4, 3)


def test_candidate_grids_complete_and_ordered():
    grids = candidate_grids(3, 12)
    expected = {(c, r) for c in range(1, 13) for r in range(1, 13) if 3 <= c * r <= 12}
    assert set(grids) == expected and len(grids) == len(expected)
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas)


def test_min_tiles_forces_larger_grid():
    assert choose_grid(500, 500, 1, 12) == (1, 1)
    assert choose_grid(500, 500, 4, 12) == (2, 2)
    assert choose_grid(500, 500, 12, 12)[0] * choose_grid(500, 500, 12, 12)[1] == 12


def test_thumbnail_only_with_several_tiles():
    assert num_tiles(1, 1, use_thumbnail=True) == 1
    assert num_tiles(2, 1, use_thumbnail=True) == 3
    assert num_tiles(2, 1, use_thumbnail=False) == 2
    assert num_tiles(3, 4, use_thumbnail=True) == 13
    assert tiles_for_image(800, 600, 1, 12, use_thumbnail=False) == 12


def test_tile_budget_per_image():
    assert tile_budget_per_image(12, 1) == 12
    assert tile_budget_per_image(12, 5) == 2
    assert tile_budget_per_image(36, 4) == 9
    assert tile_budget_per_image(6, 13) == 1  # every image keeps a tile
    for n_max, n_images in [(0, 1), (12, 0)]:
        with pytest.raises(ValueError):
            tile_budget_per_image(n_max, n_images)


def test_user_errors_have_clear_messages():
    with pytest.raises(ValueError, match="min_tiles <= max_tiles"):
        choose_grid(100, 100, 6, 4)
    with pytest.raises(ValueError, match="width must be positive"):
        choose_grid(0, 100)
    with pytest.raises(TypeError, match="height must be an integer"):
        choose_grid(100, 1.5)
    assert choose_grid(np.int64(1920), np.int32(1080)) == (4, 2)  # numpy ints are fine
