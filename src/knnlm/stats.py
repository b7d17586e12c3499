"""Seeded bootstrap confidence intervals over independent units (tokens, positions, seeds).

Percentile bootstrap: draw ``n_boot`` resamples of the units with replacement, compute the statistic on each, and take
the (1 − level)/2 and (1 + level)/2 quantiles. The point estimate is the statistic on the original sample.

- :func:`bootstrap_ci`: one sample (a 1-D array, or rows of a 2-D array), e.g. a perplexity over tokens::

      bootstrap_ci(logp, lambda x: math.exp(-x.mean()), n_boot=1000, seed=0)

- :func:`block_bootstrap_ci`: a statistic of the *means* of several per-token arrays, resampling blocks of consecutive
  tokens (neighbouring tokens of a text are not independent): the projection's perplexities and shares and the memory's
  share of kNN's gain use it, so both studies' intervals resample alike. (The shares differ: the memory's is of the
  perplexity gain, the paper's 45%; the projection's of the log-perplexity gain, its Table 1 comparison.)
- :func:`hierarchical_bootstrap` (and :func:`paired_bootstrap` of differences): two levels, units (seeds) and items
  within each unit (test examples), optionally stratified: the over-specification study's intervals.
- :func:`paired_bootstrap_ci`: several arrays measured on the same units, resampled with the *same* indices (a paired
  design: LM, kNN-LM and projection scores of the same tokens), e.g. the share of kNN's gain recovered::

      paired_bootstrap_ci([lm, knn, proj], lambda a, b, c: (c.mean() - a.mean()) / (b.mean() - a.mean()))

Both are deterministic for a given ``seed`` (numpy ``default_rng``). Indices are drawn in chunks so memory stays
bounded for large samples. The statistic gets numpy arrays and must return a float; a non-finite value on a resample
(e.g. a ratio whose denominator resamples to 0) is kept, so an interval may be nan or ±inf: callers say "undefined".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import KnnlmError

BLOCK_TOKENS = 256  # the block of consecutive tokens a text's intervals resample (neighbours are not independent)
# A block-bootstrap interval over fewer blocks than this carries no verdict: 4 blocks give 35 distinct resamples and a
# percentile interval far narrower than the statistic's spread (SmolLM2's 1,000-token projections). Set on 2026-12-06
# after those intervals were seen; the verdicts they would give are kept beside (docs/results/cpu-2026-12-06).
MIN_BLOCKS = 10
# A percentile interval over this few seeds (or fewer) is the seeds' range: one seed drawn n times has probability n^-n,
# >= 2.5% for n <= 3, so the 95% interval's ends are the smallest and largest seed and "holds" means "every seed
# agrees" (a sign test at 1/8 for 3 seeds).
MAX_RANGE_SEEDS = 3
# The most resamples a --n_boot / --bootstrap flag may ask for: a 95% interval's ends settle long before (the defaults
# are 1,000 and 10,000), beyond it an interval takes minutes, and a mistyped 10**14 would fail allocating them only
# after the whole study ran.
MAX_RESAMPLES = 1_000_000
_CHUNK_ELEMENTS = 4_000_000  # index draws held at once (n_boot × n), about 32 MB of int64


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval [lo, hi] at ``level`` (e.g. 0.95) from ``n_boot`` resamples."""
    point: float
    lo: float
    hi: float
    level: float = 0.95
    n_boot: int = 0

    def as_dict(self) -> dict:
        return {"point": self.point, "lo": self.lo, "hi": self.hi, "level": self.level, "n_boot": self.n_boot}

    def fmt(self, digits: int = 2, sign: str = "") -> str:
        """'12.34 [12.01, 12.70]' (``sign="+"``: '+0.06 [-0.01, +0.12]')."""
        spec = f"{sign}.{digits}f"
        return f"{self.point:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        """The inverse of :meth:`as_dict` (a null end, how results.json stores a non-finite one, is read as NaN)."""
        end = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return cls(end(d["point"]), end(d["lo"]), end(d["hi"]), float(d.get("level", 0.95)), int(d.get("n_boot", 0)))

    @classmethod
    def exact(cls, value: float) -> "Interval":
        """A measured quantity with no sampling spread (a byte ratio): its interval is the point itself."""
        return cls(float(value), float(value), float(value), 0.95, 0)


def as_interval(d: dict) -> Interval:
    """An interval as results.json stores it, read through the one adapter for runs recorded before the one shape:
    {point, lo, hi, level}; overspec's {estimate, low, high, confidence}; hurdle's {mean, ci95: [lo, hi]}."""
    if "point" in d:
        return Interval.from_dict(d)
    if "estimate" in d:
        return Interval.from_dict({"point": d["estimate"], "lo": d["low"], "hi": d["high"],
                                   "level": d.get("confidence", 0.95), "n_boot": d.get("n_boot", 0)})
    return Interval.from_dict({"point": d["mean"], "lo": d["ci95"][0], "hi": d["ci95"][1]})


def bootstrap_samples(arrays: Sequence[np.ndarray], stat: Callable[..., float], n_boot: int = 1000,
                      seed: int = 0) -> np.ndarray:
    """``stat(*[a[idx] for a in arrays])`` for ``n_boot`` index draws shared by all arrays -> [n_boot] float64."""
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise KnnlmError("bootstrap: no arrays given")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise KnnlmError(f"bootstrap: paired arrays must have the same length, got {[len(a) for a in arrays]}")
    if n == 0:
        raise KnnlmError("bootstrap: empty sample")
    if n_boot < 1:
        raise KnnlmError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot, dtype=np.float64)
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    for lo in range(0, n_boot, per_chunk):
        idx = rng.integers(0, n, size=(min(per_chunk, n_boot - lo), n))  # [b, n]
        for j, row in enumerate(idx):
            out[lo + j] = float(stat(*(a[row] for a in arrays)))
    return out


def _interval(point: float, samples: np.ndarray, level: float) -> Interval:
    if not 0 < level < 1:
        raise KnnlmError(f"bootstrap: level must be in (0, 1), got {level}")
    if not np.isfinite(samples).all():
        return Interval(float(point), float("nan"), float("nan"), level, len(samples))
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(point), float(lo), float(hi), level, len(samples))


def bootstrap_ci(values, stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of ``stat(values)``, resampling the rows of ``values`` ([n] or [n, ...])."""
    values = np.asarray(values)
    samples = bootstrap_samples([values], stat, n_boot, seed)  # validates first (an empty sample has no statistic)
    return _interval(float(stat(values)), samples, level)


