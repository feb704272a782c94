"""``rltk``: train | eval | export | serve | envs | rewards.

Every subcommand has ``--help``. Bad input (unknown env or reward, bad env options, malformed recipe,
missing model package, corrupt checkpoint, damaged export) prints one ``error:`` message that names the
problem and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rltk.cli_export import add_parser as add_export_parser
from rltk.cli_serve import add_parser as add_serve_parser
from rltk.errors import user_errors

if TYPE_CHECKING:
    from rltk.env import Env, Task
    from rltk.evaluate import EvalResult
    from rltk.reward import Rubric


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``rltk.train`` in this process."""
    from rltk.train import main as train_main

    return train_main([args.recipe, *args.overrides, *(["--show-config"] if args.show_config else [])])


def _env_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--env-options`` as a dict; text that is not a JSON object raises :class:`PluginError`."""
    from rltk.plugins import PluginError

    if args.env_options is None:
        return {}
    try:
        options = json.loads(args.env_options)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        why = f"--env-options {args.env_options!r} is not a JSON object"
        fix = """write a JSON object, e.g. --env-options '{"difficulty": "hard"}'"""
        raise PluginError("env", args.env, why, fix)
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a policy on an env split, beside the env's trivial policies."""
    from rltk import evaluate, plugins
    from rltk.reward import Rubric

    if args.compare is not None:
        return cmd_compare(args)
    options = _env_options(args)
    run_dir = args.policy == "model" and Path(args.model, "config.yaml").is_file()
    if args.step is not None and not run_dir:
        print("error: --step needs --model to be an rltk run dir (a run's output_dir)", file=sys.stderr)
        return 2
    if run_dir and args.env_options is None:  # a run dir: its own env options by default
        from rltk.config import load_config

        cfg = load_config(Path(args.model, "config.yaml"), [])
        options = cfg.env.options if cfg.env.name == args.env else options
    env = plugins.make_env(args.env, options)  # before the model loads: bad options fail fast
    rubric = Rubric.from_config([], env)
    tasks = env.tasks(args.split, args.n, seed=args.seed)
    results = []
    if args.policy == "model":
        results.append(_model_eval(args, env, rubric, tasks))
    elif args.policy == "oracle":
        results.append(evaluate.evaluate_policy(env, rubric, tasks, env.oracle, "oracle"))
    else:
        baselines = env.baselines()
        if args.policy not in baselines:
            valid = ", ".join(["model", "oracle", *baselines])
            print(f"error: unknown --policy '{args.policy}'; valid: {valid}", file=sys.stderr)
            return 2
        results.append(evaluate.evaluate_policy(env, rubric, tasks, baselines[args.policy], args.policy))
    if not args.no_baselines:
        results += evaluate.baseline_results(env, rubric, tasks)
    print(f"env {args.env}  split {args.split}  n {len(tasks)}  (greedy, one sample)")
    print(evaluate.format_table(results))
    if args.out:
        evaluate.write_report(
            Path(args.out), results, {"env": args.env, "split": args.split, "n": len(tasks)}
        )
    return 0


def _model_eval(args: argparse.Namespace, env: Env, rubric: Rubric, tasks: list[Task]) -> EvalResult:
    """``--model`` (a run dir's checkpoint, an export, a model) played greedily through ``--backend``."""
    from rltk import evaluate
    from rltk.compare import load_for_eval
    from rltk.sampler import make_sampler, vllm_options

    loaded = load_for_eval(args.model, args.step)
    max_new_tokens = env.max_new_tokens
    if loaded.cfg is not None and loaded.cfg.env.name == args.env and loaded.cfg.eval.max_new_tokens:
        max_new_tokens = loaded.cfg.eval.max_new_tokens  # as the trainer's own evals did
    if args.max_new_tokens is not None:
        max_new_tokens = args.max_new_tokens
    name = f"model ({args.model}{'' if args.step is None else f' step {args.step}'})"
    sampler = make_sampler(
        args.backend,
        loaded.model,
        loaded.tokenizer,
        **vllm_options(args.backend, args.vllm_kv_cache_gib, args.vllm_python),
    )
    with loaded.precision, contextlib.closing(sampler):
        return evaluate.model_result(
            sampler, loaded.tokenizer, env, rubric, tasks, max_new_tokens, name, args.batch_size
        )


