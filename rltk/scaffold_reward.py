"""``rltk rewards new NAME``: write a reward plugin package that ``pip install -e`` installs, found at once.

    NAME/pyproject.toml          the reward's entry point in group ``rltk.rewards``
    NAME/NAME/reward.py          the reward: fn(completion, reference, outcome, **params) -> float, doctested
    NAME/recipes/NAME_grpo.yaml  a 2-step GRPO recipe on the ``tiny`` model and the ``policy_flagging`` env
    NAME/tests/test_NAME.py      its doctests, rltk finds it by name, ``rltk rewards check`` raises no flag
    NAME/README.md               the commands, and the reward contract in short

The reward scores the env's verdict (``outcome["correct"]``) and refuses padded answers: a working start to
edit into your own (any env whose verdict has ``correct`` runs it unchanged).
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path

from rltk.plugins import PluginError, list_rewards

EXAMPLE = "my_reward"
"""The name the templates are written with; :func:`render` puts the new name there."""

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "rltk-reward-my-reward"
version = "0.1.0"
description = "An rltk reward plugin: my_reward."
requires-python = ">=3.10"
dependencies = ["rltk"]

[project.entry-points."rltk.rewards"]
my_reward = "my_reward.reward:my_reward"

[tool.setuptools]
packages = ["my_reward"]
"""

INIT = '''\
"""An rltk reward plugin: my_reward (see reward.py)."""
'''

REWARD = '''\
"""The my_reward reward: the env judged the answer correct, and the answer is not padded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rltk.reward import reward_fn


@reward_fn(range=(0.0, 1.0), version="0.1.0")
def my_reward(
    completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any], max_chars: int = 400
) -> float:
    """1 when the env judged the answer correct and it is at most ``max_chars`` long, else 0.

    Edit me to score what your workflow needs. ``completion`` is the model's final turn (a string; declare
    ``format="messages"`` in ``@reward_fn`` to get TRL's message lists instead), ``reference`` the task's
    gold data (never shown to the model), ``outcome`` the env's verdict; ``max_chars`` is a param a recipe
    may set (``rewards: [{name: my_reward, params: {max_chars: 200}}]``). An answer that does not parse
    scores the range minimum, never above a well-formed wrong answer; return None only where the task makes
    the reward not applicable.

    >>> my_reward("FLAG R1", {}, {"correct": True})
    1.0
    >>> my_reward("FLAG R1" + " " * 500, {}, {"correct": True})  # padded: not rewarded
    0.0
    >>> my_reward("", {}, {})
    0.0
    """
    if len(completion) > max_chars:
        return 0.0
    return 1.0 if outcome.get("correct") is True else 0.0
'''

RECIPE = """\
# A seconds-long GRPO run of my_reward on the tiny model: rltk train recipes/my_reward_grpo.yaml
run: {output_dir: runs/my_reward, steps: 2, save_every: 0, threads: 1}
model: {name: tiny}
env: {name: policy_flagging}
rewards:
  - {name: my_reward, weight: 1.0}
  - {name: answer_format, weight: 0.2}
rollout: {prompts_per_step: 2, group_size: 4, max_new_tokens: 8}
optim: {groups_per_micro_batch: 1}
warmstart: {enabled: false}
eval: {n: 8}
"""

TEST = '''\
"""my_reward: its doctests pass, rltk finds it by name, and it tells right answers from wrong ones."""

import doctest

import my_reward.reward as module
from rltk.plugins import get_reward, make_env
from rltk.rewardcheck import check_reward


def test_doctests() -> None:
    assert doctest.testmod(module).failed == 0


def test_rltk_finds_it_by_name() -> None:  # through the entry point pip install -e declared
    assert get_reward("my_reward") is module.my_reward


def test_rewards_check_raises_no_flag() -> None:  # what `rltk rewards check my_reward --env ...` prints
    result = check_reward("my_reward", make_env("policy_flagging"), n=20)
    assert result.flags == []
'''

README = """\
# my_reward: an rltk reward plugin

```bash
pip install -e .                                     # rltk finds it through its entry point at once
rltk rewards list                                    # my_reward, with its range, version and description
rltk rewards check my_reward --env policy_flagging   # scores on oracle, teacher and canary answers
pytest tests                                         # doctests, lookup by name, no check flag
rltk train recipes/my_reward_grpo.yaml               # 2 GRPO steps on the tiny model
```

The reward is `my_reward/reward.py`. rltk calls it per sample as
`fn(completion, reference=..., outcome=..., **params) -> float | None` (`reference` and `outcome` go by
name, so `def r(completion, **kw)` works too); a function whose parameters name `prompts` or `completions` is
called TRL's way instead, once per group: `fn(prompts=[...], completions=[...], completion_ids=[...],
<reference field>=[...], outcome=[...], **params) -> list[float | None]`. `@reward_fn(range=(lo, hi),
version=..., format="text" | "messages")` declares what `rltk rewards list` shows; a score outside the range,
an exception or a hang fails its rollout instead of training on it.
"""


def render(name: str) -> dict[str, str]:
    """Every file of the package for reward ``name``, by path relative to the package root."""
    files = {
        "pyproject.toml": PYPROJECT,
        f"{EXAMPLE}/__init__.py": INIT,
        f"{EXAMPLE}/reward.py": REWARD,
        f"recipes/{EXAMPLE}_grpo.yaml": RECIPE,
        f"tests/test_{EXAMPLE}.py": TEST,
        "README.md": README,
    }
    dist = EXAMPLE.replace("_", "-")
    return {
        rel.replace(EXAMPLE, name): text.replace(dist, name.replace("_", "-")).replace(EXAMPLE, name)
        for rel, text in files.items()
    }


def check_name(name: str) -> None:
    """Raise :class:`PluginError` unless ``name`` can be a new reward's name and its Python package name."""
    fix = "pick a lowercase identifier that is not taken, e.g. 'iban_valid'"
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise PluginError("reward", name, "not a lowercase Python identifier (it names the package too)", fix)
    if name in list_rewards():
        raise PluginError("reward", name, "a reward of that name is already installed", fix)
    if importlib.util.find_spec(name) is not None:
        why = f"a Python module {name!r} already exists (the package would clash)"
        raise PluginError("reward", name, why, fix)


def write_package(name: str, parent: Path) -> Path:
    """Write the plugin package for reward ``name`` into ``parent/name``; return that directory.

    Raises:
        PluginError: If the name is unusable or taken, or ``parent/name`` already exists.

    """
    from rltk.scaffold_env import write_tree

    check_name(name)
    return write_tree("reward", name, Path(parent) / name, render(name))
