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

Distances are always exact (``Retriever.distance_pairs``), for searched neighbours and pointers alike, so the two mix.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .errors import KnnlmError

log = logging.getLogger(__name__)

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


def _rank(rows: np.ndarray) -> np.ndarray:
    """Each entry's index within its run of equal values of ``rows`` (runs contiguous, e.g. sorted): [e] -> [e]."""
    if len(rows) == 0:
        return rows
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # [runs]
    return np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))


def _empty_states(a: int) -> np.ndarray:
    return np.full((a, 0), -1, dtype=np.int64)


def _put(states: np.ndarray, rows: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``states`` [n, w] with its rows ``rows`` [a] replaced by ``new`` [a, w'] (both -1 after each state's rows)."""
    if len(rows) == states.shape[0] and np.array_equal(rows, np.arange(len(rows))):
        return new  # every state replaced: no wider than it must be
    if new.shape[1] > states.shape[1]:
        states = np.pad(states, ((0, 0), (0, new.shape[1] - states.shape[1])), constant_values=-1)
    states[rows] = -1
    states[rows, : new.shape[1]] = new
    return states


@dataclass
class Neighbours:
    """The neighbours of a step's ``a`` positions: ``ids`` int64 [a, m] (each position's rows, each once, then -1;
    m >= 1), ``dists`` float32 [a, m] their exact squared L2 (inf after them) and ``searched`` bool [a] (the positions
    whose neighbours came from a search, not from pointers alone)."""

    ids: np.ndarray
    dists: np.ndarray
    searched: np.ndarray


class Automaton:
    """RetoMaton's (or the random-skip kNN-LM's) step over a batch of independent streams, each with its own state.

    The states of ``a`` streams are one int64 array [a, w]: each row the stream's successor rows, nearest predecessor
    first, then -1 (a row of -1 at a stream's start). :meth:`step` gives each stream's neighbours at its current
    position, :meth:`advance` the next states from the tokens that followed; both work on all streams at once (padded
    [a, m] arrays, no loop over streams but the clusters' candidates, found a state at a time). Counters: ``steps`` (positions scored), ``searches``, ``candidates``
    (neighbours summed)."""

    def __init__(self, retriever, args=None):
        self.r = retriever
        self.args = args or retriever.args
        self.pointers = self.args.retomaton and not self.args.no_pointer
        self.n = int(retriever.ds.N)
        # [N] int32: the token of row i where row i + 1 is its successor, else -1 (matches no token): one gather
        self.next_token = (np.where(successors(retriever.ds), retriever.vals.numpy(), -1).astype(np.int32)
                           if self.pointers else None)
        self.members = self.offsets = self.cluster_of = None
        if self.pointers and not self.args.no_clusters:
            from .clusters import load_clusters

            cluster_of = load_clusters(retriever.ds).astype(np.int64)  # [N]
            self.cluster_of = cluster_of
            self.members = np.argsort(cluster_of, kind="stable")  # rows grouped by cluster, ascending within each
            self.offsets = np.concatenate([[0], np.cumsum(np.bincount(cluster_of))])  # [C + 1]
        self.steps = self.searches = self.candidates = 0

    # ------------------------------------------------------------------------------------------------------ one step
    def step(self, queries: torch.Tensor, states: np.ndarray, positions: Optional[np.ndarray] = None,
             own: Optional[np.ndarray] = None) -> Neighbours:
        """queries [a, d], states [a, w], ``positions`` [a] (the rows' position indices: the random skips), ``own`` [a]
        (each position's own store row, which ``--ignore_top`` leaves out of a search: the store's own text; None: the
        nearest is left out) -> each position's neighbours: its pointer candidates, then where searched the searched
        rows not among them, with exact distances (p_knn does not depend on their order)."""
        a = states.shape[0]
        search = self._search_mask(states, positions)  # [a] bool
        cands = self._candidates(states) if self.pointers else _empty_states(a)  # [a, c], rows first, then -1
        if search.any():
            sel = np.flatnonzero(search)
            cands = self._add_searched(queries, cands, sel, None if own is None else np.asarray(own)[sel])
        if cands.shape[1] == 0:
            cands = np.full((a, 1), -1, dtype=np.int64)
        valid = cands >= 0  # [a, m]
        qrow = valid.nonzero()[0]  # [e] row-major: grouped by position
        flat = self.r.distance_pairs(queries, torch.from_numpy(qrow), torch.from_numpy(cands[valid]))  # [e]
        dists = np.full(cands.shape, np.inf, dtype=np.float32)
        dists[valid] = flat.cpu().numpy()
        self.steps += a
        self.searches += int(search.sum())
        self.candidates += len(qrow)
        return Neighbours(cands, dists, search)

    def _add_searched(self, queries: torch.Tensor, cands: np.ndarray, sel: np.ndarray,
                      own: Optional[np.ndarray] = None) -> np.ndarray:
        """Pointer candidates [a, c] and the searched positions sel [s] (``own`` [s]: their own store rows, for
        ``--ignore_top``) -> [a, m]: after each searched position's pointers, the searched rows not among them (rows
        first, then -1 in every row)."""
        own_t = None if own is None else torch.from_numpy(np.asarray(own, dtype=np.int64))
        _, found = self.r.search_ids(queries[torch.from_numpy(sel)], recompute=False, own=own_t)  # [s, k]; exact below
        found = found.cpu().numpy()  # FAISS's unfilled -1 come last
        held = (cands[sel] >= 0).sum(axis=1)  # [s] pointers of each searched position
        k = found.shape[1]
        out = np.full((len(cands), max(cands.shape[1], int(held.max()) + k)), -1, dtype=np.int64)
        out[:, : cands.shape[1]] = cands
        if not held.any():  # (always with --min_knns 1: a position is searched when it has no pointers)
            out[sel, :k] = found
            return out
        rows = np.flatnonzero(cands >= 0)  # a searched row already a pointer candidate counts once
        packed = (rows // cands.shape[1]) * self.n + cands.ravel()[rows]
        dup = np.isin(sel[:, None] * self.n + found, packed) & (found >= 0)  # [s, k]
        order = np.argsort(dup, axis=1, kind="stable")  # the repeats last, the others in order
        found = np.take_along_axis(np.where(dup, -1, found), order, axis=1)
        out[sel[:, None], held[:, None] + np.arange(k)] = found
        return out

    def _search_mask(self, states: np.ndarray, positions) -> np.ndarray:
        a = states.shape[0]
        if self.args.skip_search_prob > 0:
            if positions is None:
                raise ValueError("the random-skip kNN-LM needs the positions' indices")
            return skip_draws(np.asarray(positions)) >= self.args.skip_search_prob
        if not self.pointers:
            return np.ones(a, dtype=bool)
        return (states >= 0).sum(axis=1) < self.args.min_knns

    def _candidates(self, states: np.ndarray) -> np.ndarray:
        """The pointer candidates of states [a, w] -> [a, c] (-1 after each row): the successors, then (with
        clusters) the other members of their clusters, the clusters most pointed into first; at most ``max_knns``."""
        cap = self.args.max_knns
        if self.members is None:
            return states[:, :cap]
        rows = [self._cluster_candidates(s[s >= 0], cap) for s in states]  # clusters: a row at a time
        out = np.full((len(rows), max([0, *(len(r) for r in rows)])), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def _cluster_candidates(self, s: np.ndarray, cap: int) -> np.ndarray:
        if len(s) == 0 or len(s) >= cap:
            return s[:cap]
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
        return rows[np.sort(first)][:cap]

    # ---------------------------------------------------------------------------------------------------- transition
    def advance(self, nb: Neighbours, tokens: torch.Tensor) -> np.ndarray:
        """The next states [a, w'] from a step's neighbours and the tokens [a] that came next: each the successors of
        the neighbours whose value is that token, nearest neighbour first (ties: lower row first)."""
        if not self.pointers:
            return _empty_states(len(nb.ids))
        tok = tokens.cpu().numpy().astype(np.int32)  # [a]
        keep = self.next_token[np.maximum(nb.ids, 0)] == tok[:, None]  # [a, m]; a -1 neighbour: inf, dropped below
        keep &= nb.ids >= 0
        q, col = keep.nonzero()
        i, d = nb.ids[q, col], nb.dists[q, col]
        order = np.lexsort((i, d, q))  # by position, then distance, then row
        q, succ = q[order], i[order] + 1
        out = np.full((len(nb.ids), int(np.bincount(q).max()) if len(q) else 0), -1, dtype=np.int64)
        out[q, _rank(q)] = succ
        return out

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
    stream's first window and at a document's first window. Called as the scoring kernel's searcher.
    ``searched_rows``: the text rows (token positions) whose neighbours came from a search, one array per step.
    ``own_text``: the windows are the store's own text, so ``--ignore_top`` leaves each position's own row out of its
    searches (as the kNN-LM's scoring does; else the nearest)."""

    def __init__(self, automaton: Automaton, wins: list, doc_starts, n: int, own_text: bool = False):
        self.automaton, self.own_text = automaton, own_text
        n = max(1, min(n, len(wins)))
        sizes = [len(wins) // n + (i < len(wins) % n) for i in range(n)]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.chunks = [wins[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        doc_set = {int(s) for s in doc_starts}
        self.resets = {c[0].row for c in self.chunks if c} | {w.row for w in wins if w.start in doc_set}
        self.states = _empty_states(n)  # [n, w]
        self.searched_rows: list[np.ndarray] = []

    def batches(self):
        for j in range(len(self.chunks[0]) if self.chunks else 0):
            yield [c[j] for c in self.chunks if j < len(c)]

    def __call__(self, queries: torch.Tensor, gold: torch.Tensor, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [n, d] and gold [n] of a batch of windows (targets in window order) -> (dists [n, m] float32,
        values [n, m] int64), inf where a position has fewer neighbours."""
        for i, w in enumerate(batch):
            if w.row in self.resets:
                self.states[i] = -1
        sizes = np.asarray([w.n_targets for w in batch])
        offsets = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        starts = np.asarray([w.row for w in batch], dtype=np.int64)
        got = []  # (rows [a], dists [a, m], ids [a, m]) of each step
        for j in range(int(sizes.max())):
            act = np.flatnonzero(sizes > j)  # [a] the windows with a j-th target
            rows = offsets[act] + j  # [a] their rows in the batch
            nb = self.automaton.step(queries[torch.from_numpy(rows)], self.states[act], starts[act] + j,
                                     own=starts[act] + j if self.own_text else None)
            self.searched_rows.append((starts[act] + j)[nb.searched])
            self.states = _put(self.states, act, self.automaton.advance(nb, gold[torch.from_numpy(rows)]))
            got.append((rows, nb.dists, nb.ids))
        m = max(g[1].shape[1] for g in got)
        ids = np.full((len(gold), m), -1, dtype=np.int64)  # [n, m]
        dists = np.full((len(gold), m), np.inf, dtype=np.float32)
        for rows, d, i in got:
            dists[rows, : d.shape[1]] = d
            ids[rows, : i.shape[1]] = i
        dists, ids = torch.from_numpy(dists), torch.from_numpy(ids)
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
        self.states = _empty_states(0)  # [b, w]
        self.pending = None  # (neighbours, rows [a]) of each row's last stepped position
        self.seen = np.zeros(0, dtype=np.int64)  # [b] real tokens stepped per row: the random skips' position index

    def log_probs(self, z: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, past: int, keep: int,
                  vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, T, d] queries of every input position, ids [B, T] input tokens, mask [B, T] bool (real tokens),
        ``past`` tokens already cached, the last ``keep`` positions returned -> (log p_knn [n, V] of the returned
        real positions, row-major; [n] bool: no neighbours there)."""
        from .knn import knn_log_probs, no_neighbours

        b, t = ids.shape
        if past == 0 or self.states.shape[0] != b:
            self.states, self.pending, self.seen = _empty_states(b), None, np.zeros(b, dtype=np.int64)
        elif self.pending is not None:
            nb, rows = self.pending
            self._advance(nb, rows, ids[torch.from_numpy(rows), 0])
        self.pending = None
        got: dict = {}
        for p in range(t):
            rows = np.flatnonzero(mask[:, p].cpu().numpy())  # [a]
            if len(rows) == 0:
                continue
            pos = self.seen[rows].copy()  # a row's own token index (left padding not counted): as generated alone
            self.seen[rows] += 1
            nb = self.automaton.step(z[torch.from_numpy(rows), p], self.states[rows], pos)
            if p >= t - keep:
                dists, nb_ids = torch.from_numpy(nb.dists), torch.from_numpy(nb.ids)  # [a, m] each
                logp = knn_log_probs(dists, self.automaton.r.values(nb_ids), vocab, self.automaton.r.args.knn_temp)
                none = no_neighbours(dists)
                for i, r in enumerate(rows.tolist()):
                    got[(r, p)] = (logp[i], none[i])
            if p < t - 1:
                self._advance(nb, rows, ids[torch.from_numpy(rows), p + 1])
            else:
                self.pending = (nb, rows)
        order = [got[(r, p)] for r in range(b) for p in range(t - keep, t) if (r, p) in got]
        if not order:
            return torch.zeros(0, vocab), torch.zeros(0, dtype=torch.bool)
        return torch.stack([o[0] for o in order]), torch.stack([o[1] for o in order])

    def _advance(self, nb: Neighbours, rows: np.ndarray, tokens: torch.Tensor) -> None:
        self.states = _put(self.states, rows, self.automaton.advance(nb, tokens))
