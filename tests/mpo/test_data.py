"""Preference pairs through the SFT data path: a pair is one packing unit, its tiles are once."""

import json

import numpy as np
import pytest

from megatron_internvl.config import load_config
from megatron_internvl.data.build import build_tokenizer
from megatron_internvl.data.preference import build_preference_loader
from training.runner import ROOT


def _config(data_dir, meta="meta_mpo.json", *extra):
    return load_config(ROOT / "examples" / "tiny" / "mpo.yaml", [
        f"data.meta_path={data_dir / meta}", f"data.tokenizer_path={data_dir / 'tokenizer.json'}", *extra])


def test_pairs_pack_as_units_with_tiles_once(tiny_data):
    cfg = _config(tiny_data)
    tok = build_tokenizer(cfg.data)
    lines = [json.loads(x) for x in (tiny_data / "preference.jsonl").read_text().splitlines()]
    texts = {(r["chosen"], r["rejected"]) for r in lines}
    loader = build_preference_loader(cfg.data, tok, stop_after=len(lines))
    nit = cfg.data.num_image_token
    pairs_seen = 0
    for b in loader:
        cu = b["cu_seqlens"].tolist()
        ids, labels, side = b["input_ids"][0], b["labels"][0], b["response_side"][0]
        assert len(b["pair_ids"]) == b["num_pairs"] == b["num_samples"]
        assert cu[2 * b["num_pairs"]] == b["num_tokens"] <= cfg.data.max_tokens  # two segments per pair
        # tiles once: one feature row per tile token, read by both responses' <IMG_CONTEXT> runs
        n_ctx = int((ids == cfg.model.image_token_id).sum())
        assert b["pixel_values"].shape[0] * nit * 2 == n_ctx == b["image_slots"].numel()
        for k in range(b["num_pairs"]):
            c, r = ids[cu[2 * k]:cu[2 * k + 1]], ids[cu[2 * k + 1]:cu[2 * k + 2]]
            sc, sr = side[cu[2 * k]:cu[2 * k + 1]], side[cu[2 * k + 1]:cu[2 * k + 2]]
            assert set(sc.tolist()) == {-1, 0} and set(sr.tolist()) == {-1, 1}
            # the prompt is the same in both sequences, up to the first scored token
            start_c = int(np.flatnonzero(sc.numpy() == 0)[0]) + 1
            start_r = int(np.flatnonzero(sr.numpy() == 1)[0]) + 1
            assert start_c == start_r and (c[:start_c] == r[:start_r]).all()
            lab_c = labels[cu[2 * k]:cu[2 * k + 1]][sc == 0].tolist()
            lab_r = labels[cu[2 * k + 1]:cu[2 * k + 2]][sr == 1].tolist()
            decoded = (tok.decode(lab_c).replace("<|im_end|>", ""), tok.decode(lab_r).replace("<|im_end|>", ""))
            assert decoded in texts
            w = b["loss_weights"][0][cu[2 * k]:cu[2 * k + 2]]
            # token-mean SFT on the chosen response only
            assert (w[:len(c)][sc == 0] == 1).all() and (w[:len(c)][sc != 0] == 0).all() and (w[len(c):] == 0).all()
        pairs_seen += b["num_pairs"]
    assert pairs_seen == len(lines) and loader.stats()["samples_skipped"] == 0


def test_bad_pairs_are_skipped_and_counted(tiny_data, tmp_path):
    good = json.loads((tiny_data / "preference.jsonl").read_text().splitlines()[0])
    bad = [
        "{not json",
        json.dumps({"question": "q", "chosen": "a"}),                      # no rejected
        json.dumps({**good, "rejected": "  "}),                            # empty response
        json.dumps({**good, "rejected": good["chosen"]}),                  # identical responses
        json.dumps({**good, "image": "images/none.jpg"}),                  # missing image
        json.dumps({**good, "question": "<image>\n" + "word " * 2000}),    # over the token budget
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps(good)] + bad + [json.dumps(good)]) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"prefs": {"root": str(tiny_data), "annotation": str(path)}}))
    cfg = _config(tiny_data, "meta.json", "data.max_skip_ratio=1.0", "data.shard_by=sample")
    cfg.data.meta_path = str(tmp_path / "meta.json")
    loader = build_preference_loader(cfg.data, build_tokenizer(cfg.data), stop_after=8)
    packs = list(loader)
    assert sum(b["num_pairs"] for b in packs) == 2
    stats = loader.stats()
    assert stats["samples_skipped"] == 6
    assert stats["skips_by_reason"] == {"malformed_json": 1, "bad_record": 1, "bad_pair": 2,
                                        "missing_image": 1, "over_budget": 1}
    assert loader.skips.last["prefs/missing_image"] == f"{path}:6"
    assert loader.skips.last["prefs/over_budget"] == f"{path}:7"


