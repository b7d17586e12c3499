"""The kNN distribution over the vocabulary, its interpolation with the LM, and batched retrieval.

p_knn(w) ∝ Σ_{i: v_i = w} exp(-d_i / T) over the k retrieved neighbours, d_i the squared L2 distance.
p_knnlm = (1 - λ) p_lm + λ p_knn, computed in log space; λ is the weight of the kNN part, as in Khandelwal et al.
(2020) and knn-transformers. Chiang et al. print the formula with λ on the LM side (λ p_lm + (1 - λ) p_knn) but use
λ = 0.25 with the kNN-LM code of Xu et al., where 0.25 weighs p_knn; `--lmbda 0.25` here is that setting.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
import torch

from .config import field_default
from .datastore import Datastore
from .errors import KnnlmError, require_finite
from .gpu_search import SEARCH_DTYPE, SEARCH_MARGIN
from .ray_search import SHARD_CPUS, check_knn_args

log = logging.getLogger(__name__)


@dataclass
class KNNArgs:
    k: int = field(default=1024, metadata={"help": "Neighbours retrieved per position (clamped to the datastore size)."})
    lmbda: list[float] = field(default_factory=lambda: [0.25], metadata={"help": "Weight of p_knn in the interpolation; eval takes a comma list, which sweeps several from one retrieval pass (generate and serve take one)."})
    knn_temp: float = field(default=1.0, metadata={"help": "Temperature T of exp(-d/T)."})
    recompute_dists: bool = field(default=False, metadata={"help": "Recompute exact squared L2 distances from the stored keys (needed with PQ indexes)."})
    ignore_top: bool = field(default=False, metadata={"help": "eval only: leave each position's own row out of its neighbours (querying a store with its own training text): its own row where the evaluated corpus is the store's (the same tokens), else the nearest neighbour."})
    nprobe: int = field(default=32, metadata={"help": "IVF lists visited per query (approximate indexes only)."})
    search_backend: str = field(default="auto", metadata={"help": "Where the keys are searched: faiss (in-process FAISS index), torch (keys on a torch device: a GPU without GPU FAISS), ray (the index shards on Ray actors: docs/ray.md), auto (faiss; torch on a GPU that only torch sees)."})
    search_dtype: str = field(default=SEARCH_DTYPE, metadata={"help": "--search_backend torch: precision of the GEMM that ranks candidates (float16, bfloat16, float32); their distances are then recomputed exactly."})
    search_margin: int = field(default=SEARCH_MARGIN, metadata={"help": "--search_backend torch: candidates kept beyond k from the half-precision ranking, so the exact k nearest are among them (docs/scaling.md: recall by margin)."})
    search_nlist: int = field(default=0, metadata={"help": "--search_backend torch: IVF lists (FAISS k-means on the CPU; --nprobe of them searched per query); 0 searches every key."})
    retomaton: bool = field(default=False, metadata={"help": "RetoMaton (Alon et al. 2022): follow the neighbours whose value was the next token to their successor entries and search only when fewer than --min_knns survive (docs/retomaton.md)."})
    min_knns: int = field(default=1, metadata={"help": "RetoMaton: search when fewer than this many pointers survive (larger: more searches, closer to the kNN-LM)."})
    max_knns: int = field(default=1024, metadata={"help": "RetoMaton: at most this many pointer candidates per step (successors first, then their clusters' members)."})
    no_pointer: bool = field(default=False, metadata={"help": "RetoMaton: search at every step and use no pointers (equals the kNN-LM with exact distances)."})
    no_clusters: bool = field(default=True, metadata={"help": "RetoMaton: follow pointers to successors only; false also adds the other members of their clusters (`knnlm datastore cluster` first)."})
    skip_search_prob: float = field(default=0.0, metadata={"help": "A kNN-LM that skips each search with this probability (seeded per position) and uses the LM alone there: RetoMaton's baseline."})
    ray_address: str = field(default="local", metadata={"help": "With --search_backend ray: local (a Ray on this machine for this run), auto (the running cluster: `ray start`), HOST:PORT (its GCS address, as `ray start --head` prints it) or ray://HOST:PORT (Ray Client)."})
    ray_index: str = field(default="", metadata={"help": "With --search_backend ray: the name of a group of shard actors kept loaded by `knnlm index serve` (else this run starts its own)."})
    ray_shard_cpus: float = field(default=SHARD_CPUS, metadata={"help": "With --search_backend ray: CPUs Ray reserves for each shard actor it starts; FAISS searches with that many threads."})

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):  # (a caller's k=2.5 reached FAISS)
            raise KnnlmError(f"--k: must be a whole number, got {self.k!r}")
        if self.k < 1:
            raise KnnlmError(f"--k: must be >= 1, got {self.k}")
        if not isinstance(self.lmbda, (list, tuple)):
            raise KnnlmError(f"--lmbda: a list of weights, e.g. [0.25], got {self.lmbda!r}")
        for lam in self.lmbda:
            if not 0.0 <= lam <= 1.0:
                raise KnnlmError(f"--lmbda: {lam} is outside [0, 1]; it is the weight of the kNN distribution")
        require_finite("knn_temp", self.knn_temp)
        if self.nprobe < 1:
            raise KnnlmError(f"--nprobe: must be >= 1, got {self.nprobe}")
        from .models import DTYPES

        if self.search_dtype not in DTYPES:
            raise KnnlmError(f"--search_dtype: {self.search_dtype!r} is not one of {', '.join(DTYPES)}")
        if self.search_margin < 0:
            raise KnnlmError(f"--search_margin: must be >= 0, got {self.search_margin}")
        if self.search_nlist < 0:
            raise KnnlmError(f"--search_nlist: must be >= 0 (0: no IVF), got {self.search_nlist}")
        if self.min_knns < 1:
            raise KnnlmError(f"--min_knns: must be >= 1, got {self.min_knns}")
        if self.max_knns < 1:
            raise KnnlmError(f"--max_knns: must be >= 1, got {self.max_knns}")
        if self.no_pointer and not self.retomaton:
            raise KnnlmError("--no_pointer: a RetoMaton check (search at every step, no pointers); pass it with "
                             "--retomaton true, or drop it")
        if self.retomaton and self.min_knns > self.max_knns:
            # at most max_knns pointers survive a step, so fewer than min_knns always do: every step would search
            raise KnnlmError(f"--min_knns: {self.min_knns} exceeds --max_knns {self.max_knns}, so RetoMaton would search "
                             "at every step; pass --min_knns <= --max_knns")
        if not 0.0 <= self.skip_search_prob < 1.0:
            raise KnnlmError(f"--skip_search_prob: must be in [0, 1), got {self.skip_search_prob}")
        if self.retomaton and self.skip_search_prob > 0:
            raise KnnlmError("--skip_search_prob: the random-skip kNN-LM is RetoMaton's baseline; pass it without "
                             "--retomaton true")
        if self.ignore_top and self.retomaton and not self.no_pointer:
            # it trims searched neighbours only: a pointer to a position's own row (its successor's, next step) comes
            # back unfiltered, and the chain then reads the gold tokens off the store's copy of the text
            raise KnnlmError("--ignore_top: drops only searched neighbours, and RetoMaton's pointers would bring a "
                             "position's own row back; drop --ignore_top, or --retomaton true")
        from .search import backend_names

        if self.search_backend not in backend_names():
            raise KnnlmError(f"--search_backend: unknown backend {self.search_backend!r}; choose one of "
                             f"{', '.join(backend_names())}")
        if self.search_backend == "ray" or self.ray_index:
            check_knn_args(self)

    def refuse_inactive(self, datastore: bool, memory: bool) -> None:
        """A kNN setting off its default that this run would not read is refused in one line (it was ignored, and the
        run looked like the one asked for): any without ``datastore`` (an MLP ``memory`` reads only λ), a backend's
        own settings with another backend, RetoMaton's without ``--retomaton true``."""
        for f in fields(self):
            if getattr(self, f.name) == field_default(f):
                continue
            if f.name == "lmbda" and (datastore or memory):
                continue
            if not datastore:
                fix = ("an MLP memory reads --lmbda alone; drop" if memory else "pass one, or drop")
                raise KnnlmError(f"--{f.name}: a kNN setting, which acts only with --datastore (or, for --lmbda, "
                                 f"--mlp_memory); {fix} --{f.name}")
            for (name, value), names in _ACTS_ONLY_WITH.items():
                if f.name in names and getattr(self, name) != value:
                    raise KnnlmError(f"--{f.name}: acts only with --{name} {str(value).lower()}; pass it, or drop "
                                     f"--{f.name}")

    def refuse_stateful(self, where: str) -> None:
        """Refuses RetoMaton and random search skips in ``where``, which scores positions independently (each would
        get the plain kNN-LM under settings that say otherwise)."""
        if self.stateful:
            flag = "--retomaton" if self.retomaton else "--skip_search_prob"
            raise KnnlmError(f"{flag}: RetoMaton and random search skips follow a text in order; {where} scores "
                             f"positions independently with the plain kNN-LM: drop {flag} (knnlm eval runs them)")

    @property
    def stateful(self) -> bool:
        """Whether scoring a position depends on the positions before it (RetoMaton, random skips)."""
        return self.retomaton or self.skip_search_prob > 0


