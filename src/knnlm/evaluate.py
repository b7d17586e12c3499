"""Perplexity of the LM, the kNN-LM and the MLP-LM over the sliding windows of an evaluation corpus.

One forward pass and one FAISS search per batch of windows serve every λ of a sweep. Perplexity is token-weighted:
exp of the mean negative log-likelihood over all scored tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import CorpusArgs, TokenFile, count_targets, token_record_path, tokenize_to_file, windows
from .corpus import target_positions as _target_positions  # noqa: F401  (old private name: benchmarks/knn_eval.py --baseline_src runs older sources)
from .datastore import KEY_POINTS, Datastore
from .errors import KnnlmError, require_finite
from .fileio import atomic_write_json, read_json, resolve_path, reusable
from .knn import KNNArgs, Retriever, interpolate, knn_gold_log_prob, lm_where, no_neighbours
from .models import tensors_hash
from .scoring import is_own_text, key_points, score_windows

log = logging.getLogger(__name__)

PROGRESS_FILE = "eval-progress.json"  # in the output folder: where a killed evaluation resumes
PROGRESS_EVERY_S = 30.0  # wall seconds between progress records (written between batches; tests set 0)
_WHERE_SEARCHED = ("ray_address", "ray_shard_cpus")  # KNNArgs fields that place a search, not what it returns


@dataclass
class EvalArgs:
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for results.json, results.md, config.json (required)."})
    datastore: Optional[str] = field(default=None, metadata={"help": "Datastore folder for kNN-LM perplexity (built with `knnlm datastore build`)."})
    mlp_memory: Optional[str] = field(default=None, metadata={"help": "MLP memory folder for MLP-LM perplexity (trained with `knnlm mlp train`)."})
    from_neighbors: Optional[str] = field(default=None, metadata={"help": "Sweep λ and T over a neighbour cache of an earlier --save_neighbors run, with no model or search."})
    sweep_temps: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "Temperatures swept with --from_neighbors."})
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass (and per FAISS search)."})
    save_neighbors: bool = field(default=False, metadata={"help": "Cache neighbour distances/values and LM log-probs in OUT/neighbors so later λ/T sweeps need no search; without --datastore, the LM's per-token gold log-probs only (paired intervals against another eval of the same text)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier `knnlm eval` run of other inputs in --output_dir (anything else is never overwritten)."})

    def validate(self) -> None:
        if self.batch_size < 1:
            raise KnnlmError("--batch_size: must be >= 1")
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder for results.json")
        for t in self.sweep_temps:
            require_finite("sweep_temps", t)


class _NLL:
    """Running sum of negative log-likelihoods (float64) for one model variant."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, logp: torch.Tensor) -> None:
        self.total -= float(logp.double().sum())
        self.count += logp.numel()

    @property
    def ppl(self) -> float:
        return math.exp(self.total / max(1, self.count))

    def state(self) -> list:
        """[total, count] for a progress record: JSON keeps a finite float exactly; an infinite or NaN total (a λ = 1
        token no neighbour holds) is written as its repr, which ``float`` reads back."""
        return [self.total if math.isfinite(self.total) else repr(self.total), self.count]

    def restore(self, state: list) -> None:
        self.total, self.count = float(state[0]), int(state[1])


