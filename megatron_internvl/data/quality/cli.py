"""`megatron-internvl filter-data` and `megatron-internvl filter-apply` (also tools/filter_data.py)."""

from __future__ import annotations

import argparse
import sys


def filter_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="megatron-internvl filter-data",
        description="Flag anomalous samples of an InternVL mixture (heuristic rules, repetition detection, "
                    "optional LLM scoring) and write kept / flagged lines, a review file and a report per "
                    "dataset. The input is never modified; rerunning resumes. See docs/data.md.")
    p.add_argument("--meta", required=True, help="InternVL meta JSON (as the trainer reads it)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per dataset)")
    p.add_argument("--rules", default=None, help="rules YAML (default: built-in defaults, as in examples/filter/rules.yaml)")
    p.add_argument("--scorer", default=None, metavar="MODEL_DIR",
                   help="local causal LM folder for LLM quality scoring and the repetition judge")
    p.add_argument("--workers", type=int, default=1, help="processes for the rule checks")
    args = p.parse_args(argv)

    from .manifest import FilterError
    from .pipeline import run_filter
    from .settings import RulesError, load_settings

    try:
        settings = load_settings(args.rules)
        report = run_filter(args.meta, args.out, settings, args.scorer, args.workers)
    except (RulesError, FilterError, OSError, ValueError) as e:
        print(f"filter-data: error: {e}", file=sys.stderr)
        return 2
    print(report["table"], end="")
    print(f"review files: {args.out}/<dataset>/review.tsv; then "
          f"megatron-internvl filter-apply --review {args.out} --out NEW_DIR")
    return 0


def apply_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="megatron-internvl filter-apply",
        description="Apply the reviewed keep/drop decisions of a filter-data run: write each dataset's "
                    "annotation without the dropped lines and a meta.json the trainer reads directly.")
    p.add_argument("--review", required=True, help="the --out folder of filter-data (with edited review.tsv files)")
    p.add_argument("--out", required=True, help="folder for the new jsonl files and meta.json")
    args = p.parse_args(argv)

    from .review import ReviewError, apply_review

    try:
        apply_review(args.review, args.out, log=print)
    except (ReviewError, OSError, ValueError) as e:
        print(f"filter-apply: error: {e}", file=sys.stderr)
        return 2
    print(f"meta file: {args.out}/meta.json")
    return 0
