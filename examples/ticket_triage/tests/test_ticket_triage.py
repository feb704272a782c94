"""The ticket_triage env passes the env contract (``rltk envs check ticket_triage``)."""

from __future__ import annotations

from ticket_triage.env import TicketTriageEnv

from rltk.envcheck import format_results, run_checks
from rltk.plugins import get_env, list_envs


def test_listed_under_its_name() -> None:
    """Installed (pip install -e .), the env and its reward are found by name."""
    assert get_env("ticket_triage") is TicketTriageEnv
    assert "ticket_triage" in list_envs()


def test_env_contract() -> None:
    """What rltk envs check ticket_triage runs: splits, determinism, oracle, verdict, rewards, canaries."""
    results = run_checks("ticket_triage", {}, n=200)
    assert not [r for r in results if r.status == "fail"], format_results("ticket_triage", results)
