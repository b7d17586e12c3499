"""The memory study's report: its claims (the share of kNN's gain, the storage ratio) and Table 2's row of one eval
run, for ``knnlm reproduce``; and the equal-compute controls (study ``memory_control``): the memory against the same LM
trained further with the memory's training compute."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ...claims import Claim
from ...stats import Interval, no_gain, share_of_gain, too_few_blocks
from ..study import stage_record
from .check import control_gap, gain_share, own_data_check

# `knnlm reproduce --smoke`: the flags that shrink an `mlp train` stage to seconds
SMOKE = {"mlp train": {"--device": "cpu", "--dtype": "float32", "--hidden_size": "64", "--batch_tokens": "128",
                       "--micro_batch_tokens": "128", "--max_steps": "3"}}


# ---------------------------------------------------------------------------------------------------------------- claims
# Paper §5 / Table 2: the memory keeps 45% of kNN's gain (20.13 -> 18.68 vs 16.92) in > 25x less storage. "Much of" is
# taken as a third, judged on the 95% interval of the share, and only where the datastore is the LM's own training
# data (the paper's setting); a memory of other text adapts the LM to that text and is reported unjudged.
SHARE_THRESHOLD, STORAGE_THRESHOLD = 1 / 3, 25.0
SHARE_CLAIM = "the MLP memory keeps much (> 1/3) of kNN's gain (Table 2)"
STORAGE_CLAIM = "the MLP memory takes > 25x less storage than the datastore (§5)"
# The memory's claim is about storing what the LM cannot, not about training it more: the LM trained until its
# validation perplexity stopped improving (early stopping), and a control spending the memory's training compute on
# more training of that LM (or of its output layer) must do worse than the MLP-LM on the same tokens. Fixed before the
# runs (docs/results/fidelity-2026-12-05/PLAN.md, item 3).
CONTROL_THRESHOLD = 0.0
CONTROL_CLAIM = "the memory adds what more training of the LM does not (equal compute)"
LM_STILL_IMPROVING = "LM still improving: the patience rule did not fire before the step cap"
LM_SCHEDULE_UNFINISHED = "LM's schedule not ended: its learning rate did not decay to 0 at its last step"


def memory_claims(ev: dict, share_ci: Optional[dict], label: str, data: str, own: bool,
                  unplateaued: str = "") -> list[Claim]:
    """The share of kNN's gain (its block-bootstrap interval; a run without the per-token cache has none, a memory
    whose loss has not plateaued is not judged: ``unplateaued`` says why) and the storage ratio (a byte count: an
    exact interval) of one eval run."""
    setting = f"{label} [{data}]"
    other = "" if own else f"{data}: the memory adapts the LM to text it was not trained on, not the paper's setting"
    no_ci = "" if share_ci else "no per-token cache for an interval (eval --save_neighbors true)"
    nan = float("nan")
    if share_ci:
        share = Interval.from_dict(share_ci)
    else:  # shown beside its reason, never judged
        share = Interval(share_of_gain(ev["ppl_lm"], ev["ppl_knnlm"], ev["ppl_mlplm"]) if ev.get("ppl_mlplm") else nan,
                         nan, nan)
    claims = [Claim(SHARE_CLAIM, setting, "share of kNN's perplexity gain", share, SHARE_THRESHOLD, "above",
                    not_judged=other or unplateaued or no_ci or too_few_blocks(ev.get("n_tokens"))
                    or no_gain(ev["ppl_lm"], ev.get("ppl_knnlm"), "the kNN-LM"))]
    storage = ev.get("storage", {}).get("datastore_over_mlp")
    if storage:
        claims.append(Claim(STORAGE_CLAIM, setting, "datastore / memory bytes", Interval.exact(storage),
                            STORAGE_THRESHOLD, "above", not_judged=other, digits=1))
    return claims


# ---------------------------------------------------------------------------------------------------------------- report
TABLES = {"table2": ("Table 2 — kNN vs MLP memory (WikiText)",
                     ["model", "LM", "kNN-LM", "MLP-LM", "datastore / memory bytes", "datastore is",
                      "share of kNN's gain kept [95% CI]"],
                     [["paper", 20.13, 16.92, 18.68, "> 25x", "own training data (WikiText-103)", "45%"]])}


def _memory_setting(out: Path, entry: dict) -> tuple[str, bool]:
    """What a memory row measures: "own training data" (the recipe says so, and where it names the LM and datastore
    stages their token hashes agree) or "other text"."""
    own = entry.get("data") == "own"
    data = "own training data" if own else "other text" if entry.get("data") == "other" else "–"
    if own and entry.get("lm") and entry.get("datastore") and (out / entry["lm"]).is_dir() \
            and (out / entry["datastore"]).is_dir():
        check = own_data_check(out / entry["lm"], out / entry["datastore"])
        data = ("own training data (hashes match)" if check["match"] else
                "own training data NOT verified: the datastore's tokens differ from the LM's")
        own = check["match"]
    return data, own


def _share_ci(out: Path, entry: dict, ev: dict) -> Optional[dict]:
    """The share of kNN's gain with its block-bootstrap interval, where the eval cached per-token log-probabilities
    (--save_neighbors with --mlp_memory)."""
    cache = out / entry["folder"] / "neighbors"
    if not (cache / "mlp_gold.f32").is_file():
        return None
    from ...knn import KNNArgs

    lam = ev.get("lmbda", KNNArgs().lmbda[0])
    config = stage_record(out, entry["folder"]).get("config", {})  # the eval's --knn_temp, as its ppl
    return gain_share(cache, [lam], temp=config.get("knn_temp", KNNArgs().knn_temp))["lmbda"][str(lam)]["share_ci"]


def _lm_still_improving(out: Path, entry: dict) -> str:
    """Why the share is not judged for the LM's training: a recipe entry with ``converged: true`` is judged only where
    its ``lm:`` stage's results.json says the early-stopping rule fired before the step cap (``stopped_early``);
    ``converged: annealed`` only where the LM ran its whole linear or cosine schedule (the learning rate reached 0): to its
    ``max_steps``, or, trained by ``--epochs``, to a last logged rate of 0 (its training.json)."""
    if not entry.get("converged"):
        return ""
    annealed = entry["converged"] == "annealed"
    if not (out / entry["lm"] / "results.json").is_file():
        return LM_SCHEDULE_UNFINISHED if annealed else LM_STILL_IMPROVING
    run = stage_record(out, entry["lm"], required=("metrics", "config") if annealed else ("metrics",))
    if annealed:
        cap = run["config"].get("max_steps")
        to_end = run["metrics"].get("steps") == cap if cap is not None else _last_lr(out, entry["lm"]) == 0
        ended = run["config"].get("lr_scheduler_type") in ("linear", "cosine") and to_end and \
            not run["metrics"].get("stopped_early")
        return "" if ended else LM_SCHEDULE_UNFINISHED
    return "" if run["metrics"].get("stopped_early") else LM_STILL_IMPROVING


def _last_lr(out: Path, lm: str) -> Optional[float]:
    """The learning rate the `lm train` stage ``OUT/<lm>`` logged last (its training.json), None where not recorded."""
    history = stage_record(out, lm, "training.json").get("history") if (out / lm / "training.json").is_file() else None
    return history[-1].get("lr") if history else None


def _plateau(out: Path, entry: dict) -> str:
    """Why the share is not judged for the memory's training (the recipe entry's ``mlp:`` names its `mlp train`
    stage; "" when its loss plateaued: memory.PLATEAU_DROP; without the stage's record the plateau is unknown)."""
    from ...memory import plateau_reason

    path = out / entry["mlp"] / "results.json" if entry.get("mlp") else None
    if path is None or not path.is_file():
        return plateau_reason([None])
    metrics = stage_record(out, entry["mlp"], required=("metrics",))["metrics"]
    return plateau_reason([metrics.get("training", {}).get("last_fifth_drop")])