def paired_bootstrap_ci(arrays: Sequence, stat: Callable[..., float], n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of ``stat(*arrays)``, all arrays resampled with the same row indices."""
    arrays = [np.asarray(a) for a in arrays]
    samples = bootstrap_samples(arrays, stat, n_boot, seed)
    return _interval(float(stat(*arrays)), samples, level)


def share_of_gain(base: float, ref: float, other: float) -> float:
    """(other − base) / (ref − base): the share of the reference's gain over the base that ``other`` keeps (1 = all of
    it, 0 = none), for perplexities and mean log-probabilities alike; nan where the reference gains nothing."""
    return (other - base) / (ref - base) if ref != base else float("nan")


def too_few_seeds(n_seeds: int) -> str:
    """Why a percentile interval whose only resampling unit is the seed (the hurdle's), over ``n_seeds`` seeds, cannot
    be judged on ("" above :data:`MAX_RANGE_SEEDS`). A hierarchical interval (seeds, then examples) is not their range
    and is not gated by it."""
    if n_seeds > MAX_RANGE_SEEDS:
        return ""
    return (f"{n_seeds} seed(s): a 95% percentile interval over {MAX_RANGE_SEEDS} or fewer seeds is their range, "
            "too few to judge on")


def no_gain(ppl_base: Optional[float], ppl_ref: Optional[float], ref: str) -> str:
    """Why a share of ``ref``'s gain over the base cannot be judged ("" where ``ref``'s perplexity is below the base's):
    with no gain the ratio's sign turns over and "keeps more than a third of the gain" would read a loss as a keep."""
    if ppl_base is None or ppl_ref is None or ppl_ref < ppl_base:
        return ""
    return f"{ref} does not gain over the LM ({ppl_ref:.2f} >= {ppl_base:.2f}): a share of its gain has no meaning"


def too_few_blocks(n_tokens: Optional[int], block: int = BLOCK_TOKENS) -> str:
    """Why a block-bootstrap interval over ``n_tokens`` cannot be judged on ("" with >= MIN_BLOCKS blocks, or when the
    count is unknown)."""
    if not n_tokens:
        return ""
    n = math.ceil(n_tokens / block)
    return "" if n >= MIN_BLOCKS else \
        f"{n} block(s) of {block} tokens: too few (< {MIN_BLOCKS}) for a block-bootstrap interval to judge on"


def block_bootstrap_ci(arrays: Sequence, stat_of_means: Callable[..., float], block: int = BLOCK_TOKENS,
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of ``stat_of_means(*[mean of each array])`` over per-token arrays ([n] each, paired:
    the same tokens), resampling blocks of ``block`` consecutive tokens with replacement (the last block may be
    shorter; a resample's means weigh every drawn token equally)."""
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(arrays[0]) if arrays else 0
    if not arrays or any(len(a) != n for a in arrays):
        raise KnnlmError(f"bootstrap: paired arrays must have the same length, got {[len(a) for a in arrays]}")
    if n == 0:
        raise KnnlmError("bootstrap: empty sample")
    unit = np.arange(n) // block
    n_units = int(unit[-1]) + 1
    counts = np.bincount(unit, minlength=n_units).astype(np.float64)  # [U]
    sums = [np.bincount(unit, weights=a, minlength=n_units) for a in arrays]  # [U] each

    def stat(idx: np.ndarray) -> float:
        total = counts[idx].sum()
        return float(stat_of_means(*(s[idx].sum() / total for s in sums)))

    samples = bootstrap_samples([np.arange(n_units)], stat, n_boot, seed)
    return _interval(stat(np.arange(n_units)), samples, level)


def hierarchical_bootstrap(values: Sequence[Sequence[float]], strata: Optional[Sequence[Sequence]] = None,
                           n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean over units of the mean over strata of each stratum's mean.

    ``values``: one sequence of item values per unit (e.g. per seed: the per-example differences kNN - vanilla);
    units may hold different numbers of items. ``strata``: per unit, a label per item (e.g. the number of children);
    None = one stratum. Each replicate draws units with replacement and, independently for every drawn unit, its items
    with replacement within each stratum (so every stratum keeps its size). With one unit only the items are resampled.

    The point is the statistic on the data as given (the over-specification study's "Average": the mean of the group
    means, averaged over seeds). Deterministic for a given ``seed``.
    """
    if not values or any(len(v) == 0 for v in values):
        raise ValueError("hierarchical_bootstrap: need at least one unit, each with at least one item")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("hierarchical_bootstrap: need 0 < level < 1 and n_boot >= 1")
    rng = np.random.default_rng(seed)
    units = [np.asarray(v, dtype=float) for v in values]
    labels = [np.zeros(len(u), dtype=int) if strata is None else np.asarray(s) for u, s in
              zip(units, strata if strata is not None else [None] * len(units))]
    n_units = len(units)
    # per unit: the statistic on the data ([]) and on n_boot x n_units independent item resamples ([B, U])
    point = np.empty(n_units)
    resampled = np.empty((n_units, n_boot, n_units))
    for u, (vals, lab) in enumerate(zip(units, labels)):
        if len(lab) != len(vals):
            raise ValueError(f"hierarchical_bootstrap: unit {u} has {len(vals)} values but {len(lab)} stratum labels")
        groups = [vals[lab == g] for g in np.unique(lab)]
        point[u] = np.mean([g.mean() for g in groups])
        means = np.zeros((n_boot, n_units))
        for g in groups:
            idx = rng.integers(0, len(g), size=(n_boot, n_units, len(g)))  # [B, U, n_g]
            means += g[idx].mean(axis=2)
        resampled[u] = means / len(groups)
    pick = rng.integers(0, n_units, size=(n_boot, n_units)) if n_units > 1 else np.zeros((n_boot, 1), dtype=int)
    # replicate b, slot j: unit pick[b, j] with its own item resample (b, j)
    reps = resampled[pick, np.arange(n_boot)[:, None], np.arange(n_units)[None, :]].mean(axis=1)  # [B]
    return _interval(float(point.mean()), reps, level)


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                     strata: Optional[Sequence[Sequence]] = None, **kw) -> Interval:
    """:func:`hierarchical_bootstrap` of the paired differences ``a - b`` (per unit, item by item)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("paired_bootstrap: a and b must have the same units and items")
    return hierarchical_bootstrap([np.asarray(x, float) - np.asarray(y, float) for x, y in zip(a, b)], strata, **kw)
