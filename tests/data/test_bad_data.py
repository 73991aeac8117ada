"""Bad data is skipped, counted per dataset and reason with file:line, logged, and bounded."""

from __future__ import annotations

import logging
import os

import pytest

from megatron_internvl.config.data import DataConfig, DatasetSpec
from megatron_internvl.data.dataset import DataSkipRatioError, build_data_loader

from .helpers import FakeMedia, conv, train_bpe, write_image, write_jsonl

GOOD = {"image": "ok.png", "conversations": conv("<image>\nWhat is it?", "A dog.")}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe(str(tmp_path_factory.mktemp("bpe") / "tokenizer.json"))


def run(tmp_path, tok, bad_line, *, name="ds", media=None, n_good=3, **kw):
    """Dataset = good, bad, good, good (bad on line 2); read it once, in order."""
    root = str(tmp_path / "media")
    write_image(os.path.join(root, "ok.png"), 32, 24)
    lines = [GOOD, bad_line] + [GOOD] * (n_good - 1)
    ann = write_jsonl(str(tmp_path / f"{name}.jsonl"), lines)
    spec = DatasetSpec(name=name, annotation=ann, root=root, max_dynamic_patch=4)
    cfg = DataConfig(datasets=[spec], tokenizer_path=tok, image_size=8, num_image_token=4, max_tokens=256,
                     max_tiles=8, pad_to_multiple=8, num_workers=0, system_message="", seed=1,
                     text_weight=None, **{"skip_ratio_warmup": 1000, **kw})
    loader = build_data_loader(cfg, media_loader=media or FakeMedia(8), stop_after=len(lines))
    batches = list(loader)
    return loader, batches, ann


def check(caplog, loader, batches, ann, reason, fragment, name="ds"):
    st = loader.stats()
    assert st["samples_read"] == 4 and st["samples_skipped"] == 1
    assert st["skips"] == {f"{name}/{reason}": 1}
    assert st["skips_by_reason"] == {reason: 1}
    assert sum(b["num_samples"] for b in batches) == 3          # the good ones still arrive
    assert loader.skips.last[f"{name}/{reason}"] == f"{ann}:2"
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1
    assert f"{ann}:2: skipped ({reason}) in dataset {name!r}" in msgs[0]
    assert fragment in msgs[0]


def test_missing_image(tmp_path, tok, caplog):
    out = run(tmp_path, tok, {"image": "nope.png", "conversations": conv("<image>\nq", "a")})
    check(caplog, *out, "missing_image", "nope.png' does not exist")


def test_corrupt_image(tmp_path, tok, caplog):
    os.makedirs(tmp_path / "media", exist_ok=True)
    (tmp_path / "media" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = run(tmp_path, tok, {"image": "broken.jpg", "conversations": conv("<image>\nq", "a")})
    check(caplog, *out, "corrupt_image", "broken.jpg' cannot be decoded")


def test_unreadable_video(tmp_path, tok, caplog):
    os.makedirs(tmp_path / "media", exist_ok=True)
    (tmp_path / "media" / "bad.mp4").write_bytes(b"garbage")
    out = run(tmp_path, tok, {"video": "bad.mp4", "conversations": conv("<video>\nq", "a")})
    check(caplog, *out, "unreadable_video", "bad.mp4' cannot be decoded")


def test_missing_video(tmp_path, tok, caplog):
    out = run(tmp_path, tok, {"video": "gone.mp4", "conversations": conv("<video>\nq", "a")})
    check(caplog, *out, "unreadable_video", "gone.mp4' does not exist")


def test_malformed_json(tmp_path, tok, caplog):
    out = run(tmp_path, tok, '{"image": "ok.png", "conversations": [')
    check(caplog, *out, "malformed_json", "not a JSON object")


def test_no_assistant_turn(tmp_path, tok, caplog):
    out = run(tmp_path, tok, {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]})
    check(caplog, *out, "no_assistant_turn", "no assistant")


def test_over_budget(tmp_path, tok, caplog):
    long = " ".join(["the quick brown fox"] * 200)
    out = run(tmp_path, tok, {"conversations": conv("hi", long)})
    check(caplog, *out, "over_budget", "not even the first answer fits max_tokens=256")


def test_over_budget_conversation_is_cut_at_a_turn(tmp_path, tok, caplog):
    """A long later turn is dropped, the first one kept: that is a cut, not a skip."""
    long = " ".join(["the quick brown fox"] * 200)
    loader, batches, _ = run(tmp_path, tok, {"image": "ok.png", "conversations": conv("<image>\nq", "short", "more?", long)})
    assert loader.stats()["samples_skipped"] == 0 and not caplog.records
    assert sum(b["num_samples"] for b in batches) == 4


