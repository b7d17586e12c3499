"""Claims (knnlm.claims): the verdict from the interval, threshold and direction alone; "not judged" and lower bounds
from the setting; records round-trip; and the block bootstrap (knnlm.stats) the studies' intervals come from."""
import math

import numpy as np
import pytest

from knnlm.claims import (FAILS, HOLDS, INCONCLUSIVE, NOT_CONVERGED, NOT_JUDGED, Claim, check_record, claims_table,
                          from_record, judge)
from knnlm.stats import Interval, block_bootstrap_ci, bootstrap_ci


def _i(lo, hi, point=None):
    return Interval((lo + hi) / 2 if point is None else point, lo, hi)


@pytest.mark.parametrize("lo, hi, above, below", [
    (0.91, 0.99, HOLDS, FAILS), (0.85, 0.95, INCONCLUSIVE, INCONCLUSIVE), (0.5, 0.89, FAILS, HOLDS),
    (0.9, 0.95, INCONCLUSIVE, INCONCLUSIVE),  # touching the threshold is not "wholly on one side"
    (float("nan"), float("nan"), INCONCLUSIVE, INCONCLUSIVE), (-math.inf, 2.0, INCONCLUSIVE, INCONCLUSIVE)])
def test_judge_from_the_interval_only(lo, hi, above, below):
    assert judge(_i(lo, hi), 0.9, "above") == above and judge(_i(lo, hi), 0.9, "below") == below


def test_a_point_estimate_past_the_threshold_does_not_decide():
    # the defect this replaces: 64% [-291%, 389%] of kNN's gain read as "holds" against a third
    assert judge(Interval(0.64, -2.91, 3.89), 1 / 3, "above") == INCONCLUSIVE
    assert judge(Interval(0.0, -0.06, 0.06), 0.0, "above") == INCONCLUSIVE


def test_not_judged_and_lower_bounds():
    c = Claim("memory keeps a third", "other text", "share", _i(0.5, 0.9), 1 / 3, "above", not_judged="other text")
    assert c.verdict == NOT_JUDGED and c.reason == "other text"
    lb = dict(statistic="share", threshold=0.9, lower_bound="62% of positions still improving at their last step")
    assert Claim("reaches", "s", interval=_i(0.95, 0.99), direction="above", **lb).verdict == HOLDS  # a bound above holds
    assert Claim("reaches", "s", interval=_i(0.2, 0.5), direction="above", **lb).verdict == NOT_CONVERGED
    assert Claim("reaches", "s", interval=_i(0.8, 0.95), direction="above", **lb).verdict == NOT_CONVERGED
    assert Claim("small", "s", interval=_i(0.95, 0.99), direction="below", **lb).verdict == FAILS  # already too big
    assert Claim("small", "s", interval=_i(0.1, 0.2), direction="below", **lb).verdict == NOT_CONVERGED
    both = Claim("reaches", "s", interval=_i(0.2, 0.5), direction="above", not_judged="4 blocks", **lb)
    assert both.verdict == NOT_JUDGED and both.reason == "4 blocks; " + lb["lower_bound"]  # both facts are said
    again = from_record(both.record())
    assert again.verdict == NOT_JUDGED and again.reason == both.reason and again.row() == both.row()


def test_records_round_trip_and_are_checked():
    claims = [Claim("kNN beats vanilla", "tiny, 5 seeds", "kNN − vanilla (nats)", Interval(0.0, -0.06, 0.06), 0.0,
                    "above"),
              Claim("reaches", "s", "share", _i(0.2, 0.5), 0.9, "above", lower_bound="not converged"),
              Claim("keeps", "s", "share", _i(0.5, 0.9), 1 / 3, "above", not_judged="other text")]
    for c in claims:
        rec = c.record()
        assert set(rec) >= {"claim", "setting", "statistic", "interval", "threshold", "direction", "verdict", "reason"}
        assert set(rec["interval"]) == {"point", "lo", "hi", "level"}
        check_record(rec)
        assert from_record(rec) == c
    bad = {**claims[0].record(), "verdict": HOLDS}
    with pytest.raises(AssertionError, match="derived 'inconclusive'"):
        check_record(bad)
    table = claims_table(claims)
    assert "| kNN beats vanilla | tiny, 5 seeds | 95% CI > 0 | kNN − vanilla (nats): +0.00 [-0.06, +0.06] | inconclusive |" in table
    assert "| share: 0.35 [0.20, 0.50] | inconclusive (not converged) — not converged |" in table
    assert "| 95% CI > 0.333 | share: 0.70 [0.50, 0.90] | not judged — other text |" in table
    undefined = Claim("c", "s", "share", Interval(0.84, float("nan"), float("nan")), 0.5, "below", not_judged="no CI")
    assert undefined.row()[3:] == ["share: 0.84 (no interval)", "not judged — no CI"]


