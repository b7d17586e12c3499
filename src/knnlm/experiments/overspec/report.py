"""The over-specification study's report: means over seeds, the last step's differences and paired bootstrap intervals,
the claims, Table 5's layout, Figure 1's plots and the report part of ``knnlm reproduce``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ...claims import Claim, claims_table
from ...errors import KnnlmError
from ...memory import last_fifth_drop
from ...report import line_plot, markdown_table, pm
from ...stats import Interval, as_interval
from .. import study
from .settings import SPLITS, OverspecArgs

SPLIT_TITLES = {"test": "Test split (bare statements: the paper's Table 5)",
                "test_overspecified": "Control: test_overspecified (an attribute clause the pair's training sentences did not use)",
                "train": "Training split (a fixed sample of the training sentences: has the model fitted its data?)"}
METHOD_NAMES = {"lm": "vanilla", "knn": "kNN", "mlp": "MLP", "bare": "bare-trained"}


def _point_value(entry: dict, split: str, method: str, lam: str, group: str) -> Optional[float]:
    s = entry["splits"].get(split)
    if s is None:
        return None
    summary = s["lm"] if method == "lm" else s.get(method, {}).get(lam)
    return None if summary is None else summary[group]


def _intervals(records: list[dict], bare: Optional[list[dict]], methods: list[str], lam: str) -> dict:
    """Paired bootstrap intervals (``Interval.as_dict``) at the last step over seeds and examples (stratified by number
    of children) of the Average (mean of the group means): kNN/MLP − vanilla and MLP − kNN per split, bare-trained −
    vanilla and the vanilla gap to log(1/n) on the test split."""
    from ...stats import hierarchical_bootstrap, paired_bootstrap

    out: dict = {}
    lls = [r["history"][-1].get("lls") for r in records]
    if any(x is None for x in lls):
        return out
    for split in lls[0]:
        per = [x[split] for x in lls]
        strata = [x["n_children"] for x in per]
        got = {m: [x[m][lam] for x in per] for m in methods[1:] if all(x[m].get(lam) for x in per)}
        got["lm"] = [x["lm"] for x in per]
        pairs = [(m, "lm") for m in methods[1:]] + [("mlp", "knn")]
        out[split] = {f"{a}_minus_{b}": paired_bootstrap(got[a], got[b], strata).as_dict()
                      for a, b in pairs if a in got and b in got}
        if split == "test":
            gap = [np.log(1 / np.asarray(n, float)) - np.asarray(v) for n, v in zip(strata, got["lm"])]
            out[split]["lm_gap_to_optimum"] = hierarchical_bootstrap(gap, strata).as_dict()
            if bare:
                out[split]["bare_minus_lm"] = paired_bootstrap([b["history"][-1]["lls"] for b in bare], got["lm"],
                                                               strata).as_dict()
    return out


def _final(records: list[dict], mean: dict, groups: list[str], optimum: dict, lam: str) -> dict:
    """Per split at the last step: each method's means (``mean``: split -> method -> group -> curve), gaps to log(1/n),
    differences from vanilla and the share of (seed, step > 0) points where it beats vanilla (descriptive; the claims
    use the intervals)."""
    final = {}
    for split, curves in mean.items():
        f = {}
        for m, by_group in curves.items():
            if by_group["avg_groups"][-1] is not None:
                f[m] = {g: by_group[g][-1] for g in groups}
                f[f"{m}_gap_to_optimum"] = {g: optimum[g] - f[m][g] for g in groups}
        for m in [m for m in curves if m != "lm" and m in f]:
            f[f"{m}_minus_lm"] = {g: f[m][g] - f["lm"][g] for g in groups}
            if m == "bare":  # its points are in the bare-trained run's records, not in ``records``
                continue
            pairs = [(_point_value(e, split, m, lam, "avg_groups"), _point_value(e, split, "lm", lam, "avg_groups"))
                     for r in records for e in r["history"][1:]]
            wins = [a > b for a, b in pairs if a is not None]
            f[f"{m}_beats_lm_fraction"] = sum(wins) / len(wins) if wins else None
        final[split] = f
    return final


def _over_seeds(runs: list[dict], groups: list[str], value) -> tuple[dict, dict]:
    """Per group g: the mean and the std over seeds (``study.curve_mean_std``) of each run's curve, ``value(entry, g)``
    at every entry of its history."""
    stats = {g: study.curve_mean_std([value(e, g) for e in r["history"]] for r in runs) for g in groups}
    return {g: mean for g, (mean, _) in stats.items()}, {g: std for g, (_, std) in stats.items()}


def aggregate(records: list[dict], args: OverspecArgs, bare: Optional[list[dict]] = None) -> dict:
    """Mean and std over seeds for every (split, method, group) at every evaluation step; the bare-trained reference
    (test split, vanilla) as method "bare"; the last step's gaps, differences and bootstrap intervals."""
    steps = [e["step"] for e in records[0]["history"]]
    for r in list(records) + list(bare or []):
        if [e["step"] for e in r["history"]] != steps:
            raise KnnlmError(f"--seeds: seed {r['seed']} was evaluated at other steps than seed {records[0]['seed']}; "
                             "all seeds need the same village size and training settings")
    lam = str(float(args.lmbda[0]))
    first = records[0]["history"][0]["splits"]["test"]["lm"]
    groups = [g for g in first["count"]] + ["avg_groups", "avg"]
    methods = ["lm", "knn"] + (["mlp"] if args.mlp_memory else [])
    splits = [s for s in SPLITS if s in records[0]["history"][0]["splits"]]
    mean, std = {s: {} for s in splits}, {s: {} for s in splits}  # split -> method -> group -> curve over the steps
    for split in splits:
        for m in methods:
            mean[split][m], std[split][m] = _over_seeds(records, groups, lambda e, g: _point_value(e, split, m, lam, g))
    if bare:
        mean["test"]["bare"], std["test"]["bare"] = _over_seeds(bare, groups, lambda e, g: e["summary"][g])
    optimum = first["optimum"]
    final = _final(records, mean, groups, optimum, lam)
    final["step"] = steps[-1]
    metrics = {"steps": steps, "seeds": [r["seed"] for r in records], "lmbda": float(args.lmbda[0]), "methods": methods,
               "splits": splits, "groups": groups, "optimum": optimum, "counts": first["count"], "mean": mean,
               "std": std, "final": final,
               "train_loss": {str(r["seed"]): [e["train_loss"] for e in r["history"]] for r in records},
               "n_keys": {str(r["seed"]): r["history"][0]["n_keys"] for r in records},
               "n_train": {str(r["seed"]): r["n_train"] for r in records},
               "steps_per_epoch": {str(r["seed"]): r.get("steps_per_epoch") for r in records},
               "seed_wall_s": {str(r["seed"]): r["wall_s"] for r in records},
               "per_seed": {str(r["seed"]): [{k: v for k, v in e.items() if k != "lls"} for e in r["history"]]
                            for r in records}}
    if "train" in splits:
        fits = [r["history"][-1]["splits"]["train"]["lm"]["optimum_fit"] for r in records]
        metrics["optimum_fit"] = {g: float(np.mean([x[g] for x in fits])) for g in groups}
        final["train"]["lm_gap_to_fit_optimum"] = {g: metrics["optimum_fit"][g] - final["train"]["lm"][g]
                                                   for g in groups}
        mem = [r["history"][-1]["splits"]["train"].get("mem") for r in records]
        if all(mem):  # the MLP memory alone on the training sample's child positions: its training loss there
            metrics["mlp_child_loss"] = {"mean": -float(np.mean([x["avg"] for x in mem])),
                                         "per_seed": {str(r["seed"]): -x["avg"] for r, x in zip(records, mem)}}
    curves = [r["history"][-1].get("mlp_training") for r in records]
    if all(curves):
        metrics["mlp_training"] = {str(r["seed"]): {**c, "plateau": last_fifth_drop(c["loss_curve"])}
                                   for r, c in zip(records, curves)}
    if bare:
        metrics["bare"] = {"train_loss": {str(b["seed"]): [e["train_loss"] for e in b["history"]] for b in bare},
                           "seed_wall_s": {str(b["seed"]): b["wall_s"] for b in bare},
                           "n_train": {str(b["seed"]): b["n_train"] for b in bare}}
    metrics["intervals"] = _intervals(records, bare, methods, lam)
    return metrics


