"""Plugin lookup: explicit registry, then entry points, then ``pkg.module:name``; helpful errors."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rltk import plugins
from rltk.env import Env, Task, run_policy
from rltk.plugins import PluginError

REPO = Path(__file__).resolve().parents[1]

PLUGIN_MODULE = '''
from rltk.env import Env, Task


class CountEnv(Env):
    name = "count"
    description = "Say the number you were shown."

    def tasks(self, split, n, seed=0):
        chat = [[{"role": "user", "content": str(i)}] for i in range(n)]
        return [Task(f"count/{split}/{i}", split, chat[i], {"n": i}) for i in range(n)]

    def check(self, task, completion):
        return {"correct": completion.strip() == str(task.reference["n"])}

    def oracle(self, messages):
        return messages[-1]["content"]


def exact(completion, reference, outcome, bonus=0.0):
    """1 + bonus when the env judged the answer correct, else 0.

    More detail on a second line.
    """
    return 1.0 + bonus if outcome["correct"] else 0.0


class Nested:
    class Inner(CountEnv):
        pass


NOT_CALLABLE = 3
'''


class EchoEnv(Env):
    name = "test_echo"
    description = "Echo the prompt back.\nNot shown in listings."

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        return [
            Task(f"echo/{split}/{i}", split, [{"role": "user", "content": f"x{i}"}], {"a": f"x{i}"})
            for i in range(n)
        ]

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        return {"correct": completion == task.reference["a"]}

    def oracle(self, messages: list[dict[str, str]]) -> str:
        return messages[-1]["content"]


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers into a copy of the registry, so registrations never leak between tests."""
    for kind in ("env", "reward"):
        monkeypatch.setitem(plugins._REGISTRY, kind, dict(plugins._REGISTRY[kind]))


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Real modules on sys.path: ``rltk_test_plugins`` (env, reward) and ``rltk_test_broken`` (fails)."""
    (tmp_path / "rltk_test_plugins.py").write_text(PLUGIN_MODULE)
    (tmp_path / "rltk_test_broken.py").write_text("import rltk_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("rltk_test_plugins", "rltk_test_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "rltk_test_plugins"


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch, plugin_module: str) -> None:
    """Replace the installed entry points with real EntryPoint objects: two that load and two that do not."""
    declared = [
        importlib.metadata.EntryPoint("count", f"{plugin_module}:CountEnv", "rltk.envs"),
        importlib.metadata.EntryPoint("broken", "rltk_test_broken:Thing", "rltk.envs"),
        importlib.metadata.EntryPoint("exact", f"{plugin_module}:exact", "rltk.rewards"),
        importlib.metadata.EntryPoint("missing_attr", f"{plugin_module}:nope", "rltk.rewards"),
    ]

    def fake(*, group: str) -> importlib.metadata.EntryPoints:
        return importlib.metadata.EntryPoints(ep for ep in declared if ep.group == group)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_registered_env_is_found_listed_and_runs() -> None:
    assert plugins.register_env(EchoEnv) is EchoEnv
    cls = plugins.get_env("test_echo")
    assert cls is EchoEnv and plugins.resolve("env", "test_echo") is EchoEnv
    assert plugins.list_envs()["test_echo"] == "Echo the prompt back."
    env = cls()
    (task,) = env.tasks("eval", 1)
    assert run_policy(env, task, env.oracle).outcome == {"correct": True}


def test_register_env_as_decorator_with_a_name() -> None:
    @plugins.register_env(name="echo_alias")
    class Alias(EchoEnv):
        pass

    assert plugins.get_env("echo_alias") is Alias


def test_register_env_rejects_what_is_not_a_named_env() -> None:
    with pytest.raises(TypeError, match="Env subclass"):
        plugins.register_env(dict)  # type: ignore[arg-type]

    class Nameless(EchoEnv):
        name = ""

    with pytest.raises(TypeError, match="Nameless has no `name`"):
        plugins.register_env(Nameless)


def test_register_reward_in_every_form() -> None:
    @plugins.register_reward
    def plain(completion: str, reference: dict, outcome: dict) -> float:
        """Plain reward.

        Details.
        """
        return 1.0

    @plugins.register_reward("named")
    def f1(completion: str, reference: dict, outcome: dict) -> float:
        return 0.0

    @plugins.register_reward(name="kw_named")
    def f2(completion: str, reference: dict, outcome: dict) -> float:
        """Keyword-named reward."""
        return 0.0

    def f3(completion: str, reference: dict, outcome: dict) -> float:
        return 0.5

    assert plugins.register_reward(f3, "called") is f3
    assert [plugins.get_reward(n) for n in ("plain", "named", "kw_named", "called")] == [plain, f1, f2, f3]
    listing = plugins.list_rewards()
    assert (listing["plain"], listing["named"], listing["kw_named"]) == (
        "Plain reward.",
        "",
        "Keyword-named reward.",
    )
    with pytest.raises(TypeError, match="callable"):
        plugins.register_reward(3, "three")  # type: ignore[arg-type]


def test_replacing_a_registration_warns() -> None:
    def a(completion: str, reference: dict, outcome: dict) -> float:
        return 0.0

    def b(completion: str, reference: dict, outcome: dict) -> float:
        return 1.0

    plugins.register_reward(a, "dup")
    plugins.register_reward(a, "dup")  # the same object again: no warning
    with pytest.warns(UserWarning, match="reward 'dup': replacing"):
        plugins.register_reward(b, "dup")
    assert plugins.get_reward("dup") is b


def test_unknown_name_lists_valid_names_closest_match_and_how_to_add() -> None:
    plugins.register_env(EchoEnv)
    with pytest.raises(PluginError) as info:
        plugins.get_env("test_ecko")
    message = str(info.value)
    assert message.startswith("env 'test_ecko': unknown env → did you mean 'test_echo'? valid envs: ")
    assert "test_echo" in message.split("valid envs: ")[1]
    assert '[project.entry-points."rltk.envs"]' in message and "my_pkg.my_module:MyEnv" in message
    assert "register_env" in message
    assert isinstance(info.value, LookupError) and isinstance(info.value, ValueError)
    assert (info.value.kind, info.value.name, info.value.why) == ("env", "test_ecko", "unknown env")
    with pytest.raises(PluginError, match=r"reward 'zzz': unknown reward → valid rewards: .*rltk\.rewards"):
        plugins.get_reward("zzz")


def test_import_path_form(plugin_module: str) -> None:
    env_cls = plugins.get_env(f"{plugin_module}:CountEnv")
    env = env_cls()
    (task,) = env.tasks("train", 1)
    assert run_policy(env, task, env.oracle).outcome == {"correct": True}
    assert plugins.get_env(f"{plugin_module}:Nested.Inner").__name__ == "Inner"
    reward = plugins.get_reward(f"{plugin_module}:exact")
    assert reward("0", task.reference, {"correct": True}, bonus=0.5) == 1.5


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        (
            "reward",
            "rltk_test_broken:f",
            "cannot import module 'rltk_test_broken': ModuleNotFoundError: No module",
        ),
        (
            "env",
            "rltk_no_such_pkg.sub:Env",
            "cannot import module 'rltk_no_such_pkg.sub': ModuleNotFoundError",
        ),
        ("env", "rltk_test_plugins:CountEnvv", "has no attribute 'CountEnvv' → did you mean 'CountEnv'?"),
        ("env", "rltk_test_plugins:exact", "not an rltk.env.Env subclass"),
        ("env", "rltk.env:Env", "abstract class (missing check, oracle, tasks)"),
        ("reward", "rltk_test_plugins:NOT_CALLABLE", "not callable (int)"),
        ("reward", "rltk_test_plugins:", "malformed import path → write it as my_pkg.my_module:my_reward"),
    ],
)
def test_import_path_failures_say_what_went_wrong(
    plugin_module: str, kind: str, name: str, expected: str
) -> None:
    with pytest.raises(PluginError) as info:
        plugins.resolve(kind, name)
    assert str(info.value).startswith(f"{kind} {name!r}: ")
    assert expected in str(info.value)


@pytest.mark.usefixtures("entry_points")
def test_entry_points_are_discovered_and_a_broken_one_does_not_break_listing() -> None:
    envs, rewards = plugins.list_envs(), plugins.list_rewards()
    assert envs["count"] == "Say the number you were shown."
    assert envs["broken"].startswith(
        "failed to load: ModuleNotFoundError: No module named 'rltk_no_such_dependency'"
    )
    assert rewards["exact"] == "1 + bonus when the env judged the answer correct, else 0."
    assert rewards["missing_attr"].startswith("failed to load: AttributeError")
    assert plugins.get_env("count").__name__ == "CountEnv"
    with pytest.raises(
        PluginError, match=r"env 'broken': entry point 'rltk_test_broken:Thing' \(rltk.envs\) failed"
    ):
        plugins.get_env("broken")


@pytest.mark.usefixtures("entry_points")
def test_registry_wins_over_entry_points() -> None:
    plugins.register_env(EchoEnv, name="count")
    assert plugins.get_env("count") is EchoEnv
    assert plugins.list_envs()["count"] == "Echo the prompt back."


def test_installed_entry_points_include_those_in_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert set(declared["rltk.envs"]) <= set(plugins.list_envs())
    assert set(declared["rltk.rewards"]) <= set(plugins.list_rewards())


def test_resolve_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown plugin kind 'model'"):
        plugins.resolve("model", "x")


def test_importing_plugins_does_not_import_torch() -> None:
    code = "import sys, rltk.plugins; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
