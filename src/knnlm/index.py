"""FAISS indexes over a datastore's keys: any factory string, resumable chunked adds, GPU, shards, recall checks.

Files live in ``<datastore>/index/``: ``index.json`` (factory, shards, recall; written last), ``shard<i>.faiss``, and
``trained.faiss`` (the trained empty index, kept for on-disk merging), and while building ``progress.json`` + ``partial<i>.faiss`` checkpoints.

Stores larger than RAM: build with ``--shards S`` (each shard holds a contiguous range of rows and is added on its own;
searching combines them with ``faiss.IndexShards``, so only the PQ codes need to fit in memory), or merge the shards'
inverted lists on disk with ``faiss.contrib.ondisk.merge_ondisk`` (see docs/scaling.md).
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import faiss
import numpy as np
from tqdm.auto import tqdm

from .datastore import check_finite, refuse_damaged, store_problems
from .errors import KnnlmError, require_seed
from .fileio import (atomic_path, atomic_write_json, lock_output_dir, read_json, read_record, releases_locks,
                     restore_interrupted_swap, sha256_file, staging_dir, swap_into_place)

log = logging.getLogger(__name__)


@dataclass
class IndexArgs:
    factory: Optional[str] = field(default=None, metadata={"help": "Any faiss.index_factory string (e.g. Flat, IVF4096,PQ64, HNSW32). Default: Flat below --flat_threshold keys, IVF-PQ above."})
    flat_threshold: int = field(default=1_000_000, metadata={"help": "Stores with fewer keys get an exact Flat index by default."})
    nprobe: int = field(default=32, metadata={"help": "IVF lists visited per query by the recall check (recorded in index.json); searches visit the --nprobe of eval/serve/generate (default 32), with a warning where the two differ."})
    train_size: int = field(default=262_144, metadata={"help": "Keys sampled to train IVF/PQ (at least 40 per IVF list are used)."})
    add_chunk: int = field(default=262_144, metadata={"help": "Keys added per step; a checkpoint is written after each."})
    shards: int = field(default=1, metadata={"help": "Split the keys into this many shard indexes (for stores larger than RAM)."})
    use_gpu: Optional[bool] = field(default=None, metadata={"help": "Train/search on GPU FAISS (default: when faiss has GPUs)."})
    recall_queries: int = field(default=1000, metadata={"help": "Keys used as queries to measure recall@k against exact search, each one's own row left out of both lists (0 skips)."})
    recall_k: int = field(default=64, metadata={"help": "k of the recall@k report."})
    seed: int = field(default=0, metadata={"help": "Seed of the training sample and the recall queries."})
    polysemous: bool = field(default=False, metadata={"help": "Polysemous training of the PQ codes (faiss.index_factory turns it on; it serves Hamming-filtered search, which knnlm never uses, and costs about a third of an IVF-PQ build)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing index."})

    def validate(self) -> None:
        for name in ("flat_threshold", "nprobe", "train_size", "add_chunk", "shards", "recall_k"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1")
        if self.recall_queries < 0:
            raise KnnlmError(f"--recall_queries: must be >= 0 (0 skips the recall check), got {self.recall_queries}")
        require_seed("seed", self.seed)


def default_factory(n: int, d: int, flat_threshold: int) -> str:
    """Flat below the threshold; else IVF with ~4·sqrt(N) lists (a power of two) and PQ with up to 64 sub-quantizers."""
    if n < flat_threshold:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    m = max(c for c in range(1, min(64, max(1, d // 4)) + 1) if d % c == 0)
    return f"IVF{nlist},PQ{m}"


def gpu_available() -> bool:
    """Whether this faiss build has GPU support and sees a GPU (faiss-gpu-cu12)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def gpu_search_available() -> bool:
    """Whether exact search can run on a GPU: with GPU FAISS, else with torch (:mod:`knnlm.gpu_search`)."""
    from .gpu_search import torch_gpu_available

    return gpu_available() or torch_gpu_available()


def _to_gpu(index):
    return faiss.index_cpu_to_all_gpus(index)


