"""Gold-token log-probabilities at a batch of positions: the LM's, p_knn's, the MLP memory's and their λ mixtures.

The one scoring kernel behind evaluation (``evaluate.py``), the LM perplexities (``experiments/lm/``), Macondo scoring
and the projection study. Everything a caller sums or stores is a [n] vector per variant (n = scored positions).

The LM's log p(gold) = logit[gold] − logsumexp(logits) is taken from ``torch.log_softmax`` over blocks of
``SOFTMAX_ROWS`` rows: on the CPU its kernel computes each row's logsumexp in one fused pass over a cache-resident row,
while ``torch.logsumexp`` runs max, subtract, exp and sum as four tensor ops (2.8x slower on [256, 50257], measured),
and a whole-batch ``log_softmax`` allocates a second [n, V] tensor (51 MB at n = 256, V = 50257) whose page faults
cost more than the arithmetic. The numbers are bit-identical to ``log_softmax(logits).gather(gold)`` (rows are
independent). The output layer itself runs over blocks of ``OUTPUT_ROWS`` positions, so a long batch never holds all
its [n, V] logits at once.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from .corpus import TokenFile, Window, batch_inputs, target_positions, target_rows, target_tokens
from .knn import KNNArgs, interpolate, knn_gold_log_prob, lm_where, no_neighbours

log = logging.getLogger(__name__)

# positions per output-layer call: [128, V] float32 logits are 26 MB at V = 50257, under glibc's 32 MiB mmap ceiling,
# so the block is reused from the heap instead of page-faulted in per batch; measured on the 4 x 256 GPT-2 (CPU time
# per 256 positions, body included): 0.93-0.95x a bare forward returning [256, V] logits, 1.06x with 256 rows,
# 1.17x with 64 or 32 (smaller matrix products run slower)
OUTPUT_ROWS = 128
SOFTMAX_ROWS = 16  # rows per log_softmax on the CPU: [16, V] (3 MB) stays in cache and is reused by the allocator
SOFTMAX_ROWS_CUDA = 1024  # on a GPU, fewer larger kernels


def gold_log_probs(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[i, gold[i]]: logits [n, V] (any float dtype), gold [n] -> [n] float32, same device.

    Computed a block of rows at a time, so no second [n, V] tensor is made (see the module docstring)."""
    n = logits.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=logits.device)  # [n]
    gold = gold.to(logits.device).long()
    rows = SOFTMAX_ROWS_CUDA if logits.is_cuda else SOFTMAX_ROWS
    for s in range(0, n, rows):
        block = torch.log_softmax(logits[s: s + rows].float(), dim=-1)  # [r, V]
        out[s: s + rows] = block.gather(1, gold[s: s + rows, None])[:, 0]
    return out


def head_gold_log_probs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                        gold: torch.Tensor, rows: int = OUTPUT_ROWS) -> torch.Tensor:
    """log softmax(head(hidden))[gold] for an output layer ``head`` ([r, d] -> [r, V] logits): hidden [n, d], gold [n]
    -> [n] float32 on the hidden's device; the head runs on ``rows`` positions at a time."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [n]
    gold = gold.to(hidden.device)
    for s in range(0, hidden.shape[0], rows):
        out[s: s + rows] = gold_log_probs(head(hidden[s: s + rows]), gold[s: s + rows])  # head: [r, V]
    return out


@dataclass
class Scores:
    """Gold-token log-probabilities of one batch of n positions, each [n] float32 on the CPU (the [n, k] neighbours
    stay where the search put them)."""

    gold: torch.Tensor  # [n] int64 gold token ids
    lm: torch.Tensor  # [n] log p_lm(gold)
    knn: Optional[torch.Tensor] = None  # [n] log p_knn(gold) (with a retriever)
    mlp: Optional[torch.Tensor] = None  # [n] log p_mlp(gold) (with an MLP memory)
    knn_lm: dict = field(default_factory=dict)  # λ -> [n] log((1 - λ) p_lm + λ p_knn)
    mlp_lm: dict = field(default_factory=dict)  # λ -> [n] log((1 - λ) p_lm + λ p_mlp)
    dists: Optional[torch.Tensor] = None  # [n, k] float32 neighbour distances (for caches), on the search's device
    vals: Optional[torch.Tensor] = None  # [n, k] int64 their values, on the search's device


def key_points(retriever=None, memory=None) -> tuple[str, ...]:
    """The hidden states a scoring pass captures: the output layer's input plus the kNN and MLP query points."""
    points = ["final_hidden"]
    if retriever is not None:
        points.append(retriever.ds.key_point)
    if memory is not None:
        points.append(memory.key_point)
    return tuple(dict.fromkeys(points))


