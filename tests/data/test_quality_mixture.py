"""A generated SFT-like mixture with planted anomalies: per kind of planted anomaly the rules find
at least 95% (98% overall), per kind of clean content they flag at most 2% (1% overall); every
rate is printed. The generators are shared with bench/filter_throughput.py.

Clean content: prose with Zipf-distributed words (so common words and phrases recur as in real
text), captions, short answers, markdown tables, numbered lists, step-by-step reasoning, code,
long enumerations, LaTeX derivations in aligned blocks, matrices (identity, diagonal, sparse,
symbolic), pretty-printed JSON detection outputs, OCR text (receipts, forms, pages), CJK prose,
markdown answers with repeated headings and bold labels, rulers and leaders (table of contents,
underlines, banners, wide table separators), long pasted documents as user prompts, multi-turn
chats; preference pairs and a text corpus.

Planted anomalies: loops at the end of an answer (the last copy cut), loops in the middle of an
answer (word phrases, CJK phrases, "Step N:" loops), loops cut mid-word or mid-character at the
end, long ruler / leader runs, repeated phrases and lines, zeros, token runs, answers far too
long, empty answers, template tokens, open code fences and tags, placeholder mismatches and
unreadable lines.

Every generator draws its lengths, words, phrases, positions and layouts at random.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional

import numpy as np

SYLLABLES = "ka lo mi ne ru ta ve shi po an el or um ix bra ce do fu gri ha jo ku le ma no pe qui ro sa te".split()
LABELS = ["person"] * 6 + ["car"] * 3 + ["dog", "cat", "chair", "cup", "traffic light", "bicycle", "bottle",
                                          "potted plant", "dining table", "handbag", "bus", "truck"]
RULER_CHARS = "-=_*.#~"


def _join(parts: list[str], lengths: np.ndarray, rng) -> list[str]:
    """Words of `lengths[i]` random parts each."""
    idx = rng.integers(0, len(parts), size=int(lengths.sum()))
    ends = np.cumsum(lengths)
    return ["".join(parts[j] for j in idx[e - k:e]) for k, e in zip(lengths, ends)]


class TextGen:
    def __init__(self, seed: int, vocab: int = 4000):
        self.rng = np.random.default_rng(seed)
        r = self.rng
        common = ("the of and a to in is that it with as for was on are by this be from at or an which "
                  "image shows there two one left right color people picture we can see").split()
        made = set(_join(SYLLABLES, r.integers(1, 4, size=vocab * 2), r))
        self.vocab = common + sorted(made - set(common))[: vocab]
        p = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.1
        self.p = p / p.sum()
        self._buf, self._at = np.zeros(0, np.int64), 0
        # CJK words of 1-3 ideographs, Zipf-distributed like the Latin ones
        chars = [chr(c) for c in r.integers(0x4E00, 0x9FA5, size=1500)]
        self.cjk_vocab = sorted(set(_join(chars, r.choice([1, 1, 2, 2, 2, 3], size=3000), r)))
        q = 1.0 / np.arange(1, len(self.cjk_vocab) + 1) ** 1.05
        self.cjk_p = q / q.sum()

    def words(self, n: int) -> list[str]:
        # Zipf draws in bulk: one rng.choice per word would dominate the test's time
        if self._at + n > self._buf.size:
            self._buf, self._at = self.rng.choice(len(self.vocab), size=max(n, 200_000), p=self.p), 0
        idx = self._buf[self._at:self._at + n]
        self._at += n
        return [self.vocab[i] for i in idx]

    def n(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi))

    def pick(self, options):
        return options[int(self.rng.integers(0, len(options)))]

    def sentence(self, lo: int = 6, hi: int = 20) -> str:
        w = self.words(self.n(lo, hi))
        return " ".join(w).capitalize() + self.rng.choice([".", ".", ".", "!", "?"])

    def paragraph(self, lo: int = 2, hi: int = 6) -> str:
        return " ".join(self.sentence() for _ in range(self.n(lo, hi)))

    def cjk_sentence(self, lo: int = 4, hi: int = 14) -> str:
        idx = self.rng.choice(len(self.cjk_vocab), size=self.n(lo, hi), p=self.cjk_p)
        ws = [self.cjk_vocab[i] for i in idx]
        if len(ws) > 5 and self.rng.random() < 0.6:
            ws.insert(self.n(2, len(ws) - 2), "，")
        return "".join(ws) + str(self.rng.choice(["。", "。", "。", "！", "？"]))

    def cjk_paragraph(self, lo: int = 2, hi: int = 8) -> str:
        return "".join(self.cjk_sentence() for _ in range(self.n(lo, hi)))

    # -- answers of every legitimate shape
    def table(self) -> str:
        cols = self.n(2, 6)
        rows = [" | ".join(w.capitalize() for w in self.words(cols)), " | ".join(["---"] * cols)]
        for _ in range(self.n(4, 25)):
            cells = [self.rng.choice([self.words(1)[0], str(self.n(0, 1000)), "Yes", "No"]) for _ in range(cols)]
            rows.append(" | ".join(cells))
        return "\n".join(f"| {r} |" for r in rows)

    def numbered(self) -> str:
        return "\n".join(f"{k}. {self.sentence(4, 12)}" for k in range(1, self.n(4, 25)))

    def steps(self) -> str:
        n = self.n(3, 12)
        body = "\n".join(f"Step {k}: {self.sentence()} So x_{k} = {self.n(1, 99)}." for k in range(1, n))
        return body + f"\nTherefore the answer is {self.n(1, 500)}."

    def code(self) -> str:
        names = [w for w in self.words(40) if w.isalpha()][:self.n(3, 12)]
        lines = ["```python", f"def build_{names[0]}(cfg):", "    out = {}"]
        lines += [f"    out[\"{n}\"] = cfg.get(\"{n}\", {self.n(0, 100)})" for n in names]
        lines += ["    for key in out:", "        print(key, out[key])", "    return out", "```"]
        return self.sentence() + "\n" + "\n".join(lines)

    def enumeration(self) -> str:
        step = self.n(2, 9)
        return f"The multiples of {step} are " + ", ".join(str(step * k) for k in range(1, self.n(20, 150))) + "."

    def short(self) -> str:
        return str(self.rng.choice(["Yes", "No", "A", "B", "C", "D", "2", "17", self.words(1)[0].capitalize()]))

    def _term(self) -> str:
        v, a, b = self.pick("xyzabnkt"), self.n(1, 20), self.n(1, 20)
        return self.pick([f"{a}{v} + {b}", f"\\frac{{{a}}}{{{b}}}{v}", f"{v}^{{{self.n(2, 5)}}} - {a}",
                          f"\\left({v} - {a}\\right)^2", f"\\sqrt{{{a * a}}} \\cdot {v}", f"{a}",
                          f"\\frac{{{v} + {a}}}{{{b}}}", f"{a} \\times {b}", f"\\text{{{self.words(1)[0]}}} + {a}"])

    def latex_aligned(self) -> str:
        """A derivation: prose, then 1-6 display blocks of 1-4 rows (aligned, align*, gathered, split...)."""
        out = [self.sentence()]
        env = self.pick(["aligned", "aligned", "align*", "gathered", "split"])   # a writer keeps to one
        for b in range(self.n(1, 7)):
            rows = [f"{self._term()} &= {self._term()}"] + [f"&= {self._term()}" for _ in range(self.n(0, 4))]
            wrap = ("", "") if env == "align*" else self.pick([("$$", "$$"), ("\\[", "\\]"), ("$$", "$$")])
            body = " \\\\\n".join(rows)
            if self.rng.random() < 0.2:      # the whole block on one line
                block = f"{wrap[0]}\\begin{{{env}}} {body.replace(chr(10), ' ')} \\end{{{env}}}{wrap[1]}"
            else:
                block = "\n".join(x for x in (wrap[0], f"\\begin{{{env}}}", body, f"\\end{{{env}}}", wrap[1]) if x)
            if self.rng.random() < 0.4:
                out.append(self.pick([f"**Step {b + 1}:**", f"### Step {b + 1}", f"Step {b + 1}:"]))
            out.append(block)
            if self.rng.random() < 0.6:
                out.append(self.sentence().rstrip(".!?") + f", so ${self.pick('xyzn')} = {self.n(1, 50)}$.")
        out.append(f"The answer is $\\boxed{{{self.n(1, 500)}}}$.")
        return "\n".join(out)

    def latex_matrix(self) -> str:
        """Matrices of 2-6 rows: identity, diagonal, triangular, sparse, random, symbolic."""
        out = [self.sentence()]
        for _ in range(self.n(1, 3)):
            n = self.n(2, 7)
            m = n if self.rng.random() < 0.7 else self.n(2, 7)
            kind = self.pick(["identity", "diagonal", "upper", "sparse", "random", "symbolic"])
            rows = []
            for i in range(n):
                row = []
                for j in range(m):
                    if kind == "identity":
                        row.append("1" if i == j else "0")
                    elif kind == "diagonal":
                        row.append(str(self.n(1, 20)) if i == j else "0")
                    elif kind == "upper":
                        row.append(str(self.n(-9, 10)) if j >= i else "0")
                    elif kind == "sparse":
                        row.append(str(self.n(1, 9)) if self.rng.random() < 0.25 else "0")
                    elif kind == "random":
                        row.append(str(self.n(-20, 21)))
                    else:
                        row.append(f"{self.pick('abcdxyz')}_{{{i + 1}{j + 1}}}")
                rows.append(" & ".join(row))
            env = self.pick(["pmatrix", "bmatrix", "vmatrix", "matrix", "array"])
            head = f"\\begin{{array}}{{{'c' * m}}}" if env == "array" else f"\\begin{{{env}}}"
            sep = " \\\\\n" if self.rng.random() < 0.75 else " \\\\ "
            name = self.pick("ABCMPQ")
            block = f"{name} = {head}\n{sep.join(rows)}\n\\end{{{env}}}"
            out.append(self.pick([f"$$\n{block}\n$$", f"\\[\n{block}\n\\]", f"$${block}$$"]))
            out.append(self.sentence())
        return "\n".join(out)

    def json_detection(self) -> str:
        """Object detection output: 3-30 objects, pretty-printed in one of several layouts."""
        objs = []
        for _ in range(self.n(3, 31)):
            x, y = self.n(0, 900), self.n(0, 900)
            o = {"label": self.pick(LABELS), "bbox_2d": [x, y, x + self.n(10, 300), y + self.n(10, 300)]}
            if self.rng.random() < 0.3:
                o["score"] = round(float(self.rng.uniform(0.3, 1.0)), 2)
            objs.append(o)
        data = {"objects": objs} if self.rng.random() < 0.3 else objs
        layout = self.n(0, 3)
        if layout == 0:
            text = json.dumps(data, indent=int(self.pick([2, 4])))      # every number on its own line
        elif layout == 1:
            inner = ",\n".join("  {\n" + ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in o.items())
                               + "\n  }" for o in objs)
            text = "[\n" + inner + "\n]"
        else:
            text = "[\n" + ",\n".join("  " + json.dumps(o) for o in objs) + "\n]"
        if self.rng.random() < 0.6:
            text = self.sentence() + "\n```json\n" + text + "\n```"
        return text

    def ocr(self) -> str:
        """OCR output: a receipt, a form or a page of text, with rulers, leaders and blanks."""
        kind = self.n(0, 3)
        if kind == 0:
            lines = [" ".join(self.words(self.n(1, 4))).upper(), f"{self.n(1, 999)} {self.words(1)[0].capitalize()} St",
                     f"Date: 20{self.n(10, 25)}-{self.n(1, 13):02d}-{self.n(1, 29):02d}  Time: {self.n(0, 24):02d}:{self.n(0, 60):02d}",
                     self.pick(RULER_CHARS[:2]) * self.n(16, 48)]
            for _ in range(self.n(2, 15)):
                item = " ".join(self.words(self.n(1, 4))).upper()
                lines.append(f"{item}{' ' * self.n(2, 20)}{self.n(0, 99)}.{self.n(0, 100):02d}")
            lines += [self.pick(RULER_CHARS[:2]) * self.n(16, 48),
                      f"SUBTOTAL {'.' * self.n(3, 30)} {self.n(1, 300)}.{self.n(0, 100):02d}",
                      f"TOTAL{' ' * self.n(2, 20)}{self.n(1, 300)}.{self.n(0, 100):02d}", self.sentence(3, 6)]
        elif kind == 1:
            lines = [" ".join(self.words(self.n(2, 5))).title()]
            for _ in range(self.n(3, 10)):
                lines.append(f"{self.words(1)[0].capitalize()}: {'_' * self.n(8, 40)}")
            lines.append(f"Signature {'.' * self.n(10, 40)}  Date {'.' * self.n(6, 20)}")
        else:
            page = self.n(1, 300)
            lines = [f"{' '.join(self.words(self.n(2, 5))).upper()}    {page}"]
            for _ in range(self.n(4, 20)):
                w = self.words(self.n(6, 14))
                if self.rng.random() < 0.2:
                    w[-1] = w[-1][: max(1, len(w[-1]) // 2)] + "-"
                lines.append(" ".join(w))
            lines.append(f"- {page + 1} -")
        return "\n".join(lines)

    def cjk(self) -> str:
        return "\n".join(self.cjk_paragraph() for _ in range(self.n(1, 4)))

    def markdown_qa(self) -> str:
        """Several parts, each with the same headings and bold labels."""
        labels = self.pick([("**Answer:**", "**Explanation:**"), ("### Answer", "### Why"),
                            ("**Final answer**", "__Reasoning__"), ("## Result", "**Details:**")])
        out = []
        for k in range(1, self.n(3, 7)):
            out += [f"**Question {k}:** {self.sentence(4, 10)}", labels[0], self.short() + " " + self.sentence(3, 8),
                    labels[1], self.paragraph(1, 3), "---"]
        return "\n".join(out)

    def rulers(self) -> str:
        """Underlines, banners, a table of contents with leaders, wide table separators."""
        kind = self.n(0, 4)
        if kind == 0:
            title = " ".join(self.words(self.n(2, 8))).title()
            under = self.pick("=-")
            return f"{title}\n{under * self.n(len(title), 120)}\n\n{self.paragraph()}\n\n{'-' * self.n(3, 80)}\n{self.paragraph()}"
        if kind == 1:
            lines = ["Contents", ""]
            for k in range(1, self.n(4, 20)):
                t = " ".join(self.words(self.n(1, 6))).capitalize()
                lines.append(f"{k}. {t} {self.pick('._ ') * self.n(5, 70)} {self.n(1, 400)}")
            return "\n".join(lines)
        if kind == 2:
            c = self.pick("#=*-")
            bar = ("# " if c != "#" else "") + c * self.n(20, 110)
            return f"```python\n{bar}\n# {self.sentence(3, 8)}\n{bar}\nx = {self.n(0, 99)}\nprint(x)\n```"
        widths = [self.n(3, 150) for _ in range(self.n(2, 5))]
        head = "| " + " | ".join(w.capitalize().ljust(k) for w, k in zip(self.words(len(widths)), widths)) + " |"
        sep = "|" + "|".join(self.pick([":", ""]) + "-" * (k + 1) + self.pick([":", ""]) for k in widths) + "|"
        body = ["| " + " | ".join(" ".join(self.words(self.n(1, 4))).ljust(k) for k in widths) + " |"
                for _ in range(self.n(2, 8))]
        return "\n".join([head, sep] + body)

    def answer(self, kind: Optional[str] = None) -> str:
        if kind is None:
            kind = str(self.rng.choice(ANSWER_KINDS))
        return getattr(self, ANSWER_MAKERS[kind])()

    def caption(self) -> str:
        return self.paragraph(1, 3)

    def prose(self) -> str:
        return self.paragraph(3, 10)

    def document(self, lo: int = 1500, hi: int = 10000) -> str:
        """A long pasted document: paragraphs, a heading or a table now and then."""
        parts, size, target = [], 0, self.n(lo, hi)
        while size < target:
            part = self.pick([self.paragraph(3, 8), self.paragraph(3, 8), "## " + " ".join(self.words(3)).title(),
                              self.table(), self.ocr()])
            parts.append(part)
            size += len(part)
        return "\n\n".join(parts)


ANSWER_MAKERS = {"short": "short", "caption": "caption", "paragraph": "prose", "table": "table",
                 "numbered": "numbered", "steps": "steps", "code": "code", "enum": "enumeration",
                 "latex_aligned": "latex_aligned", "latex_matrix": "latex_matrix", "json_detection": "json_detection",
                 "ocr": "ocr", "cjk": "cjk", "markdown_qa": "markdown_qa", "rulers": "rulers"}
ANSWER_KINDS = list(ANSWER_MAKERS)
CHAT_KINDS = ANSWER_KINDS + ["long_prompt", "multi_turn"]
CORPUS_KINDS = ["document", "cjk_document", "ocr_document"]


def _question(g: TextGen, n_img: int) -> str:
    if n_img == 0:
        return g.sentence()
    if n_img == 1:
        return str(g.rng.choice(["<image>\n", ""])) + g.sentence()
    return "".join(f"Image-{k + 1}: <image>\n" for k in range(n_img)) + g.sentence()


def clean_chat(g: TextGen, kind: str) -> dict:
    rng = g.rng
    n_img = int(rng.choice([0, 1, 1, 1, 2, 3]))
    q = _question(g, n_img)
    if kind == "long_prompt":
        # a pasted document far longer than the dataset's other prompts, and an ordinary answer
        q = (q + "\n\n" + g.document()) if rng.random() < 0.5 else (g.document() + "\n\n" + q)
        turns = [{"from": "human", "value": q}, {"from": "gpt", "value": g.answer(g.pick(["paragraph", "numbered",
                                                                                        "caption", "short"]))}]
    elif kind == "multi_turn":
        turns = [{"from": "human", "value": q}, {"from": "gpt", "value": g.answer()}]
        for _ in range(g.n(1, 4)):
            turns += [{"from": "human", "value": g.sentence()}, {"from": "gpt", "value": g.answer()}]
    else:
        turns = [{"from": "human", "value": q}, {"from": "gpt", "value": g.answer(kind)}]
    rec = {"conversations": turns}
    if n_img:
        rec["image"] = f"img{rng.integers(100)}.jpg" if n_img == 1 else [f"img{rng.integers(100)}.jpg" for _ in range(n_img)]
    return rec


def clean_doc(g: TextGen, kind: str) -> dict:
    if kind == "cjk_document":
        return {"text": "\n\n".join(g.cjk_paragraph(3, 10) for _ in range(g.n(1, 5)))}
    if kind == "ocr_document":
        return {"text": "\n\n".join(g.ocr() for _ in range(g.n(1, 4)))}
    return {"text": "\n\n".join(g.paragraph(3, 8) for _ in range(g.n(1, 5)))}


def clean_pair(g: TextGen, kind: str) -> dict:
    # the two answers of a pair answer the same question: the same kind of content
    return {"image": f"img{g.rng.integers(100)}.jpg", "question": "<image>\n" + g.sentence(),
            "chosen": g.answer(kind), "rejected": g.answer(kind)}


# --------------------------------------------------------------------------- planted anomalies
# each takes a clean record and the generator and returns the broken record (or a raw line)

def _set_answer(rec: dict, fn) -> dict:
    if "conversations" in rec:
        k = max(i for i, t in enumerate(rec["conversations"]) if t["from"] == "gpt")
        rec["conversations"][k]["value"] = fn(rec["conversations"][k]["value"])
    elif "chosen" in rec:
        rec["chosen"] = fn(rec["chosen"])
    else:
        rec["text"] = fn(rec["text"])
    return rec


def _copies(g: TextGen, words_per_copy: int, lo: int, hi: int, min_words: int = 16) -> int:
    """How many copies a loop has: lo..hi, and enough to cover min_words."""
    k = g.n(lo, hi + 1)
    return max(k, -(-min_words // max(1, words_per_copy)))


def loop(rec, g):
    span = g.sentence(4, 14)
    k = g.n(4, 40)
    cut = span[: g.n(0, len(span))]
    return _set_answer(rec, lambda a: a + " " + " ".join([span] * k) + " " + cut)


def _around(g: TextGen, middle: str, cjk: bool = False) -> str:
    """`middle` between 1-6 sentences of prose and 1-6 more (the loop is not at the end)."""
    para = g.cjk_paragraph if cjk else g.paragraph
    sep = "" if cjk else str(g.rng.choice([" ", " ", "\n", "\n\n"]))
    return para(1, 7) + sep + middle + sep + para(1, 7)


def mid_loop(rec, g):
    """A phrase written many times in a row inside an answer, which then goes on."""
    n = g.n(2, 11)
    phrase = " ".join(g.words(n))
    if g.rng.random() < 0.3:
        phrase = phrase.capitalize()
    joint = str(g.rng.choice([" ", " ", ", ", ". ", "\n"]))
    k = _copies(g, n, 4, 40)
    lead = g.pick(["", "", f"Image {g.n(1, 5)}: ", f"{g.words(1)[0].capitalize()} "])
    return _set_answer(rec, lambda a: _around(g, lead + joint.join([phrase] * k) + ".", cjk=False))


def mid_loop_cjk(rec, g):
    """A CJK phrase (2-12 characters) repeated inside CJK text."""
    phrase = "".join(g.cjk_vocab[i] for i in g.rng.choice(len(g.cjk_vocab), size=g.n(1, 6), p=g.cjk_p))[:12]
    joint = str(g.rng.choice(["", "", "，", "。"]))
    k = _copies(g, len(phrase), 4, 30)
    return _set_answer(rec, lambda a: _around(g, joint.join([phrase] * k), cjk=True))


def step_loop(rec, g):
    """Step-by-step reasoning that loops on one step ("Step 5: Running total after 5: Running ...")."""
    m = g.n(2, 9)
    phrase = " ".join(g.words(g.n(2, 6))).capitalize()
    k = _copies(g, len(phrase.split()) + 1, 4, 30)
    before = "\n".join(f"Step {j}: {g.sentence()} So x_{j} = {g.n(1, 99)}." for j in range(1, m))
    loop_text = f"Step {m}: " + " ".join(f"{phrase} {m}:" for _ in range(k))
    after = "\n".join(f"Step {j}: {g.sentence()}" for j in range(m + 1, m + g.n(1, 4))) if g.rng.random() < 0.6 else ""
    return _set_answer(rec, lambda a: "\n".join(x for x in (before, loop_text, after) if x))


def cut_loop(rec, g):
    """A model stopped by its token limit inside a loop: k copies, then the next one cut inside a
    word (or, for CJK, inside a phrase or a character)."""
    if g.rng.random() < 0.25:
        span = g.cjk_sentence(8, 20)
        k = _copies(g, len(span), 3, 12)
        cut = span[: g.n(1, len(span) - 1)] + str(g.rng.choice(["", "\ufffd"]))
        return _set_answer(rec, lambda a: a + "\n" + "".join([span] * k) + cut)
    words = g.words(g.n(6, 18))
    span = " ".join(words).capitalize() + "."
    k = _copies(g, len(words), 3, 12)
    long_words = [i for i, w in enumerate(words) if len(w) >= 3] or [0]
    i = g.pick(long_words)
    head = span.split(" ")[:i]
    w = span.split(" ")[i]
    cut = " ".join(head + [w[: g.n(1, max(2, len(w) - 1))]])
    return _set_answer(rec, lambda a: a + " " + " ".join([span] * k) + " " + cut)


def ruler_run(rec, g):
    """A run of hundreds or thousands of one ruler / leader character inside an answer."""
    c = g.pick(RULER_CHARS)
    run = c * int(np.exp(g.rng.uniform(np.log(250), np.log(3000))))
    where = g.n(0, 3)
    if where == 0:
        middle = f"\n{run}\n"
    elif where == 1:
        middle = f" {g.words(1)[0].capitalize()} {run} {g.n(1, 300)} "
    else:
        middle = run
    return _set_answer(rec, lambda a: g.paragraph(1, 4) + middle + g.paragraph(1, 4))


def repeated_phrase(rec, g):
    phrase = " ".join(g.words(g.n(4, 8)))
    parts = [f"{phrase} {g.words(1)[0]}" for _ in range(g.n(8, 30))]
    return _set_answer(rec, lambda a: ". ".join(parts) + ".")


def repeated_lines(rec, g):
    base = [g.sentence(5, 12) for _ in range(g.n(1, 4))]
    lines = [base[k % len(base)] for k in range(g.n(8, 30))]
    return _set_answer(rec, lambda a: "\n".join(lines))


def zeros(rec, g):
    return _set_answer(rec, lambda a: a + " 0." + "0" * g.n(30, 300))


def token_run(rec, g):
    tok = g.rng.choice(["0", "1", "the", "yes", g.words(1)[0]])
    sep = g.rng.choice([" ", ", "])
    return _set_answer(rec, lambda a: a + " " + sep.join([tok] * g.n(15, 80)))


def too_long(rec, g):
    return _set_answer(rec, lambda a: "\n\n".join(g.paragraph(8, 14) for _ in range(g.n(30, 60))))


def empty(rec, g):
    return _set_answer(rec, lambda a: str(g.rng.choice(["", " ", "\n", " \n\t "])))


def stray_token(rec, g):
    tok = g.rng.choice(["<|im_end|>", "<|im_start|>assistant\n", "<img>", "<IMG_CONTEXT>", "<|endoftext|>"])
    return _set_answer(rec, lambda a: a + tok + g.sentence())


def open_fence(rec, g):
    return _set_answer(rec, lambda a: a + "\n```python\nprint(" + g.words(1)[0] + ")\n")


def open_tag(rec, g):
    return _set_answer(rec, lambda a: a + " <ref>" + g.words(1)[0] + " <box>[[1, 2, 30, 40]]</box>")


def placeholder_mismatch(rec, g):
    rec = {"image": ["a.jpg", "b.jpg", "c.jpg"][: g.n(2, 4)],
           "conversations": [{"from": "human", "value": "<image>\n" + g.sentence()},
                             {"from": "gpt", "value": g.answer()}]}
    if g.rng.random() < 0.5:
        rec = {"image": "a.jpg", "conversations": [{"from": "human", "value": g.sentence()},
                                                    {"from": "gpt", "value": "<image> " + g.sentence()}]}
    return rec


def unreadable(rec, g):
    return str(g.rng.choice(['{"conversations": [{"from": "human", "value": "hi"', '{"image": "a.jpg"}',
                             '{"conversations": [{"from": "human", "value": "only a question"}]}', "not json"]))


ANOMALIES = {"loop": loop, "mid_loop": mid_loop, "mid_loop_cjk": mid_loop_cjk, "step_loop": step_loop,
             "cut_loop": cut_loop, "ruler_run": ruler_run, "repeated_phrase": repeated_phrase,
             "repeated_lines": repeated_lines, "zeros": zeros, "token_run": token_run, "too_long": too_long,
             "empty": empty, "stray_token": stray_token, "open_fence": open_fence, "open_tag": open_tag,
             "placeholder_mismatch": placeholder_mismatch, "unreadable": unreadable}
CHAT_ONLY = {"placeholder_mismatch", "unreadable"}


class Label(NamedTuple):
    planted: Optional[str]      # the anomaly planted in the line, None for a clean line
    content: str                # the kind of clean content the line was made from


def clean_vqa(g: TextGen, kind: str) -> dict:
    """A short visual question and a short answer (or, rarely, a long pasted prompt)."""
    if kind == "long_prompt":
        q = "<image>\n" + g.sentence(4, 14)
        q = (q + "\n\n" + g.document()) if g.rng.random() < 0.5 else (g.document() + "\n\n" + q)
        return {"image": f"img{g.rng.integers(100)}.jpg",
                "conversations": [{"from": "human", "value": q},
                                  {"from": "gpt", "value": g.answer(g.pick(["short", "caption"]))}]}
    return {"image": f"img{g.rng.integers(100)}.jpg",
            "conversations": [{"from": "human", "value": "<image>\n" + g.sentence(4, 14)},
                              {"from": "gpt", "value": g.answer(kind)}]}


def _spread(kinds: list[str], n: int) -> list[str]:
    """n kinds of content, as evenly spread over `kinds` as n allows."""
    return [kinds[k % len(kinds)] for k in range(n)]


def make_mixture(root: str, n_clean: int = 1200, n_per_kind: int = 12, seed: int = 0,
                 n_vqa: int = 0) -> tuple[str, dict]:
    """meta.json over three datasets (n_clean chats, n_clean/3 preference pairs, n_clean/3 corpus
    documents) with anomalies planted at random lines (n_per_kind of each kind in the chats, a third
    as many in the others), and with n_vqa > 0 a fourth: short visual questions and answers with
    0.8% long pasted prompts (rare, as in a real dataset: the length rule reads the 99th
    percentile). Returns (meta path, {dataset: {line: Label}})."""
    g = TextGen(seed)
    os.makedirs(root, exist_ok=True)
    plans = {"chat": (clean_chat, _spread(CHAT_KINDS, n_clean), list(ANOMALIES)),
             "pairs": (clean_pair, _spread(ANSWER_KINDS, n_clean // 3), [k for k in ANOMALIES if k not in CHAT_ONLY]),
             "corpus": (clean_doc, _spread(CORPUS_KINDS, n_clean // 3),
                        [k for k in ANOMALIES if k not in CHAT_ONLY | {"open_tag"}])}
    if n_vqa:
        rare = n_vqa // 120
        plans["vqa"] = (clean_vqa, _spread(["short", "caption"], n_vqa - rare) + ["long_prompt"] * rare, [])
    truth, meta = {}, {}
    for name, (make, contents, kinds) in plans.items():
        per = n_per_kind if name == "chat" else max(3, n_per_kind // 3)
        labels = [Label(None, c) for c in contents] + [Label(k, "") for k in kinds for _ in range(per)]
        order = g.rng.permutation(len(labels))
        truth[name] = {}
        with open(os.path.join(root, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for line, i in enumerate(order, 1):
                label = labels[i]
                if label.planted is None:
                    rec = make(g, label.content)
                else:
                    content = g.pick(contents)
                    rec = ANOMALIES[label.planted](make(g, content), g)
                    label = Label(label.planted, content)
                f.write(rec if isinstance(rec, str) else json.dumps(rec, ensure_ascii=False))
                f.write("\n")
                truth[name][line] = label
        meta[name] = {"root": "images", "annotation": f"{name}.jsonl", "repeat_time": 1}
        if name == "corpus":
            meta[name]["kind"] = "text"
    path = os.path.join(root, "meta.json")
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    return path, truth


def test_planted_anomalies_are_found_and_clean_samples_kept(tmp_path):
    from megatron_internvl.data.quality.manifest import read_flagged
    from megatron_internvl.data.quality.pipeline import run_filter
    from megatron_internvl.data.quality.settings import FilterSettings

    # anomalies of one kind stay under 1% of a dataset: the length rule reads its 99th percentile
    meta, truth = make_mixture(str(tmp_path / "data"), n_clean=3000, n_per_kind=24, n_vqa=12000)
    report = run_filter(meta, str(tmp_path / "out"), FilterSettings(), workers=1, log=lambda m: None)
    found: dict[str, list] = {}
    clean: dict[str, list] = {}
    false_pos = []
    for name, labels in truth.items():
        flagged = {r["line"]: r for r in read_flagged(str(tmp_path / "out" / name / "flagged.jsonl"))}
        for line, label in labels.items():
            hit = line in flagged
            if label.planted is None:
                clean.setdefault(label.content, []).append(hit)
                if hit:
                    false_pos.append((name, line, label.content, flagged[line]["evidence"]))
            else:
                found.setdefault(label.planted, []).append(hit)
    n_planted = sum(map(len, found.values()))
    n_clean = sum(map(len, clean.values()))
    recall = sum(map(sum, found.values())) / n_planted
    fp_rate = len(false_pos) / n_clean
    print(f"\nplanted anomalies found: {recall:.1%} of {n_planted}; clean samples flagged: {fp_rate:.2%} of {n_clean}")
    print("recall per planted kind:")
    for label, hits in sorted(found.items()):
        print(f"  {label:22s} {sum(hits):4d}/{len(hits):<4d} {sum(hits) / len(hits):6.1%}")
    print("false positives per kind of clean content:")
    for kind, hits in sorted(clean.items()):
        print(f"  {kind:22s} {sum(hits):4d}/{len(hits):<4d} {sum(hits) / len(hits):6.2%}")
    for fp in false_pos[:10]:
        print("  false positive:", str(fp)[:400])
    print(report["table"])
    assert recall >= 0.98 and fp_rate <= 0.01
    low = {k: f"{sum(h)}/{len(h)}" for k, h in found.items() if sum(h) / len(h) < 0.95}
    assert not low, f"kinds of planted anomaly found in under 95% of cases: {low}"
    noisy = {k: f"{sum(h)}/{len(h)}" for k, h in clean.items() if sum(h) / len(h) > 0.02}
    assert not noisy, f"kinds of clean content flagged in over 2% of cases: {noisy}"
    # enough of each kind that one miss or one false positive moves the rate by little
    assert min(map(len, found.values())) >= 24 and min(map(len, clean.values())) >= 100
