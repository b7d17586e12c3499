"""Exact squared-L2 distances between queries and given datastore rows, and the keys they are read from.

Its own module because every search backend (FAISS in-process, torch on a device, Ray shard actors) and the RetoMaton
pointers compute exact distances the same way; it imports nothing else of knnlm, so no backend imports another.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

_RECOMPUTE_FLOATS = 1 << 22  # 16 MB of float32 keys per chunk of queries (a whole batch is B x k x d floats)
KEYS_IN_RAM_FRACTION = 0.5  # hold the keys in RAM for --recompute_dists when they take at most this share of free RAM


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def resident_keys(datastore) -> torch.Tensor:
    """The store's keys [N, d] for exact distances (:func:`resident_rows` of all of keys.f16)."""
    return resident_rows(datastore.dir / "keys.f16", datastore.d, 0, datastore.N)


def resident_rows(path, d: int, start: int, n: int) -> torch.Tensor:
    """Rows [start, start + n) of a float16 key file [*, d] (a store's keys.f16, or a shard's slice of it) for exact
    distances: widened to float32 in RAM when that copy fits in ``KEYS_IN_RAM_FRACTION`` of the available memory
    (random row reads never wait for the disk, and :func:`exact_sq_dists` reads them in place), else a copy-on-write
    float16 memory map of those rows."""
    keys16 = np.memmap(path, dtype=np.float16, mode="c", offset=start * d * 2, shape=(n, d))  # writable for torch
    if n * d * 4 <= KEYS_IN_RAM_FRACTION * _available_ram():
        log.info("holding the %d datastore keys in RAM as float32 for exact distances (%.0f MiB)", n, n * d * 4 / 2**20)
        keys = np.empty((n, d), dtype=np.float32)
        for s in range(0, n, 1 << 16):  # widen in slices: no second full-size float16 copy
            keys[s: s + (1 << 16)] = keys16[s: s + (1 << 16)]
        return torch.from_numpy(keys)
    log.info("exact distances read the %d datastore keys from disk (%.0f MiB as float32 do not fit in RAM)",
             n, n * d * 4 / 2**20)
    return torch.from_numpy(keys16)


def exact_sq_dists(keys: torch.Tensor, queries: torch.Tensor, ids: torch.Tensor,
                   max_floats: Optional[int] = None) -> torch.Tensor:
    """Squared L2 distances ‖keys[ids[b, j]] − queries[b]‖² as the sum of squared differences in float32 (no
    ‖q‖² + ‖k‖² − 2 q·k, whose cancellation loses the small distances that weigh most in p_knn).

    keys [N, d] (float32 in RAM, or float16; or on a GPU), queries [B, d] float32, ids [B, k] int64 -> [B, k] float32
    on the keys' device. Float32 keys in RAM: ``faiss.fvec_L2sqr_by_idx`` reads each row in place (one SIMD pass, no
    gathered copy). Otherwise a few queries at a time (``max_floats`` gathered floats), their rows are gathered into one
    reused buffer (and float16 rows widened into one reused float32 buffer)."""
    n_q, k = ids.shape
    d = keys.shape[1]
    if k == 0:  # no rows asked (the step of the gathering loop below would divide by zero)
        return torch.empty(n_q, 0, dtype=torch.float32, device=keys.device)
    if keys.dtype == torch.float32 and keys.is_contiguous() and keys.device.type == "cpu":
        import faiss

        out_np = np.empty((n_q, k), dtype=np.float32)
        q_np = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
        ids_np = np.ascontiguousarray(ids.numpy(), dtype=np.int64)
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(out_np), faiss.swig_ptr(q_np), faiss.swig_ptr(keys.numpy()),
                                faiss.swig_ptr(ids_np), d, n_q, k)
        return torch.from_numpy(out_np)
    dev = keys.device
    out = torch.empty(n_q, k, dtype=torch.float32, device=dev)  # [B, k]
    step = max(1, (max_floats or _RECOMPUTE_FLOATS) // (k * d))
    gathered = torch.empty(min(step, n_q) * k, d, dtype=keys.dtype, device=dev)  # [step * k, d]
    wide = gathered if keys.dtype == torch.float32 else torch.empty(min(step, n_q) * k, d, dtype=torch.float32, device=dev)
    for s in range(0, n_q, step):
        sel = ids[s: s + step].reshape(-1).to(dev)  # [b * k]
        b = sel.numel() // k
        torch.index_select(keys, 0, sel, out=gathered[: sel.numel()])
        diff = wide[: sel.numel()].view(b, k, d)  # [b, k, d] float32
        # widening and subtracting in one pass (float16 - float32 computes in float32: the same bits as widen, then
        # subtract); on a GPU each pass over [b, k, d] is most of the time of a re-ranking
        torch.sub(gathered[: sel.numel()].view(b, k, d), queries[s: s + b, None, :].to(dev, torch.float32), out=diff)
        torch.sum(diff.square_(), dim=-1, out=out[s: s + b])
    return out


def exact_sq_dists_pairs(keys: torch.Tensor, queries: torch.Tensor, qrows: torch.Tensor,
                         rows: torch.Tensor) -> torch.Tensor:
    """‖keys[rows[j]] − queries[qrows[j]]‖² for n (query, row) pairs, the same sums of squared differences as
    :func:`exact_sq_dists`: keys [N, d], queries [B, d] float32, qrows and rows [n] int64 -> [n] float32.
    Float32 keys in RAM: ``faiss.pairwise_indexed_L2sqr`` reads both rows in place (no gathered copy of queries);
    otherwise chunks of pairs go through :func:`exact_sq_dists`."""
    n, d = len(rows), keys.shape[1]
    if keys.dtype == torch.float32 and keys.is_contiguous() and keys.device.type == "cpu":
        import faiss

        out = np.empty(n, dtype=np.float32)
        q_np = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
        ix, iy = (np.ascontiguousarray(t.numpy(), dtype=np.int64) for t in (qrows, rows))
        faiss.pairwise_indexed_L2sqr(d, n, faiss.swig_ptr(q_np), faiss.swig_ptr(ix), faiss.swig_ptr(keys.numpy()),
                                     faiss.swig_ptr(iy), faiss.swig_ptr(out))
        return torch.from_numpy(out)
    out = torch.empty(n, dtype=torch.float32, device=keys.device)
    step = max(1, _RECOMPUTE_FLOATS // d)
    for s in range(0, n, step):
        out[s: s + step] = exact_sq_dists(keys, queries[qrows[s: s + step]], rows[s: s + step, None])[:, 0]
    return out
