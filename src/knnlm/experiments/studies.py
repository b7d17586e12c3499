"""The registry of studies ``knnlm reproduce`` reports: a name (a recipe's ``report: studies:`` entry names it) -> the
study's report part ``(metrics, entry, out) -> ({table: rows}, [Claim])`` and the tables it fills (title, headers,
the paper's rows; ``headers`` None: a text section).

A recipe entry is ``{study: NAME, folder: STAGE_FOLDER, label: TEXT, ...}`` (extra keys are the study's: ``data``,
``lm``, ``datastore`` for the memory). Adding a study: its module with a ``report_part``, one line here, recipe stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import hurdle, overspec, own_data, projection


@dataclass(frozen=True)
class Study:
    report: Callable[[dict, dict, Path], tuple]  # (metrics, entry, out) -> ({table: rows}, [Claim])
    tables: dict  # table -> (title, headers | None, paper rows)


def _projection(rows, claims):
    return lambda m, e, out: (rows(m, e, out), claims(m, e["label"]))


STUDIES = {
    "memory": Study(own_data.report_part, own_data.TABLES),
    "projection": Study(_projection(projection.table1_rows, projection.table1_claims),
                        {k: projection.TABLES[k] for k in ("table1", "table3")}),
    "table4": Study(_projection(projection.table4_rows, projection.table4_claims),
                    {"table4": projection.TABLES["table4"]}),
    "overspec": Study(overspec.report_part, overspec.TABLES),
    "hurdle": Study(hurdle.report_part, {}),
}
# The report's order of tables (a study's tables outside it come after).
TABLE_ORDER = ("table1", "table2", "table2_macondo", "table3", "table4", "table5")
