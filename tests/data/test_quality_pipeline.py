"""filter-data / filter-apply end to end: outputs, the review round trip into a meta file the
trainer and inspect-data accept, exact removals, input untouched, resume after an interruption,
the same result on several processes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from megatron_internvl.cli import main as cli_main
from megatron_internvl.data.quality import pipeline
from megatron_internvl.data.quality.pipeline import FilterError, read_flagged, run_filter
from megatron_internvl.data.quality.review import ReviewError, apply_review
from megatron_internvl.data.quality.settings import load_settings

from .helpers import make_toy_data, toy_config, train_bpe

LOOP_ANSWER = "The dog runs. " + " ".join(["The fox follows the dog across the field."] * 12)
PLANTED = {
    # dataset -> lines appended to its annotation file (each is one anomaly)
    "single": [
        {"image": "img1.png", "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                                {"from": "gpt", "value": LOOP_ANSWER}]},
        {"image": "img2.png", "conversations": [{"from": "human", "value": "<image>\nCount."},
                                                {"from": "gpt", "value": "0 " * 40}]},
        {"image": ["img1.png", "img2.png"], "conversations": [{"from": "human", "value": "<image>\nBoth?"},
                                                              {"from": "gpt", "value": "Yes."}]},
        "{broken json",
    ],
    "corpus": [{"text": "the dog " + "0" * 60}, {"text": "   "}],
}


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def mixture(tmp_path):
    meta = make_toy_data(str(tmp_path / "data"), real_videos=True)
    for name, recs in PLANTED.items():
        with open(tmp_path / "data" / "ann" / f"{name}.jsonl", "a", encoding="utf-8") as f:
            f.write("\n")   # an empty line: not a sample, but counted in line numbers
            for r in recs:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return meta


def lines_of(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return [line.rstrip(b"\n") for line in f]


def test_round_trip_review_apply_into_the_trainer(mixture, tmp_path, capsys):
    inputs = {n: str(tmp_path / "data" / "ann" / f"{n}.jsonl") for n in ("single", "corpus", "text")}
    before = {n: sha(p) for n, p in inputs.items()}
    out = str(tmp_path / "filtered")
    assert cli_main(["filter-data", "--meta", mixture, "--out", out]) == 0
    table = capsys.readouterr().out
    assert "repetition.loop" in table and "single" in table
    assert {n: sha(p) for n, p in inputs.items()} == before          # input never modified

    flagged = {r["line"]: r for r in read_flagged(os.path.join(out, "single", "flagged.jsonl"))}
    original = lines_of(inputs["single"])
    planted_lines = {len(original) - 3 + k: r for k, r in enumerate(PLANTED["single"])}
    assert set(flagged) == set(planted_lines)
    rules = {line: set(r["rules"]) for line, r in flagged.items()}
    loop_line, zero_line, two_img_line, broken_line = sorted(planted_lines)
    assert {"repetition.loop", "repetition.sentences"} <= rules[loop_line]
    assert "token_run" in rules[zero_line] and rules[two_img_line] == {"placeholders"}
    assert rules[broken_line] == {"unreadable"}
    loop_ev = next(e for e in flagged[loop_line]["evidence"] if e["rule"] == "repetition.loop")
    assert "The fox follows the dog across the field" in loop_ev["span"] and loop_ev["repeats"] >= 11
    assert flagged[broken_line]["sample"] == "{broken json"
    # kept.jsonl: the input minus the flagged lines, bytes unchanged
    kept = lines_of(os.path.join(out, "single", "kept.jsonl"))
    assert kept == [raw for i, raw in enumerate(original, 1) if raw.strip() and i not in flagged]

    report = json.load(open(os.path.join(out, "report.json")))
    by_name = {d["dataset"]: d for d in report["datasets"]}
    assert by_name["single"]["seen"] == 44 and by_name["single"]["flagged"] == 4 and by_name["single"]["kept"] == 40
    # the looping answer and the "0 0 0 ..." one (period 1)
    assert by_name["single"]["rules"]["repetition.loop"] == {"seen": 43, "flagged": 2, "kept": 41}
    assert by_name["corpus"]["flagged"] == 2 and by_name["text"]["flagged"] == 0
    assert os.path.getsize(os.path.join(out, "report.png")) > 1000
    assert "single" in open(os.path.join(out, "report.txt")).read()

    # review: keep the looping sample (a person decides it is fine), drop the rest (the default)
    review_path = os.path.join(out, "single", "review.tsv")
    rows = open(review_path, encoding="utf-8").read().split("\n")
    assert sum(r.startswith("drop\t") for r in rows) == 4
    rows = [("keep" + r[4:]) if r.startswith(f"drop\t{loop_line}\t") else r for r in rows]
    open(review_path, "w", encoding="utf-8").write("\n".join(rows))
    new = str(tmp_path / "reviewed")
    assert cli_main(["filter-apply", "--review", out, "--out", new]) == 0

    new_meta = json.load(open(os.path.join(new, "meta.json")))
    old_meta = json.load(open(mixture))
    assert list(new_meta) == list(old_meta)                              # dataset order kept
    assert new_meta["single"]["root"] == str(tmp_path / "data" / "images")
    assert new_meta["single"]["max_dynamic_patch"] == old_meta["single"]["max_dynamic_patch"]
    dropped = set(flagged) - {loop_line}
    got = lines_of(os.path.join(new, new_meta["single"]["annotation"]))
    assert got == [raw for i, raw in enumerate(original, 1) if raw.strip() and i not in dropped]
    assert new_meta["single"]["length"] == len(got) == 41
    # the other datasets: exactly their flagged lines gone
    corpus = lines_of(os.path.join(new, new_meta["corpus"]["annotation"]))
    assert corpus == [r for r in lines_of(inputs["corpus"]) if r.strip()][:-2]
    assert lines_of(os.path.join(new, new_meta["text"]["annotation"])) == [r for r in lines_of(inputs["text"]) if r.strip()]

    # inspect-data reads the new mixture: every sample read, none skipped
    tok = train_bpe(str(tmp_path / "tok" / "tokenizer.json"))
    capsys.readouterr()
    # (inspect-data returns its exit status since a260625; it used to exit)
    assert cli_main(["inspect-data", "--meta", os.path.join(new, "meta.json"), "--tokenizer", tok,
                     "--max-tokens", "512", "--max-tiles", "12", "--image-size", "8", "--num-image-token", "4",
                     "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples_skipped"] == 0 and stats["samples"] > 0
    # and the trainer's loader
    from megatron_internvl.data.dataset import build_data_loader

    loader = build_data_loader(toy_config(os.path.join(new, "meta.json"), tok, max_skip_ratio=0.0),
                               stop_after=60)
    assert sum(b["num_samples"] for b in loader) > 0 and loader.stats()["samples_skipped"] == 0


def test_review_errors(mixture, tmp_path):
    out = str(tmp_path / "f")
    run_filter(mixture, out, load_settings(), log=lambda m: None)
    path = os.path.join(out, "single", "review.tsv")
    text = open(path).read()
    first = next(r for r in text.split("\n") if r.startswith("drop"))
    for bad, match in [(text.replace(first, "maybe" + first[4:]), "neither `keep` nor `drop`"),
                       (text.replace(first + "\n", ""), "no decision"),
                       (text + first + "\n", "appears twice"),
                       (text + "drop\t1\tx\n", "was not flagged")]:
        open(path, "w").write(bad)
        with pytest.raises(ReviewError, match=match):
            apply_review(out, str(tmp_path / "new"))
    open(path, "w").write(text)
    # a changed input is refused: the line numbers would no longer be the reviewed ones
    with open(tmp_path / "data" / "ann" / "text.jsonl", "a") as f:
        f.write('{"conversations": []}\n')
    with pytest.raises(ReviewError, match="changed since it was filtered"):
        apply_review(out, str(tmp_path / "new"))


def test_resume_after_interruption(mixture, tmp_path, monkeypatch):
    settings = load_settings(overrides={"chunk_mb": 0.002})    # ~2 KB chunks: several per dataset
    ref = str(tmp_path / "ref")
    run_filter(mixture, ref, settings, log=lambda m: None)

    real, calls = pipeline.check_chunk, []

    def failing(*args):
        calls.append(args[:3])
        if len(calls) == 7:
            raise KeyboardInterrupt("killed")
        return real(*args)

    out = str(tmp_path / "out")
    monkeypatch.setattr(pipeline, "check_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        run_filter(mixture, out, settings, log=lambda m: None)
    first_run = list(calls)
    calls.clear()
    monkeypatch.setattr(pipeline, "check_chunk", lambda *a: (calls.append(a[:3]), real(*a))[1])
    run_filter(mixture, out, settings, log=lambda m: None)
    # the 6 finished chunks were not redone; the interrupted one and the rest were
    assert not set(first_run[:6]) & set(calls) and first_run[6] in calls
    for name in ("single", "multi", "text", "video", "pretrain", "corpus"):
        for f in ("kept.jsonl", "flagged.jsonl", "review.tsv", "report.json"):
            assert sha(os.path.join(out, name, f)) == sha(os.path.join(ref, name, f)), (name, f)
        assert not os.path.exists(os.path.join(out, name, "parts"))
    # a finished run is not redone
    calls.clear()
    run_filter(mixture, out, settings, log=lambda m: None)
    assert calls == []
    # other rules into the same folder are refused
    with pytest.raises(FilterError, match="another rules"):
        run_filter(mixture, out, load_settings(overrides={"heuristics": {"token_run": {"max_run": 50}}}),
                   log=lambda m: None)


def test_chunking_and_workers_do_not_change_the_result(mixture, tmp_path):
    one = str(tmp_path / "one")
    many = str(tmp_path / "many")
    run_filter(mixture, one, load_settings(), log=lambda m: None)
    run_filter(mixture, many, load_settings(overrides={"chunk_mb": 0.001}), workers=2, log=lambda m: None)
    for name in ("single", "corpus", "pretrain"):
        for f in ("kept.jsonl", "flagged.jsonl", "review.tsv"):
            assert sha(os.path.join(one, name, f)) == sha(os.path.join(many, name, f)), (name, f)


def test_bad_invocations(mixture, tmp_path, capsys):
    assert cli_main(["filter-data", "--meta", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "r.yaml"
    bad.write_text("heuristics: {lenght: {enabled: false}}\n")
    assert cli_main(["filter-data", "--meta", mixture, "--out", str(tmp_path / "o"), "--rules", str(bad)]) == 2
    assert "lenght" in capsys.readouterr().err
    # --out inside the data: refused before anything is written there
    assert cli_main(["filter-data", "--meta", mixture, "--out", str(tmp_path / "data" / "ann")]) == 2
    assert "holds input annotation files" in capsys.readouterr().err
    assert cli_main(["filter-apply", "--review", str(tmp_path), "--out", str(tmp_path / "n")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_crlf_lines_and_a_last_line_without_newline_keep_their_bytes(tmp_path):
    good = [json.dumps({"text": f"Document number {k} about the quick brown fox."}).encode() for k in range(5)]
    bad = json.dumps({"text": "the dog " + "0" * 60}).encode()
    data = tmp_path / "data"
    os.makedirs(data)
    body = b"\r\n".join(good[:2] + [bad] + good[2:]) + b"\r\n\r\n" + b"\r\n".join([bad, good[0]])  # no final newline
    (data / "c.jsonl").write_bytes(body)
    json.dump({"c": {"annotation": "c.jsonl", "kind": "text"}}, open(data / "meta.json", "w"))
    out, new = str(tmp_path / "out"), str(tmp_path / "new")
    run_filter(str(data / "meta.json"), out, load_settings(), log=lambda m: None)
    assert [r["line"] for r in read_flagged(os.path.join(out, "c", "flagged.jsonl"))] == [3, 8]
    expected = b"".join(x + b"\r\n" for x in good) + good[0] + b"\n"
    assert open(os.path.join(out, "c", "kept.jsonl"), "rb").read() == expected
    apply_review(out, new)
    assert open(os.path.join(new, "c.jsonl"), "rb").read() == expected
