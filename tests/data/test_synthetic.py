"""Synthetic packs: the shape a real InternVL step sees, DP-invariant, resumable, validated."""

import pytest
import torch

from megatron_internvl.config.data import DataConfig, SyntheticConfig
from megatron_internvl.data.synthetic import SyntheticPackLoader

IMG = 7


def _cfg(**kw):
    base = dict(image_size=28, num_image_token=4, max_tokens=256, max_tiles=7, pad_to_multiple=16,
                synthetic=SyntheticConfig(enabled=True, sample_tokens=60, tiles_per_sample=3))
    base.update(kw)
    return DataConfig(**base)


def test_pack_shape_matches_the_model_contract():
    cfg = _cfg()
    cfg.validate()
    b = next(SyntheticPackLoader(cfg, vocab_size=64, image_token_id=IMG))
    # Both budgets: 256 // 60 = 4 samples by tokens, 7 // 3 = 2 by tiles.
    assert b["num_samples"] == 2 and b["num_tokens"] == 120
    assert b["input_ids"].shape == (1, 128)  # padded to a multiple of 16
    assert b["cu_seqlens"].tolist() == [0, 60, 120, 128]
    assert b["pixel_values"].shape == (6, 3, 28, 28)
    assert b["num_tiles"].tolist() == [3, 3]
    # Exactly tiles x num_image_token IMG_CONTEXT tokens per sample: the model checks this count.
    for a, z in ((0, 60), (60, 120)):
        assert int((b["input_ids"][0, a:z] == IMG).sum()) == 3 * 4
        w = b["loss_weights"][0, a:z]
        supervised = int((b["labels"][0, a:z] >= 0).sum())
        assert supervised > 0 and torch.allclose(w.sum(), torch.tensor(supervised ** 0.5))
    assert int((b["labels"] >= 0).sum()) == int((b["loss_weights"] > 0).sum())


def test_global_stream_is_dp_invariant_and_resumes():
    cfg = _cfg()
    one = SyntheticPackLoader(cfg, 64, IMG)
    stream = [next(one)["input_ids"] for _ in range(6)]
    ranks = [SyntheticPackLoader(cfg, 64, IMG, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(3):
        for r in range(2):
            assert torch.equal(next(ranks[r])["input_ids"], stream[2 * step + r])
    # Saved at DP=2 after 3 steps, resumed at DP=1: the global stream continues.
    resumed = SyntheticPackLoader(cfg, 64, IMG)
    resumed.load_state_dict(ranks[0].state_dict())
    more = SyntheticPackLoader(cfg, 64, IMG)
    for _ in range(6):
        next(more)
    assert torch.equal(next(resumed)["input_ids"], next(more)["input_ids"])
    with pytest.raises(ValueError, match="real data"):
        resumed.load_state_dict({"shard_by": "sample"})


@pytest.mark.parametrize("synthetic, match", [
    (SyntheticConfig(True, sample_tokens=10, tiles_per_sample=3), "sample_tokens=10 must hold the image"),
    (SyntheticConfig(True, sample_tokens=300, tiles_per_sample=1), "fit data.max_tokens=256"),
    (SyntheticConfig(True, sample_tokens=60, tiles_per_sample=9), "tiles_per_sample=9"),
])
def test_bad_synthetic_settings_are_named(synthetic, match):
    with pytest.raises(ValueError, match=match):
        _cfg(synthetic=synthetic).validate()
