"""The memory study's report: its claims (the share of kNN's gain, the storage ratio) and Table 2's row of one eval
run, for ``knnlm reproduce``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...claims import Claim
from ...stats import Interval
from .check import gain_share, own_data_check

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


def memory_claims(ev: dict, share_ci: Optional[dict], label: str, data: str, own: bool,
                  unplateaued: str = "") -> list[Claim]:
    """The share of kNN's gain (its block-bootstrap interval; a run without the per-token cache has none, a memory
    whose loss has not plateaued is not judged: ``unplateaued`` says why) and the storage ratio (a byte count: an
    exact interval) of one eval run."""
    setting = f"{label} [{data}]"
    other = "" if own else f"{data}: the memory adapts the LM to text it was not trained on, not the paper's setting"
    no_ci = "" if share_ci else "no per-token cache for an interval (eval --save_neighbors true)"
    nan = float("nan")
    share = Interval.from_dict(share_ci) if share_ci else Interval(nan, nan, nan)
    claims = [Claim(SHARE_CLAIM, setting, "share of kNN's gain", share, SHARE_THRESHOLD, "above",
                    not_judged=other or unplateaued or no_ci)]
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
    return gain_share(cache, [lam])["lmbda"][str(lam)]["share_ci"]


def _plateau(out: Path, entry: dict) -> str:
    """Why the share is not judged for the memory's training (the recipe entry's ``mlp:`` names its `mlp train`
    stage; "" without one or when its loss plateaued: memory.PLATEAU_DROP)."""
    from ...fileio import read_json
    from ...memory import plateau_reason

    path = out / entry["mlp"] / "results.json" if entry.get("mlp") else None
    if path is None or not path.is_file():
        return ""
    return plateau_reason([read_json(path)["metrics"].get("training", {}).get("last_fifth_drop")])


def report_part(ev: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """Table 2's row and the memory claims of one eval run."""
    data, own = _memory_setting(out, entry)
    share = _share_ci(out, entry, ev) if ev.get("ppl_mlplm") else None
    storage = ev.get("storage", {}).get("datastore_over_mlp")
    row = [entry["label"], ev["ppl_lm"], ev.get("ppl_knnlm"), ev.get("ppl_mlplm"), f"{storage:.1f}x" if storage else "–",
           data, Interval.from_dict(share).fmt() if share else "–"]
    claims = (memory_claims(ev, share, entry["label"], data, own, _plateau(out, entry))
              if ev.get("ppl_mlplm") and ev.get("ppl_knnlm") else [])
    return {"table2": [row]}, claims