def _key_chunks(ds, lo: int, hi: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """Rows [lo, hi) of the store's keys as float32 blocks [<= chunk, d]; a NaN/inf key is a one-line error (FAISS
    would index it and return meaningless neighbours, or fail k-means with a misleading message)."""
    for start in range(lo, hi, chunk):
        block = np.ascontiguousarray(ds.keys[start: min(start + chunk, hi)], dtype=np.float32)
        check_finite(block, ds.dir, start)
        yield start, block


def _index_dir(ds_dir: Path) -> Path:
    return Path(ds_dir) / "index"


# ---------------------------------------------------------------------------------------------------------------- identity
def datastore_identity(ds_dir: str | Path) -> dict:
    """What an index was built from: the datastore's N and the hash of its meta.json (model, corpus, key point)."""
    meta = Path(ds_dir) / "meta.json"
    return {"N": int(read_json(meta)["N"]), "meta_sha256": sha256_file(meta)[:16]}


def check_identity(idir: Path, info: dict, ds_dir: str | Path, flag: str = "--datastore") -> None:
    """Refuses an index that was built over another datastore (or records none: built by an older knnlm)."""
    mine, theirs = datastore_identity(ds_dir), info.get("datastore")
    if theirs != mine:
        what = ("records no datastore identity (built by an older knnlm)" if theirs is None else
                f"was built over another datastore (N={theirs.get('N') if isinstance(theirs, dict) else '?'}, "
                f"this one has N={mine['N']})")
        raise KnnlmError(f"{flag}: {idir} {what}; rebuild it with `knnlm index build {Path(ds_dir)} --overwrite`")


def index_checksums(idir: Path, shards: int) -> dict:
    return {name: sha256_file(idir / name) for name in ["trained.faiss", *(f"shard{s}.faiss" for s in range(shards))]
            if (idir / name).is_file()}


def verify_store(directory: str | Path, flag: str = "--datastore") -> dict:
    """A store and its built index checked in full (``knnlm datastore verify``): what was checked, the index's under
    ``"index"``; raises one ``KnnlmError`` listing everything damaged in either."""
    report, problems = store_problems(directory, flag)
    try:
        report["index"] = verify_index(directory, flag)
    except KnnlmError:
        if not problems:
            raise  # the index alone: its line names the file and the index's own rebuild
        problems.append("its index too")  # the store's rebuild comes first; refuse_damaged names the index's after it
    refuse_damaged(directory, flag, problems)
    return report


def verify_index(ds_dir: str | Path, flag: str = "--datastore") -> Optional[dict]:
    """Checks a store's built index against its store (identity) and its files against the sha256 recorded when it
    was built; None when the store has no index. Raises a one-line ``KnnlmError`` naming what differs."""
    idir = _index_dir(Path(ds_dir))
    if not (idir / "index.json").exists():
        return None
    info = read_info(idir, flag)
    check_identity(idir, info, ds_dir, flag)
    recorded = info.get("sha256")
    if not isinstance(recorded, dict):
        return {"factory": info["factory"], "checksums": "none recorded"}
    actual = index_checksums(idir, int(info["shards"]))
    bad = [name for name, h in recorded.items() if actual.get(name) != h]
    if bad:
        raise KnnlmError(f"{flag}: {', '.join(str(idir / n) for n in bad)} differ(s) from the sha256 "
                         f"recorded when the index was built; rebuild it with `knnlm index build {Path(ds_dir)} "
                         "--overwrite`")
    return {"factory": info["factory"], "checksums": {name: "ok" for name in recorded}}


def read_info(idir: Path, flag: str = "--datastore") -> dict:
    """``index.json``, checked to be one (a corrupt file is a one-line error)."""
    fix = f"rebuild the index with `knnlm index build {idir.parent} --overwrite`"
    try:
        info = read_json(idir / "index.json", fix=fix)
    except KnnlmError as e:
        raise KnnlmError(f"{flag}: {e}") from None
    if not isinstance(info, dict) or not all(k in info for k in ("factory", "shards", "d")):
        raise KnnlmError(f"{flag}: {idir / 'index.json'} is not a knnlm index record; {fix}")
    return info


def _read_index(path: Path):
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        raise KnnlmError(f"--datastore: {path} is not a readable FAISS index (corrupt or truncated); rebuild it with "
                         f"`knnlm index build {path.parent.parent} --overwrite`") from None


def _set_polysemous(index, on: bool, factory: str) -> None:
    """Sets ``do_polysemous_training`` on the PQ index or IVF-PQ inside ``index`` (kept alive by the caller); asking
    for it where there are no PQ codes (Flat, IVF-Flat, SQ) is refused rather than recorded as if it had been done."""
    parts = [index]
    try:
        parts.append(faiss.extract_index_ivf(index))
    except RuntimeError:
        pass  # not an IVF index
    found = False
    for part in parts:
        part = faiss.downcast_index(part)
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = on
            found = True
    if on and not found:
        raise KnnlmError(f"--polysemous: the factory {factory} has no PQ codes to train polysemously; drop "
                         "--polysemous or use a PQ factory (e.g. IVF1024,PQ32)")


def _train(ds, factory: str, args: IndexArgs, use_gpu: bool):
    index = faiss.index_factory(ds.d, factory, faiss.METRIC_L2)
    _set_polysemous(index, args.polysemous, factory)
    if index.is_trained:
        return index
    ivf = faiss.extract_index_ivf(index) if "IVF" in factory else None
    need = max(args.train_size, 40 * ivf.nlist) if ivf is not None else args.train_size
    if ivf is not None and ds.N < ivf.nlist:  # FAISS cannot train k-means with fewer points than centroids
        raise KnnlmError(f"--factory: {factory} has {ivf.nlist} IVF lists but the datastore has only {ds.N} keys; "
                         f"use at most IVF{2 ** max(0, int(math.log2(max(1, ds.N // 39))))} (39+ keys per list) or Flat")
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(ds.N, size=min(ds.N, need), replace=False))
    sample = np.asarray(ds.keys[rows], dtype=np.float32)
    check_finite(sample, ds.dir, rows=rows)
    log.info("training %s on %d keys%s", factory, len(rows), " (GPU)" if use_gpu else "")
    if use_gpu and ivf is not None:
        clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ds.d))
        ivf.clustering_index = clustering
    try:
        index.train(sample)
    except RuntimeError as e:  # e.g. PQ needs 2^nbits training points
        raise KnnlmError(f"--factory: FAISS cannot train {factory} on {len(rows)} keys "
                         f"({str(e).strip().splitlines()[-1][:160]}); use a smaller index or Flat") from None
    return index


