"""Uncertainty and verdicts of the over-specification study (issue 17).

:func:`hierarchical_bootstrap` is a small generic percentile bootstrap over *units* (seeds) and, within each unit, over
*items* (test examples), optionally stratified (by number of children), for a paired statistic: pass per-item
differences ``a - b`` computed on the same items, so that the pairing is kept in every replicate. The statistic is
the mean over units of the mean over strata of the stratum means: exactly how the study's "Average" column (the mean
of the group means, averaged over seeds) is computed, so the interval belongs to the number the tables print.

:func:`overspec_verdict` applies the three conditions (fixed before any run, docs/overspec.md) under which
``knnlm reproduce`` calls over-specification shown:

(a) the vanilla model fits its training sentences: at the last step its training-split average (mean of the group
    means, mean over seeds) is within ``FIT_MARGIN_NATS`` of the training optimum (the log-likelihood of a model that
    reproduces the empirical distribution of its training sentences exactly);
(b) the model trained on the bare sentences (same model, budget and seed) gets clearly closer to log(1/n) on the test
    sentences than the over-specified model: the bootstrap interval of (bare - vanilla) lies above 0;
(c) the bootstrap interval of (kNN - vanilla) on the test sentences lies above 0.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# Condition (a): a model "fits" its training sentences when its training-split average is within this many nats of the
# training optimum. Fixed before any run (issue 17); a model at chance on 30 children is ~2.5 nats away.
FIT_MARGIN_NATS = 0.5
CONFIDENCE = 0.95
N_BOOT = 10000


def hierarchical_bootstrap(values: Sequence[Sequence[float]], strata: Optional[Sequence[Sequence]] = None,
                           n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Percentile bootstrap interval of the mean over units of the mean over strata of each stratum's mean.

    ``values``: one sequence of item values per unit (e.g. per seed: the per-example differences kNN - vanilla);
    units may hold different numbers of items. ``strata``: per unit, a label per item (e.g. the number of children);
    None = one stratum. Each replicate draws units with replacement and, independently for every drawn unit, its items
    with replacement within each stratum (so every stratum keeps its size). With one unit only the items are resampled.

    Returns ``{"estimate", "low", "high", "confidence", "n_boot", "n_units", "n_items"}``; ``estimate`` is the
    statistic on the data as given. Deterministic for a given ``seed``.
    """
    if not values or any(len(v) == 0 for v in values):
        raise ValueError("hierarchical_bootstrap: need at least one unit, each with at least one item")
    if not 0 < confidence < 1 or n_boot < 1:
        raise ValueError("hierarchical_bootstrap: need 0 < confidence < 1 and n_boot >= 1")
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
    alpha = (1 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return {"estimate": float(point.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "n_boot": n_boot, "n_units": n_units, "n_items": int(sum(len(u) for u in units))}


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                     strata: Optional[Sequence[Sequence]] = None, **kw) -> dict:
    """:func:`hierarchical_bootstrap` of the paired differences ``a - b`` (per unit, item by item)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("paired_bootstrap: a and b must have the same units and items")
    return hierarchical_bootstrap([np.asarray(x, float) - np.asarray(y, float) for x, y in zip(a, b)], strata, **kw)


# ---------------------------------------------------------------------------------------------------------------- verdict
def _fmt(ci: dict) -> str:
    return f"{ci['estimate']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"


def overspec_verdict(metrics: dict, fit_margin: float = FIT_MARGIN_NATS) -> dict:
    """The three conditions of the module docstring on an overspec ``results.json`` ``metrics`` dict.

    Returns ``{"shown": bool, "conditions": [{"name", "ok", "detail"}, ...], "failed": [names]}``; a condition whose
    measurement is missing (no training split, no bare-trained reference, no interval) counts as failed and says so.
    """
    final = metrics.get("final", {})
    intervals = metrics.get("intervals", {}).get("test", {})
    conditions = []

    train = final.get("train")
    if train and train.get("lm") and "optimum_fit" in metrics:
        van, opt = train["lm"]["avg_groups"], metrics["optimum_fit"]["avg_groups"]
        ok = van >= opt - fit_margin
        detail = (f"training-split vanilla average {van:.2f} vs training optimum {opt:.2f} (gap {opt - van:.2f} nats; "
                  f"fits when within {fit_margin:.2f})")
    else:
        ok, detail = False, "no training-split score in the results (rerun with --train_eval_per_pair 1)"
    conditions.append({"name": "fits-training-data", "ok": ok, "detail": detail})

    ci = intervals.get("bare_minus_lm")
    if ci:
        ok = ci["low"] > 0
        detail = (f"bare-trained - over-specified vanilla on the test sentences: {_fmt(ci)} nats "
                  f"({100 * ci['confidence']:.0f}% interval; shown when above 0)")
    else:
        ok, detail = False, "no bare-trained reference in the results (rerun with --bare_reference true)"
    conditions.append({"name": "bare-reference-closer", "ok": ok, "detail": detail})

    ci = intervals.get("knn_minus_lm")
    if ci:
        ok = ci["low"] > 0
        detail = f"kNN - vanilla on the test sentences: {_fmt(ci)} nats ({100 * ci['confidence']:.0f}% interval)"
    else:
        ok, detail = False, "no kNN - vanilla interval in the results"
    conditions.append({"name": "knn-beats-vanilla", "ok": ok, "detail": detail})
    failed = [c["name"] for c in conditions if not c["ok"]]
    return {"shown": not failed, "conditions": conditions, "failed": failed}
