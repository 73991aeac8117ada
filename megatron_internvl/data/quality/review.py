"""The review file a person edits, and applying the decisions to write a new mixture.

`review.tsv` (one per dataset) has a line per flagged sample:

    drop<TAB>LINE<TAB>RULES<TAB>EVIDENCE<TAB>EXCERPT

The first column is the decision: `drop` (the default) removes the sample, `keep` keeps it.
LINE is the sample's 1-based line in the input annotation file (as in the trainer's skip
messages and in flagged.jsonl, which holds the whole sample and every rule's evidence).
Only the first two columns are read back; lines starting with `#` are comments.

`apply_review` streams every input annotation file again, leaves out exactly the lines marked
`drop` and writes `<dataset>.jsonl` plus a `meta.json` with the same entries as the input
meta file (the same keys, `root` made absolute, `annotation` the new file, `length` the new
count), so the trainer and `inspect-data` read it as they read the original.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from .chunks import AtomicWriter, is_blank, read_json, read_lines, write_atomic, write_json
from .manifest import MANIFEST, FilterError, check_input_unchanged, read_flagged
from .records import excerpt

REVIEW_FILE = "review.tsv"
DECISIONS = ("keep", "drop")


class ReviewError(ValueError):
    """A review file that cannot be applied as written."""


def _short(evidence: dict) -> str:
    e = {k: v for k, v in evidence.items() if k not in ("rule", "field")}
    text = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in e.items())
    if evidence.get("field"):
        text = f"[{evidence['field']}] {text}"
    return f"{evidence['rule']}: {text}"


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).replace("\t", " ").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_review_file(dataset: str, flagged_path: str, review_path: str) -> int:
    n = 0
    with AtomicWriter(review_path) as out:
        out.write((f"# Review of dataset {dataset!r}: one line per flagged sample.\n"
                   "# Columns: DECISION  LINE  RULES  EVIDENCE  EXCERPT (tab-separated).\n"
                   "# Change `drop` to `keep` for samples to keep; `drop` (the default) removes them.\n"
                   "# Whole samples and evidence: flagged.jsonl beside this file (same LINE numbers).\n"
                   "# Then: megatron-internvl filter-apply --review <this run's --out> --out NEW_DIR\n").encode())
        with open(flagged_path, encoding="utf-8") as f:
            for raw in f:
                if not raw.strip():
                    continue
                rec = json.loads(raw)
                ev = " | ".join(_short(e) for e in rec["evidence"])
                row = ["drop", str(rec["line"]), ",".join(rec["rules"]), _one_line(ev, 300),
                       _one_line(excerpt(rec["sample"].encode("utf-8")), 160)]
                out.write(("\t".join(row) + "\n").encode("utf-8"))
                n += 1
    return n


def read_review(path: str, flagged_lines: set[int]) -> dict[int, str]:
    """LINE -> decision for every flagged line; every flagged line must appear exactly once."""
    decisions: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for k, row in enumerate(f, 1):
            if not row.strip() or row.lstrip().startswith("#"):
                continue
            cols = row.rstrip("\n").split("\t")
            where = f"{path}:{k}"
            if len(cols) < 2:
                raise ReviewError(f"{where}: expected `keep` or `drop`, a tab, then the line number; got {row.strip()[:80]!r}.")
            decision = cols[0].strip().lower()
            if decision not in DECISIONS:
                raise ReviewError(f"{where}: decision {cols[0].strip()!r} is neither `keep` nor `drop`.")
            try:
                line = int(cols[1])
            except ValueError:
                raise ReviewError(f"{where}: {cols[1]!r} is not a line number; leave the second column as written.") from None
            if line not in flagged_lines:
                raise ReviewError(f"{where}: line {line} was not flagged in this dataset; leave the second column as written.")
            if line in decisions:
                raise ReviewError(f"{where}: line {line} appears twice; keep one decision per flagged line.")
            decisions[line] = decision
    missing = sorted(flagged_lines - set(decisions))
    if missing:
        raise ReviewError(f"{path}: flagged line(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} have no "
                          f"decision; restore them from flagged.jsonl with `keep` or `drop`.")
    return decisions


def apply_review(filter_dir: str, out_dir: str, log: Optional[Callable[[str], None]] = None) -> dict:
    """Write the reviewed mixture to `out_dir` (jsonl per dataset + meta.json); returns a summary."""
    log = log or (lambda msg: None)
    filter_dir, out_dir = os.path.abspath(filter_dir), os.path.abspath(out_dir)
    manifest_path = os.path.join(filter_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ReviewError(f"{filter_dir} has no {MANIFEST}; pass the --out folder of a finished filter-data run.")
    manifest = read_json(manifest_path)
    if out_dir == filter_dir:
        raise ReviewError("--out must differ from the filter-data folder given to --review.")
    plans = []
    for entry in manifest["datasets"]:
        folder = os.path.join(filter_dir, entry["folder"])
        if not os.path.exists(os.path.join(folder, "done.json")):
            raise ReviewError(f"dataset {entry['name']!r} is not finished in {filter_dir}; rerun filter-data "
                              f"with the same arguments to complete it.")
        try:
            check_input_unchanged(entry)
        except FilterError as e:
            raise ReviewError(str(e)) from None
        flagged = {r["line"] for r in read_flagged(os.path.join(folder, "flagged.jsonl"))}
        decisions = read_review(os.path.join(folder, REVIEW_FILE), flagged)
        target = os.path.join(out_dir, entry["folder"] + ".jsonl")
        if os.path.abspath(target) == entry["input"]["path"]:
            raise ReviewError(f"--out {out_dir} would overwrite the input {target}; choose another folder.")
        plans.append((entry, {line for line, d in decisions.items() if d == "drop"}, target, len(flagged)))
    os.makedirs(out_dir, exist_ok=True)
    meta, summary = {}, {}
    for entry, drop, target, n_flagged in plans:
        kept = 0
        src = entry["input"]["path"]
        with AtomicWriter(target) as out:
            for line_no, raw in enumerate(read_lines(src, 0, os.path.getsize(src)), 1):
                if is_blank(raw) or line_no in drop:
                    continue
                out.write(raw + b"\n")
                kept += 1
        new = dict(entry["meta_entry"])
        if entry["root"]:
            new["root"] = entry["root"]
        new["annotation"] = os.path.basename(target)
        new["length"] = kept
        meta[entry["name"]] = new
        summary[entry["name"]] = {"kept": kept, "dropped": len(drop), "flagged": n_flagged,
                                  "kept_after_review": n_flagged - len(drop)}
        log(f"{entry['name']}: {kept} kept, {len(drop)} dropped ({n_flagged - len(drop)} of {n_flagged} flagged kept on review)")
    # insertion order kept: the trainer's global order follows the meta file's dataset order
    write_atomic(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    write_json(os.path.join(out_dir, "applied.json"), {"filter_dir": filter_dir, "datasets": summary})
    return summary
