"""Synthetic packed micro-batches: random tokens and pixels of a real InternVL shape, no files.

For throughput and MFU runs (``data.synthetic.enabled=true``): every sample is one image of
``tiles_per_sample`` tiles (``tiles x num_image_token`` IMG_CONTEXT tokens) inside
``sample_tokens`` tokens, the answer half supervised; packs hold as many samples as both budgets
(``max_tokens``, ``max_tiles``) allow and go through the same collation as real data. Pack g of
the global stream is drawn from (seed, g) and data-parallel rank r of R takes packs r, r+R, ...,
so the global batch does not depend on the DP size and resume is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megatron_internvl.config.data import DataConfig

from .loss_weights import IGNORE_INDEX, square_average_weights
from .packing import PackedSample, collate_pack

NAME = "synthetic"


class SyntheticPackLoader:
    dataset_names = [NAME]

    def __init__(self, cfg: DataConfig, vocab_size: int, image_token_id: int, dp_rank: int = 0,
                 dp_size: int = 1):
        s = cfg.synthetic
        self.cfg, self.vocab_size, self.image_token_id = cfg, vocab_size, image_token_id
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.image_tokens = s.tiles_per_sample * cfg.num_image_token
        per_pack = cfg.max_tokens // s.sample_tokens
        if s.tiles_per_sample:
            per_pack = min(per_pack, cfg.max_tiles // s.tiles_per_sample)
        self.samples_per_pack = per_pack
        # Pixel values do not change the cost of a step: one seeded block, sliced per pack.
        gen = torch.Generator().manual_seed(cfg.seed)
        tiles = per_pack * s.tiles_per_sample
        self.pixels = torch.randn((tiles, 3, cfg.image_size, cfg.image_size), generator=gen)
        self.next_pack = 0  # local index

    def __iter__(self) -> "SyntheticPackLoader":
        return self

    def _sample(self, rng: np.random.Generator, index: int, key: tuple) -> PackedSample:
        s, L = self.cfg.synthetic, self.cfg.synthetic.sample_tokens
        ids = rng.integers(0, self.vocab_size, L, dtype=np.int64)
        ids[ids == self.image_token_id] = (self.image_token_id + 1) % self.vocab_size
        start = 1  # a BOS-like first token, then the image
        ids[start : start + self.image_tokens] = self.image_token_id
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        answer = start + self.image_tokens + (L - start - self.image_tokens) // 2
        labels[answer - 1 : L - 1] = ids[answer:L]  # shifted: position t predicts token t + 1
        tiles = s.tiles_per_sample
        return PackedSample(
            input_ids=ids, labels=labels,
            loss_weights=square_average_weights(labels, self.cfg.loss_reduction),
            position_ids=np.arange(L, dtype=np.float32),
            pixel_values=self.pixels[index * tiles : (index + 1) * tiles],
            num_tiles=[tiles] if tiles else [], dataset_index=0, key=key)

    def __next__(self) -> dict[str, Any]:
        g = self.next_pack * self.dp_size + self.dp_rank
        rng = np.random.default_rng((self.cfg.seed, g))
        samples = [self._sample(rng, i, (g, i)) for i in range(self.samples_per_pack)]
        self.next_pack += 1
        return collate_pack(samples, image_size=self.cfg.image_size, pad_to_multiple=self.cfg.pad_to_multiple,
                            dataset_names=self.dataset_names)

    def state_dict(self) -> dict[str, Any]:
        return {"synthetic": True, "next_pack": self.next_pack, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("synthetic"):
            raise ValueError("the checkpoint's data state is from real data; resume with "
                             "data.synthetic.enabled=false, or set checkpoint.finetune=true")
        # Packs are global: a DP change keeps the stream, counted in global packs.
        self.next_pack = state["next_pack"] * state["dp_size"] // self.dp_size

    def stats(self) -> dict[str, Any]:
        return {"packs": self.next_pack}
