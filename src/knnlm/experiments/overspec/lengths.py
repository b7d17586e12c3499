"""Table 5 across training lengths: one overspec run per seed, evaluated at several lengths (every point's
per-example scores are in ``seed-S/evals/step-N.json``), read as runs of those lengths; the claims per length and the
gap's persistence across them (the study ``overspec_lengths``: docs/overspec.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...claims import Claim
from ...stats import Interval, as_interval
from ..study import seed_path, stage_record
from .report import FIT_MARGIN_NATS, OVERSPEC_CLAIMS, with_seeds
from .settings import point_dir

# Fixed before the runs (docs/results/fidelity-2026-12-05/criteria.md): a length is judged only where the model fits
# its training sentences (FIT_MARGIN_NATS, mean over seeds); the gap "persists" from the first fitted length to the last
# when less than PERSIST_SHARE of it is closed, i.e. the interval of gap(last) - PERSIST_SHARE * gap(first fitted), per
# example paired over seeds and examples, lies above 0.
PERSIST_SHARE = 0.5
CONSTANT_LR = ("constant_with_warmup",)  # schedules whose intermediate points are runs of that length
PERSIST_CLAIM = "the gap to log(1/n) persists as training goes on and fits the training split (Table 5)"


def _epochs_at(config: dict, metrics: dict, steps: list):
    """step -> the passes over the training split made by then: from the run's recorded steps per epoch; a run
    recorded before it was kept: --epochs spread over the run's steps, or with --max_steps (which overrides --epochs)
    the one-process trainer's steps per epoch (the recorded runs' case)."""
    from .run import steps_per_epoch

    per_epoch = next(iter((metrics.get("steps_per_epoch") or {}).values()), None)
    n_train = next(iter(metrics.get("n_train", {}).values()), None)
    if per_epoch is None and config.get("max_steps") and n_train:
        per_epoch = steps_per_epoch(n_train, config["batch_size"], config.get("gradient_accumulation_steps", 1))
    if per_epoch:
        return lambda step: round(step / per_epoch, 3)
    return lambda step: round(step * config["epochs"] / steps[-1], 3)


def overspec_lengths(run_dir: Path) -> dict:
    """Per evaluation point after step 0 of an overspec run (all seeds): the training-split fit (vanilla Average vs
    its optimum, means over seeds), the test split's vanilla and kNN Averages, the intervals of log(1/n) − vanilla and
    kNN − vanilla (over seeds and examples, stratified by number of children), and the persistence interval between the
    first fitted point and the last. -> {"points": [...], "persist": {...} | None}."""
    from ...stats import hierarchical_bootstrap, paired_bootstrap

    run_dir = Path(run_dir)
    out, folder = run_dir.parent, run_dir.name
    config = stage_record(out, folder, "config.json", required=("lmbda",))
    metrics = stage_record(out, folder, required=("metrics",))["metrics"]
    lam, steps, seeds = str(float(config["lmbda"][0])), metrics["steps"], metrics["seeds"]
    epochs_at = _epochs_at(config, metrics, steps)
    points, gaps = [], {}
    for step in steps[1:]:
        names = [point_dir(seed_path(run_dir, s), step).with_suffix(".json").relative_to(run_dir) for s in seeds]
        saved = [stage_record(out, folder, name, required=("lls", "splits")) for name in names]
        test = [x["lls"]["test"] for x in saved]
        strata = [t["n_children"] for t in test]
        lm = [np.asarray(t["lm"], float) for t in test]
        gaps[step] = [np.log(1 / np.asarray(n, float)) - v for n, v in zip(strata, lm)]  # per seed: [examples]
        train = [x["splits"]["train"]["lm"] for x in saved]
        fit = float(np.mean([t["optimum_fit"]["avg_groups"] - t["avg_groups"] for t in train]))
        points.append({"step": step, "epochs": epochs_at(step),
                       "train_lm": float(np.mean([t["avg_groups"] for t in train])),
                       "train_optimum": float(np.mean([t["optimum_fit"]["avg_groups"] for t in train])),
                       "fit_gap": fit, "fitted": fit <= FIT_MARGIN_NATS,
                       "test_lm": float(np.mean([x["splits"]["test"]["lm"]["avg_groups"] for x in saved])),
                       "test_knn": float(np.mean([x["splits"]["test"]["knn"][lam]["avg_groups"] for x in saved])),
                       "gap": hierarchical_bootstrap(gaps[step], strata).as_dict(),
                       "knn_minus_lm": paired_bootstrap([t["knn"][lam] for t in test], [t["lm"] for t in test],
                                                        strata).as_dict()})
    fitted = [p for p in points if p["fitted"]]
    persist = None
    if len(fitted) >= 2 and fitted[-1] is points[-1]:
        ref, last = fitted[0]["step"], points[-1]["step"]
        # per seed, example by example (a seed's test rows are the same at every point, so are its strata)
        diff = [g_last - PERSIST_SHARE * g_ref for g_last, g_ref in zip(gaps[last], gaps[ref])]
        persist = {"ref_step": ref, "last_step": last, "ref_epochs": fitted[0]["epochs"],
                   "last_epochs": points[-1]["epochs"], "share": PERSIST_SHARE,
                   "interval": hierarchical_bootstrap(diff, strata).as_dict()}
    return {"points": points, "persist": persist, "seeds": seeds, "lmbda": float(lam),
            "lr_scheduler_type": config.get("lr_scheduler_type", "linear")}


def overspec_length_claims(lengths: dict, label: str) -> list[Claim]:
    """Per length: the gap to log(1/n) stays > FAR_NATS and kNN beats vanilla (not judged where the model does
    not fit its training sentences); across lengths: the gap persists (:data:`PERSIST_CLAIM`)."""
    (far, _, far_stat, far_t), (knn, _, knn_stat, knn_t) = (
        next(c for c in OVERSPEC_CLAIMS if c[1] == key) for key in ("lm_gap_to_optimum", "knn_minus_lm"))
    claims = []
    # with a decaying lr an intermediate point is a model part-way down its schedule, not a run of that length
    decays = "" if lengths["lr_scheduler_type"] in CONSTANT_LR else (
        f"the lr decays ({lengths['lr_scheduler_type']}) to the last step: its points are not runs of those lengths")
    for p in lengths["points"]:
        setting = f"{label}, {p['epochs']:g} epochs (step {p['step']})"
        unfit = "" if p["fitted"] else (f"the model did not fit its training sentences ({p['fit_gap']:.2f} nats "
                                        f"from their optimum > {FIT_MARGIN_NATS})")
        reason = decays or unfit
        claims.append(Claim(far, setting, far_stat, as_interval(p["gap"]), far_t, "above", not_judged=reason))
        claims.append(Claim(knn, setting, knn_stat, as_interval(p["knn_minus_lm"]), knn_t, "above", not_judged=reason))
    per = lengths["persist"]
    nan = float("nan")
    if per is None:
        claims.append(Claim(PERSIST_CLAIM, f"{label}, first fitted length to the last", "", Interval(nan, nan, nan),
                            0.0, "above", not_judged="fewer than two lengths where the model fits its training "
                                                     "sentences, or the last does not"))
    else:
        claims.append(Claim(PERSIST_CLAIM, f"{label}, {per['ref_epochs']:g} → {per['last_epochs']:g} epochs",
                            f"gap({per['last_epochs']:g} ep) − {per['share']:g} × gap({per['ref_epochs']:g} ep) (nats)",
                            as_interval(per["interval"]), 0.0, "above", not_judged=decays))
    return claims


def lengths_rows(lengths: dict) -> list[list]:
    """Table 5 across lengths: one row per evaluation point."""
    return [[f"{p['epochs']:g} ({p['step']})", f"{p['train_lm']:.3f} / {p['train_optimum']:.3f}",
             "yes" if p["fitted"] else "no", f"{p['test_lm']:.3f}", f"{p['test_knn']:.3f}",
             as_interval(p["gap"]).fmt(3), as_interval(p["knn_minus_lm"]).fmt(3, "+")] for p in lengths["points"]]


LENGTHS_HEADERS = ["epochs (step)", "train vanilla / its optimum", "fitted", "test vanilla", "test kNN",
                   "log(1/n) − vanilla [95% CI]", "kNN − vanilla [95% CI]"]


def report_part(metrics: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    lengths = overspec_lengths(out / entry["folder"])
    label = with_seeds(entry["label"], lengths["seeds"])
    return {"table5_lengths": lengths_rows(lengths)}, overspec_length_claims(lengths, label)


TABLES = {"table5_lengths": (
    "Table 5 across training lengths — does the gap to log(1/n) persist while the training split is fitted?",
    LENGTHS_HEADERS, [])}
