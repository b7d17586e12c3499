"""The over-specification study's bootstrap intervals on constructed cases, and its verdict on constructed result
tables (each failing condition named)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from knnlm.experiments.overspec_stats import (FIT_MARGIN_NATS, hierarchical_bootstrap, overspec_verdict,
                                              paired_bootstrap)


def test_constant_differences_give_a_point_interval():
    a = [[1.5, 2.0, 0.5], [0.0, 3.0, 1.0]]
    b = [[x - 0.7 for x in row] for row in a]  # every pair differs by exactly 0.7
    ci = paired_bootstrap(a, b, n_boot=500)
    assert ci["estimate"] == pytest.approx(0.7) and ci["low"] == pytest.approx(0.7) and ci["high"] == pytest.approx(0.7)
    assert ci["n_units"] == 2 and ci["n_items"] == 6


def test_one_unit_matches_the_normal_interval_of_a_mean():
    """One seed, 2,000 examples from N(0.3, 1): the percentile interval is mean ± 1.96 sd / sqrt(n) (to bootstrap
    noise), and covers the true mean."""
    x = np.random.default_rng(1).normal(0.3, 1.0, 2000)
    ci = hierarchical_bootstrap([x], n_boot=4000, seed=3)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert ci["estimate"] == pytest.approx(x.mean())
    assert ci["low"] == pytest.approx(x.mean() - half, abs=0.006)
    assert ci["high"] == pytest.approx(x.mean() + half, abs=0.006)
    assert ci["low"] < 0.3 < ci["high"]


def test_seeds_are_resampled():
    """Two seeds, no spread within a seed (all 0 / all 1): a replicate's mean is 0, 0.5 or 1 with probabilities
    1/4, 1/2, 1/4, so the 95% interval is exactly [0, 1]; a single such seed gives a point interval."""
    ci = hierarchical_bootstrap([[0.0] * 10, [1.0] * 10], n_boot=4000)
    assert ci["estimate"] == 0.5 and ci["low"] == 0.0 and ci["high"] == 1.0
    assert hierarchical_bootstrap([[1.0] * 10], n_boot=100)["low"] == 1.0


def test_strata_weigh_groups_equally_and_keep_their_sizes():
    """1 example of value 1 with one child, 9 of value 0 with five: the statistic is the mean of the group means
    (0.5, not 0.1), and since each group is resampled within itself (sizes kept) it has no spread."""
    values, strata = [1.0] + [0.0] * 9, [1] + [5] * 9
    ci = hierarchical_bootstrap([values], [strata], n_boot=1000)
    assert ci["estimate"] == 0.5 and ci["low"] == 0.5 and ci["high"] == 0.5
    plain = hierarchical_bootstrap([values], n_boot=1000)  # unstratified: the example mean, with spread
    assert plain["estimate"] == pytest.approx(0.1) and plain["low"] < 0.1 < plain["high"]


def test_bad_input():
    with pytest.raises(ValueError):
        hierarchical_bootstrap([])
    with pytest.raises(ValueError):
        hierarchical_bootstrap([[1.0, 2.0]], [[1]])
    with pytest.raises(ValueError):
        paired_bootstrap([[1.0]], [[1.0, 2.0]])


# ---------------------------------------------------------------------------------------------------------------- verdict
def _ci(low, high):
    return {"estimate": (low + high) / 2, "low": low, "high": high, "confidence": 0.95}


def _metrics(train_lm=-1.0, fit=-0.7, bare=(0.5, 1.5), knn=(0.2, 0.8)):
    m = {"final": {"train": {"lm": {"avg_groups": train_lm}}}, "optimum_fit": {"avg_groups": fit},
         "intervals": {"test": {"knn_minus_lm": _ci(*knn)}}}
    if bare is not None:
        m["intervals"]["test"]["bare_minus_lm"] = _ci(*bare)
    return m


def test_verdict_all_conditions_hold():
    v = overspec_verdict(_metrics())
    assert v["shown"] and v["failed"] == [] and [c["ok"] for c in v["conditions"]] == [True] * 3


@pytest.mark.parametrize("kw,failed", [
    ({"train_lm": -0.7 - FIT_MARGIN_NATS - 0.01}, ["fits-training-data"]),
    ({"bare": (-0.1, 0.6)}, ["bare-reference-closer"]),
    ({"knn": (-0.05, 0.3)}, ["knn-beats-vanilla"]),
    ({"bare": None}, ["bare-reference-closer"]),
    ({"train_lm": -3.0, "knn": (-1.0, -0.5)}, ["fits-training-data", "knn-beats-vanilla"]),
])
def test_verdict_names_each_failing_condition(kw, failed):
    v = overspec_verdict(_metrics(**kw))
    assert not v["shown"] and v["failed"] == failed
    for c in v["conditions"]:
        assert c["ok"] == (c["name"] not in failed) and c["detail"]
    if kw.get("bare", ()) is None:
        assert "--bare_reference true" in v["conditions"][1]["detail"]


def test_verdict_at_the_margin_and_without_a_training_split():
    assert overspec_verdict(_metrics(train_lm=-0.7 - FIT_MARGIN_NATS))["shown"]  # exactly at the margin: fits
    m = _metrics()
    del m["final"]["train"]
    v = overspec_verdict(m)
    assert v["failed"] == ["fits-training-data"] and "--train_eval_per_pair" in v["conditions"][0]["detail"]
