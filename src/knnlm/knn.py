"""The kNN distribution over the vocabulary, its interpolation with the LM, and batched retrieval.

p_knn(w) ∝ Σ_{i: v_i = w} exp(-d_i / T) over the k retrieved neighbours, d_i the squared L2 distance.
p_knnlm = (1 - λ) p_lm + λ p_knn, computed in log space; λ is the weight of the kNN part, as in Khandelwal et al.
(2020) and knn-transformers. Chiang et al. print the formula with λ on the LM side (λ p_lm + (1 - λ) p_knn) but use
λ = 0.25 with the kNN-LM code of Xu et al., where 0.25 weighs p_knn; `--lmbda 0.25` here is that setting.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .errors import KnnlmError

log = logging.getLogger(__name__)


@dataclass
class KNNArgs:
    k: int = field(default=1024, metadata={"help": "Neighbours retrieved per position (clamped to the datastore size)."})
    lmbda: list[float] = field(default_factory=lambda: [0.25], metadata={"help": "Weight of p_knn in the interpolation; a comma list sweeps several from one retrieval pass."})
    knn_temp: float = field(default=1.0, metadata={"help": "Temperature T of exp(-d/T)."})
    recompute_dists: bool = field(default=False, metadata={"help": "Recompute exact squared L2 distances from the stored keys (needed with PQ indexes)."})
    ignore_top: bool = field(default=False, metadata={"help": "Drop the nearest neighbour (for querying a store with its own training text)."})
    nprobe: int = field(default=32, metadata={"help": "IVF lists visited per query (approximate indexes only)."})

    def validate(self) -> None:
        if self.k < 1:
            raise KnnlmError(f"--k: must be >= 1, got {self.k}")
        for lam in self.lmbda:
            if not 0.0 <= lam <= 1.0:
                raise KnnlmError(f"--lmbda: {lam} is outside [0, 1]; it is the weight of the kNN distribution")
        if not self.knn_temp > 0:
            raise KnnlmError(f"--knn_temp: must be > 0, got {self.knn_temp}")
        if self.nprobe < 1:
            raise KnnlmError(f"--nprobe: must be >= 1, got {self.nprobe}")


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


def interpolate(lm_logp: torch.Tensor, knn_logp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log((1 - λ) p_lm + λ p_knn); λ = 0 returns ``lm_logp`` itself and λ = 1 ``knn_logp``."""
    if lmbda == 0:
        return lm_logp
    if lmbda == 1:
        return knn_logp
    return torch.logaddexp(lm_logp + math.log1p(-lmbda), knn_logp + math.log(lmbda))


_RECOMPUTE_FLOATS = 1 << 22  # 16 MB of float32 keys per chunk of queries (a whole batch is B x k x d floats)
KEYS_IN_RAM_FRACTION = 0.5  # hold the keys in RAM for --recompute_dists when they take at most this share of free RAM


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def resident_keys(datastore) -> torch.Tensor:
    """The store's keys [N, d] for exact distances: widened to float32 in RAM when that copy fits in
    ``KEYS_IN_RAM_FRACTION`` of the available memory (random row reads never wait for the disk, and
    :func:`exact_sq_dists` reads them in place), else a copy-on-write float16 memory map of keys.f16."""
    n, d = datastore.N, datastore.d
    if n * d * 4 <= KEYS_IN_RAM_FRACTION * _available_ram():
        log.info("holding the %d datastore keys in RAM as float32 for exact distances (%.0f MiB)", n, n * d * 4 / 2**20)
        keys = np.empty((n, d), dtype=np.float32)
        for s in range(0, n, 1 << 16):  # widen in slices: no second full-size float16 copy
            keys[s: s + (1 << 16)] = datastore.keys[s: s + (1 << 16)]
        return torch.from_numpy(keys)
    log.info("exact distances read the %d datastore keys from disk (%.0f MiB as float32 do not fit in RAM)",
             n, n * d * 4 / 2**20)
    keys16 = np.memmap(datastore.dir / "keys.f16", dtype=np.float16, mode="c", shape=(n, d))  # writable for torch
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
        diff = wide[: sel.numel()]
        if wide is not gathered:
            diff.copy_(gathered[: sel.numel()])
        diff = diff.view(b, k, d)  # [b, k, d] float32
        diff.sub_(queries[s: s + b, None, :].to(dev))
        torch.sum(diff.square_(), dim=-1, out=out[s: s + b])
    return out


class Retriever:
    """Batched nearest-neighbour search over a datastore: one FAISS search per batch of positions."""

    def __init__(self, datastore, args: KNNArgs, index=None, use_gpu: bool | None = None):
        from .index import load_index, flat_index

        self.ds, self.args = datastore, args
        self.index = index if index is not None else load_index(datastore.dir, nprobe=args.nprobe, use_gpu=use_gpu)
        if self.index is None:
            self.index = flat_index(datastore, use_gpu=use_gpu)
        self.k = min(args.k + int(args.ignore_top), datastore.N)
        if args.k + int(args.ignore_top) > datastore.N:
            log.info("k=%d exceeds the datastore size %d: retrieving all keys", args.k, datastore.N)
        self.vals = torch.from_numpy(np.asarray(datastore.vals, dtype=np.int64))  # [N], small enough to hold
        # an index whose distances are already exact (TorchFlatIndex): a second copy of the keys would add nothing
        self.recompute = args.recompute_dists and not getattr(self.index, "exact_distances", False)
        self.keys = resident_keys(datastore) if self.recompute else None  # [N, d]

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, d] -> (squared L2 distances float32 [B, k'], values int64 [B, k']), nearest first."""
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        dists, ids = self.index.search(q, self.k)  # [B, k] each
        if self.args.ignore_top:
            dists, ids = dists[:, 1:], ids[:, 1:]
        missing = torch.from_numpy(ids < 0)  # IVF may find fewer than k
        ids_t = torch.from_numpy(ids).masked_fill(missing, 0)
        if self.recompute:
            dists_t = exact_sq_dists(self.keys, torch.from_numpy(q), ids_t)
        else:
            dists_t = torch.from_numpy(np.ascontiguousarray(dists, dtype=np.float32))
        dists_t.masked_fill_(missing, math.inf)
        return dists_t, self.vals[ids_t]

    def log_probs(self, queries: torch.Tensor, vocab_size: int) -> torch.Tensor:
        dists, vals = self.search(queries)
        return knn_log_probs(dists, vals, vocab_size, self.args.knn_temp)

    def gold_log_prob(self, queries: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        dists, vals = self.search(queries)
        return knn_gold_log_prob(dists, vals, gold.cpu(), self.args.knn_temp)