class _NeighbourCache:
    """Appends per-token neighbour distances/values, LM gold log-probs and gold ids to raw files; with ``k`` 0 (no
    datastore) the LM gold log-probs and gold ids only. ``k.txt``, written last, marks a finished cache. The files are
    written beside ``out`` (``fileio.staging_dir``) and swapped in by :func:`commit_neighbour_cache`: a killed or
    refused run leaves an earlier finished cache (and the results.json that describes it) as it was, never a cut-off
    one."""

    def __init__(self, out: Path, k: int, resume: Optional[dict] = None):
        """``resume``: each staged file's length in the progress record the run resumes from (its files are cut back to
        them and appended to); None starts afresh."""
        import shutil

        from .fileio import restore_interrupted_swap, staging_dir

        restore_interrupted_swap(out)  # a swap killed half-way: the earlier cache goes back in place
        self.dir, self.k = staging_dir(out), k
        if resume is not None:
            (self.dir / "k.txt").unlink(missing_ok=True)  # unfinished again until close()
            self.files = {name: self._reopen(name, size) for name, size in resume.items()}
            return
        shutil.rmtree(self.dir, ignore_errors=True)  # a killed run's files without its progress record: restarted
        self.dir.mkdir(parents=True)
        names = ("dists.f32", "vals.i32", "lm_gold.f32", "gold.i32") if k else ("lm_gold.f32", "gold.i32")
        self.files = {name: open(self.dir / name, "wb") for name in names}

    def _reopen(self, name: str, size: int):
        fh = open(self.dir / name, "r+b")
        fh.truncate(size)  # what the batches after the progress record wrote: they are scored again
        fh.seek(size)
        return fh

    @staticmethod
    def intact(out: Path, sizes: dict) -> bool:
        """Whether the staged files a progress record counted are all there, at least that long."""
        from .fileio import staging_dir

        staged = staging_dir(out)
        return all((staged / name).is_file() and (staged / name).stat().st_size >= size for name, size in sizes.items())

    def sizes(self) -> dict[str, int]:
        """Each file's length, flushed and synced first: a progress record never counts bytes a crash could lose."""
        out = {}
        for name, fh in self.files.items():
            fh.flush()
            os.fsync(fh.fileno())
            out[name] = fh.tell()
        return out

    def add(self, dists, vals, lm_gold, gold) -> None:
        if self.k:
            self.files["dists.f32"].write(dists.cpu().numpy().astype(np.float32).tobytes())  # from the search's device
            self.files["vals.i32"].write(vals.cpu().numpy().astype(np.int32).tobytes())
        self.files["lm_gold.f32"].write(lm_gold.numpy().astype(np.float32).tobytes())
        self.files["gold.i32"].write(gold.numpy().astype(np.int32).tobytes())

    def add_mlp(self, mem_gold) -> None:
        """With an MLP memory, also its per-token gold log-probs (``mlp_gold.f32``, aligned with ``lm_gold.f32``)."""
        if "mlp_gold.f32" not in self.files:
            self.files["mlp_gold.f32"] = open(self.dir / "mlp_gold.f32", "wb")
        self.files["mlp_gold.f32"].write(mem_gold.numpy().astype(np.float32).tobytes())

    def close(self) -> None:
        """Finishes the staged cache (``k.txt``); :func:`commit_neighbour_cache` puts it in place."""
        for fh in self.files.values():
            fh.close()
        (self.dir / "k.txt").write_text(str(self.k))


CACHE_SETTINGS = "settings.json"  # in a neighbour cache: the settings of the run that made it


def commit_neighbour_cache(out_dir: str | Path, settings: Optional[dict] = None) -> None:
    """Swaps a finished staged cache in as ``OUT/neighbors`` (``fileio.swap_into_place``), with ``settings`` (the run's
    config) as its ``settings.json``; nothing to do without one. The CLI calls it once results.json is written, so a
    cache is never newer than its results; the cache names its own settings, since a later run into ``OUT`` without
    --save_neighbors replaces config.json and keeps the cache."""
    from .fileio import staging_dir, swap_into_place

    final = Path(out_dir) / "neighbors"
    staged = staging_dir(final)
    if (staged / "k.txt").is_file():
        if settings is not None:
            atomic_write_json(staged / CACHE_SETTINGS, settings)
        swap_into_place(staged, final)


_REDO_CACHE = "rerun the eval with --save_neighbors true"


