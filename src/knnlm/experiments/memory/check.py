"""The memory study's measurements: is the datastore the LM's own training data, and the share of kNN's gain the memory
keeps (with its block-bootstrap interval)."""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...errors import KnnlmError
from ...fileio import read_record
from ...stats import BLOCK_TOKENS, block_bootstrap_ci, share_of_gain


def own_data_check(lm_dir: str | Path, ds_dir: str | Path) -> dict:
    """Whether the datastore in ``ds_dir`` was built over exactly the training tokens of the LM in ``lm_dir``.

    Returns ``match`` (the token files' hashes agree), both hashes and token counts, and ``lm_trained_tokens``: the
    tokens inside the LM's training blocks (``knnlm lm train`` drops a ragged tail shorter than one block).
    """
    from transformers import AutoTokenizer

    from ...corpus import TokenFile
    from ..lm.data import _tokenize_files
    from ..lm.settings import TRAINING_JSON, LMArgs

    lm_dir, ds_dir = Path(lm_dir), Path(ds_dir)
    if not (lm_dir / TRAINING_JSON).is_file():
        raise KnnlmError(f"--model_name_or_path: {lm_dir} holds no finished `knnlm lm train` model ({TRAINING_JSON})")
    if not (ds_dir / "meta.json").is_file():
        raise KnnlmError(f"--datastore: {ds_dir} holds no finished datastore (meta.json)")
    record = read_record(lm_dir / TRAINING_JSON, fix="train the model again (`knnlm lm train --overwrite true`)",
                         required=("args",))
    meta = read_record(ds_dir / "meta.json", fix="rebuild the datastore (`knnlm datastore build ... --overwrite`)",
                       required=("corpus_hash", "n_tokens", "N", "model_name_or_path"))
    fields = {f.name for f in dataclasses.fields(LMArgs)}
    args = LMArgs(**{k: v for k, v in record["args"].items() if k in fields})
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    with tempfile.TemporaryDirectory() as tmp:
        train, _ = _tokenize_files(tokenizer, args, Path(tmp))  # the training run's own code path
        n = int(len(train))
        del train  # release the memmap before the folder goes
        lm_hash = TokenFile(Path(tmp) / "train.i32", Path(tmp) / "train.i32.docs").sha256()
    block = args.block_size
    return {"match": lm_hash == meta["corpus_hash"] and n == meta["n_tokens"], "lm_tokens_sha256": lm_hash,
            "datastore_corpus_hash": meta["corpus_hash"], "lm_train_tokens": n, "datastore_tokens": meta["n_tokens"],
            "lm_trained_tokens": n // block * block, "datastore_keys": meta["N"],
            "same_model": Path(meta["model_name_or_path"]).resolve() == lm_dir.resolve()}


def _lm_cache(cache_dir: Path) -> dict[str, torch.Tensor]:
    """An eval's per-token LM gold log-probabilities and gold ids (any `knnlm eval --save_neighbors true`; with a
    datastore or without)."""
    if not (cache_dir / "k.txt").is_file():
        raise KnnlmError(f"{cache_dir}: no finished per-token cache (k.txt); run `knnlm eval` with --save_neighbors true")
    return {"lm": torch.from_numpy(np.fromfile(cache_dir / "lm_gold.f32", dtype=np.float32)),
            "gold": torch.from_numpy(np.fromfile(cache_dir / "gold.i32", dtype=np.int32))}


def _read_cache(cache_dir: Path) -> dict[str, torch.Tensor]:
    """The cache of an eval with a datastore and a memory: its LM columns, the neighbours and the memory's gold
    log-probabilities."""
    if not (cache_dir / "mlp_gold.f32").is_file():
        raise KnnlmError(f"{cache_dir}: no mlp_gold.f32; run `knnlm eval` with --datastore, --mlp_memory and "
                         "--save_neighbors true")
    lm = _lm_cache(cache_dir)
    k = int((cache_dir / "k.txt").read_text())
    read = lambda name, dt: torch.from_numpy(np.fromfile(cache_dir / name, dtype=dt))  # noqa: E731
    return {"dists": read("dists.f32", np.float32).reshape(-1, k), "vals": read("vals.i32", np.int32).reshape(-1, k),
            **lm, "mlp": read("mlp_gold.f32", np.float32)}