def test_block_bootstrap_means_and_blocks():
    rng = np.random.default_rng(0)
    a = rng.normal(size=1000)
    ci = block_bootstrap_ci([a, a + 1.0], lambda x, y: y - x, block=50, n_boot=200)
    assert (ci.point, ci.lo, ci.hi) == pytest.approx((1.0, 1.0, 1.0))  # paired: every resample's difference is 1
    one = block_bootstrap_ci([a], lambda m: m, block=1, n_boot=300, seed=3)
    assert one.point == pytest.approx(a.mean()) and one.lo < a.mean() < one.hi
    # the same draws as a bootstrap over the block indices (the memory study's former code path)
    sums, counts = np.add.reduceat(a, np.arange(0, 1000, 64)), np.diff(np.r_[np.arange(0, 1000, 64), 1000])
    by_index = bootstrap_ci(np.arange(len(sums)), lambda idx: sums[idx].sum() / counts[idx].sum(), 300, seed=5)
    lo, hi = by_index.lo, by_index.hi
    ci = block_bootstrap_ci([a], lambda m: m, block=64, n_boot=300, seed=5)
    assert (ci.lo, ci.hi) == pytest.approx((lo, hi))
    # correlated neighbours: blocks see the spread that independent tokens hide
    walk = np.repeat(rng.normal(size=40), 25)  # 40 runs of 25 equal tokens
    wide = block_bootstrap_ci([walk], lambda m: m, block=25, n_boot=500)
    narrow = block_bootstrap_ci([walk], lambda m: m, block=1, n_boot=500)
    assert (wide.hi - wide.lo) > 3 * (narrow.hi - narrow.lo)


def test_too_few_blocks_carry_no_verdict():
    from knnlm.experiments.memory.report import memory_claims
    from knnlm.experiments.projection import report as PR
    from knnlm.stats import too_few_blocks

    assert too_few_blocks(1000) == "4 block(s) of 256 tokens: too few (< 10) for a block-bootstrap interval to judge on"
    assert too_few_blocks(9 * 256) != "" and too_few_blocks(9 * 256 + 1) == ""  # 10 blocks, the last one short
    assert too_few_blocks(None) == ""  # a run that did not record its token count keeps its verdict
    share = {"point": 0.5, "lo": 0.2, "hi": 0.6}  # below 0.9: does not hold, where judged
    m = {"n_tokens": 1000, "solver": {"max_steps": 10},
         "by_tol": [{"tol": 0.0, "targets": {"f_out": {"share_of_knn_gain_ci": share, "still_improving_fraction": 0.0,
                                                       "max_steps": 10}},
                     "fg_gain_over_f_gain": {"f_out": {"point": 0.2, "lo": 0.1, "hi": 0.3}}}]}
    claims = PR.table1_claims(m, "t") + PR.table4_claims(m, "t")
    assert [c.verdict for c in claims] == [NOT_JUDGED] * 2 and claims[0].reason.startswith("4 block(s)")
    m["n_tokens"] = 5000
    assert [c.verdict for c in PR.table1_claims(m, "t") + PR.table4_claims(m, "t")] == [FAILS, HOLDS]
    ev = {"n_tokens": 1000, "ppl_lm": 20.0}
    assert memory_claims(ev, {"point": 0.5, "lo": 0.4, "hi": 0.6}, "t", "own", True)[0].verdict == NOT_JUDGED
    assert memory_claims({**ev, "n_tokens": 15000}, {"point": 0.5, "lo": 0.4, "hi": 0.6}, "t", "own", True)[0].verdict \
        == HOLDS
    # without a per-token cache: the point share from the perplexities, shown, not judged
    bare = memory_claims({"ppl_lm": 20.0, "ppl_knnlm": 16.0, "ppl_mlplm": 18.0}, None, "t", "own", True)[0]
    assert bare.verdict == NOT_JUDGED and bare.interval.point == pytest.approx((20 - 18) / (20 - 16))  # gain_share's


