"""Structure-aware views of a text, for the rules that count repeated lines, sentences and n-grams.

Formatted answers repeat their *structure* by design: every LaTeX block opens and closes with
`\\begin{aligned}` / `\\end{aligned}`, a matrix separates its cells with `&` and its rows with
`\\\\`, markdown has headings, bold labels, rulers and table separators, and a pretty-printed
JSON list of detections has a `"label": "person",` line per object. Counted as text, these make a
clean answer look repetitive. Here they are taken out, while the content around and inside them
is still counted:

* `units(text)`: the lines that carry content, and the matrices and JSON objects, one unit each.
  Structure lines are left out: LaTeX environment delimiters, `$$`, `\\[`, `\\]` (alone or
  together on a line), markdown headings and bold label lines (`**Answer:**`), and lines without
  a letter or digit (fences, rulers, table separators, JSON brackets). A closed matrix, `array`
  or `tabular` environment is one unit (its rows may repeat: a zero or all-ones matrix). In a
  JSON block (a line that starts with `{` or `[`, up to its closing bracket), the lines of each
  object that is an element of an array (or of the outermost object) are joined into one unit.
  Repeated rows, keys and categorical values then do not repeat; a repeated matrix or object
  still does.
* `word_text(text)`: the text the word-based measures (n-grams, loops) read: closed matrix
  environments, LaTeX commands and environment delimiters, and JSON keys (`"label":`) blanked
  out. A diagonal matrix's zeros then never form a 4-gram and an identity matrix is no loop, a
  JSON list's keys do not make its objects alike; words in `\\text{...}`, in aligned blocks and
  in JSON values still count. A runaway matrix that never closes is read as text.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

_MATRIX = re.compile(r"\\begin\{((?:[pbvVB]?matrix|smallmatrix|array|tabular)\*?)\}.*?\\end\{\1\}", re.S)
_LATEX_DELIM = re.compile(r"\\(?:begin|end)\s*\{[^}]*\}(?:\{[^}]*\}|\[[^\]]*\])*|\$\$|\\[\[\]]")
# a heading, or a whole line in bold/underline (a label such as **Answer:** or __Step 2__); the
# pattern starts with a line break, which the regex engine scans for fast (the text gets one first)
_LABEL_LINE = re.compile(r"\n[ \t]*(?:#{1,6}[ \t][^\n]*|(?:\*\*|__)[^*_\n]{1,80}(?:\*\*|__)[ \t]*:?)[ \t]*(?=\n)")
ALNUM = re.compile(r"[^\W_]")   # a letter or a digit
_JSON_START = re.compile(r"^[ \t]*[\[{]", re.M)
_JSON_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_BRACKETS = re.compile(r"[{}\[\]]")
_JSON_FENCE = re.compile(r"^[ \t]*```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
_LATEX_MARKUP = re.compile(r"\\(?:begin|end)\s*\{[^}]*\}|\\[A-Za-z]+")
_JSON_KEY = re.compile(r'"(?:[^"\\\n]|\\.){0,80}"\s*:')


def has_alnum(s: str) -> bool:
    return ALNUM.search(s) is not None


@lru_cache(maxsize=16)
def units(text: str) -> tuple[str, list[str]]:
    """(the text without its structure lines, the JSON object units); see the module docstring.
    The text keeps its line breaks; units are whitespace-normalised and never split further."""
    matrices: list[str] = []
    if "\\begin" in text:
        text = _MATRIX.sub(lambda m: matrices.append(" ".join(m.group(0).split())) or " ", text)
    if "\\begin" in text or "\\end" in text or "$$" in text or "\\[" in text or "\\]" in text:
        text = _LATEX_DELIM.sub(" ", text)
    if "#" in text or "**" in text or "__" in text:
        text = _LABEL_LINE.sub("\n", "\n" + text + "\n")[1:-1]
    if not ("{" in text or "[" in text) or _JSON_START.search(text) is None:
        return text, matrices
    prose, objects = _json_units(text)
    return prose, matrices + objects


def word_text(text: str, keep_length: bool = False) -> str:
    """`text` without what the word measures skip (see the module docstring); the same object if
    there is nothing to skip. `keep_length`: blanked with as many spaces, so character offsets
    stay those of `text` (for evidence)."""
    if "\\" not in text and '":' not in text:
        return text
    blank = (lambda m: " " * (m.end() - m.start())) if keep_length else " "
    if "\\begin" in text:
        text = _MATRIX.sub(blank, text)
    if "\\" in text:
        text = _LATEX_MARKUP.sub(blank, text)
    if '":' in text:
        text = _JSON_KEY.sub(blank, text)
    return text


def _json_units(text: str) -> tuple[str, list[str]]:
    """JSON that parses (the whole text, or ```json blocks) is read with the JSON parser; the
    rest line by line, following the brackets (JSON cut short, or inside prose)."""
    objects: list[str] = []
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        try:
            _parsed_units(json.loads(text), objects, top=True)
            return "", objects
        except ValueError:
            pass
    if "```" in text:
        def parsed(m):
            try:
                value = json.loads(m.group(1))
            except ValueError:
                return m.group(0)
            _parsed_units(value, objects, top=True)
            return "\n"
        text = _JSON_FENCE.sub(parsed, text)
    prose, more = _bracketed_units(text.split("\n"))
    return prose, objects + more


def _parsed_units(value, out: list[str], top: bool = False) -> None:
    """An element of an array is one unit; the outermost object too, without its arrays of
    objects or arrays, whose elements are units of their own."""
    if isinstance(value, list):
        for v in value:
            if isinstance(v, list) and top:
                _parsed_units(v, out)
            else:
                out.append(_unit(v))
    elif isinstance(value, dict) and top:
        rest = {}
        for k, v in value.items():
            if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
                _parsed_units(v, out, top=True)
            else:
                rest[k] = v
        if rest:
            out.append(_unit(rest))
    else:
        out.append(_unit(value))


def _unit(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _bracketed_units(lines: list[str]) -> tuple[str, list[str]]:
    plain: list[str] = []
    parts: dict[int, list[str]] = {}      # unit id -> its lines
    stack: list[tuple[str, int]] = []     # open containers: (bracket, unit id of their content)
    for line in lines:
        s = line.strip()
        if not stack and not (s.startswith("{") or s.startswith("[")):
            plain.append(s)
            continue
        # the line belongs to the unit of the container it starts in (or of the first it opens)
        owner = stack[-1][1] if stack else -1
        for b in _BRACKETS.findall(_JSON_STRING.sub('""', s)):
            if b in "{[":
                parent = stack[-1] if stack else None
                if b == "{" and (parent is None or parent[0] == "["):
                    uid = len(parts)      # an array element (or the outermost object): a unit
                    parts[uid] = []
                else:
                    uid = parent[1] if parent else -1
                stack.append((b, uid))
                if owner == -1:
                    owner = uid
            elif stack:
                stack.pop()
        if owner == -1:
            plain.append(s)
        elif has_alnum(s):
            parts[owner].append(s)
    return "\n".join(plain), [" ".join(" ".join(p).split()) for p in parts.values() if p]
