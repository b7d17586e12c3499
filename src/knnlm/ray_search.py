"""The store's index shards searched by Ray actors: ``--search_backend ray``, ``knnlm index serve`` / ``index stop``.

One actor per shard file (``index/shard<s>.faiss`` of ``knnlm index build --shards S``) holds that shard's index and,
for exact distances, its rows of the keys; it may live on any node of a Ray cluster that has the files at the same
path (a shared filesystem, or per-node copies: docs/ray.md). Each batch of queries goes to every shard actor at once
(one ``ray.put``); the per-shard top-k come back with shard-local ids and are merged with ``faiss.merge_knn_results``,
the merge ``faiss.IndexShards`` itself runs (by distance, ties to the lower shard, i.e. the lower global row), so
ids and distances equal the in-process ``--search_backend faiss``. ``distances(queries, ids)`` sends each shard only
the (query, row) pairs it owns.

Before any search every actor reports what it loaded and the evaluating process checks it against its own copy of
``index/index.json`` and ``trained.faiss``: a shard that is missing, of another store (N, meta.json hash) or of
another trained quantizer (:func:`knnlm.index.trained_fingerprint`) is a one-line :class:`KnnlmError`.

Faults: actors restart without limit (the constructor reloads the shard) and a call in flight on a dead actor is
retried ``MAX_TASK_RETRIES`` times by Ray; after that, or when the reload fails, the error names the shard and node.

``ray`` is an optional dependency (the ``ray`` extra): this module imports it only when a Ray backend is made.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import THREAD_LIMIT, KnnlmError, require_finite

log = logging.getLogger(__name__)

NAMESPACE = "knnlm"  # Ray namespace of served groups: `index serve`, evaluations and `index stop` meet there
MAX_TASK_RETRIES = 3  # a search on an actor that died is resubmitted this many times (to the restarted actor)
START_TIMEOUT_S = 300.0  # the shard actors must be placed and loaded within this
SHARD_RESOURCE = "knnlm_shard_{}"  # a node started with this custom resource gets shard <s>'s actor (docs/ray.md)
INLINE_BYTES = 64 << 10  # queries up to this size travel inside each call (Ray inlines arguments under 100 KiB)
SHARD_CPUS = 1.0  # CPUs Ray reserves for each shard actor (--ray_shard_cpus of knnlm eval and knnlm index serve)


@dataclass
class RayServeArgs:
    name: str = field(default="", metadata={"help": "Name of the served group of shard actors (evaluations pass it as --ray_index)."})
    ray_address: str = field(default="auto", metadata={"help": "The Ray cluster: auto (the one `ray start` runs on this machine), HOST:PORT (its GCS address) or ray://HOST:PORT."})
    ray_shard_cpus: float = field(default=SHARD_CPUS, metadata={"help": "CPUs Ray reserves for each shard actor; FAISS searches with that many threads."})

    def validate(self) -> None:
        check_group_name(self.name, "--name")
        check_address(self.ray_address)
        if self.ray_address == "local":
            raise KnnlmError("--ray_address: a local Ray ends with this command, and the served shards with it; start "
                             "one with `ray start --head` and pass --ray_address auto")
        check_cpus(self.ray_shard_cpus)


def check_group_name(name: str, flag: str) -> None:
    """A served group's name: letters, digits, '_', '.', '-' (it becomes part of Ray actor names, and the commands
    printed for it are pasted into a shell unquoted)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise KnnlmError(f"{flag}: {name!r} is not a group name; use letters, digits, '_', '.' and '-' (e.g. wiki-ivf)")


def check_address(address: str) -> None:
    if not (address in ("local", "auto") or address.startswith("ray://") or address.rpartition(":")[2].isdigit()):
        raise KnnlmError(f"--ray_address: {address!r} is not local, auto, ray://HOST:PORT or HOST:PORT")


def check_cpus(cpus: float) -> None:
    # FAISS searches with that many threads: int(round(inf)) overflows, and Ray cannot reserve it either
    require_finite("ray_shard_cpus", cpus, maximum=THREAD_LIMIT)


