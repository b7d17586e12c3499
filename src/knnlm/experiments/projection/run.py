"""The projection study's run: the validation corpus scored with the LM, the kNN-LM and each target's p_proj, per-token
records checkpointed so that a rerun resumes."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ...corpus import (CorpusArgs, batch_inputs, count_targets, target_positions, target_tokens, tokenize_to_file,
                       windows)
from ...errors import KnnlmError
from ...fileio import atomic_path, atomic_write_json, reusable
from ...knn import KNNArgs, Retriever, interpolate, knn_log_probs, lm_where, no_neighbours
from ...report import histogram
from .report import summarize
from .settings import LABELS, TARGETS, ProjectionArgs
from .solver import kl_from_logits, project

log = logging.getLogger(__name__)
_CHECKPOINT_EVERY_S = 60.0


def _fingerprint(lm, corpus: CorpusArgs, args: ProjectionArgs, knn: KNNArgs, datastore) -> dict:
    run = {k: v for k, v in dataclasses.asdict(args).items() if k != "output_dir"}
    return {"weights_hash": lm.weights_hash(), "datastore_meta": datastore.meta, "corpus": dataclasses.asdict(corpus),
            "knn": dataclasses.asdict(knn), "projection": run}


class _Records:
    """Per-token arrays, appended per batch; checkpointed with the number of finished windows so a rerun resumes."""

    def __init__(self, out_dir: Path, fingerprint: dict):
        self.path, self.state = out_dir / "partial.npz", out_dir / "partial.json"
        self.columns: dict[str, list[np.ndarray]] = {}
        self.windows_done = 0
        self.solve_s: dict[str, float] = {}  # target -> seconds spent in its solver (this run and resumed ones)
        self.last_save = time.time()
        state = reusable(self.state, fingerprint, "fingerprint")
        if self.path.exists() and state is not None:
            # partial.npz is written before partial.json: a kill between the two leaves rows of windows the record
            # does not count, which the resumed run scores again
            n = state.get("n_tokens")
            with np.load(self.path) as saved:
                self.columns = {k: [saved[k][:n]] for k in saved.files}
            self.windows_done = int(state["windows_done"])
            self.solve_s = dict(state.get("solve_s", {}))
            log.info("resuming after %d windows (%d tokens)", self.windows_done, self.n_tokens)
        self.fingerprint = fingerprint

    @property
    def n_tokens(self) -> int:
        return sum(len(a) for a in self.columns.get("gold", []))

    def add(self, **cols: torch.Tensor) -> None:
        for k, v in cols.items():
            self.columns.setdefault(k, []).append(v.cpu().numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.columns.items()}

    def windows_done_add(self, n: int) -> None:
        self.windows_done += n
        if time.time() - self.last_save > _CHECKPOINT_EVERY_S:
            self.checkpoint()

    def checkpoint(self) -> None:
        self.save(self.path)
        atomic_write_json(self.state, {"fingerprint": self.fingerprint, "windows_done": self.windows_done,
                                       "n_tokens": self.n_tokens, "solve_s": self.solve_s})
        self.last_save = time.time()

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **self.arrays())

    def finish(self, path: Path) -> dict[str, np.ndarray]:
        """``per_token.npz`` written; the checkpoint kept, every window counted, until the caller has written
        results.json (:func:`remove_partial`): a kill in the plots or the outputs resumes with nothing to score."""
        self.checkpoint()
        self.save(path)
        return self.arrays()


def remove_partial(out_dir: str | Path) -> None:
    """Deletes a finished projection's checkpoint (``partial.npz``, ``partial.json``) once its results.json is written."""
    for name in ("partial.npz", "partial.json"):
        (Path(out_dir) / name).unlink(missing_ok=True)


