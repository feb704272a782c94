"""Write a proof report (:func:`rltk.report_build.build_report`) as ``report.json``, ``.md`` and ``.png``.

The picture is the report's question at a glance: accuracy against generated tokens per task (log scale),
one point per model policy with its 95% interval, best-of-N drawn at N samples' cost, and the scripted
policies (teacher, oracle, best trivial), which cost no model tokens, as horizontal lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display (CI, servers)
import matplotlib.pyplot as plt
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _ci(block: dict[str, Any] | None) -> str:
    if not block:
        return ""
    low, high = block["ci95"]
    return f"{_pct(block['accuracy'])} [{100 * low:.1f}, {100 * high:.1f}]"


def verdict(d: dict[str, Any]) -> str:
    """One plain sentence for a paired difference.

    >>> verdict({"a": "rl greedy", "b": "teacher greedy", "tasks": 200, "diff": 0.05, "ci95": [0.01, 0.09]})
    'rl greedy is better than teacher greedy: +5.0 points [+1.0, +9.0] on 200 tasks'
    """
    low, high = d["ci95"]
    if low > 0:
        word = "is better than"
    elif high < 0:
        word = "is worse than"
    else:
        word = "is not detectably different from"
    span = f"{100 * d['diff']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}] on {d['tasks']} tasks"
    return f"{d['a']} {word} {d['b']}: {span}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _summary(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    n, bon = s["samples"], s["bon"]
    multi = any((p["greedy"].get("tool_calls") or 0) > 0 for p in report["policies"])
    env_cost = any("env_cost_per_1000" in p["greedy"] for p in report["policies"])
    head = ["policy", "greedy accuracy [95% CI]"]
    head += ["sampled pass@1", f"pass@{n} (upper bound: uses the key)", f"pass^{n}"] if n else []
    head += [f"best-of-{bon} [95% CI]"] if bon else []
    head += ["generated tokens / task", "context tokens / task", "s / task"]
    head += ["turns", "tool calls"] if multi else []
    head += ["env cost / 1000 tasks"] if env_cost else []
    rows = []
    secs = report["timings"]["seconds_per_task"]
    for p in report["policies"]:
        g, sm, b = p["greedy"], p["sampled"], p["best_of_n"]
        row = [p["name"], _ci(g)]
        if n:
            row += (
                [_pct(sm["pass_at_k"]["1"]), _pct(sm["pass_at_k"][str(n)]), _pct(sm["pass_hat_k"][str(n)])]
                if sm
                else ["", "", ""]
            )
        if bon:
            row += [_ci(b) + (f" (at {_num(b['generated_tokens'])} tokens)" if b else "")]
        row += [
            _num(g["generated_tokens"]),
            _num(g["context_tokens"]),
            _num(secs[p["name"]].get("greedy"), 3),
        ]
        row += [_num(g["turns"], 2), _num(g["tool_calls"], 2)] if multi else []
        row += [_num(g.get("env_cost_per_1000"), 1)] if env_cost else []
        rows.append(row)
    return _table(head, rows)


def _curves(report: dict[str, Any]) -> list[str]:
    sampled = [(p["name"], p["sampled"]) for p in report["policies"] if p["sampled"]]
    if not sampled:
        return []
    ks = list(sampled[0][1]["pass_at_k"])
    head = ["policy", "tasks", *(f"pass@{k}" for k in ks), *(f"pass^{k}" for k in ks)]
    rows = [
        [
            name,
            str(sm["tasks"]),
            *(_pct(sm["pass_at_k"][k]) for k in ks),
            *(_pct(sm["pass_hat_k"][k]) for k in ks),
        ]
        for name, sm in sampled
    ]
    s = report["settings"]
    intro = (
        f"Sampled at temperature {s['temperature']}, {s['samples']} samples per task (unbiased estimators)."
    )
    return ["", "## pass@k and pass^k", "", intro, "", *_table(head, rows)]


def _tag(tag: str, report: dict[str, Any]) -> str:
    """A tag with its number of tasks (reports written before ``tag_tasks`` existed: the tag alone)."""
    n = report.get("tag_tasks", {}).get(tag)
    return tag if n is None else f"{tag} ({n})"


def _breakdowns(report: dict[str, Any]) -> list[str]:
    policies = report["policies"]
    rewards = sorted({r for p in policies for r in p["greedy"]["rewards"]})
    out = ["", "## Rewards (greedy, mean where applicable)", ""]
    out += _table(
        ["policy", "reward", *rewards],
        [
            [
                p["name"],
                _num(p["greedy"]["mean_reward"], 3),
                *(_num(p["greedy"]["rewards"].get(r), 3) for r in rewards),
            ]
            for p in policies
        ],
    )
    tags = sorted({t for p in policies for t in p["greedy"]["by_tag"]})
    if tags:
        out += ["", "## Accuracy per tag (greedy)", ""]
        out += _table(
            ["tag", *(p["name"] for p in policies)],
            [[_tag(t, report), *(_pct(p["greedy"]["by_tag"].get(t)) for p in policies)] for t in tags],
        )
    fields = sorted({f for p in policies for f in p["greedy"].get("field_errors", {})})
    if fields:
        out += [
            "",
            "## Fields wrong (greedy: share of tasks whose field differs from the oracle's answer)",
            "",
        ]
        out += _table(
            ["field", *(p["name"] for p in policies)],
            [[f, *(_pct(p["greedy"].get("field_errors", {}).get(f)) for p in policies)] for f in fields],
        )
    return out


def summary(report: dict[str, Any]) -> str:
    """The summary table and the differences, as Markdown (what a run prints at its end)."""
    return "\n".join([*_summary(report), "", *(f"- {verdict(d)}" for d in report["differences"])])


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: summary table, verdicts, curves, breakdowns, notes."""
    s = report["settings"]
    lines = [
        f"# {report['env']}: trained model vs the workflow it replaces",
        "",
        f"Held-out split `{report.get('split', 'eval')}`, {report['tasks']} tasks "
        f"(task seed {report.get('task_seed', 0)}), models sampled by the `{report.get('sampler', 'hf')}` "
        "sampler; "
        f"sampled metrics on the first {s['sampled_tasks']} tasks. Best-of-{s['bon']}: {s['selector']}. "
        f"Teacher source sha256: `{report['teacher_sha256']}`. Intervals: {report['intervals']}.",
        "",
        *_summary(report),
        "",
        "## Differences",
        "",
        *(f"- {verdict(d)}" for d in report["differences"]),
        *_curves(report),
        *_breakdowns(report),
    ]
    notes = [
        f"- {p['name']}: {p['sampled']['stopped_early']}"
        for p in report["policies"]
        if p["sampled"] and p["sampled"]["stopped_early"]
    ]
    notes += [f"- {p['name']}: {p['source']}" for p in report["policies"]]
    lines += ["", "## Notes and sources", "", *notes, "", f"Made {report['timings']['created']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against generated tokens per task: models (greedy, best-of-N) as points, scripts as lines."""
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=120)
    xs: list[float] = []
    for i, p in enumerate(report["policies"]):
        color = f"C{i}"
        points = [(p["name"], p["greedy"])]
        if p["best_of_n"]:
            points.append((f"{p['name']} best-of-{p['best_of_n']['n']}", p["best_of_n"]))
        for label, block in points:
            tokens = block.get("generated_tokens")
            if tokens is None:
                ax.axhline(
                    100 * block["accuracy"],
                    color=color,
                    linestyle="--",
                    linewidth=1,
                    label=f"{label} (script, no model)",
                )
                continue
            x = max(tokens, 1e-1)
            xs.append(x)
            low, high = block["ci95"]
            acc = block["accuracy"]
            marker = "s" if "best-of" in label else "o"
            ax.errorbar(
                [x],
                [100 * acc],
                yerr=[[100 * (acc - low)], [100 * (high - acc)]],
                fmt=marker,
                color=color,
                capsize=3,
                label=label,
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if xs:
        ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.set_xlabel("generated tokens per task (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{report['env']}: {report['tasks']} held-out tasks, 95% intervals")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(out_dir: str | Path, report: dict[str, Any]) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths
