"""A generic percentile bootstrap (local to the hurdle and MLP-memory studies until ``knnlm.stats`` lands)."""
from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_interval(n_units: int, statistic: Callable[[np.ndarray], float], n_resamples: int = 10000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``statistic(idx)`` over resamples ``idx`` ([n_units] unit indices drawn with replacement).

    The units are what is independent: seeds for the hurdle areas, blocks of validation tokens for perplexities.
    """
    rng = np.random.default_rng(seed)
    stats = np.asarray([statistic(rng.integers(0, n_units, n_units)) for _ in range(n_resamples)], dtype=float)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)
