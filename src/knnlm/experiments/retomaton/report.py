"""The RetoMaton study's report: the table (perplexity and fraction of saved searches per setting, against the kNN-LM),
the figure (the paper's Fig. 2: perplexity against the fraction of saved searches) and the report part of
``knnlm reproduce`` (a table, no claim: one evaluation per setting gives point estimates, no interval)."""
from __future__ import annotations

from pathlib import Path

from ...report import line_plot, markdown_table
from .settings import CLUSTERS, RANDOM, RETOMATON

HEADERS = ["variant", "setting", "fraction of saved searches", "perplexity", "neighbours per step", "vs kNN-LM"]
STYLES = {RETOMATON: ("tab:blue", "o"), CLUSTERS: ("tab:green", "s"), RANDOM: ("tab:red", "^")}
FIGURE = "retomaton.png"
TABLES = {"retomaton": ("RetoMaton (Alon et al. 2022, Fig. 2) — perplexity against the fraction of saved searches "
                        "(point estimates, exact distances)", ["model", *HEADERS], [])}


def rows(metrics: dict) -> list[list]:
    """One row per setting: series, setting, fraction saved, perplexity, neighbours per step, relative to the kNN-LM."""
    knn = metrics["ppl_knnlm"]
    return [[r["series"], r["setting"], r["metrics"]["foss"], r["metrics"]["ppl_knnlm"],
             r["metrics"]["candidates_per_step"], r["metrics"]["ppl_knnlm"] / knn - 1] for r in metrics["runs"]]


def results_table(metrics: dict) -> str:
    """results.md: the table, the run's settings and the LM's perplexity."""
    return (markdown_table(HEADERS, rows(metrics), digits=3)
            + f"\nLM perplexity {metrics['ppl_lm']:.3f}; {metrics['n_tokens']} tokens, k {metrics['k']}, nprobe "
              f"{metrics['nprobe']}, λ {metrics['lmbda']}, T {metrics['knn_temp']}, datastore N "
              f"{metrics['datastore_N']}, exact distances, {metrics['batch_size']} streams; point estimates (one "
              f"evaluation per setting).\n")


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
    """knnlm reproduce: the study's rows under the run's label; no claim (no interval: the brief judges none from a
    point estimate)."""
    return {"retomaton": [[entry["label"], *row] for row in rows(metrics)]}, []
