"""Repetition detection on supervised text, cheap enough for tens of millions of samples.

Four measures, each a rule with a threshold (settings.RepetitionRules):

* `ngram`: share of word n-gram positions whose n-gram already occurred earlier in the
  answer (about (k-1)/k for a span written k times), or share of the words covered by the
  most frequent n-gram alone (a short phrase repeated with one word changed each time). Punctuation and markup tokens are left
  out of the n-grams, so table pipes, list markers and brackets never make n-grams alike;
  numbers stay in, so "Step 1 ..., Step 2 ..." and enumerations differ.
* `sentences`: sentences and lines (split on line breaks and sentence ends) repeated within
  the answer; very short pieces ("```", "}", "| --- |") are not counted.
* `loop`: the answer ends in one span repeated (the failure a looping model produces), found
  as the longest token suffix with period p <= max_period; the copies may be cut mid-span.
* `compression`: zlib-compressed size / raw size; only for long texts, where a very low
  ratio means little but repetition.

Legitimate structure (markdown tables, numbered lists, code that repeats a pattern, long
enumerations) repeats a shape with new content each time, which none of the four counts.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass
from .settings import RepetitionRules

# CJK ideographs, kana and hangul count one token per character (no spaces between words)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]", re.UNICODE)
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+", re.UNICODE)
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
    """(duplicate share, duplicates, most repeated sentence, its count, sentences counted)."""
    pieces = [" ".join(s.lower().split()) for s in split_sentences(text)]
    pieces = [s for s in pieces if len(s) >= min_chars]
    if not pieces:
        return 0.0, 0, "", 0, 0
    counts = Counter(pieces)
    dup = len(pieces) - len(counts)
    top, c = counts.most_common(1)[0]
    return dup / len(pieces), dup, top, c, len(pieces)


def looping_suffix(toks: list[str], max_period: int) -> tuple[int, int]:
    """(period p, suffix length L) of the longest p-periodic token suffix over p <= max_period,
    preferring the smallest period among those with the most repeats (L / p)."""
    n = len(toks)
    best_p, best_len, best_rep = 0, 0, 1.0
    for p in range(1, min(max_period, n // 2) + 1):
        # walk back while toks[j] == toks[j + p]: the suffix from j is p-periodic
        j = n - p - 1
        while j >= 0 and toks[j] == toks[j + p]:
            j -= 1
        length = n - 1 - j
        rep = length / p
        if rep > best_rep and length > best_len:
            best_p, best_len, best_rep = p, length, rep
    return best_p, best_len


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 6)) / max(1, len(raw))


def check_text(text: str, rules: RepetitionRules, where: str = "") -> list[Finding]:
    """All repetition findings for one supervised text."""
    out: list[Finding] = []
    r = rules
    # every token is at least one character: shorter texts cannot reach the token minimums
    ngram = r.ngram.enabled and len(text) >= r.ngram.min_tokens
    loop = r.loop.enabled and len(text) >= r.loop.min_tokens
    if loop:
        toks = tokens(text)
    if ngram:
        ws = _WORD_RE.findall(text.lower())
        if len(ws) >= r.ngram.min_tokens:
            share, top, count = ngram_repetition(ws, r.ngram.n)
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
        p, length = looping_suffix(toks, r.loop.max_period)
        if p and length / p >= r.loop.min_repeats and length >= r.loop.min_tokens:
            out.append(Finding("repetition.loop", {
                "field": where, "span": _join(toks[len(toks) - length:len(toks) - length + p])[:200], "period_tokens": p,
                "repeats": round(length / p, 2), "suffix_tokens": length}))
    if r.compression.enabled and len(text) >= r.compression.min_chars:
        ratio = compression_ratio(text)
        if ratio < r.compression.min_ratio:
            out.append(Finding("repetition.compression", {
                "field": where, "ratio": round(ratio, 4), "threshold": r.compression.min_ratio,
                "chars": len(text)}))
    return out


def _join(toks: list[str]) -> str:
    return " ".join(toks)
