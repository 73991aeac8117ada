"""Heuristic rules (the paper's (c)) and the check of one sample by every enabled rule.

Rule names as they appear in the flagged file, the review file and the report:

| rule | catches |
|---|---|
| `unreadable` | a line the trainer would skip (not JSON, no conversations, no text) |
| `length` | a sample (without its prompts) or an answer far longer / shorter than the dataset's own distribution |
| `prompt_length` | a user turn far longer than the dataset's own (off by default) |
| `char_run` | a long run of one character, e.g. `000000...`, or a ruler / leader far longer than a table needs |
| `token_run` | one word or number repeated many times in a row |
| `duplicate_lines` | a text whose lines are largely copies of each other |
| `empty_answer` | an empty or whitespace-only answer |
| `formatting` | odd number of code fences, template tokens inside text, unclosed `<ref>`/`<box>`/`<quad>` |
| `placeholders` | `<image>`/`<video>` counts that do not match the images, or a placeholder in an answer |
| `repetition.*` | see repetition.py (supervised text only) |
"""

from __future__ import annotations

import re
from typing import Optional

from . import repetition, structure
from .lengths import LengthLimits
from .records import SampleView, Unreadable, read_view
from .repetition import Finding
from .settings import FilterSettings

HEURISTIC_RULES = ("unreadable", "length", "prompt_length", "char_run", "token_run", "duplicate_lines", "empty_answer",
                   "formatting", "placeholders")
LENGTH_RULES = ("length", "prompt_length")     # they need the dataset's length distribution
REPETITION_RULES = ("repetition.ngram", "repetition.sentences", "repetition.loop", "repetition.compression")
_HAS_WORD = re.compile(r"[^\W_]")
_SEPARATORS = re.compile(r"[\s,;]+")
_FENCE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)


def enabled_rules(settings: FilterSettings) -> list[str]:
    h, r = settings.heuristics, settings.repetition
    out = [name for name in HEURISTIC_RULES if getattr(h, name).enabled]
    out += [name for name in REPETITION_RULES if getattr(r, name.split(".")[1]).enabled]
    return out


def char_runs(text: str, max_run: int, ignore: str, max_ruler_run: int = 0) -> Optional[dict]:
    """The first run of more than `max_run` copies of one character not in `ignore`, or of more
    than `max_ruler_run` (if not 0) copies of a character in `ignore` other than whitespace."""
    # one regex pass: C finds runs at C speed, Python only looks at the hits
    for m in _char_run_re(max_run).finditer(text):
        c = m.group(1)
        if c not in ignore:
            return {"char": c, "run": len(m.group(0)), "at": m.start(), "max_run": max_run}
        if max_ruler_run and m.end() - m.start() > max_ruler_run and not c.isspace():
            return {"char": c, "run": m.end() - m.start(), "at": m.start(), "max_run": max_ruler_run, "ruler": True}
    return None


_RUN_RES: dict[int, re.Pattern] = {}


def _char_run_re(max_run: int) -> re.Pattern:
    if max_run not in _RUN_RES:
        _RUN_RES[max_run] = re.compile(r"(.)\1{%d,}" % max_run, re.DOTALL)
    return _RUN_RES[max_run]


_WORD_RUN_RES: dict[int, re.Pattern] = {}


def token_run(text: str, max_run: int) -> Optional[dict]:
    """The first word or number written more than `max_run` times in a row."""
    pat = _WORD_RUN_RES.get(max_run)
    if pat is None:
        pat = _WORD_RUN_RES[max_run] = re.compile(r"\b(\w+)\b(?:[\s,;]+\1\b){%d,}" % max_run, re.UNICODE)
    m = pat.search(text)
    if m is None:
        return None
    return {"token": m.group(1), "run": len(_SEPARATORS.split(m.group(0))), "at": m.start(), "max_run": max_run}


def duplicate_lines(text: str, min_chars: int) -> tuple[int, int, str, int]:
    """(duplicate lines, lines counted, most repeated line, its count) over the content lines
    (structure.units: a pretty-printed JSON object is one line) of >= min_chars."""
    prose, objects = structure.units(text)
    seen: dict[str, int] = {}
    n = dup = 0
    for line in prose.split("\n") + objects:
        line = line.strip()
        # rulers and table separators ("|---|---|") repeat by design
        if len(line) < min_chars or not _HAS_WORD.search(line):
            continue
        n += 1
        c = seen.get(line, 0)
        dup += c > 0
        seen[line] = c + 1
    if not dup:
        return 0, n, "", 0
    top = max(seen, key=seen.get)
    return dup, n, top, seen[top]


