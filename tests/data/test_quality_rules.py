"""Each filtering rule on positive and negative cases, legitimate repetitive content included."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_internvl.data.quality import repetition
from megatron_internvl.data.quality.lengths import BottomK, LengthSketch, limits_from
from megatron_internvl.data.quality.records import read_view
from megatron_internvl.data.quality.rules import check_line
from megatron_internvl.data.quality.settings import FilterSettings, RulesError, load_settings

S = FilterSettings()


def conv_line(answer: str, question: str = "<image>\nWhat is shown?", image="a.jpg", **extra) -> bytes:
    rec = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    rec.update(extra)
    return json.dumps(rec).encode()


def rules_of(raw: bytes, kind: str = "chat", settings: FilterSettings = S, limits=None) -> set[str]:
    return {f.rule for f in check_line(raw, kind, "text", settings, limits)}


NATURAL = ("The photograph shows a narrow street in an old town at dusk. Two cyclists ride past a bakery whose "
           "windows are still lit, and a dog sleeps on the steps of the house next to it. On the left, a woman "
           "in a red coat is carrying a basket of bread; behind her the street climbs towards a church tower. "
           "The light is warm and low, which suggests the picture was taken in late autumn.")

TABLE = "\n".join(["| City | Country | Capital | Population (M) |", "| --- | --- | --- | --- |"] + [
    f"| {c} | {k} | {cap} | {p} |" for c, k, cap, p in [
        ("Paris", "France", "Yes", 2.1), ("Lyon", "France", "No", 0.5), ("Berlin", "Germany", "Yes", 3.6),
        ("Hamburg", "Germany", "No", 1.8), ("Madrid", "Spain", "Yes", 3.3), ("Seville", "Spain", "No", 0.7),
        ("Rome", "Italy", "Yes", 2.8), ("Milan", "Italy", "No", 1.4), ("Lisbon", "Portugal", "Yes", 0.5),
        ("Porto", "Portugal", "No", 0.2), ("Vienna", "Austria", "Yes", 1.9), ("Graz", "Austria", "No", 0.3)]])

NUMBERED = "\n".join(f"{k}. Step {k}: add {w} to the bowl and stir for {k + 1} minutes." for k, w in enumerate(
    ["flour", "sugar", "two eggs", "the milk", "melted butter", "a pinch of salt", "vanilla", "baking powder",
     "the lemon zest", "chopped nuts", "raisins", "cinnamon"], 1))

CODE = "```python\ndef load_config(raw):\n    cfg = {}\n" + "".join(
    f"    cfg[\"{k}\"] = raw.get(\"{k}\", {v})\n" for k, v in [
        ("lr", 0.001), ("epochs", 10), ("batch", 32), ("warmup", 100), ("decay", 0.1), ("seed", 1234),
        ("layers", 24), ("heads", 16), ("hidden", 1024), ("dropout", 0.0), ("clip", 1.0), ("steps", 5000)]) + \
    "    return cfg\n\n\nfor name in [\"a\", \"b\", \"c\"]:\n    print(name)\n    print(name.upper())\n```"

ENUMERATION = "The multiples of seven below 1000 are " + ", ".join(str(7 * k) for k in range(1, 143)) + "."
WORDS = ("The answer lists every colour seen: red, green, blue, yellow, orange, purple, pink, brown, black, white, "
         "grey, cyan, magenta, olive, navy, teal, maroon, beige, ivory, gold, silver, amber, coral, indigo.")
CJK = "图片中有一只猫坐在窗台上，窗外是一片绿色的草地。猫的毛是橘色的，眼睛是绿色的。阳光照在它身上，看起来很温暖。"

LEGIT = {"natural": NATURAL, "table": TABLE, "numbered_list": NUMBERED, "code": CODE,
         "enumeration": ENUMERATION, "word_list": WORDS, "cjk": CJK, "short": "Yes", "number": "42"}


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_legitimate_structure_is_kept(name):
    assert rules_of(conv_line(LEGIT[name])) == set(), name
    # also as a text corpus document and as the chosen answer of a preference pair
    assert rules_of(json.dumps({"text": LEGIT[name]}).encode(), "text") == set()
    pair = {"image": "a.jpg", "question": "<image>\nDescribe it.", "chosen": LEGIT[name], "rejected": "No idea."}
    assert rules_of(json.dumps(pair).encode()) == set()


def test_repetition_measures_against_hand_counts():
    ws = "a b c d a b c d a b c d".split()
    share, top, count = repetition.ngram_repetition(ws, 4)
    # 9 positions, distinct 4-grams: abcd bcda cdab dabc -> 5 repeats
    assert (share, top, count) == (5 / 9, ("a", "b", "c", "d"), 3)
    toks = repetition.tokens("intro words here x y z x y z x y")
    assert repetition.looping_suffix(toks, 8) == (3, 8)     # "x y z" 2 2/3 times, cut mid-span
    assert repetition.tokens("猫坐, ok") == ["猫", "坐", ",", "ok"]
    assert repetition.compression_ratio("ab" * 1000) < 0.02


LOOP = NATURAL + " " + " ".join(["I hope this helps you understand the picture."] * 9) + " I hope this"
NGRAM = " ".join(f"The cat is on the mat and it is very {w}." for w in
                 ["happy", "calm", "quiet", "warm", "soft", "old", "small", "fat", "lazy", "cute"])
SHORT_PHRASE = ". ".join(f"A red car on {w}" for w in ["grass", "sand", "ice", "snow", "mud", "stone", "water",
                                                        "gravel", "asphalt", "dirt"]) + "."
SENTENCES = "\n".join(["There is a red car in the image.", "The sky is blue and clear today.",
                       "There is a red car in the image.", "A man walks along the road slowly.",
                       "There is a red car in the image.", "The sky is blue and clear today.",
                       "There is a red car in the image."])
COMPRESSIBLE = "".join(f"<row id='{k % 3}' value='aaaaaaaa'/>" for k in range(200))


@pytest.mark.parametrize("text,rule", [
    (LOOP, "repetition.loop"), (NGRAM, "repetition.ngram"), (SHORT_PHRASE, "repetition.ngram"), (SENTENCES, "repetition.sentences"),
    (COMPRESSIBLE, "repetition.compression")])
def test_repetition_rules_flag(text, rule):
    found = check_line(conv_line(text), "chat", "text", S, None)
    hit = next(f for f in found if f.rule == rule)
    assert hit.evidence["field"] == "turn 1"
    if rule == "repetition.loop":
        assert hit.evidence["repeats"] >= 9 and "I hope this helps" in hit.evidence["span"]
    if text is NGRAM:
        assert hit.evidence["repeats"] == 10 and hit.evidence["share"] >= 0.5
    if text is SHORT_PHRASE:
        # 10 x "a red car on" in 50 words: caught by the top n-gram's coverage (0.8), not the share
        assert hit.evidence["ngram"] == "a red car on" and hit.evidence["top_coverage"] == 0.8
        assert hit.evidence["share"] < 0.5
    if rule == "repetition.sentences":
        assert hit.evidence["sentence"] == "there is a red car in the image." and hit.evidence["repeats"] == 4
    # switched off, the rule is silent
    section = rule.split(".")[1]
    off = load_settings(overrides={"repetition": {section: {"enabled": False}}})
    assert rule not in rules_of(conv_line(text), settings=off)


def test_repetition_reads_only_supervised_text():
    # a repeated question is not supervised: no repetition finding
    assert not {r for r in rules_of(conv_line("A cat.", question="<image>\n" + LOOP)) if r.startswith("repetition")}
    pair = {"image": "a.jpg", "question": "<image>\nDescribe it.", "chosen": NATURAL, "rejected": LOOP}
    assert rules_of(json.dumps(pair).encode()) == set()
    pair["chosen"], pair["rejected"] = LOOP, NATURAL
    assert "repetition.loop" in rules_of(json.dumps(pair).encode())
    # pre-training text: all of it, <image> placeholders left out
    doc = {"text": "<image> " + LOOP, "image": ["a.jpg"]}
    assert "repetition.loop" in rules_of(json.dumps(doc).encode(), "pretrain")


@pytest.mark.parametrize("answer,evidence", [
    ("The value is 1" + "0" * 40 + ".", {"char": "0", "run": 40}),
    ("Result: " + "!" * 30, {"char": "!", "run": 30}),
])
def test_char_run(answer, evidence):
    hit = next(f for f in check_line(conv_line(answer), "chat", "text", S, None) if f.rule == "char_run")
    assert {k: hit.evidence[k] for k in evidence} == evidence


def test_char_run_ignores_rulers_and_short_runs():
    for text in ["Title\n" + "=" * 60 + "\nBody text.", "a" + "-" * 80 + "b", "Total: 1000000000 dollars",
                 "Chapter 1 " + "." * 50 + " 17"]:
        assert "char_run" not in rules_of(conv_line(text)), text


def test_token_run():
    hit = next(f for f in check_line(conv_line("The matrix is " + " ".join(["0"] * 30)), "chat", "text", S, None)
               if f.rule == "token_run")
    assert hit.evidence["token"] == "0" and hit.evidence["run"] == 30
    assert "token_run" in rules_of(conv_line("yes, yes, yes, yes, yes, yes, yes, yes, yes, yes, yes, yes"))
    assert "token_run" not in rules_of(conv_line("0 0 1 0 0 0 1 1 0 very very good, had had"))
    assert "token_run" not in rules_of(conv_line("0 00 000 0000 0 00 000 0000 0 00 000 0000"))


def test_duplicate_lines():
    lines = "\n".join(["Please look at the figure carefully."] * 5 + ["The figure shows a graph of growth."])
    hit = next(f for f in check_line(conv_line("A chart.", question="<image>\n" + lines), "chat", "text", S, None)
               if f.rule == "duplicate_lines")
    assert hit.evidence["field"] == "turn 0" and hit.evidence["duplicates"] == 4 and hit.evidence["lines"] == 6
    # table separators and short lines repeat by design
    assert "duplicate_lines" not in rules_of(conv_line(TABLE + "\n" + TABLE.split("\n")[1] * 1))
    assert "duplicate_lines" not in rules_of(conv_line("\n".join(["}", "  }", "end", "| --- | --- | --- | --- |"] * 6)))


@pytest.mark.parametrize("answer", ["", "   ", "\n\t \n"])
def test_empty_answer(answer):
    assert "empty_answer" in rules_of(conv_line(answer))
    pair = {"question": "Q?", "chosen": "A fine answer.", "rejected": answer}
    assert "empty_answer" in rules_of(json.dumps(pair).encode())


def test_empty_answer_negative():
    assert "empty_answer" not in rules_of(conv_line("0"))
    assert "empty_answer" not in rules_of(conv_line("A.", question=" "))   # an empty question is not an answer


@pytest.mark.parametrize("answer,problem", [
    ("Here is code:\n```python\nprint(1)\n", "unbalanced code fences"),
    ("The answer is 4.<|im_end|>\n<|im_start|>user\nmore", "template token inside text"),
    ("See <img> for details.", "template token inside text"),
    ("The cat <ref>on the left<box>[[1, 2, 3, 4]]</box> sits.", "unbalanced tags"),
])
def test_formatting(answer, problem):
    hit = next(f for f in check_line(conv_line(answer), "chat", "text", S, None) if f.rule == "formatting")
    assert hit.evidence["problem"] == problem


def test_formatting_negative():
    ok = ["```python\nprint(1)\n```\nand\n~~~\nx\n~~~", "The <ref>cat</ref><box>[[1, 2, 3, 4]]</box> sits.",
          "Inline ``` in a sentence is fine when it closes ``` here.", "Use <b>bold</b> and <s>struck</s> text."]
    for text in ok:
        assert "formatting" not in rules_of(conv_line(text)), text
    custom = load_settings(overrides={"heuristics": {"formatting": {"stray_tokens": ["<s>"]}}})
    assert "formatting" in rules_of(conv_line(ok[-1]), settings=custom)


def test_placeholders():
    two = conv_line("Two cats.", question="<image>\nHow many cats?", image=["a.jpg", "b.jpg"])
    assert "placeholders" in rules_of(two)
    assert "placeholders" in rules_of(conv_line("It is <image>.", question="What?"))
    assert "placeholders" in rules_of(conv_line("Fine.", question="<video>\n<image>\nWhat?", image=None,
                                                video="v.mp4"))
    assert "placeholders" in rules_of(json.dumps({"text": "<image> a", "image": ["a.jpg", "b.jpg"]}).encode(), "pretrain")
    # as the trainer counts: a lone image without a placeholder gets one; equal counts are fine
    assert "placeholders" not in rules_of(conv_line("A cat.", question="What is it?"))
    assert "placeholders" not in rules_of(conv_line("Two.", question="Image-1: <image>\nImage-2: <image>\nHow many?",
                                                    image=["a.jpg", "b.jpg"]))
    assert "placeholders" not in rules_of(conv_line("Running.", question="What happens?", image=None, video="v.mp4"))
    # in a text corpus "<image>" is literal text
    assert rules_of(json.dumps({"text": "The tag <image> is HTML-like."}).encode(), "text") == set()


def test_unreadable():
    for raw, reason in [(b"{not json", "malformed_json"), (b"[1, 2]", "malformed_json"),
                        (b'{"conversations": []}', "bad_record"),
                        (b'{"conversations": [{"from": "human", "value": "hi"}]}', "no_assistant_turn")]:
        found = check_line(raw, "chat", "text", S, None)
        assert [f.rule for f in found] == ["unreadable"] and found[0].evidence["reason"] == reason
    assert rules_of(b'{"content": "x"}', "text") == {"unreadable"}
    off = load_settings(overrides={"heuristics": {"unreadable": {"enabled": False}}})
    assert rules_of(b"{not json", settings=off) == set()


def test_length_limits_from_the_dataset_distribution():
    rng = np.random.default_rng(0)
    sketch = LengthSketch(k=2000, seed=3)
    lengths = np.exp(rng.normal(5, 0.5, size=5000)).astype(int) + 1
    for i, n in enumerate(lengths):
        sketch.add("sample", i + 1, int(n))
    limits = limits_from(sketch, S.heuristics.length)
    low, high, q_low, q_high = limits.bounds["sample"]
    # the bottom-k sample's quantiles against the exact ones (float64, whole data)
    exact_hi, exact_lo = np.quantile(lengths, 0.99), np.quantile(lengths, 0.01)
    assert abs(q_high - exact_hi) / exact_hi < 0.08 and abs(q_low - exact_lo) / exact_lo < 0.08
    assert high == pytest.approx(3.0 * q_high) and low == pytest.approx(0.1 * q_low)
    assert limits.check("sample", int(high) + 1)["side"] == "long"
    assert limits.check("sample", int(low) - 1 if low >= 1 else -1)["side"] == "short"
    assert limits.check("sample", int(np.median(lengths))) is None
    # too few samples: no distribution, no limits
    small = LengthSketch(k=100)
    for i in range(50):
        small.add("sample", i, 10)
    assert limits_from(small, S.heuristics.length) is None


def test_length_rule_flags_per_turn_and_per_sample():
    sketch = LengthSketch(k=5000)
    rng = np.random.default_rng(1)
    for i in range(400):
        view = read_view(conv_line(NATURAL[: int(rng.integers(100, 400))]), "chat")
        sketch.add("sample", i, view.sample_chars)
        for j, f in enumerate(view.fields):
            sketch.add(f.role, i, len(f.text), j)
    limits = limits_from(sketch, S.heuristics.length)
    long = check_line(conv_line(NATURAL * 12), "chat", "text", S, limits)
    assert [f.evidence["field"] for f in long if f.rule == "length"] == ["sample"]
    # a long prompt is not what the model learns to produce: only the off-by-default prompt_length flags it
    long_q = conv_line(NATURAL[:200], question="<image>\n" + NATURAL * 3)
    assert rules_of(long_q, limits=limits) == set()
    prompts = load_settings(overrides={"heuristics": {"prompt_length": {"enabled": True}}})
    found = check_line(long_q, "chat", "text", prompts, limits_from(sketch, prompts.heuristics.length,
                                                                     prompts.heuristics.prompt_length))
    assert [(f.rule, f.evidence["field"], f.evidence["role"]) for f in found] == [("prompt_length", "turn 0", "user")]
    assert "length" not in rules_of(conv_line(NATURAL[:250]), limits=limits)


def test_bottom_k_merge_does_not_depend_on_the_split():
    items = [(int(k), int(v)) for k, v in zip(np.random.default_rng(2).permutation(10_000), range(10_000))]
    whole = BottomK(100, items)
    a, b = BottomK(100, items[:3000]), BottomK(100, items[3000:])
    for key, value in b.items():
        a.add(key, value)
    assert a.items() == whole.items() == sorted(items)[:100]


def test_rules_file_defaults_and_errors(tmp_path):
    import os

    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "filter", "rules.yaml")
    # the shipped, documented file spells out exactly the built-in defaults, every key of them
    assert load_settings(shipped) == FilterSettings()
    import dataclasses

    import yaml

    def keys(d, prefix=""):
        return {k for name, v in d.items()
                for k in ([prefix + name] + (sorted(keys(v, prefix + name + ".")) if isinstance(v, dict) else []))}

    with open(shipped) as f:
        assert keys(yaml.safe_load(f)) == keys(dataclasses.asdict(FilterSettings()))
    bad = tmp_path / "bad.yaml"
    bad.write_text("heuristics:\n  char_runs:\n    max_run: 5\n")
    with pytest.raises(RulesError, match="char_runs.*known"):
        load_settings(str(bad))
    bad.write_text("repetition:\n  ngram:\n    n: 2.5\n")
    with pytest.raises(RulesError, match="whole number"):
        load_settings(str(bad))
    bad.write_text("scorer:\n  unparsable: crash\n")
    with pytest.raises(RulesError, match="keep.*flag"):
        load_settings(str(bad))
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text("heuristics:\n  token_run:\n    max_run: 40\nscorer:\n  quality:\n    thresholds: {general: 5}\n")
    s = load_settings(str(tuned))
    assert s.heuristics.token_run.max_run == 40 and s.scorer.quality.thresholds == {"general": 5.0}
    assert s.fingerprint() != FilterSettings().fingerprint()
    assert "token_run" not in rules_of(conv_line(" ".join(["0"] * 30)), settings=s)