def neighbour_cache_k(cache_dir: str | Path) -> int:
    """The k of the finished neighbour cache in ``cache_dir`` (0: an eval without --datastore, LM log-probs only),
    once its files agree with each other and with it: ``k.txt`` a whole number, every file there, one 4-byte value per
    token (the tokens of ``gold.i32``) in ``lm_gold.f32`` (and ``mlp_gold.f32``), k per token in ``dists.f32`` and
    ``vals.i32``. A cut-off or mixed-up cache is a one-line error naming the file, not a reshape error in a sweep."""
    cache = Path(cache_dir)
    if not (cache / "k.txt").is_file():
        raise KnnlmError(f"--from_neighbors: {cache} holds no neighbour cache (no k.txt); pass the neighbors/ folder "
                         "of an eval run made with --save_neighbors true")
    text = (cache / "k.txt").read_text(errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise KnnlmError(f"--from_neighbors: {cache / 'k.txt'} holds {text[:40]!r}, not a number of neighbours; the "
                         f"cache is damaged: {_REDO_CACHE}")
    k = int(text)
    names = ("dists.f32", "vals.i32", "lm_gold.f32", "gold.i32") if k else ("lm_gold.f32", "gold.i32")
    for name in names:
        if not (cache / name).is_file():
            raise KnnlmError(f"--from_neighbors: {cache} is an incomplete neighbour cache (no {name}); {_REDO_CACHE}")
    size = (cache / "gold.i32").stat().st_size
    n = size // 4
    if size % 4 or n == 0:
        raise KnnlmError(f"--from_neighbors: {cache / 'gold.i32'} holds {size} bytes, not a whole number (>= 1) of "
                         f"4-byte tokens; the cache is damaged: {_REDO_CACHE}")
    per_token = {"lm_gold.f32": 1, "mlp_gold.f32": 1, "dists.f32": k, "vals.i32": k}
    for name, m in per_token.items():
        path = cache / name
        if (name in names or path.is_file()) and path.stat().st_size != 4 * m * n:
            raise KnnlmError(f"--from_neighbors: {path} holds {path.stat().st_size} bytes, not 4 x {m} per token for the "
                             f"{n} tokens of gold.i32 (k.txt: k = {k}); the cache is damaged: {_REDO_CACHE}")
    return k


def _cached(cache: Path, name: str, dtype) -> torch.Tensor:
    """One file of a checked cache, flat; a NaN (or a -inf distance, or an infinite log-prob) is refused:
    the sweep would turn it into a perplexity of null."""
    values = torch.from_numpy(np.fromfile(cache / name, dtype=dtype))
    if values.is_floating_point():
        bad = ~(values > -math.inf) if name == "dists.f32" else ~torch.isfinite(values)  # an unfilled row: inf
        if bad.any():
            raise KnnlmError(f"--from_neighbors: {cache / name} holds {values[bad][0].item()} at value "
                             f"{int(bad.nonzero()[0])}; the cache is damaged: {_REDO_CACHE}")
    return values


def sweep_key(lmbda: float, temp: float) -> str:
    """The name of one (λ, T) setting in :func:`sweep_from_cache`'s result (and ``results.json``)."""
    return f"lmbda={lmbda},T={temp}"


def sweep_from_cache(cache_dir: str | Path, lmbdas: list[float], temps: list[float], k: Optional[int] = None) -> dict:
    """kNN-LM perplexity for every (λ, T) from a neighbour cache, with no new search; ``k`` (at most the cached k)
    keeps each token's first ``k`` cached neighbours, as a search for ``k`` would have returned them: the cache keeps
    the search's order, which for an approximate index with ``--recompute_dists`` is its own ranking, not the exact
    distances' (re-sorting those kept neighbours better than the index's k-search finds)."""
    cache_dir = Path(cache_dir)
    k_cached = neighbour_cache_k(cache_dir)
    dists = _cached(cache_dir, "dists.f32", np.float32).reshape(-1, k_cached)
    vals = _cached(cache_dir, "vals.i32", np.int32).reshape(-1, k_cached)
    if k is not None and k < k_cached:
        dists, vals = dists[:, :k], vals[:, :k]  # [n, k] (unfilled columns, inf, come last)
    lm_gold = _cached(cache_dir, "lm_gold.f32", np.float32)
    gold = _cached(cache_dir, "gold.i32", np.int32)
    out, none = {}, no_neighbours(dists)
    for temp in temps:
        knn_gold = knn_gold_log_prob(dists, vals, gold, temp)
        for lam in lmbdas:
            mixed = lm_where(none, lm_gold, interpolate(lm_gold, knn_gold, lam))  # as eval scores
            out[sweep_key(lam, temp)] = math.exp(-float(mixed.double().mean()))
    return out


def storage_report(datastore=None, memory=None) -> dict:
    """Bytes on disk of the datastore (keys + values), its FAISS index and the MLP memory, and their ratios."""
    out: dict = {}
    if datastore is not None:
        out["datastore_bytes"] = datastore.nbytes()
        out["index_bytes"] = sum(f.stat().st_size for f in (datastore.dir / "index").glob("*.faiss"))
    if memory is not None:
        out["mlp_memory_bytes"] = memory.nbytes()
        for name in ("datastore", "index"):
            if out.get(f"{name}_bytes"):
                out[f"{name}_over_mlp"] = out[f"{name}_bytes"] / out["mlp_memory_bytes"]
    return out


def _streams(retriever, knn: KNNArgs, args: EvalArgs, wins, tokens: TokenFile):
    """RetoMaton's (or the random-skip kNN-LM's) evaluation order: ``--batch_size`` contiguous streams."""
    from .retomaton import Automaton, Streams

    if args.save_neighbors:
        raise KnnlmError("--save_neighbors: the neighbour cache holds one search per token; leave it off with "
                         "--retomaton / --skip_search_prob")
    return Streams(Automaton(retriever, knn), wins, tokens.doc_starts, args.batch_size,
                   own_text=is_own_text(tokens, retriever))


def _recorded(batches, seen: "collections.deque"):
    """``batches`` unchanged, each appended to ``seen`` as it is handed out."""
    for batch in batches:
        seen.append(batch)
        yield batch


def _folder(path, flag: str) -> Optional[str]:
    return None if path is None else str(resolve_path(path, flag))


def store_state(ds) -> dict:
    """What a search over the store depends on beyond its meta.json, which rebuilding either leaves unchanged: the
    built index's record and the clusters' record (RetoMaton's cluster expansion); None where absent."""
    from .clusters import RECORD

    index, clusters = ds.dir / "index" / "index.json", ds.dir / RECORD
    return {"index": read_json(index) if index.is_file() else None,
            "clusters": read_json(clusters) if clusters.is_file() else None}


def _progress_key(lm, tokens: TokenFile, block: int, stride: int, args: EvalArgs, knn: KNNArgs, retriever,
                  memory) -> dict:
    """Everything a run's sums and neighbour cache depend on; a progress record saved under another key is not resumed.

    The model by its path, weights, dtype and device (another device rounds differently); the tokens by their record
    (corpus sha256, tokenizer, size); the windows and batches; the store by folder, meta.json (N, checksums), index
    and clusters records (:func:`store_state`) and k; the memory by folder and weights; every kNN setting but where a search runs."""
    local = Path(lm.name).expanduser()
    model = {"name": _folder(local, "--model_name_or_path") if lm.name and local.exists() else lm.name,  # (or a hub id)
             "weights_hash": lm.weights_hash(), "dtype": str(lm.dtype), "device": lm.device.type}
    key = {"model": model, "tokens": read_json(token_record_path(tokens.path)),
           "block": block, "stride": stride, "batch_size": args.batch_size, "save_neighbors": args.save_neighbors,
           "datastore": None, "memory": None, "knn": None}
    if retriever is not None:
        ds = retriever.ds
        key["datastore"] = {"dir": _folder(ds.dir, "--datastore"), "N": ds.N, "meta": ds.meta, "k": retriever.k,
                            **store_state(ds)}
    if memory is not None:
        key["memory"] = {"dir": _folder(memory.dir, "--mlp_memory"), "weights": tensors_hash(memory.state_dict().items())}
    if retriever is not None or memory is not None:
        key["knn"] = {k: v for k, v in dataclasses.asdict(knn).items() if k not in _WHERE_SEARCHED}
    return json.loads(json.dumps(key, default=str))  # as read back from the record


class _Progress:
    """``OUT/eval-progress.json``, where a killed evaluation resumes: the run's key (:func:`_progress_key`), the batches
    finished, every accumulator's float64 sum and count, the timing and wall time so far and, with
    ``--save_neighbors``, the staged cache files' lengths. Written atomically between batches, at most every
    ``PROGRESS_EVERY_S`` seconds, so a resumed run adds the same numbers in the same order as an uninterrupted one."""

    def __init__(self, out_dir: Path, key: dict):
        self.path, self.key, self.last = out_dir / PROGRESS_FILE, key, time.time()

    def resume_point(self, cache_out: Optional[Path]) -> Optional[dict]:
        """The record of this very run, else None; a record of another run (other inputs or settings) is removed.
        ``cache_out``: the neighbour cache folder when the run writes one."""
        record = reusable(self.path, self.key)
        if record is not None and cache_out is not None and not _NeighbourCache.intact(cache_out, record["neighbors"]):
            record = None  # the staged files it counted are gone (swapped in or deleted): only a restart rebuilds them
        if record is None:
            self.path.unlink(missing_ok=True)
        return record

    def due(self) -> bool:
        return time.time() - self.last >= PROGRESS_EVERY_S

    def save(self, batches: int, sums: dict, timing: dict, wall: float, cache) -> None:
        atomic_write_json(self.path, {"key": self.key, "batches": batches, "sums": sums,
                                      "timing": dict(timing),  # (a copy: the search thread adds to it)
                                      "wall_s": wall, "neighbors": cache.sizes() if cache else None})
        self.last = time.time()


def remove_progress(out_dir: str | Path) -> None:
    """Deletes the progress record of a finished (or discarded) evaluation. The CLI calls it once results.json is
    written: a kill before that resumes with no batch left to score."""
    (Path(out_dir) / PROGRESS_FILE).unlink(missing_ok=True)


def _sums(lm_nll: _NLL, knn_nll: dict, mlp_nll: dict) -> dict:
    return {"lm": lm_nll.state(), "knn": [a.state() for a in knn_nll.values()],
            "mlp": [a.state() for a in mlp_nll.values()]}


def _restore(sums: dict, lm_nll: _NLL, knn_nll: dict, mlp_nll: dict) -> None:
    lm_nll.restore(sums["lm"])
    for acc, state in zip(knn_nll.values(), sums["knn"]):  # in λ order, which the key fixes
        acc.restore(state)
    for acc, state in zip(mlp_nll.values(), sums["mlp"]):
        acc.restore(state)


def evaluate(lm, corpus: CorpusArgs, out_dir: str | Path, args: EvalArgs, datastore=None,
             knn: Optional[KNNArgs] = None, memory=None, key_point: Optional[str] = None, index=None,
             token_log_probs: Optional[dict] = None, commit_cache: bool = True, keep_progress: bool = False) -> dict:
    """Scores the validation corpus; returns the metrics (perplexities, token count, throughput).

    Resumable: a progress record (``OUT/eval-progress.json``, :class:`_Progress`) lets a rerun after a kill skip the
    batches already counted and give the numbers of an uninterrupted run; ``resumed_from_token`` says where it began.

    ``commit_cache``: with ``--save_neighbors``, put the finished cache in place at the end (False: the caller does,
    with :func:`commit_neighbour_cache`, after it has written the results that describe it).
    ``keep_progress``: leave the progress record, all batches counted, for the caller to delete with
    :func:`remove_progress` once it has written the results (False: deleted here, at the end).

    ``index``: a FAISS index to search instead of the store's own (e.g. exact Flat to compare with its IVF-PQ).
    ``token_log_probs``: a dict filled with ``row`` (each target's row: its place in the text, in scoring order, [n]
    int64), ``log_prob`` (its gold log-probability under the kNN-LM at the first λ, or the LM without a store, [n]
    float64) and ``searched`` (whether its neighbours came from a search: RetoMaton's pointers save some; [n] bool),
    for paired per-token intervals between runs whose scoring orders differ (RetoMaton's streams).
    """
    if not out_dir:
        raise KnnlmError("--output_dir: required; the folder for the token file and the progress record (out_dir)")
    knn = knn or KNNArgs()
    knn.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    retriever = None
    if datastore is not None:
        datastore = Datastore.open(datastore)
        datastore.check_compatible(lm, key_point)
        retriever = Retriever(datastore, knn, index=index)
    for p in key_points(retriever, memory):
        if p not in KEY_POINTS:
            raise KnnlmError(f"--key_point: {p!r} is not one of {', '.join(KEY_POINTS)}")

    tokens: TokenFile = tokenize_to_file(lm, corpus, "validation", out_dir / "tokens.i32")
    block, stride = corpus.resolved_window(lm.max_positions)
    wins = windows(tokens.doc_starts, block, stride)
    lm_nll = _NLL()
    knn_nll = {lam: _NLL() for lam in knn.lmbda} if retriever else {}
    mlp_nll = {lam: _NLL() for lam in knn.lmbda} if memory is not None else {}
    stateful = retriever is not None and knn.stateful
    # Not resumable, restarted from token 0: RetoMaton's (and the random-skip kNN-LM's) streams carry the automaton's
    # pointers from batch to batch, which no record holds; token_log_probs' per-token arrays are not saved either;
    # a caller's own index has no identity on disk to check a record against.
    progress = None
    if stateful or token_log_probs is not None or index is not None:
        remove_progress(out_dir)  # another run's: stale whatever it holds
    else:
        progress = _Progress(out_dir, _progress_key(lm, tokens, block, stride, args, knn, retriever, memory))
    cache_out = out_dir / "neighbors" if args.save_neighbors else None
    saved = progress.resume_point(cache_out) if progress is not None else None
    cache = None
    if cache_out is not None:
        cache = _NeighbourCache(cache_out, retriever.k if retriever else 0, saved["neighbors"] if saved else None)
    done = saved["batches"] if saved else 0  # batches counted so far
    timing: dict = dict(saved["timing"]) if saved else {}
    resumed_wall = saved["wall_s"] if saved else 0.0
    if saved:
        _restore(saved["sums"], lm_nll, knn_nll, mlp_nll)
        log.info("eval: resuming at token %d of %d", lm_nll.count, count_targets(wins))
    resumed_from = lm_nll.count
    started = time.time()
    batches = (wins[b: b + args.batch_size] for b in range(done * args.batch_size, len(wins), args.batch_size))
    streams = _streams(retriever, knn, args, wins, tokens) if stateful else None
    if streams is not None:  # the automaton's state flows along the text: batch_size streams scored side by side
        batches = streams.batches()
    scored = collections.deque()  # the windows of each batch handed to scoring, in order (scores come in that order)
    if token_log_probs is not None:
        batches = _recorded(batches, scored)
        rows_seen, logp_seen = [], []
    with tqdm(total=count_targets(wins), initial=resumed_from, unit="tok", desc="eval") as bar:
        for scores in score_windows(lm, tokens, batches, retriever, memory, knn.lmbda, timing, searcher=streams):
            if token_log_probs is not None:
                rows_seen.append(np.concatenate([np.arange(w.row, w.row + w.n_targets) for w in scored.popleft()]))
                logp_seen.append((scores.knn_lm[knn.lmbda[0]] if retriever else scores.lm).double().numpy())
            lm_nll.add(scores.lm)
            for lam, acc in knn_nll.items():
                acc.add(scores.knn_lm[lam])
            for lam, acc in mlp_nll.items():
                acc.add(scores.mlp_lm[lam])
            if cache:
                cache.add(scores.dists, scores.vals, scores.lm, scores.gold)
                if scores.mlp is not None:
                    cache.add_mlp(scores.mlp)
            bar.update(len(scores.gold))
            done += 1
            if progress is not None and progress.due():  # between batches: the record counts whole ones only
                progress.save(done, _sums(lm_nll, knn_nll, mlp_nll), timing, resumed_wall + time.time() - started,
                              cache)
    if progress is not None and keep_progress:  # a kill before the caller's results resumes with no batch to score
        progress.save(done, _sums(lm_nll, knn_nll, mlp_nll), timing, resumed_wall + time.time() - started, cache)
    if cache:
        cache.close()
        if commit_cache:  # (the settings --from_neighbors checks, as the CLI's config names them)
            commit_neighbour_cache(out_dir, {"model_name_or_path": lm.name, "key_point": key_point,
                                             "datastore": str(datastore.dir) if datastore is not None else None,
                                             **{k: getattr(knn, k) for k in ("k", "ignore_top", "recompute_dists")}})
    if progress is not None and not keep_progress:
        remove_progress(out_dir)
    if token_log_probs is not None:
        row = np.concatenate(rows_seen)
        searched = (np.isin(row, np.concatenate(streams.searched_rows)) if streams is not None
                    else np.full(len(row), retriever is not None))
        token_log_probs.update(row=row, log_prob=np.concatenate(logp_seen), searched=searched)
    # wall_s and tokens_per_s: this process alone, over the tokens it scored (a resumed run's earlier processes spent
    # resumed_wall_s on theirs); forward_s, search_s, mlp_s are summed over every batch counted, earlier processes'
    # included (restored from the record, which may also hold the batch in flight when it was saved), so the rates
    # made from them cover all n_tokens
    wall = time.time() - started
    t_forward = timing.get("forward_s", 0.0) + timing.get("output_s", 0.0)  # the LM: body + output layer
    metrics = {"n_tokens": lm_nll.count, "ppl_lm": lm_nll.ppl, "block_size": block, "stride": stride,
               "resumed_from_token": resumed_from,
               "timing": {"wall_s": wall, "forward_s": t_forward,
                          "tokens_per_s": (lm_nll.count - resumed_from) / max(wall, 1e-9),
                          "lm_tokens_per_s": lm_nll.count / max(t_forward, 1e-9), "resumed_wall_s": resumed_wall}}
    if retriever is not None:
        first = knn.lmbda[0]
        metrics.update(ppl_knnlm=knn_nll[first].ppl, lmbda=first, k=retriever.k,
                       datastore_N=datastore.N)
        metrics["sweep_knn"] = {str(lam): acc.ppl for lam, acc in knn_nll.items()}
        metrics.update(streams.automaton.metrics() if streams is not None else
                       {"searches": lm_nll.count, "steps": lm_nll.count, "foss": 0.0,
                        "candidates_per_step": float(retriever.k)})
        t_search = timing.get("search_s", 0.0)  # in a worker thread, overlapping the forward passes
        metrics["timing"].update(search_s=t_search, search_queries_per_s=lm_nll.count / max(t_search, 1e-9))
    if memory is not None:
        first = knn.lmbda[0]
        metrics.update(ppl_mlplm=mlp_nll[first].ppl, lmbda=first)
        metrics["sweep_mlp"] = {str(lam): acc.ppl for lam, acc in mlp_nll.items()}
        metrics["timing"]["mlp_s"] = timing.get("mlp_s", 0.0)
    metrics["storage"] = storage_report(datastore, memory)
    log.info("eval: %s", {k: v for k, v in metrics.items() if k.startswith("ppl")})
    return metrics
