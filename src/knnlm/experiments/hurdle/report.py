"""The hurdle study's report: aggregation over seeds, the paired area (the verdict statistic) and its claims, the
tables and figures of results.md, and the report part of ``knnlm reproduce``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ...claims import Claim, claims_table
from ...report import line_plot, markdown_table, pm
from ...stats import Interval, as_interval, bootstrap_ci, too_few_seeds
from .. import study
from .settings import MODELS, PRUNED, HurdleArgs

TABLES: dict = {}  # the hurdle fills none of the paper's tables in the report: its results.md and PNGs are its own


def _higher_is_better(metric: str) -> bool:
    return metric.startswith("ll_")


def _advantage(full: list, pruned: list, higher_is_better: bool) -> list:
    """The pruned model's advantage per point, in the metric's units (> 0: ahead; None where either has no value)."""
    sign = 1.0 if higher_is_better else -1.0
    return [None if a is None or b is None else sign * (b - a) for a, b in zip(full, pruned)]


def compare(steps: list[int], with_mean: list, without_mean: list, higher_is_better: bool, total_steps: int,
            pruned: str = "without_last_mlp") -> dict:
    """Where the ``pruned`` model leads: its advantage per step (positive = ``pruned`` ahead, in the metric's units),
    the eval steps at which the lead changes hands, and the advantage at the eval step nearest 1/4 of training."""
    adv = _advantage(with_mean, without_mean, higher_is_better)
    crossings, prev = [], None
    for step, a in zip(steps, adv):
        if step == 0 or a is None or a == 0:
            continue
        if prev is not None and (a > 0) != (prev > 0):
            crossings.append(step)
        prev = a
    quarter = min((s for s in steps if s > 0), key=lambda s: (abs(s - total_steps / 4), s))
    at_quarter = adv[steps.index(quarter)]
    return {"pruned": pruned, "advantage": dict(zip(map(str, steps), adv)), "crossings": crossings,
            "quarter_step": quarter, "advantage_at_quarter": at_quarter,
            "leader_at_quarter": None if not at_quarter else (pruned if at_quarter > 0 else "with_last_mlp")}


def paired_area(steps: list[int], full: list, pruned: list, higher_is_better: bool, until: float) -> Optional[float]:
    """The area between one seed's pruned and full curves over steps [first point, ``until``], divided by that span:
    the pruned model's mean advantage there (metric units; > 0: it is ahead). Trapezoids between the points, the curves
    interpolated linearly at ``until`` when it falls between two points. None when fewer than two points lie in range.
    """
    pts = [(s, v) for s, v in zip(steps, _advantage(full, pruned, higher_is_better)) if v is not None]
    inside = [(s, v) for s, v in pts if s <= until]
    after = [(s, v) for s, v in pts if s > until]
    if inside and after and inside[-1][0] < until:  # close the window exactly at `until`
        (s0, v0), (s1, v1) = inside[-1], after[0]
        inside.append((until, v0 + (v1 - v0) * (until - s0) / (s1 - s0)))
    if len(inside) < 2:
        return None
    x = np.asarray([s for s, _ in inside], dtype=float)
    y = np.asarray([v for _, v in inside], dtype=float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def area_statistics(per_seed: dict[str, list[Optional[float]]], n_resamples: int, seed: int = 0) -> dict:
    """Per pruned model and for the last-minus-first difference (paired per seed): the mean over seeds of the paired
    area with its bootstrap 95% interval over seeds (``interval``, None without a value) and the per-seed values."""
    out: dict = {}
    series = dict(per_seed)
    if all(k in per_seed for k in PRUNED):  # without_last_mlp's advantage over the control
        series["last_minus_first"] = _advantage(per_seed[PRUNED[1]], per_seed[PRUNED[0]], True)
    for name, values in series.items():
        vals = np.asarray([v for v in values if v is not None], dtype=float)
        ci = bootstrap_ci(vals, np.mean, n_resamples, seed=seed).as_dict() if len(vals) else None
        out[name] = {"interval": ci, "per_seed": values}
    return out


# The verdict fixed before the runs: removing the last MLP speeds early learning when the interval of its paired area
# lies above 0 and the interval of (last − first) too (the first-MLP control loses the same parameters elsewhere).
AREA_THRESHOLD = 0.0
FASTER_CLAIM = "without the last MLP the model learns faster early on (Appendix E)"
CONTROL_CLAIM = "... and faster than without the first MLP (the control)"


def _area_interval(area: dict) -> Optional[Interval]:
    """An area's interval (a run recorded before the one interval shape stores {mean, ci95})."""
    if area.get("interval"):
        return as_interval(area["interval"])
    return as_interval(area) if area.get("ci95") else None


def hurdle_claims(metrics: dict, label: str) -> list[Claim]:
    """The two claims of one hurdle run on its verdict metric (the paired area over the first --area_fraction)."""
    key = "ll_avg_groups" if metrics["mode"] == "macondo" else "train_loss"
    areas = metrics.get("areas", {}).get(key, {})
    setting = f"{label}, {key}, {len(metrics['seeds'])} seeds"
    stat = f"paired area, steps {_first_step(metrics, key)}–{metrics['area_until_step']:g}"
    claims = []
    for text, name, suffix in ((FASTER_CLAIM, "without_last_mlp", ""), (CONTROL_CLAIM, "last_minus_first", ", last − first")):
        interval = _area_interval(areas.get(name, {}))
        if interval is not None:
            n = sum(v is not None for v in areas[name].get("per_seed", metrics["seeds"]))  # the seeds it resamples
            claims.append(Claim(text, setting, stat + suffix, interval, AREA_THRESHOLD, "above", digits=4,
                                not_judged=too_few_seeds(n)))
    return claims


def _first_step(metrics: dict, key: str) -> int:
    """The first point of ``key``'s curve, where its paired area starts: the training loss is first logged at step
    --log_every, the evaluations start at step 0."""
    steps = metrics.get("curve", {}).get("steps") if key == "train_loss" else metrics.get("steps")
    return int(steps[0]) if steps else 0


def _evals(run: dict, k: str, steps: list) -> list:  # None where the run has no value
    return [run["evals"][str(s)].get(k) for s in steps]


def _seed_area(full: dict, pruned: dict, k: str, steps: list, until: float) -> Optional[float]:
    """One seed's paired area of metric ``k``: the training loss over its --log_every curve (Figure 5), the others over
    the eval points."""
    if k != "train_loss":
        return paired_area(steps, _evals(full, k, steps), _evals(pruned, k, steps), _higher_is_better(k), until)
    xs = sorted(int(s) for s in full["curve"])
    a, b = [full["curve"][str(s)] for s in xs], [pruned["curve"].get(str(s)) for s in xs]
    return paired_area(xs, a, b, _higher_is_better(k), until)


def aggregate(records: dict[str, dict[int, dict]], args: HurdleArgs, data) -> dict:
    """Mean and std over seeds of every metric at every eval step (and of the training-loss curve); the comparisons."""
    steps = args.eval_steps()
    models = [m for m in MODELS if records.get(m)]
    full = records[MODELS[0]]
    names = sorted({k for recs in records.values() for r in recs.values() for ev in r["evals"].values() for k in ev},
                   key=lambda k: (not k.startswith("ll_avg"), k))  # ll_avg, ll_avg_groups, ll_1.., train_loss
    mean, std = {m: {} for m in models}, {m: {} for m in models}
    for m in models:
        for k in names:
            mean[m][k], std[m][k] = study.curve_mean_std(_evals(r, k, steps) for r in records[m].values())
    curve_steps = sorted({int(s) for r in full.values() for s in r["curve"]})
    curve = {m: dict(zip(("mean", "std"), study.curve_mean_std([r["curve"].get(str(s)) for s in curve_steps]
                                                                for r in records[m].values()))) for m in models}
    primary = ["ll_avg_groups", "ll_avg"] if data.mode == "macondo" else ["train_loss", "val_loss"]
    pruned = [m for m in PRUNED if m in models]
    by_model = {}
    for m in pruned:
        by_model[m] = {k: compare(steps, mean[MODELS[0]][k], mean[m][k], _higher_is_better(k), args.max_steps, m)
                       for k in primary}
        for k, c in by_model[m].items():  # the same advantage per seed (paired: same init, same batches), mean ± std
            c["paired_mean"], c["paired_std"] = study.curve_mean_std(
                _advantage(_evals(full[seed], k, steps), _evals(records[m][seed], k, steps), _higher_is_better(k))
                for seed in full)
            c["paired_std_at_quarter"] = c["paired_std"][steps.index(c["quarter_step"])]
    comparison = by_model[PRUNED[0]]  # without_last_mlp vs with_last_mlp (the study's pair; kept at the top level)
    # The verdict statistic: per seed, the paired area over the first --area_fraction of training.
    until = args.area_fraction * args.max_steps
    areas = {k: area_statistics({m: [_seed_area(full[s], records[m][s], k, steps, until) for s in sorted(full)]
                                 for m in pruned}, args.bootstrap) for k in primary}
    return {"mode": data.mode, "steps": steps, "seeds": sorted(full), "mean": mean, "std": std,
            "models": models, "curve": {"steps": curve_steps, **curve}, "comparison": comparison,
            "comparison_by_model": by_model, "areas": areas, "area_until_step": until, "verdict_metric": primary[0],
            "per_seed": {m: {str(s): r["evals"] for s, r in records[m].items()} for m in models},
            "same_data_order": all(records[m][s]["data_digest"] == full[s]["data_digest"] for m in models for s in full),
            "train_s": {m: {str(s): r.get("train_s") for s, r in records[m].items()} for m in models}}


# ---------------------------------------------------------------------------------------------------------------- outputs
_COLORS = {"with_last_mlp": "tab:blue", "without_last_mlp": "tab:orange", "without_first_mlp": "tab:green"}
_LABELS = {"with_last_mlp": "with last MLP", "without_last_mlp": "without last MLP",
           "without_first_mlp": "without first MLP (control)"}
_STYLES = {"with_last_mlp": "-", "without_last_mlp": "--", "without_first_mlp": ":"}
_TITLES = {"ll_avg_groups": "log-likelihood of children's names (mean over numbers of children)",
           "ll_avg": "log-likelihood of children's names (mean over children)", "train_loss": "training loss (EMA)",
           "val_loss": "validation loss"}


def _ci(stat: dict) -> str:
    interval = _area_interval(stat or {})
    return "–" if interval is None else interval.fmt(4, "+")


def area_lines(metrics: dict) -> list[str]:
    """The verdict table: paired areas (mean advantage over the first --area_fraction of training) with intervals."""
    rows = [[k, _ci(a.get("without_last_mlp")), _ci(a.get("without_first_mlp")), _ci(a.get("last_minus_first"))]
            for k, a in metrics.get("areas", {}).items()]
    return [f"Paired area from each curve's first point (step 0; the training loss: its first logged step) to step "
            f"{metrics['area_until_step']:g} (the first {metrics['area_until_step'] / metrics['steps'][-1]:.0%} "
            "of training): the pruned model's mean advantage over the full one, per seed (same initial weights, same "
            "batches), mean [bootstrap 95% interval over seeds]; > 0 = ahead. Verdict (fixed before the runs): removing "
            "the last MLP speeds early learning iff its interval and the interval of (last − first) both lie above 0.",
            "", markdown_table(["metric", "without last MLP", "without first MLP", "last − first"], rows), "",
            claims_table(hurdle_claims(metrics, "this run"))]


def markdown_report(args: HurdleArgs, metrics: dict) -> str:
    models = metrics.get("models", list(MODELS[:2]))
    primary = list(metrics["comparison"])
    headers = ["step"] + [f"{_LABELS[m]}: {k}" for k in primary for m in models]
    rows = [[s] + [pm(metrics["mean"][m][k][i], metrics["std"][m][k][i], 3) for k in primary for m in models]
            for i, s in enumerate(metrics["steps"])]
    p = metrics["params"]
    shape = f"{args.n_layer or '-'}x{args.n_embd or '-'}" if args.n_layer or args.n_embd else ""
    text = [f"# MLP hurdle: {metrics['mode']} mode, size {args.size} {shape}, {len(metrics['seeds'])} seed(s), "
            f"{args.max_steps} steps", "", "Parameters: " + "; ".join(f"{_LABELS[m]} {p[m]:,}" for m in models if m in p)
            + f" (vocabulary {metrics['vocab_size']:,}). Mean ± std over seeds.", "", markdown_table(headers, rows)]
    if metrics.get("areas"):
        text += area_lines(metrics)
    if metrics["mode"] == "macondo":
        ns = sorted(k for k in metrics["mean"][MODELS[0]] if k[3:].isdigit())
        text += [f"Per number of children at step {metrics['steps'][-1]} (optimum log(1/n)):", "",
                 markdown_table(["children", "optimum"] + [_LABELS[m] for m in models],
                                [[k[3:], f"{math.log(1 / int(k[3:])):.3f}"] +
                                 [pm(metrics["mean"][m][k][-1], metrics["std"][m][k][-1], 3) for m in models]
                                 for k in ns])]
    for m, comp in metrics.get("comparison_by_model", {MODELS[1]: metrics["comparison"]}).items():
        text.append(f"Advantage of the model {_LABELS[m]} (positive = ahead), paired per seed, mean ± std:\n")
        text.append(markdown_table(["step"] + list(comp),
                                   [[s] + [pm(c["paired_mean"][i], c["paired_std"][i], 3, "+") for c in comp.values()]
                                    for i, s in enumerate(metrics["steps"])]))
        for k, c in comp.items():
            text.append(f"- {k}: lead changes hands at step(s) {c['crossings'] or 'none'}; at step {c['quarter_step']} "
                        f"(~1/4 of training) the model {_LABELS[m]} is ahead by "
                        f"{pm(c['advantage_at_quarter'], c['paired_std_at_quarter'], 3, '+')} "
                        f"({'higher' if _higher_is_better(k) else 'lower'} is better).")
    return "\n".join(text) + "\n"


def _band(std: list) -> Optional[list]:
    """The shaded ±std band of a series (0 where a point has none; no band for a single seed)."""
    return None if all(v is None for v in std) else [v or 0.0 for v in std]


def write_outputs(out: Path, args: HurdleArgs, metrics: dict, started: float) -> dict:
    return study.write_outputs(out, args, metrics, started, hurdle_claims(metrics, "this run"),
                               markdown_report(args, metrics), lambda: _plots(out, args, metrics))


def _plots(out: Path, args: HurdleArgs, metrics: dict) -> list:
    """Figures 4 and 5 (all three variants), the paired advantage and, on Macondo, the log-likelihood per n."""
    steps = metrics["steps"]
    models = metrics.get("models", list(MODELS[:2]))
    plots, curve = [], metrics["curve"]
    shape = f" ({args.n_layer or '-'} blocks x {args.n_embd or '-'})" if args.n_layer or args.n_embd else ""
    for k in metrics["comparison"]:  # Figures 4 and 5: all three variants
        if k == "train_loss":  # Figure 5: the smoothed training loss at --log_every resolution
            series = [dict(x=curve["steps"], y=curve[m]["mean"], std=_band(curve[m]["std"]), label=_LABELS[m],
                           color=_COLORS[m], linestyle=_STYLES[m]) for m in models]
        else:
            series = [dict(x=steps, y=metrics["mean"][m][k], std=_band(metrics["std"][m][k]), label=_LABELS[m],
                           color=_COLORS[m], marker="o", linestyle=_STYLES[m]) for m in models]
        plots.append(line_plot(out / f"{k}.png", series, title=f"{_TITLES[k]}\n{args.size}{shape}, mean ± std over "
                               f"{len(metrics['seeds'])} seed(s)", xlabel="training step", ylabel=k))
    series = [dict(x=steps, y=c["paired_mean"], std=_band(c["paired_std"]), label=f"{_LABELS[m]}: {k}", marker="o",
                   color=_COLORS[m], linestyle=style)
              for m, comp in metrics.get("comparison_by_model", {MODELS[1]: metrics["comparison"]}).items()
              for (k, c), style in zip(comp.items(), ("-", "--"))]
    plots.append(line_plot(out / "advantage.png", series, title="advantage of each pruned model over the full one\n"
                           "(paired per seed, mean ± std; > 0: it is ahead)", xlabel="training step",
                           ylabel="nats", hlines=[dict(y=0.0, color="black", linestyle="-")]))
    if metrics["mode"] == "macondo":
        ns = sorted(int(k[3:]) for k in metrics["mean"][MODELS[0]] if k[3:].isdigit())
        cmap = __import__("matplotlib").colormaps["viridis"]
        series = [dict(x=steps, y=metrics["mean"][m][f"ll_{n}"], label=f"n={n}, {_LABELS[m]}",
                       color=cmap(i / max(1, len(ns) - 1)), linestyle=_STYLES[m])
                  for i, n in enumerate(ns) for m in models]
        hl = [dict(y=math.log(1 / n), color=cmap(i / max(1, len(ns) - 1)), linestyle=(0, (1, 4))) for i, n in enumerate(ns)]
        plots.append(line_plot(out / "ll_by_children.png", series, title="log-likelihood per number of children n\n"
                               "(sparse dots: the optimum log 1/n)",
                               xlabel="training step", ylabel="log-likelihood", hlines=hl))
    return plots


def report_part(metrics: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """knnlm reproduce: the hurdle run's claims (its tables and figures stay in its own results.md and PNGs)."""
    return {}, hurdle_claims(metrics, entry["label"])
