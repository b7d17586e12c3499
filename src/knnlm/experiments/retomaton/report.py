"""The RetoMaton study's report: the table (perplexity and fraction of saved searches per setting, against the kNN-LM),
the figure (the paper's Fig. 2: perplexity against the fraction of saved searches) and the report part of
``knnlm reproduce``: the table and the claim, judged from two block-bootstrap intervals over tokens (RetoMaton at the
smallest --min_knns: its fraction of saved searches, its perplexity against the kNN-LM's on the same tokens); the other
rows are point estimates, judged by nothing."""
from __future__ import annotations

from pathlib import Path

from ...claims import Claim, claims_table
from ...report import line_plot, markdown_table
from ...stats import Interval, too_few_blocks
from .settings import CLUSTERS, RANDOM, RETOMATON

HEADERS = ["variant", "setting", "fraction of saved searches", "perplexity", "neighbours per step", "vs kNN-LM"]
STYLES = {RETOMATON: ("tab:blue", "o"), CLUSTERS: ("tab:green", "s"), RANDOM: ("tab:red", "^")}
FIGURE = "retomaton.png"
TABLES = {"retomaton": ("RetoMaton (Alon et al. 2022, Fig. 2) — perplexity against the fraction of saved searches "
                        "(point estimates, exact distances; the claim's intervals in the claims table)", ["model", *HEADERS], [])}


# The claim, fixed before the full-size run: RetoMaton's smallest --min_knns saves at least half of the searches within
# 1% of the kNN-LM's perplexity. Two intervals, two records (both must hold): the 95% interval of the fraction of saved
# searches lies above SAVED_AT_LEAST, and that of ppl_retomaton / ppl_knnlm − 1 below WITHIN.
SAVED_AT_LEAST, WITHIN = 0.5, 0.01
CLAIM_SAVED = "RetoMaton at the smallest min_knns saves >= 50% of the searches"
CLAIM_PPL = "RetoMaton at the smallest min_knns stays within 1% of the kNN-LM's perplexity"


def claim(metrics: dict, label: str) -> list[Claim]:
    c = metrics.get("claim")
    if not c:
        return []
    setting, few = f"{label}, min_knns {c['min_knns']}", too_few_blocks(metrics.get("n_tokens"))
    nan = float("nan")
    saved = Interval.from_dict(c["saved"]) if "saved" in c else Interval(c["foss"], nan, nan)
    return [Claim(CLAIM_SAVED, setting, "fraction of saved searches", saved, SAVED_AT_LEAST, "above",
                  not_judged=few or ("" if "saved" in c else "no per-token search flags in this run (rerun it)"),
                  digits=3),
            Claim(CLAIM_PPL, setting, "ppl_retomaton / ppl_knnlm − 1", Interval.from_dict(c["ppl_ratio_minus_1"]),
                  WITHIN, "below", not_judged=few, digits=3)]


def rows(metrics: dict) -> list[list]:
    """One row per setting: series, setting, fraction saved, perplexity, neighbours per step, relative to the kNN-LM."""
    knn = metrics["ppl_knnlm"]
    return [[r["series"], r["setting"], r["metrics"]["foss"], r["metrics"]["ppl_knnlm"],
             r["metrics"]["candidates_per_step"], r["metrics"]["ppl_knnlm"] / knn - 1] for r in metrics["runs"]]


def results_table(metrics: dict, claims: list) -> str:
    """results.md: the table, the run's settings and the LM's perplexity, then ``claims``."""
    return (markdown_table(HEADERS, rows(metrics), digits=3)
            + f"\nLM perplexity {metrics['ppl_lm']:.3f}; {metrics['n_tokens']} tokens, k {metrics['k']}, nprobe "
              f"{metrics['nprobe']}, λ {metrics['lmbda']}, T {metrics['knn_temp']}, datastore N "
              f"{metrics['datastore_N']}, exact distances, {metrics['batch_size']} streams; the rows are point estimates (one "
              f"evaluation per setting; the claim's intervals: 95% block bootstrap over tokens).\n"
            + (f"\n## Claims\n\n{claims_table(claims)}" if claims else ""))


def figure(path: Path, metrics: dict) -> Path:
    """Perplexity against the fraction of saved searches, each series from the kNN-LM's point (0 saved) on."""
    knn = metrics["ppl_knnlm"]
    series = []
    for name in (RETOMATON, CLUSTERS, RANDOM):
        runs = [r["metrics"] for r in metrics["runs"] if r["series"] == name]
        if not runs:
            continue
        points = sorted([(0.0, knn)] + [(m["foss"], m["ppl_knnlm"]) for m in runs])
        series.append({"x": [x for x, _ in points], "y": [y for _, y in points], "label": name,
                       "color": STYLES[name][0], "marker": STYLES[name][1]})
    line_plot(path, series, title=f"RetoMaton: perplexity vs saved searches ({metrics['n_tokens']} tokens)",
              xlabel="fraction of saved searches", ylabel="perplexity",
              hlines=[{"y": knn, "color": "gray", "linestyle": ":", "label": "kNN-LM"},
                      {"y": metrics["ppl_lm"], "color": "black", "linestyle": "--", "label": "LM"}])
    return path


def report_part(metrics: dict, entry: dict, out: Path) -> tuple[dict, list]:
    """knnlm reproduce: the study's rows under the run's label and its claim (from its interval)."""
    return {"retomaton": [[entry["label"], *row] for row in rows(metrics)]}, claim(metrics, entry["label"])