def check_knn_args(args) -> None:
    """The Ray settings of a :class:`knnlm.knn.KNNArgs`."""
    if args.ray_index and args.search_backend != "ray":
        raise KnnlmError("--ray_index: a served index is searched with --search_backend ray")
    if args.ray_index:
        check_group_name(args.ray_index, "--ray_index")
    check_address(args.ray_address)
    if args.ray_index and args.ray_address == "local":
        raise KnnlmError("--ray_index: a served index lives in a running Ray cluster, not a new local one; pass "
                         "--ray_address auto (or ray://HOST:PORT)")
    check_cpus(args.ray_shard_cpus)


# ------------------------------------------------------------------------------------------------------------ connect
def ray_module():
    try:
        import ray
    except ImportError:
        raise KnnlmError("--search_backend ray: Ray is not installed; pip install 'knnlm[ray]'") from None
    return ray


def connect(address: str, local_fix: bool = True):
    """The ``ray`` module, connected: a process already connected (``ray.init`` by the caller) keeps its connection;
    ``local`` starts a Ray on this machine for this process only; ``auto`` / ``HOST:PORT`` / ``ray://HOST:PORT``
    join a running cluster. ``local_fix``: the error may suggest ``--ray_address local`` (not where a cluster must
    outlive the command)."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    fix = "start a cluster with `ray start --head`" + (" or pass --ray_address local" if local_fix else "")
    if address not in ("local", "auto"):
        _require_listening(address, fix)  # Ray itself retries an address where nothing listens for minutes
    # Ray Client takes fewer options; Ray's own INFO/WARNING lines on joining would bury a one-line error
    kwargs = {} if address.startswith("ray://") else {"log_to_driver": False, "logging_level": logging.ERROR}
    if address == "local":
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, namespace=NAMESPACE, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise KnnlmError(f"--ray_address {address}: cannot connect to Ray ({_first_line(e)}); {fix}") from None
    return ray


CONNECT_TIMEOUT_S = 5.0  # for the TCP check of a HOST:PORT address


def _require_listening(address: str, fix: str) -> None:
    """One line, within CONNECT_TIMEOUT_S, when nothing accepts a TCP connection at ``[ray://]HOST:PORT``."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise KnnlmError(f"--ray_address {address}: nothing answers there ({e.strerror or e}); {fix}, or pass the "
                         "address it prints") from None


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