# ---------------------------------------------------------------------------------------------------------------- claims
# Fixed before any run (docs/overspec.md). The claims are judged only where the model fits its over-specified training
# sentences (its training-split Average within FIT_MARGIN_NATS of the training optimum, the log-likelihood of a model
# reproducing their empirical distribution): a model that has not learnt its data says nothing about over-specification.
# A model at chance on 30 children is ~2.5 nats away.
FIT_MARGIN_NATS, FAR_NATS = 0.5, 0.5
OVERSPEC_CLAIMS = (  # (claim, interval key in metrics["intervals"]["test"], statistic, threshold)
    ("over-specification: trained on the bare sentences the same model gets closer to log(1/n) (§4, Fig. 2)",
     "bare_minus_lm", "bare-trained − over-specified vanilla (nats)", 0.0),
    ("kNN augmentation beats the vanilla LM on the bare test sentences (Fig. 1)", "knn_minus_lm",
     "kNN − vanilla (nats)", 0.0),
    ("the MLP memory beats kNN on Macondo (Table 2)", "mlp_minus_knn", "MLP − kNN (nats)", 0.0),
    (f"the fine-tuned LM stays far (> {FAR_NATS} nats) from the optimum log(1/n)", "lm_gap_to_optimum",
     "log(1/n) − vanilla (nats)", FAR_NATS),
)


