"""Repetition detection on supervised text, cheap enough for tens of millions of samples.

Four measures, each a rule with a threshold (settings.RepetitionRules):

* `ngram`: share of word n-gram positions whose n-gram already occurred earlier in the
  answer (about (k-1)/k for a span written k times), or share of the words covered by the
  most frequent n-gram alone (a short phrase repeated with one word changed each time).
  Punctuation and markup are left out of the words (structure.word_text: also closed matrices,
  LaTeX commands and JSON keys), so table pipes, list markers, brackets, the zeros of a matrix
  and the keys of a JSON list never make n-grams alike; numbers stay in, so "Step 1 ...,
  Step 2 ..." and enumerations differ.
* `sentences`: sentences and lines repeated within the answer, over the answer's content
  (structure.units: LaTeX delimiters, headings, bold labels and lines without a letter or
  digit are not counted, a pretty-printed JSON object counts as one unit).
* `loop`: one span of words written many times in a row, anywhere in the answer (the failure a
  looping model produces, also when it found its way out of the loop). For every period
  p <= max_period, the stretches where word i equals word i + p are exactly the p-periodic
  spans; the longest one with enough copies is reported (its span, period, copies and start).
  A stretch that reaches the end of the answer (a model stopped by its token limit) needs
  `min_repeats` copies and its last copy may be cut mid-span or mid-word; elsewhere it needs
  `min_repeats_inside`. The same words as the n-grams, not characters or punctuation: a ruler
  or a table separator is no loop (rules.char_runs handles those), nor is an identity matrix,
  and "yes, yes." loops like "yes yes".
* `compression`: zlib-compressed size / raw size; only for long texts, where a very low
  ratio means little but repetition. Runs of whitespace (indentation, padding) and of ruler
  characters are cut short first: they are char_run's business, and they would make a padded
  table or an indented JSON answer look repetitive.

Legitimate structure (markdown tables, numbered lists, code that repeats a pattern, long
enumerations, LaTeX environments, JSON lists) repeats a shape with new content each time,
which none of the four counts.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from . import structure
from .settings import RepetitionRules

# CJK ideographs, kana and hangul count one token per character (no spaces between words)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]", re.UNICODE)
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+", re.UNICODE)
# a replacement character or half a surrogate pair: the end of a text cut inside a character
_BROKEN_END = re.compile(r"[\ufffd\ud800-\udfff]+$")
_RULER_RUN = re.compile(r"([-=_*.#~])\1{3,}")
_RULERS = [c * 4 for c in "-=_*.#~"]
_SENTENCE_SPLIT = re.compile(r"\n+|(?<=[.!?。！？])\s+|(?<=[。！？])")


@dataclass
class Finding:
    rule: str
    evidence: dict


def tokens(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


def words(text: str) -> list[str]:
    """Tokens without punctuation, lower-cased: what n-grams are made of."""
    return [w.lower() for w in _WORD_RE.findall(text)]


def ngram_repetition(ws: list[str], n: int) -> tuple[float, tuple[str, ...], int]:
    """(share of n-gram positions repeating an earlier n-gram, most frequent n-gram, its count)."""
    total = len(ws) - n + 1
    if total <= 0:
        return 0.0, (), 0
    grams = Counter(zip(*(ws[i:] for i in range(n))))
    top, count = grams.most_common(1)[0]
    return (total - len(grams)) / total, top, count


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s and s.strip()]


def sentence_repetition(text: str, min_chars: int) -> tuple[float, int, str, int, int]:
    """(duplicate share, duplicates, most repeated sentence, its count, sentences counted), over
    the text's content (structure.units); pieces without a letter or digit are not counted."""
    prose, objects = structure.units(text)
    pieces = [" ".join(s.lower().split()) for s in split_sentences(prose)]
    alnum = structure.ALNUM.search
    pieces = [s for s in pieces if len(s) >= min_chars and alnum(s)]
    pieces += [u.lower() for u in objects if len(u) >= min_chars]
    if not pieces:
        return 0.0, 0, "", 0, 0
    counts = Counter(pieces)
    dup = len(pieces) - len(counts)
    top, c = counts.most_common(1)[0]
    return dup / len(pieces), dup, top, c, len(pieces)


