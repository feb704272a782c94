"""The summary table of ``scripts/beyond_teacher.py`` reports: one row per report directory.

    python scripts/beyond_teacher_table.py docs/reports/beyond_teacher/invoice_extraction/seed*

Reads each directory's ``report.json`` and ``runs.json`` and prints a Markdown table: greedy accuracy of the
teacher, SFT alone, outcome-filtered SFT and SFT + RL (with their SFT and RL steps), the RL model's paired
differences against the teacher, SFT alone and outcome-filtered SFT (bootstrap 95% intervals over tasks), the
base model's best-of-N and the training seconds each run was given. ``--tag family`` prints instead the
greedy accuracy per ``family=...`` tag of the same rows (what the teacher gets wrong and what RL fixed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _diff(report: dict, other: str) -> str:
    """The RL model's paired difference against ``other``'s greedy row, in points with its interval."""
    d = next(d for d in report["differences"] if d["b"] == f"{other} greedy")
    low, high = d["ci95"]
    return f"{100 * d['diff']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def row(folder: Path) -> list[str]:
    """One report directory's cells."""
    report = json.loads((folder / "report.json").read_text())
    runs = json.loads((folder / "runs.json").read_text())
    acc = {p["name"]: p["greedy"]["accuracy"] for p in report["policies"]}
    base = next(p for p in report["policies"] if p["name"] == "base")["best_of_n"]
    seed = next(o.split("=")[1] for o in runs["overrides"] if o.startswith("run.seed="))
    return [
        f"{seed} ({report['split']}, {report['tasks']})",
        _pct(acc["teacher"]),
        f"{_pct(acc['sft_only'])} ({runs['sft']['warmstart_steps']} steps)",
        f"{_pct(acc['sft_verified'])} ({runs['sft_verified']['warmstart_steps']} steps)",
        f"{_pct(acc['warm_start'])} → {_pct(acc['rl'])} ({runs['rl']['warmstart_steps']} + "
        f"{runs['rl']['rl_steps']} steps)",
        _diff(report, "teacher"),
        _diff(report, "sft_only"),
        _diff(report, "sft_verified"),
        f"{_pct(base['accuracy'])} ({base['tasks']})" if base else "",
        f"{runs['rl']['total_s']:.0f}",
    ]


TAG_ROWS = {
    "teacher": "teacher",
    "sft_only": "SFT alone",
    "sft_verified": "outcome-filtered SFT",
    "warm_start": "warm start",
    "rl": "+ RL",
}


def tag_rows(folder: Path, key: str) -> list[list[str]]:
    """One report directory's greedy accuracy per ``key=...`` tag, with each tag's number of tasks."""
    report = json.loads((folder / "report.json").read_text())
    by_tag = {p["name"]: p["greedy"]["by_tag"] for p in report["policies"]}
    seed = folder.name
    tags = [t for t in sorted(by_tag["teacher"]) if t.split("=")[0] == key]
    counts = report.get("tag_tasks", {})  # reports written before it: no counts
    named = {t: t.split("=", 1)[1] + (f" ({counts[t]})" if t in counts else "") for t in tags}
    return [[seed, named[t], *(_pct(by_tag[n][t]) for n in TAG_ROWS)] for t in tags]


def _print(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main(argv: list[str] | None = None) -> int:
    """Print the table of the given report directories."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--tag", metavar="KEY", help="greedy accuracy per KEY=... tag instead (e.g. family)")
    args = ap.parse_args(argv)
    if args.tag:
        head = ["report", f"{args.tag} (tasks)", *TAG_ROWS.values()]
        _print(head, [r for folder in args.folders for r in tag_rows(folder, args.tag)])
        return 0
    head = [
        "seed (split, tasks)",
        "teacher",
        "SFT alone",
        "outcome-filtered SFT",
        "SFT → + RL",
        "RL − teacher",
        "RL − SFT alone",
        "RL − filtered SFT",
        "base best-of-8 (tasks)",
        "training s (each)",
    ]
    _print(head, [row(folder) for folder in args.folders])
    return 0


if __name__ == "__main__":
    sys.exit(main())
