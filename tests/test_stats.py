"""Bootstrap intervals (knnlm.stats): contain the point estimate, narrow with more units, match the normal theory for a
mean, are seeded, and the paired variant resamples all arrays with the same indices."""
import math

import numpy as np
import pytest

from knnlm.errors import KnnlmError
from knnlm.stats import bootstrap_ci, bootstrap_samples, paired_bootstrap_ci


def _ppl(logp):
    return math.exp(-float(np.mean(logp)))


def test_interval_contains_point_and_narrows_with_more_positions():
    rng = np.random.default_rng(0)
    logp = rng.normal(-3.0, 1.5, size=4000)
    widths = []
    for n in (100, 400, 1600, 4000):
        ci = bootstrap_ci(logp[:n], _ppl, n_boot=500, seed=1)
        assert ci.point == pytest.approx(_ppl(logp[:n]))
        assert ci.lo < ci.point < ci.hi
        widths.append(ci.hi - ci.lo)
    assert widths == sorted(widths, reverse=True)
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.3)  # 16x the positions: ~1/4 the width


def test_mean_interval_matches_normal_theory():
    x = np.random.default_rng(2).normal(0.0, 2.0, size=2500)
    ci = bootstrap_ci(x, np.mean, n_boot=2000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))  # 0.0784
    assert (ci.hi - ci.lo) / 2 == pytest.approx(half, rel=0.1)
    assert (ci.lo + ci.hi) / 2 == pytest.approx(x.mean(), abs=0.2 * half)


def test_seeded_constant_and_bad_input():
    x = np.arange(50.0)
    a, b = bootstrap_ci(x, np.mean, n_boot=200, seed=7), bootstrap_ci(x, np.mean, n_boot=200, seed=7)
    assert a == b and bootstrap_ci(x, np.mean, n_boot=200, seed=8) != a
    c = bootstrap_ci(np.full(30, 2.5), np.mean, n_boot=100)
    assert (c.point, c.lo, c.hi) == (2.5, 2.5, 2.5)
    assert c.as_dict() == {"point": 2.5, "lo": 2.5, "hi": 2.5, "level": 0.95, "n_boot": 100}
    assert c.fmt(1) == "2.5 [2.5, 2.5]"
    with pytest.raises(KnnlmError, match="empty"):
        bootstrap_ci(np.array([]), np.mean)
    with pytest.raises(KnnlmError, match="same length"):
        paired_bootstrap_ci([np.ones(3), np.ones(4)], lambda a, b: 0.0)


def test_paired_uses_the_same_indices():
    rng = np.random.default_rng(3)
    a = rng.normal(size=300)
    b = a + 0.01  # perfectly paired: the difference of means is 0.01 on every resample
    ci = paired_bootstrap_ci([a, b], lambda x, y: float(np.mean(y) - np.mean(x)), n_boot=300, seed=0)
    assert ci.lo == pytest.approx(0.01) and ci.hi == pytest.approx(0.01)
    # one array, paired or not, gives the same draws
    single = bootstrap_samples([a], np.mean, n_boot=50, seed=4)
    assert np.array_equal(single, paired_bootstrap_samples_first(a))
    # a ratio whose denominator can vanish gives an undefined (nan) interval, not an error
    z = np.array([0.0, 0.0, 1.0])
    undefined = paired_bootstrap_ci([z, z], lambda x, y: float(np.mean(x) / np.mean(y)) if np.mean(y) else float("nan"),
                                    n_boot=200, seed=0)
    assert math.isnan(undefined.lo) and math.isnan(undefined.hi)


def paired_bootstrap_samples_first(a):
    return bootstrap_samples([a, a * 2], lambda x, y: float(np.mean(x)), n_boot=50, seed=4)
