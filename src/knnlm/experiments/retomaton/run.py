"""The RetoMaton study's run: one ``knnlm.evaluate.evaluate`` per setting in this process, each setting's metrics and
per-token gold log-probabilities and search flags saved as it finishes (``settings/<n>.json`` keyed by everything that
made them, ``settings/<n>.npy`` and ``settings/<n>-searched.npy`` in text order) and reused on a rerun, so a killed run
resumes at the first unfinished setting."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import math
import tempfile
from pathlib import Path

import numpy as np

from ...clusters import load_clusters
from ...corpus import CorpusArgs
from ...evaluate import EvalArgs, evaluate, store_state
from ...fileio import atomic_path, atomic_write_json, reusable
from ...stats import BLOCK_TOKENS, block_bootstrap_ci
from .settings import RETOMATON, RetomatonArgs

log = logging.getLogger(__name__)
# the metrics of evaluate() a setting keeps (its per-run timing and storage are not the study's)
KEPT = ("n_tokens", "ppl_lm", "ppl_knnlm", "lmbda", "k", "datastore_N", "searches", "steps", "foss",
        "candidates_per_step")


def _key(lm, corpus: CorpusArgs, args: RetomatonArgs, datastore, knn) -> dict:
    # the store's index and clusters: rebuilding either leaves meta.json as it was, and changes the numbers
    return {"weights_hash": lm.weights_hash(), "datastore_meta": datastore.meta, **store_state(datastore),
            "corpus": dataclasses.asdict(corpus), "knn": dataclasses.asdict(knn), "batch_size": args.batch_size}


def setting_stem(overrides: dict) -> str:
    """A setting's file name in OUT/settings, from what it sets (``knn`` for the kNN-LM, e.g.
    ``min_knns=4,no_clusters=False,retomaton=True``): a rerun with more values in a list finds every setting it has
    already evaluated, wherever the setting now stands in the list."""
    return ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "knn"


def run_retomaton(lm, corpus: CorpusArgs, args: RetomatonArgs, datastore) -> dict:
    """Evaluates every setting of ``args.settings()``; returns ``{"runs": [{series, setting, knn, metrics...}]}``."""
    datastore.check_compatible(lm)
    if args.clusters:  # refused before the first setting, not after the kNN-LM's and RetoMaton's evaluations
        load_clusters(datastore, "--clusters")
    out = Path(args.output_dir)
    for stale in out.glob("eval-*"):  # a killed setting's scratch folder (the output folder is locked to this run)
        shutil.rmtree(stale, ignore_errors=True)
    saved = out / "settings"
    saved.mkdir(parents=True, exist_ok=True)
    runs, log_probs, searched = [], [], []  # per setting, in text order: [n] gold log-probabilities, [n] bool
    todo = args.settings()
    for i, (series, label, overrides) in enumerate(todo):
        knn = args.knn_args(**overrides)
        key = _key(lm, corpus, args, datastore, knn)
        path = saved / f"{setting_stem(overrides)}.json"
        arrays = {"log_prob": path.with_suffix(".npy"), "searched": saved / f"{path.stem}-searched.npy"}
        record = reusable(path, key) if all(a.is_file() for a in arrays.values()) else None
        if record is not None:
            log.info("setting %d/%d (%s, %s): reused %s", i + 1, len(todo), series, label, path)
        else:
            log.info("setting %d/%d (%s, %s): evaluating", i + 1, len(todo), series, label)
            work = Path(tempfile.mkdtemp(prefix="eval-", dir=out))  # evaluate's token file; removed after
            per_token: dict = {}
            try:
                m = evaluate(lm, corpus, work, EvalArgs(output_dir=str(work), batch_size=args.batch_size),
                             datastore=datastore, knn=knn, token_log_probs=per_token)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            order = np.argsort(per_token["row"], kind="stable")  # text order: the settings' tokens paired
            for name, file in arrays.items():  # before the record
                with atomic_path(file) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, per_token[name][order])
            record = {"key": key, "series": series, "setting": label, "overrides": overrides,
                      "metrics": {k: m.get(k) for k in KEPT}, "wall_s": m["timing"]["wall_s"]}
            atomic_write_json(path, record)
            log.info("setting %d/%d (%s, %s): perplexity %.4f, fraction of saved searches %.3f", i + 1, len(todo),
                     series, label, m["ppl_knnlm"], m["foss"])
        runs.append({k: record[k] for k in ("series", "setting", "overrides", "metrics", "wall_s")})
        log_probs.append(np.load(arrays["log_prob"]))
        searched.append(np.load(arrays["searched"]))
    return {"runs": runs, "claim": claim_interval(runs, log_probs, searched, args),
            "n_tokens": runs[0]["metrics"]["n_tokens"], "ppl_lm": runs[0]["metrics"]["ppl_lm"],
            "ppl_knnlm": runs[0]["metrics"]["ppl_knnlm"], "k": runs[0]["metrics"]["k"], "nprobe": args.nprobe,
            "lmbda": args.lmbda[0], "knn_temp": args.knn_temp, "batch_size": args.batch_size,
            "datastore_N": datastore.N, "max_knns": args.max_knns}


def claim_interval(runs: list[dict], log_probs: list[np.ndarray], searched: list[np.ndarray],
                   args: RetomatonArgs) -> dict | None:
    """RetoMaton at the smallest --min_knns (no clusters) against the kNN-LM on the same tokens: block-bootstrap 95%
    intervals (resampling blocks of consecutive tokens) of its fraction of saved searches and of ppl_retomaton /
    ppl_knnlm − 1 (None without a RetoMaton setting)."""
    smallest = min(args.min_knns)
    at = next((i for i, r in enumerate(runs) if r["series"] == RETOMATON and r["overrides"]["min_knns"] == smallest),
              None)
    if at is None:
        return None
    ratio = block_bootstrap_ci([log_probs[at], log_probs[0]], lambda rt, knn: math.exp(knn - rt) - 1, BLOCK_TOKENS,
                               n_boot=args.n_boot, seed=args.seed)
    saved = block_bootstrap_ci([~searched[at]], lambda s: s, BLOCK_TOKENS, n_boot=args.n_boot, seed=args.seed)
    return {"min_knns": smallest, "foss": runs[at]["metrics"]["foss"], "saved": saved.as_dict(),
            "ppl_ratio_minus_1": ratio.as_dict()}
