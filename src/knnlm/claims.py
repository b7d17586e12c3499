"""A claim of the paper judged on one setting: the one record every study's report part returns.

A :class:`Claim` names what is claimed (``claim``), where it was measured (``setting``), the statistic, its interval
(:class:`knnlm.stats.Interval`), a threshold (a constant beside the claim in the study that makes it) and the side of
it the paper claims (``direction``: "above" or "below"). Its verdict comes from :func:`judge` alone:

- "holds": the whole interval lies on the claimed side of the threshold;
- "does not hold": the whole interval lies on the other side;
- "inconclusive": the interval touches or straddles the threshold (or is undefined).

Two facts about the setting (never about the point estimate) qualify it:

- ``not_judged`` (a reason): the setting is not the paper's (the memory trained on text the LM was not trained on, a
  model that did not fit its training data): the verdict is "not judged" and the numbers are shown for reference.
- ``lower_bound`` (a reason): the statistic is a lower bound of the one the paper means (a solver still improving at its
  last step): only the verdict the bound still supports stands ("holds" for "above", "does not hold" for "below");
  otherwise the verdict is "inconclusive (not converged)".

``Claim.record()`` is what results.json stores under ``claims``; :func:`check_record` re-derives a stored verdict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from .stats import Interval

HOLDS, FAILS, INCONCLUSIVE, NOT_JUDGED = "holds", "does not hold", "inconclusive", "not judged"
NOT_CONVERGED = "inconclusive (not converged)"
Direction = Literal["above", "below"]


def judge(interval: Interval, threshold: float, direction: Direction) -> str:
    """The verdict of a claim from its interval, its threshold and the claimed side: holds / does not hold /
    inconclusive (module docstring). An interval with a non-finite end is inconclusive."""
    lo, hi = interval.lo, interval.hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    claimed = lo > threshold if direction == "above" else hi < threshold
    other = hi < threshold if direction == "above" else lo > threshold
    return HOLDS if claimed else FAILS if other else INCONCLUSIVE


@dataclass(frozen=True)
class Claim:
    claim: str  # what the paper claims, e.g. "f(z*) reaches the kNN-LM's perplexity (Table 1)"
    setting: str  # where it was measured, e.g. "SmolLM2-135M, tol 0.001"
    statistic: str  # what the interval is of, e.g. "share of kNN's gain"
    interval: Interval
    threshold: float
    direction: Direction
    not_judged: str = ""  # why the setting is not the paper's (verdict "not judged")
    lower_bound: str = ""  # why the statistic only bounds the paper's from below
    digits: int = 2  # decimals shown in the report

    @property
    def verdict(self) -> str:
        if self.not_judged:
            return NOT_JUDGED
        verdict = judge(self.interval, self.threshold, self.direction)
        if self.lower_bound and verdict != (HOLDS if self.direction == "above" else FAILS):
            return NOT_CONVERGED
        return verdict

    @property
    def reason(self) -> str:
        """Both facts where both hold (a record read back carries the joined text in both: it is not repeated)."""
        if self.not_judged and self.lower_bound and self.lower_bound not in self.not_judged:
            return f"{self.not_judged}; {self.lower_bound}"
        return self.not_judged or self.lower_bound

    @property
    def criterion(self) -> str:
        return f"95% CI {'>' if self.direction == 'above' else '<'} {self.threshold:.3g}"

    def record(self) -> dict:
        i = self.interval
        return {"claim": self.claim, "setting": self.setting, "statistic": self.statistic,
                "interval": {"point": i.point, "lo": i.lo, "hi": i.hi, "level": i.level},
                "threshold": self.threshold, "direction": self.direction, "verdict": self.verdict,
                "reason": self.reason, "not_judged": bool(self.not_judged), "lower_bound": bool(self.lower_bound),
                "digits": self.digits}

    def row(self) -> list[str]:
        """The report's claims-table row: claim, setting, criterion, statistic [95% CI], verdict."""
        i, sign = self.interval, "+" if self.threshold == 0 else ""
        if not math.isfinite(i.point):
            value = "not measured"
        elif math.isfinite(i.lo) and math.isfinite(i.hi):
            value = i.fmt(self.digits, sign)
        else:
            value = f"{i.point:{sign}.{self.digits}f} (no interval)"
        verdict = f"{self.verdict} — {self.reason}" if self.reason else self.verdict
        return [self.claim, self.setting, self.criterion, f"{self.statistic}: {value}", verdict]


def from_record(rec: dict) -> Claim:
    """A stored record back as a :class:`Claim` (its verdict re-derived, not read)."""
    return Claim(rec["claim"], rec["setting"], rec["statistic"], Interval.from_dict(rec["interval"]),
                 float(rec["threshold"]), rec["direction"], rec["reason"] if rec.get("not_judged") else "",
                 rec["reason"] if rec.get("lower_bound") else "", int(rec.get("digits", 2)))


def check_record(rec: dict) -> None:
    """Raises AssertionError when a stored verdict is not the one its interval, threshold and direction give."""
    derived = from_record(rec).verdict
    assert rec["verdict"] == derived, f"{rec['claim']} ({rec['setting']}): stored {rec['verdict']!r}, derived {derived!r}"


def claims_table(claims: Sequence[Claim]) -> str:
    from .report import markdown_table

    return markdown_table(["claim", "setting", "criterion", "statistic [95% CI]", "verdict"], [c.row() for c in claims])