# -------------------------------------------------------------------------------------------------------- the actor
class ShardSearcher:
    """One shard of a store's index, loaded on whichever node Ray placed it (made a Ray actor by :func:`_actor_cls`).

    The constructor never raises: what it could not load is reported by :meth:`describe`, so that the evaluating
    process turns it into one line naming the shard and node (an exception in an actor's constructor kills it)."""

    def __init__(self, ds_dir: str, shard: int, cpus: float):
        import faiss
        import ray

        faiss.omp_set_num_threads(max(1, int(round(cpus))))
        self.ds_dir, self.shard = Path(ds_dir), shard
        ctx = ray.get_runtime_context()
        self.node = {"node_ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(), "pid": os.getpid(),
                     "restarted": bool(ctx.was_current_actor_reconstructed)}
        self.index = self.keys = None
        self.searches, self.search_s, self.nprobe = 0, 0.0, None
        try:
            self.facts = self._load()
            self.error = None
        except (KnnlmError, OSError) as e:
            self.facts, self.error = {}, _first_line(e)

    def _load(self) -> dict:
        from .index import _read_index, datastore_identity, read_info, trained_fingerprint

        idir = self.ds_dir / "index"
        if not (idir / "index.json").exists():
            raise KnnlmError(f"{idir / 'index.json'} does not exist; copy the store's index folder to this node")
        info = read_info(idir)
        if not 0 <= self.shard < info["shards"]:
            raise KnnlmError(f"{idir / 'index.json'} records {info['shards']} shard(s), not shard {self.shard}")
        path = idir / f"shard{self.shard}.faiss"
        if not path.exists():
            raise KnnlmError(f"{path} does not exist; copy it to this node or rebuild with "
                             f"`knnlm index build {self.ds_dir} --shards {info['shards']} --overwrite`")
        self.index = _read_index(path)
        lo, hi = info["shard_bounds"][self.shard], info["shard_bounds"][self.shard + 1]
        self.lo, self.rows, self.d = int(lo), int(hi - lo), int(info["d"])
        has_meta = (self.ds_dir / "meta.json").exists()  # the node's copy of the store (for the keys), if any
        return {"datastore": info.get("datastore"), "factory": info["factory"], "bounds": [lo, hi],
                "ntotal": int(self.index.ntotal), "trained": trained_fingerprint(self.index),
                "store": datastore_identity(self.ds_dir) if has_meta else None, "keys": self._keys_file()}

    def _keys_file(self) -> str | None:
        """Where this node holds the shard's keys: its own slice ``index/shard<s>.keys.f16`` (rows lo..hi of keys.f16)
        or the store's ``keys.f16``; None when neither is there with the right size."""
        slice_path = self.ds_dir / "index" / f"shard{self.shard}.keys.f16"
        if slice_path.exists() and slice_path.stat().st_size == self.rows * self.d * 2:
            return str(slice_path)
        store = self.ds_dir / "keys.f16"
        if store.exists() and store.stat().st_size >= (self.lo + self.rows) * self.d * 2:
            return str(store)
        return None

    def describe(self) -> dict:
        return {"shard": self.shard, "error": self.error, "searches": self.searches, "search_s": self.search_s,
                **self.node, **self.facts}

    def _ready(self) -> None:
        if self.error:
            raise KnnlmError(self.error)

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray, float]:
        """queries [B, d] float32 -> (D [B, k] float32, I [B, k] int32 shard-local rows, -1 unfilled; seconds)."""
        import time

        from .index import _set_nprobe

        self._ready()
        if nprobe != self.nprobe:
            _set_nprobe(self.index, nprobe)
            self.nprobe = nprobe
        t0 = time.perf_counter()
        dists, ids = self.index.search(queries, k)
        took = time.perf_counter() - t0
        self.searches += 1
        self.search_s += took
        return dists, ids.astype(np.int32), took

    def distances(self, queries: np.ndarray, qrows: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact squared L2 of the pairs (queries[qrows[j]], shard row rows[j]): [B, d], [n] int32, [n] int32 -> [n]."""
        from .distances import exact_sq_dists_pairs, resident_rows

        self._ready()
        if self.keys is None:
            path = self.facts.get("keys")
            if path is None:
                raise KnnlmError(f"no keys for exact distances: {self.ds_dir / 'keys.f16'} (or its rows as "
                                 f"index/shard{self.shard}.keys.f16) is not on this node; copy it there (docs/ray.md)")
            start = 0 if path.endswith(".keys.f16") else self.lo
            self.keys = resident_rows(path, self.d, start, self.rows)  # [rows, d]
        pairs = (torch.from_numpy(a.astype(np.int64)) for a in (qrows, rows))
        return exact_sq_dists_pairs(self.keys, torch.from_numpy(np.array(queries)), *pairs).numpy()  # [n]


_ACTOR_CLS = None


def _actor_cls():
    """:class:`ShardSearcher` as a Ray actor class: restarted whenever its process dies (the constructor reloads the
    shard); a call in flight on it is resubmitted up to ``MAX_TASK_RETRIES`` times."""
    global _ACTOR_CLS
    if _ACTOR_CLS is None:
        ray = ray_module()
        _ACTOR_CLS = ray.remote(max_restarts=-1, max_task_retries=MAX_TASK_RETRIES)(ShardSearcher)
    return _ACTOR_CLS


# --------------------------------------------------------------------------------------------------------- the group
def _expected(ds_dir: Path, flag: str = "--search_backend ray") -> dict:
    """What the evaluating process's own copy of the index says every shard must be."""
    from .index import _read_index, check_identity, datastore_identity, read_info, trained_fingerprint

    idir = ds_dir / "index"
    if not (idir / "index.json").exists():
        raise KnnlmError(f"{flag}: {ds_dir} has no built index; build it with "
                         f"`knnlm index build {ds_dir} --shards S` (S shard files for S actors)")
    info = read_info(idir)
    check_identity(idir, info, ds_dir)
    trained = idir / "trained.faiss"
    return {"datastore": datastore_identity(ds_dir), "factory": info["factory"], "shards": int(info["shards"]),
            "bounds": [int(b) for b in info["shard_bounds"]],
            "trained": trained_fingerprint(_read_index(trained)) if trained.exists() else None}


def _where(desc: dict) -> str:
    return f"shard {desc['shard']} on node {desc.get('node_ip', '?')} ({str(desc.get('node_id', '?'))[:8]})"


def check_shards(descs: list[dict], expected: dict, flag: str, need_keys: bool) -> None:
    """Refuses, in one line, a group whose shards are not exactly the store's: an actor that could not load its shard,
    one of another store or build, a missing row range, another trained quantizer (or, without ``trained.faiss``
    here, shards that disagree about it); with ``need_keys``, a node without the keys for exact distances."""
    want = expected["datastore"]
    trained = expected["trained"] or descs[0].get("trained")
    for s, d in enumerate(descs):
        lo, hi = expected["bounds"][s], expected["bounds"][s + 1]
        if d["error"]:  # the actor's own one-line error, less the flag it names (this message names ``flag``)
            problem = d["error"].split(": ", 1)[1] if d["error"].startswith("--") else d["error"]
        elif d["datastore"] != want or d["store"] not in (None, want):
            theirs = d["datastore"] if d["datastore"] != want else d["store"]
            theirs = theirs if isinstance(theirs, dict) else {}
            problem = (f"its index was built over another datastore (N={theirs.get('N', '?')}, meta "
                       f"{theirs.get('meta_sha256', '?')}; this one: N={want['N']}, meta {want['meta_sha256']})")
        elif d["bounds"] != [lo, hi] or d["ntotal"] != hi - lo or d["factory"] != expected["factory"]:
            problem = (f"it holds {d['ntotal']} rows of a '{d['factory']}' index over rows {d['bounds']}, expected "
                       f"rows [{lo}, {hi}) of '{expected['factory']}'")
        elif d["trained"] != trained:
            problem = (f"it was built from another trained quantizer (fingerprint {d['trained']}, expected {trained}):"
                       f" a shard of another index build")
        elif need_keys and not d["keys"]:
            problem = "the node has no keys for exact distances (keys.f16 or index/shard<s>.keys.f16)"
        else:
            continue
        raise KnnlmError(f"{flag}: {_where(d)}: {problem}; every shard must come from one "
                         f"`knnlm index build --shards {expected['shards']}` of this store (docs/ray.md)")


def _wait_ready(ray, actors: list, flag: str, cpus: float) -> list[dict]:
    refs = [a.describe.remote() for a in actors]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
    if pending:
        missing = ", ".join(str(refs.index(r)) for r in pending)
        raise KnnlmError(f"{flag}: shard actor(s) {missing} were not placed and loaded within {START_TIMEOUT_S:.0f} s "
                         f"(free in the cluster: {ray.available_resources().get('CPU', 0):g} CPU; each needs "
                         f"{cpus:g}, see --ray_shard_cpus, and the node with its resource knnlm_shard_<s> if any)")
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:
        raise KnnlmError(f"{flag}: a shard actor died while loading ({_first_line(e)})") from None


def start_actors(ray, ds_dir: Path, n_shards: int, cpus: float, name: str | None = None) -> list:
    """One :class:`ShardSearcher` actor per shard (named ``<name>/shard<s>`` and detached when ``name`` is given),
    each on a node holding the custom resource ``knnlm_shard_<s>`` where the cluster has one."""
    cls, resources = _actor_cls(), ray.cluster_resources()
    actors = []
    for s in range(n_shards):
        opts: dict = {"num_cpus": cpus, "namespace": NAMESPACE}
        if SHARD_RESOURCE.format(s) in resources:
            opts["resources"] = {SHARD_RESOURCE.format(s): 0.001}  # a tiny share: several stores' groups fit
        if name:
            opts.update(name=f"{name}/shard{s}", lifetime="detached")
        actors.append(cls.options(**opts).remote(str(ds_dir.resolve()), s, cpus))
    return actors


def served_actors(ray, name: str) -> list[str]:
    """Names of the shard actors of the served group ``name``, in shard order."""
    prefix = f"{name}/shard"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and a["name"].startswith(prefix) and a["name"][len(prefix):].isdigit()]
    return sorted(names, key=lambda n: int(n[len(prefix):]))


