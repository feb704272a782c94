"""``rltk eval --compare``: models named on the command line beside the env's teacher, oracle, trivial policy.

    rltk eval --env invoice_extraction --compare base=smollm2-135m-instruct sft=runs/inv@0 rl=runs/inv
        --n 200 --samples 8 --bon 8 --out docs/reports/invoice_extraction

Each ``NAME=MODEL`` is a model alias, a Hugging Face directory, an rltk export (its ``SHA256SUMS`` is checked
first) or an rltk run dir, with ``@STEP`` for one of its checkpoints (``RUN@0``: after the warm start).
Models load one at a time and play through the sampler ``--backend`` names (:class:`SamplerChoice`: the HF
sampler, or a vLLM engine started for each model and closed after it). The last model named is the
candidate: the report gives its paired differences against every other row.

A model's row is kept in ``OUT/.partial/`` as soon as it is played, under a key of everything its attempts
depend on (the weights' manifest, the tasks, the settings, the sampler); a stopped report rerun with the
same arguments plays only the rows it had not finished, and ``.partial/`` goes once the report is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rltk import checkpoint, report, report_build, report_render
from rltk.durable import sha256_file, write_bytes_atomic
from rltk.env import Env
from rltk.reward import Rubric

_RESERVED = ("teacher", "oracle", "trivial")
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.+-]+)=(?P<model>[^@]+?)(?:@(?P<step>\d+))?$")
PARTIAL = ".partial"
logger = logging.getLogger(__name__)


class CompareError(ValueError):
    """A ``--compare`` argument that cannot be used (named in the message, with the fix)."""


@dataclass(frozen=True)
class ModelSpec:
    """One ``NAME=MODEL[@STEP]`` argument."""

    name: str
    model: str
    step: int | None

    @property
    def run_dir(self) -> bool:
        """True for an rltk run dir (it holds the run's ``config.yaml``)."""
        return Path(self.model, "config.yaml").is_file()

    @property
    def source(self) -> str:
        """How the report names where the model came from."""
        return self.model + ("" if self.step is None else f" @ step {self.step}")


@dataclass(frozen=True)
class SamplerChoice:
    """Which sampler plays the models (``rltk eval --backend``): ``hf`` or ``vllm``, and the vLLM options."""

    backend: str = "hf"
    options: dict[str, Any] = field(default_factory=dict)  # VLLMSampler keywords (python, kv_cache_gib)


def parse_specs(args: list[str]) -> list[ModelSpec]:
    """Parse and check ``NAME=MODEL[@STEP]`` arguments; every problem is named at once.

    >>> parse_specs(["base=smollm2-135m-instruct", "rl=runs/quickstart"])[1]
    ModelSpec(name='rl', model='runs/quickstart', step=None)
    >>> parse_specs(["rl"])
    Traceback (most recent call last):
    ...
    rltk.compare.CompareError: 'rl' is not NAME=MODEL or NAME=RUN_DIR@STEP (e.g. rl=runs/quickstart@80)
    """
    specs, problems = [], []
    for arg in args:
        m = _SPEC.match(arg)
        if m is None:
            problems.append(f"{arg!r} is not NAME=MODEL or NAME=RUN_DIR@STEP (e.g. rl=runs/quickstart@80)")
            continue
        spec = ModelSpec(m["name"], m["model"], None if m["step"] is None else int(m["step"]))
        if spec.name.startswith(_RESERVED):
            problems.append(f"name {spec.name!r} is reserved for the env's own rows; rename it")
        if spec.step is not None and not spec.run_dir:
            problems.append(f"{arg!r}: @STEP needs an rltk run dir (a run's output_dir with config.yaml)")
        specs.append(spec)
    names = [s.name for s in specs]
    problems += [
        f"name {n!r} is used twice; give each model its own name"
        for n in sorted(set(names))
        if names.count(n) > 1
    ]
    if not args:
        problems.append("--compare needs at least one NAME=MODEL")
    if problems:
        raise CompareError("; ".join(problems))
    return specs


def env_options(specs: list[ModelSpec], env_name: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """``--env-options`` if given, else the first run dir's own options for this env, else none."""
    if given is not None:
        return given
    from rltk.config import load_config

    for spec in specs:
        if spec.run_dir:
            cfg = load_config(Path(spec.model, "config.yaml"), [])
            if cfg.env.name == env_name:
                return dict(cfg.env.options)
    return {}


@dataclass
class LoadedModel:
    """A model ready to evaluate: its tokenizer, the precision to run it under, its run's config if any."""

    model: Any  # PreTrainedModel
    tokenizer: Any  # PreTrainedTokenizerBase
    precision: contextlib.AbstractContextManager
    cfg: Any = None  # rltk.config.Config of a run dir, else None


def load_for_eval(model: str, step: int | None = None) -> LoadedModel:
    """Load ``model`` for ``rltk eval`` and ``--compare``, with the precision its run trained under.

    ``model`` is a run dir (its checkpoint ``step``, else its newest valid one), an export (checked against
    its ``SHA256SUMS`` before it loads: a damaged weight would run silently), an alias or an HF directory.
    """
    from rltk.models import autocast, load_model, load_tokenizer

    if Path(model, "config.yaml").is_file():
        from rltk.export import load_run

        lm, tokenizer, cfg, _ = load_run(model, step)
        return LoadedModel(lm, tokenizer, autocast(cfg.model.mixed_precision, lm.device), cfg)
    if Path(model, "SHA256SUMS").is_file():
        from rltk.export import check_export

        check_export(model)
    return LoadedModel(load_model(model), load_tokenizer(model), contextlib.nullcontext())


def evaluate_spec(
    spec: ModelSpec,
    env: Env,
    rubric: Rubric,
    tasks: list,
    settings: report.ReportSettings,
    sampler: SamplerChoice,
) -> report.PolicyEval:
    """Load one model, play the report's tasks with it through ``sampler``'s backend, free both."""
    from rltk.sampler import make_sampler

    loaded = load_for_eval(spec.model, spec.step)
    engine = make_sampler(sampler.backend, loaded.model, loaded.tokenizer, **sampler.options)
    try:
        with loaded.precision, contextlib.closing(engine):
            return report.evaluate_model(
                engine, loaded.tokenizer, env, rubric, tasks, settings, spec.name, spec.source
            )
    finally:
        del loaded, engine
        gc.collect()


def weights_identity(spec: ModelSpec) -> str:
    """What pins the weights ``spec`` names.

    A run's checkpoint: its manifest (the sha256 of every file); an export: its ``SHA256SUMS``; else the
    name with the size and mtime of its files (an HF dir; an alias by its name).
    """
    if spec.run_dir:
        step = spec.step
        path = checkpoint.latest(spec.model) if step is None else checkpoint.step_dir(spec.model, step)
        manifest = None if path is None else path / checkpoint.MANIFEST
        return sha256_file(manifest) if manifest is not None and manifest.is_file() else "no checkpoint"
    root = Path(spec.model)
    if (root / "SHA256SUMS").is_file():
        return sha256_file(root / "SHA256SUMS")
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else []
    return json.dumps([spec.model, *[(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]])


class RowCache:
    """Model rows of an unfinished report (``OUT/.partial/NAME-KEY.pkl``): what a rerun need not play again.

    The files are this process's own pickles, read back only under the exact key they were written with.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir) / PARTIAL

    @staticmethod
    def key(spec: ModelSpec, tasks: list, settings: report.ReportSettings, context: dict[str, Any]) -> str:
        """Sha256 of everything ``spec``'s attempts depend on."""
        payload = {
            "spec": dataclasses.asdict(spec),
            "weights": weights_identity(spec),
            "tasks": [(t.id, t.messages, t.reference, t.tools) for t in tasks],
            "settings": dataclasses.asdict(settings),
            **context,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()

    def _path(self, name: str, key: str) -> Path:
        return self.dir / f"{name}-{key[:32]}.pkl"

    def get(self, name: str, key: str) -> report.PolicyEval | None:
        """The row kept under ``key``, or None (none kept, or unreadable: it is played again)."""
        path = self._path(name, key)
        if not path.is_file():
            return None
        try:
            row = pickle.loads(path.read_bytes())
        except Exception as exc:  # a truncated or foreign file: play the row again
            logger.warning("ignoring %s (%r): the row is played again", path, exc)
            return None
        return row if isinstance(row, report.PolicyEval) and row.name == name else None

    def put(self, name: str, key: str, row: report.PolicyEval) -> None:
        """Keep ``row`` under ``key``; rows of ``name`` kept under other keys go."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(f"{name}-*.pkl"):
            stale.unlink()
        write_bytes_atomic(self._path(name, key), pickle.dumps(row))

    def clear(self) -> None:
        """Drop every kept row (the report is written)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def run(
    specs: list[ModelSpec],
    env: Env,
    tasks: list,
    settings: report.ReportSettings,
    out_dir: str | Path,
    meta: dict[str, Any],
    sampler: SamplerChoice | None = None,
) -> dict[str, Any]:
    """Evaluate every model and the env's scripted policies; write the report; return it.

    A model row a stopped run with the same key kept (:class:`RowCache`) is reused, not played again.
    """
    sampler = sampler or SamplerChoice()
    meta = {**meta, "sampler": sampler.backend}
    context = {"env": env.name, "meta": meta, "sampler": dataclasses.asdict(sampler)}
    cache = RowCache(out_dir)
    rubric = Rubric.from_config([], env)
    rows: list[report.PolicyEval] = []
    try:
        for spec in specs:
            key = RowCache.key(spec, tasks, settings, context)
            row = cache.get(spec.name, key)
            if row is None:
                row = evaluate_spec(spec, env, rubric, tasks, settings, sampler)
                cache.put(spec.name, key, row)
            else:
                print(f"{spec.name}: reusing its attempts from a stopped run of this report ({cache.dir})")
            rows.append(row)
        rows += report.scripted_policies(env, rubric, tasks)
    finally:
        rubric.close()
    built = report_build.build_report(env, tasks, rows, settings, meta)
    report_render.write(out_dir, built)
    cache.clear()
    return built
