"""The run's report: per dataset and rule, samples seen, flagged and kept.

`report.json` (for scripts), `report.txt` (a table) and `report.png` (flagged share per rule
and dataset, a bar chart; written when matplotlib is installed) in the --out folder, and one
`report.json` per dataset folder. A sample flagged by several rules counts once in the
dataset's `flagged` and once under each rule. A rule's `seen` is the samples it examined: the
length rule sees none in a dataset too small for a distribution, the scorer only the samples
it is configured for.
"""

from __future__ import annotations

import os
from typing import Optional

from .chunks import write_atomic, write_json
from .rules import HEURISTIC_RULES, REPETITION_RULES
from .scorer import SCORER_RULES


def _add(into: dict, rules: dict) -> None:
    for rule, c in rules.items():
        r = into.setdefault(rule, {"seen": 0, "flagged": 0})
        r["seen"] += c["seen"]
        r["flagged"] += c["flagged"]


def dataset_report(name: str, checks: list[dict], scores: list[dict], kept: int, flagged: int,
                   limits: Optional[dict]) -> dict:
    rules: dict = {}
    for c in checks:
        _add(rules, c["rules"])
    unparsable: dict = {}
    domains: dict = {}
    for s in scores:
        _add(rules, s["rules"])
        for k, v in s["unparsable"].items():
            unparsable[k] = unparsable.get(k, 0) + v
        for k, v in s["domains"].items():
            domains[k] = domains.get(k, 0) + v
    order = {name: k for k, name in enumerate(HEURISTIC_RULES + REPETITION_RULES + SCORER_RULES)}
    rules = {name: rules[name] for name in sorted(rules, key=lambda n: order.get(n, len(order)))}
    for r in rules.values():
        r["kept"] = r["seen"] - r["flagged"]
    seen = sum(c["samples"] for c in checks)
    rep = {"dataset": name, "seen": seen, "flagged": flagged, "kept": kept, "rules": rules,
           "length_limits": limits}
    if scores:
        rep["scorer"] = {"unparsable": unparsable, "domains": domains}
    return rep


def format_table(reports: list[dict]) -> str:
    rules = []
    for r in reports:
        rules += [k for k in r["rules"] if k not in rules]
    head = ["dataset", "seen", "flagged", "kept"] + rules
    rows = [head]
    for r in reports:
        cells = [r["dataset"], str(r["seen"]), _pct(r["flagged"], r["seen"]), str(r["kept"])]
        for k in rules:
            c = r["rules"].get(k)
            cells.append("-" if c is None or c["seen"] == 0 else _pct(c["flagged"], c["seen"]))
        rows.append(cells)
    width = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, width)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    notes = ["", "flagged: samples (share of seen); a rule column: samples it flagged (share of those it saw); "
             "'-': not run."]
    for r in reports:
        if r.get("scorer") and r["scorer"]["unparsable"]:
            notes.append(f"{r['dataset']}: unparsable scorer answers {r['scorer']['unparsable']}")
    return "\n".join(lines + notes) + "\n"


def _pct(n: int, total: int) -> str:
    return f"{n} ({100.0 * n / total:.1f}%)" if total else str(n)


def plot(reports: list[dict], path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rules = []
    for r in reports:
        rules += [k for k in r["rules"] if k not in rules]
    rules = ["any rule"] + rules
    fig, ax = plt.subplots(figsize=(min(14.0, 2.0 + 0.35 * len(rules) * (1 + len(reports)) ** 0.5), 4.5))
    x = np.arange(len(rules))
    w = 0.8 / max(1, len(reports))
    for i, r in enumerate(reports):
        vals = [100.0 * r["flagged"] / r["seen"] if r["seen"] else 0.0]
        for k in rules[1:]:
            c = r["rules"].get(k)
            vals.append(100.0 * c["flagged"] / c["seen"] if c and c["seen"] else 0.0)
        ax.bar(x + (i - (len(reports) - 1) / 2) * w, vals, w, label=r["dataset"])
    ax.set_xticks(x)
    ax.set_xticklabels(rules, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("flagged (% of samples seen)")
    ax.set_title("filter-data: flagged samples per rule")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(out_dir: str, reports: list[dict]) -> dict:
    total = {"seen": sum(r["seen"] for r in reports), "flagged": sum(r["flagged"] for r in reports),
             "kept": sum(r["kept"] for r in reports)}
    report = {"total": total, "datasets": reports}
    write_json(os.path.join(out_dir, "report.json"), report)
    table = format_table(reports)
    write_atomic(os.path.join(out_dir, "report.txt"), table)
    report["png"] = plot(reports, os.path.join(out_dir, "report.png"))
    report["table"] = table
    return report
