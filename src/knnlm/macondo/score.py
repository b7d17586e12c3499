"""Macondo scoring: log-likelihood of each child's name given its prefix, vanilla, kNN-augmented and MLP-memory-augmented.

For a row, the input is ``lm.encode(prefix)`` followed by the tokens the target adds in ``lm.encode(prefix + target)``
(:func:`knnlm.macondo.generate.split_pair`, as lm-evaluation-harness splits a pair); the score is the sum over the
target tokens t of log p(t | everything before it). Augmented scores interpolate per target token, log((1 - λ) p_lm +
λ p_knn), with the query taken at the datastore's key point of the position that predicts the token (the MLP memory
likewise at its own key point).

``summarize`` groups by number of children. Two averages: ``avg`` is the mean over all examples (a parent with 5
children weighs 5 times a parent with 1), ``avg_groups`` the mean of the group means, which is the "Average" column of
the paper's Table 5 (e.g. its step-0 row: mean(-10.89, -10.69, -10.82, -10.67, -10.68) = -10.75).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Optional, Sequence

import torch

from ..corpus import pad_right
from ..errors import KnnlmError
from ..scoring import gold_log_probs, score_positions
from .generate import split_pair

log = logging.getLogger(__name__)


def encode_rows(lm, rows: Sequence[dict]) -> list[tuple[list[int], int]]:
    """(input ids, number of prefix tokens) per row: lm.encode(prefix) + the target's tokens in the sentence
    (:func:`knnlm.macondo.generate.split_pair`)."""
    out, multi = [], 0
    for row in rows:
        pair = split_pair(lm.encode, row["prefix"], row["target"])
        if pair is None:
            raise KnnlmError(f"--data: the row {row['text']!r} does not split into its prefix and target under this "
                             "tokenizer (the prefix's last token joins the target's)")
        prefix, target = pair
        if not prefix or not target:
            raise KnnlmError(f"--data: the row {row['text']!r} has an empty prefix or target under this tokenizer")
        if len(prefix) + len(target) > lm.max_positions:
            raise KnnlmError(f"--data: the row {row['text'][:60]!r}... has {len(prefix) + len(target)} tokens, more than "
                             f"the model's {lm.max_positions} positions")
        out.append((prefix + target, len(prefix)))
        multi += len(target) > 1
    if multi:  # a village made under another tokenizer: the benchmark's one-token names are not one token here
        log.warning("%d of %d targets are more than one token under this model's tokenizer (a village's names are "
                    "single tokens under the tokenizer it was made with: its meta.json); each is scored as the sum "
                    "over its tokens", multi, len(rows))
    return out


def _batch(encoded: list[tuple[list[int], int]], pad_id: int):
    """Right-padded ids/mask [B, T] and, per target token: row in the batch, predicting position, gold id ([n] each)."""
    ids, mask = pad_right([seq for seq, _ in encoded], pad_id)
    rows, pos = [], []
    for i, (seq, n_prefix) in enumerate(encoded):
        for t in range(n_prefix, len(seq)):
            rows.append(i)
            pos.append(t - 1)
    rows_t, pos_t = torch.tensor(rows), torch.tensor(pos)
    gold = ids[rows_t, pos_t + 1]  # [n]
    return ids, mask, rows_t, pos_t, gold


def score_split(lm, rows: Sequence[dict], retriever=None, knn=None, memory=None,
                lmbdas: Optional[Sequence[float]] = None, batch_size: int = 32) -> dict:
    """Per-row log-likelihoods of the targets: {"lm": [..], "knn": {λ: [..]}, "mlp": {λ: [..]}, "mem": [..]}.

    "mem" is the MLP memory's own log-likelihood (not interpolated; empty without a memory): on training sentences its
    negative mean is the memory's training loss on those positions.

    ``retriever``: a :class:`knnlm.knn.Retriever` (queries at ``retriever.ds.meta["key_point"]``); ``memory``: an
    :class:`knnlm.memory.MLPMemory` (at ``memory.key_point``); ``knn``: a :class:`knnlm.knn.KNNArgs` whose ``lmbda``
    list, when given, replaces ``lmbdas`` (the λ of both the kNN and the MLP interpolation). "knn"/"mlp" are empty
    dicts when no retriever/memory is given.
    """
    if batch_size < 1:
        raise KnnlmError("--batch_size: must be >= 1")
    from ..knn import KNNArgs

    given = knn.lmbda if knn is not None else lmbdas
    lmbdas = [float(x) for x in (KNNArgs().lmbda if given is None else given)]
    knn_point = retriever.ds.meta["key_point"] if retriever is not None else None
    mem_point = memory.key_point if memory is not None else None
    points = tuple(dict.fromkeys(p for p in (knn_point, mem_point) if p))
    encoded = encode_rows(lm, rows)
    pad_id = lm.eos_token_id if lm.eos_token_id is not None else 0
    lm_ll = torch.zeros(len(rows), dtype=torch.float64)
    knn_ll = {lam: torch.zeros(len(rows), dtype=torch.float64) for lam in lmbdas} if retriever is not None else {}
    mlp_ll = {lam: torch.zeros(len(rows), dtype=torch.float64) for lam in lmbdas} if memory is not None else {}
    mem_ll = torch.zeros(len(rows), dtype=torch.float64)
    for start in range(0, len(encoded), batch_size):
        ids, mask, brow, pos, gold = _batch(encoded[start: start + batch_size], pad_id)
        owner = brow + start  # [n] example index of each target token
        with torch.inference_mode():
            logits, hidden = lm.forward(ids.to(lm.device), mask.to(lm.device), key_points=points)  # [B, T, V]
            at = {p: h[brow.to(h.device), pos.to(h.device)] for p, h in hidden.items()}  # {point: [n, d]}
            lm_gold = gold_log_probs(logits[brow.to(logits.device), pos.to(logits.device)], gold).cpu()  # [n]
            # the one scoring kernel (knnlm.scoring): kNN and MLP parts and their λ mixtures of these positions
            scores = score_positions(lm, at, gold, retriever, memory, lmbdas, lm_gold=lm_gold)
        lm_ll.index_add_(0, owner, scores.lm.double())
        for lam, acc in knn_ll.items():
            acc.index_add_(0, owner, scores.knn_lm[lam].double())
        if memory is not None:
            mem_ll.index_add_(0, owner, scores.mlp.double())
            for lam, acc in mlp_ll.items():
                acc.index_add_(0, owner, scores.mlp_lm[lam].double())
    return {"lm": lm_ll.tolist(), "knn": {lam: v.tolist() for lam, v in knn_ll.items()},
            "mlp": {lam: v.tolist() for lam, v in mlp_ll.items()}, "mem": mem_ll.tolist() if memory is not None else []}


def fit_optimum(rows: Sequence[dict], train_rows: Sequence[dict]) -> list[float]:
    """Per row, the best log-likelihood of its target that a model fitting ``train_rows`` can reach: the log of the
    empirical conditional frequency count(prefix, target) / count(prefix) in the training sentences (-inf when the
    pair never occurs there). For a training sentence this is 0 unless the same prefix (same parent, same clause)
    introduces several children; it is at least log(1/n) for a parent with n children."""
    prefixes: dict[str, int] = defaultdict(int)
    pairs: dict[tuple[str, str], int] = defaultdict(int)
    for r in train_rows:
        prefixes[r["prefix"]] += 1
        pairs[(r["prefix"], r["target"])] += 1
    out = []
    for r in rows:
        c = pairs.get((r["prefix"], r["target"]), 0)
        out.append(math.log(c / prefixes[r["prefix"]]) if c else float("-inf"))
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: Sequence[dict], lls: Sequence[float], row_optimum: Sequence[float] | None = None) -> dict:
    """Mean log-likelihood per number of children ("1".."5"), "avg" (over examples), "avg_groups" (mean of the group
    means: the paper's Average), "count" per group, and the optimum log(1/n) in the same layout; with ``row_optimum``
    (e.g. :func:`fit_optimum` for training sentences) also "optimum_fit", its means in the same layout."""
    if len(rows) != len(lls):
        raise ValueError(f"summarize: {len(rows)} rows but {len(lls)} scores")
    groups: dict[int, list[float]] = defaultdict(list)
    for row, ll in zip(rows, lls):
        groups[int(row["n_children"])].append(float(ll))
    order = sorted(groups)
    out: dict = {str(n): _mean(groups[n]) for n in order}
    out["avg"] = _mean(float(x) for x in lls)
    out["avg_groups"] = _mean(out[str(n)] for n in order)
    out["count"] = {str(n): len(groups[n]) for n in order}
    optimum: dict = {str(n): math.log(1 / n) for n in order}
    optimum["avg"] = _mean(math.log(1 / int(r["n_children"])) for r in rows)
    optimum["avg_groups"] = _mean(optimum[str(n)] for n in order)
    out["optimum"] = optimum
    if row_optimum is not None:
        out["optimum_fit"] = summarize(rows, row_optimum)
        for key in ("count", "optimum"):
            out["optimum_fit"].pop(key)
    return out


def summarize_scores(rows: Sequence[dict], lls: dict, row_optimum: Sequence[float] | None = None) -> dict:
    """:func:`summarize` for every variant of a :func:`score_split` result: {"lm": .., "knn": {λ: ..}, "mlp": {λ: ..}}
    (and "mem", the memory alone, when scored); ``row_optimum`` goes to the vanilla summary."""
    out = {"lm": summarize(rows, lls["lm"], row_optimum),
           "knn": {str(lam): summarize(rows, v) for lam, v in lls.get("knn", {}).items()},
           "mlp": {str(lam): summarize(rows, v) for lam, v in lls.get("mlp", {}).items()}}
    if lls.get("mem"):
        out["mem"] = summarize(rows, lls["mem"])
    return out


def table(count: dict, optimum: dict, columns: dict) -> str:
    """The Macondo table (``macondo score``, ``overspec api``): a row per number of children, then the average over
    groups (the paper's) and over examples; ``columns`` maps a header to a function of the group key ("1".., "avg_groups",
    "avg") giving the cell; the optimum log(1/n) last."""
    from ..report import markdown_table

    total = sum(count.values())
    rows = [[n, count[n], *(cell(n) for cell in columns.values()), optimum[n]] for n in count]
    rows.append(["average (groups)", total, *(cell("avg_groups") for cell in columns.values()), optimum["avg_groups"]])
    rows.append(["average (examples)", total, *(cell("avg") for cell in columns.values()), optimum["avg"]])
    return markdown_table(["# children", "examples", *columns, "optimum log(1/n)"], rows)


def results_table(summary: dict) -> str:
    """Markdown (:func:`table`): columns vanilla, kNN and MLP per λ."""
    lm = summary["lm"]
    cols = [("vanilla", lm)]
    cols += [(f"kNN λ={lam}", s) for lam, s in summary.get("knn", {}).items()]
    cols += [(f"MLP λ={lam}", s) for lam, s in summary.get("mlp", {}).items()]
    return table(lm["count"], lm["optimum"], {name: s.__getitem__ for name, s in cols})
