"""Table 5 across training lengths (``knnlm.experiments.lengths.overspec_lengths``): the per-length numbers and
claims from an overspec run folder's per-point files, checked against hand-computed values."""
import json
import math

import numpy as np

from knnlm.claims import FAILS, HOLDS, NOT_JUDGED
from knnlm.experiments.overspec import lengths
from knnlm.experiments.overspec.report import FAR_NATS, FIT_MARGIN_NATS

N_CHILDREN = [1, 1, 2, 2]  # two strata of two test examples each
LOG_OPT = np.log(1 / np.asarray(N_CHILDREN, float))  # [0, 0, -0.693, -0.693]


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _avg_groups(values):
    v = np.asarray(values, float)
    return float(np.mean([v[:2].mean(), v[2:].mean()]))


def _run(tmp_path, gap_by_step: dict, fit_gap_by_step: dict, knn_gain: float = 0.1, seeds=(0, 1),
         schedule="constant_with_warmup"):
    """A run folder: per seed and step, test scores at log(1/n) - gap (+ a per-seed, per-example spread), kNN at
    vanilla + knn_gain, and a training split fit_gap below its optimum -0.4."""
    steps = [0] + sorted(gap_by_step)
    _write(tmp_path / "config.json", {"lmbda": [0.25], "epochs": 8, "lr_scheduler_type": schedule})
    _write(tmp_path / "results.json", {"metrics": {"steps": steps, "seeds": list(seeds)}})
    for s in seeds:
        for step in steps[1:]:
            lm = LOG_OPT - gap_by_step[step] + 0.01 * np.array([s, -s, 1, -1])
            knn = lm + knn_gain
            train = {"avg_groups": -0.4 - fit_gap_by_step[step], "optimum_fit": {"avg_groups": -0.4}}
            _write(tmp_path / f"seed-{s}" / "evals" / f"step-{step:07d}.json", {
                "lls": {"test": {"lm": lm.tolist(), "knn": {"0.25": knn.tolist()}, "n_children": N_CHILDREN}},
                "splits": {"train": {"lm": train}, "test": {"lm": {"avg_groups": _avg_groups(lm)},
                                                             "knn": {"0.25": {"avg_groups": _avg_groups(knn)}}}}})
    return tmp_path


def test_lengths_numbers_and_persistence(tmp_path):
    # 2 epochs: not fitted; 4, 6, 8: fitted; gap 1.0 at 4 epochs, 0.9 at 8 (10% closed: persists)
    run = _run(tmp_path, {2: 2.0, 4: 1.0, 6: 0.95, 8: 0.9}, {2: FIT_MARGIN_NATS + 0.3, 4: 0.2, 6: 0.1, 8: 0.05})
    got = lengths.overspec_lengths(run)
    pts = got["points"]
    assert [p["epochs"] for p in pts] == [2, 4, 6, 8]
    assert [p["fitted"] for p in pts] == [False, True, True, True]
    assert math.isclose(pts[0]["fit_gap"], FIT_MARGIN_NATS + 0.3)
    for p, gap in zip(pts, (2.0, 1.0, 0.95, 0.9)):
        # the seeds' spreads cancel in each stratum's mean: the Average gap is the gap given
        assert math.isclose(p["gap"]["point"], gap, abs_tol=1e-12)
        assert math.isclose(p["knn_minus_lm"]["point"], 0.1, abs_tol=1e-12)
        assert math.isclose(p["test_lm"], _avg_groups(LOG_OPT) - gap, abs_tol=1e-12)
    per = got["persist"]
    assert (per["ref_step"], per["last_step"]) == (4, 8)
    assert math.isclose(per["interval"]["point"], 0.9 - 0.5 * 1.0, abs_tol=1e-12)

    claims = lengths.overspec_length_claims(got, "t")
    assert len(claims) == 2 * 4 + 1
    assert [c.verdict for c in claims[:2]] == [NOT_JUDGED, NOT_JUDGED]  # 2 epochs: not fitted
    gap8, knn8, persist = claims[-3], claims[-2], claims[-1]
    assert gap8.threshold == FAR_NATS and gap8.verdict == HOLDS  # 0.9 +- 0.01 > 0.5
    assert knn8.verdict == HOLDS
    assert persist.verdict == HOLDS and "4 → 8 epochs" in persist.setting