def fit_reason(metrics: dict) -> str:
    """Why the setting is not the paper's ("" when the vanilla model fits its training sentences)."""
    train = metrics.get("final", {}).get("train")
    if not (train and train.get("lm") and "optimum_fit" in metrics):
        return "no training-split score to show the model fits its data (rerun with --train_eval_per_pair 1)"
    van, opt = train["lm"]["avg_groups"], metrics["optimum_fit"]["avg_groups"]
    if van >= opt - FIT_MARGIN_NATS:
        return ""
    return f"the model did not fit its training sentences ({opt - van:.2f} nats from their optimum > {FIT_MARGIN_NATS})"


def plateau_reason(metrics: dict) -> str:
    """Why the MLP memory's claims are not judged ("" when every seed's memory loss has plateaued: memory.PLATEAU_DROP)."""
    from ...memory import plateau_reason as reason

    curves = metrics.get("mlp_training", {})
    seeds = metrics.get("seeds") or list(curves)
    return reason([curves.get(str(seed), {}).get("plateau") for seed in seeds])  # a seed without a curve: unknown


def with_seeds(label: str, seeds) -> str:
    """A recipe entry's label with the seeds the run itself averaged ("seed 0", "5 seeds"): a label that stated them
    said "3 seeds" of a run given more."""
    return f"{label}, " + (f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds")


def overspec_claims(metrics: dict, label: str) -> list[Claim]:
    """The study's claims on the test split at the last step, each from its paired interval over seeds and examples;
    the MLP memory's only where its training loss has plateaued (:func:`plateau_reason`)."""
    unfit, unplateaued = fit_reason(metrics), plateau_reason(metrics)
    intervals = metrics.get("intervals", {}).get("test", {})
    setting = f"{label}, step {metrics['final']['step']}"
    claims = []
    for claim, key, statistic, threshold in OVERSPEC_CLAIMS:
        if key.startswith("mlp") and "mlp" not in metrics.get("methods", ()):
            continue
        missing = "" if key in intervals else f"no {statistic.split(' (')[0]} interval in this run"
        interval = as_interval(intervals[key]) if key in intervals else Interval(math.nan, math.nan, math.nan)
        reason = unfit or missing or (unplateaued if key.startswith("mlp") else "")
        claims.append(Claim(claim, setting, statistic, interval, threshold, "above", not_judged=reason))
    return claims


# ---------------------------------------------------------------------------------------------------------------- outputs
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
LINESTYLES = {"lm": "-", "knn": ":", "mlp": "-.", "bare": (0, (8, 2, 1, 2, 1, 2))}


def _step_label(step: int) -> str:
    return f"{step // 1000}k" if step and step % 1000 == 0 else str(step)


def _step_rows(metrics: dict, cols: list[tuple]) -> list[list]:
    """A row per evaluation step: mean ± std over seeds of each (split, method, group) column."""
    return [[_step_label(step)] + [pm(metrics["mean"][s][m][g][i], metrics["std"][s][m][g][i]) for s, m, g in cols]
            for i, step in enumerate(metrics["steps"])]


def table5(metrics: dict, split: str) -> str:
    """Table 5's layout: rows are steps; per number of children and the average (of the group means), one column
    per method (vanilla / kNN [/ MLP] [/ bare-trained on the test split]); mean ± std over seeds; a last row with the
    optimum log(1/n) (and, for the training split, the training optimum: the empirical distribution)."""
    groups = [g for g in metrics["groups"] if g != "avg"]
    methods = list(metrics["mean"][split])  # metrics["methods"], then "bare" where it was run
    headers = ["steps"] + [f"{'Average' if g == 'avg_groups' else g} {METHOD_NAMES[m]}" for g in groups for m in methods]
    rows = _step_rows(metrics, [(split, m, g) for g in groups for m in methods])
    rows.append(["log(1/n)"] + [f"{metrics['optimum'][g]:.2f}" for g in groups for _ in methods])
    if split == "train" and "optimum_fit" in metrics:
        rows.append(["training optimum"] + [f"{metrics['optimum_fit'][g]:.2f}" for g in groups for _ in methods])
    return markdown_table(headers, rows)


def overview_table(metrics: dict) -> str:
    """The Average (mean of the group means) per step: test, training and control splits side by side, and the
    bare-trained reference."""
    short = {"test": "test", "train": "train", "test_overspecified": "control"}  # in the columns' order
    cols = [(split, m) for split in short if split in metrics["mean"] for m in metrics["mean"][split]]
    headers = ["steps"] + [f"{short[s]} {METHOD_NAMES[m]}" for s, m in cols]
    rows = _step_rows(metrics, [(s, m, "avg_groups") for s, m in cols])
    opt = [f"{metrics['optimum']['avg_groups']:.2f}" if s != "train" or "optimum_fit" not in metrics
           else f"{metrics['optimum']['avg_groups']:.2f} / {metrics['optimum_fit']['avg_groups']:.2f}" for s, _ in cols]
    rows.append(["optimum"] + opt)
    return markdown_table(headers, rows)


def markdown_report(args: OverspecArgs, metrics: dict) -> str:
    n = len(metrics["seeds"])
    lam = metrics["lmbda"]
    names = " / ".join(METHOD_NAMES[m] for m in metrics["methods"])
    counts = ", ".join(f"{g}: {c}" for g, c in metrics["counts"].items())
    text = [f"# Over-specification: {args.model_name_or_path}{' + LoRA' if args.lora else ''}, {n} seed(s)", "",
            f"Log-likelihood of the children's names ({names}; kNN: k={args.k}, λ={lam}, T={args.knn_temp}; "
            f"mean ± std over seeds {', '.join(map(str, metrics['seeds']))}). Test examples per number of children: "
            f"{counts}. Average = mean of the group means (the paper's).", ""]
    if "bare" in metrics["mean"]["test"]:
        text += ["'bare-trained': the same model, initialisation, seed and number of steps trained on the bare test "
                 "sentences instead (each repeated --examples_per_child times), scored on the same test sentences "
                 "(the paper's gray line, Fig. 2).", ""]
    if args.mlp_memory and args.mlp_at == "last":
        text += ["MLP memory trained at the last evaluation point only (--mlp_at last).", ""]
    text += ["## Overview (Average over groups)", "", overview_table(metrics)]
    for split in metrics["splits"]:
        text += [f"## {SPLIT_TITLES[split]}", "", table5(metrics, split)]
    text += ["## At the last step", ""]
    for split in metrics["splits"]:
        f = metrics["final"][split]
        shown = [m for m in metrics["methods"] + ["bare"] if m in f]  # "lm" first
        line = [f"- {split}, step {metrics['final']['step']}: average vanilla {f['lm']['avg_groups']:.3f}"]
        for m in shown[1:]:
            beats = f.get(f"{m}_beats_lm_fraction")
            extra = "" if beats is None else f"; better than vanilla at {100 * beats:.0f}% of (seed, step > 0) points"
            line.append(f"{METHOD_NAMES[m]} {f[m]['avg_groups']:.3f} ({f[f'{m}_minus_lm']['avg_groups']:+.3f} over "
                        f"vanilla{extra})")
        line.append("gap to log(1/n): " + ", ".join(
            f"{METHOD_NAMES[m]} {f[f'{m}_gap_to_optimum']['avg_groups']:.3f}" for m in shown))
        if split == "train" and "lm_gap_to_fit_optimum" in f:
            line.append(f"vanilla gap to the training optimum {f['lm_gap_to_fit_optimum']['avg_groups']:.3f}")
        text.append("; ".join(line) + ".")
    if "mlp_child_loss" in metrics:
        text.append(f"- MLP memory alone, loss on the children's positions of the training sample at the last step: "
                    f"{metrics['mlp_child_loss']['mean']:.3f} nats (mean over seeds).")
    if "mlp_training" in metrics:
        parts = []
        for seed, t in metrics["mlp_training"].items():
            drop = "n/a" if t["plateau"] is None else f"{100 * t['plateau']:.1f}%"
            parts.append(f"seed {seed} {t['first_loss']:.2f} -> {t['final_loss']:.2f} in {t['steps']} steps "
                         f"(drop over the last fifth: {drop})")
        text.append("- MLP memory training loss at the last step (all datastore pairs): " + "; ".join(parts) + ".")
    if metrics.get("intervals"):
        text += ["", "## Paired bootstrap intervals (last step; 95%, over seeds and examples, stratified by number of "
                 "children; Average over groups)", ""]
        text += [f"- {split}: {key.replace('_minus_', ' − ').replace('lm_gap_to_optimum', 'log(1/n) − lm')}: "
                 f"{as_interval(ci).fmt(3, '+')} nats" for split, cis in metrics["intervals"].items()
                 for key, ci in cis.items()]
        text += ["", "## Claims", "", claims_table(overspec_claims(metrics, "this run"))]
    return "\n".join(text) + "\n"


def figure1(path: Path, metrics: dict, split: str, title: str) -> Path:
    """Figure 1's style: one colour per number of children; vanilla solid, kNN dotted, MLP dash-dot, bare-trained
    dash-dot-dot; dashed horizontal lines at log(1/n). The legend names the colours once and the line styles once."""
    groups = [g for g in metrics["groups"] if g not in ("avg", "avg_groups")]
    methods = list(metrics["mean"][split])  # metrics["methods"], then "bare" where it was run
    series, hlines = [], []
    for i, g in enumerate(groups):
        color = COLORS[i % len(COLORS)]
        for m in methods:
            label = (f"{g} child" + ("ren" if g != "1" else "")) if m == "lm" else None
            y = [np.nan if v is None else v for v in metrics["mean"][split][m][g]]
            sparse = sum(np.isfinite(y)) < len(y)  # e.g. --mlp_at last: mark the points that exist
            series.append(dict(x=metrics["steps"], y=y, color=color, linestyle=LINESTYLES[m], label=label,
                               marker="o" if sparse else None))
        hlines.append(dict(y=metrics["optimum"][g], color=color, linestyle="--"))
    for m in methods:  # style key: empty lines that only appear in the legend
        series.append(dict(x=[], y=[], color="black", linestyle=LINESTYLES[m], label=METHOD_NAMES[m]))
    series.append(dict(x=[], y=[], color="grey", linestyle="--", label="log(1/n)"))
    return line_plot(path, series, title=title, xlabel="training step", ylabel="log-likelihood", hlines=hlines)


FIGURES = (("test", "overspec.png", "test log-likelihood of the children's names ({n} seeds)"),
           ("test_overspecified", "overspec_control.png", "control split test_overspecified ({n} seeds)"),
           ("train", "overspec_train.png", "training sentences (fixed sample, {n} seeds)"))


def write_outputs(out: Path, args: OverspecArgs, metrics: dict, started: float) -> dict:
    n = len(metrics["seeds"])
    return study.write_outputs(out, args, metrics, started, overspec_claims(metrics, "this run"),
                               markdown_report(args, metrics),
                               lambda: [figure1(out / name, metrics, split, f"{args.model_name_or_path}: {title.format(n=n)}")
                                        for split, name, title in FIGURES if split in metrics["splits"]])


# ---------------------------------------------------------------------------------------------------------------- report
PAPER_TABLE2 = {"LM": 19.66, "kNN-LM": 17.69, "MLP-LM": 10.76}  # Macondo, GPT-2 fine-tuned
TABLES = {"table2_macondo": ("Table 2 — kNN vs MLP memory (Macondo: perplexity of the children's names, test split)",
                             ["model", "LM", "kNN-LM", "MLP-LM"],
                             [["paper (GPT-2 fine-tuned)", *PAPER_TABLE2.values()]]),
          "table5": ("Table 5 / Figure 1 — Macondo over-specification", None, [])}


def report_part(metrics: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """Table 2's Macondo row (perplexity of the names at the last step), the run's results.md as Table 5's section,
    and the claims."""
    final = metrics["final"]["test"]
    label = with_seeds(entry["label"], metrics["seeds"])
    row = [f"{label} (step {metrics['final']['step']})"] + [
        math.exp(-final[m]["avg_groups"]) if m in final else None for m in ("lm", "knn", "mlp")]
    md = out / entry["folder"] / "results.md"
    text = md.read_text() if md.is_file() else ""
    text = "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines()) + "\n"  # under ##
    section = f"### {label}\n\n" + text
    return {"table2_macondo": [row], "table5": [section]}, overspec_claims(metrics, label)