# settings read by one backend or by RetoMaton only: (setting, the value that makes them act) -> their names
# (--ray_index and --no_pointer without theirs are refused by KNNArgs.validate, for library callers too)
_ACTS_ONLY_WITH = {("search_backend", "torch"): ("search_dtype", "search_margin", "search_nlist"),
                   ("search_backend", "ray"): ("ray_address", "ray_shard_cpus"),
                   ("retomaton", True): ("min_knns", "max_knns", "no_clusters")}


def _neighbour_logits(dists: torch.Tensor, temp: float) -> torch.Tensor:
    return -dists.float() / temp  # [B, k]; missing neighbours carry dist = inf -> -inf


def knn_log_probs(dists: torch.Tensor, vals: torch.Tensor, vocab_size: int, temp: float = 1.0) -> torch.Tensor:
    """log p_knn over the vocabulary: [B, k] distances and values -> [B, V] (-inf for tokens no neighbour has)."""
    logits = _neighbour_logits(dists, temp)  # [B, k]
    top = logits.max(dim=-1, keepdim=True).values.clamp_min(-1e30)  # [B, 1]; finite even with no neighbours
    weights = torch.exp(logits - top)  # [B, k] in (0, 1]
    mass = torch.zeros(dists.shape[0], vocab_size, dtype=torch.float64, device=dists.device)
    mass.scatter_add_(1, vals.long(), weights.double())
    total = mass.sum(dim=-1, keepdim=True)  # [B, 1]
    return (mass.log() - total.log()).float()