def test_gap_closed_by_training_does_not_persist(tmp_path):
    # gap 1.0 at 4 epochs, 0.2 at 8: 80% closed -> 0.2 - 0.5 < 0 everywhere; kNN hurts
    run = _run(tmp_path, {4: 1.0, 8: 0.2}, {4: 0.1, 8: 0.0}, knn_gain=-0.05)
    claims = lengths.overspec_length_claims(lengths.overspec_lengths(run), "t")
    assert claims[-1].verdict == FAILS
    assert math.isclose(claims[-1].interval.point, 0.2 - 0.5, abs_tol=1e-12)
    assert claims[-2].verdict == FAILS and claims[-3].verdict == FAILS  # kNN < vanilla; gap 0.2 < 0.5


def test_persistence_not_judged_when_the_last_length_is_not_fitted(tmp_path):
    run = _run(tmp_path, {4: 1.0, 8: 0.9}, {4: 0.1, 8: FIT_MARGIN_NATS + 0.01})
    got = lengths.overspec_lengths(run)
    assert got["persist"] is None
    claims = lengths.overspec_length_claims(got, "t")
    assert claims[-1].verdict == NOT_JUDGED and "fewer than two" in claims[-1].reason
    assert claims[-2].verdict == NOT_JUDGED and f"> {FIT_MARGIN_NATS}" in claims[-2].reason


def test_a_decaying_schedule_is_not_judged(tmp_path):
    # with a linear decay the 4-epoch point is not a 4-epoch run: every claim is reported, none judged
    run = _run(tmp_path, {4: 1.0, 8: 0.9}, {4: 0.1, 8: 0.05}, schedule="linear")
    claims = lengths.overspec_length_claims(lengths.overspec_lengths(run), "t")
    assert [c.verdict for c in claims] == [NOT_JUDGED] * 5
    assert all("lr decays (linear)" in c.reason for c in claims)
    assert math.isclose(claims[-1].interval.point, 0.9 - 0.5 * 1.0, abs_tol=1e-12)  # the numbers stay for reference


def test_the_report_names_the_seeds_the_run_itself_averaged(tmp_path):
    """Before: the recipe's label carried the seed count ("3 seeds"), so a run given more seeds was reported as
    3; now the label names the setting and the count comes from the run."""
    from knnlm.experiments.overspec.report import with_seeds

    run = _run(tmp_path / "lengths", {4: 1.0, 8: 0.9}, {4: 0.2, 8: 0.05}, seeds=(0, 1, 2))
    _, claims = lengths.report_part({}, {"folder": "lengths", "label": "SmolLM2 (x)"}, tmp_path)
    assert [c.setting for c in claims] == ["SmolLM2 (x), 3 seeds, 4 epochs (step 4)"] * 2 + \
        ["SmolLM2 (x), 3 seeds, 8 epochs (step 8)"] * 2 + ["SmolLM2 (x), 3 seeds, 4 → 8 epochs"]
    assert run.is_dir() and with_seeds("M", [7]) == "M, seed 7"


def test_lengths_of_a_run_given_max_steps_count_its_epochs(tmp_path):
    # --max_steps overrides --epochs in the trainer: 8 sentences in batches of 4 are 2 steps an epoch, so the points
    # at steps 4 and 8 of a --max_steps 8 run are 2 and 4 epochs (before: step x --epochs 50 / 8 = 25 and 50)
    run = _run(tmp_path, {4: 1.0, 8: 0.9}, {4: 0.1, 8: 0.05}, seeds=(0,))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": 50, "max_steps": 8, "batch_size": 4,
                                                 "gradient_accumulation_steps": 1}))
    results = json.loads((run / "results.json").read_text())
    results["metrics"]["n_train"] = {"0": 8}
    (run / "results.json").write_text(json.dumps(results))
    got = lengths.overspec_lengths(run)
    assert [p["epochs"] for p in got["points"]] == [2, 4]
    assert "2 → 4 epochs" in lengths.overspec_length_claims(got, "t")[-1].setting
    # the run's own record wins (e.g. two processes under torchrun: each takes half an epoch's batches, 1 step)
    results["metrics"]["steps_per_epoch"] = {"0": 1}
    (run / "results.json").write_text(json.dumps(results))
    assert [p["epochs"] for p in lengths.overspec_lengths(run)["points"]] == [4, 8]
