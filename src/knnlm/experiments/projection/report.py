"""The projection study's report: perplexities and shares of kNN's gain with block-bootstrap intervals, solver
statistics, results.md's tables, the claims of Tables 1 and 4 and the report parts of ``knnlm reproduce``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ...claims import Claim, claims_table
from ...report import fmt, markdown_table
from ...stats import BLOCK_TOKENS, Interval, block_bootstrap_ci, no_gain, share_of_gain, too_few_blocks
from .settings import LABELS, MAPS, PAPER_COLUMN, STOP_REASONS, TARGETS, ProjectionArgs

# Chiang et al.: a 16-layer LM on WikiText-103, k = 1024, λ = 0.25, L2
PAPER = {
    "table1": {"setting": "lr 0.1, until ΔKL < 1e-3", "lm": 20.13, "knnlm": 16.92, "f": 16.76, "fg": 16.78},
    "table3": {"f": 0.07, "fg": 0.10},
    "table4": {"setting": "lr 0.001, 100 steps", "lm": 20.13, "knnlm": 16.92, "f": 16.70, "fg": 19.97,
               "fg_to_y": 19.41},
}


def _ppl(logp: np.ndarray) -> float:
    return math.exp(-float(np.mean(logp, dtype=np.float64)))


def _step_histogram(steps: np.ndarray, max_steps: int) -> list[list[int]]:
    """[[lo, hi, count], ...] over bins 1, 2-5, 6-10, 11-20, 21-50, ... up to max_steps (empty bins kept)."""
    edges = [0, 1]
    for decade in (1, 10, 100, 1000, 10000, 100000):
        for mult in (5, 10, 20) if decade == 1 else (2, 5, 10):
            edge = mult * decade
            if edge > edges[-1] and edge < max_steps:
                edges.append(edge)
    edges.append(max(max_steps, edges[-1] + 1))
    counts, _ = np.histogram(steps, bins=np.array(edges) + 0.5)
    return [[edges[i] + 1, edges[i + 1], int(c)] for i, c in enumerate(counts)]


def summarize(arrays: dict[str, np.ndarray], args: ProjectionArgs, **extra) -> dict:
    """Perplexities (with bootstrap 95% intervals over positions) of the LM, the kNN-LM and each p_proj over the same
    tokens, the share of kNN's gain each p_proj recovers, KL and solver statistics; per tolerance in ``by_tol``
    (``targets`` repeats the first tolerance's entry)."""
    lm, knn = arrays["lm"].astype(np.float64), arrays["knnlm"].astype(np.float64)

    def ci(arrays_, stat) -> dict:  # over blocks of consecutive positions, as the memory study's share
        return block_bootstrap_ci(arrays_, stat, BLOCK_TOKENS, n_boot=args.n_boot, seed=args.seed).as_dict()

    def ppl_ci(logp):
        return ci([logp], lambda m: math.exp(-m))

    metrics = {"n_tokens": int(len(arrays["gold"])), "ppl_lm": _ppl(lm), "ppl_knnlm": _ppl(knn),
               "ppl_lm_ci": ppl_ci(lm), "ppl_knnlm_ci": ppl_ci(knn),
               "kl_lm_knnlm": {"mean": float(np.mean(arrays["kl_lm"])), "median": float(np.median(arrays["kl_lm"]))},
               "solver": {"lr": args.learning_rate, "tols": list(args.tol), "max_steps": args.max_steps,
                          "patience": args.patience, "n_boot": args.n_boot, "seed": args.seed},
               "maps": {t: MAPS[t] for t in args.target}, **extra, "by_tol": []}
    for j, tol in enumerate(args.tol):
        entry = {"tol": tol, "targets": {}}
        for t in args.target:
            logp = arrays[f"{t}.logp"][:, j].astype(np.float64)
            kl, kl_init = arrays[f"{t}.kl"][:, j], arrays[f"{t}.kl_init"]
            steps, stop = arrays[f"{t}.steps"][:, j], arrays[f"{t}.stop"][:, j]
            # of mean gold log-probabilities: (log ppl_lm − log ppl_proj) / (log ppl_lm − log ppl_knnlm)
            share = ci([lm, knn, logp], share_of_gain)
            best_step = arrays[f"{t}.best_step"][:, j]
            entry["targets"][t] = {
                "z0": TARGETS[t], "map": MAPS[t], "ppl_proj": _ppl(logp), "ppl_proj_ci": ppl_ci(logp),
                "share_of_knn_gain": share["point"], "share_of_knn_gain_ci": share,
                "kl_mean": float(np.mean(kl)), "kl_median": float(np.median(kl)),
                "kl_init_mean": float(np.mean(kl_init)), "kl_init_median": float(np.median(kl_init)),
                # the best iterate includes z0, so this is 0 for the KL targets (fg_to_y minimises another objective)
                "worse_than_start_fraction": float(np.mean(kl > kl_init)) if t != "fg_to_y" else None,
                "steps_mean": float(np.mean(steps)), "steps_median": float(np.median(steps)),
                "steps_max": int(steps.max()), "best_step_median": float(np.median(best_step)),
                # stopped by the cap with the best iterate at the last step: still improving, the solution unfinished
                "still_improving_fraction": float(np.mean((stop == 2) & (best_step == steps))),
                "stopped_by": {r: int(np.sum(stop == i)) for i, r in enumerate(STOP_REASONS)},
                "capped_fraction": float(np.mean(stop == 2)),
                "steps_histogram": _step_histogram(steps, args.max_steps),
                "lr": args.learning_rate, "tol": tol, "max_steps": args.max_steps, "patience": args.patience}
        if "fg" in args.target:  # Table 4: f∘g's gain over the LM as a share of each f's
            fg = arrays["fg.logp"][:, j].astype(np.float64)
            entry["fg_gain_over_f_gain"] = {f: ci([lm, arrays[f"{f}.logp"][:, j], fg], share_of_gain)
                                            for f in ("f_out", "f_norm") if f in args.target}
        metrics["by_tol"].append(entry)
    metrics.update(targets=metrics["by_tol"][0]["targets"], paper=PAPER)
    return metrics


def _ci(d: dict) -> str:
    return Interval.from_dict(d).fmt()


def results_table(metrics: dict, claims: list[Claim]) -> str:
    """Markdown: for each tolerance, perplexity in the layout of Tables 1 and 4 (with 95% intervals and the share of
    kNN's gain), KL in the layout of Table 3, the solver's statistics (every table names its maps), then ``claims``."""
    sv = metrics["solver"]
    targets = list(metrics["maps"])
    maps = "".join(f"- **{LABELS[t]}**: {metrics['maps'][t]}\n" for t in targets)
    text = (f"Maps (`--target`):\n\n{maps}\nSolver: Adam, lr {sv['lr']}, ≤ {sv['max_steps']} steps, patience "
            f"{sv['patience'] or 'off'}; each position keeps its best iterate (z0 included). "
            f"{metrics['n_tokens']} tokens; intervals: bootstrap 95% over blocks of {BLOCK_TOKENS} consecutive "
            f"positions ({sv['n_boot']} resamples, seed {sv['seed']}); "
            "share = (log ppl_lm − log ppl_proj) / (log ppl_lm − log ppl_knnlm).\n")
    heads = ["run", "LM", "kNN-LM"] + [LABELS[t] for t in targets]
    paper_rows = [[f"paper Table {n[-1]} ({PAPER[n]['setting']})", PAPER[n]["lm"], PAPER[n]["knnlm"]]
                  + [PAPER[n].get(PAPER_COLUMN[t]) for t in targets] for n in ("table1", "table4")]
    for entry in metrics["by_tol"]:
        tg, tol = entry["targets"], entry["tol"]
        ours = [f"ours (tol {tol:g})", _ci(metrics["ppl_lm_ci"]), _ci(metrics["ppl_knnlm_ci"])]
        rows = paper_rows + [ours + [_ci(tg[t]["ppl_proj_ci"]) for t in targets],
                             ["share of kNN's gain", "0", "1"] + [_ci(tg[t]["share_of_knn_gain_ci"]) for t in targets]]
        text += (f"\n## Tolerance {tol:g}\n\n### Perplexity (layout of Tables 1 and 4; f as listed above)\n\n"
                 + markdown_table(heads, rows))
        kl_rows = [["paper Table 3 (mean)"] + [PAPER["table3"].get(PAPER_COLUMN[t]) for t in targets],
                   ["ours, mean"] + [tg[t]["kl_mean"] for t in targets],
                   ["ours, median"] + [tg[t]["kl_median"] for t in targets],
                   ["ours at z0 (before solving), mean"] + [tg[t]["kl_init_mean"] for t in targets],
                   ["ours at z0, median"] + [tg[t]["kl_init_median"] for t in targets]]
        text += (f"\n### KL[p_proj ‖ p_knnlm] in nats (layout of Table 3), tol {tol:g}\n\n"
                 + markdown_table(["run"] + [LABELS[t] for t in targets], kl_rows, digits=4))
        step_rows = [[LABELS[t], *(tg[t]["stopped_by"][r] for r in STOP_REASONS),
                      *(tg[t][k] for k in ("steps_mean", "steps_median", "steps_max", "best_step_median")),
                      "–" if tg[t]["worse_than_start_fraction"] is None else 100 * tg[t]["worse_than_start_fraction"]]
                     for t in targets]
        text += (f"\n### Solver, tol {tol:g}\n\n"
                 + markdown_table(["target", "stopped by tol", "by patience", "by max_steps", "steps mean",
                                   "median", "max", "best step median", "% ending worse than z0"], step_rows, digits=1))
        bins = tg[targets[0]]["steps_histogram"]
        hist_rows = [[f"{lo}" if lo == hi else f"{lo}–{hi}"] + [
            next(c for a, b, c in tg[t]["steps_histogram"] if a == lo) for t in targets] for lo, hi, _ in bins]
        text += (f"\nSteps per position (histogram; PNGs `steps_<target>_tol{tol:g}.png`):\n\n"
                 + markdown_table(["steps"] + [LABELS[t] for t in targets], hist_rows))
    text += (f"\nKL[p_lm ‖ p_knnlm]: mean {fmt(metrics['kl_lm_knnlm']['mean'], 4)}, "
             f"median {fmt(metrics['kl_lm_knnlm']['median'], 4)}. k = {metrics.get('k')}, λ = {metrics.get('lmbda')} "
             f"(weight of p_knn), T = {metrics.get('knn_temp')}, datastore N = {metrics.get('datastore_N')}.\n")
    timing = metrics.get("timing")
    if timing:
        text += (f"Wall time {timing['wall_s']:.0f} s; solver: "
                 + ", ".join(f"{LABELS[t]} {s:.0f} s" for t, s in timing.get("solve_s", {}).items()) + ".\n")
    return text + (f"\n## Claims\n\n{claims_table(claims)}" if claims else "")


# ---------------------------------------------------------------------------------------------------------------- claims
# The paper's criteria, fixed before any run:
#  Tables 1/3: f(z*) "reaches the kNN-LM's perplexity": the 95% interval of the share of kNN's gain lies above 0.9.
#  Table 4:    at lr 0.001 for 100 steps f∘g gains less than half of what f gains: the 95% interval of
#              (log ppl_lm − log ppl_fg) / (log ppl_lm − log ppl_f) lies below 0.5. f∘g is f_norm∘g, so f_norm is the
#              like-for-like f; the paper's f (f_out, no norm) is reported beside it.
#  A Table 1 solution is unfinished when more than NOT_CONVERGED_SHARE of its positions hit --max_steps still improving:
#  its share is then a lower bound of the converged one (claims.Claim.lower_bound).
SHARE_THRESHOLD, RATIO_THRESHOLD, NOT_CONVERGED_SHARE = 0.9, 0.5, 0.05
# Each table's claim is judged only on a run at that table's solver setting (the other's is not judged)
TABLE1_SETTING, TABLE4_SETTING = {"lr": 0.1}, {"lr": 0.001, "max_steps": 100}
CLAIM_NAMES = {"f_out": "f(z*) reaches the kNN-LM's perplexity (Table 1; f = output layer, the paper's f)",
               "f_norm": "f_norm(z*) reaches the kNN-LM's perplexity (Table 1; final norm + output layer)",
               "fg": "f∘g(z*) reaches the kNN-LM's perplexity (Table 1)"}
TABLE4_CLAIM = "with a small learning rate f∘g gains less than half of what f gains (Table 4)"


def _still_improving(v: dict, max_steps: int) -> Optional[float]:
    """The share of positions still improving at the cap; for a run that predates the count, at least half when the
    median best step is the cap, else unknown (None)."""
    if "still_improving_fraction" in v:
        return v["still_improving_fraction"]
    return 0.5 if v.get("best_step_median", 0) >= max_steps else None


def other_setting(metrics: dict, table: str, setting: dict) -> str:
    """Why a run's solver setting is not ``table``'s ("" where it is, or where the run did not record its lr)."""
    solver = metrics.get("solver", {})
    if "lr" not in solver or all(solver.get(k) == v for k, v in setting.items()):
        return ""
    want = ", ".join(f"{k} {v:g}" for k, v in setting.items())
    return f"not {table}'s setting ({want}; this run: " + ", ".join(f"{k} {solver.get(k)}" for k in setting) + ")"


def table1_claims(metrics: dict, label: str) -> list[Claim]:
    """Per tolerance and KL target: does p_proj reach the kNN-LM (share of kNN's gain above 0.9)?"""
    out = []
    few = (other_setting(metrics, "Table 1", TABLE1_SETTING) or too_few_blocks(metrics.get("n_tokens"))
           or no_gain(metrics.get("ppl_lm"), metrics.get("ppl_knnlm"), "the kNN-LM"))
    for entry in metrics["by_tol"]:
        for t in ("f_out", "f_norm", "fg"):
            v = entry["targets"].get(t)
            if v is None:
                continue
            share = _still_improving(v, v.get("max_steps", metrics["solver"]["max_steps"]))
            unfinished = "" if share is None or share <= NOT_CONVERGED_SHARE else (
                f"not converged: {share:.0%} of positions still improving at step {v['max_steps']}")
            out.append(Claim(CLAIM_NAMES[t], f"{label}, tol {entry['tol']:g}", "share of kNN's log-ppl gain",
                             Interval.from_dict(v["share_of_knn_gain_ci"]), SHARE_THRESHOLD, "above",
                             not_judged=few, lower_bound=unfinished))
    return out


def claims(metrics: dict, label: str) -> list[Claim]:
    """Table 1's claims and Table 4's of one run (what `knnlm analyze projection` writes into results.json); each
    table's judged only at its solver setting (Table 1: lr 0.1; Table 4: lr 0.001, 100 steps, tolerance 0)."""
    return table1_claims(metrics, label) + table4_claims(metrics, label)


def table4_entry(metrics: dict) -> dict:
    """The tolerance Table 4 reads: 0 (every position runs its 100 steps), else the run's first."""
    return next((e for e in metrics["by_tol"] if e["tol"] == 0), metrics["by_tol"][0])


def table4_claims(metrics: dict, label: str) -> list[Claim]:
    """f∘g's gain as a share of f_norm's (like with like) and of f_out's (the paper's f), at tolerance 0."""
    first = table4_entry(metrics)
    ratios = first.get("fg_gain_over_f_gain", {})
    names = {"f_norm": "vs f_norm (like with like)", "f_out": "vs f_out (the paper's f)"}
    unstopped = "" if first["tol"] == 0 else \
        f"not Table 4's setting (every position runs its steps: --tol 0; this run's tolerances: {first['tol']:g})"
    few = (other_setting(metrics, "Table 4", TABLE4_SETTING) or unstopped or too_few_blocks(metrics.get("n_tokens")))
    return [Claim(TABLE4_CLAIM, f"{label}, {names[f]}", "f∘g gain / f gain (log ppl)", Interval.from_dict(ratios[f]),
                  RATIO_THRESHOLD, "below",
                  not_judged=few or no_gain(metrics.get("ppl_lm"), first["targets"].get(f, {}).get("ppl_proj"), f))
            for f in ("f_norm", "f_out") if f in ratios]


# ---------------------------------------------------------------------------------------------------------------- report
# knnlm reproduce's tables: (title, headers, the paper's rows). f = the paper's f (f_out); f_norm = final norm + output
# layer; f∘g = f_norm∘g (docs/projection.md).
_GAIN_RATIO = math.log(PAPER["table4"]["lm"] / PAPER["table4"]["fg"]) / math.log(PAPER["table4"]["lm"] / PAPER["table4"]["f"])
TABLES = {
    "table1": ("Table 1 — perplexity of p_proj (Eq. 2, lr 0.1), 95% block-bootstrap intervals, by stopping tolerance",
               ["model", "tol", "LM", "kNN-LM", "f → p_knnlm", "f_norm → p_knnlm", "f∘g → p_knnlm",
                "still improving at the cap (f, f_norm, f∘g)"],
               [["paper (16-layer WT-103 LM)", "", PAPER["table1"]["lm"], PAPER["table1"]["knnlm"],
                 PAPER["table1"]["f"], "–", PAPER["table1"]["fg"], ""]]),
    "table3": ("Table 3 — mean KL[p_proj ‖ p_knnlm], by stopping tolerance", ["model", "tol", "f", "f_norm", "f∘g"],
               [["paper", "", PAPER["table3"]["f"], "–", PAPER["table3"]["fg"]]]),
    "table4": ("Table 4 — projection with lr 0.001, 100 steps (f = output layer only; f∘g = f_norm∘g, so f_norm is "
               "the like-for-like f)",
               ["model", "LM", "kNN-LM", "f", "f_norm", "f∘g", "f∘g → y", "f∘g gain / f_norm gain",
                "f∘g gain / f gain"],
               [["paper", PAPER["table4"]["lm"], PAPER["table4"]["knnlm"], PAPER["table4"]["f"], "–",
                 PAPER["table4"]["fg"], PAPER["table4"]["fg_to_y"], "–", f"{_GAIN_RATIO:.2f}"]]),
}


def _ppl_cell(v: Optional[dict]) -> Optional[str]:
    return None if not v else _ci(v["ppl_proj_ci"])


def table1_rows(metrics: dict, entry: dict, out: Path) -> dict[str, list]:
    """Tables 1 and 3: one row per tolerance."""
    lm, knn = _ci(metrics["ppl_lm_ci"]), _ci(metrics["ppl_knnlm_ci"])
    rows1, rows3 = [], []
    for e in metrics["by_tol"]:
        tg = {t: e["targets"].get(t) for t in ("f_out", "f_norm", "fg")}
        cells = [None if v is None else f"{_ppl_cell(v)}; share {v['share_of_knn_gain']:.2f}" for v in tg.values()]
        improving = ", ".join("–" if v is None or "still_improving_fraction" not in v else
                              f"{v['still_improving_fraction']:.0%}" for v in tg.values())
        rows1.append([entry["label"], f"{e['tol']:g}", lm, knn, *cells, improving])
        rows3.append([entry["label"], f"{e['tol']:g}"] + [None if v is None else v["kl_mean"] for v in tg.values()])
    return {"table1": rows1, "table3": rows3}


def table4_rows(metrics: dict, entry: dict, out: Path) -> dict[str, list]:
    e = table4_entry(metrics)
    ratios = e.get("fg_gain_over_f_gain", {})
    return {"table4": [[entry["label"], metrics["ppl_lm"], metrics["ppl_knnlm"]]
                       + [_ppl_cell(e["targets"].get(t)) for t in ("f_out", "f_norm", "fg", "fg_to_y")]
                       + [_ci(ratios[f]) if f in ratios else None for f in ("f_norm", "f_out")]]}


def table1_part(metrics: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """knnlm reproduce: Tables 1 and 3 (a row per tolerance) and the Table 1 claims of one projection run."""
    return table1_rows(metrics, entry, out), table1_claims(metrics, entry["label"])


def table4_part(metrics: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """knnlm reproduce: Table 4's row and claims of one run at Table 4's settings."""
    return table4_rows(metrics, entry, out), table4_claims(metrics, entry["label"])
