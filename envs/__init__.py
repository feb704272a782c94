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