@dataclass
class Loop:
    start: int        # first word of the periodic stretch
    period: int       # words per copy
    length: int       # words the stretch covers (the last copy may be partial)
    at_end: bool      # the stretch ends the text

    @property
    def repeats(self) -> float:
        return self.length / self.period


_NO_WORD = hash("\x00")   # after the last word: equal to no word


@lru_cache(maxsize=64)
def _min_matches(max_period: int, min_words: int, min_repeats: float) -> int:
    """Fewest consecutive matches (word j == word j + p) any qualifying stretch has: r matches
    make a stretch of r + p words, which needs r + p >= min_words and >= min_repeats * p."""
    return max(1, min(max(min_words - p, math.ceil((min_repeats - 1) * p)) for p in range(1, max_period + 1)))


def find_loop(ws: list[str], max_period: int, min_words: int, min_repeats_end: float,
              min_repeats_inside: float, cut_last: bool = False,
              unrepeated_n: Optional[int] = None) -> Optional[Loop]:
    """The longest p-periodic stretch of words (p <= max_period, smallest p on ties) covering at
    least `min_words` words, with at least `min_repeats_end` copies if it ends the text, else
    `min_repeats_inside`. `cut_last`: the text may end mid-word, so its last word also matches
    a word it is the beginning of. `unrepeated_n`: n if the caller knows that no word n-gram of
    `ws` occurs twice (a shortcut: then no stretch of n + 1 matches exists)."""
    n = len(ws)
    fewest = min(min_repeats_end, min_repeats_inside)
    big_p = min(max_period, int(n / fewest))
    if n < min_words or big_p < 1:
        return None
    need = _min_matches(big_p, min_words, fewest)
    # `need` matches in a row (one of them maybe the cut last word) repeat a k-gram: most texts
    # repeat none and are done here, without the arrays below
    if unrepeated_n is not None and unrepeated_n < need:
        return None
    k = min(4, need - 1)
    if unrepeated_n is None and k >= 2 and len(set(zip(*(ws[i:] for i in range(k))))) == n - k + 1:
        return None
    ids = np.empty(n + big_p, np.int64)
    ids[:n] = np.fromiter(map(hash, ws), np.int64, n)
    ids[n:] = _NO_WORD
    # eq[p - 1, j]: word j == word j + p (a strided view of the words shifted by p, row by row)
    eq = np.ndarray((big_p, n), np.int64, ids, 8, (8, 8)) == ids[:n]
    if cut_last:
        last = ws[-1]
        for p in range(1, big_p + 1):
            w = ws[n - 1 - p]
            if w != last and w.startswith(last):
                eq[p - 1, n - 1 - p] = True
    # does any row hold `need` matches in a row? (run[:, j]: eq[:, j .. j + have - 1])
    run, have = eq, 1
    while have < need:
        step = min(have, need - have)
        run = run[:, :-step] & run[:, step:]
        have += step
    if not run.any():
        return None
    # the runs of matches of every row, read off one flat array with a 0 before every row
    flat = np.zeros((big_p, n + 1), np.int8)
    flat[:, 1:] = eq
    step = np.diff(flat.ravel(), append=0)
    first = np.flatnonzero(step == 1) + 1
    last_true = np.flatnonzero(step == -1)
    period = first // (n + 1) + 1
    start = first % (n + 1) - 1
    length = last_true - first + 1 + period      # a run of r matches: r + p periodic words
    at_end = start + length == n
    copies = np.where(at_end, min_repeats_end, min_repeats_inside)
    ok = np.flatnonzero((length >= min_words) & (length >= copies * period))
    if not ok.size:
        return None
    best = ok[np.lexsort((period[ok], -length[ok]))[0]]
    return Loop(int(start[best]), int(period[best]), int(length[best]), bool(at_end[best]))


