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
import time
from pathlib import Path

from rltk import distributed, plugins
from rltk.config import load_config
from rltk.errors import user_errors
from rltk.typedyaml import annotated_yaml


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The argument parser of ``python -m rltk.train``; ``rltk train`` takes its arguments as a parent."""
    parser = argparse.ArgumentParser(
        prog="rltk train",
        description="Train a policy with RL from a recipe.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument(
        "recipe", help="path to a recipe YAML (see recipes/; every key: --show-config, docs/contracts.md)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides such as run.steps=10 or rollout.group_size=4"
    )
    parser.add_argument(
        "--show-config",
        action="store_true",
        help="print every config key with its value after the recipe and overrides, its range and what it "
        "does, then exit (validation runs first)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, validate (every error at once), train. Returns the process exit code.

    Under a launcher, a failed collective (a rank stalled past ``run.dist_timeout_s``, or gone) ends this
    rank with one ``error:`` line naming the rank(s) it waited for, instead of a traceback.
    """
    started = time.time()
    distributed.die_with_parent()
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    cfg = None
    try:
        cfg = load_config(args.recipe, args.overrides, resolve=plugins.resolve)
        if args.show_config:
            print(annotated_yaml(cfg), end="")
            return 0
        from rltk.pipeline import run  # heavy imports after the config is known to be valid

        run(cfg)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg is None or world == 1 or not distributed.is_collective_failure(exc):
            raise
        run_dir, timeout = Path(cfg.run.output_dir), cfg.run.dist_timeout_s
        why = distributed.explain_failure(run_dir, int(rank), world, timeout, started, exc)
        print(f"error: {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