def report_part(ev: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """Table 2's row and the memory claims of one eval run."""
    data, own = _memory_setting(out, entry)
    share = _share_ci(out, entry, ev) if ev.get("ppl_mlplm") else None
    storage = ev.get("storage", {}).get("datastore_over_mlp")
    row = [entry["label"], ev["ppl_lm"], ev.get("ppl_knnlm"), ev.get("ppl_mlplm"), f"{storage:.1f}x" if storage else "–",
           data, Interval.from_dict(share).fmt() if share else "–"]
    claims = (memory_claims(ev, share, entry["label"], data, own, _lm_still_improving(out, entry) or _plateau(out, entry))
              if ev.get("ppl_mlplm") and ev.get("ppl_knnlm") else [])
    return {"table2": [row]}, claims


# ---------------------------------------------------------------------------------------------------------------- controls
CONTROL_TABLES = {"memory_control": ("The memory against more training of the LM (equal compute)",
                                     ["model", "perplexity", "log ppl(model) − log ppl(MLP-LM) [95% CI]", "note"], [])}


def under_training_note(ppl_memory: float, ppl_lm: float) -> str:
    """The flag (a note, not a claim): a memory alone (the MLP without the LM) better than the LM it was built from
    says the LM is still under-trained relative to its data."""
    if ppl_memory < ppl_lm:
        return (f"memory alone {ppl_memory:.2f} < LM {ppl_lm:.2f}: the LM is still under-trained relative to its data "
                "(part of the memory's gain is training the LM never got)")
    return f"memory alone {ppl_memory:.2f} >= LM {ppl_lm:.2f}"


def _memory_rows(ev: dict, entry: dict, out: Path) -> list[list]:
    """The reference rows of the memory's own eval: the LM, the memory alone (with the under-training flag), the
    MLP-LM."""
    cache = out / entry["folder"] / "neighbors" / "mlp_gold.f32"
    mem = math.exp(-float(np.fromfile(cache, dtype=np.float32).astype(np.float64).mean())) if cache.is_file() else None
    return [[f"{entry['label']}: LM", ev["ppl_lm"], "–", ""],
            [f"{entry['label']}: memory alone", mem, "–", under_training_note(mem, ev["ppl_lm"]) if mem else
             "no per-token cache (eval --save_neighbors true)"],
            [f"{entry['label']}: MLP-LM (λ {ev.get('lmbda')})", ev.get("ppl_mlplm"), "0 (reference)", ""]]


def control_claim(gap: Optional[dict], label: str, reason: str = "") -> Claim:
    """Claim 2 of one control: log ppl(control) − log ppl(MLP-LM) on the same tokens, holds iff its interval is above 0."""
    nan = float("nan")
    interval = Interval.from_dict(gap["gap_ci"]) if gap else Interval(nan, nan, nan)
    return Claim(CONTROL_CLAIM, label, "log ppl(LM trained further) − log ppl(MLP-LM)", interval, CONTROL_THRESHOLD,
                 "above", not_judged=reason, digits=3)


def control_part(ev: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """A recipe entry ``{study: memory_control, folder: EVAL, label, memory: MEMORY_EVAL[, mlp: MLP]}``: EVAL is an LM-only eval
    of a control LM with its per-token cache, paired with MEMORY_EVAL's (the MLP-LM at its first λ) -> its table row
    and claim. Without ``memory:`` the entry is the memory's own eval: its reference rows and the under-training note."""
    if not entry.get("memory"):
        return {"memory_control": _memory_rows(ev, entry, out)}, []
    mem_results = out / entry["memory"] / "results.json"
    caches = [out / entry["folder"] / "neighbors", out / entry["memory"] / "neighbors"]
    missing = next((f"{c.parent.name} has no per-token cache (eval --save_neighbors true)" for c in caches
                    if not (c / "k.txt").is_file()), "")
    if not mem_results.is_file():
        missing = f"the memory's eval ({entry['memory']}) has not run"
    gap = None
    if not missing:
        lam = stage_record(out, entry["memory"], required=("metrics",))["metrics"]["lmbda"]
        gap = control_gap(caches[0], caches[1], lam)
    row = [entry["label"], ev["ppl_lm"], Interval.from_dict(gap["gap_ci"]).fmt(3, "+") if gap else "–", missing]
    # the memory's own gate as for its share: an entry naming the memory's `mlp train` stage (mlp:) is judged only
    # where that memory's loss plateaued
    reason = missing or too_few_blocks(ev.get("n_tokens")) or (_plateau(out, entry) if entry.get("mlp") else "")
    return {"memory_control": [row]}, [control_claim(gap, entry["label"], reason)]
