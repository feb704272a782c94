"""Figures of the export check on a real run: merged and adapter-only exports played on N eval tasks outside
rltk, in rltk's venv (rltk and peft refused) and in ``.venv-plain`` (torch + transformers only).

    python benchmarks/export_check.py --run runs/quickstart --n 200 [--out FILE.json]

Writes the exports under a temporary directory, prints one line per check and writes the reports as JSON.
Run it alone: the seconds are wall time on a shared CPU otherwise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rltk.export import export, verify_dir

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    """Export the run merged and adapter-only, verify each, and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run dir (its newest valid checkpoint is exported)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export_check.json"))
    args = parser.parse_args()
    plain = REPO / ".venv-plain" / "bin" / "python"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("merged", "adapter"):
            t0 = time.perf_counter()
            out = export(args.run, Path(tmp) / kind, n=args.n, adapter_only=kind == "adapter")
            seconds = time.perf_counter() - t0
            report = json.loads((out / "rltk_export.json").read_text())["verification"]
            rows.append({"check": f"rltk export ({kind})", "export_seconds": seconds, **report})
            if kind == "merged" and plain.is_file():
                plain_report = verify_dir(out, n=args.n, python=str(plain))
                rows.append({"check": "rltk export --verify --python .venv-plain", **plain_report.to_json()})
    for r in rows:
        print(
            f"{r['check']:45s} tasks {r['tasks']}  tokens {r['tokens']}  mismatches {len(r['mismatches'])}  "
            f"near ties {len(r['near_ties'])}  reward {r['export_reward']:.4f} vs "
            f"{r['reference_reward']:.4f}  "
            f"accuracy {100 * r['export_accuracy']:.1f}%  ok {r['ok']}  check {r['seconds']:.0f} s"
        )
    Path(args.out).write_text(json.dumps({"run": args.run, "n": args.n, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
