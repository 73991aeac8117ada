"""Tiles travel as uint8 and are normalised where the ViT runs, to the same values as the
official transform (``load_image_tiles``, checked against torchvision's arithmetic and by hand in
test_images.py)."""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_internvl.config.data import DataConfig, DatasetSpec
from megatron_internvl.data.dataset import build_data_loader
from megatron_internvl.data.images import load_image_tiles
from megatron_internvl.models.pixels import normalize_pixels

from .helpers import train_bpe, write_jsonl

PHOTO = os.path.join(os.path.dirname(__import__("matplotlib").__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def test_loader_tiles_are_uint8_and_normalise_to_the_official_values(tmp_path):
    bpe = train_bpe(str(tmp_path / "tokenizer.json"))
    lines = [{"image": os.path.basename(PHOTO), "conversations": [
        {"from": "human", "value": "<image>\nWho?"}, {"from": "gpt", "value": f"Grace {k}."}]} for k in range(2)]
    spec = DatasetSpec(name="d", annotation=write_jsonl(str(tmp_path / "a.jsonl"), lines),
                       root=os.path.dirname(PHOTO), max_dynamic_patch=6)
    cfg = DataConfig(datasets=[spec], tokenizer_path=bpe, image_size=28, num_image_token=4, max_tokens=4096,
                     max_tiles=48, pad_to_multiple=1, num_workers=1, seed=3)
    batch = next(iter(build_data_loader(cfg, stop_after=2)))
    px = batch["pixel_values"]
    assert px.dtype == torch.uint8 and px.shape[1:] == (3, 28, 28) and batch["num_samples"] == 2

    official = load_image_tiles(PHOTO, max_tiles=6, image_size=28)  # float32, the transform's values
    assert px.shape[0] == 2 * official.shape[0]
    assert px.element_size() * 4 == official.element_size()
    on_rank = normalize_pixels(px)
    assert on_rank.dtype == torch.float32 and torch.equal(on_rank, torch.cat([official, official]))
    # in the model's dtype: what the step fed the ViT before (float32 tiles cast to bf16)
    assert torch.equal(normalize_pixels(px, torch.bfloat16), torch.cat([official, official]).to(torch.bfloat16))


def test_float_tiles_are_taken_as_normalised():
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32))
    assert torch.equal(normalize_pixels(x), x)
    assert torch.equal(normalize_pixels(x, torch.bfloat16), x.to(torch.bfloat16))
    empty = normalize_pixels(torch.zeros((0, 3, 4, 4), dtype=torch.uint8), torch.bfloat16)
    assert empty.shape == (0, 3, 4, 4) and empty.dtype == torch.bfloat16