def test_a_share_of_no_gain_is_not_judged():
    """A ratio of gains turns over where its reference loses to the LM: the kNN-LM worse than the LM gives an MLP-LM
    as bad a share of 1.0 [0.9, 1.1], and f worse than the LM gives f∘g (better than the LM) a negative ratio; neither
    may read "holds"."""
    from knnlm.experiments.memory.report import memory_claims
    from knnlm.experiments.projection import report as PR
    from knnlm.stats import no_gain, share_of_gain

    assert share_of_gain(20.0, 21.0, 21.0) == 1.0  # (21 - 20) / (21 - 20): a loss "kept" in full
    assert no_gain(20.0, 19.9, "the kNN-LM") == "" and no_gain(20.0, None, "x") == ""
    assert no_gain(20.0, 21.0, "the kNN-LM") == \
        "the kNN-LM does not gain over the LM (21.00 >= 20.00): a share of its gain has no meaning"
    ev = {"n_tokens": 15000, "ppl_lm": 20.0, "ppl_knnlm": 21.0, "ppl_mlplm": 21.0}
    share = memory_claims(ev, {"point": 1.0, "lo": 0.9, "hi": 1.1}, "t", "own", True)[0]
    assert share.verdict == NOT_JUDGED and share.reason.startswith("the kNN-LM does not gain")
    assert memory_claims({**ev, "ppl_knnlm": 16.0}, {"point": 1.0, "lo": 0.9, "hi": 1.1}, "t", "own", True)[0].verdict \
        == HOLDS
    m = {"n_tokens": 5000, "ppl_lm": 20.0, "ppl_knnlm": 16.0, "solver": {"max_steps": 10},
         "by_tol": [{"tol": 0.0, "targets": {"f_out": {"share_of_knn_gain_ci": {"point": 0.95, "lo": 0.92, "hi": 0.97},
                                                       "still_improving_fraction": 0.0, "max_steps": 10,
                                                       "ppl_proj": 21.0}},
                     "fg_gain_over_f_gain": {"f_out": {"point": -1.0, "lo": -1.1, "hi": -0.9}}}]}
    t1, t4 = PR.table1_claims(m, "t")[0], PR.table4_claims(m, "t")[0]
    assert t1.verdict == HOLDS and t4.verdict == NOT_JUDGED and t4.reason.startswith("f_out does not gain")
    m["ppl_knnlm"] = 20.5
    assert PR.table1_claims(m, "t")[0].verdict == NOT_JUDGED


def test_recorded_cpu_claims_and_the_readme_agree():
    """The recorded cpu run's claims (docs/results/cpu-2026-12-06/claims.json): every stored verdict is the one its
    interval gives, and README's "What reproduces" table and the run's claims.md are that table, not hand copies."""
    import json
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    recorded = repo / "docs" / "results" / "cpu-2026-12-06"
    records = json.loads((recorded / "claims.json").read_text())["claims"]
    for rec in records:
        check_record(rec)
    table = claims_table([from_record(r) for r in records])
    block = re.search(r"<!-- claims: docs/results/cpu-2026-12-06/claims.json -->\n(.*?)<!-- /claims -->",
                      (repo / "README.md").read_text(), re.S)
    assert block and block.group(1) == table
    assert table in (recorded / "claims.md").read_text() and table in (recorded / "report.md").read_text()


def test_every_claims_block_of_the_readme_is_its_recorded_file():
    """Each `<!-- claims: FILE -->` table in README (the cpu recipe's, the demo's) is claims_table of FILE's records,
    and every stored verdict there is the one its interval gives."""
    import json
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"<!-- claims: (\S+) -->\n(.*?)<!-- /claims -->", (repo / "README.md").read_text(), re.S)
    assert {path for path, _ in blocks} >= {"docs/results/cpu-2026-12-06/claims.json",
                                            "docs/results/demo-2026-12-07-fused/claims.json"}
    for path, body in blocks:
        records = json.loads((repo / path).read_text())["claims"]
        for rec in records:
            check_record(rec)
        assert body == claims_table([from_record(r) for r in records]), path


def test_every_recorded_claims_file_stores_the_verdicts_its_intervals_give():
    """Each docs/results/*/claims.json, in the README or not: every stored verdict is the one its interval, threshold
    and direction give (or "not judged" with a reason)."""
    import json
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("*/claims.json"))
    assert {f.parent.name for f in files} >= {"cpu-2026-12-06", "demo-2026-12-05", "demo-2026-12-07",
                                             "demo-2026-12-07-fused"}
    for f in files:
        records = json.loads(f.read_text())["claims"]
        assert records, f
        for rec in records:
            check_record(rec)
