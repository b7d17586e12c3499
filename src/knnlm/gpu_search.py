"""Nearest-neighbour search with torch on the device(s) holding the keys: the ``torch`` search backend.

For GPUs without GPU FAISS (FAISS's CUDA 12 wheel cannot run on a CUDA 13 machine). :class:`TorchSearch` holds the
store's float16 keys on the device(s), so the distances it returns are exact for the stored keys, and finds neighbours
in two steps:

1. **Candidates** from one half-precision GEMM per key chunk whose result is ‖q − k‖² itself (scaled by a power of
   two; :class:`KeyShard` says how the norms ride along as extra columns), accumulated in float32 and rounded once
   to half precision. A two-stage top-k keeps ``k + margin`` candidates per chunk, then across chunks.
   ``--search_dtype`` picks the GEMM's precision: ``float16`` (the stored keys as they are), ``bfloat16`` (keys cast
   chunk by chunk: fewer mantissa bits, a larger margin needed) or ``float32`` (no tensor cores: ~15x the GEMM time).
2. **Exact re-ranking**: the candidates' distances as float32 sums of squared differences
   (:func:`knnlm.distances.exact_sq_dists`: no cancellation), and the k nearest of those, ties broken by row id.

Rounding moves a key's score by about 2⁻¹¹ of its distance (float16); the margin (``--search_margin``) keeps the true
k nearest among the candidates although their approximate ranks shift (docs/scaling.md gives the measured recall).

Large stores: ``--search_nlist L`` adds an IVF that cuts the work per query (L centroids from FAISS k-means on the
CPU; each list's keys contiguous on the device): a query batch is searched over the union of the lists its queries
probe (``--nprobe`` each), every query masked to its own lists, which is FAISS's IVF-Flat with the same centroids.
Stores larger than one GPU: the rows are split across all visible GPUs (contiguous ranges, one :class:`KeyShard`
each) and the shards' exact top-k are merged.

Tensors in, tensors out: queries from any device, results on the first device. On a GPU the search runs on its own
CUDA stream, so it overlaps the LM's forward pass of the next batch (``scoring.score_windows``)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .distances import exact_sq_dists
from .errors import KnnlmError
from .models import DTYPES

log = logging.getLogger(__name__)

# --search_dtype and --search_margin of KNNArgs: the candidates' GEMM precision, the candidates kept beyond k
SEARCH_DTYPE, SEARCH_MARGIN = "float16", 64
_SCORE_LIMIT = 2.0 ** 13  # norms² / scale stay below this: sums of four such terms fit float16 (max 65504)
_REFINE_FLOATS = 1 << 26  # gathered key floats per exact-distance step on a GPU (256 MiB as float32)
_EXTRA = 4  # columns appended to each key: (‖k‖² − 2 μ·k) / s as a high and a low half, then 1, 1


def torch_gpu_available() -> bool:
    return torch.cuda.is_available()


def _refine_floats(device: torch.device) -> Optional[int]:
    """Gathered floats per exact-distance step: larger steps on a GPU (fewer kernel launches)."""
    return _REFINE_FLOATS if device.type == "cuda" else None


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (float32) as hi + lo in ``dtype``: twice the mantissa bits of one ``dtype`` number."""
    hi = x.to(dtype)
    return hi, (x - hi.float()).to(dtype)


def _scale_for(largest: float) -> float:
    """The power of two s with largest / s <= _SCORE_LIMIT (exact in every float format)."""
    return 2.0 ** math.ceil(math.log2(max(largest, 1e-30) / _SCORE_LIMIT))


