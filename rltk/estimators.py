"""Estimators of the proof report: pass@k, pass^k and paired bootstrap intervals.

From ``n`` samples of a task of which ``c`` are right:

- pass@k, the chance that at least one of k samples is right, estimated without bias as
  ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021, "Evaluating Large Language Models Trained on Code");
- pass^k, the chance that all k of k samples are right (reliability, as in tau-bench), estimated without
  bias as ``C(c, k) / C(n, k)``.

Both are averaged over tasks. Differences between two policies on the same tasks get a paired bootstrap
interval: tasks are resampled with replacement, the same resample for both policies, so the interval covers
the noise of drawing these tasks (and the policies' sampling), not the noise of training (one training seed
per model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task: at least one of ``k`` samples right, given ``c`` right of ``n``.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 1, 4)
    (0.25, 0.5, 0.0, 1.0)
    """
    _check(n, c, k)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    """Unbiased pass^k of one task: all ``k`` of k samples right, given ``c`` right of ``n``.

    >>> pass_hat_k(4, 2, 1), pass_hat_k(4, 2, 2), pass_hat_k(4, 4, 4), pass_hat_k(4, 3, 4)
    (0.5, 0.16666666666666666, 1.0, 0.0)
    """
    _check(n, c, k)
    return math.comb(c, k) / math.comb(n, k)


def _check(n: int, c: int, k: int) -> None:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")


def ks(n: int) -> list[int]:
    """The k of a curve over ``n`` samples: powers of two up to ``n``, and ``n``.

    >>> ks(8), ks(6), ks(1)
    ([1, 2, 4, 8], [1, 2, 4, 6], [1])
    """
    out = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return out if out[-1] == n else [*out, n]


def curve(n: int, correct_counts: Sequence[int]) -> dict[str, dict[int, float]]:
    """pass@k and pass^k averaged over tasks, for every k of :func:`ks`.

    >>> curve(2, [0, 1, 2])
    {'pass_at_k': {1: 0.5, 2: 0.6666666666666666}, 'pass_hat_k': {1: 0.5, 2: 0.3333333333333333}}
    """
    tasks = max(1, len(correct_counts))
    return {
        "pass_at_k": {k: sum(pass_at_k(n, c, k) for c in correct_counts) / tasks for k in ks(n)},
        "pass_hat_k": {k: sum(pass_hat_k(n, c, k) for c in correct_counts) / tasks for k in ks(n)},
    }


def _resamples(n_tasks: int, seed: int, resamples: int) -> np.ndarray:  # [resamples, n_tasks]
    return np.random.default_rng(seed).integers(0, n_tasks, size=(resamples, n_tasks))


def bootstrap_mean(
    values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float, float]:
    """Mean of per-task ``values`` with its percentile bootstrap 95% interval: ``(mean, low, high)``.

    >>> bootstrap_mean([1.0, 1.0, 1.0])
    (1.0, 1.0, 1.0)
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    means = x[_resamples(x.size, seed, resamples)].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(x.mean()), float(low), float(high))


def paired_difference(
    a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same tasks, with a paired bootstrap 95% interval: ``(diff, low, high)``.

    ``a[i]`` and ``b[i]`` are two policies' scores on task ``i``; both are resampled with the same draws.

    >>> paired_difference([1, 1, 0, 1], [1, 1, 0, 1])
    (0.0, 0.0, 0.0)
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same tasks; got {len(a)} and {len(b)}")
    return bootstrap_mean(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), seed, resamples)
