"""The filtering run over a meta file: streaming, several processes, resumable.

Per dataset, in byte-range chunks (chunks.py) that run on `workers` processes:

1. stats: count the lines and sample the lengths (lengths.py) -> parts/stats.C.json
2. check: every heuristic and repetition rule (rules.py) -> parts/flagged.C.jsonl + parts/check.C.json
3. score (with a scorer): the samples no rule flagged, batched through the LLM in this
   process (the model is loaded once) -> parts/scored.C.jsonl + parts/score.C.json
4. merge: kept.jsonl (the input minus every flagged line, bytes unchanged), flagged.jsonl,
   review.tsv, report.json, then done.json.

Each part is written to a temporary name and renamed, the `.json` of a step last, so a part
that exists is complete. A rerun skips finished datasets (done.json) and finished parts; it
refuses an output folder made from other input files or other settings. The input is only
ever opened for reading. Memory is bounded by one line per reader, the length samples and
the line numbers of the flagged samples.
"""

from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable, Optional

from megatron_internvl.config.data import DatasetSpec
from ..sources import SourceError, load_meta
from . import review
from .chunks import AtomicWriter, chunk_ranges, is_blank, read_json, read_lines, write_json
from .lengths import LengthLimits, LengthSketch, limits_from
from .manifest import MANIFEST, FilterError, input_stamp, read_flagged
from .records import Unreadable, read_view
from .report import dataset_report, write_report
from .rules import LENGTH_RULES, check_line, enabled_rules
from .settings import FilterSettings


@dataclass
class DatasetJob:
    spec: DatasetSpec
    folder: str
    ranges: list[tuple[int, int]]

    @property
    def parts(self) -> str:
        return os.path.join(self.folder, "parts")


def dataset_folder_names(names: list[str]) -> dict[str, str]:
    out, used = {}, set()
    for name in names:
        base = re.sub(r"[^\w.-]+", "_", name).strip("._") or "dataset"
        slug, k = base, 1
        while slug in used:
            k += 1
            slug = f"{base}_{k}"
        used.add(slug)
        out[name] = slug
    return out


# --------------------------------------------------------------------------- the three steps

def stats_chunk(path: str, start: int, end: int, kind: str, text_field: str, k: int, seed: int) -> dict:
    """Line count of a chunk and the length sample of its samples (line numbers chunk-local)."""
    sketch = LengthSketch(k, seed)
    lines = 0
    for raw in read_lines(path, start, end):
        lines += 1
        if is_blank(raw):
            continue
        try:
            view = read_view(raw, kind, text_field)
        except Unreadable:
            continue
        sketch.add("sample", lines, view.sample_chars)
        for i, f in enumerate(view.fields):
            sketch.add(f.role, lines, len(f.text), i + 1)
    return {"lines": lines, "sketch": sketch.to_dict()}


def check_chunk(path: str, start: int, end: int, first_line: int, kind: str, text_field: str,
                settings: FilterSettings, limits: Optional[dict], flagged_path: str) -> dict:
    """Run the rules over a chunk; write its flagged samples; return its counts."""
    lim = LengthLimits({r: tuple(v[k] for k in ("low", "high", "q_low", "q_high")) for r, v in limits.items()}) \
        if limits else None
    rules = enabled_rules(settings)
    counts = {r: 0 for r in rules}
    samples = readable = flagged = 0
    line_no = first_line - 1
    with AtomicWriter(flagged_path) as out:
        for raw in read_lines(path, start, end):
            line_no += 1
            if is_blank(raw):
                continue
            samples += 1
            findings = check_line(raw, kind, text_field, settings, lim)
            if not any(f.rule == "unreadable" for f in findings):
                readable += 1
            if not findings:
                continue
            flagged += 1
            for f in findings:
                counts[f.rule] += 1
            out.write(_flag_line(line_no, raw, [{"rule": f.rule, **f.evidence} for f in findings]))
    seen = {r: (samples if r == "unreadable" else (readable if r not in LENGTH_RULES or lim else 0)) for r in rules}
    return {"samples": samples, "flagged": flagged,
            "rules": {r: {"seen": seen[r], "flagged": counts[r]} for r in rules}}


def _flag_line(line_no: int, raw: bytes, evidence: list[dict]) -> bytes:
    rec = {"line": line_no, "rules": sorted({e["rule"] for e in evidence}), "evidence": evidence,
           "sample": raw.decode("utf-8", "replace")}
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- the run