def run_projection(lm, corpus: CorpusArgs, args: ProjectionArgs, datastore, knn: Optional[KNNArgs] = None,
                   index=None) -> dict:
    """Scores the validation corpus with the LM, the kNN-LM and each target's p_proj; writes ``per_token.npz`` and the
    KL histograms into ``args.output_dir`` and returns the metrics (see :func:`summarize`). ``index``: a prebuilt
    FAISS-like index to search instead of the datastore's (as :func:`knnlm.evaluate.evaluate`)."""
    args.validate()  # a Python caller's settings (the CLI's are checked already; checking twice is cheap)
    knn = knn or KNNArgs()
    knn.refuse_stateful("the projection")
    if len(knn.lmbda) != 1:
        raise KnnlmError(f"--lmbda: the projection takes one λ, got {','.join(map(str, knn.lmbda))}")
    lmbda = knn.lmbda[0]
    if lmbda >= 1:
        raise KnnlmError("--lmbda: must be < 1 here: with λ = 1 p_knnlm is zero on tokens no neighbour holds and "
                         "KL[f(z) ‖ p_knnlm] is infinite")
    datastore.check_compatible(lm)
    if lm.dtype != torch.float32:
        log.warning("the LM runs in %s: z is optimised in float32 but f and g round it to %s, so steps below that "
                    "resolution are lost (most with a small --learning_rate); use --dtype float32 for the datastore and this run",
                    lm.dtype, lm.dtype)
    retriever = Retriever(datastore, knn, index=index)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = _Records(out, _fingerprint(lm, corpus, args, knn, datastore))
    if records.windows_done == 0:  # a fresh run: a token file of another corpus/--max_tokens must not be reused
        for name in ("tokens.i32", "tokens.i32.docs"):
            (out / name).unlink(missing_ok=True)
    tokens = tokenize_to_file(lm, corpus, "validation", out / "tokens.i32")
    if records.windows_done and tokens.replaced:  # the killed run's rows are of the earlier tokens
        log.warning("projection: the corpus was tokenized anew since the killed run; starting over")
        records.columns, records.windows_done, records.solve_s = {}, 0, {}
    block, stride = corpus.resolved_window(lm.max_positions)
    wins = windows(tokens.doc_starts, block, stride)
    points = tuple(sorted({datastore.key_point, "final_hidden"} | {TARGETS[t] for t in args.target}))
    device = lm.device
    started = time.time()
    with tqdm(total=count_targets(wins), initial=records.n_tokens, unit="tok", desc="projection") as bar:
        for group in _groups(wins[records.windows_done:], args.batch_size):
            ids, mask = batch_inputs(tokens, group, lm.eos_token_id or 0)  # [B, T] each
            rows, pos = target_positions(group)  # [n] each
            gold = target_tokens(tokens, group).to(device)  # [n]
            with torch.no_grad():
                hidden = lm.hidden_states(ids.to(device), mask.to(device), points)  # {point: [B, T, d]}
                at = {p: h[rows.to(h.device), pos.to(h.device)] for p, h in hidden.items()}  # {point: [n, d]}
            for lo in range(0, len(gold), args.batch_size):
                sl = slice(lo, lo + args.batch_size)
                _score_batch(lm, retriever, datastore.key_point, {p: a[sl] for p, a in at.items()}, gold[sl], lmbda,
                             args, records)
                bar.update(len(gold[sl]))
                bar.set_postfix(steps=float(records.columns[f"{args.target[0]}.steps"][-1][:, -1].mean()))
            records.windows_done_add(len(group))
    arrays = records.finish(out / "per_token.npz")
    metrics = summarize(arrays, args, lmbda=lmbda, k=retriever.k, knn_temp=knn.knn_temp)
    metrics.update(datastore_N=datastore.N, block_size=block, stride=stride,
                   timing={"wall_s": time.time() - started, "solve_s": dict(records.solve_s),
                           "note": "wall_s counts this process only (a resumed run restarts it); solve_s adds up"})
    for t in args.target:
        last = len(args.tol) - 1  # the smallest-tolerance column holds the longest runs
        histogram(out / f"kl_{t}.png", arrays[f"{t}.kl"][:, last],
                  title=f"KL[p_proj ‖ p_knnlm] per token, {LABELS[t]}, tol {args.tol[last]}", xlabel="KL (nats)",
                  log_x=True)
        for j, tol in enumerate(args.tol):
            histogram(out / f"steps_{t}_tol{tol:g}.png", arrays[f"{t}.steps"][:, j], bins=40,
                      title=f"Adam steps per token, {LABELS[t]}, lr {args.learning_rate}, tol {tol:g}", xlabel="steps")
    log.info("projection: %s", {k: v for k, v in metrics.items() if k.startswith("ppl")})
    return metrics


def _groups(wins: list, batch_size: int):
    """Consecutive windows holding at least ``batch_size`` targets together (the last group may hold fewer). Groups
    restart at the window a resumed run continues from, so resumed and uninterrupted runs form the same groups."""
    group, n = [], 0
    for w in wins:
        group.append(w)
        n += w.n_targets
        if n >= batch_size:
            yield group
            group, n = [], 0
    if group:
        yield group


def _score_batch(lm, retriever, key_point: str, at: dict, gold: torch.Tensor, lmbda: float, args: ProjectionArgs,
                 records: _Records) -> None:
    """One LM/kNN pass for a batch of positions, then every target's projection; appends per-token records."""
    with torch.no_grad():
        lm_logits = lm.output_layer(at["final_hidden"]).float()  # [n, V]
        lm_logp = torch.log_softmax(lm_logits, dim=-1)
        dists, vals = retriever.search(at[key_point])  # [n, k] each
        knn_logp = knn_log_probs(dists, vals, lm_logp.shape[-1], retriever.args.knn_temp).to(lm_logp.device)  # [n, V]
        # a position whose search found no neighbour keeps the LM, as eval scores it (p_knn is undefined there)
        target_logp = lm_where(no_neighbours(dists), lm_logp, interpolate(lm_logp, knn_logp, lmbda))  # [n, V]
    if not torch.isfinite(target_logp).all():  # p_lm > 0, so only a non-finite LM output gets here
        raise KnnlmError("--model_name_or_path: the LM gave non-finite log-probabilities, so KL[f(z) ‖ p_knnlm] is "
                         "undefined; try --dtype float32")
    cols = {"gold": gold.int(), "lm": lm_logp.gather(1, gold[:, None])[:, 0],
            "knnlm": target_logp.gather(1, gold[:, None])[:, 0], "kl_lm": kl_from_logits(lm_logits, target_logp)}
    for t in args.target:
        started = time.time()
        res = project(lm, t, at[TARGETS[t]], target_logp, gold, args.learning_rate, args.tol, args.max_steps, args.patience)
        records.solve_s[t] = records.solve_s.get(t, 0.0) + time.time() - started
        cols.update({f"{t}.{k}": v for k, v in res.items()})
    records.add(**cols)