@releases_locks
def build_index(ds, args: IndexArgs) -> dict:
    """Builds (or resumes building) the index of a datastore; returns the contents of ``index.json``."""
    final = _index_dir(ds.dir)
    lock_output_dir(ds.dir, "index build", flag="datastore")  # one writer of a store at a time (its positional argument)
    restore_interrupted_swap(final)
    info_path = final / "index.json"
    if args.shards > ds.N:
        raise KnnlmError(f"--shards: {args.shards} shards for {ds.N} keys would leave shards empty; use at most {ds.N}")
    factory = args.factory or default_factory(ds.N, ds.d, args.flat_threshold)
    try:  # before the folder's state: a bad string is the mistake to name, not a missing --overwrite
        probe = faiss.index_factory(ds.d, factory)
    except RuntimeError as e:
        why = str(e).split("failed: ", 1)[-1] if "failed: " in str(e) else str(e).splitlines()[-1]  # FAISS's reason
        raise KnnlmError(f"--factory: {factory!r} is not a valid faiss.index_factory string for d={ds.d} "
                         f"({why[:160]})") from None
    identity = datastore_identity(ds.dir)
    if info_path.exists() and not args.overwrite:  # (with --overwrite even a corrupt index.json is replaced)
        info = read_info(final)
        check_identity(final, info, ds.dir)
        return _built(ds, final, info, factory, probe, args)
    # --overwrite over a finished index: build beside it (a rerun resumes there) and swap it in only when complete,
    # so a kill, a full disk or an error during the rebuild leaves the old index usable
    idir = staging_dir(final) if info_path.exists() else final
    _set_polysemous(probe, args.polysemous, factory)  # --polysemous without PQ codes: refused before any folder
    use_gpu = gpu_available() if args.use_gpu is None else args.use_gpu
    if use_gpu and not gpu_available():
        raise KnnlmError("--use_gpu: this faiss build has no GPU support (pip install faiss-gpu-cu12, or drop the flag)")
    (idir / "index.json").unlink(missing_ok=True)
    idir.mkdir(exist_ok=True)  # only now: a refused flag leaves no index folder behind

    progress_path = idir / "progress.json"
    try:
        progress = read_record(progress_path) if progress_path.exists() else None
    except KnnlmError:
        progress = None  # a damaged checkpoint record: start over
    # what the trained index and the shards' rows depend on (a record without the last three predates them: kept)
    build = {"factory": factory, "shards": args.shards, "datastore": identity, "seed": args.seed,
             "train_size": args.train_size, "polysemous": args.polysemous}
    if progress and any(progress.get(k, v if k in ("seed", "train_size", "polysemous") else None) != v
                        for k, v in build.items()):
        progress = None  # a different build was interrupted: start over
    trained_path = idir / "trained.faiss"
    timing = _Timer()
    if progress is None or not trained_path.exists():
        for stale in [*idir.glob("partial*.faiss"), *idir.glob("shard*.faiss")]:  # rows of another quantizer or range
            stale.unlink()
        trained = _train(ds, factory, args, use_gpu)
        timing.lap("train")
        with atomic_path(trained_path) as tmp:
            faiss.write_index(trained, str(tmp))
        progress = {**build, "added": [0] * args.shards}
        atomic_write_json(progress_path, progress)

    bounds = np.linspace(0, ds.N, args.shards + 1).astype(np.int64)
    with tqdm(total=ds.N - sum(progress["added"]), unit="key", desc=f"index {factory}") as bar:
        for s in range(args.shards):
            _add_shard(ds, idir, s, int(bounds[s]), int(bounds[s + 1]), trained_path, progress, args, bar)
    timing.lap("add")
    info = {"factory": factory, "shards": args.shards, "ntotal": ds.N, "d": ds.d, "nprobe": args.nprobe,
            "shard_bounds": bounds.tolist(), "polysemous": args.polysemous, "seed": args.seed,
            "train_size": args.train_size, "datastore": identity}
    if args.recall_queries and factory != "Flat":
        info["recall"] = measure_recall(ds, _load_shards(idir, info, args.nprobe), args)
        timing.lap("recall")
    info["build_timing"] = timing.laps
    info["sha256"] = index_checksums(idir, args.shards)  # `knnlm datastore verify` compares against these
    log.info("index %s built: %s", factory, timing.laps)
    atomic_write_json(idir / "index.json", info)
    progress_path.unlink(missing_ok=True)
    if idir != final:
        swap_into_place(idir, final)
        log.info("index %s replaced by the rebuilt one", final)
    return info