class FilterRun:
    def __init__(self, meta_path: str, out_dir: str, settings: FilterSettings, scorer_dir: Optional[str] = None,
                 workers: int = 1, log: Callable[[str], None] = None):
        self.meta_path = os.path.abspath(meta_path)
        self.out = os.path.abspath(out_dir)
        self.settings = settings
        self.scorer_dir = os.path.abspath(scorer_dir) if scorer_dir else None
        self.workers = max(1, int(workers))
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self._scorer = None

    # -- setup

    def _manifest(self, specs: list[DatasetSpec]) -> dict:
        with open(self.meta_path, encoding="utf-8") as f:
            raw_meta = json.load(f)
        folders = dataset_folder_names([s.name for s in specs])
        entries = []
        for s in specs:
            if not os.path.isfile(s.annotation):
                raise FilterError(f"dataset {s.name!r}: annotation {s.annotation} does not exist; fix the meta file.")
            entries.append({"name": s.name, "folder": folders[s.name], "kind": s.kind, "text_field": s.text_field,
                            "root": os.path.abspath(s.root) if s.root else "", "input": input_stamp(s.annotation),
                            "meta_entry": raw_meta[s.name]})
        return {"meta": self.meta_path, "settings": self.settings.fingerprint(),
                "scorer": self.scorer_dir, "datasets": entries}

    def _prepare(self) -> dict:
        try:
            specs = load_meta(self.meta_path)
        except SourceError as e:
            raise FilterError(str(e)) from e
        inputs = {os.path.abspath(s.annotation) for s in specs}
        if any(p == self.out or p.startswith(self.out + os.sep) for p in inputs):
            raise FilterError(f"--out {self.out} holds input annotation files; choose an output folder of its own.")
        manifest = self._manifest(specs)
        path = os.path.join(self.out, MANIFEST)
        if os.path.exists(path):
            old = read_json(path)
            for key, what in (("meta", "meta file"), ("settings", "rules"), ("scorer", "scorer")):
                if old.get(key) != manifest[key]:
                    raise FilterError(f"{self.out} holds a run with another {what} ({old.get(key)!r}); "
                                      f"use a fresh --out folder or delete {self.out} to start over.")
            for a, b in zip(old["datasets"], manifest["datasets"]):
                if a["input"] != b["input"]:
                    raise FilterError(f"{self.out}: annotation {b['input']['path']} changed since the run there "
                                      f"started; use a fresh --out folder or delete it.")
            if [d["name"] for d in old["datasets"]] != [d["name"] for d in manifest["datasets"]]:
                raise FilterError(f"{self.out} holds a run over other datasets; use a fresh --out folder.")
        else:
            os.makedirs(self.out, exist_ok=True)
            write_json(path, manifest)
        return manifest

    # -- driving

    def run(self) -> dict:
        manifest = self._prepare()
        chunk_bytes = max(1, int(self.settings.chunk_mb * (1 << 20)))
        jobs = []
        for entry, spec in zip(manifest["datasets"], load_meta(self.meta_path)):
            folder = os.path.join(self.out, entry["folder"])
            if os.path.exists(os.path.join(folder, "done.json")):
                self.log(f"{spec.name}: already done, skipped")
                continue
            os.makedirs(os.path.join(folder, "parts"), exist_ok=True)
            jobs.append(DatasetJob(spec, folder, chunk_ranges(spec.annotation, chunk_bytes)))
        pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) if self.workers > 1 and jobs else None
        try:
            self._stats(jobs, pool)
            self._check(jobs, pool)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if self.scorer_dir:
            self._score(jobs)
        for job in jobs:
            self._merge(job)
        reports = [read_json(os.path.join(self.out, e["folder"], "report.json")) for e in manifest["datasets"]]
        return write_report(self.out, reports)

    def _map(self, pool, fn, tasks: list[tuple], done: Callable) -> None:
        """Run fn(*args) for each task; `done(task, result)` in this process as each finishes."""
        if pool is None:
            for t in tasks:
                done(t, fn(*t[1]))
            return
        futures = [(t, pool.submit(fn, *t[1])) for t in tasks]
        for t, fut in futures:
            done(t, fut.result())

    def _stats(self, jobs, pool) -> None:
        rule = self.settings.heuristics.length
        tasks = []
        for job in jobs:
            for c, (a, b) in enumerate(job.ranges):
                if not os.path.exists(os.path.join(job.parts, f"stats.{c}.json")):
                    # keys from the chunk and its local line: the sample does not depend on workers
                    tasks.append(((job, c), (job.spec.annotation, a, b, job.spec.kind, job.spec.text_field,
                                             rule.sample_size, c)))

        def done(task, result):
            job, c = task[0]
            write_json(os.path.join(job.parts, f"stats.{c}.json"), result)

        self._map(pool, stats_chunk, tasks, done)
        for job in jobs:
            self._limits(job)

    def _limits(self, job: DatasetJob) -> None:
        path = os.path.join(job.parts, "limits.json")
        if os.path.exists(path):
            return
        rule = self.settings.heuristics.length
        sketch = LengthSketch(rule.sample_size)
        first = [1]
        for c in range(len(job.ranges)):
            part = read_json(os.path.join(job.parts, f"stats.{c}.json"))
            first.append(first[-1] + part["lines"])
            sketch.merge(LengthSketch.from_dict(part["sketch"]))
        prompt = self.settings.heuristics.prompt_length
        limits = limits_from(sketch, rule, prompt) if rule.enabled or prompt.enabled else None
        write_json(path, {"first_line": first[:-1], "lines": first[-1] - 1,
                          "limits": limits.to_dict() if limits else None,
                          "counts": sketch.counts})

    def _check(self, jobs, pool) -> None:
        tasks = []
        for job in jobs:
            lim = read_json(os.path.join(job.parts, "limits.json"))
            for c, (a, b) in enumerate(job.ranges):
                if not os.path.exists(os.path.join(job.parts, f"check.{c}.json")):
                    tasks.append(((job, c), (job.spec.annotation, a, b, lim["first_line"][c], job.spec.kind,
                                             job.spec.text_field, self.settings, lim["limits"],
                                             os.path.join(job.parts, f"flagged.{c}.jsonl"))))

        def done(task, result):
            job, c = task[0]
            write_json(os.path.join(job.parts, f"check.{c}.json"), result)
            self.log(f"{job.spec.name}: chunk {c + 1}/{len(job.ranges)} checked, "
                     f"{result['flagged']}/{result['samples']} flagged")

        self._map(pool, check_chunk, tasks, done)

    def _score(self, jobs) -> None:
        from .scorer import load_scorer, score_chunk

        s = self.settings.scorer
        for job in jobs:
            if job.spec.name in s.exempt_datasets:
                continue
            lim = read_json(os.path.join(job.parts, "limits.json"))
            for c, (a, b) in enumerate(job.ranges):
                if os.path.exists(os.path.join(job.parts, f"score.{c}.json")):
                    continue
                if self._scorer is None:
                    self.log(f"loading scorer {self.scorer_dir}")
                    self._scorer = load_scorer(self.scorer_dir, s)
                skip = {r["line"] for r in read_flagged(os.path.join(job.parts, f"flagged.{c}.jsonl"))}
                with AtomicWriter(os.path.join(job.parts, f"scored.{c}.jsonl")) as out:
                    result = score_chunk(self._scorer, job.spec, a, b, lim["first_line"][c], skip, out,
                                         _flag_line)
                write_json(os.path.join(job.parts, f"score.{c}.json"), result)
                self.log(f"{job.spec.name}: chunk {c + 1}/{len(job.ranges)} scored, "
                         f"{result['flagged']}/{result['seen']} flagged")

    def _merge(self, job: DatasetJob) -> None:
        """kept.jsonl, flagged.jsonl, review.tsv and report.json of one dataset, then done.json."""
        n = len(job.ranges)
        checks = [read_json(os.path.join(job.parts, f"check.{c}.json")) for c in range(n)]
        scores = []
        if self.scorer_dir and job.spec.name not in self.settings.scorer.exempt_datasets:
            scores = [read_json(os.path.join(job.parts, f"score.{c}.json")) for c in range(n)]
        flagged_lines: set[int] = set()
        with AtomicWriter(os.path.join(job.folder, "flagged.jsonl")) as out:
            for c in range(n):
                recs = list(read_flagged(os.path.join(job.parts, f"flagged.{c}.jsonl")))
                if scores:
                    recs += list(read_flagged(os.path.join(job.parts, f"scored.{c}.jsonl")))
                for rec in sorted(recs, key=lambda r: r["line"]):
                    flagged_lines.add(rec["line"])
                    out.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        kept = 0
        with AtomicWriter(os.path.join(job.folder, "kept.jsonl")) as out:
            for line_no, raw in enumerate(read_lines(job.spec.annotation, 0, os.path.getsize(job.spec.annotation)), 1):
                if is_blank(raw) or line_no in flagged_lines:
                    continue
                out.write(raw + b"\n")
                kept += 1
        review.write_review_file(job.spec.name, os.path.join(job.folder, "flagged.jsonl"),
                                 os.path.join(job.folder, review.REVIEW_FILE))
        limits = read_json(os.path.join(job.parts, "limits.json"))
        rep = dataset_report(job.spec.name, checks, scores, kept, len(flagged_lines), limits["limits"])
        write_json(os.path.join(job.folder, "report.json"), rep)
        write_json(os.path.join(job.folder, "done.json"), {"dataset": job.spec.name, "kept": kept,
                                                           "flagged": len(flagged_lines)})
        for name in os.listdir(job.parts):
            os.remove(os.path.join(job.parts, name))
        os.rmdir(job.parts)
        self.log(f"{job.spec.name}: {rep['seen']} samples, {rep['flagged']} flagged, {rep['kept']} kept")


def run_filter(meta_path: str, out_dir: str, settings: FilterSettings, scorer_dir: Optional[str] = None,
               workers: int = 1, log: Optional[Callable[[str], None]] = None) -> dict:
    """Filter every dataset of `meta_path` into `out_dir`; returns the whole report."""
    return FilterRun(meta_path, out_dir, settings, scorer_dir, workers, log).run()