def _add(timing: Optional[dict], name: str, t0: float) -> None:
    if timing is not None:
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0


def _lm_part(lm, at: dict, gold: torch.Tensor, timing: Optional[dict]) -> torch.Tensor:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = head_gold_log_probs(lm.output_layer, at["final_hidden"], gold).cpu()  # [n]
    _add(timing, "output_s", t0)
    return out


def _search(retriever, query: torch.Tensor, timing: Optional[dict], searcher=None, gold=None, batch=None,
            own_rows: bool = False):
    t0 = time.perf_counter()
    # ([n, k] float32, [n, k] int64); a searcher (RetoMaton's streams) also sees the gold tokens and the windows
    if searcher is not None:
        found = searcher(query, gold, batch)
    else:
        found = retriever.search(query, own=target_rows(batch) if own_rows else None)
    _add(timing, "search_s", t0)
    return found


def _finish(scores: Scores, found, retriever, memory, at: dict, lmbdas: Optional[Sequence[float]],
            timing: Optional[dict]) -> Scores:
    """Adds the kNN part (from the search result ``found``) and the MLP part to ``scores`` (λs: KNNArgs' default when
    None)."""
    lmbdas = KNNArgs().lmbda if lmbdas is None else lmbdas
    if found is not None:  # p_knn and the mixtures where the neighbours are (a GPU backend's device); [n] come back
        scores.dists, scores.vals = found
        dev = scores.dists.device
        knn = knn_gold_log_prob(scores.dists, scores.vals, scores.gold.to(dev), retriever.args.knn_temp)  # [n]
        lm, mixed = scores.lm.to(dev), [lam for lam in lmbdas if lam != 0]  # λ = 0 is the LM itself
        per_token = torch.stack([knn] + [interpolate(lm, knn, lam) for lam in mixed]).cpu()  # [1 + λs, n]
        # p_knn is the LM's where a position has no neighbour, so the mixture is the LM itself there for every λ
        per_token = lm_where(no_neighbours(scores.dists), scores.lm[:, None], per_token.T).T.contiguous()  # [1 + λs, n]
        scores.knn = per_token[0]
        scores.knn_lm = {lam: per_token[1 + mixed.index(lam)] if lam != 0 else scores.lm for lam in lmbdas}
    if memory is not None:
        t0 = time.perf_counter()
        with torch.inference_mode():
            scores.mlp = head_gold_log_probs(memory, at[memory.key_point], scores.gold).cpu()  # [n]
        _add(timing, "mlp_s", t0)
        scores.mlp_lm = {lam: interpolate(scores.lm, scores.mlp, lam) for lam in lmbdas}
    return scores


def score_positions(lm, at: dict, gold: torch.Tensor, retriever=None, memory=None,
                    lmbdas: Optional[Sequence[float]] = None, timing: Optional[dict] = None,
                    lm_gold: Optional[torch.Tensor] = None) -> Scores:
    """Scores n positions whose hidden states are given.

    ``at``: {key point: [n, d]} holding ``final_hidden`` (the output layer's input) and the retriever's / memory's key
    points (:func:`key_points`); ``gold`` [n]: the token each position predicts. ``retriever``: a
    :class:`knnlm.knn.Retriever` (its ``args.knn_temp`` is the temperature); ``memory``: an
    :class:`knnlm.memory.MLPMemory`. ``timing``: a dict that accumulates ``output_s``, ``search_s``, ``mlp_s``.
    ``lm_gold`` [n]: the LM's gold log-probs when the caller already has them (e.g. :func:`gold_log_probs` of the
    logits of a model that exposes no hidden states); then ``at`` needs no ``final_hidden``."""
    if retriever is not None:
        retriever.args.refuse_stateful("score_positions")
    gold = gold.cpu().long()
    lm_part = lm_gold.float().cpu() if lm_gold is not None else _lm_part(lm, at, gold, timing)
    scores = Scores(gold=gold, lm=lm_part)
    found = _search(retriever, at[retriever.ds.key_point], timing) if retriever is not None else None
    return _finish(scores, found, retriever, memory, at, lmbdas, timing)