def cmd_compare(args: argparse.Namespace) -> int:
    """The proof report: ``--compare`` models beside the env's teacher, oracle and best trivial policy."""
    from rltk import compare, plugins, report, report_render
    from rltk.sampler import vllm_options

    if args.out is None:
        print(
            "error: --compare needs --out DIR (report.json, report.md, report.png go there)", file=sys.stderr
        )
        return 2
    specs = compare.parse_specs(args.compare)
    options = compare.env_options(specs, args.env, _env_options(args) if args.env_options else None)
    env = plugins.make_env(args.env, options)  # before any model loads: bad options fail fast
    try:
        settings = report.ReportSettings(
            samples=args.samples,
            sampled_tasks=args.sampled_n,
            bon=args.bon if args.bon is not None else args.samples,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens or env.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}: fix --samples, --bon or --temperature", file=sys.stderr)
        return 2
    tasks = env.tasks(args.split, args.n, seed=args.seed)
    meta = {"env_options": options, "split": args.split, "task_seed": args.seed}
    sampler = compare.SamplerChoice(
        args.backend, vllm_options(args.backend, args.vllm_kv_cache_gib, args.vllm_python)
    )
    built = compare.run(specs, env, tasks, settings, args.out, meta, sampler)
    print(report_render.markdown(built))
    print(f"wrote {args.out}/report.json, report.md, report.png")
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    """``rltk envs list | check NAME | new NAME``: list the envs, run the env contract, scaffold a plugin."""
    if args.action == "list":
        from rltk.plugins import list_envs

        for name, desc in sorted(list_envs().items()):
            print(f"{name:24s} {desc}")
        return 0
    if args.name is None:
        print(
            f"error: rltk envs {args.action} needs an env name: rltk envs {args.action} NAME", file=sys.stderr
        )
        return 2
    if args.action == "new":
        from rltk.scaffold_env import write_package

        root = write_package(args.name, Path(args.dir))
        print(f"wrote {root}; next:\n  pip install -e {root}\n  rltk envs check {args.name}")
        print(f"  pytest {root / 'tests'}\n  rltk train {root / 'recipes' / (args.name + '_grpo.yaml')}")
        return 0
    from rltk.envcheck import format_results, run_checks

    if args.n < 2:
        print(
            "error: --n must be at least 2 (a wrong answer is another task's oracle answer)", file=sys.stderr
        )
        return 2
    args.env = args.name  # what _env_options names in its error
    results = run_checks(args.name, _env_options(args), args.n)
    print(format_results(args.name, results))
    return 2 if any(r.status == "fail" for r in results) else 0


def cmd_rewards(args: argparse.Namespace) -> int:
    """``rltk rewards list | check NAME --env E | new NAME``: list, check on known answers, scaffold a plugin.

    ``check`` exits 1 when it raises a flag (no signal, a canary above the wrong answer, failed calls).
    """
    if args.action == "list":
        from rltk.reward_spec import listing

        print("\n".join(listing()))
        return 0
    if args.name is None or (args.action == "check" and args.env is None):
        need = "NAME --env ENV" if args.action == "check" else "NAME"
        print(
            f"error: rltk rewards {args.action} needs {need}: rltk rewards {args.action} {need}",
            file=sys.stderr,
        )
        return 2
    if args.action == "new":
        from rltk.scaffold_reward import write_package

        root = write_package(args.name, Path(args.dir))
        print(f"wrote {root}; next:\n  pip install -e {root}\n  rltk rewards list")
        print(f"  rltk rewards check {args.name} --env policy_flagging\n  pytest {root / 'tests'}")
        print(f"  rltk train {root / 'recipes' / (args.name + '_grpo.yaml')}")
        return 0
    from rltk import plugins
    from rltk.rewardcheck import check_reward, render

    env = plugins.make_env(args.env, _env_options(args))
    params = _json_object(args.params, "--params", "reward", args.name)
    result = check_reward(
        args.name, env, params=params, format=args.format, n=args.n, split=args.split, seed=args.seed,
        timeout_s=args.timeout,
    )  # fmt: skip
    print(render(result))
    return 1 if result.flags else 0


def _json_object(text: str | None, flag: str, kind: str, name: str) -> dict[str, Any]:
    """``flag``'s JSON object (``{}`` when not given); other text raises :class:`PluginError`."""
    from rltk.plugins import PluginError

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        fix = f"""write a JSON object, e.g. {flag} '{{"max_chars": 200}}'"""
        raise PluginError(kind, name, f"{flag} {text!r} is not a JSON object", fix)
    return value