class KeyShard:
    """Rows [offset, offset + n) of the store on one device, with an IVF ordered by list (``row_ids``: the store row
    of each device row; ``list_bounds`` [L + 1]).

    ``aug`` [n, d'] float16 holds the stored keys (``keys`` = its first d columns: the exact values) followed by
    (‖k‖² − 2 μ·k) / s split into a high and a low float16 and two ones (d' = d + 4 rounded up to 8 for the tensor
    cores). Against a query row [−2 (q − μ) / s, 1, 1, ‖q‖² / s as high + low] one GEMM then gives ‖q − k‖² / s
    itself, accumulated in float32: no large ‖q‖² cancels out of a half-precision result, so the scores are as
    precise as float16 allows near the distances that decide the top-k (μ: the mean key; it makes the rounding of
    the query's half-precision copy small)."""

    def __init__(self, keys, offset: int, device: torch.device, assign: Optional[np.ndarray] = None,
                 nlist: int = 0, load_chunk: int = 262_144):
        n, d = keys.shape
        self.offset, self.n, self.d, self.device = int(offset), int(n), int(d), device
        order = self.row_ids = self.pos_of_row = self.list_of_row = self.list_bounds = None
        if assign is not None:  # rows sorted by IVF list, stable: each list's rows in store order
            order = np.argsort(assign, kind="stable")
            counts = np.bincount(assign, minlength=nlist)
            self.list_of_row = torch.from_numpy(assign[order].astype(np.int64)).to(device)  # [n]
            self.row_ids = torch.from_numpy(order.astype(np.int64) + self.offset).to(device)  # [n]
            self.pos_of_row = torch.empty(n, dtype=torch.int64, device=device)  # [n] store row - offset -> device row
            self.pos_of_row[torch.from_numpy(order).to(device)] = torch.arange(n, device=device)
            self.list_bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [L + 1] on the host
        width = -(-(d + _EXTRA) // 8) * 8
        self.aug = torch.zeros(n, width, dtype=torch.float16, device=device)  # [n, d']
        self.keys = self.aug[:, :d]  # [n, d] the stored values (a view)
        self.key_sum = torch.zeros(d, dtype=torch.float64, device=device)  # [d], for the mean key
        for s in range(0, n, load_chunk):  # a memmap slice at a time: no full host copy
            rows = slice(s, s + load_chunk) if order is None else order[s: s + load_chunk]
            block = torch.from_numpy(np.array(keys[rows], dtype=np.float16)).to(device)
            self.keys[s: s + len(block)] = block
            self.key_sum += block.double().sum(dim=0)
        self.aug[:, d + 2: d + 4] = 1.0
        self.bias = torch.empty(n, dtype=torch.float32, device=device)  # [n] ‖k‖² − 2 μ·k
        self.scale = 0.0  # s of the bias columns (set by centre)

    def centre(self, mean: torch.Tensor, load_chunk: int = 262_144) -> None:
        """Sets the bias columns for the mean key ``mean`` [d] float32."""
        mean = mean.to(self.device)
        largest = 0.0
        for s in range(0, self.n, load_chunk):
            k = self.keys[s: s + load_chunk].float()  # [c, d]
            sq = k.square().sum(dim=1)
            self.bias[s: s + load_chunk] = sq - 2.0 * (k * mean).sum(dim=1)  # no matmul: TF32 would round it
            largest = max(largest, float(sq.max()), float(self.bias[s: s + load_chunk].abs().max()))
        self.rescale(_scale_for(largest))

    def rescale(self, scale: float) -> None:
        """Writes bias / ``scale`` into the float16 bias columns."""
        self.scale = scale
        for s in range(0, self.n, 1 << 20):
            hi, lo = _split(self.bias[s: s + (1 << 20)] / scale, torch.float16)
            self.aug[s: s + len(hi), self.d], self.aug[s: s + len(hi), self.d + 1] = hi, lo

    def fit(self, q: torch.Tensor) -> None:
        """Grows the scale when queries q [B, d] lie farther out than the keys (one wait for the device per call)."""
        needed = _scale_for(float(q.square().sum(dim=1).max()))
        if needed > self.scale:
            self.rescale(needed)

    def chunk(self, idx, dtype: torch.dtype) -> torch.Tensor:
        """The augmented keys of rows ``idx`` [n_c, d'] in the GEMM dtype (bias columns re-split in that dtype)."""
        keys = self.aug[idx]
        if dtype == torch.float16:
            return keys
        keys = keys.to(dtype)
        keys[:, self.d], keys[:, self.d + 1] = _split(self.bias[idx] / self.scale, dtype)
        return keys

    def store_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Device rows [...] -> store rows (global ids)."""
        return rows + self.offset if self.row_ids is None else self.row_ids[rows]

    def device_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Store rows [...] inside this shard -> device rows."""
        local = ids - self.offset
        return local if self.pos_of_row is None else self.pos_of_row[local]


class TorchSearch:
    """The ``torch`` :class:`knnlm.search.SearchBackend` over keys [N, d] (a float16 memmap or array).

    ``devices``: where the rows go (split in contiguous ranges; the same device may repeat, which the tests use to
    stand in for several GPUs). ``dtype``: the candidate GEMM's (a :data:`knnlm.models.DTYPES` name); ``margin``:
    extra candidates kept beyond k (both default to :class:`knnlm.knn.KNNArgs`'). ``centroids`` [L, d]: IVF
    centroids (``nprobe`` lists per query); None searches every key. ``query_batch`` queries and ``key_chunk`` keys
    per GEMM: their [query_batch, key_chunk] scores are the largest temporary (2 GiB at the defaults in float16)."""

    name = "torch"
    exact_distances = True  # distances are sums of squared differences of the stored keys: nothing to recompute

    def __init__(self, keys, devices: Sequence[str | torch.device] = ("cpu",), dtype: Optional[str] = None,
                 margin: Optional[int] = None, centroids: Optional[np.ndarray] = None, nprobe: int = 32,
                 query_batch: int = 2048, key_chunk: int = 1 << 19, load_chunk: int = 262_144):
        dtype = SEARCH_DTYPE if dtype is None else dtype
        margin = SEARCH_MARGIN if margin is None else margin
        if dtype not in DTYPES:
            raise KnnlmError(f"--search_dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        n, d = keys.shape
        self.ntotal, self.d = int(n), int(d)
        self.dtype, self.margin, self.nprobe = DTYPES[dtype], int(margin), int(nprobe)
        self.query_batch, self.key_chunk = int(query_batch), int(key_chunk)
        devices = [torch.device(x) for x in devices]
        self.device = devices[0]
        self.centroids = assign = None
        if centroids is not None:
            centroids = np.ascontiguousarray(centroids, dtype=np.float32)  # [L, d]
            assign = assign_lists(keys, centroids)  # [N] list of each row, as FAISS's quantizer assigns it
            self.centroids = torch.from_numpy(centroids)
            self.nprobe = min(self.nprobe, len(centroids))
        bounds = np.linspace(0, n, len(devices) + 1).round().astype(np.int64)
        _check_fits(devices, int(np.diff(bounds).max()), d, work=2 * self.query_batch * min(self.key_chunk, n) * 2)
        self.shards = [KeyShard(keys[bounds[i]: bounds[i + 1]], int(bounds[i]), dev,
                                None if assign is None else assign[bounds[i]: bounds[i + 1]],
                                0 if centroids is None else len(centroids), load_chunk)
                       for i, dev in enumerate(devices)]
        self.mean = (sum(sh.key_sum.cpu() for sh in self.shards) / max(n, 1)).float()  # [d] the mean key
        for shard in self.shards:
            shard.centre(self.mean, load_chunk)
        self._mean_on: dict = {}
        self._centroids_on: dict = {}
        self._streams = {dev: torch.cuda.Stream(dev) for dev in set(devices) if dev.type == "cuda"}
        log.info("search with torch on %s: %d keys of width %d in float16 (%.0f MiB), %s candidates + %d, %s",
                 ", ".join(map(str, devices)), n, d, n * d * 2 / 2**20, dtype, self.margin,
                 f"IVF {len(centroids)} lists, nprobe {self.nprobe}" if centroids is not None else "every key")

    # ------------------------------------------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, d] -> (dists [B, k] float32 exact squared L2, ids [B, k] int64) on ``self.device``, nearest
        first (ties by id); rows that could not be filled carry inf / -1."""
        found = []
        for shard in self.shards:  # each shard's kernels are queued before any result is waited for
            with self._on_stream(shard.device):
                found.append(self._search_shard(shard, queries, k))
        for shard in self.shards:  # results computed on other devices are complete before they are copied
            if shard.device != self.device and shard.device in self._streams:
                self._streams[shard.device].synchronize()
        with self._on_stream(self.device):
            dists = torch.cat([f[0].to(self.device) for f in found], dim=1)  # [B, S * k]
            ids = torch.cat([f[1].to(self.device) for f in found], dim=1)
            dists, ids = nearest(dists, ids, k)
        return self._handed_over(dists), self._handed_over(ids)

    def _search_shard(self, shard: KeyShard, queries: torch.Tensor, k: int):
        q = queries.detach().to(shard.device, torch.float32)  # [B, d]
        out_d = torch.full((len(q), k), math.inf, dtype=torch.float32, device=shard.device)  # [B, k]
        out_i = torch.full((len(q), k), -1, dtype=torch.int64, device=shard.device)
        if shard.n == 0 or len(q) == 0:
            return out_d, out_i
        shard.fit(q)
        probe = self._probe(q, shard.device) if self.centroids is not None else None  # [B, nprobe]
        order = probe[:, 0].argsort() if probe is not None else None  # queries of one list searched together
        for s in range(0, len(q), self.query_batch):
            sel = order[s: s + self.query_batch] if order is not None else slice(s, s + self.query_batch)
            qb = q[sel]  # [b, d]
            rows = allowed = None
            if probe is not None:
                rows, allowed = self._probed_rows(shard, probe[sel])
            n = shard.n if rows is None else len(rows)
            cand, score = self._candidates(shard, qb, min(k + self.margin, n), rows, allowed)  # [b, c] each
            if cand.shape[1] == 0:  # no key in the probed lists
                continue
            dist, ids = self._exact(shard, qb, cand)  # [b, c] each
            d_b, i_b = nearest(dist, ids, k)  # [b, k] each
            if cand.shape[1] < n:  # some keys were not candidates: equal keys may have been split at the edge
                edge = score.masked_fill(cand < 0, -math.inf).amax(1)  # [b] the candidates' last score
                tied = _tie_at_the_edge(cand, score, edge, dist, d_b[:, k - 1])  # [b]
                if bool(tied.any()):  # (rare: a sync only to decide whether to search those queries again)
                    t = tied.nonzero()[:, 0]
                    sub = None if allowed is None else allowed[t]
                    within = int(self._count_within(shard, qb[t], edge[t], rows, sub).max())
                    more = self._candidates(shard, qb[t], max(within, cand.shape[1]), rows, sub)[0]  # never fewer
                    d_b[t], i_b[t] = nearest(*self._exact(shard, qb[t], more), k)
            out_d[sel], out_i[sel] = d_b, i_b
        return out_d, out_i

    def _exact(self, shard: KeyShard, q: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate device rows cand [b, c] (-1: none) -> their exact distances [b, c] (inf for -1), store ids."""
        dist = exact_sq_dists(shard.keys, q, cand.clamp_min(0), max_floats=_refine_floats(shard.device))
        dist = dist.masked_fill_(cand < 0, math.inf)  # [b, c]
        return dist, shard.store_rows(cand.clamp_min(0)).masked_fill_(cand < 0, -1)

    def _count_within(self, shard: KeyShard, q: torch.Tensor, edge: torch.Tensor, rows: Optional[torch.Tensor],
                      allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """Per query [b], how many keys it may take score at most ``edge`` [b] (the candidates' last score in the first
        pass), with a band of rounding above it. This GEMM has another shape than the first pass's (fewer queries), and
        a GEMM may sum another way for another shape: a score near 0 is a difference of terms of about ‖q − μ‖² / s
        (the query on its own equal keys), so the band scales with that, not with the score (a band relative to the
        score counted no key at all there and the query got no neighbour)."""
        qa = self._augmented_queries(shard, q)
        centred = (q - self._mean_on[shard.device]).square().sum(dim=1) / shard.scale  # [b] ‖q − μ‖² / s
        edge = edge.float()
        edge = edge + edge.abs() * 2.0 ** -8 + centred * 2.0 ** -12
        count = torch.zeros(len(q), dtype=torch.int64, device=q.device)
        for _, score in self._chunk_scores(shard, qa, rows, allowed):
            count += (score.float() <= edge[:, None]).sum(1)
        return count

    def _chunk_scores(self, shard: KeyShard, qa: torch.Tensor, rows: Optional[torch.Tensor],
                      allowed: Optional[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """(first position c, scores [b, n_c] ‖q − k‖² / s in the GEMM dtype) per key chunk of the shard's rows (or of
        ``rows``), inf where ``allowed`` [b, m] says a query may not take the key."""
        n = shard.n if rows is None else len(rows)
        for c in range(0, n, self.key_chunk):
            idx = slice(c, c + self.key_chunk) if rows is None else rows[c: c + self.key_chunk]
            score = qa @ shard.chunk(idx, self.dtype).T  # [b, n_c]
            if allowed is not None:
                score.masked_fill_(~allowed[:, c: c + self.key_chunk], math.inf)
            yield c, score

    def _candidates(self, shard: KeyShard, q: torch.Tensor, kc: int, rows: Optional[torch.Tensor] = None,
                    allowed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Device rows [b, c] of the kc best scores (-1 where fewer keys are searchable) and those scores [b, c]: per
        key chunk, then across chunks. ``rows`` [m]: search only these device rows; ``allowed`` [b, m] bool: which of
        them each query may take (the IVF lists it probes)."""
        n = shard.n if rows is None else len(rows)
        kc = min(kc, n)
        if kc == 0:
            none = torch.empty(len(q), 0, dtype=torch.int64, device=q.device)
            return none, none.to(self.dtype)
        qa = self._augmented_queries(shard, q)  # [b, d'] in the GEMM dtype
        best_s, best_r = [], []
        for c, score in self._chunk_scores(shard, qa, rows, allowed):  # [b, n_c] each
            s, r = torch.topk(score, min(kc, score.shape[1]), dim=1, largest=False, sorted=False)
            best_s.append(s)
            best_r.append(r + c)
        s, r = torch.cat(best_s, dim=1), torch.cat(best_r, dim=1)  # [b, chunks * kc]
        if s.shape[1] > kc:
            s, pick = torch.topk(s, kc, dim=1, largest=False, sorted=False)
            r = torch.gather(r, 1, pick)
        if rows is not None:
            r = rows[r]
        return r.masked_fill_(torch.isinf(s), -1), s  # a masked key is no candidate

    def _augmented_queries(self, shard: KeyShard, q: torch.Tensor) -> torch.Tensor:
        """q [b, d] float32 -> [b, d'] in the GEMM dtype: [−2 (q − μ) / s, 1, 1, ‖q‖² / s as high + low, 0...]."""
        if shard.device not in self._mean_on:
            self._mean_on[shard.device] = self.mean.to(shard.device)
        out = torch.zeros(len(q), shard.aug.shape[1], dtype=self.dtype, device=q.device)  # [b, d']
        out[:, : self.d] = (q - self._mean_on[shard.device]) * (-2.0 / shard.scale)
        out[:, self.d: self.d + 2] = 1.0
        out[:, self.d + 2], out[:, self.d + 3] = _split(q.square().sum(dim=1) / shard.scale, self.dtype)
        return out

    @torch.no_grad()
    def ranked_candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """The first stage alone, for measuring recall by margin: the store rows [B, count] of the best
        half-precision scores, best first (one device, no IVF)."""
        if len(self.shards) != 1 or self.centroids is not None:
            raise KnnlmError("ranked_candidates: one device and no IVF only (a measurement helper)")
        shard = self.shards[0]
        q = queries.detach().to(shard.device, torch.float32)  # [B, d]
        shard.fit(q)
        score = self._augmented_queries(shard, q) @ shard.chunk(slice(None), self.dtype).T  # [B, N]
        return shard.store_rows(torch.topk(score.float(), min(count, shard.n), dim=1, largest=False).indices)

    # ------------------------------------------------------------------------------------------------ IVF
    def _probe(self, q: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The nprobe nearest centroids of each query [B, nprobe] (float32 ‖c‖² − 2 q·c, as FAISS's quantizer)."""
        if device not in self._centroids_on:
            c = self.centroids.to(device)
            self._centroids_on[device] = (c, c.square().sum(dim=1))
        c, c_norms = self._centroids_on[device]
        score = torch.addmm(c_norms, q, c.T, beta=1.0, alpha=-2.0)  # [B, L]
        return torch.topk(score, self.nprobe, dim=1, largest=False).indices

    def _probed_rows(self, shard: KeyShard, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device rows of every list some query of the batch probes [m] (lists are contiguous) and which of them
        each query probes [b, m] bool."""
        lists = torch.unique(probe).cpu().numpy()  # the batch's lists, ascending
        starts, ends = shard.list_bounds[lists], shard.list_bounds[lists + 1]
        keep = ends > starts
        starts, ends, lists = starts[keep], ends[keep], lists[keep]
        if len(lists) == 0:
            none = torch.empty(0, dtype=torch.int64, device=shard.device)
            return none, probe.new_zeros(len(probe), 0, dtype=torch.bool)
        lengths = torch.from_numpy(ends - starts)
        first = torch.repeat_interleave(torch.from_numpy(starts) - torch.cumsum(lengths, 0) + lengths, lengths)
        rows = (first + torch.arange(int(lengths.sum()))).to(shard.device)  # [m] device rows, list by list
        probed = torch.zeros(len(probe), int(shard.list_bounds.shape[0]) - 1, dtype=torch.bool, device=shard.device)
        probed.scatter_(1, probe, True)  # [b, L]
        return rows, probed[:, shard.list_of_row[rows]]  # [m], [b, m]

    # ------------------------------------------------------------------------------------------------ exact distances
    @torch.no_grad()
    def distances(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact squared L2 from queries [B, d] to store rows ids [B, m] (-1: none) -> [B, m] float32 on
        ``self.device`` (inf for -1)."""
        out = torch.full(ids.shape, math.inf, dtype=torch.float32, device=self.device)  # [B, m]
        for shard in self.shards:
            if shard.n == 0:  # (fewer rows than devices: an empty shard owns no id, and has no key to gather)
                continue
            with self._on_stream(shard.device):
                ids_s = ids.to(shard.device)
                inside = (ids_s >= shard.offset) & (ids_s < shard.offset + shard.n)
                rows = shard.device_rows(torch.where(inside, ids_s, shard.offset))
                dist = exact_sq_dists(shard.keys, queries.detach().to(shard.device, torch.float32), rows)
                dist = dist.masked_fill_(~inside, math.inf).to(self.device)
            with self._on_stream(self.device):
                out = torch.minimum(out, dist)  # each id lies in exactly one shard; inf elsewhere
        return self._handed_over(out)

    # ------------------------------------------------------------------------------------------------ streams
    @contextlib.contextmanager
    def _on_stream(self, device: torch.device):
        """On a GPU, the search's own stream (after what the caller's stream has queued: the queries), so it overlaps
        the caller's next kernels; elsewhere nothing."""
        stream = self._streams.get(device)
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield

    def _handed_over(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` made safe to use on any stream of its device: the search stream finished, its memory not reused
        while the caller's stream may still read it."""
        stream = self._streams.get(t.device)
        if stream is not None:
            stream.synchronize()  # in the search thread: the caller's thread keeps queuing its forward pass
            t.record_stream(torch.cuda.current_stream(t.device))
        return t

    def close(self) -> None:
        self.shards, self._centroids_on, self._streams = [], {}, {}


def _check_fits(devices: Sequence[torch.device], rows: int, d: int, work: int) -> None:
    """A one-line error, not a CUDA out-of-memory crash, when a GPU's share of the keys (and ``work`` bytes: the
    scores of two key chunks) does not fit."""
    need = rows * (-(-(d + _EXTRA) // 8) * 8) * 2 + work
    for dev in dict.fromkeys(devices):
        if dev.type == "cuda":
            free = torch.cuda.mem_get_info(dev)[0]
            if need > free:
                raise KnnlmError(f"--search_backend torch: {rows:,} keys need {need / 2**30:.1f} GiB on {dev}, "
                                 f"{free / 2**30:.1f} GiB free; make more GPUs visible, or search a built IVF-PQ "
                                 "index with --search_backend faiss")


def _tie_at_the_edge(cand: torch.Tensor, score: torch.Tensor, edge: torch.Tensor, dist: torch.Tensor,
                     kth: torch.Tensor) -> torch.Tensor:
    """Per query [b] bool: whether keys equal to its k-th neighbour may have been left out of its candidates cand
    [b, c] (scores ``score``, the last of them ``edge`` [b], exact distances ``dist``, the k-th exact distance ``kth``
    [b]): several candidates are at the k-th distance (equal keys: distinct keys' float32 sums do not meet exactly)
    and one of them has the candidates' last score. Equal keys have one score, and a top-k of scores takes any of
    those tied at its edge: with more equal keys than the margin holds, which of them were kept depended on the
    chunking and the shards, not on their ids as everywhere else (FAISS's order)."""
    at_kth = (cand >= 0) & (dist == kth[:, None])  # [b, c]
    return (at_kth & (score == edge[:, None])).any(1) & (at_kth.sum(1) >= 2) & torch.isfinite(kth)


def nearest(dists: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of dists [b, c] with their ids, nearest first, ties by id (so every chunking and shard split
    returns the same rows); padded with inf / -1 when c < k."""
    ids, by_id = torch.sort(ids, dim=1)
    dists = torch.gather(dists, 1, by_id)
    dists, order = torch.sort(dists, dim=1, stable=True)
    ids = torch.gather(ids, 1, order)
    if dists.shape[1] < k:
        pad = k - dists.shape[1]
        dists = torch.nn.functional.pad(dists, (0, pad), value=math.inf)
        ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
    dists, ids = dists[:, :k].contiguous(), ids[:, :k].contiguous()
    return dists, ids.masked_fill_(torch.isinf(dists), -1)


def assign_lists(keys, centroids: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """The IVF list of each key [N] int64: its nearest centroid by FAISS's quantizer (``IndexFlatL2``), on the CPU,
    so lists hold exactly the rows FAISS's IVF-Flat with these centroids holds."""
    import faiss

    quantizer = faiss.IndexFlatL2(centroids.shape[1])
    quantizer.add(centroids)
    out = np.empty(len(keys), dtype=np.int64)
    for s in range(0, len(keys), chunk):
        out[s: s + chunk] = quantizer.search(np.ascontiguousarray(keys[s: s + chunk], dtype=np.float32), 1)[1][:, 0]
    return out


def train_centroids(keys, nlist: int, seed: int = 0, points_per_list: int = 256) -> np.ndarray:
    """``nlist`` IVF centroids [L, d] from FAISS k-means on the CPU over a seeded sample of the keys."""
    import faiss

    n, d = keys.shape
    if nlist > n:
        raise KnnlmError(f"--search_nlist: {nlist} lists for {n} keys; use at most {n} (a few hundred keys a list)")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, nlist * points_per_list), replace=False))
    sample = np.ascontiguousarray(keys[rows], dtype=np.float32)
    t0 = time.perf_counter()
    km = faiss.Kmeans(d, nlist, niter=20, seed=seed, max_points_per_centroid=points_per_list)
    km.train(sample)
    log.info("IVF for torch search: %d centroids from k-means on %d keys in %.1f s", nlist, len(rows),
             time.perf_counter() - t0)
    return km.centroids


def search_devices(use_gpu: Optional[bool]) -> list[torch.device]:
    """Every visible GPU (unless ``use_gpu`` is False), else the CPU."""
    if use_gpu is not False and torch_gpu_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if use_gpu:
        raise KnnlmError("use_gpu: torch sees no GPU; drop it to search on the CPU")
    return [torch.device("cpu")]


def torch_backend(datastore, args, use_gpu=None) -> TorchSearch:
    """``--search_backend torch``: the store's keys on every visible GPU (the CPU when torch sees none), searched as
    ``--search_dtype``, ``--search_margin``, ``--search_nlist`` / ``--nprobe`` say."""
    centroids = train_centroids(datastore.keys, args.search_nlist) if args.search_nlist else None
    return TorchSearch(datastore.keys, devices=search_devices(use_gpu), dtype=args.search_dtype,
                       margin=args.search_margin, centroids=centroids, nprobe=args.nprobe)