@pytest.mark.parametrize("line,fragment", [
    ({"image": "ok.png", "conversations": conv("<image><image>\nq", "a")}, "2 <image> placeholder(s) but 1 image(s)"),
    ({"image": ["ok.png", "ok.png"], "conversations": conv("<image>\nq", "a")}, "1 <image> placeholder(s) but 2 image(s)"),
    ({"conversations": conv("<image>\nq", "a")}, "1 <image> placeholder(s) but 0 image(s)"),
])
def test_image_token_mismatch(tmp_path, tok, caplog, line, fragment):
    out = run(tmp_path, tok, line)
    check(caplog, *out, "image_token_mismatch", fragment)


def test_skip_ratio_raises_with_breakdown(tmp_path, tok):
    root = str(tmp_path / "media")
    write_image(os.path.join(root, "ok.png"), 32, 24)
    lines = [GOOD if k % 3 == 0 else "{oops" for k in range(60)]
    ann = write_jsonl(str(tmp_path / "bad.jsonl"), lines)
    cfg = DataConfig(datasets=[DatasetSpec("noisy", ann, root=root)], tokenizer_path=tok, image_size=8,
                     num_image_token=4, max_tokens=256, pad_to_multiple=8, num_workers=0, system_message="",
                     max_skip_ratio=0.25, skip_ratio_warmup=20)
    loader = build_data_loader(cfg, media_loader=FakeMedia(8))
    with pytest.raises(DataSkipRatioError) as e:
        for _ in range(100):
            next(loader)
    msg = str(e.value)
    assert "> data.max_skip_ratio=0.25" in msg and "noisy/malformed_json" in msg
    assert f"{ann}:" in msg and "raise data.max_skip_ratio" in msg
    assert loader.skips.seen == 20        # raised as soon as the warm-up was over


def test_warnings_are_rate_limited(tmp_path, tok, caplog):
    root = str(tmp_path / "media")
    write_image(os.path.join(root, "ok.png"), 32, 24)
    ann = write_jsonl(str(tmp_path / "a.jsonl"), [GOOD] + ["{oops"] * 20)
    cfg = DataConfig(datasets=[DatasetSpec("d", ann, root=root)], tokenizer_path=tok, image_size=8,
                     num_image_token=4, max_tokens=256, pad_to_multiple=8, num_workers=0, system_message="",
                     skip_warnings=2, max_skip_ratio=1.0)
    loader = build_data_loader(cfg, media_loader=FakeMedia(8), stop_after=21)
    list(loader)
    assert loader.stats()["skips"] == {"d/malformed_json": 20}
    msgs = [r.getMessage() for r in caplog.records]
    # the first 2, then the 4th, 8th and 16th
    assert len(msgs) == 5 and "16 'malformed_json' skips so far" in msgs[-1]


def test_real_decoders_errors_are_counted(tmp_path, tok, caplog):
    """The real image/video decoders' errors land in the right buckets."""
    from .helpers import write_video

    root = tmp_path / "media"
    root.mkdir()
    write_image(str(root / "ok.png"), 32, 24)
    good_jpeg = root / "good.jpg"
    from PIL import Image

    Image.new("RGB", (64, 48), (10, 200, 30)).save(good_jpeg, quality=90)
    (root / "truncated.jpg").write_bytes(good_jpeg.read_bytes()[:200])
    (root / "text.png").write_text("hello")
    (root / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
    write_video(str(root / "ok.mp4"), frames=4)
    lines = [
        {"image": "good.jpg", "conversations": conv("<image>\nq", "a")},
        {"image": "truncated.jpg", "conversations": conv("<image>\nq", "a")},
        {"image": "text.png", "conversations": conv("<image>\nq", "a")},
        {"video": "bad.mp4", "conversations": conv("<video>\nq", "a")},
        {"video": "ok.mp4", "conversations": conv("<video>\nq", "a")},
        {"image": ["good.jpg", "missing.jpg"], "conversations": conv("<image><image>\nq", "a")},
    ]
    ann = write_jsonl(str(tmp_path / "real.jsonl"), lines)
    cfg = DataConfig(datasets=[DatasetSpec("real", ann, root=str(root), data_augment=True)], tokenizer_path=tok,
                     image_size=8, num_image_token=4, max_tokens=256, pad_to_multiple=8, num_workers=0,
                     system_message="", num_video_frames=2, max_skip_ratio=1.0)
    loader = build_data_loader(cfg, stop_after=len(lines))
    batches = list(loader)
    assert sum(b["num_samples"] for b in batches) == 2
    assert loader.stats()["skips"] == {"real/corrupt_image": 2, "real/unreadable_video": 1, "real/missing_image": 1}
    msgs = "\n".join(r.getMessage() for r in caplog.records)
    for line, what in ((2, "truncated.jpg"), (3, "text.png"), (4, "bad.mp4"), (6, "missing.jpg")):
        assert f"{ann}:{line}: skipped" in msgs and what in msgs


def test_unencodable_text_is_a_bad_record(tmp_path, tok, caplog):
    # a lone UTF-16 surrogate is valid JSON but no tokenizer accepts it
    out = run(tmp_path, tok, '{"conversations": [{"from": "human", "value": "a\\ud800b"}, {"from": "gpt", "value": "x"}]}')
    check(caplog, *out, "bad_record", "TypeError")
