"""Model pieces that need no distributed setup: pixel unshuffle, V2PE rotary angles, padding."""

import math

import numpy as np
import pytest
import torch

from megatron_internvl.data.positions import position_ids
from megatron_internvl.models.padding import padded_num_heads, padded_vocab_size
from megatron_internvl.models.rotary import FloatRotary
from megatron_internvl.models.vision import pixel_unshuffle


def test_pixel_unshuffle_v2_order():
    grid, ch, tiles = 6, 3, 2
    x = torch.empty(tiles, grid * grid, ch)
    for t in range(tiles):
        for r in range(grid):
            for c in range(grid):
                x[t, r * grid + c] = torch.tensor([10000 * t + 100 * r + c + 0.01 * k for k in range(ch)])
    out = pixel_unshuffle(x)
    assert out.shape == (tiles, (grid // 2) ** 2, 4 * ch)
    for t in range(tiles):
        for r in range(grid // 2):
            for c in range(grid // 2):
                expected = torch.cat([x[t, (2 * r) * grid + 2 * c], x[t, (2 * r) * grid + 2 * c + 1],
                                      x[t, (2 * r + 1) * grid + 2 * c], x[t, (2 * r + 1) * grid + 2 * c + 1]])
                # output tokens are row-major over the half-resolution grid
                assert torch.equal(out[t, r * (grid // 2) + c], expected), (t, r, c)


def test_pixel_unshuffle_rejects_bad_grid():
    with pytest.raises(ValueError, match="square grid"):
        pixel_unshuffle(torch.zeros(1, 15, 4))


def _v2pe_positions_float64(layout, delta):
    """Independent V2PE rule: text +1, each visual token +delta, after the image round up."""
    pos, cur = [], -1.0
    for kind in layout:
        if kind == "v":
            cur = cur + delta
        else:
            if pos and layout[len(pos) - 1] == "v":
                cur = math.ceil(cur)
            cur = cur + 1.0
        pos.append(cur)
    return np.array(pos, dtype=np.float64)


@pytest.mark.parametrize("delta", [1.0, 0.5, 0.25, 1 / 256])
def test_v2pe_rotary_angles_of_visual_tokens(delta):
    # <s> t t <img> [N visual] </img> t t <img> [N visual] </img> t
    n_vis = 7
    layout = ["t"] * 4 + ["v"] * n_vis + ["t"] * 3 + ["v"] * n_vis + ["t"] * 2
    spans, i = [], 0
    while i < len(layout):
        if layout[i] == "v":
            j = i
            while j < len(layout) and layout[j] == "v":
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    expected = _v2pe_positions_float64(layout, delta)
    got = position_ids(len(layout), spans, [delta] * len(spans))
    np.testing.assert_array_equal(got.astype(np.float64), expected)

    head_dim, theta = 16, 1_000_000.0
    rotary = FloatRotary(head_dim, theta)
    emb = rotary(torch.from_numpy(got)[None], packed=True)  # [T, 1, 1, D]
    angles = emb[:, 0, 0, : head_dim // 2].double()
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ref = np.outer(expected, inv_freq)
    visual = [k for k, kind in enumerate(layout) if kind == "v"]
    np.testing.assert_allclose(angles[visual].numpy(), ref[visual], rtol=2e-7, atol=1e-12)
    # rotate-half layout: both halves carry the same angles
    assert torch.equal(emb[..., : head_dim // 2], emb[..., head_dim // 2 :])


def test_v2pe_delta_one_is_integer_positions():
    got = position_ids(20, [(3, 12)], [1.0])
    assert np.array_equal(got, np.arange(20, dtype=np.float32))
    rotary = FloatRotary(8, 10000.0)
    a = rotary(torch.from_numpy(got)[None], packed=False)
    b = rotary(torch.arange(20, dtype=torch.float32)[None], packed=False)
    assert torch.equal(a, b)


def test_padding_sizes():
    assert padded_vocab_size(151674, 1) == 151680
    assert padded_vocab_size(151674, 8) == 152576
    assert padded_vocab_size(151674, 8) % (128 * 8) == 0
    assert padded_vocab_size(256, 2) == 256
    assert [padded_num_heads(25, tp) for tp in (1, 2, 4, 8)] == [25, 26, 28, 32]
    assert padded_num_heads(16, 8) == 16
