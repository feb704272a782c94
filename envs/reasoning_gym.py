"""reasoning-gym tasks: any generator of the ``reasoning-gym`` package, scored by its own ``score_answer``.

``env.options: {task: leg_counting}`` picks a generator (``rltk envs list`` shows this env; the tasks are
reasoning-gym's dataset names, validated with a did-you-mean), ``config: {...}`` its config fields (e.g.
``{min_animals: 2, max_animals: 4}``), ``seed`` and ``size`` the dataset's. Needs the optional extra:
``pip install 'rltk[reasoning]'``.

Comparable with others' results: the prompt is reasoning-gym's own evaluation setup (``eval/eval.py`` in
its repository): ``SYSTEM_PROMPTS["default"]`` as the system message (option ``system_prompt`` picks another
key of ``reasoning_gym.utils.SYSTEM_PROMPTS``), the entry's ``question`` as the user message; a completion
is scored by :func:`rltk_rewards.reasoning.score_completion` (``extract_answer``, then the dataset's
``score_answer``) and counts as correct only at a score of 1.0.

Which entries: the tasks of ``tasks(split, n, seed=k)`` come from ``create_dataset(task, seed=S_k,
size=size, **config)``, walking its indices 0, 1, 2, ... in order and keeping each entry whose rendered prompt
hashes into ``split`` (:func:`rltk.env.split_of`), the first time that prompt appears. ``S_0`` is the
``seed`` option itself, so the eval and test sets (rltk draws them with ``k = 0``) are entries of the very
dataset others build with that seed, each named by its index (``Task.id`` ends in ``/<seed>/<index>``).
Other ``k`` (a training run's seed, the warm start's) use ``S_k = seed + k * 10,000,000 (mod 2**32)``: most
generators draw entry ``i`` from ``Random(S + i)``, so nearby seeds would give the same entries shifted by
one index; a stride above any ``size`` keeps them apart.

Why prompt hashes and not separate seeds for the splits: two seeds or two index ranges can still produce the
same question (small generators repeat themselves: ``leg_counting`` with two animals, one-digit arithmetic),
and a question in both train and eval would leak. A prompt lies in exactly one split by its hash, whatever
seed or index produced it, so the splits are disjoint by construction. Cost: the eval split keeps about one
entry in ten, so ``n`` eval tasks generate about ``10 n`` entries (cached per env; milliseconds each for most
generators). Changing ``system_prompt`` changes the prompts and so their splits: train and evaluate with the
same one.

The oracle answers the entry's own ``answer`` in the answer format (``<answer>…</answer>``), through the same
extraction and scoring as a model's. It reads no reference: the env remembers the answer of every prompt its
``tasks`` generated (a generator's answer is a function of the prompt it wrote). A few generators
(``boxnet``, ``graph_color``, ``propositional_logic``, ``rubiks_cube``, ``rush_hour``) give no reference
answer and verify a proposed one instead: there the oracle answers empty and scores 0. No teacher ships
with this env.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any, ClassVar

from rltk_rewards.reasoning import (
    INSTALL_HINT,
    extract,
    import_reasoning_gym,
    is_correct,
    make_dataset,
    render_answer,
    score_completion,
)

from rltk.env import SPLITS, Env, FinalAnswer, Message, Policy, Task, check_choice, prompt_hash, split_of

log = logging.getLogger("rltk")

SEED_STRIDE = 10_000_000  # dataset seed of tasks seed k: seed + k * SEED_STRIDE; above any allowed size
DEFAULT_SIZE = 10_000  # indices walked at most per (split, seed): 400 eval tasks need about 4,000


def dataset_seed(seed: int, k: int) -> int:
    """The reasoning-gym dataset seed of ``tasks(..., seed=k)`` under the env option ``seed``.

    >>> dataset_seed(42, 0), dataset_seed(42, 1), dataset_seed(0, 7919)
    (42, 10000042, 1880588672)
    """
    return (seed + k * SEED_STRIDE) % 2**32


class ReasoningGymEnv(Env):
    """A reasoning-gym generator as an env: its questions, its answer format, its ``score_answer``.

    Args:
        task: A reasoning-gym dataset name (``reasoning_gym.factory.DATASETS``), e.g. ``"leg_counting"``,
            ``"basic_arithmetic"``.
        config: Fields of the task's config dataclass, passed to ``create_dataset`` (``seed`` and ``size``
            are this env's own options).
        seed: The dataset seed of the eval and test sets (and of training at ``run.seed: 0``).
        size: The dataset's virtual size: indices walked at most per split and seed (some generators, e.g.
            ``acre``, precompute this many entries; for most, entry ``i`` does not depend on it).
        system_prompt: A key of ``reasoning_gym.utils.SYSTEM_PROMPTS``; ``"default"`` is the one
            reasoning-gym's own evaluation uses.
        max_new_tokens: Tokens one answer may take (``rltk eval``'s default): room to reason first.

    Raises:
        ImportError: If reasoning-gym is not installed (the message names ``pip install 'rltk[reasoning]'``).
        ValueError: On an unknown task (with the closest names), a config field the task does not have or a
            value its config rejects, or an option out of range.

    """

    name = "reasoning_gym"
    description = "reasoning-gym generators (option task:), scored by reasoning-gym's own score_answer."
    default_rewards: ClassVar[dict[str, float]] = {"reasoning_gym_score": 1.0}

    def __init__(
        self,
        task: str | None = None,
        config: dict[str, Any] | None = None,
        seed: int = 0,
        size: int = DEFAULT_SIZE,
        system_prompt: str = "default",
        max_new_tokens: int = 256,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        import_reasoning_gym()  # first: without the package, say how to install it
        from reasoning_gym.factory import DATASETS
        from reasoning_gym.utils import SYSTEM_PROMPTS

        _check_task(task, DATASETS)
        check_choice("system_prompt", system_prompt, tuple(SYSTEM_PROMPTS))
        for key, value, hi in (("seed", seed, 2**32 - 1), ("size", size, SEED_STRIDE)):
            lo = 0 if key == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.task: str = str(task)
        self.seed, self.size = seed, size
        self.config = _checked_config(self.task, config, DATASETS, seed, size)
        self.system_prompt = system_prompt
        self.system = SYSTEM_PROMPTS[system_prompt]
        self.max_new_tokens = max_new_tokens
        self._entries: dict[tuple[int, int], dict[str, Any]] = {}  # (dataset seed, index) -> entry
        self._answers: dict[str, str | None] = {}  # prompt hash -> the generator's answer (the oracle's)

    def messages(self, question: str) -> list[Message]:
        """The chat of one question: reasoning-gym's system prompt, then the question."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": question}]

    def _entry(self, ds_seed: int, index: int) -> dict[str, Any]:
        key = (ds_seed, index)
        if key not in self._entries:
            dataset = make_dataset(self.task, self.config, ds_seed, self.size)
            self._entries[key] = dataset[index]
        return self._entries[key]

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``: the first entries of the seed's dataset whose prompt hashes into it.

        Deterministic and prefix-stable (indices are walked in order); disjoint across splits by prompt hash.

        Raises:
            ValueError: If fewer than ``n`` distinct prompts of ``split`` lie among the ``size`` entries.

        """
        check_choice("split", split, SPLITS)
        ds_seed = dataset_seed(self.seed, seed)
        out: list[Task] = []
        seen: set[str] = set()
        for index in range(self.size):
            if len(out) >= n:
                break
            entry = self._entry(ds_seed, index)
            messages = self.messages(str(entry["question"]))
            digest = prompt_hash(messages)
            if digest in seen or split_of(messages) != split:
                continue
            seen.add(digest)
            self._answers[digest] = entry.get("answer")
            reference = {
                "task": self.task,
                "config": dict(self.config),
                "seed": ds_seed,
                "size": self.size,
                "index": index,
                "entry": entry,
            }
            task_id = f"{self.name}/{self.task}/{split}/{ds_seed}/{index}"
            out.append(Task(task_id, split, messages, reference, {"task": self.task}))
        if len(out) < n:
            raise ValueError(
                f"reasoning-gym task {self.task!r} (seed {ds_seed}) has only {len(out)} distinct {split} "
                f"prompts among its first {self.size} entries, {n} asked: raise env.options.size or ask "
                "for fewer tasks (a small config repeats its questions)"
            )
        return out

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """Verdict: ``score`` (reasoning-gym's ``score_answer``), ``correct`` (score == 1.0), ``answer``.

        ``answer`` is what ``extract_answer`` read (None without ``<answer>…</answer>``); ``error`` is set
        where the scorer raised on the answer (scored 0.0, as reasoning-gym's evaluation does). Never raises
        on model output.
        """
        scored = score_completion(completion, task.reference)
        verdict: dict[str, Any] = {
            "correct": is_correct(scored.score),
            "score": scored.score,
            "answer": scored.answer,
            "tagged": scored.answer is not None,
        }
        if scored.error is not None:
            verdict["error"] = scored.error
        return verdict

    def oracle(self, messages: list[Message]) -> str:
        """The generator's answer to this prompt in the answer format (empty where it gives none).

        Raises:
            ValueError: For a prompt this env's ``tasks`` did not generate (the oracle knows no other).

        """
        digest = prompt_hash(list(messages[:2]))
        if digest not in self._answers:
            raise ValueError(
                f"the {self.name} oracle answers only prompts this env generated (task {self.task!r}): "
                "call env.tasks(...) first, on the same env"
            )
        answer = self._answers[digest]
        return render_answer("" if answer is None else str(answer))

    def final_answer(self, messages: list[Message], actions: list[str]) -> FinalAnswer:
        """The vote key: the answer ``extract_answer`` reads; None if absent or empty."""
        answer = extract(actions[-1]) if actions else None
        return answer or None

    def baselines(self) -> dict[str, Policy]:
        """An empty answer, and the question itself as the answer (probes partial credit by containment)."""

        def echo(messages: list[Message]) -> str:
            return render_answer(messages[-1]["content"] if messages else "")

        return {"empty_answer": lambda m: render_answer(""), "echo_question": echo}


def _check_task(task: str | None, datasets: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``task`` names a reasoning-gym dataset; the message names the fix."""
    names = sorted(datasets)
    if isinstance(task, str) and task in datasets:
        return
    if task is None:
        raise ValueError(
            f"env 'reasoning_gym' needs option task: a reasoning-gym dataset name, e.g. env.options: "
            f"{{task: leg_counting}}; valid: {', '.join(names)}"
        )
    close = difflib.get_close_matches(str(task), names, n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(
        f"unknown reasoning-gym task {task!r}: {hint}set env.options.task to one of {', '.join(names)}"
    )


def _checked_config(
    task: str, config: dict[str, Any] | None, datasets: dict[str, Any], seed: int, size: int
) -> dict[str, Any]:
    """``config`` validated by building the task's dataset once (its own ``validate`` runs; cached)."""
    if config is None:
        config = {}
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise ValueError(f"config must be a mapping of {task}'s config fields to values, got {config!r}")
    fields = sorted(f.name for f in dataclasses.fields(datasets[task][1]) if f.name not in ("seed", "size"))
    for key in config:
        if key in ("seed", "size"):
            raise ValueError(f"set {key} as env.options.{key}, not inside env.options.config")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{task} has no config field {key!r}: {hint}its fields: {', '.join(fields)}")
    try:
        make_dataset(task, config, seed, size)  # a config the generator rejects fails here, not mid-run
    except (AssertionError, ValueError, TypeError) as exc:
        raise ValueError(f"reasoning-gym rejected config {config} for {task}: {exc}") from exc
    return dict(config)


__all__ = ["INSTALL_HINT", "ReasoningGymEnv", "dataset_seed"]
