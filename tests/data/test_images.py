"""Image tiles: shapes, normalisation, JPEG augmentation, DALI vs Pillow, decode errors."""

import importlib.util
import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_internvl.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    MediaDecodeError,
    PILDecoder,
    draw_jpeg_qualities,
    dynamic_preprocess,
    load_image_tiles,
    normalize_tiles,
)

# DALI vs Pillow on normalised tiles (see docs/data.md, "Images, tiling and decoding"):
# measured worst over the three photos and resized variants 0.296 max / 0.0036 mean.
DALI_TOL_MAX = 0.35
DALI_TOL_MEAN = 0.005
# ... and in uint8 levels, at most this fraction of values may differ by more than 2 levels
# (measured worst 0.00022): the backends agree almost everywhere, not only on average.
DALI_TOL_FRAC_OVER_2 = 0.001


def _package_file(package, *parts):
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"{package} is a test dependency (pip install -e .[test])"
    return os.path.join(spec.submodule_search_locations[0], *parts)


PHOTOS = {
    "grace_hopper": _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
    "china": _package_file("sklearn", "datasets", "images", "china.jpg"),
    "flower": _package_file("sklearn", "datasets", "images", "flower.jpg"),
}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _jpeg_bytes(array, quality=95):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _quadrants(size=448):
    """2x2 grid exactly: four flat colours, so tile order and values need no resize maths."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    img = np.zeros((2 * size, 2 * size, 3), np.uint8)
    img[:size, :size], img[:size, size:] = colours[0], colours[1]
    img[size:, :size], img[size:, size:] = colours[2], colours[3]
    return img, colours


@pytest.fixture(scope="module")
def dali():
    pytest.importorskip("nvidia.dali")
    from megatron_internvl.data.images import DALIDecoder

    return DALIDecoder(device="cpu")


def test_dynamic_preprocess_shapes_and_layout():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), np.uint8))
    tiles = dynamic_preprocess(image, 1, 12, 448, use_thumbnail=True)
    assert len(tiles) == 13 and all(t.size == (448, 448) for t in tiles)  # 4x3 + thumbnail
    resized = np.asarray(image.resize((4 * 448, 3 * 448), Image.Resampling.BICUBIC))
    for k in (0, 5, 11):  # row-major: tile k is at row k // 4, column k % 4
        r, c = divmod(k, 4)
        np.testing.assert_array_equal(
            np.asarray(tiles[k]), resized[r * 448:(r + 1) * 448, c * 448:(c + 1) * 448]
        )
    thumb = np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(np.asarray(tiles[-1]), thumb)
    assert len(dynamic_preprocess(image, 1, 12, 448, use_thumbnail=False)) == 12
    assert len(dynamic_preprocess(image.resize((300, 300)), 1, 12, 448, True)) == 1


def test_normalisation_matches_hand_computation():
    img, colours = _quadrants(448)
    x = load_image_tiles(_jpeg_bytes(img, 100), max_tiles=4, backend="pil")
    assert x.shape == (5, 3, 448, 448) and x.dtype == torch.float32
    # the JPEG round trip moves flat colours by a few levels; compare against the decoded pixels
    decoded = np.asarray(Image.open(io.BytesIO(_jpeg_bytes(img, 100))).convert("RGB"))
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        pixel = decoded[r * 448 + 224, c * 448 + 224].astype(np.float64)
        for ch in range(3):
            expected = (pixel[ch] / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
            assert abs(x[k, ch, 224, 224].item() - expected) < 1e-5
        assert np.abs(pixel - colours[k]).max() <= 4  # and the tile really is quadrant k

    # exact values without any codec: white and black
    tiles = np.stack([np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)])
    y = normalize_tiles(tiles)
    for ch in range(3):
        assert y[0, ch].unique().item() == pytest.approx((1 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch], abs=1e-6)
        assert y[1, ch].unique().item() == pytest.approx(-IMAGENET_MEAN[ch] / IMAGENET_STD[ch], abs=1e-6)


def test_jpeg_qualities_uniform_in_range_and_deterministic():
    q = draw_jpeg_qualities(np.random.default_rng(0), 20000)
    assert min(q) == 75 and max(q) == 100 and len(set(q)) == 26
    assert abs(np.mean(q) - 87.5) < 0.2
    assert draw_jpeg_qualities(np.random.default_rng(5), 50) == draw_jpeg_qualities(np.random.default_rng(5), 50)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert draw_jpeg_qualities(g1, 30) == draw_jpeg_qualities(g2, 30)
    with pytest.raises(TypeError, match="numpy.random.Generator or torch.Generator"):
        draw_jpeg_qualities(np.random.RandomState(0), 3)


def test_jpeg_augmentation():
    path = PHOTOS["china"]
    kw = dict(max_tiles=6, backend="pil")
    plain = load_image_tiles(path, **kw)
    aug1 = load_image_tiles(path, jpeg_augment=True, rng=np.random.default_rng(11), **kw)
    aug1b = load_image_tiles(path, jpeg_augment=True, rng=np.random.default_rng(11), **kw)
    aug2 = load_image_tiles(path, jpeg_augment=True, rng=np.random.default_rng(12), **kw)
    off = load_image_tiles(path, jpeg_augment=False, rng=np.random.default_rng(11), **kw)

    assert torch.equal(off, plain)  # disabled means untouched, even with an rng at hand
    assert torch.equal(aug1, aug1b)  # same seed, same tiles: resume is exact
    assert not torch.equal(aug1, aug2)  # another seed, other qualities
    # mean change per tile in uint8 levels: JPEG at q in [75, 100] moves pixels by ~1-5 levels
    level = 255 * 0.226
    per_tile = (aug1 - plain).abs().mean(dim=(1, 2, 3)) * level
    assert per_tile.shape == (7,)
    assert bool((per_tile > 0.3).all()) and bool((per_tile < 8).all()), per_tile
    # the torch Generator path is deterministic as well
    t1 = load_image_tiles(path, jpeg_augment=True, rng=torch.Generator().manual_seed(1), **kw)
    t2 = load_image_tiles(path, jpeg_augment=True, rng=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(t1, t2) and not torch.equal(t1, plain)
    with pytest.raises(ValueError, match="needs rng"):
        load_image_tiles(path, jpeg_augment=True, **kw)


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_dali_matches_pil_on_real_photos(dali, photo):
    before = dali.stats["dali"]
    for max_tiles in (1, 12):
        a = load_image_tiles(PHOTOS[photo], max_tiles=max_tiles, backend="pil")
        b = load_image_tiles(PHOTOS[photo], max_tiles=max_tiles, backend=dali)
        assert a.shape == b.shape
        diff = (a - b).abs()
        assert diff.max().item() <= DALI_TOL_MAX, diff.max().item()
        assert diff.mean().item() <= DALI_TOL_MEAN, diff.mean().item()
        data = _read(PHOTOS[photo])
        kw = dict(min_tiles=1, max_tiles=max_tiles, image_size=448, use_thumbnail=True)
        ua = PILDecoder().tiles(data, photo, **kw).astype(int)
        ub = dali.tiles(data, photo, **kw).astype(int)
        assert (np.abs(ua - ub) > 2).mean() <= DALI_TOL_FRAC_OVER_2
    assert dali.stats["dali"] == before + 4  # DALI really decoded, no silent fallback


def test_dali_jpeg_augmentation_matches_pil(dali):
    tiles = PILDecoder().tiles(_read(PHOTOS["grace_hopper"]), "g", min_tiles=1,
                               max_tiles=6, image_size=448, use_thumbnail=True)
    qualities = [75, 88, 100][: len(tiles)] + [90] * max(0, len(tiles) - 3)
    a = PILDecoder().jpeg_compress(tiles, qualities).astype(int)
    b = dali.jpeg_compress(tiles, qualities).astype(int)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 0.05  # bit-identical with the libjpeg builds measured
    assert np.abs(b - tiles).mean() > 0.3  # and it did compress
    # end to end with one seed: the same qualities reach both backends
    x = load_image_tiles(PHOTOS["flower"], max_tiles=6, jpeg_augment=True, rng=np.random.default_rng(4))
    y = load_image_tiles(PHOTOS["flower"], max_tiles=6, jpeg_augment=True, rng=np.random.default_rng(4),
                         backend=dali)
    assert (x - y).abs().mean().item() <= 2 * DALI_TOL_MEAN


def test_dali_exact_grid_and_tile_order(dali):
    img, _ = _quadrants(448)
    data = _jpeg_bytes(img, 100)
    a = load_image_tiles(data, max_tiles=4, backend="pil")
    b = load_image_tiles(data, max_tiles=4, backend=dali)
    # no resize happens for the 2x2 grid, so the tiles agree exactly; only the thumbnail resizes
    assert torch.equal(a[:4], b[:4])
    assert (a[4] - b[4]).abs().max().item() <= DALI_TOL_MAX


def test_dali_falls_back_to_pil_for_other_formats(dali):
    rgba = np.random.default_rng(2).integers(0, 256, (300, 500, 4), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    before = dali.stats["pil_fallback"]
    a = load_image_tiles(buf.getvalue(), max_tiles=6, backend="pil")
    b = load_image_tiles(buf.getvalue(), max_tiles=6, backend=dali)
    assert torch.equal(a, b) and dali.stats["pil_fallback"] == before + 1


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_decode_errors_name_the_file(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageDecodeError, match="missing.jpg: file not found") as e:
        load_image_tiles(missing, max_tiles=6, backend=backend)
    assert e.value.source == str(missing)

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    with pytest.raises(ImageDecodeError, match="garbage.jpg"):
        load_image_tiles(garbage, max_tiles=6, backend=backend)

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_read(PHOTOS["china"])[:30000])
    with pytest.raises(ImageDecodeError, match="truncated.jpg") as e:
        load_image_tiles(truncated, max_tiles=6, backend=backend)
    assert isinstance(e.value, MediaDecodeError)

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image_tiles(empty, max_tiles=6, backend=backend)

    # a failed decode must not poison the decoder: the next good image works
    assert load_image_tiles(PHOTOS["flower"], max_tiles=1, backend=backend).shape == (1, 3, 448, 448)


def test_decode_error_survives_pickling():
    # raised inside a data-loader worker, it crosses a process boundary
    err = pickle.loads(pickle.dumps(ImageDecodeError("/data/x.jpg", "file not found")))
    assert isinstance(err, ImageDecodeError)
    assert (err.source, err.reason) == ("/data/x.jpg", "file not found")
    assert "/data/x.jpg" in str(err)


def test_unknown_backend_and_bad_input():
    with pytest.raises(ValueError, match="choose 'pil' or 'dali'"):
        load_image_tiles(PHOTOS["flower"], max_tiles=6, backend="opencv")
    with pytest.raises(TypeError, match="path or encoded bytes"):
        load_image_tiles(12345, max_tiles=6)


def test_normalisation_is_torchvision_arithmetic():
    """Bit-identical to ToTensor + Normalize's float32 ops, so InternVL checkpoints see the
    same inputs; the implementation reorders memory traffic, not arithmetic."""
    tiles = np.random.default_rng(7).integers(0, 256, (3, 32, 32, 3), np.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    reference = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    out = normalize_tiles(tiles)
    assert out.is_contiguous() and torch.equal(out, reference)
    assert torch.equal(normalize_tiles([Image.fromarray(t) for t in tiles]), reference)


_FORK_DECODER = {}


def _decode_in_child(path):
    torch.set_num_threads(1)  # as torch's DataLoader workers do: OpenMP does not survive fork
    x = load_image_tiles(path, max_tiles=6, backend=_FORK_DECODER["dali"])
    return float(x.double().sum()), _FORK_DECODER["dali"].stats["dali"]


@pytest.mark.timeout(120)
def test_dali_decoder_survives_fork(dali):
    """Data-loader workers are forked after the parent may have used the decoder; DALI's threads
    do not survive fork, so the child must build its own pipeline rather than hang."""
    import multiprocessing

    _FORK_DECODER["dali"] = dali
    expected = float(load_image_tiles(PHOTOS["china"], max_tiles=6, backend=dali).double().sum())
    with multiprocessing.get_context("fork").Pool(1) as pool:
        total, _ = pool.apply_async(_decode_in_child, (PHOTOS["china"],)).get(timeout=90)
    assert total == expected
    # and the parent, whose pipelines were shut down for the fork, carries on
    assert float(load_image_tiles(PHOTOS["china"], max_tiles=6, backend=dali).double().sum()) == expected


@pytest.mark.timeout(120)
def test_fork_collects_abandoned_dali_pipelines_first(dali):
    """A pipeline left to the cycle collector (as one held by an exception's traceback is) must be
    collected before a fork: collected in the child, its destructor shuts down threads that do not
    exist there and the worker dies with SIGSEGV (seen once in CI)."""
    import gc
    import os

    load_image_tiles(PHOTOS["china"], max_tiles=6, backend=dali)
    abandoned = {"pipe": dali._build_image_pipe()}
    abandoned["cycle"] = abandoned
    del abandoned
    was_enabled = gc.isenabled()
    gc.disable()  # no collection between here and the fork but the fork hook's own
    try:
        pid = os.fork()
        if pid == 0:
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    finally:
        if was_enabled:
            gc.enable()
    assert not os.WIFSIGNALED(status), f"the forked child died of signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0