def test_flops_count_a_pairs_tiles_once(tiny_data):
    """The official trainer repeats a pair's tiles for each response: twice the ViT work."""
    from megatron_internvl.models.flops import StepShapes, component_flops

    cfg = _config(tiny_data)
    b = next(build_preference_loader(cfg.data, build_tokenizer(cfg.data)))
    from megatron_internvl.training.step import sample_lengths

    lengths, tiles = sample_lengths(b), int(b["pixel_values"].shape[0])
    assert len(lengths) == 2 * b["num_pairs"] and tiles > 0
    trainable = {"vision": False, "projector": True, "language": True}  # the mpo stage
    shared = component_flops(cfg.model, StepShapes(lengths, tiles), trainable)
    repeated = component_flops(cfg.model, StepShapes(lengths, 2 * tiles), trainable)
    assert repeated["vision"] == 2 * shared["vision"] and repeated["projector"] == 2 * shared["projector"]
    assert repeated["language"] == shared["language"]
    share = lambda f: f["vision"] / sum(f.values())  # noqa: E731
    assert share(shared) < share(repeated)


class _CountingMedia:
    """The real decoder, counting which images it decodes; header reads go to the header reader."""

    def __init__(self, cfg):
        from megatron_internvl.data.media import MediaLoader

        self.real = MediaLoader(cfg.image_size, cfg.use_thumbnail)
        self.cfg, self.decoded = cfg, []

    def image_tiles(self, path, **kw):
        self.decoded.append(path.rsplit("/", 1)[-1])
        return self.real.image_tiles(path, **kw)

    def header_only(self):
        from megatron_internvl.data.media import HeaderOnlyMedia

        return HeaderOnlyMedia(self.cfg.image_size, self.cfg.use_thumbnail)


def test_pairs_planned_like_sft_decode_only_own_and_resume_at_another_dp_size(tiny_data):
    """shard_by=global: the global batch of pairs is the same at any DP size, each reader decodes
    only the images of its own pairs, and a DP=2 state resumes at DP=1 and DP=4."""
    from collections import Counter

    from data.helpers import batch_digest
    from megatron_internvl.data.preference import pair_id

    cfg = _config(tiny_data, "meta_mpo.json", "data.shard_by=global", "data.max_tokens=512")
    tok, G = build_tokenizer(cfg.data), 4
    images = {}
    for line in (tiny_data / "preference.jsonl").read_text().splitlines():
        rec = json.loads(line)
        images[pair_id("tiny_preference", rec)] = [rec["image"].rsplit("/", 1)[-1]] if "image" in rec else []

    def loaders(dp, state=None):
        return [build_preference_loader(cfg.data, tok, r, dp, packs_per_step=G, media_loader=_CountingMedia(cfg.data),
                                        state=state) for r in range(dp)]

    def steps(ls, n):
        out = []
        for _ in range(n):
            step = {}
            for L in ls:
                for _ in range(G // len(ls)):
                    b = next(L)
                    assert b["num_pairs"] == len(b["pair_ids"]) and b["num_tokens"] <= 512
                    step[tuple(b["pair_ids"])] = batch_digest(b)
                    L.mine = getattr(L, "mine", []) + [img for p in b["pair_ids"] for img in images[p]]
            out.append(step)
        return out

    ref = steps(loaders(1), 5)
    dp2 = loaders(2)
    assert steps(dp2, 2) == ref[:2]
    for L in dp2:  # a reader decodes the images of its own pairs, nobody else's
        assert Counter(L.builder.media.decoded) == Counter(L.mine) and L.mine
    state = dp2[0].state_dict()
    assert state["plan"] == dp2[1].state_dict()["plan"], "the data state is global"
    for dp in (1, 4):
        assert steps(loaders(dp, state), 3) == ref[2:], f"resumed at DP={dp}"
