"""k-means clusters of a datastore's keys: the automaton states of RetoMaton (docs/retomaton.md).

``knnlm datastore cluster DS`` trains FAISS k-means on a seeded sample of the keys, assigns every key to its nearest
centroid and writes ``clusters.i32`` (int32 [N], the cluster of each row) beside the store; ``clusters.json`` (written
last) records the settings, the file's sha256 and the store it was built from (N and the sha256 of its meta.json, as
the FAISS index records it), so a clusters file of another store (or of this folder before a rebuild) is refused. The
record is not written into meta.json itself: the index identifies its store by that file's hash. Work in progress lives in ``clusters.work/`` (the centroids, then the assignment in chunks flagged done), so a
killed run resumes and gives the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import KnnlmError, require_seed
from .fileio import atomic_path, atomic_write_json, lock_output_dir, read_json, releases_locks, sha256_file

log = logging.getLogger(__name__)

FILE, RECORD, WORK = "clusters.i32", "clusters.json", "clusters.work"
ASSIGN_ROWS = 1 << 16  # keys assigned (and flagged done) per chunk


@dataclass
class ClusterArgs:
    num_clusters: int = field(default=4096, metadata={"help": "k-means clusters (automaton states); about N / 150 keeps a cluster's members few."})
    sample_size: int = field(default=262_144, metadata={"help": "Keys sampled (seeded) to train k-means; every key is then assigned."})
    niter: int = field(default=20, metadata={"help": "k-means iterations."})
    seed: int = field(default=0, metadata={"help": "Seed of the sample and of k-means."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the store's clusters of other settings."})

    def validate(self) -> None:
        if self.num_clusters < 1:
            raise KnnlmError(f"--num_clusters: must be >= 1, got {self.num_clusters}")
        if self.sample_size < 1:
            raise KnnlmError(f"--sample_size: must be >= 1, got {self.sample_size}")
        if not 1 <= self.niter < 2 ** 31:  # FAISS keeps it in a C int: a larger one was an internal OverflowError
            raise KnnlmError(f"--niter: must be in [1, 2**31), got {self.niter}")
        require_seed("seed", self.seed)


def _record(ds, args: ClusterArgs) -> dict:
    from .index import datastore_identity

    settings = {k: v for k, v in asdict(args).items() if k != "overwrite"}  # what the clusters are made from
    return {"settings": settings, "datastore": datastore_identity(ds.dir)}


def _read_record(ds) -> dict | None:
    path = ds.dir / RECORD
    try:
        record = read_json(path) if path.is_file() else None
    except KnnlmError:
        return None
    return record if isinstance(record, dict) else None


@releases_locks
def build_clusters(ds, args: ClusterArgs) -> dict:
    """Clusters the keys of the open store ``ds`` (resumable); returns the record written to clusters.json. The store
    folder is locked meanwhile (as by an index build): a second run's assignments never mix into this one's."""
    args.validate()
    lock_output_dir(ds.dir, "datastore cluster", flag="datastore")  # (its positional argument)
    if args.num_clusters > min(ds.N, args.sample_size):
        raise KnnlmError(f"--num_clusters: {args.num_clusters} clusters need at least as many sampled keys (the store "
                         f"has {ds.N}, --sample_size {args.sample_size}); pass fewer clusters")
    want = _record(ds, args)
    done = _read_record(ds)
    intact = bool(done) and _file_matches(ds, done)  # (the file's sha256, read once)
    if intact and {k: done.get(k) for k in want} == want:
        log.info("clusters of %s are already built (%d clusters)", ds.dir, args.num_clusters)
        return done
    if intact and done.get("datastore") == want["datastore"] and not args.overwrite:
        # clusters a RetoMaton run may have used: like the index, replaced only when asked
        diff = ", ".join(f"{k}: {done['settings'].get(k)!r} -> {v!r}" for k, v in want["settings"].items()
                         if done["settings"].get(k) != v)
        raise KnnlmError(f"--datastore: {ds.dir} already has clusters of other settings ({diff}); pass --overwrite "
                         "to replace them")
    work = ds.dir / WORK
    _prepare_work(work, {**want, "assign_rows": ASSIGN_ROWS})  # (the chunking its done flags count in)
    centroids = _train(ds, args, work)  # [C, d] float32
    assign = _assign(ds, centroids, work)  # [N] int32
    (ds.dir / RECORD).unlink(missing_ok=True)  # (the record of other settings goes before their file)
    with atomic_path(ds.dir / FILE, expected_bytes=4 * ds.N) as tmp:
        assign.tofile(tmp)
    record = {**want, "file": FILE, "sha256": sha256_file(ds.dir / FILE),
              "sizes": {"min": int(np.bincount(assign, minlength=args.num_clusters).min()),
                        "max": int(np.bincount(assign, minlength=args.num_clusters).max())}}
    atomic_write_json(ds.dir / RECORD, record)  # last: the clusters count as built from here on
    shutil.rmtree(work, ignore_errors=True)
    log.info("clusters of %s: %d clusters, sizes %d-%d", ds.dir, args.num_clusters, record["sizes"]["min"],
             record["sizes"]["max"])
    return record


def _file_matches(ds, record: dict) -> bool:
    path = ds.dir / FILE
    return path.is_file() and path.stat().st_size == 4 * ds.N and sha256_file(path) == record.get("sha256")


def _prepare_work(work: Path, want: dict) -> None:
    """Keeps the work folder of an interrupted run with the same settings; starts afresh otherwise."""
    state = work / "settings.json"
    try:
        same = state.is_file() and read_json(state) == want
    except KnnlmError:
        same = False
    if not same:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        atomic_write_json(state, want)


FEW_POINTS_PER_CLUSTER = 39  # FAISS's ClusteringParameters.min_points_per_centroid: below it, it warns


def _train(ds, args: ClusterArgs, work: Path) -> np.ndarray:
    import faiss

    path = work / "centroids.f32"
    if path.is_file() and path.stat().st_size == 4 * args.num_clusters * ds.d:
        return np.fromfile(path, dtype=np.float32).reshape(args.num_clusters, ds.d)
    rng = np.random.default_rng(args.seed)
    n = min(args.sample_size, ds.N)
    rows = np.sort(rng.choice(ds.N, size=n, replace=False)) if n < ds.N else np.arange(ds.N)
    sample = np.ascontiguousarray(ds.keys[rows], dtype=np.float32)  # [n, d]
    log.info("k-means: %d clusters over %d sampled keys (d=%d, %d iterations)", args.num_clusters, n, ds.d, args.niter)
    if n < FEW_POINTS_PER_CLUSTER * args.num_clusters:  # said here, through logging; FAISS would print it itself
        log.warning("k-means: %d keys for %d clusters, fewer than FAISS's %d a cluster; clusters may be small or "
                    "empty (fewer --num_clusters, or a larger --sample_size if the store has more keys)", n,
                    args.num_clusters, FEW_POINTS_PER_CLUSTER)
    # max_points_per_centroid = n: k-means uses the whole sample, not a second subsample of its own;
    # min_points_per_centroid only decides FAISS's own stderr warning (the centroids are the same)
    km = faiss.Kmeans(ds.d, args.num_clusters, niter=args.niter, seed=args.seed, max_points_per_centroid=n,
                      min_points_per_centroid=1, verbose=False)
    km.train(sample)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)  # [C, d]
    with atomic_path(path, expected_bytes=centroids.nbytes) as tmp:
        centroids.tofile(tmp)
    return centroids


def _assign(ds, centroids: np.ndarray, work: Path) -> np.ndarray:
    """The nearest centroid of every key, a chunk at a time; finished chunks are flagged in ``done.u8``."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    n_chunks = -(-ds.N // ASSIGN_ROWS)
    out_path, done_path = work / "assign.i32", work / "done.u8"
    for path, size in ((out_path, 4 * ds.N), (done_path, n_chunks)):
        if not path.is_file() or path.stat().st_size != size:
            with open(path, "wb") as fh:
                fh.truncate(size)
    done = np.fromfile(done_path, dtype=np.uint8)
    with open(out_path, "r+b") as out, open(done_path, "r+b") as flags:
        for c in np.flatnonzero(done == 0):
            lo, hi = int(c) * ASSIGN_ROWS, min(ds.N, (int(c) + 1) * ASSIGN_ROWS)
            _, nearest = index.search(np.ascontiguousarray(ds.keys[lo:hi], dtype=np.float32), 1)  # [n, 1]
            out.seek(4 * lo)
            out.write(nearest[:, 0].astype(np.int32).tobytes())
            out.flush()
            os.fsync(out.fileno())  # the rows before their flag
            flags.seek(int(c))
            flags.write(b"\x01")
            flags.flush()
            os.fsync(flags.fileno())
    return np.fromfile(out_path, dtype=np.int32)