class _Timer:
    """Wall and CPU seconds (all threads of this process) per build phase, this invocation only (a resumed build
    reports the part it did)."""

    def __init__(self):
        self.laps: dict = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[f"{name}_s"] = round(wall - self._wall, 3)
        self.laps[f"{name}_cpu_s"] = round(cpu - self._cpu, 3)
        self._wall, self._cpu = wall, cpu


CHECKPOINT_S = 60.0  # seconds between checkpoints of a shard being filled


def _add_shard(ds, idir: Path, s: int, lo: int, hi: int, trained_path: Path, progress: dict, args: IndexArgs,
               bar) -> None:
    """Adds rows [lo, hi) to shard ``s``, checkpointing at most every CHECKPOINT_S seconds so a kill resumes."""
    shard_path, partial = idir / f"shard{s}.faiss", idir / f"partial{s}.faiss"
    if progress["added"][s] == hi - lo and shard_path.exists():
        return
    index = faiss.read_index(str(partial if partial.exists() else trained_path))
    progress["added"][s] = index.ntotal  # the checkpoint itself says how far it got
    last = time.time()
    for start, block in _key_chunks(ds, lo + progress["added"][s], hi, args.add_chunk):
        index.add(block)
        progress["added"][s] = start + len(block) - lo
        bar.update(len(block))
        if time.time() - last >= CHECKPOINT_S and progress["added"][s] < hi - lo:
            with atomic_path(partial) as tmp:
                faiss.write_index(index, str(tmp))
            atomic_write_json(idir / "progress.json", progress)
            last = time.time()
    with atomic_path(shard_path) as tmp:
        faiss.write_index(index, str(tmp))
    atomic_write_json(idir / "progress.json", progress)
    partial.unlink(missing_ok=True)


