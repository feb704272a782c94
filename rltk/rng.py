"""RNG states: this process's (python, numpy, torch CPU, CUDA), every rank's, and restoring them.

Checkpoints store one file per rank (``rng-rank{r}.pt``, :mod:`rltk.checkpoint`); a run resumed with the same
world size can put each rank's generators back where they were.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Return this process's RNG states (python, numpy, torch CPU, every CUDA device)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, indexed by rank; a collective when torch.distributed is initialized."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(path: str | Path, rank: int = 0) -> bool:
    """Restore this process's RNG states from ``rng-rank{rank}.pt``; False (with a warning) if absent."""
    file = Path(path) / f"rng-rank{rank}.pt"
    if not file.is_file():
        logger.warning("%s has no RNG state for rank %d (world size changed?); RNG not restored", path, rank)
        return False
    state = torch.load(file, weights_only=True)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    return True
