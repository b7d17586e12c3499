"""Writes docs/results/fidelity-2026-12-05/{results.md,results.json,claims.md} from the run folders of issue 29's
items 4 and 2 (the hurdle at 10 seeds, SmolLM2 at several training lengths), through the recipe's own report parts.

    PYTHONPATH=src python scripts/fidelity_results.py RUNS_DIR OUT_DIR --time STAGE=SECONDS ...
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np

from knnlm.claims import claims_table
from knnlm.experiments.overspec.lengths import overspec_lengths
from knnlm.experiments.reproduce import _table_sections, collect
from knnlm.fileio import atomic_write_json, atomic_write_text, read_json
from knnlm.report import markdown_table

ENTRIES = [
    {"study": "hurdle", "folder": "hurdle-deep-macondo", "label": "Macondo (cpu-deep)"},
    {"study": "hurdle", "folder": "hurdle-deep-wikitext", "label": "WikiText-2 (cpu-deep)"},
    {"study": "overspec_lengths", "folder": "overspec-smollm2-lengths",
     "label": "SmolLM2-135M fine-tuned (cpu-smollm2-lengths; 3 seeds)"},
]
# Student t 0.975 quantiles by degrees of freedom (the hurdle's secondary reading, criteria.md)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_reading(runs: Path) -> list[list]:
    """Per hurdle run and area: the bootstrap interval (the verdict's) beside mean ± t · sd / sqrt(n)."""
    rows = []
    for e in ENTRIES[:2]:
        path = runs / e["folder"] / "results.json"
        if not path.is_file():
            continue
        m = read_json(path)["metrics"]
        key = "ll_avg_groups" if m["mode"] == "macondo" else "train_loss"
        for name, area in m["areas"][key].items():
            v = np.asarray([x for x in area["per_seed"] if x is not None], float)
            half = T975[len(v) - 1] * v.std(ddof=1) / math.sqrt(len(v))
            ci = area["interval"]
            rows.append([e["label"], key, name, len(v), f"{v.mean():+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]",
                         f"[{v.mean() - half:+.4f}, {v.mean() + half:+.4f}]",
                         "above 0" if v.mean() - half > 0 else "below 0" if v.mean() + half < 0 else "straddles 0"])
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs")
    p.add_argument("out")
    p.add_argument("--time", action="append", default=[], help="STAGE=SECONDS (measured wall time)")
    a = p.parse_args()
    runs, out = Path(a.runs), Path(a.out)
    claims, tables, missing = collect(runs, ENTRIES)
    times = {k: float(v) for k, v in (t.split("=") for t in a.time)}
    lengths = None
    if (runs / ENTRIES[2]["folder"] / "results.json").is_file():
        lengths = overspec_lengths(runs / ENTRIES[2]["folder"])
    t_rows = t_reading(runs)
    parts = ["# Issue 29, items 4 and 2: results (2026-12-05, 2-core CPU)\n",
             "Criteria: [criteria.md](criteria.md), committed before the runs. Verdicts from `knnlm.claims.judge`.\n",
             "## Claims\n", claims_table(claims), *(f"- not run: {m}\n" for m in missing), "",
             *_table_sections(tables)]
    if t_rows:
        parts += ["## Hurdle: secondary reading of the interval over seeds (not the verdict)\n",
                  markdown_table(["run", "metric", "area", "seeds", "mean [bootstrap 95%]", "Student t 95%",
                                  "t interval"], t_rows)]
    if times:
        parts += ["## Wall time (measured)\n", markdown_table(["stage", "wall s"], [[k, v] for k, v in times.items()])]
    atomic_write_text(out / "results.md", "\n".join(parts) + "\n")
    atomic_write_text(out / "claims.md", claims_table(claims) + "\n")
    atomic_write_json(out / "results.json", {"claims": [c.record() for c in claims], "tables": tables,
                                             "overspec_lengths": lengths, "hurdle_t_reading": t_rows,
                                             "wall_s": times})


if __name__ == "__main__":
    main()
