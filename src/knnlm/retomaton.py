"""RetoMaton (Alon et al., ICML 2022): an automaton over the datastore that replaces most kNN searches by pointers.

Datastore row i (key: the state before token t, value: token t) points to row i + 1, the entry of the next token in
the same document. After a position is scored, the neighbours whose value is the token that actually came next (the
gold token in evaluation, the chosen one in generation) are followed to their successors; those rows (with clusters:
also the other members of their k-means clusters, ``knnlm datastore cluster``; at most ``max_knns``) are the next
position's candidates, their distances computed exactly from the stored keys. A full search is made only when fewer
than ``min_knns`` successors survive, and its neighbours are joined with the pointer candidates (each row once).

No pointer leaves a document: the last row of each document of the store (``tokens.i32.docs``), the last row of the
store and a row whose value is the EOS token (where documents are joined by EOS) have no successor.

The random-skip kNN-LM (``--skip_search_prob``), the paper's baseline, lives here too: it searches at a position with
probability 1 - p, drawn from the position's index (the same draw however the positions are batched); a position
without neighbours takes the LM's distribution (:mod:`knnlm.scoring`, :mod:`knnlm.augmented`).

Distances are always exact (``Retriever.distances``), for searched neighbours and pointers alike, so the two mix.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import KnnlmError

log = logging.getLogger(__name__)

EMPTY = torch.zeros(0, dtype=torch.long)  # the state of a stream with no pointers
SKIP_SEED = 0x5EED  # the random-skip draws are a fixed function of (seed, position)


def successors(ds) -> np.ndarray:
    """Whether row i of the store may point to row i + 1: bool [N] (see the module doc)."""
    n = ds.N
    ok = np.ones(n, dtype=bool)
    ok[-1] = False
    docs_path = ds.dir / "tokens.i32.docs"
    if docs_path.is_file():
        lengths = np.diff(np.fromfile(docs_path, dtype=np.int64))
        rows = np.maximum(lengths - 1, 0)  # a document of L tokens holds L - 1 targets (its first has no context)
        if int(rows.sum()) != n:
            raise KnnlmError(f"--retomaton: {docs_path} describes {int(rows.sum())} rows, the store holds {n}; "
                             "rebuild the datastore with `knnlm datastore build ... --overwrite`")
        ends = np.cumsum(rows)[rows > 0]  # exclusive end row of each document
        ok[ends - 1] = False
    else:
        log.warning("%s has no tokens.i32.docs: its rows are taken as one document", ds.dir)
    eos = _eos_token(ds)
    if eos is not None:
        ok &= np.asarray(ds.vals) != eos
    return ok


def _eos_token(ds) -> Optional[int]:
    path = ds.dir / "tokens.i32.json"
    try:
        return json.loads(path.read_text())["key"]["eos_token_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def skip_draws(positions: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers, one per position index (splitmix64 of the index): [a] int -> [a] float64."""
    with np.errstate(over="ignore"):
        z = positions.astype(np.uint64) + np.uint64(SKIP_SEED) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _pad(rows: Sequence[torch.Tensor], width: int = 0) -> torch.Tensor:
    """Variable-length id rows -> [a, m] int64, -1 after each row."""
    m = max([width, *(len(r) for r in rows)])
    out = torch.full((len(rows), m), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _dedupe(ids: torch.Tensor) -> torch.Tensor:
    """Each row's distinct ids, ascending, -1 (none) first, trimmed to the longest row: [a, m] -> [a, m']."""
    ids = ids.sort(dim=1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    ids = ids.masked_fill(dup, -1).sort(dim=1).values
    width = int((ids >= 0).sum(dim=1).max()) if ids.numel() else 0
    return ids[:, ids.shape[1] - max(width, 1):]


class Automaton:
    """RetoMaton's (or the random-skip kNN-LM's) step over a batch of independent streams, each with its own state.

    A state is a 1-D int64 tensor of successor rows, nearest predecessor first (``EMPTY`` at a stream's start).
    :meth:`step` gives each stream's neighbours at its current position, :meth:`advance` the next states from the
    tokens that followed. Counters: ``steps`` (positions scored), ``searches``, ``candidates`` (neighbours summed)."""

    def __init__(self, retriever, args=None):
        self.r = retriever
        self.args = args or retriever.args
        self.pointers = self.args.retomaton and not self.args.no_pointer
        self.next_ok = torch.from_numpy(successors(retriever.ds)) if self.pointers else None  # [N] bool
        self.members = self.offsets = self.cluster_of = None
        if self.pointers and not self.args.no_clusters:
            from .clusters import load_clusters

            cluster_of = load_clusters(retriever.ds).astype(np.int64)  # [N]
            self.cluster_of = cluster_of
            self.members = np.argsort(cluster_of, kind="stable")  # rows grouped by cluster, ascending within each
            self.offsets = np.concatenate([[0], np.cumsum(np.bincount(cluster_of))])  # [C + 1]
        self.steps = self.searches = self.candidates = 0

    # ------------------------------------------------------------------------------------------------------ one step
    def step(self, queries: torch.Tensor, states: Sequence[torch.Tensor],
             positions: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [a, d], one state per row, ``positions`` [a] (the rows' position indices: the random skips) ->
        (exact squared L2 distances float32 [a, m], row ids int64 [a, m]; -1 and inf where a row has fewer)."""
        a = len(states)
        search = self._search_mask(states, positions)  # [a] bool
        cands = _pad([self._candidates(s) for s in states]) if self.pointers else torch.full((a, 0), -1)
        found = torch.full((a, 0), -1, dtype=torch.long)
        if search.any():
            _, ids = self.r.search_ids(queries[search], recompute=False)  # [s, k]; exact distances below
            found = torch.full((a, ids.shape[1]), -1, dtype=torch.long)
            found[search] = ids.cpu()
        ids = _dedupe(torch.cat([found, cands], dim=1))  # [a, m]; each row's -1s first
        counts = (ids >= 0).sum(dim=1).tolist()
        dists = torch.full(ids.shape, math.inf)  # [a, m]
        for i, c in enumerate(counts):  # row by row: rows differ in width, and padding would cost full distances
            if c:
                dists[i, -c:] = self.r.distances(queries[i: i + 1], ids[i: i + 1, -c:])[0].cpu()
        self.steps += a
        self.searches += int(search.sum())
        self.candidates += int((ids >= 0).sum())
        return dists, ids

    def _search_mask(self, states, positions) -> torch.Tensor:
        a = len(states)
        if self.args.skip_search_prob > 0:
            if positions is None:
                raise ValueError("the random-skip kNN-LM needs the positions' indices")
            return torch.from_numpy(skip_draws(np.asarray(positions)) >= self.args.skip_search_prob)
        if not self.pointers:
            return torch.ones(a, dtype=torch.bool)
        return torch.tensor([len(s) < self.args.min_knns for s in states], dtype=torch.bool)

    def _candidates(self, state: torch.Tensor) -> torch.Tensor:
        """The pointer candidates of a state: its successors, then (with clusters) the other members of their
        clusters, the clusters most pointed into first; at most ``max_knns``."""
        cap = self.args.max_knns
        if self.members is None or len(state) == 0 or len(state) >= cap:
            return state[:cap]
        s = state.numpy()
        clusters, counts = np.unique(self.cluster_of[s], return_counts=True)
        parts, extra = [s], 0
        for c in clusters[np.lexsort((clusters, -counts))]:  # most pointed into first, then by cluster id
            part = self.members[self.offsets[c]: self.offsets[c + 1]]
            parts.append(part)
            extra += len(part)
            if extra >= cap:  # members only repeat the state's own rows, so this many give `cap` distinct rows
                break
        rows = np.concatenate(parts)
        _, first = np.unique(rows, return_index=True)
        return torch.from_numpy(rows[np.sort(first)][:cap])

    # ---------------------------------------------------------------------------------------------------- transition
    def advance(self, ids: torch.Tensor, dists: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The next states: ids/dists [a, m] of :meth:`step`, tokens [a] that came next -> a states, each the
        successors of the neighbours whose value is that token, nearest neighbour first (ties: lower row first)."""
        a = ids.shape[0]
        if not self.pointers:
            return [EMPTY] * a
        keep = (ids >= 0) & (self.r.values(ids).cpu() == tokens.cpu().long()[:, None])
        keep &= self.next_ok[ids.clamp_min(0)]
        order = dists.masked_fill(~keep, math.inf).sort(dim=1, stable=True).indices  # ids ascend: ties by row
        succ = ids.gather(1, order) + 1  # [a, m]
        counts = keep.sum(dim=1).tolist()
        return [succ[i, :c].clone() for i, c in enumerate(counts)]

    def metrics(self) -> dict:
        """``searches``, ``steps``, ``foss`` (fraction of saved searches), ``candidates_per_step``."""
        steps = max(self.steps, 1)
        return {"searches": self.searches, "steps": self.steps, "foss": 1.0 - self.searches / steps,
                "candidates_per_step": self.candidates / steps}


# ---------------------------------------------------------------------------------------------------------- evaluation
class Streams:
    """Evaluation order for a stateful kNN-LM: the windows cut into ``n`` contiguous streams (the first ones one
    window longer), batch j holding window j of every stream still running, so the active streams are always the
    first ones, in order. Each stream carries its automaton state from window to window; a state starts empty at a
    stream's first window and at a document's first window. Called as the scoring kernel's searcher."""

    def __init__(self, automaton: Automaton, wins: list, doc_starts, n: int):
        self.automaton = automaton
        n = max(1, min(n, len(wins)))
        sizes = [len(wins) // n + (i < len(wins) % n) for i in range(n)]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.chunks = [wins[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        doc_set = {int(s) for s in doc_starts}
        self.resets = {c[0].row for c in self.chunks if c} | {w.row for w in wins if w.start in doc_set}
        self.states = [EMPTY] * n

    def batches(self):
        for j in range(len(self.chunks[0]) if self.chunks else 0):
            yield [c[j] for c in self.chunks if j < len(c)]

    def __call__(self, queries: torch.Tensor, gold: torch.Tensor, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [n, d] and gold [n] of a batch of windows (targets in window order) -> (dists [n, m] float32,
        values [n, m] int64), inf where a position has fewer neighbours."""
        for i, w in enumerate(batch):
            if w.row in self.resets:
                self.states[i] = EMPTY
        sizes = [w.n_targets for w in batch]
        offsets = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        got_d: list = [None] * len(gold)
        got_i: list = [None] * len(gold)
        for j in range(max(sizes)):
            act = [i for i, s in enumerate(sizes) if j < s]
            rows = torch.from_numpy(offsets[act] + j)
            pos = np.asarray([batch[i].row + j for i in act], dtype=np.int64)
            dists, ids = self.automaton.step(queries[rows], [self.states[i] for i in act], pos)
            for i, s in zip(act, self.automaton.advance(ids, dists, gold[rows])):
                self.states[i] = s
            for r, d, x in zip(rows.tolist(), dists, ids):
                got_d[r], got_i[r] = d, x
        ids = _pad(got_i)  # [n, m]
        dists = torch.full(ids.shape, math.inf)
        for r, d in enumerate(got_d):
            dists[r, : len(d)] = d
        return dists, self.automaton.r.values(ids)


# ---------------------------------------------------------------------------------------------------------- generation
class Tracker:
    """The automaton across the forward calls of an augmented model (:mod:`knnlm.augmented`), one state per batch row.

    A call that starts a sequence (an empty KV cache, or none: a recomputation from scratch) steps every real
    position of its input from empty states, following pointers with the input's own next tokens; a call that
    continues a cached sequence first follows the previous call's last neighbours with the tokens chosen since (its
    first input token), then steps its positions. So a generation with the KV cache follows the sampled tokens and
    equals a recomputation without it. One path per row: beam search reorders rows and is not followed."""

    def __init__(self, automaton: Automaton):
        self.automaton = automaton
        self.states: list = []
        self.pending = None  # (ids [a, m], dists [a, m], rows [a]) of each row's last stepped position

    def log_probs(self, z: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, past: int, keep: int,
                  vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, T, d] queries of every input position, ids [B, T] input tokens, mask [B, T] bool (real tokens),
        ``past`` tokens already cached, the last ``keep`` positions returned -> (log p_knn [n, V] of the returned
        real positions, row-major; [n] bool: no neighbours there)."""
        from .knn import knn_log_probs

        b, t = ids.shape
        if past == 0 or len(self.states) != b:
            self.states, self.pending = [EMPTY] * b, None
        elif self.pending is not None:
            p_ids, p_dists, rows = self.pending
            self._advance(p_ids, p_dists, rows, ids[rows, 0])
        self.pending = None
        got: dict = {}
        for p in range(t):
            rows = torch.nonzero(mask[:, p].cpu(), as_tuple=True)[0]  # [a]
            if len(rows) == 0:
                continue
            pos = np.full(len(rows), past + p, dtype=np.int64)
            dists, nb = self.automaton.step(z[rows, p], [self.states[r] for r in rows.tolist()], pos)
            if p >= t - keep:
                logp = knn_log_probs(dists, self.automaton.r.values(nb), vocab, self.automaton.r.args.knn_temp)
                none = torch.isinf(dists).all(dim=-1)
                for i, r in enumerate(rows.tolist()):
                    got[(r, p)] = (logp[i], none[i])
            if p < t - 1:
                self._advance(nb, dists, rows, ids[rows, p + 1])
            else:
                self.pending = (nb, dists, rows)
        order = [got[(r, p)] for r in range(b) for p in range(t - keep, t) if (r, p) in got]
        if not order:
            return torch.zeros(0, vocab), torch.zeros(0, dtype=torch.bool)
        return torch.stack([o[0] for o in order]), torch.stack([o[1] for o in order])

    def _advance(self, nb, dists, rows, tokens) -> None:
        for r, s in zip(rows.tolist(), self.automaton.advance(nb, dists, tokens)):
            self.states[r] = s
