"""Exact nearest-neighbour search with torch on a GPU, for machines whose FAISS has no GPU support.

FAISS's GPU build on PyPI (``faiss-gpu-cu12``) needs CUDA 12's runtime libraries; a machine without them (or only
``faiss-cpu`` installed) would otherwise search on the CPU. :class:`TorchFlatIndex` is the exact (Flat) search of
``faiss.IndexFlatL2`` written in torch: the keys live on the device in float32, candidates come from one GEMM per key
chunk (‖k‖² − 2 q·k, as FAISS ranks them), and the k distances it returns are recomputed as sums of squared
differences (no cancellation), so they equal what ``--recompute_dists`` gives. It answers ``search(x, k)`` like a
FAISS index, so :class:`knnlm.knn.Retriever` uses it unchanged. It also runs on the CPU (tests compare it with FAISS).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .distances import exact_sq_dists
from .search import IndexBackend, register_backend

log = logging.getLogger(__name__)


def torch_gpu_available() -> bool:
    return torch.cuda.is_available()


class TorchFlatIndex:
    """Exact squared-L2 search over keys [N, d] held on ``device`` in float32; ``search`` returns (D, I) as numpy,
    nearest first, like ``faiss.IndexFlatL2.search``."""

    exact_distances = True  # the distances it returns are sums of squared differences: --recompute_dists adds nothing

    def __init__(self, keys, device: str | torch.device = "cuda", load_chunk: int = 262_144,
                 query_batch: int = 1024, key_chunk: int = 1 << 20, refine_batch: int = 64):
        n, d = keys.shape
        self.d, self.ntotal, self.device = int(d), int(n), torch.device(device)
        self.query_batch, self.key_chunk, self.refine_batch = query_batch, key_chunk, refine_batch
        self.keys = torch.empty(n, d, dtype=torch.float32, device=self.device)  # [N, d]
        self.sq_norms = torch.empty(n, dtype=torch.float32, device=self.device)  # [N]
        for s in range(0, n, load_chunk):  # keys may be a float16 memmap: widen slice by slice, no full host copy
            block = torch.from_numpy(np.ascontiguousarray(keys[s: s + load_chunk], dtype=np.float32)).to(self.device)
            self.keys[s: s + len(block)] = block
            self.sq_norms[s: s + len(block)] = block.square().sum(dim=1)  # per slice: no [N, d] temporary
        log.info("exact search with torch on %s: %d keys of width %d (%.0f MiB float32)",
                 self.device, n, d, n * d * 4 / 2**20)

    @torch.no_grad()
    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x [B, d] float32 -> (D [B, k] float32 squared L2, I [B, k] int64); rows beyond N are padded with inf / -1."""
        q_all = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)  # [B, d]
        kk = min(k, self.ntotal)
        out_d = np.full((len(x), k), np.inf, dtype=np.float32)
        out_i = np.full((len(x), k), -1, dtype=np.int64)
        for s in range(0, len(x), self.query_batch):
            q = q_all[s: s + self.query_batch]  # [b, d]
            best_s = best_i = None  # the running top kk by GEMM score, [b, kk]
            for c in range(0, self.ntotal, self.key_chunk):
                keys = self.keys[c: c + self.key_chunk]  # [n_c, d]
                # [b, n_c]: ‖k‖² − 2 q·k ranks the keys like ‖q − k‖² (‖q‖² is the same for a whole row)
                score = torch.addmm(self.sq_norms[c: c + self.key_chunk], q, keys.T, beta=1.0, alpha=-2.0)
                cs, ci = torch.topk(score, min(kk, len(keys)), dim=1, largest=False, sorted=False)
                ci += c
                if best_s is not None:
                    cs, ci = torch.cat([best_s, cs], dim=1), torch.cat([best_i, ci], dim=1)
                    if cs.shape[1] > kk:
                        cs, pick = torch.topk(cs, kk, dim=1, largest=False, sorted=False)
                        ci = torch.gather(ci, 1, pick)
                best_s, best_i = cs, ci
            dist = self._exact(q, best_i)  # [b, kk]
            dist, order = torch.sort(dist, dim=1)
            ids = torch.gather(best_i, 1, order)
            out_d[s: s + len(q), :kk] = dist.cpu().numpy()
            out_i[s: s + len(q), :kk] = ids.cpu().numpy()
        return out_d, out_i

    def _exact(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """‖keys[ids[b, j]] − q[b]‖² summed in float32, ``refine_batch`` queries at a time: [b, kk] on the device."""
        return exact_sq_dists(self.keys, q, ids, max_floats=self.refine_batch * ids.shape[1] * self.d)


def _torch_backend(datastore, args, index=None, use_gpu=None):
    """``--search_backend torch``: exact search over the keys held on the GPU (the CPU when torch sees none)."""
    if index is not None:
        return IndexBackend(index, datastore)
    device = "cuda" if torch_gpu_available() and use_gpu is not False else "cpu"
    return IndexBackend(TorchFlatIndex(datastore.keys, device=device), datastore, exact_distances=True)


register_backend("torch", _torch_backend)
