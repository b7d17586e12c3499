"""Where a datastore's keys are searched: one interface, a backend per place.

A :class:`SearchBackend` answers two questions about the keys of one datastore (rows 0..N-1):

- ``search(queries [B, d], k) -> (dists [B, k] float32, ids [B, k] int64)``: the k nearest rows by squared L2,
  nearest first; rows it could not fill (IVF lists with fewer than k keys) carry ``id -1`` and ``dist inf``.
  ``exact_distances`` says whether those distances are exact sums of squared differences (else they are the
  index's own, e.g. PQ estimates, and :class:`knnlm.knn.Retriever` recomputes them with ``distances`` when asked).
- ``distances(queries [B, d], ids [B, m]) -> [B, m] float32``: exact squared L2 to the given rows (``inf`` where
  ``id < 0``). ``--recompute_dists`` and RetoMaton's pointer candidates use it.

Tensors in, tensors out, on ``backend.device`` (queries may come from any device; results live where the backend
computes them, so a GPU backend keeps them on the GPU). Backends, chosen by ``--search_backend``:

- ``faiss``: an in-process FAISS index (the store's built index, else an exact Flat one; GPU FAISS where it sees a GPU).
- ``torch``: the keys on the torch device(s) (:mod:`knnlm.gpu_search`: half-precision candidates, exact re-ranking),
  for GPUs without GPU FAISS; also runs on the CPU.
- ``ray``: the built index's shard files searched by Ray actors, on one machine or a cluster (:mod:`knnlm.ray_search`).
- ``auto`` (default): ``faiss``, except ``torch`` where torch sees a GPU, FAISS does not, and the store has no built
  index (the choice made before backends had names).

The built-in backends are listed in ``BACKENDS`` (their modules imported when one is made: this module imports them,
not the other way round); another backend registers with :func:`register_backend`. :func:`make_backend` is what the
Retriever calls.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Protocol

import numpy as np
import torch

from .distances import exact_sq_dists, exact_sq_dists_pairs, resident_keys
from .errors import KnnlmError

log = logging.getLogger(__name__)


class SearchBackend(Protocol):
    name: str
    ntotal: int  # rows searched (the datastore's N)
    device: torch.device  # where results are returned
    exact_distances: bool  # search() returns exact squared L2 (sums of squared differences)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def distances(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


def _as_f32_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())  # [B, d]


class IndexBackend:
    """Any object with FAISS's ``search(x: np.ndarray [B, d] float32, k) -> (D, I)`` (a FAISS index, shards, a GPU
    index) over the store's rows; exact distances of given rows from the store's keys, loaded on first use."""

    name = "faiss"
    device = torch.device("cpu")

    def __init__(self, index, datastore, exact_distances: bool | None = None):
        self.index, self.ds = index, datastore
        self.ntotal = int(datastore.N)
        self.exact_distances = bool(getattr(index, "exact_distances", False) if exact_distances is None
                                    else exact_distances)
        self._keys = None  # [N, d], resident_keys(): float32 in RAM or a float16 memmap

    @property
    def keys(self) -> torch.Tensor:
        return self.load_keys()

    def load_keys(self) -> torch.Tensor:
        """The keys for exact distances, read on the first call (:func:`knnlm.distances.resident_keys`)."""
        if self._keys is None:
            self._keys = resident_keys(self.ds)
        return self._keys

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        dists, ids = self.index.search(_as_f32_numpy(queries), k)  # [B, k] each
        dists = torch.from_numpy(np.ascontiguousarray(dists, dtype=np.float32))
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        return dists.masked_fill_(ids < 0, math.inf), ids

    def distances(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.cpu().long()
        missing = ids < 0
        out = exact_sq_dists(self.keys, torch.from_numpy(_as_f32_numpy(queries)), ids.masked_fill(missing, 0))
        return out.masked_fill_(missing, math.inf)  # [B, m]

    def distance_pairs(self, queries: torch.Tensor, qrows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact squared L2 of n (query, row) pairs: queries [B, d], qrows and ids [n] int64 (rows >= 0) -> [n]."""
        return exact_sq_dists_pairs(self.keys, torch.from_numpy(_as_f32_numpy(queries)), qrows.cpu().long(),
                                    ids.cpu().long())

    def close(self) -> None:
        self.index = self._keys = None


def _as_backend(index, datastore) -> SearchBackend:
    """A FAISS index (or one already a backend: it has ``distances``) as the store's backend."""
    return index if hasattr(index, "distances") else IndexBackend(index, datastore)


def _faiss_backend(datastore, args, index=None, use_gpu=None) -> SearchBackend:
    from .index import flat_index, load_index

    if index is None:
        index = load_index(datastore.dir, nprobe=args.nprobe, use_gpu=use_gpu)
    if index is None:
        index = flat_index(datastore, use_gpu=use_gpu)
    return _as_backend(index, datastore)


def _auto_backend(datastore, args, index=None, use_gpu=None) -> SearchBackend:
    from .index import gpu_available, load_index

    if index is None:
        index = load_index(datastore.dir, nprobe=args.nprobe, use_gpu=use_gpu)
    if index is None and use_gpu is not False and torch.cuda.is_available() and not gpu_available():
        return BACKENDS["torch"](datastore, args, use_gpu=use_gpu)  # a GPU that only torch sees
    return _faiss_backend(datastore, args, index=index, use_gpu=use_gpu)


def _torch_backend(datastore, args, index=None, use_gpu=None) -> SearchBackend:
    """``--search_backend torch`` (:func:`knnlm.gpu_search.torch_backend`); a given FAISS ``index`` is searched as it
    is instead."""
    if index is not None:
        return _as_backend(index, datastore)
    from .gpu_search import torch_backend

    return torch_backend(datastore, args, use_gpu=use_gpu)


def _ray_backend(datastore, args, index=None, use_gpu=None) -> SearchBackend:
    from .ray_search import ray_backend  # Ray itself is imported when a backend starts

    return ray_backend(datastore, args, index=index, use_gpu=use_gpu)


BACKENDS: dict[str, Callable[..., SearchBackend]] = {"auto": _auto_backend, "faiss": _faiss_backend,
                                                     "torch": _torch_backend, "ray": _ray_backend}


def register_backend(name: str, factory: Callable[..., SearchBackend]) -> None:
    """``factory(datastore, args: KNNArgs, index=None, use_gpu=None) -> SearchBackend``."""
    BACKENDS[name] = factory


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def make_backend(datastore, args, index=None, use_gpu: bool | None = None) -> SearchBackend:
    """The backend ``args.search_backend`` names, over ``datastore``; ``index``: a prebuilt index or backend to use."""
    name = getattr(args, "search_backend", "auto")
    if name not in BACKENDS:
        raise KnnlmError(f"--search_backend: unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    return BACKENDS[name](datastore, args, index=index, use_gpu=use_gpu)
