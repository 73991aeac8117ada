"""A generated mixture with planted anomalies: the rules find >= 95% of them and flag < 2% of the
clean samples (both printed, per kind too). The generators are shared with bench/filter_throughput.py.

Clean samples include what legitimately repeats a structure (tables, numbered lists, code,
enumerations, step-by-step reasoning, multi-turn chats) and Zipf-distributed words, so common
words and phrases recur as in real text.
"""

from __future__ import annotations

import json
import os

import numpy as np

SYLLABLES = "ka lo mi ne ru ta ve shi po an el or um ix bra ce do fu gri ha jo ku le ma no pe qui ro sa te".split()


class TextGen:
    def __init__(self, seed: int, vocab: int = 4000):
        self.rng = np.random.default_rng(seed)
        r = self.rng
        common = ("the of and a to in is that it with as for was on are by this be from at or an which "
                  "image shows there two one left right color people picture we can see").split()
        made = {"".join(r.choice(SYLLABLES, size=int(r.integers(1, 4)))) for _ in range(vocab * 2)}
        self.vocab = common + sorted(made - set(common))[: vocab]
        p = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.1
        self.p = p / p.sum()
        self._buf, self._at = np.zeros(0, np.int64), 0

    def words(self, n: int) -> list[str]:
        # Zipf draws in bulk: one rng.choice per word would dominate the test's time
        if self._at + n > self._buf.size:
            self._buf, self._at = self.rng.choice(len(self.vocab), size=max(n, 200_000), p=self.p), 0
        idx = self._buf[self._at:self._at + n]
        self._at += n
        return [self.vocab[i] for i in idx]

    def sentence(self, lo: int = 6, hi: int = 20) -> str:
        w = self.words(int(self.rng.integers(lo, hi)))
        return " ".join(w).capitalize() + self.rng.choice([".", ".", ".", "!", "?"])

    def paragraph(self, lo: int = 2, hi: int = 6) -> str:
        return " ".join(self.sentence() for _ in range(int(self.rng.integers(lo, hi))))

    # -- answers of every legitimate shape
    def table(self) -> str:
        cols = int(self.rng.integers(2, 6))
        rows = [" | ".join(w.capitalize() for w in self.words(cols)),
                " | ".join(["---"] * cols)]
        for _ in range(int(self.rng.integers(4, 25))):
            cells = [self.rng.choice([self.words(1)[0], str(int(self.rng.integers(0, 1000))), "Yes", "No"])
                     for _ in range(cols)]
            rows.append(" | ".join(cells))
        return "\n".join(f"| {r} |" for r in rows)

    def numbered(self) -> str:
        return "\n".join(f"{k}. {self.sentence(4, 12)}" for k in range(1, int(self.rng.integers(4, 25))))

    def steps(self) -> str:
        n = int(self.rng.integers(3, 12))
        body = "\n".join(f"Step {k}: {self.sentence()} So x_{k} = {int(self.rng.integers(1, 99))}." for k in range(1, n))
        return body + f"\nTherefore the answer is {int(self.rng.integers(1, 500))}."

    def code(self) -> str:
        names = [w for w in self.words(40) if w.isalpha()][:int(self.rng.integers(3, 12))]
        lines = ["```python", f"def build_{names[0]}(cfg):", "    out = {}"]
        lines += [f"    out[\"{n}\"] = cfg.get(\"{n}\", {int(self.rng.integers(0, 100))})" for n in names]
        lines += ["    for key in out:", "        print(key, out[key])", "    return out", "```"]
        return self.sentence() + "\n" + "\n".join(lines)

    def enumeration(self) -> str:
        step = int(self.rng.integers(2, 9))
        n = int(self.rng.integers(20, 150))
        return f"The multiples of {step} are " + ", ".join(str(step * k) for k in range(1, n)) + "."

    def short(self) -> str:
        return str(self.rng.choice(["Yes", "No", "A", "B", "C", "D", "2", "17", self.words(1)[0].capitalize()]))

    def answer(self) -> str:
        kind = self.rng.choice(["short", "caption", "paragraph", "table", "numbered", "steps", "code", "enum"],
                               p=[0.2, 0.2, 0.2, 0.08, 0.08, 0.1, 0.08, 0.06])
        return {"short": self.short, "caption": lambda: self.paragraph(1, 3), "paragraph": lambda: self.paragraph(3, 10),
                "table": self.table, "numbered": self.numbered, "steps": self.steps, "code": self.code,
                "enum": self.enumeration}[kind]()


def clean_chat(g: TextGen) -> dict:
    rng = g.rng
    n_img = int(rng.choice([0, 1, 1, 1, 2, 3]))
    if n_img == 0:
        q = g.sentence()
    elif n_img == 1:
        q = rng.choice(["<image>\n", ""]) + g.sentence()
    else:
        q = "".join(f"Image-{k + 1}: <image>\n" for k in range(n_img)) + g.sentence()
    turns = [{"from": "human", "value": q}, {"from": "gpt", "value": g.answer()}]
    for _ in range(int(rng.choice([0, 0, 0, 1, 2]))):
        turns += [{"from": "human", "value": g.sentence()}, {"from": "gpt", "value": g.answer()}]
    rec = {"conversations": turns}
    if n_img:
        rec["image"] = f"img{rng.integers(100)}.jpg" if n_img == 1 else [f"img{rng.integers(100)}.jpg" for _ in range(n_img)]
    return rec


def clean_doc(g: TextGen) -> dict:
    return {"text": "\n\n".join(g.paragraph(3, 8) for _ in range(int(g.rng.integers(1, 5))))}