def _add_rewards_parser(sub: argparse._SubParsersAction) -> None:
    """``rltk rewards list | check NAME --env E | new NAME``."""
    p = sub.add_parser(
        "rewards",
        help="list rewards, check one on an env's oracle, teacher and canary answers, or scaffold a plugin",
        usage="rltk rewards list\n       rltk rewards check NAME --env ENV [--n N] [--params JSON] "
        "[--format text|messages] [--env-options JSON]\n       rltk rewards new NAME [--dir DIR]",
    )
    p.add_argument("action", choices=["list", "check", "new"], help="list | check | new")
    p.add_argument("name", nargs="?", help="the reward (check) or the new reward's name (new)")
    p.add_argument("--env", default=None, help="check: the env whose tasks it scores")
    p.add_argument("--env-options", default=None, help="check: JSON dict of env options")
    p.add_argument("--params", default=None, help="check: JSON dict of the reward's params")
    p.add_argument(
        "--format", default="auto", choices=["auto", "text", "messages"], help="check: as in a recipe"
    )
    p.add_argument("--n", type=int, default=50, help="check: tasks")
    p.add_argument("--split", default="eval", choices=["train", "eval", "test"], help="check: task split")
    p.add_argument("--seed", type=int, default=0, help="check: task seed")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="check: seconds per call (rollout.reward_timeout_s)"
    )
    p.add_argument("--dir", default=".", help="new: where to write the package (default: here)")
    p.set_defaults(func=cmd_rewards)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """``rltk eval``: a policy's greedy accuracy, or with ``--compare`` the proof report."""
    p = sub.add_parser("eval", help="greedy accuracy of a model (or oracle/baseline) on an env split")
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="alias, HF dir, hub id, or an rltk run dir (an rltk export's SHA256SUMS is checked first)",
    )
    p.add_argument(
        "--step", type=int, default=None, help="a run dir's checkpoint step (default: its newest valid one)"
    )
    p.add_argument("--env", default="policy_flagging", help="env name (rltk envs list)")
    p.add_argument(
        "--env-options",
        default=None,
        help="JSON dict of env options (default: a run dir's own options for its env, else none)",
    )
    p.add_argument("--split", default="eval", choices=["train", "eval", "test"])
    p.add_argument("--n", type=int, default=400, help="number of tasks")
    p.add_argument("--seed", type=int, default=0, help="task seed")
    p.add_argument("--policy", default="model", help="model | oracle | a baseline name of the env")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens per assistant turn (default: a run dir's eval.max_new_tokens, else the env's)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--backend",
        default="hf",
        choices=["hf", "vllm"],
        help="the sampler that plays the models, as rollout.backend in training (vllm: bash "
        "scripts/setup_vllm.sh first)",
    )
    p.add_argument("--vllm-python", default="", help="the vLLM venv's python (default: .venv-vllm)")
    p.add_argument("--vllm-kv-cache-gib", type=float, default=2.0, help="the vLLM sampler's KV cache, GiB")
    p.add_argument("--no-baselines", action="store_true", help="do not print the trivial policies")
    p.add_argument("--out", help="write the results as JSON here (with --compare: the report's directory)")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME=MODEL",
        help="the proof report: each NAME=MODEL (alias, HF dir, export, run dir, RUN_DIR@STEP) greedy, "
        "sampled and best-of-N, beside the env's teacher, oracle and best trivial policy; the last is the "
        "candidate. Writes report.json/.md/.png into --out; rerun after a stop, it reuses the rows "
        "already played (kept in --out/.partial/)",
    )
    p.add_argument("--samples", type=int, default=8, help="with --compare: samples per task (0: greedy only)")
    p.add_argument(
        "--sampled-n",
        type=int,
        default=None,
        help="with --compare: sample the first N tasks only (default all)",
    )
    p.add_argument("--bon", type=int, default=None, help="with --compare: best-of-N (default: --samples)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --compare: sampling temperature")
    p.set_defaults(func=cmd_eval)


def _add_envs_parser(sub: argparse._SubParsersAction) -> None:
    """``rltk envs list | check NAME | new NAME``."""
    p = sub.add_parser(
        "envs",
        help="list environments, check one against the env contract, or scaffold a new env plugin",
        usage="rltk envs list\n       rltk envs check NAME [--env-options JSON] [--n N]\n"
        "       rltk envs new NAME [--dir DIR]",
    )
    p.add_argument("action", choices=["list", "check", "new"], help="list | check | new")
    p.add_argument("name", nargs="?", help="the env (check) or the new env's name (new)")
    p.add_argument("--env-options", default=None, help="check: JSON dict of env options")
    p.add_argument("--n", type=int, default=200, help="check: tasks per split (the oracle plays every one)")
    p.add_argument("--dir", default=".", help="new: where to write the package (default: here)")
    p.set_defaults(func=cmd_envs)


def build_parser() -> argparse.ArgumentParser:
    """The ``rltk`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="rltk", description="Vertical RL fine-tuning for small open models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from rltk.train import build_parser as train_parser  # one definition of train's arguments

    p = sub.add_parser(
        "train",
        help="train from a recipe: rltk train RECIPE [key=value ...]",
        parents=[train_parser(add_help=False)],
        description="Train a policy with RL from a recipe.",
    )
    p.set_defaults(func=cmd_train)

    _add_eval_parser(sub)

    add_export_parser(sub)
    add_serve_parser(sub)
    _add_envs_parser(sub)
    _add_rewards_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rltk`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that closed the pipe shows here, not in the interpreter's exit flush
        return code
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rltk envs list | head`: stop quietly, as Unix tools do on SIGPIPE
        with contextlib.suppress(OSError, ValueError):  # no real stdout (captured): nothing to silence
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool a closed pipe stopped


if __name__ == "__main__":
    sys.exit(main())