def formatting_problems(text: str, settings: FilterSettings) -> Optional[dict]:
    f = settings.heuristics.formatting
    if f.code_fences and ("```" in text or "~~~" in text):
        fences = len(_FENCE.findall(text))
        if fences % 2:
            return {"problem": "unbalanced code fences", "fences": fences}
    for token in f.stray_tokens:
        if token in text:
            return {"problem": "template token inside text", "token": token, "count": text.count(token)}
    for open_tag, close_tag in f.tag_pairs:
        if open_tag in text or close_tag in text:
            a, b = text.count(open_tag), text.count(close_tag)
            if a != b:
                return {"problem": "unbalanced tags", "open": open_tag, "opened": a, "closed": b}
    return None


def check_view(view: SampleView, settings: FilterSettings, limits: Optional[LengthLimits]) -> list[Finding]:
    """Findings of every enabled heuristic and repetition rule on one readable sample."""
    h = settings.heuristics
    out: list[Finding] = []
    if h.length.enabled and limits is not None:
        hit = limits.check("sample", view.sample_chars)
        if hit:
            out.append(Finding("length", dict(field="sample", **hit)))
        else:
            for f in view.fields:
                hit = limits.check(f.role, len(f.text)) if f.role != "user" else None
                if hit:
                    out.append(Finding("length", dict(field=f.name, role=f.role, **hit)))
                    break
    if h.prompt_length.enabled and limits is not None:
        for f in view.fields:
            hit = limits.check("user", len(f.text)) if f.role == "user" else None
            if hit:
                out.append(Finding("prompt_length", dict(field=f.name, role=f.role, **hit)))
                break
    if h.empty_answer.enabled:
        for f in view.answers:
            if not f.text.strip():
                out.append(Finding("empty_answer", {"field": f.name, "value": f.text[:20]}))
                break
    if h.placeholders.enabled and view.placeholder_problem:
        out.append(Finding("placeholders", {"problem": view.placeholder_problem, "images": view.num_images}))
    for name, check in (("char_run", _char_run), ("token_run", _token_run),
                        ("duplicate_lines", _duplicate_lines), ("formatting", _formatting)):
        if not getattr(h, name).enabled:
            continue
        for f in view.fields:
            hit = check(f.text, settings)
            if hit:
                out.append(Finding(name, dict(field=f.name, **hit)))
                break
    seen_rules = {x.rule for x in out}
    for f in view.supervised:
        for finding in repetition.check_text(f.text, settings.repetition, f.name):
            if finding.rule not in seen_rules:
                seen_rules.add(finding.rule)
                out.append(finding)
    return out


def _char_run(text, settings):
    c = settings.heuristics.char_run
    return char_runs(text, c.max_run, c.ignore_chars, c.max_ruler_run)


def _token_run(text, settings):
    return token_run(text, settings.heuristics.token_run.max_run)


def _duplicate_lines(text, settings):
    d = settings.heuristics.duplicate_lines
    if text.count("\n") + 1 < d.min_duplicates + 1:
        return None
    dup, n, top, c = duplicate_lines(text, d.min_line_chars)
    if dup >= d.min_duplicates and dup / n >= d.max_share:
        return {"duplicates": dup, "lines": n, "share": round(dup / n, 3), "line": top[:200], "repeats": c}
    return None


def _formatting(text, settings):
    return formatting_problems(text, settings)


def check_line(raw: bytes, kind: str, text_field: str, settings: FilterSettings,
               limits: Optional[LengthLimits]) -> list[Finding]:
    """Findings for one raw annotation line (an unreadable line gives one `unreadable` finding)."""
    try:
        view = read_view(raw, kind, text_field)
    except Unreadable as e:
        if settings.heuristics.unreadable.enabled:
            return [Finding("unreadable", {"reason": e.reason, "detail": str(e)})]
        return []
    return check_view(view, settings, limits)