def trained_fingerprint(index) -> str:
    """A hash of what training fixed in ``index`` (linear pre-transforms such as OPQ, the IVF coarse centroids, the PQ
    / SQ codebooks), not of the vectors added: every shard built from one trained index has the same fingerprint as
    ``trained.faiss``, and a shard of another build (even of the same store) has another. Untrained kinds (Flat, HNSW)
    hash only their type, d and metric."""
    idx = faiss.downcast_index(index)
    h = hashlib.sha256(f"{type(idx).__name__},{idx.d},{idx.metric_type}".encode())
    if isinstance(idx, faiss.IndexPreTransform):
        for i in range(idx.chain.size()):
            vt = faiss.downcast_VectorTransform(idx.chain.at(i))
            for name in ("A", "b", "mean"):  # LinearTransform (OPQ, PCA, ITQ) and centring
                if hasattr(vt, name):
                    h.update(faiss.vector_to_array(getattr(vt, name)).tobytes())
        idx = faiss.downcast_index(idx.index)
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        idx = faiss.downcast_index(ivf)
        h.update(faiss.serialize_index(idx.quantizer).tobytes())  # the coarse centroids
    if getattr(idx, "pq", None) is not None:
        h.update(faiss.vector_to_array(idx.pq.centroids).tobytes())
    if getattr(idx, "sq", None) is not None:
        h.update(faiss.vector_to_array(idx.sq.trained).tobytes())
    return h.hexdigest()[:16]


def _built(ds, final: Path, info: dict, factory: str, probe, args: IndexArgs) -> dict:
    """The finished index ``info`` of ``final`` when ``args`` asks for it: another factory, shard count or (for an
    index that trains) seed, training sample or polysemous flag is refused without --overwrite; another --nprobe or
    recall setting re-measures recall into its record (the index is the same)."""
    built = {"factory": info["factory"], "shards": info["shards"], "seed": info.get("seed"),
             "train_size": info.get("train_size"), "polysemous": info.get("polysemous", False)}
    asked = {"factory": factory, "shards": args.shards, "seed": args.seed, "train_size": args.train_size,
             "polysemous": args.polysemous}
    trains = not probe.is_trained  # a Flat index's build does not depend on the sample
    # (a record from before seed and train_size were kept cannot say them: not compared)
    differ = [k for k in asked if built[k] is not None and built[k] != asked[k] and (trains or k in ("factory", "shards"))]
    if differ:
        raise KnnlmError(f"--{differ[0]}: {final} already holds an index built with "
                         + ", ".join(f"{k} {built[k]!r}" for k in differ) + " (asked: "
                         + ", ".join(f"{k} {asked[k]!r}" for k in differ) + "); pass --overwrite to replace it")
    recall = info.get("recall") or {}
    k = min(args.recall_k, ds.N - 1)
    if args.recall_queries and factory != "Flat" and (
            info.get("nprobe") != args.nprobe or recall.get("queries") != min(ds.N, args.recall_queries)
            or f"recall@{k}" not in recall or not recall.get("self_excluded")):
        info = {**info, "nprobe": args.nprobe, "recall": measure_recall(ds, _load_shards(final, info, args.nprobe), args)}
        atomic_write_json(final / "index.json", info)
        log.info("index %s already built; its recall measured again at nprobe %d", final, args.nprobe)
        return info
    log.info("index %s already built", final)
    return info