def gain_share(cache_dir: str | Path, lmbdas: list[float], temp: float = 1.0, unit_tokens: int = BLOCK_TOKENS,
               n_resamples: int = 2000, seed: int = 0) -> dict:
    """Per λ: ppl of the LM, kNN-LM and MLP-LM over the cached tokens, the share of kNN's gain the memory keeps, and
    its bootstrap 95% interval (``share_ci``, over blocks of ``unit_tokens`` consecutive tokens: neighbouring tokens are
    not independent). Also the share comparing each method at its best λ (point estimate)."""
    from ...knn import interpolate, knn_gold_log_prob, lm_where, no_neighbours

    c = _read_cache(Path(cache_dir))
    knn_gold = knn_gold_log_prob(c["dists"], c["vals"], c["gold"], temp)  # [n] (NaN where a search found nothing)
    none = no_neighbours(c["dists"])  # there the kNN-LM is the LM, as eval scores it
    n = len(c["lm"])
    out: dict = {"n_tokens": n, "unit_tokens": unit_tokens, "n_units": -(-n // unit_tokens),
                 "n_resamples": n_resamples, "lmbda": {}}

    def share(nll_lm: float, nll_knn: float, nll_mlp: float) -> float:  # mean NLLs -> share of the perplexity gain
        return share_of_gain(math.exp(nll_lm), math.exp(nll_knn), math.exp(nll_mlp))

    for lam in lmbdas:
        nll = [-c["lm"].double().numpy(), -lm_where(none, c["lm"], interpolate(c["lm"], knn_gold, lam)).double().numpy(),
               -interpolate(c["lm"], c["mlp"], lam).double().numpy()]  # [n] each: LM, kNN-LM, MLP-LM
        ci = block_bootstrap_ci(nll, share, unit_tokens, n_resamples, seed)
        ppl = [math.exp(float(np.mean(x))) for x in nll]
        out["lmbda"][str(lam)] = {"ppl_lm": ppl[0], "ppl_knnlm": ppl[1], "ppl_mlplm": ppl[2], "share": ci.point,
                                  "share_ci": ci.as_dict()}
    rows = out["lmbda"].values()
    best_knn, best_mlp = min(r["ppl_knnlm"] for r in rows), min(r["ppl_mlplm"] for r in rows)
    ppl_lm = next(iter(rows))["ppl_lm"]
    out["best"] = {"ppl_knnlm": best_knn, "ppl_mlplm": best_mlp, "share": share_of_gain(ppl_lm, best_knn, best_mlp)}
    return out


def control_gap(control_cache: str | Path, memory_cache: str | Path, lmbda: float, unit_tokens: int = BLOCK_TOKENS,
                n_resamples: int = 2000, seed: int = 0) -> dict:
    """log ppl(control LM) - log ppl(MLP-LM at ``lmbda``) on the same tokens, with its block-bootstrap 95% interval
    (the two evals' per-token caches paired token by token; positive: the memory beats the LM trained further).

    ``control_cache``: an eval of the control LM (LM only); ``memory_cache``: the eval with the memory (mlp_gold.f32).
    Refused in one line when the two caches do not score the same gold tokens in the same order."""
    from ...knn import interpolate

    ctrl, mem = _lm_cache(Path(control_cache)), _read_cache(Path(memory_cache))
    if not torch.equal(ctrl["gold"], mem["gold"]):
        raise KnnlmError(f"{control_cache}: its {len(ctrl['gold'])} scored tokens are not those of {memory_cache} "
                         f"({len(mem['gold'])}); evaluate both on the same --validation_file and --max_tokens")
    nll_ctrl = -ctrl["lm"].double().numpy()  # [n]
    nll_mlplm = -interpolate(mem["lm"], mem["mlp"], lmbda).double().numpy()  # [n]
    ci = block_bootstrap_ci([nll_ctrl, nll_mlplm], lambda a, b: a - b, unit_tokens, n_resamples, seed)
    return {"n_tokens": len(nll_ctrl), "lmbda": lmbda, "ppl_control": math.exp(nll_ctrl.mean()),
            "ppl_mlplm": math.exp(nll_mlplm.mean()), "gap_ci": ci.as_dict()}