def _kill(ray, actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 -- already gone: nothing to release
            pass


def serve(ds_dir: str | Path, args: RayServeArgs) -> list[dict]:
    """Starts the named, detached group of shard actors of a store (it outlives this process); returns their
    descriptions. Nothing is left running when a shard is refused."""
    from .datastore import Datastore

    ds_dir = Path(Datastore.open(ds_dir, "index serve").dir)  # a file, a model, a missing folder: not "no index"
    expected = _expected(ds_dir, "index serve")
    ray = connect(args.ray_address, local_fix=False)
    if served_actors(ray, args.name):
        raise KnnlmError(f"--name: a group named {args.name!r} is already served; stop it with "
                         f"`knnlm index stop {args.name}` or choose another name")
    actors = start_actors(ray, ds_dir, expected["shards"], args.ray_shard_cpus, name=args.name)
    try:
        descs = _wait_ready(ray, actors, "index serve", args.ray_shard_cpus)
        check_shards(descs, expected, "index serve", need_keys=False)
    except BaseException:
        _kill(ray, actors)
        raise
    log.info("serving %s: %d shard(s) of %s", args.name, len(actors), ds_dir)
    return descs


def stop(name: str, address: str) -> int:
    """Kills the served group ``name``; returns how many shard actors it had."""
    check_group_name(name, "name")
    check_address(address)
    ray = connect(address, local_fix=False)
    names = served_actors(ray, name)
    if not names:
        raise KnnlmError(f"index stop: no served group named {name!r} in the Ray cluster at {address} "
                         f"(`ray list actors` shows what runs)")
    _kill(ray, [ray.get_actor(n, namespace=NAMESPACE) for n in names])
    return len(names)


# ------------------------------------------------------------------------------------------------------- the backend
class RayBackend:
    """A :class:`knnlm.search.SearchBackend` over the shard actors of one store (its own, or a served group)."""

    name = "ray"
    device = torch.device("cpu")
    exact_distances = False  # the shards' own distances (PQ estimates for IVF-PQ; FAISS's Flat ranking sums)

    def __init__(self, datastore, args):
        self.ds, self.args = datastore, args
        self.ntotal = int(datastore.N)
        self.owned, self.actors = False, []
        self.last_search_s = 0.0  # the slowest shard's own FAISS seconds in the last search (benchmarks/ray_search.py)
        self.ray = connect(args.ray_address)
        expected = _expected(Path(datastore.dir))
        self.bounds = expected["bounds"]
        flag = "--ray_index" if args.ray_index else "--search_backend ray"
        if args.ray_index:
            names = served_actors(self.ray, args.ray_index)
            if len(names) != expected["shards"]:
                what = (f"the served group {args.ray_index!r} has {len(names)} shard actor(s), this store's index "
                        f"has {expected['shards']}") if names else f"no group named {args.ray_index!r} is served"
                raise KnnlmError(f"--ray_index: {what}; start it with `knnlm index serve {datastore.dir} --name "
                                 f"{args.ray_index}`")
            self.actors, self.owned = [self.ray.get_actor(n, namespace=NAMESPACE) for n in names], False
        else:
            self.actors = start_actors(self.ray, Path(datastore.dir), expected["shards"], args.ray_shard_cpus)
            self.owned = True
        try:
            self.descs = _wait_ready(self.ray, self.actors, flag, args.ray_shard_cpus)
            check_shards(self.descs, expected, flag, need_keys=args.recompute_dists or args.stateful)
        except BaseException:
            self.close()
            raise
        log.info("ray search over %d shard(s): %s", len(self.actors), "; ".join(_where(d) for d in self.descs))

    def _shared(self, queries: torch.Tensor):
        """queries [B, d] as every shard's argument: put into the object store once when large (each actor then reads
        that copy), else passed inline with each call (cheaper than an object-store round trip for a few rows)."""
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        return self.ray.put(q) if q.nbytes > INLINE_BYTES else q

    def _gather(self, refs: dict) -> dict:
        """{shard: ObjectRef} -> {shard: result}; a shard that failed after Ray's retries is one line naming it."""
        try:
            return dict(zip(refs, self.ray.get(list(refs.values()))))
        except self.ray.exceptions.RayError:
            pass  # find which shard failed, below
        out = {}
        for s, ref in refs.items():
            try:
                out[s] = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as e:  # raised inside the actor (e.g. its reload failed)
                cause = e.cause if isinstance(getattr(e, "cause", None), KnnlmError) else e
                raise KnnlmError(f"--search_backend ray: {_where(self.descs[s])}: {_first_line(cause)}") from None
            except self.ray.exceptions.RayError as e:  # the actor died and did not come back within the retries
                raise KnnlmError(f"--search_backend ray: {_where(self.descs[s])} did not answer after "
                                 f"{MAX_TASK_RETRIES} retries ({_first_line(e)}); check the node, then rerun "
                                 f"(a served group: `knnlm index stop` and `index serve` it again)") from None
        return out

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss

        q = self._shared(queries)  # [B, d]
        results = self._gather({s: a.search.remote(q, k, self.args.nprobe) for s, a in enumerate(self.actors)})
        all_d = np.stack([results[s][0] for s in range(len(self.actors))])  # [S, B, k]
        all_i = np.stack([np.where(results[s][1] >= 0, results[s][1].astype(np.int64) + self.bounds[s], -1)
                          for s in range(len(self.actors))])  # [S, B, k] global rows
        self.last_search_s = max(r[2] for r in results.values())
        dists, ids = faiss.merge_knn_results(all_d, all_i)  # [B, k] each: IndexShards' merge
        dists, ids = torch.from_numpy(np.ascontiguousarray(dists)), torch.from_numpy(np.ascontiguousarray(ids))
        return dists.masked_fill_(ids < 0, math.inf), ids

    def distances(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.cpu().long()  # [B, m]
        out = torch.full(ids.shape, math.inf, dtype=torch.float32)
        q = self._shared(queries)  # [B, d]
        refs, where = {}, {}
        for s, actor in enumerate(self.actors):
            lo, hi = self.bounds[s], self.bounds[s + 1]
            qrow, col = ((ids >= lo) & (ids < hi)).nonzero(as_tuple=True)  # the pairs shard s owns
            if len(qrow):
                rows = (ids[qrow, col] - lo).numpy().astype(np.int32)
                refs[s] = actor.distances.remote(q, qrow.numpy().astype(np.int32), rows)
                where[s] = (qrow, col)
        for s, dist in self._gather(refs).items():
            out[where[s]] = torch.tensor(dist)  # a copy: Ray returns read-only arrays
        return out  # [B, m]

    def close(self) -> None:
        """Kills the actors this backend started (a served group stays up for others)."""
        if self.owned:
            _kill(self.ray, self.actors)
        self.actors = []


def ray_backend(datastore, args, index=None, use_gpu=None) -> RayBackend:
    """``--search_backend ray``: the store's built shards searched by Ray actors (``use_gpu``: not used)."""
    if index is not None:
        raise KnnlmError("--search_backend ray: searches the store's own built shards; a prebuilt index is searched "
                         "with --search_backend faiss")
    return RayBackend(datastore, args)
