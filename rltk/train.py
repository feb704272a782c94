"""``python -m rltk.train RECIPE [key=value ...]``: what ``rltk train`` and ``accelerate launch`` run.

Examples:
    rltk train recipes/quickstart.yaml run.steps=50 rollout.group_size=8
    accelerate launch --multi_gpu --num_processes 2 -m rltk.train recipes/quickstart.yaml

"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rltk import plugins
from rltk.config import load_config
from rltk.errors import user_errors


def build_parser() -> argparse.ArgumentParser:
    """The argument parser shared with ``rltk train``."""
    parser = argparse.ArgumentParser(
        prog="rltk train",
        description="Train a policy with RL from a recipe.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides such as run.steps=10 or rollout.group_size=4"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, validate (every error at once), train. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    try:
        cfg = load_config(args.recipe, args.overrides, resolve=plugins.resolve)
        from rltk.trainer import run  # heavy imports after the config is known to be valid

        run(cfg)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
