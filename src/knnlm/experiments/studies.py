"""The registry of studies: a name (a recipe's ``report: studies:`` entry names it) -> the study's report part
``(metrics, entry, out) -> ({table: rows}, [Claim])`` (None: the study fills no table and makes no claim), the tables it
fills (title, headers, the paper's rows; ``headers`` None: a text section) and the ``--smoke`` flags of its commands.

A recipe entry is ``{study: NAME, folder: STAGE_FOLDER, label: TEXT, ...}`` (extra keys are the study's: ``data``, ``mlp``,
``lm``, ``datastore``, ``converged`` for the memory; ``memory`` for memory_control). Adding a study: its folder ``experiments/<study>/`` (settings, run, report), one
line here, its recipe stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .hurdle import report as hurdle, settings as hurdle_settings
from .lm import settings as lm_settings
from .memory import report as memory
from .overspec import lengths as overspec_lengths, report as overspec, settings as overspec_settings
from .projection import report as projection, settings as projection_settings
from .retomaton import report as retomaton, settings as retomaton_settings


@dataclass(frozen=True)
class Study:
    report: Optional[Callable[[dict, dict, Path], tuple]]  # (metrics, entry, out) -> ({table: rows}, [Claim])
    tables: dict  # table -> (title, headers | None, paper rows)
    smoke: dict = field(default_factory=dict)  # `knnlm reproduce --smoke`: command -> the flags that shrink it


STUDIES = {
    "lm": Study(None, {}, lm_settings.SMOKE),
    "memory": Study(memory.report_part, memory.TABLES, memory.SMOKE),
    "memory_control": Study(memory.control_part, memory.CONTROL_TABLES),
    "projection": Study(projection.table1_part, {k: projection.TABLES[k] for k in ("table1", "table3")},
                        projection_settings.SMOKE),
    "table4": Study(projection.table4_part, {"table4": projection.TABLES["table4"]}, projection_settings.SMOKE),
    "overspec": Study(overspec.report_part, overspec.TABLES, overspec_settings.SMOKE),
    "hurdle": Study(hurdle.report_part, hurdle.TABLES, hurdle_settings.SMOKE),
    "overspec_lengths": Study(overspec_lengths.report_part, overspec_lengths.TABLES, overspec_settings.SMOKE),
    "retomaton": Study(retomaton.report_part, retomaton.TABLES, retomaton_settings.SMOKE),
}
# The report's order of tables (a study's tables outside it come after).
TABLE_ORDER = ("table1", "table2", "table2_macondo", "table3", "table4", "table5")