def load_clusters(ds, flag: str = "--no_clusters") -> np.ndarray:
    """The cluster of every row, int32 [N]; refused in one line when the store has none or they are not its own."""
    record = _read_record(ds)
    if not record and (ds.dir / RECORD).is_file():  # not "no clusters": the file is there, and broken
        raise KnnlmError(f"{flag}: {ds.dir / RECORD} is damaged (not a clusters record); rerun `knnlm datastore "
                         f"cluster {ds.dir}`")
    if not record:
        raise KnnlmError(f"{flag}: the datastore {ds.dir} has no clusters; run `knnlm datastore cluster {ds.dir}` "
                         "or pass --no_clusters true")
    if record.get("datastore") != _record(ds, ClusterArgs())["datastore"] or not _file_matches(ds, record):
        raise KnnlmError(f"{flag}: {ds.dir / FILE} was not built from this datastore (missing, changed or from an "
                         f"earlier build); rerun `knnlm datastore cluster {ds.dir}`")
    return np.fromfile(ds.dir / FILE, dtype=np.int32)


def verify_clusters(ds, flag: str = "--datastore") -> dict | None:
    """The clusters of a store checked against it (``knnlm datastore verify``): their settings, or None when it has
    none; a one-line ``KnnlmError`` when they are damaged or not its own."""
    if not ((ds.dir / RECORD).exists() or (ds.dir / FILE).exists()):
        return None
    load_clusters(ds, flag)
    return _read_record(ds)["settings"]
