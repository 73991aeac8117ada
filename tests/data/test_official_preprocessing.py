"""Preprocessing identical to InternVL's official code where the two used to differ (issue 10).

* Grid choice at floating-point ties: checked against a reimplementation of InternVL's
  ``dynamic_preprocess`` / ``find_closest_aspect_ratio`` written here from the published
  semantics (no project code), and against transformers' InternVL image processor.
* BOS from the tokenizer's own ``add_bos_token`` / ``bos_token`` for every template.
* The order in which missing special tokens are appended (InternVL's order).
* Qwen-style BPE: what the split at supervision boundaries changes when an answer starts with
  a line break.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest

from megatron_internvl.data.templates import TEMPLATES, render_chat, tokenize_conversation, tokenize_plain
from megatron_internvl.data.tiling import candidate_grids, choose_grid, tiles_for_image
from megatron_internvl.data.tokenizer import load_tokenizer

from .helpers import train_bpe, train_sentencepiece

# --------------------------------------------------------------------------- grid choice


def official_grid(width, height, min_num, max_num, image_size=448):
    """InternVL's rule as published: the candidate set, sorted by area, scanned with a running
    best on float differences (strict ``<`` replaces, ``==`` applies the area rule)."""
    aspect_ratio = width / height
    targets = official_candidates(min_num, max_num)
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for i, j in targets:
        ratio_diff = abs(aspect_ratio - i / j)
        if ratio_diff < best_diff:
            best_diff, best = ratio_diff, (i, j)
        elif ratio_diff == best_diff and area > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def exact_grid(width, height, min_num, max_num, image_size=448):
    """The same rule in exact rationals (what the project used to do): for contrast only."""
    best, best_diff = None, None
    for g in official_candidates(min_num, max_num):
        d = abs(Fraction(width, height) - Fraction(*g))
        if best is None or d < best_diff:
            best, best_diff = g, d
        elif d == best_diff and 2 * width * height > image_size**2 * g[0] * g[1]:
            best = g
    return best


@lru_cache(maxsize=None)
def official_candidates(min_num, max_num):
    """InternVL's target ratios: a set filled n by n, i by i, j by j, sorted (stably) by area."""
    targets = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    targets.add((i, j))
    return sorted(targets, key=lambda ij: ij[0] * ij[1])


# (width, height, min_tiles, max_tiles, official grid, tiles with thumbnail, exact-arithmetic grid)
FLOAT_TIES = [
    (56, 48, 1, 12, (4, 3), 13, (1, 1)),    # 7/6 midway between 1/1 and 4/3
    (88, 176, 3, 6, (2, 3), 7, (1, 3)),     # 1/2 midway between 1/3 and 2/3
    (28, 48, 1, 12, (2, 3), 7, (1, 2)),     # 7/12 midway between 1/2 and 2/3
    (34, 48, 1, 12, (3, 4), 13, (2, 3)),    # 17/24 midway between 2/3 and 3/4
    (22, 120, 1, 12, (1, 6), 7, (1, 5)),    # 11/60 midway between 1/6 and 1/5
]


@pytest.mark.parametrize("w,h,lo,hi,grid,tiles,exact", FLOAT_TIES)
def test_float_tie_table(w, h, lo, hi, grid, tiles, exact):
    assert official_grid(w, h, lo, hi) == grid          # the table itself is the official answer
    assert exact_grid(w, h, lo, hi) == exact != grid    # and really is a float/exact disagreement
    assert choose_grid(w, h, lo, hi) == grid
    assert tiles_for_image(w, h, lo, hi) == tiles


def test_transformers_processor_agrees_on_the_tie_table():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for w, h, lo, hi, grid, _, _ in FLOAT_TIES:
        # (height, width) in, (cols, rows) out
        assert get_optimal_tiled_canvas((h, w), (448, 448), lo, hi) == grid


def test_candidate_order_is_internvls():
    for lo in range(1, 13):
        for hi in range(lo, 37):
            assert list(candidate_grids(lo, hi)) == official_candidates(lo, hi), (lo, hi)
    # Inside one area the order decides ties (only possible with min_tiles > 1): for 5x2 with
    # exactly 4 tiles, InternVL's set order gives (4, 1); transformers' processor, which lists
    # (1, 4), (2, 2), (4, 1), gives (2, 2). The training code is followed.
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    assert official_grid(5, 2, 4, 4) == choose_grid(5, 2, 4, 4) == (4, 1)
    assert tuple(get_optimal_tiled_canvas((2, 5), (448, 448), 4, 4)) == (2, 2)


def test_sweep_agrees_with_official_everywhere():
    checked = disagree_with_exact = 0
    # every size up to 128 px (small images are where the area rule and the ties bite)
    for w in range(1, 129):
        for h in range(1, 129):
            got = choose_grid(w, h, 1, 12)
            assert got == official_grid(w, h, 1, 12), (w, h)
            checked += 1
    # random sizes and settings
    rng = np.random.default_rng(10)
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(1, 8000, size=2))
        hi = int(rng.choice([1, 2, 4, 6, 12, 24, 36]))
        lo = int(rng.choice([1, 1, 1, 2, 3, hi]))
        lo = min(lo, hi)
        size = int(rng.choice([224, 448]))
        assert choose_grid(w, h, lo, hi, size) == official_grid(w, h, lo, hi, size), (w, h, lo, hi, size)
        checked += 1
    # every exact midpoint between two grid ratios, at several scales (both sides of the area rule)
    for lo, hi in [(1, 6), (1, 12), (2, 4), (4, 4), (4, 5), (5, 6), (3, 16)]:
        grids = candidate_grids(lo, hi)
        for a in grids:
            for b in grids:
                mid = (Fraction(*a) + Fraction(*b)) / 2
                if a >= b or mid in (Fraction(*a), Fraction(*b)):
                    continue
                for scale in (1, 7, 400):
                    w, h = mid.numerator * scale, mid.denominator * scale
                    official = official_grid(w, h, lo, hi)
                    assert choose_grid(w, h, lo, hi) == official, (w, h, lo, hi)
                    disagree_with_exact += official != exact_grid(w, h, lo, hi)
                    checked += 1
    print(f"grid sweep: {checked} cases agree with the official rule; {disagree_with_exact} of the "
          "midpoints are float ties where exact arithmetic would differ")
    assert checked > 20_000 and disagree_with_exact > 20


def test_sweep_agrees_with_transformers_for_min_one():
    """With min_tiles = 1 the order inside one area never decides, so transformers' processor
    (the inference side) must agree with us on every size."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(11)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 4000, size=(1500, 2))]
    sizes += [(w, h) for w, h, lo, *_ in FLOAT_TIES if lo == 1]
    for hi in (6, 12, 24):
        for w, h in sizes:
            assert choose_grid(w, h, 1, hi) == tuple(get_optimal_tiled_canvas((h, w), (448, 448), 1, hi)), (w, h, hi)