def looping_suffix(toks: list[str], max_period: int) -> tuple[int, int]:
    """(period p, length L) of the longest p-periodic suffix over p <= max_period (smallest p
    on ties); (0, 0) if none repeats."""
    loop = find_loop(toks, max_period, 0, 1.0 + 1e-9, float("inf"))
    return (loop.period, loop.length) if loop else (0, 0)


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 6)) / max(1, len(raw))


def without_runs(text: str) -> str:
    """`text` with its whitespace runs cut to one space and its ruler runs (4 or more copies of
    one of `-=_*.#~`) to three."""
    text = " ".join(text.split())
    if any(run in text for run in _RULERS):
        text = _RULER_RUN.sub(r"\1\1\1", text)
    return text


def check_text(text: str, rules: RepetitionRules, where: str = "") -> list[Finding]:
    """All repetition findings for one supervised text."""
    out: list[Finding] = []
    r = rules
    # every word is at least one character: shorter texts cannot reach the word minimums
    ngram = r.ngram.enabled and len(text) >= r.ngram.min_tokens
    loop = r.loop.enabled and len(text) >= r.loop.min_tokens
    no_repeat = None        # n when no word n-gram repeats: then there is no loop either
    if ngram or loop:
        ws = _WORD_RE.findall(structure.word_text(text).lower())
    if ngram and len(ws) >= r.ngram.min_tokens:
        share, top, count = ngram_repetition(ws, r.ngram.n)
        if count == 1:
            no_repeat = r.ngram.n
        coverage = min(1.0, count * r.ngram.n / len(ws))
        if count >= r.ngram.min_count and (share >= r.ngram.max_share or coverage >= r.ngram.max_top_coverage):
            out.append(Finding("repetition.ngram", {
                "field": where, "ngram": " ".join(top), "repeats": count, "share": round(share, 3),
                "top_coverage": round(coverage, 3), "max_share": r.ngram.max_share,
                "max_top_coverage": r.ngram.max_top_coverage}))
    if r.sentences.enabled:
        share, dup, top, c, total = sentence_repetition(text, r.sentences.min_chars)
        if dup >= r.sentences.min_duplicates and share >= r.sentences.max_share:
            out.append(Finding("repetition.sentences", {
                "field": where, "sentence": top[:200], "repeats": c, "duplicates": dup,
                "sentences": total, "share": round(share, 3), "threshold": r.sentences.max_share}))
    if loop:
        # a text cut by a token limit may end mid-word, or in a broken character
        tail = _BROKEN_END.sub("", text[-8:])
        found = find_loop(ws, r.loop.max_period, r.loop.min_tokens, r.loop.min_repeats, r.loop.min_repeats_inside,
                          cut_last=tail[-1:].isalnum(), unrepeated_n=no_repeat)
        if found:
            out.append(Finding("repetition.loop", dict(field=where, **loop_evidence(text, found))))
    if r.compression.enabled and len(text) >= r.compression.min_chars:
        short = without_runs(text)
        if len(short) >= r.compression.min_chars:
            ratio = compression_ratio(short)
            if ratio < r.compression.min_ratio:
                out.append(Finding("repetition.compression", {
                    "field": where, "ratio": round(ratio, 4), "threshold": r.compression.min_ratio,
                    "chars": len(short)}))
    return out


def loop_evidence(text: str, loop: Loop) -> dict:
    """The loop's first copy as written, its period, copies, and where it starts (character)."""
    at = end = 0
    for k, m in enumerate(_WORD_RE.finditer(structure.word_text(text, keep_length=True))):
        if k == loop.start:
            at = m.start()
        if k == loop.start + loop.period - 1:
            end = m.end()
            break
    return {"span": text[at:end][:200], "period_words": loop.period, "repeats": round(loop.repeats, 2),
            "words": loop.length, "at": at, "at_end": loop.at_end}
