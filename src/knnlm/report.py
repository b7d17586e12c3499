"""Run outputs: results.json with provenance, markdown tables, PNG plots."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .fileio import atomic_path, atomic_write_json, atomic_write_text, run_info

log = logging.getLogger(__name__)


def write_results(out_dir: str | Path, config: dict, metrics: dict, started: float | None = None, **extra) -> Path:
    """Writes ``results.json``: the resolved config, the metrics and the run's provenance (versions, git hash, wall time)."""
    run = run_info()
    if started is not None:
        run["started"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
        run["wall_s"] = round(time.time() - started, 3)
    path = atomic_write_json(Path(out_dir) / "results.json", {"config": config, "metrics": metrics, "run": run, **extra})
    log.info("wrote %s", path)
    return path


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pm(mean, std, digits: int = 2, sign: str = "") -> str:
    """'mean ± std' with ``digits`` decimals: '–' without a mean, the mean alone without a std (a single seed)."""
    if mean is None:
        return "–"
    value = f"{mean:{sign}.{digits}f}"
    return value if std is None else f"{value} ± {std:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], digits: int = 2) -> str:
    """A GitHub markdown table; floats shown with ``digits`` decimals."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(out_dir: str | Path, text: str, name: str = "results.md") -> Path:
    return atomic_write_text(Path(out_dir) / name, text)


def finish_outputs(out_dir: str | Path, config: dict, metrics: dict, markdown: str, started: float | None = None,
                   plots: Optional[Callable[[], object]] = None, markdown_name: str = "results.md", **extra) -> Path:
    """A run's outputs in the order that keeps its folder honest: the earlier ``results.json`` removed, the markdown
    and the plots (``plots()``) written, then ``results.json`` last (:func:`write_results`). A kill then never leaves
    a new results.json beside an earlier run's markdown or plots, and a folder holding results.json is finished."""
    (Path(out_dir) / "results.json").unlink(missing_ok=True)
    write_markdown(out_dir, markdown, markdown_name)
    if plots is not None:
        plots()
    return write_results(out_dir, config, metrics, started, **extra)


def line_plot(path: str | Path, series: Sequence[dict], title: str = "", xlabel: str = "", ylabel: str = "",
              hlines: Sequence[dict] = ()) -> Path:
    """Saves a PNG line plot.

    ``series``: dicts with ``x``, ``y`` and optional ``std`` (shaded band), ``label``, ``color``, ``linestyle``, ``marker``.
    ``hlines``: dicts with ``y`` and optional ``color``, ``linestyle``, ``label``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for s in series:
        x, y = np.asarray(s["x"]), np.asarray(s["y"], dtype=float)
        ax.plot(x, y, label=s.get("label"), color=s.get("color"), linestyle=s.get("linestyle", "-"),
                marker=s.get("marker"))
        if s.get("std") is not None:
            std = np.asarray(s["std"], dtype=float)
            ax.fill_between(x, y - std, y + std, color=s.get("color"), alpha=0.15, linewidth=0)
    for h in hlines:
        ax.axhline(h["y"], color=h.get("color", "grey"), linestyle=h.get("linestyle", "--"), linewidth=1,
                   label=h.get("label"))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(s.get("label") for s in series):
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def histogram(path: str | Path, values, bins: int = 50, title: str = "", xlabel: str = "", log_x: bool = False) -> Path:
    """Saves a PNG histogram (optionally over log10 of the values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    v = np.asarray(values, dtype=float)
    if log_x:
        v = np.log10(np.clip(v, 1e-12, None))
        xlabel = f"log10 {xlabel}"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.hist(v, bins=bins, color="tab:blue", alpha=0.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
