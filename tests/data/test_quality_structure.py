"""Issue 23, rule by rule, positive and negative: loops anywhere in an answer (and cut mid-word at
its end) with their evidence, ruler / leader runs, structure-aware counting (LaTeX, matrices,
markdown, JSON), the length rule without user turns and the off-by-default prompt_length rule.
Cases are drawn at random where the rule should not depend on the particular text."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_internvl.data.quality import repetition, structure
from megatron_internvl.data.quality.manifest import read_flagged
from megatron_internvl.data.quality.pipeline import run_filter
from megatron_internvl.data.quality.rules import check_line
from megatron_internvl.data.quality.settings import FilterSettings, RulesError, load_settings

from .test_quality_mixture import TextGen
from .test_quality_rules import NATURAL, conv_line, rules_of

S = FilterSettings()


def findings(answer: str, settings: FilterSettings = S) -> dict:
    return {f.rule: f.evidence for f in check_line(conv_line(answer), "chat", "text", settings, None)}


# --------------------------------------------------------------------------- loops anywhere

@pytest.mark.parametrize("seed", range(12))
def test_a_loop_in_the_middle_of_an_answer_is_found_with_its_evidence(seed):
    g = TextGen(seed)
    rng = g.rng
    before, after = g.paragraph(3, 12), g.paragraph(3, 12)
    n = int(rng.integers(2, 9))
    phrase = " ".join(g.words(n))
    while len(set(phrase.split())) < n:          # a phrase that is not itself periodic
        phrase = " ".join(g.words(n))
    k = max(int(rng.integers(4, 40)), -(-16 // n))
    joint = str(rng.choice([" ", ", ", "\n"]))
    answer = before + " " + joint.join([phrase] * k) + ". " + after
    start = len(before) + 1
    ev = findings(answer)["repetition.loop"]
    assert ev["period_words"] == n and ev["repeats"] >= k and not ev["at_end"]
    assert answer[ev["at"]:].startswith(ev["span"])
    # the first copy, or a rotation of it starting a little earlier when the text before happens
    # to end like the phrase (the periodic stretch is then longer by those words)
    assert is_rotation(ev["span"], phrase) and start - len(phrase) - 2 <= ev["at"] <= start


def is_rotation(span: str, phrase: str) -> bool:
    a, b = repetition.words(span), repetition.words(phrase)
    return len(a) == len(b) and " ".join(a) in " ".join(b + b)


@pytest.mark.parametrize("answer,span,copies", [
    # the issue's cases
    (NATURAL + " The new setting " + "has been set " * 31 + "and the rest of the answer explains why.",
     "has been set", 31),
    ("Image 1: A dog on a sofa. Image 2: " + "The image shows " * 9 + "a cat. Image 3: A bird.", "The image shows", 9),
    ("图片中有一只猫坐在窗台上。" + "阳光照在它身上" * 19 + "看起来很温暖。窗外是一片绿色的草地。", "阳光照在它身上", 19),
    ("Step 1: Add 3. Running total 3.\nStep 5: " + "Running total after 5: " * 12 + "\nStep 6: Done.",
     "Running total after 5", 12),
])
def test_the_issues_mid_answer_loops(answer, span, copies):
    ev = findings(answer)["repetition.loop"]
    assert is_rotation(ev["span"], span) and ev["repeats"] >= copies and not ev["at_end"]
    assert answer[ev["at"]:].startswith(ev["span"])


def test_loops_the_rule_leaves_alone():
    # three copies inside an answer (min_repeats_inside is 4), a refrain sung twice, code with
    # repeated statements, the same short word a few times
    three = NATURAL + " " + " ".join(["the red car drives past the old church"] * 3) + " " + NATURAL
    song = ("Row, row, row your boat, gently down the stream. Merrily, merrily, merrily, merrily, life is but a "
            "dream. Row, row, row your boat, gently down the stream.")
    code = "```python\nmodel = Sequential()\n" + "model.add(Dense(64, activation='relu'))\n" * 3 + \
        "model.add(Dense(10))\nmodel.compile(optimizer='adam')\n```"
    for text in [three, song, code, NATURAL, "Yes, yes, yes. " + NATURAL]:
        assert "repetition.loop" not in findings(text), text
    # the thresholds are the settings'
    lower = load_settings(overrides={"repetition": {"loop": {"min_repeats_inside": 3}}})
    assert "repetition.loop" in findings(three, lower)


def identity(n: int, env: str = "pmatrix", close: bool = True) -> str:
    rows = " \\\\\n".join(" & ".join("1" if i == j else "0" for j in range(n)) for i in range(n))
    return f"\\begin{{{env}}}\n{rows}\n" + (f"\\end{{{env}}}" if close else "")


@pytest.mark.parametrize("n", [5, 6, 8])
def test_an_identity_matrix_is_no_loop_a_runaway_matrix_is(n):
    # its entries repeat with period n + 1, but a closed matrix is structure, not a loop
    text = f"The identity matrix is\n$$\nI_{n} = {identity(n)}\n$$\nand its determinant is 1."
    assert findings(text) == {}
    runaway = "The matrix is\n$$\nA = " + identity(n, close=False) + " \\\\\n" + "0 & " * 200
    assert "repetition.loop" in findings(runaway)


# --------------------------------------------------------------------------- cut at the end

@pytest.mark.parametrize("seed", range(8))
def test_a_loop_cut_mid_word_at_the_end(seed):
    g = TextGen(100 + seed)
    words = [w for w in g.words(40) if len(w) >= 4][: int(g.rng.integers(5, 12))]
    sentence = " ".join(words).capitalize() + "."
    k = int(g.rng.integers(3, 9))
    i = int(g.rng.integers(0, len(words)))
    cut = " ".join(sentence.split(" ")[:i] + [sentence.split(" ")[i][:2]])   # inside word i
    answer = NATURAL + " " + " ".join([sentence] * k) + " " + cut
    ev = findings(answer)["repetition.loop"]
    assert ev["at_end"] and ev["period_words"] == len(words) and ev["repeats"] >= k
    assert ev["span"].lower().startswith(words[0])


def test_the_issues_cut_loop_and_cuts_inside_a_character():
    handler = NATURAL + " " + "The handler writes the file to disk. " * 6 + "The handler wri"
    ev = findings(handler)["repetition.loop"]
    assert ev["span"] == "The handler writes the file to disk" and ev["repeats"] > 6 and ev["at_end"]
    cjk = "图片中有一只猫。" + "它的毛是橘色的眼睛是绿色的" * 4 + "它的毛是橘"
    for tail in ["", "\ufffd", "\ud83d"]:
        assert findings(cjk + tail)["repetition.loop"]["at_end"], repr(tail)
    # three copies suffice at the end (min_repeats), the cut one counted as a part
    three = NATURAL + " " + "The model stops here and starts again. " * 3 + "The mod"
    assert findings(three)["repetition.loop"]["repeats"] >= 3


def test_an_ending_that_only_looks_cut_is_no_loop():
    assert "repetition.loop" not in findings(NATURAL + " The photograph shows the town. The pho")
    assert "repetition.loop" not in findings(NATURAL + " " + "The cat sat on the mat. " * 2 + "The ca")


# --------------------------------------------------------------------------- ruler runs

@pytest.mark.parametrize("char", list("-=_*.#~"))
def test_ruler_runs_far_longer_than_any_table_needs(char):
    rng = np.random.default_rng(ord(char))
    run = char * int(rng.integers(201, 3000))
    for text in [f"Total {run} 42", f"Results:\n{run}\nThe end.", f"{NATURAL} {run} {NATURAL}"]:
        ev = findings(text)["char_run"]
        assert ev["char"] == char and ev["run"] == len(run) and ev["ruler"] and ev["max_run"] == 200
    # up to max_ruler_run they are rulers, leaders and underlines; 0 switches the check off
    assert "char_run" not in findings(f"Chapter 1 {char * 200} 17")
    off = load_settings(overrides={"heuristics": {"char_run": {"max_ruler_run": 0}}})
    assert "char_run" not in findings(f"Total {run} 42", off)


def test_rulers_leaders_separators_and_whitespace_are_kept():
    toc = "\n".join(f"{k}. Chapter {k} {'.' * (20 + 7 * k)} {10 * k}" for k in range(1, 9))
    wide = "| Name | Description |\n|" + "-" * 12 + "|" + ":" + "-" * 160 + ":|\n| a | b |"
    banner = "```python\n# " + "=" * 110 + "\n# Settings\n# " + "=" * 110 + "\nx = 1\n```"
    form = "Name: " + "_" * 40 + "\nDate: " + "_" * 20
    padded = "Total:" + " " * 5000 + "42"
    for text in [toc, wide, banner, form, padded, "Title\n" + "=" * 120 + "\n" + NATURAL]:
        assert "char_run" not in findings(text), text[:60]


# --------------------------------------------------------------------------- structure

def latex_answer(g: TextGen, blocks: int, env: str = "aligned") -> str:
    out = [g.sentence()]
    for b in range(blocks):
        x = int(g.rng.integers(2, 50))
        out += ["$$", f"\\begin{{{env}}}", f"{x}y + {b + 1} &= {x + b} \\\\", f"y &= \\frac{{{b - 1}}}{{{x}}}",
                f"\\end{{{env}}}", "$$", g.sentence()]
    return "\n".join(out)


@pytest.mark.parametrize("env", ["aligned", "align*", "gathered", "split"])
def test_latex_environment_lines_are_not_repeated_sentences(env):
    g = TextGen(7)
    for blocks in (3, 5, 8):
        assert findings(latex_answer(g, blocks, env)) == {}, (env, blocks)
    # the content inside still counts: the same equation line in every block
    same = "\n".join(["Solve it.", *(["$$", f"\\begin{{{env}}}", "x + 1 &= 2 \\\\ x &= 1", f"\\end{{{env}}}", "$$"] * 5)])
    assert "repetition.sentences" in findings(same)


@pytest.mark.parametrize("n", [4, 5, 6])
def test_a_diagonal_matrix_is_no_repeated_ngram(n):
    rng = np.random.default_rng(n)
    rows = " \\\\\n".join(" & ".join(str(int(rng.integers(1, 9))) if i == j else "0" for j in range(n))
                          for i in range(n))
    text = f"The matrix is\n$$\nD = \\begin{{bmatrix}}\n{rows}\n\\end{{bmatrix}}\n$$\nwhose eigenvalues are its diagonal."
    assert findings(text) == {}
    # the same matrix as a runaway without its closing line is read as words
    words = repetition.words(structure.word_text(text.replace("\\end{bmatrix}", "")))
    assert words.count("0") == n * n - n


def test_a_repeated_matrix_still_counts():
    block = "$$\nA = \\begin{pmatrix}\n1 & 2 \\\\\n3 & 4\n\\end{pmatrix}\n$$"
    assert "repetition.sentences" in findings("\n".join([block] * 5))
    prose, units = structure.units(block)
    assert units == ["\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"] and "1 & 2" not in prose


def detections(g: TextGen, n: int, same: bool = False) -> list[dict]:
    out = []
    for _ in range(n):
        x, y = (10, 20) if same else (int(g.rng.integers(0, 900)), int(g.rng.integers(0, 900)))
        out.append({"label": "person" if same or g.rng.random() < 0.7 else "traffic light",
                    "bbox_2d": [x, y, x + 40, y + 90]})
    return out


@pytest.mark.parametrize("layout", ["indent2", "indent4", "fenced", "wrapped", "one_per_line"])
def test_pretty_printed_json_is_not_repeated_lines(layout):
    g = TextGen(11)
    for n in (5, 15, 40):
        objs = detections(g, n)
        text = {"indent2": lambda: json.dumps(objs, indent=2), "indent4": lambda: json.dumps(objs, indent=4),
                "fenced": lambda: "Detected:\n```json\n" + json.dumps(objs, indent=2) + "\n```",
                "wrapped": lambda: json.dumps({"image": "a.jpg", "objects": objs}, indent=2),
                "one_per_line": lambda: "[\n" + ",\n".join("  " + json.dumps(o) for o in objs) + "\n]"}[layout]()
        assert findings(text) == {}, (layout, n)
    # a model that loops in JSON writes the same object again and again: still found
    looping = json.dumps(detections(g, 12, same=True), indent=2)
    assert {"repetition.sentences", "repetition.loop"} <= set(findings(looping))


def test_json_cut_short_is_read_line_by_line():
    g = TextGen(12)
    text = json.dumps(detections(g, 20), indent=2)[:-40]       # the model stopped mid-object
    assert findings(text) == {}
    prose, units = structure.units(text)
    assert len(units) == 20 and all(u.startswith('"label"') for u in units)


def test_markdown_headings_and_labels_are_structure():
    g = TextGen(13)
    parts = []
    for k in range(1, 7):
        parts += [f"### Question {k}", "**Explanation:**", g.sentence(), "**Final answer:**", str(k * 7), "---"]
    assert findings("\n".join(parts)) == {}
    # a repeated line of content is still counted
    repeated = "\n".join(["**Explanation:**", "The answer follows from the figure above."] * 6)
    assert "repetition.sentences" in findings(repeated)


def test_duplicate_lines_reads_content_units():
    g = TextGen(14)
    objs = detections(g, 30)
    for o in objs:
        o["label"] = "traffic light"               # "label": "traffic light", is over 20 characters
    question = "Find the objects.\n" + json.dumps(objs, indent=2)
    assert "duplicate_lines" not in rules_of(conv_line("Done.", question=question))
    assert "duplicate_lines" in rules_of(conv_line("Done.", question="\n".join(["Please look at the figure."] * 6)))


def test_indented_json_does_not_look_compressible():
    g = TextGen(15)
    text = json.dumps({"objects": detections(g, 40)}, indent=8)
    assert len(text) > 4000 and "repetition.compression" not in findings(text)
    assert "repetition.compression" in findings("".join(f"<row id='{k % 3}' value='aaaaaaaa'/>" for k in range(200)))


# --------------------------------------------------------------------------- lengths

def write_dataset(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def test_long_prompts_are_checked_only_by_prompt_length(tmp_path):
    g = TextGen(16)
    recs = [{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\n" + g.sentence()},
                                                 {"from": "gpt", "value": g.paragraph(1, 3)}]} for _ in range(400)]
    pasted = {"conversations": [{"from": "human", "value": g.document(3000, 6000) + "\nSummarise it."},
                                {"from": "gpt", "value": g.paragraph(1, 3)}]}
    rambling = {"conversations": [{"from": "human", "value": g.sentence()},
                                  {"from": "gpt", "value": "\n\n".join(g.paragraph(8, 14) for _ in range(12))}]}
    recs[100], recs[200] = pasted, rambling
    data = tmp_path / "data"
    os.makedirs(data)
    write_dataset(data / "d.jsonl", recs)
    json.dump({"d": {"annotation": "d.jsonl"}}, open(data / "meta.json", "w"))

    def flagged(settings, out):
        run_filter(str(data / "meta.json"), str(tmp_path / out), settings, log=lambda m: None)
        return {r["line"]: r for r in read_flagged(str(tmp_path / out / "d" / "flagged.jsonl"))}

    default = flagged(FilterSettings(), "default")
    assert set(default) == {201} and default[201]["rules"] == ["length"]          # the answer, not the prompt
    on = load_settings(overrides={"heuristics": {"prompt_length": {"enabled": True}}})
    with_prompts = flagged(on, "prompts")
    assert set(with_prompts) == {101, 201} and with_prompts[101]["rules"] == ["prompt_length"]
    ev = with_prompts[101]["evidence"][0]
    assert ev["role"] == "user" and ev["chars"] > ev["limit"] == pytest.approx(10 * ev["quantile_chars"], abs=0.1)
    report = json.load(open(tmp_path / "prompts" / "report.json"))
    assert report["datasets"][0]["rules"]["prompt_length"] == {"seen": 400, "flagged": 1, "kept": 399}
    assert "prompt_length" not in json.load(open(tmp_path / "default" / "report.json"))["datasets"][0]["rules"]


def test_new_settings_are_checked():
    for overrides, match in [({"heuristics": {"char_run": {"max_ruler_run": -1}}}, "max_ruler_run"),
                             ({"heuristics": {"prompt_length": {"upper_factor": 0.5}}}, "prompt_length"),
                             ({"repetition": {"loop": {"min_repeats_inside": 1}}}, "min_repeats_inside"),
                             ({"heuristics": {"prompt_length": {"factor": 3}}}, "upper_factor")]:
        with pytest.raises(RulesError, match=match):
            load_settings(overrides=overrides)
