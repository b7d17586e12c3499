"""The over-specification study's bootstrap intervals (knnlm.stats.hierarchical_bootstrap) on constructed cases, and
its claims on constructed result tables: each verdict from its interval, "not judged" where the model did not fit."""
from __future__ import annotations

import math

import numpy as np
import pytest

from knnlm.experiments.overspec.report import FIT_MARGIN_NATS, overspec_claims
from knnlm.stats import hierarchical_bootstrap, paired_bootstrap


def test_constant_differences_give_a_point_interval():
    a = [[1.5, 2.0, 0.5], [0.0, 3.0, 1.0]]
    b = [[x - 0.7 for x in row] for row in a]  # every pair differs by exactly 0.7
    ci = paired_bootstrap(a, b, n_boot=500)
    assert ci.point == pytest.approx(0.7) and ci.lo == pytest.approx(0.7) and ci.hi == pytest.approx(0.7)


def test_one_unit_matches_the_normal_interval_of_a_mean():
    """One seed, 2,000 examples from N(0.3, 1): the percentile interval is mean ± 1.96 sd / sqrt(n) (to bootstrap
    noise), and covers the true mean."""
    x = np.random.default_rng(1).normal(0.3, 1.0, 2000)
    ci = hierarchical_bootstrap([x], n_boot=4000, seed=3)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert ci.point == pytest.approx(x.mean())
    assert ci.lo == pytest.approx(x.mean() - half, abs=0.006)
    assert ci.hi == pytest.approx(x.mean() + half, abs=0.006)
    assert ci.lo < 0.3 < ci.hi


def test_seeds_are_resampled():
    """Two seeds, no spread within a seed (all 0 / all 1): a replicate's mean is 0, 0.5 or 1 with probabilities
    1/4, 1/2, 1/4, so the 95% interval is exactly [0, 1]; a single such seed gives a point interval."""
    ci = hierarchical_bootstrap([[0.0] * 10, [1.0] * 10], n_boot=4000)
    assert ci.point == 0.5 and ci.lo == 0.0 and ci.hi == 1.0
    assert hierarchical_bootstrap([[1.0] * 10], n_boot=100).lo == 1.0


def test_strata_weigh_groups_equally_and_keep_their_sizes():
    """1 example of value 1 with one child, 9 of value 0 with five: the statistic is the mean of the group means
    (0.5, not 0.1), and since each group is resampled within itself (sizes kept) it has no spread."""
    values, strata = [1.0] + [0.0] * 9, [1] + [5] * 9
    ci = hierarchical_bootstrap([values], [strata], n_boot=1000)
    assert ci.point == 0.5 and ci.lo == 0.5 and ci.hi == 0.5
    plain = hierarchical_bootstrap([values], n_boot=1000)  # unstratified: the example mean, with spread
    assert plain.point == pytest.approx(0.1) and plain.lo < 0.1 < plain.hi


def test_bad_input():
    with pytest.raises(ValueError, match="^hierarchical_bootstrap: need at least one unit"):
        hierarchical_bootstrap([])
    with pytest.raises(ValueError, match="^hierarchical_bootstrap: unit 0 has 2 values but 1 stratum labels$"):
        hierarchical_bootstrap([[1.0, 2.0]], [[1]])
    with pytest.raises(ValueError, match="^paired_bootstrap: a and b must have the same units and items$"):
        paired_bootstrap([[1.0]], [[1.0, 2.0]])


# ---------------------------------------------------------------------------------------------------------------- claims
def _ci(lo, hi):
    return {"point": (lo + hi) / 2, "lo": lo, "hi": hi, "level": 0.95}


def _metrics(train_lm=-1.0, fit=-0.7, bare=(0.5, 1.5), knn=(0.2, 0.8), mlp_knn=(-0.1, 0.3), gap=(0.6, 0.9)):
    m = {"final": {"step": 8, "train": {"lm": {"avg_groups": train_lm}}}, "optimum_fit": {"avg_groups": fit},
         "methods": ["lm", "knn", "mlp"],
         "intervals": {"test": {"knn_minus_lm": _ci(*knn), "mlp_minus_knn": _ci(*mlp_knn), "lm_gap_to_optimum": _ci(*gap)}}}
    if bare is not None:
        m["intervals"]["test"]["bare_minus_lm"] = _ci(*bare)
    return m


def _verdicts(m):
    return [c.verdict for c in overspec_claims(m, "t")]


def test_claims_from_their_intervals():
    assert _verdicts(_metrics()) == ["holds", "holds", "inconclusive", "holds"]
    assert _verdicts(_metrics(knn=(-0.06, 0.06), mlp_knn=(-0.5, -0.1), gap=(0.1, 0.4))) == [
        "holds", "inconclusive", "does not hold", "does not hold"]
    # the recorded shape before the one interval shape reads the same
    old = _metrics()
    old["intervals"]["test"]["knn_minus_lm"] = {"estimate": 0.5, "low": 0.2, "high": 0.8, "confidence": 0.95}
    assert _verdicts(old) == _verdicts(_metrics())


def test_not_judged_without_a_fit_or_a_measurement():
    assert _verdicts(_metrics(train_lm=-0.7 - FIT_MARGIN_NATS)) == _verdicts(_metrics())  # at the margin: fits
    unfit = overspec_claims(_metrics(train_lm=-0.7 - FIT_MARGIN_NATS - 0.01), "t")
    assert {c.verdict for c in unfit} == {"not judged"} and "did not fit" in unfit[0].reason
    no_bare = overspec_claims(_metrics(bare=None), "t")
    assert no_bare[0].verdict == "not judged" and "no bare-trained" in no_bare[0].reason
    m = _metrics()
    del m["final"]["train"]
    assert "--train_eval_per_pair" in overspec_claims(m, "t")[1].reason
