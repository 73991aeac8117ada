"""`data.decode_on: rank`: workers hand over the JPEG bytes and their tile plan, the training process
decodes them on its device. On the CPU the tiles are the worker's, bit for bit: Pillow's (the
official transform, test_images.py / test_uint8_tiles.py) and DALI-CPU's; the loader's packs,
resume included, are the same with the pixels decoded on either side."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_internvl.config import ConfigError
from megatron_internvl.config.data import DataConfig, DatasetSpec
from megatron_internvl.data import media as media_module
from megatron_internvl.data.build import build_data_loader
from megatron_internvl.data.images import (EncodedTiles, ImageDecodeError, concat_tiles, decode_image_tiles,
                                           encode_image_tiles, load_image_tiles)
from megatron_internvl.data.media import decode_site
from megatron_internvl.models.pixels import normalize_pixels

from .helpers import conv, train_bpe, write_jsonl
from .test_images import PHOTOS, _jpeg_bytes

BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("nvidia.dali") is None, reason="needs DALI (CPU build)"))]
KW = dict(max_tiles=6, image_size=28)


def _small_photos(folder) -> dict[str, str]:
    """The three photos, and china shrunk (a different grid) and re-encoded as progressive JPEG."""
    out = {}
    for name, path in PHOTOS.items():
        out[name] = shutil.copy(path, folder / f"{name}.jpg")
    with Image.open(PHOTOS["china"]) as im:
        im.resize((150, 90)).save(folder / "china_small.jpg", quality=85, progressive=True)
    out["china_small"] = str(folder / "china_small.jpg")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_decode_gives_the_worker_tiles_bit_for_bit(backend, tmp_path):
    photos = _small_photos(tmp_path)
    refs, encoded = [], []
    for augment in (False, True):
        for name, path in photos.items():
            r_worker, r_rank = np.random.default_rng(7), np.random.default_rng(7)
            ref = decode_image_tiles(path, jpeg_augment=augment, rng=r_worker, backend=backend, **KW)
            enc = encode_image_tiles(path, jpeg_augment=augment, rng=r_rank, backend=backend, **KW)
            assert isinstance(enc, EncodedTiles) and enc.shape == ref.shape and enc.dtype == ref.dtype
            assert r_rank.random() == r_worker.random(), "the worker draws the same JPEG qualities"
            assert torch.equal(enc.to("cpu"), ref), (name, augment)
            refs.append(ref)
            encoded.append(enc)
    # one pack's images decoded together (DALI: one pipeline run for the batch)
    assert torch.equal(concat_tiles(encoded).to("cpu"), torch.cat(refs))
    if backend == "pil":   # the official transform's values once normalised
        plain = encode_image_tiles(photos["grace_hopper"], **KW)
        assert torch.equal(normalize_pixels(plain.to("cpu")), load_image_tiles(photos["grace_hopper"], **KW))


def test_what_stays_in_the_worker(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    png = tmp_path / "a.png"
    Image.fromarray(rgb).save(png)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, quality=90)
    for path in (png, cmyk):   # not a JPEG DALI decodes itself: decoded here, as decode_on=worker does
        got = encode_image_tiles(path, **KW)
        assert isinstance(got, torch.Tensor) and torch.equal(got, decode_image_tiles(path, **KW))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_jpeg_bytes(rgb)[:-200])
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):   # found in the worker: a skip
        encode_image_tiles(truncated, **KW)


def test_encoded_tiles_stand_in_for_the_tensor(tmp_path):
    path = shutil.copy(PHOTOS["flower"], tmp_path / "flower.jpg")
    enc = encode_image_tiles(path, **KW)
    n = enc.shape[0]
    video = torch.randint(0, 255, (2, 3, 28, 28), dtype=torch.uint8)
    frame = torch.randint(0, 255, (1, 3, 28, 28), dtype=torch.uint8)
    pack = concat_tiles([video, enc, frame])
    assert isinstance(pack, EncodedTiles) and pack.shape == (n + 3, 3, 28, 28)
    decoded = pack.to("cpu")
    assert torch.equal(decoded, torch.cat([video, decode_image_tiles(path, **KW), frame]))
    assert torch.equal(pack[:2].to("cpu"), video) and torch.equal(pack[1:2 + n].to("cpu"), decoded[1:2 + n])
    assert pack[2 + n:].shape[0] == 1 and pack.contiguous() is pack
    with pytest.raises(ValueError, match="cut through"):
        pack[:3]
    assert concat_tiles([video, frame]).shape == (3, 3, 28, 28)   # no encoded part: a plain tensor


def test_pinning_covers_the_bytes_and_the_worker_tiles(tmp_path, monkeypatch):
    """The planned loader's DataLoader pins a batch on a GPU node by calling `pin_memory()` on what
    it holds; torch's CPU build cannot pin, so a stand-in records what would be pinned."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self) or self.clone())
    path = shutil.copy(PHOTOS["flower"], tmp_path / "flower.jpg")
    video = torch.randint(0, 255, (2, 3, 28, 28), dtype=torch.uint8)
    pack = concat_tiles([encode_image_tiles(path, **KW), video])
    batch = pin_memory({"pixel_values": pack, "num_samples": 2})
    assert isinstance(batch["pixel_values"], EncodedTiles) and batch["pixel_values"] is not pack
    assert [t.dtype for t in pinned] == [torch.uint8] * 2
    assert pinned[0].numel() == os.path.getsize(path) and pinned[1] is video   # the bytes, then the tiles
    assert torch.equal(batch["pixel_values"].to("cpu"), pack.to("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_body_that_fails_on_the_rank_gives_zero_tiles_and_names_the_file(backend, tmp_path, caplog):
    good = shutil.copy(PHOTOS["flower"], tmp_path / "flower.jpg")
    data = bytearray(_jpeg_bytes(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)))
    data[data.index(b"\xff\xda") + 5] = 9   # SOS names a component the frame lacks: the header reads fine
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(bytes(data))
    pack = concat_tiles([encode_image_tiles(p, backend=backend, **KW) for p in (good, bad)])
    with caplog.at_level(logging.WARNING, logger="megatron_internvl.data"):
        tiles = pack.to("cpu")
    n = decode_image_tiles(good, **KW).shape[0]
    assert torch.equal(tiles[:n], decode_image_tiles(good, backend=backend, **KW))
    assert tiles.shape == pack.shape and not tiles[n:].any()
    assert "bad.jpg" in caplog.text


def _mixture(tmp_path):
    photos = _small_photos(tmp_path)
    png = tmp_path / "plain.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(png)
    names = [os.path.basename(p) for p in photos.values()] + ["plain.png"]
    lines = [{"image": names[k % len(names)], "conversations": conv("<image>\nWhat is it?", f"A photo {k}.")}
             for k in range(10)]
    lines += [{"image": [names[k], names[-1 - k]], "conversations": conv(
        "Image-1: <image>\nImage-2: <image>\nCompare.", f"Both {k}.")} for k in range(3)]
    lines += [{"image": [names[0], names[3]], "text": f"page {k} <image> of a book <image> end"} for k in range(3)]
    specs = [DatasetSpec(name="chat", annotation=write_jsonl(str(tmp_path / "chat.jsonl"), lines[:13]),
                         root=str(tmp_path), max_dynamic_patch=6, data_augment=True),
             DatasetSpec(name="pages", kind="pretrain", annotation=write_jsonl(str(tmp_path / "pages.jsonl"), lines[13:]),
                         root=str(tmp_path), max_dynamic_patch=4)]
    return specs, train_bpe(str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_packs_and_resume_are_the_same_with_rank_decode(backend, tmp_path):
    specs, bpe = _mixture(tmp_path)

    def loader(decode_on, state=None):
        cfg = DataConfig(datasets=specs, tokenizer_path=bpe, image_size=28, num_image_token=4, max_tokens=256,
                         max_tiles=16, pad_to_multiple=16, seed=5, image_backend=backend,
                         num_workers=1 if backend == "pil" else 0,   # one worker: EncodedTiles through its queue
                         decode_on=decode_on)
        return build_data_loader(cfg, dp_rank=0, dp_size=2, packs_per_step=4, stop_after=16, state=state)

    worker = list(loader("worker"))
    rank_loader = loader("rank")
    first = next(rank_loader)
    state = rank_loader.state_dict()
    rank = [first] + list(loader("rank", state))   # resumed after one micro-batch
    assert len(rank) == len(worker) >= 4
    encoded_packs = 0
    for w, r in zip(worker, rank):
        assert r.keys() == w.keys()
        for key in w:
            if key == "pixel_values":
                encoded_packs += isinstance(r[key], EncodedTiles)
                assert r[key].shape == w[key].shape
                assert torch.equal(r[key].to("cpu"), w[key]), "tiles decoded on the rank = the worker's"
            elif isinstance(w[key], torch.Tensor):
                assert torch.equal(r[key], w[key]), key
            else:
                assert r[key] == w[key], key
    assert encoded_packs >= 3


def test_decode_on_setting(monkeypatch):
    with pytest.raises(ValueError, match=r"data.decode_on='gpu' must be one of \('worker', 'rank', 'auto'\)"):
        DataConfig(datasets=[DatasetSpec(name="a", annotation="a.jsonl")], tokenizer_path="t",
                   decode_on="gpu").validate()

    def site(**kw):
        return decode_site(DataConfig(**kw))

    assert site() == "worker" and site(decode_on="rank") == "rank"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert site(decode_on="auto", image_backend="dali") == "worker"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert site(decode_on="auto", image_backend="dali") == "rank"
    assert site(decode_on="auto", image_backend="pil") == "worker"
    monkeypatch.setattr(media_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs NVIDIA DALI"):
        site(decode_on="rank", image_backend="dali")
