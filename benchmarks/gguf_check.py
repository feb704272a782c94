"""GGUF export of the quickstart model, checked under llama.cpp against the safetensors export.

    rltk export runs/quickstart --out /tmp/qs_export --no-verify
    nice -n 19 python benchmarks/gguf_check.py --export /tmp/qs_export --config runs/quickstart/config.yaml
    python benchmarks/gguf_check.py ... --types q8_0 f16 --n 100 --out /tmp/g.json

Converts the export to each ``--types`` with :func:`rltk.gguf.write_gguf` (llama.cpp's own converter; the
files go to ``--gguf-dir`` and are reused when they are already there), plays ``--n`` eval tasks of the run's
env greedily once under transformers on the safetensors export (the reference) and once per GGUF under
llama.cpp (:func:`rltk.llamacpp_sampler.verify_gguf`), and prints per type: file size, mean reward and
accuracy of each, the difference in points, identical greedy answers, seconds, and whether llama.cpp
tokenizes every rendered prompt as transformers does. Each GGUF runs with llama.cpp's default f16 KV
cache (what a llama.cpp server runs); f32 runs once more with an f32 cache (the exact-arithmetic row).
Writes JSON (default ``benchmarks/results/gguf_check.json``). Needs ``bash scripts/setup_gguf.sh`` once.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rltk.config import load_config  # noqa: E402
from rltk.gguf import LLAMA_CPP_VERSION, write_gguf  # noqa: E402
from rltk.llamacpp_sampler import reference_rollouts, verify_gguf  # noqa: E402

MB = 1e6


def parse_args() -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="an `rltk export` directory")
    p.add_argument("--config", type=Path, required=True, help="the run's config.yaml (env, rewards, eval)")
    p.add_argument("--types", nargs="+", default=["q8_0", "f16", "f32"], help="GGUF outtypes to check")
    p.add_argument("--n", type=int, default=100, help="eval tasks")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp CPU threads")
    p.add_argument("--gguf-dir", type=Path, default=Path("/tmp/qs_gguf"), help="where the GGUFs go")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gguf_check.json")
    return p.parse_args()


def convert(export: Path, outtype: str, gguf_dir: Path) -> tuple[Path, float | None]:
    """The GGUF of ``outtype`` (written unless already there) and the seconds its conversion took."""
    path = gguf_dir / f"model-{outtype}.gguf"
    if path.is_file():
        return path, None
    start = time.perf_counter()
    write_gguf(export, outtype, path)
    return path, time.perf_counter() - start


def _line(r: dict[str, Any]) -> str:
    """One printed row of the figures."""
    return (
        f"{r['outtype']:5s} kv {r['kv_cache']}  {r['size_mb']:6.1f} MB  "
        f"reward gguf {r['mean_reward_gguf']:+.3f} hf {r['mean_reward_hf']:+.3f} "
        f"({r['diff_points']:+.1f} points)  "
        f"accuracy {100 * r['accuracy_gguf']:.1f}% vs {100 * r['accuracy_hf']:.1f}%  "
        f"identical {r['identical']}/{r['n']}  prompt mismatches {len(r['prompt_mismatches'])}  "
        f"{r['seconds_gguf']:.0f} s vs {r['seconds_hf']:.0f} s  {'PASS' if r['passed'] else 'FAIL'}"
    )


def main() -> None:
    """Convert, verify, print and write the figures."""
    args = parse_args()
    cfg = load_config(args.config, [])
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    files = {t: convert(args.export, t, args.gguf_dir) for t in args.types}
    print(f"reference: transformers fp32 on {args.export}, {args.n} eval tasks of {cfg.env.name}", flush=True)
    reference = reference_rollouts(args.export, cfg, args.n)
    rows: list[dict[str, Any]] = []
    safetensors_mb = sum(p.stat().st_size for p in args.export.glob("*.safetensors")) / MB
    runs = [(t, "f16") for t in files] + ([("f32", "f32")] if "f32" in files else [])
    for outtype, kv_cache in runs:
        path, convert_s = files[outtype]
        report = verify_gguf(
            path, args.export, cfg, n=args.n, n_threads=args.threads, reference=reference, kv_cache=kv_cache
        )
        rows.append(
            {
                "outtype": outtype,
                "kv_cache": kv_cache,
                "size_mb": round(path.stat().st_size / MB, 1),
                "convert_seconds": None if convert_s is None else round(convert_s, 1),
                **report.to_json(),
            }
        )
        print(_line(rows[-1]), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "llama_cpp_python": LLAMA_CPP_VERSION,
        "env": cfg.env.name,
        "n": args.n,
        "threads": args.threads,
        "export": str(args.export),
        "safetensors_mb": round(safetensors_mb, 1),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"safetensors export {safetensors_mb:.1f} MB; wrote {args.out}")


if __name__ == "__main__":
    main()
