"""``rltk export``: a run's checkpoint → a verified export; ``--check`` or ``--verify`` an existing one."""

from __future__ import annotations

import argparse
import sys

USAGE = """rltk export RUN_DIR --out OUT [--step STEP] [--n N] [--adapter-only] [--gguf TYPE] [--no-verify]
       rltk export --check DIR
       rltk export --verify DIR [--env ENV] [--n N] [--python PYTHON]"""


def _misuse(args: argparse.Namespace) -> str | None:
    """Why the arguments do not form one of the three usages (None: they do)."""
    alone = args.check if args.check is not None else args.verify
    if args.check is not None and args.verify is not None:
        return "--check and --verify are two different commands: give one"
    if alone is not None:
        extra = [a for a, v in (("RUN_DIR", args.run_dir), ("--out", args.out), ("--step", args.step)) if v]
        extra += ["--adapter-only"] * args.adapter_only + ["--gguf"] * bool(args.gguf)
        if args.check is not None and (args.env or args.python):
            extra.append("--env/--python")
        if extra:
            return f"{'--check' if args.check else '--verify'} DIR stands alone (no {', '.join(extra)})"
        return None
    if args.run_dir is None or args.out is None:
        return "rltk export needs RUN_DIR and --out: rltk export RUN_DIR --out NEW_DIR"
    if args.env:
        return "--env goes with --verify DIR; an export is checked on its own run's env"
    return None


def cmd_export(args: argparse.Namespace) -> int:
    """Export and verify a run's checkpoint, or ``--check`` / ``--verify`` an export."""
    from rltk.export import SUMS, check_export, export, verify_dir

    if (why := _misuse(args)) is not None:
        print(f"error: {why}\nusage: {USAGE}", file=sys.stderr)
        return 2
    if args.check is not None:
        names = check_export(args.check)
        print(f"{args.check}: all {len(names)} files match {SUMS}: {', '.join(names)}")
        return 0
    if args.verify is not None:
        report = verify_dir(args.verify, args.env, args.n, args.python)
        print(report.summary())
        for problem in report.problems():
            print(f"  {problem}")
        return 0 if report.ok else 1
    out = export(
        args.run_dir,
        args.out,
        step=args.step,
        check=not args.no_verify,
        n=args.n,
        adapter_only=args.adapter_only,
        python=args.python,
        gguf=tuple(args.gguf or ()),
        converter=args.converter,
    )
    print(f"exported to {out}" + (" (not verified: --no-verify)" if args.no_verify else ""))
    print(f"check it later with: rltk export --check {out}   (or sha256sum -c {SUMS} inside it)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rltk export`` to the CLI's subcommands."""
    from rltk.export import VERIFY_TASKS

    p = sub.add_parser(
        "export",
        help="export a run's checkpoint (merged or adapter, optional GGUF), verified on its env's tasks",
        usage=USAGE,
        description="Write a directory that serves without rltk: merged weights (or a LoRA adapter), "
        "tokenizer and chat template, a model card and SHA256SUMS. Before anything reaches --out, the export "
        "plays N of the env's eval tasks greedily in an isolated Python that cannot import rltk or peft, and "
        "every generated token is checked against the unmerged checkpoint under teacher forcing.",
    )
    p.add_argument("run_dir", nargs="?", help="the run's output_dir")
    p.add_argument("--out", help="new directory to write (required with RUN_DIR)")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest valid)")
    p.add_argument(
        "--n", type=int, default=VERIFY_TASKS, help="eval tasks the check plays (default %(default)s)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the check on the env (not recommended)")
    p.add_argument(
        "--adapter-only", action="store_true", help="write the LoRA adapter (peft), not merged weights"
    )
    p.add_argument(
        "--gguf",
        action="append",
        choices=("f16", "q8_0", "f32"),
        help="also write model-TYPE.gguf for llama.cpp, checked under llama.cpp (repeatable)",
    )
    p.add_argument(
        "--converter", help="llama.cpp's convert_hf_to_gguf.py (default: bash scripts/setup_gguf.sh's)"
    )
    p.add_argument("--python", help="interpreter of the check's child process (e.g. a venv without rltk)")
    p.add_argument(
        "--check",
        metavar="DIR",
        help="re-hash every file of the export DIR against its SHA256SUMS (exit 2 naming each changed, "
        "missing or added file)",
    )
    p.add_argument(
        "--verify",
        metavar="DIR",
        help="play N eval tasks with the export DIR against the checkpoint it came from (exit 1: mismatch)",
    )
    p.add_argument("--env", help="with --verify: play this env's tasks instead of the run's")
    p.set_defaults(func=cmd_export)