def encode_windows(lm, tokens: TokenFile, batch: list[Window], points: Sequence[str],
                   timing: Optional[dict] = None) -> tuple[dict, torch.Tensor]:
    """One forward pass over a batch of windows -> ({point: [n, d]} at the scored positions, gold [n] int64)."""
    t0 = time.perf_counter()
    ids, mask = batch_inputs(tokens, batch, lm.eos_token_id or 0)  # [B, T] each
    rows, pos = target_positions(batch)  # [n] each
    gold = target_tokens(tokens, batch)  # [n]
    with torch.inference_mode():
        hidden = lm.hidden_states(ids.to(lm.device), mask.to(lm.device), tuple(points))  # {point: [B, T, d]}
        at = {p: h[rows.to(h.device), pos.to(h.device)] for p, h in hidden.items()}  # {point: [n, d]}
    _add(timing, "forward_s", t0)
    return at, gold


def _search_pool() -> ThreadPoolExecutor:
    """The search's worker thread, with the caller's FAISS thread count: OpenMP keeps that count per thread, and a new
    thread starts from OMP_NUM_THREADS or all cores, whose spinning threads would take the cores the LM runs on."""
    import faiss

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="knnlm-search", initializer=faiss.omp_set_num_threads,
                              initargs=(faiss.omp_get_max_threads(),))


def is_own_text(tokens: TokenFile, retriever) -> bool:
    """--ignore_top: whether the scored tokens are the store's own (then each position's own row is known and is the
    one left out; otherwise the nearest neighbour is)."""
    if not retriever.args.ignore_top:
        return False
    own = tokens.sha256() == retriever.ds.meta.get("corpus_hash")
    log.info("--ignore_top: %s", "each position's own store row is left out (the store's own text)" if own else
             "the nearest neighbour is left out (the text is not the store's: no position has a row of its own)")
    return own


def score_windows(lm, tokens: TokenFile, batches: Iterable[list[Window]], retriever=None, memory=None,
                  lmbdas: Optional[Sequence[float]] = None, timing: Optional[dict] = None,
                  overlap: bool = True, searcher=None) -> Iterator[Scores]:
    """Scores each batch of windows (targets in window order); yields one :class:`Scores` per batch, in order.

    With a retriever and ``overlap``, a batch's FAISS search runs in a worker thread while the LM encodes the next
    batch (FAISS and torch release the GIL), so on several cores search time hides behind the forward pass; the
    results are the same either way; the worker searches with the caller's FAISS threads. ``searcher(queries [n, d], gold [n], batch) -> (dists, values)`` replaces
    ``retriever.search`` (RetoMaton's :class:`knnlm.retomaton.Streams`; called once per batch, in order)."""
    if retriever is not None and searcher is None:
        retriever.args.refuse_stateful("score_windows without a searcher")
    own = retriever is not None and searcher is None and is_own_text(tokens, retriever)
    points = key_points(retriever, memory)
    if retriever is None or not overlap:
        for batch in batches:
            at, gold = encode_windows(lm, tokens, batch, points, timing)
            scores = Scores(gold=gold, lm=_lm_part(lm, at, gold, timing))
            found = (_search(retriever, at[retriever.ds.key_point], timing, searcher, gold, batch, own)
                     if retriever is not None else None)
            yield _finish(scores, found, retriever, memory, at, lmbdas, timing)
        return
    with _search_pool() as pool:
        pending = None  # (scores, at, future of the search) of the previous batch
        for batch in batches:
            at, gold = encode_windows(lm, tokens, batch, points, timing)
            future = pool.submit(_search, retriever, at[retriever.ds.key_point], timing, searcher, gold, batch, own)
            scores = Scores(gold=gold, lm=_lm_part(lm, at, gold, timing))
            if pending is not None:
                yield _finish(pending[0], pending[2].result(), retriever, memory, pending[1], lmbdas, timing)
            pending = (scores, at, future)
        if pending is not None:
            yield _finish(pending[0], pending[2].result(), retriever, memory, pending[1], lmbdas, timing)
