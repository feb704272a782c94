"""rltk's shipped environments, installed as ``rltk_envs`` (entry points ``rltk.envs``)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any


@cache
def data(name: str) -> dict[str, Any]:
    """The bulk data of env ``name`` (``envs/data/<name>.json``), read once per process; do not mutate it."""
    return json.loads((Path(__file__).parent / "data" / f"{name}.json").read_text())


def money(cents: int, always_cents: bool = True) -> str:
    """Dollars as the envs write them: ``$1,049.99``; ``$1,000`` for whole dollars unless ``always_cents``.

    >>> money(104999), money(100000), money(100000, always_cents=False)
    ('$1,049.99', '$1,000.00', '$1,000')
    """
    dollars = f"${cents // 100:,}"
    return dollars if (cents % 100 == 0 and not always_cents) else f"{dollars}.{cents % 100:02d}"