def knn_gold_log_prob(dists: torch.Tensor, vals: torch.Tensor, gold: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """log p_knn(gold) for each row: [B, k], [B, k], [B] -> [B] (exact log-sum-exp, no [B, V] tensor)."""
    logits = _neighbour_logits(dists, temp).double()
    hit = vals.long() == gold.long().unsqueeze(-1)
    num = torch.logsumexp(logits.masked_fill(~hit, -math.inf), dim=-1)
    return (num - torch.logsumexp(logits, dim=-1)).float()


def no_neighbours(dists: torch.Tensor) -> torch.Tensor:
    """[n, k] distances -> [n] bool: the positions whose search found no neighbour (all inf: a skipped search, or IVF
    lists probed empty), where p_knn is undefined (NaN)."""
    return torch.isinf(dists).all(dim=-1)


def lm_where(none: torch.Tensor, lm: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """``mixed`` (a kNN-LM log-prob, positions first: [n] or [n, ...]) with the LM's ``lm`` at the positions ``none``
    [n] (:func:`no_neighbours`)."""
    none = none.to(mixed.device)
    if not none.any():
        return mixed
    return torch.where(none.view(-1, *[1] * (mixed.dim() - 1)), lm.to(mixed.device), mixed)


def interpolate(lm_logp: torch.Tensor, knn_logp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log((1 - λ) p_lm + λ p_knn); λ = 0 returns ``lm_logp`` itself and λ = 1 ``knn_logp``."""
    if not 0 <= lmbda <= 1:  # (NaN too) log1p(-λ) / log(λ) would raise "math domain error" or give NaN
        raise KnnlmError(f"--lmbda: {lmbda} is outside [0, 1]; it is the weight of the kNN distribution")
    if lmbda == 0:
        return lm_logp
    if lmbda == 1:
        return knn_logp
    return torch.logaddexp(lm_logp + math.log1p(-lmbda), knn_logp + math.log(lmbda))


def drop_own(dists: torch.Tensor, ids: torch.Tensor, own: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """--ignore_top: k + 1 neighbours [B, k + 1] -> [B, k] without each query's own row. ``own`` [B] (store rows, when
    the queries are the store's own positions): that row where the search found it, else the farthest (the k nearest
    others are kept). ``own`` None: the nearest, the only guess without the rows; it is the query's own row unless
    another row has the same key (a context repeated verbatim: a tie at distance ~0, where the nearest by id need not
    be the query's own and the gold token would leak back)."""
    if own is None:
        drop = torch.zeros_like(ids, dtype=torch.bool)  # [B, k + 1]
        drop[:, 0] = True
    else:
        drop = ids == own.to(ids.device)[:, None]  # at most one column: a row appears once in a search result
        drop[:, -1] |= ~drop.any(dim=1)
    keep = ~drop
    return dists[keep].view(len(ids), -1), ids[keep].view(len(ids), -1)


class Retriever:
    """Batched nearest-neighbour search over a datastore through one :class:`knnlm.search.SearchBackend`.

    ``k`` is the number of neighbours each search returns (``--k`` clamped to the store's size; with ``--ignore_top``
    one more is searched and the query's own row dropped: :func:`drop_own`). ``index``: a prebuilt FAISS-like index
    or a backend to use."""

    def __init__(self, datastore, args: KNNArgs, index=None, use_gpu: bool | None = None):
        from .search import make_backend

        datastore = Datastore.open(datastore)
        args.validate()  # a Python caller's settings (the CLI's are checked already; checking twice is cheap)
        self.ds, self.args = datastore, args
        self.backend = make_backend(datastore, args, index=index, use_gpu=use_gpu)
        self._k_search = min(args.k + int(args.ignore_top), datastore.N)
        self.k = self._k_search - int(args.ignore_top)
        if self.k < 1:  # every search would return nothing: p_knn undefined, the kNN-LM silently the LM
            raise KnnlmError(f"--ignore_top: the datastore {datastore.dir} holds {datastore.N} key, which "
                             "--ignore_top drops as each query's own; drop --ignore_top or use a larger datastore")
        if args.k + int(args.ignore_top) > datastore.N:
            log.info("k=%d exceeds the datastore size %d: retrieving all keys", args.k, datastore.N)
        self.vals = torch.from_numpy(np.asarray(datastore.vals, dtype=np.int64))  # [N], small enough to hold
        self._vals_on = {self.vals.device: self.vals}  # a copy per device searched on, made once
        # a backend whose distances are already exact (torch): recomputing them would add nothing
        self.recompute = args.recompute_dists and not self.backend.exact_distances
        if (self.recompute or args.stateful) and hasattr(self.backend, "load_keys"):
            self.backend.load_keys()  # exact distances from the first query on: read the keys now, with the index

    def search_ids(self, queries: torch.Tensor, recompute: bool | None = None,
                   own: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, d] -> (squared L2 distances float32 [B, k], row ids int64 [B, k]), nearest first by the
        index's own distances; a row the index could not fill has id -1 and distance inf. Distances are exact with
        ``--recompute_dists`` (the order stays the index's; ``recompute`` False: the index's own distances, for a
        caller that computes exact ones of more rows itself). ``own`` [B] int64: each query's own store row, which
        ``--ignore_top`` leaves out (:func:`drop_own`)."""
        if queries.dim() != 2 or queries.shape[1] != self.ds.d:  # (FAISS's own check is an empty AssertionError)
            raise KnnlmError(f"queries: shape {tuple(queries.shape)}, but the datastore {self.ds.dir} holds "
                             f"[N, {self.ds.d}] keys; pass [B, {self.ds.d}]")
        dists, ids = self.backend.search(queries, self._k_search)  # [B, k] each
        if self.args.ignore_top:
            dists, ids = drop_own(dists, ids, own)
        if self.recompute and recompute is not False:
            dists = self.backend.distances(queries, ids)
        return dists, ids

    def distances(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact squared L2 from queries [B, d] to the rows ids [B, m] (-1: none) -> [B, m] float32 (inf for -1)."""
        return self.backend.distances(queries, ids)

    def distance_pairs(self, queries: torch.Tensor, qrows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact squared L2 of n (query, row) pairs: queries [B, d], qrows [n] and ids [n] int64 (rows >= 0) ->
        [n] float32. A backend with ``distance_pairs`` computes only those; otherwise each query's rows are padded
        into one :meth:`distances` call."""
        pairs = getattr(self.backend, "distance_pairs", None)
        if pairs is not None:
            return pairs(queries, qrows, ids)
        qrows, ids = qrows.cpu().long(), ids.cpu().long()
        order = torch.argsort(qrows, stable=True)  # [n]
        counts = torch.bincount(qrows, minlength=queries.shape[0])  # [B]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[qrows[order]]
        padded = torch.full((queries.shape[0], max(int(counts.max()) if len(ids) else 0, 1)), -1, dtype=torch.long)
        padded[qrows, rank] = ids
        return self.backend.distances(queries, padded).cpu()[qrows, rank]

    def values(self, ids: torch.Tensor) -> torch.Tensor:
        """The next tokens stored at rows ids [...] (any value where id is -1: its distance is inf)."""
        if ids.device not in self._vals_on:
            self._vals_on[ids.device] = self.vals.to(ids.device)
        return self._vals_on[ids.device][ids.clamp_min(0)]

    def search(self, queries: torch.Tensor, own: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, d] -> (squared L2 distances float32 [B, k], values int64 [B, k]), nearest first (``own``: as
        :meth:`search_ids`)."""
        dists, ids = self.search_ids(queries, own=own)
        return dists, self.values(ids)

    def log_probs(self, queries: torch.Tensor, vocab_size: int) -> torch.Tensor:
        dists, vals = self.search(queries)
        return knn_log_probs(dists, vals, vocab_size, self.args.knn_temp)

    def gold_log_prob(self, queries: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        dists, vals = self.search(queries)
        return knn_gold_log_prob(dists, vals, gold.to(dists.device), self.args.knn_temp)

    def close(self) -> None:
        """Releases the backend (a Ray backend's actors, a GPU's keys)."""
        self.backend.close()