def _set_nprobe(index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # more lists than there are visit them all (as gpu_search does); a huge --nprobe was FAISS's
        nprobe = min(nprobe, ivf.nlist)  # internal RuntimeError in search_preassigned
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    except RuntimeError:
        pass  # not an IVF index


def _load_shards(idir: Path, info: dict, nprobe: int):
    parts = [_read_index(idir / f"shard{s}.faiss") for s in range(info["shards"])]
    for p in parts:
        _set_nprobe(p, nprobe)
    if len(parts) == 1:
        return parts[0]
    shards = faiss.IndexShards(info["d"], True, True)  # threaded, successive ids
    for p in parts:
        shards.add_shard(p)
    return shards


def load_index(ds_dir: str | Path, nprobe: int = 32, use_gpu: bool | None = None):
    """The built index of a datastore (None when it has none); moved to GPU when available/asked."""
    idir = _index_dir(Path(ds_dir))
    if not (idir / "index.json").exists():
        return None
    info = read_info(idir)
    check_identity(idir, info, ds_dir)
    if "IVF" in info["factory"] and info.get("nprobe", nprobe) != nprobe:
        log.warning("index %s: its recall (index.json) was measured at nprobe %d; this search visits %d lists per "
                    "query (--nprobe)", idir, info["nprobe"], nprobe)
    index = _load_shards(idir, info, nprobe)
    if use_gpu or (use_gpu is None and gpu_available()):
        index = _to_gpu(index)
    return index


def flat_index(ds, use_gpu: bool | None = None, chunk: int = 262_144):
    """An exact in-memory L2 index over the store's keys (float32, checked finite): FAISS's, moved to the GPU with GPU
    FAISS; on a GPU that only torch sees (faiss-cpu installed), :class:`knnlm.gpu_search.TorchSearch` ranking in float32
    (a backend)."""
    if (use_gpu or use_gpu is None) and not gpu_available():
        from .gpu_search import TorchSearch, search_devices, torch_gpu_available

        if torch_gpu_available():
            return TorchSearch(ds.keys, devices=search_devices(True), dtype="float32", margin=0, load_chunk=chunk)
        if use_gpu:
            raise KnnlmError("use_gpu: no GPU is visible to faiss or torch; drop it to search on the CPU")
    index = faiss.IndexFlatL2(ds.d)
    for _, block in _key_chunks(ds, 0, ds.N, chunk):
        index.add(block)
    if use_gpu or (use_gpu is None and gpu_available()):
        index = _to_gpu(index)
    return index


def exact_knn(ds, queries: np.ndarray, k: int, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest keys (squared L2), streaming the keys from disk in chunks."""
    heap = faiss.ResultHeap(len(queries), k)
    for start, block in _key_chunks(ds, 0, ds.N, chunk):
        d, i = faiss.knn(queries, block, min(k, len(block)))
        if d.shape[1] < k:
            pad = k - d.shape[1]
            d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
            i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(d, np.where(i >= 0, i + start, -1))
    heap.finalize()
    return heap.D, heap.I


def _others(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """[n, k + 1] ids -> [n, k]: each query's first k ids other than its own row ``rows[i]`` (-1 where fewer)."""
    out = np.full((len(ids), k), -1, dtype=ids.dtype)
    for i, (found, row) in enumerate(zip(ids, rows)):
        other = found[found != row][:k]
        out[i, :len(other)] = other
    return out


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids that the approximate top-k contains."""
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) / max(1, (e >= 0).sum()) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits))


def measure_recall(ds, index, args: IndexArgs) -> dict:
    """recall@k and @1 of ``index`` against exact search, for stored keys as queries with each query's own row left
    out of both lists (it is every query's nearest key, which made recall@1 1.0 whatever the index)."""
    rng = np.random.default_rng(args.seed + 1)
    rows = np.sort(rng.choice(ds.N, size=min(ds.N, args.recall_queries), replace=False))
    queries = np.asarray(ds.keys[rows], dtype=np.float32)
    k = min(args.recall_k, ds.N - 1)
    _, exact = exact_knn(ds, queries, k + 1)
    _, approx = index.search(queries, k + 1)
    exact, approx = _others(exact, rows, k), _others(approx, rows, k)
    out = {f"recall@{k}": recall_at_k(approx, exact), "recall@1": recall_at_k(approx[:, :1], exact[:, :1]),
           "queries": len(rows), "nprobe": args.nprobe, "self_excluded": True}
    log.info("recall vs exact search: %s", out)
    return out