def clean_pair(g: TextGen) -> dict:
    return {"image": f"img{g.rng.integers(100)}.jpg", "question": "<image>\n" + g.sentence(),
            "chosen": g.answer(), "rejected": g.answer()}


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


def loop(rec, g):
    span = g.sentence(4, 14)
    k = int(g.rng.integers(4, 40))
    cut = span[: int(g.rng.integers(0, len(span)))]
    return _set_answer(rec, lambda a: a + " " + " ".join([span] * k) + " " + cut)


def repeated_phrase(rec, g):
    phrase = " ".join(g.words(int(g.rng.integers(4, 8))))
    parts = [f"{phrase} {g.words(1)[0]}" for _ in range(int(g.rng.integers(8, 30)))]
    return _set_answer(rec, lambda a: ". ".join(parts) + ".")


def repeated_lines(rec, g):
    base = [g.sentence(5, 12) for _ in range(int(g.rng.integers(1, 4)))]
    lines = [base[k % len(base)] for k in range(int(g.rng.integers(8, 30)))]
    return _set_answer(rec, lambda a: "\n".join(lines))


def zeros(rec, g):
    return _set_answer(rec, lambda a: a + " 0." + "0" * int(g.rng.integers(30, 300)))


def token_run(rec, g):
    tok = g.rng.choice(["0", "1", "the", "yes", g.words(1)[0]])
    sep = g.rng.choice([" ", ", "])
    return _set_answer(rec, lambda a: a + " " + sep.join([tok] * int(g.rng.integers(15, 80))))


def too_long(rec, g):
    return _set_answer(rec, lambda a: "\n\n".join(g.paragraph(8, 14) for _ in range(int(g.rng.integers(30, 60)))))


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
    rec = {"image": ["a.jpg", "b.jpg", "c.jpg"][: int(g.rng.integers(2, 4))],
           "conversations": [{"from": "human", "value": "<image>\n" + g.sentence()},
                             {"from": "gpt", "value": g.answer()}]}
    if g.rng.random() < 0.5:
        rec = {"image": "a.jpg", "conversations": [{"from": "human", "value": g.sentence()},
                                                    {"from": "gpt", "value": "<image> " + g.sentence()}]}
    return rec


def unreadable(rec, g):
    return str(g.rng.choice(['{"conversations": [{"from": "human", "value": "hi"', '{"image": "a.jpg"}',
                             '{"conversations": [{"from": "human", "value": "only a question"}]}', "not json"]))


ANOMALIES = {"loop": loop, "repeated_phrase": repeated_phrase, "repeated_lines": repeated_lines, "zeros": zeros,
             "token_run": token_run, "too_long": too_long, "empty": empty, "stray_token": stray_token,
             "open_fence": open_fence, "open_tag": open_tag, "placeholder_mismatch": placeholder_mismatch,
             "unreadable": unreadable}
CHAT_ONLY = {"placeholder_mismatch", "unreadable"}


def make_mixture(root: str, n_clean: int = 1200, n_per_kind: int = 12, seed: int = 0) -> tuple[str, dict]:
    """meta.json over three datasets (chat, preference pairs, text corpus) with anomalies
    planted at random lines. Returns (meta path, {dataset: {line: anomaly kind or None}})."""
    g = TextGen(seed)
    os.makedirs(root, exist_ok=True)
    plans = {"chat": (clean_chat, n_clean, list(ANOMALIES)),
             "pairs": (clean_pair, n_clean // 3, [k for k in ANOMALIES if k not in CHAT_ONLY]),
             "corpus": (clean_doc, n_clean // 3, [k for k in ANOMALIES if k not in CHAT_ONLY | {"open_tag"}])}
    truth, meta = {}, {}
    for name, (make, n, kinds) in plans.items():
        per = n_per_kind if name == "chat" else max(3, n_per_kind // 3)
        labels = [None] * n + [k for k in kinds for _ in range(per)]
        g.rng.shuffle(labels)
        truth[name] = {}
        with open(os.path.join(root, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for line, label in enumerate(labels, 1):
                rec = make(g)
                if label is not None:
                    rec = ANOMALIES[label](rec, g)
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
    from megatron_internvl.data.quality.pipeline import read_flagged, run_filter
    from megatron_internvl.data.quality.settings import FilterSettings

    meta, truth = make_mixture(str(tmp_path / "data"))
    report = run_filter(meta, str(tmp_path / "out"), FilterSettings(), workers=1, log=lambda m: None)
    found: dict[str, list] = {}
    false_pos, clean = [], 0
    for name, labels in truth.items():
        flagged = {r["line"]: r for r in read_flagged(str(tmp_path / "out" / name / "flagged.jsonl"))}
        for line, label in labels.items():
            if label is None:
                clean += 1
                if line in flagged:
                    false_pos.append((name, line, flagged[line]["evidence"]))
            else:
                found.setdefault(label, []).append(line in flagged)
    planted = sum(len(v) for v in found.values())
    recall = sum(sum(v) for v in found.values()) / planted
    fp_rate = len(false_pos) / clean
    print(f"\nplanted anomalies found: {recall:.1%} of {planted}; clean samples flagged: {fp_rate:.2%} of {clean}")
    for label, hits in sorted(found.items()):
        print(f"  {label:22s} {sum(hits)}/{len(hits)}")
    for fp in false_pos[:10]:
        print("  false positive:", fp)
    print(report["table"])
    assert recall >= 0.95
    assert fp_rate < 0.02
    # every kind is mostly found, not only the overall share
    assert all(sum(h) / len(h) >= 0.75 for h in found.values()), found
