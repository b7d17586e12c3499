"""Projection study (Chiang et al. §3, Appendices A.2 and E): is the softmax bottleneck why kNN-LM beats the LM?

For every scored token, Eq. 2 finds the hidden state z* whose image under the LM's own frozen last layers is closest to
the kNN-LM's distribution, z* = argmin_z KL[f(z) ‖ p_knnlm] (this direction: Σ f(z) (log f(z) − log p_knnlm)), starting
from the LM's own hidden state. If the last layers could not express p_knnlm, p_proj = f(z*) would score no better than
the LM. Targets:

- ``f_out`` (the paper's f): the output layer alone; z starts at ``final_hidden`` (the input of the output layer, after
  the final norm); p_proj = softmax(W z). The paper's base LM has no norm between its last block and its output layer.
- ``f_norm``: final norm + output layer; z starts at ``block_output`` (residual stream after the last block). The final
  LayerNorm/RMSNorm is scale-invariant, so f_norm can only reach softmax(W u) with u of bounded norm. For a model
  without a final norm f_norm and f_out are the same map from the same start.
- ``fg``: z starts at ``ffn_residual`` (residual stream entering the last feed-forward sublayer); p_proj = f_norm(g(z))
  (a pre-norm LM's final norm sits between g and the output layer; nothing else reproduces the LM at z0).
- ``fg_to_y``: as ``fg``, but z maximises log f(g(z))[gold] (Table 4's third column).
- ``f`` (deprecated): the old name of ``f_norm``.

Solver: each position has its own z; all positions of a batch are optimised together with Adam. A position stops by
the paper's rule (one step changes its objective by less than ``tol``), by ``patience`` (that many steps without a new
best) or at ``max_steps``; what it reports is its best iterate (lowest objective seen, z0 included), so no position
ends worse than it started. Several tolerances share one trajectory: each tolerance takes the best iterate up to the
step where *it* stops, so ``--tol 1e-3,1e-4,0`` costs one run to the smallest tolerance's stop.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..corpus import (CorpusArgs, batch_inputs, count_targets, target_positions, target_tokens, tokenize_to_file,
                      windows)
from ..claims import Claim
from ..errors import KnnlmError
from ..fileio import atomic_path, atomic_write_json, read_json
from ..knn import KNNArgs, Retriever, interpolate
from ..report import fmt, histogram, markdown_table
from ..stats import BLOCK_TOKENS, Interval, block_bootstrap_ci

log = logging.getLogger(__name__)

# target -> the key point z starts from
TARGETS = {"f_out": "final_hidden", "f_norm": "block_output", "fg": "ffn_residual", "fg_to_y": "ffn_residual"}
DEPRECATED = {"f": "f_norm"}  # old name -> new name
LABELS = {"f_out": "f → p_knnlm", "f_norm": "f_norm → p_knnlm", "fg": "f∘g → p_knnlm", "fg_to_y": "f∘g → y"}
# what each target's map is, for every table's caption
MAPS = {"f_out": "f = output layer + softmax, z from final_hidden (the paper's f)",
        "f_norm": "f_norm = final norm + output layer + softmax, z from block_output",
        "fg": "f∘g = f_norm(g(z)), g = last feed-forward sublayer with its residual, z from ffn_residual",
        "fg_to_y": "f∘g as above, maximising the gold token's log-probability"}
# which paper column each target is compared with
PAPER_COLUMN = {"f_out": "f", "f_norm": None, "fg": "fg", "fg_to_y": "fg_to_y"}  # the paper has no f_norm
STOP_REASONS = ("tol", "patience", "max_steps")  # codes 0, 1, 2 in per_token.npz

# Chiang et al.: a 16-layer LM on WikiText-103, k = 1024, λ = 0.25, L2
PAPER = {
    "table1": {"setting": "lr 0.1, until ΔKL < 1e-3", "lm": 20.13, "knnlm": 16.92, "f": 16.76, "fg": 16.78},
    "table3": {"f": 0.07, "fg": 0.10},
    "table4": {"setting": "lr 0.001, 100 steps", "lm": 20.13, "knnlm": 16.92, "f": 16.70, "fg": 19.97,
               "fg_to_y": 19.41},
}
_CHECKPOINT_EVERY_S = 60.0


def resolve_targets(names: Sequence[str]) -> list[str]:
    """Maps deprecated target names to their new names (logging a deprecation warning); order kept."""
    out = []
    for t in names:
        if t in DEPRECATED:
            log.warning("--target %s is deprecated: it is %s (%s); the paper's f is f_out (output layer only). "
                        "Running it as %s.", t, DEPRECATED[t], MAPS[DEPRECATED[t]], DEPRECATED[t])
            t = DEPRECATED[t]
        out.append(t)
    return out


@dataclass
class ProjectionArgs:
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for results.json, results.md, per_token.npz, the KL and step histograms (required)."})
    datastore: Optional[str] = field(default=None, metadata={"help": "Datastore folder that defines p_knnlm (built with `knnlm datastore build` from the LM's training set; required)."})
    target: list[str] = field(default_factory=lambda: ["f_out", "fg"], metadata={"help": "What to project through: f_out (the paper's f: output layer only, z from final_hidden), f_norm (final norm + output layer, z from block_output), fg (f_norm∘g, z from ffn_residual), fg_to_y (as fg, maximising the gold token's log-probability); a comma list runs several from one LM/kNN pass. f is a deprecated name of f_norm."})
    learning_rate: float = field(default=0.1, metadata={"help": "Adam learning rate for z (paper: 0.1; Table 4: 0.001).", "deprecated": ("lr",)})
    tol: list[float] = field(default_factory=lambda: [1e-3], metadata={"help": "A position stops when one step changes its objective by less than this (paper: 1e-3); 0 never stops early. A comma list (e.g. 1e-3,1e-4,0) reports each tolerance from one shared trajectory."})
    max_steps: int = field(default=1000, metadata={"help": "Cap on Adam steps per position (Table 4: 100)."})
    patience: int = field(default=0, metadata={"help": "Also stop a position after this many consecutive steps without a new lowest objective (0: off)."})
    batch_size: int = field(default=512, metadata={"help": "Scored positions optimised together (memory grows as batch_size x vocabulary)."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples (over blocks of 256 consecutive positions) for the 95% intervals of perplexities and of the share of kNN's gain."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder for results.json")
        if not self.datastore:
            raise KnnlmError("--datastore: required; p_knnlm needs a datastore (`knnlm datastore build`)")
        bad = [t for t in self.target if t not in TARGETS and t not in DEPRECATED]
        if bad or not self.target:
            raise KnnlmError(f"--target: {','.join(bad) or 'empty'} is not one of {', '.join(TARGETS)}")
        self.target = resolve_targets(self.target)
        if len(set(self.target)) != len(self.target):
            raise KnnlmError(f"--target: {','.join(self.target)} names a target twice (f is f_norm)")
        if not self.learning_rate > 0:
            raise KnnlmError(f"--learning_rate: must be > 0, got {self.learning_rate}")
        if not self.tol or any(not t >= 0 for t in self.tol):
            raise KnnlmError(f"--tol: every tolerance must be >= 0, got {','.join(map(str, self.tol)) or 'none'}")
        if len(set(self.tol)) != len(self.tol):
            raise KnnlmError(f"--tol: {','.join(map(str, self.tol))} names a tolerance twice")
        self.tol = sorted(self.tol, reverse=True)  # largest first: its column stops earliest
        if self.max_steps < 1:
            raise KnnlmError(f"--max_steps: must be >= 1, got {self.max_steps}")
        if self.patience < 0:
            raise KnnlmError(f"--patience: must be >= 0 (0: off), got {self.patience}")
        if self.batch_size < 1:
            raise KnnlmError("--batch_size: must be >= 1")
        if self.n_boot < 1:
            raise KnnlmError(f"--n_boot: must be >= 1, got {self.n_boot}")


# ---------------------------------------------------------------------------------------------------------------- objective
class _KLFromLogits(torch.autograd.Function):
    """KL[softmax(x) ‖ p] per row, with the closed-form gradient q ⊙ (log q − log p − KL).

    The closed form is exactly zero where q = p, so a position that starts at its optimum is not moved by Adam's
    scale-free step (autograd through log_softmax leaves rounding noise there, which Adam would amplify to ±lr).
    """

    @staticmethod
    def forward(ctx, logits, target_logp):  # [n, V] float32, [n, V] -> [n]
        logq = torch.log_softmax(logits, dim=-1)
        q = logq.exp()
        diff = logq - target_logp  # [n, V]
        kl = (q * diff).sum(dim=-1)  # [n]
        ctx.save_for_backward(q, diff, kl)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        q, diff, kl = ctx.saved_tensors
        return grad_kl[:, None] * q * (diff - kl[:, None]), None


def kl_from_logits(logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL[softmax(logits) ‖ exp(target_logp)] = Σ q (log q − log p) per row: [n, V], [n, V] -> [n] float32.

    ``target_logp`` must be finite (p > 0 everywhere), which an interpolation with λ < 1 guarantees.
    """
    return _KLFromLogits.apply(logits.float(), target_logp.float())


# ---------------------------------------------------------------------------------------------------------------- solver
@dataclass
class Solution:
    """Per tolerance j (``tols[j]``) and position i: the best iterate up to the step where that tolerance stopped i."""
    tols: tuple[float, ...]
    z: torch.Tensor  # [T, n, d] float32, best iterate (lowest objective seen, z0 included)
    objective: torch.Tensor  # [T, n] at z
    objective_init: torch.Tensor  # [n] at z0
    steps: torch.Tensor  # [T, n] int64, Adam steps run before the position stopped
    best_step: torch.Tensor  # [T, n] int64, the step that produced z (0: z0 itself)
    stop: torch.Tensor  # [T, n] int8, why it stopped: 0 tol, 1 patience, 2 max_steps (STOP_REASONS)
    z_last: torch.Tensor  # [n, d] the last iterate of the shared trajectory (for checks against torch's Adam)


def _value_and_grad(objective: Callable, z: torch.Tensor, rows: torch.Tensor):
    with torch.enable_grad():
        zr = z[rows].requires_grad_(True)  # [a, d]
        value = objective(zr, rows)  # [a]; rows are independent, so d(sum)/dz_i = d(value_i)/dz_i
        (grad,) = torch.autograd.grad(value.sum(), zr)
    return value.detach(), grad


def solve(objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z0: torch.Tensor, lr: float = 0.1,
          tol: float | Sequence[float] = 1e-3, max_steps: int = 1000, patience: int = 0,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Solution:
    """Minimises ``objective(z[rows], rows) -> [len(rows)]`` for every row of ``z0 [n, d]`` with Adam (torch's update
    rule and defaults), all rows together, each row on its own trajectory.

    Row i stops under tolerance ``tol[j]`` after the first step that changes its objective by less than ``tol[j]`` (the
    paper's rule), after ``patience`` consecutive steps without a new lowest objective (0: off), or at ``max_steps``;
    what it keeps is its best iterate up to then. A row keeps stepping while any tolerance is still running on it.
    """
    tols = (float(tol),) if isinstance(tol, (int, float)) else tuple(float(t) for t in tol)
    z = z0.detach().float().clone()  # [n, d]
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    n, n_tol, dev = z.shape[0], len(tols), z.device
    tol_t = torch.tensor(tols, device=dev)[:, None]  # [T, 1]
    active = torch.arange(n, device=dev)
    value, grad = _value_and_grad(objective, z, active)
    objective_init, current = value.clone(), value.clone()
    best_val, best_z = value.clone(), z.clone()  # [n], [n, d]
    best_t = torch.zeros(n, dtype=torch.long, device=dev)
    since_best = torch.zeros(n, dtype=torch.long, device=dev)
    out_z = z.unsqueeze(0).repeat(n_tol, 1, 1)  # [T, n, d]
    out_obj = value.unsqueeze(0).repeat(n_tol, 1)  # [T, n]
    steps = torch.zeros(n_tol, n, dtype=torch.long, device=dev)
    best_step = torch.zeros(n_tol, n, dtype=torch.long, device=dev)
    stop = torch.full((n_tol, n), 2, dtype=torch.int8, device=dev)
    live = torch.ones(n_tol, n, dtype=torch.bool, device=dev)
    b1, b2 = betas
    t = 0
    while active.numel() and t < max_steps:
        t += 1
        m[active] = b1 * m[active] + (1 - b1) * grad
        v[active] = b2 * v[active] + (1 - b2) * grad * grad
        m_hat, v_hat = m[active] / (1 - b1 ** t), v[active] / (1 - b2 ** t)
        z[active] -= lr * m_hat / (v_hat.sqrt() + eps)
        value, grad = _value_and_grad(objective, z, active)
        delta = (value - current[active]).abs()  # [a] change made by this step (the paper's stopping quantity)
        current[active] = value
        improved = value < best_val[active]  # [a]
        better = active[improved]
        best_val[better], best_z[better], best_t[better] = value[improved], z[better], t
        since_best[active] = torch.where(improved, 0, since_best[active] + 1)
        by_tol = delta[None, :] < tol_t  # [T, a]
        by_patience = since_best[active] >= patience if patience else torch.zeros_like(improved)  # [a]
        ends = live[:, active] & (by_tol | by_patience[None, :] | (t >= max_steps))  # [T, a]
        for j in range(n_tol):
            if not ends[j].any():
                continue
            rows = active[ends[j]]
            out_z[j, rows], out_obj[j, rows] = best_z[rows], best_val[rows]
            steps[j, rows], best_step[j, rows] = t, best_t[rows]
            why = torch.where(by_tol[j], 0, torch.where(by_patience, 1, 2)).to(torch.int8)[ends[j]]
            stop[j, rows] = why
            live[j, rows] = False
        keep = live[:, active].any(dim=0)  # [a]
        active, grad = active[keep], grad[keep]
    return Solution(tols, out_z, out_obj, objective_init, steps, best_step, stop, z)


def logits_fn(lm, target: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """z [n, d] -> logits [n, V] float32 through the LM's frozen last layers (see the module docstring)."""
    if target == "f_out":
        return lambda z: lm.output_layer(z.to(lm.dtype)).float()
    if target == "f_norm":
        return lambda z: lm.f_logits(z.to(lm.dtype)).float()
    if target in ("fg", "fg_to_y"):
        return lambda z: lm.f_logits(lm.g(z.to(lm.dtype))).float()
    raise KnnlmError(f"--target: {target!r} is not one of {', '.join(TARGETS)}")


def project(lm, target: str, z0: torch.Tensor, target_logp: torch.Tensor, gold: torch.Tensor, lr: float,
            tol: float | Sequence[float], max_steps: int, patience: int = 0) -> dict[str, torch.Tensor]:
    """Solves Eq. 2 (or the gold objective for ``fg_to_y``) for a batch of positions.

    z0 [n, d] (on the LM's device), target_logp [n, V] = log p_knnlm, gold [n]. Returns per position (CPU), one column
    per tolerance: ``logp`` [n, T] (log p_proj of the gold token), ``kl`` [n, T] (KL[p_proj ‖ p_knnlm]), ``steps``,
    ``best_step``, ``stop`` [n, T], ``objective`` [n, T]; and ``kl_init`` [n] (at z0).
    """
    fn = logits_fn(lm, target)
    if target == "fg_to_y":
        def objective(z, rows):
            return -torch.log_softmax(fn(z), dim=-1).gather(1, gold[rows, None])[:, 0]
    else:
        def objective(z, rows):
            return kl_from_logits(fn(z), target_logp[rows])
    sol = solve(objective, z0, lr=lr, tol=tol, max_steps=max_steps, patience=patience)
    logps, kls = [], []
    with torch.no_grad():
        for j in range(len(sol.tols)):
            logits = fn(sol.z[j])  # [n, V]
            logps.append(torch.log_softmax(logits, dim=-1).gather(1, gold[:, None])[:, 0])
            kls.append(kl_from_logits(logits, target_logp))
        kl_init = kl_from_logits(fn(z0.float()), target_logp)
    return {"logp": torch.stack(logps, 1).cpu(), "kl": torch.stack(kls, 1).cpu(), "kl_init": kl_init.cpu(),
            "steps": sol.steps.T.cpu(), "best_step": sol.best_step.T.cpu(), "stop": sol.stop.T.cpu(),
            "objective": sol.objective.T.cpu()}


# ---------------------------------------------------------------------------------------------------------------- runner
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
        if self.path.exists() and self.state.exists() and read_json(self.state)["fingerprint"] == fingerprint:
            with np.load(self.path) as saved:
                self.columns = {k: [saved[k]] for k in saved.files}
            self.windows_done = int(read_json(self.state)["windows_done"])
            self.solve_s = dict(read_json(self.state).get("solve_s", {}))
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
            self.save(self.path)
            atomic_write_json(self.state, {"fingerprint": self.fingerprint, "windows_done": self.windows_done,
                                           "solve_s": self.solve_s})
            self.last_save = time.time()

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **self.arrays())

    def finish(self, path: Path) -> dict[str, np.ndarray]:
        self.save(path)
        self.path.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)
        return self.arrays()


def run_projection(lm, corpus: CorpusArgs, args: ProjectionArgs, datastore, knn: Optional[KNNArgs] = None) -> dict:
    """Scores the validation corpus with the LM, the kNN-LM and each target's p_proj; writes ``per_token.npz`` and the
    KL histograms into ``args.output_dir`` and returns the metrics (see :func:`summarize`)."""
    knn = knn or KNNArgs()
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
    retriever = Retriever(datastore, knn)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(lm, corpus, args, knn, datastore)
    records = _Records(out, fingerprint)
    if records.windows_done == 0:  # a fresh run: a token file of another corpus/--max_tokens must not be reused
        for name in ("tokens.i32", "tokens.i32.docs"):
            (out / name).unlink(missing_ok=True)
    tokens = tokenize_to_file(lm, corpus, "validation", out / "tokens.i32")
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
        knn_logp = retriever.log_probs(at[key_point], lm_logp.shape[-1]).to(lm_logp.device)  # [n, V]
        target_logp = interpolate(lm_logp, knn_logp, lmbda)  # [n, V] log p_knnlm
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


# ---------------------------------------------------------------------------------------------------------------- report
def _ppl(logp: np.ndarray) -> float:
    return math.exp(-float(np.mean(logp, dtype=np.float64)))


def _gain_share(m_lm: float, m_other: float, m_ref: float) -> float:
    """(m_other − m_lm) / (m_ref − m_lm) of mean gold log-probabilities: 1 = all of the reference's gain over the LM,
    0 = none; nan where the reference gains nothing (undefined: its claim is inconclusive)."""
    return (m_other - m_lm) / (m_ref - m_lm) if m_ref != m_lm else float("nan")


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x, dtype=np.float64))


def share_of_gain(lm: np.ndarray, knnlm: np.ndarray, proj: np.ndarray) -> float:
    """(log ppl_lm − log ppl_proj) / (log ppl_lm − log ppl_knnlm) from per-token gold log-probabilities [n] each:
    1 = p_proj gains all that kNN gains over the LM, 0 = nothing."""
    return _gain_share(_mean(lm), _mean(proj), _mean(knnlm))


def gain_ratio(lm: np.ndarray, f: np.ndarray, fg: np.ndarray) -> float:
    """(log ppl_lm − log ppl_fg) / (log ppl_lm − log ppl_f): f∘g's gain over the LM as a share of f's (Table 4)."""
    return _gain_share(_mean(lm), _mean(fg), _mean(f))


def _step_histogram(steps: np.ndarray, max_steps: int) -> list[list[int]]:
    """[[lo, hi, count], ...] over bins 1, 2-5, 6-10, 11-20, 21-50, ... up to max_steps (empty bins kept)."""
    edges = [0, 1]
    for decade in (1, 10, 100, 1000, 10000, 100000):
        for mult in (5, 10, 20) if decade == 1 else (2, 5, 10):
            edge = mult * decade
            if edge > edges[-1] and edge < max_steps:
                edges.append(edge)
    edges.append(max(max_steps, edges[-1] + 1))
    counts, _ = np.histogram(steps, bins=np.array(edges) + 0.5)
    return [[edges[i] + 1, edges[i + 1], int(c)] for i, c in enumerate(counts)]


def summarize(arrays: dict[str, np.ndarray], args: ProjectionArgs, **extra) -> dict:
    """Perplexities (with bootstrap 95% intervals over positions) of the LM, the kNN-LM and each p_proj over the same
    tokens, the share of kNN's gain each p_proj recovers, KL and solver statistics; per tolerance in ``by_tol``
    (``targets`` repeats the first tolerance's entry)."""
    lm, knn = arrays["lm"].astype(np.float64), arrays["knnlm"].astype(np.float64)

    def ci(arrays_, stat) -> dict:  # over blocks of consecutive positions, as the memory study's share
        return block_bootstrap_ci(arrays_, stat, BLOCK_TOKENS, n_boot=args.n_boot, seed=args.seed).as_dict()

    def ppl_ci(logp):
        return ci([logp], lambda m: math.exp(-m))

    metrics = {"n_tokens": int(len(arrays["gold"])), "ppl_lm": _ppl(lm), "ppl_knnlm": _ppl(knn),
               "ppl_lm_ci": ppl_ci(lm), "ppl_knnlm_ci": ppl_ci(knn),
               "kl_lm_knnlm": {"mean": float(np.mean(arrays["kl_lm"])), "median": float(np.median(arrays["kl_lm"]))},
               "solver": {"lr": args.learning_rate, "tols": list(args.tol), "max_steps": args.max_steps,
                          "patience": args.patience, "n_boot": args.n_boot, "seed": args.seed},
               "maps": {t: MAPS[t] for t in args.target}, **extra, "by_tol": []}
    for j, tol in enumerate(args.tol):
        entry = {"tol": tol, "targets": {}}
        for t in args.target:
            logp = arrays[f"{t}.logp"][:, j].astype(np.float64)
            kl, kl_init = arrays[f"{t}.kl"][:, j], arrays[f"{t}.kl_init"]
            steps, stop = arrays[f"{t}.steps"][:, j], arrays[f"{t}.stop"][:, j]
            share = ci([lm, knn, logp], lambda a, b, c: _gain_share(a, c, b))
            best_step = arrays[f"{t}.best_step"][:, j]
            entry["targets"][t] = {
                "z0": TARGETS[t], "map": MAPS[t], "ppl_proj": _ppl(logp), "ppl_proj_ci": ppl_ci(logp),
                "share_of_knn_gain": share["point"], "share_of_knn_gain_ci": share,
                "kl_mean": float(np.mean(kl)), "kl_median": float(np.median(kl)),
                "kl_init_mean": float(np.mean(kl_init)), "kl_init_median": float(np.median(kl_init)),
                # the best iterate includes z0, so this is 0 for the KL targets (fg_to_y minimises another objective)
                "worse_than_start_fraction": float(np.mean(kl > kl_init)) if t != "fg_to_y" else None,
                "steps_mean": float(np.mean(steps)), "steps_median": float(np.median(steps)),
                "steps_max": int(steps.max()), "best_step_median": float(np.median(best_step)),
                # stopped by the cap with the best iterate at the last step: still improving, the solution unfinished
                "still_improving_fraction": float(np.mean((stop == 2) & (best_step == steps))),
                "stopped_by": {r: int(np.sum(stop == i)) for i, r in enumerate(STOP_REASONS)},
                "capped_fraction": float(np.mean(stop == 2)),
                "steps_histogram": _step_histogram(steps, args.max_steps),
                "lr": args.learning_rate, "tol": tol, "max_steps": args.max_steps, "patience": args.patience}
        if "fg" in args.target:  # Table 4: f∘g's gain over the LM as a share of each f's
            fg = arrays["fg.logp"][:, j].astype(np.float64)
            entry["fg_gain_over_f_gain"] = {f: ci([lm, arrays[f"{f}.logp"][:, j], fg], lambda a, b, c: _gain_share(a, c, b))
                                            for f in ("f_out", "f_norm") if f in args.target}
        metrics["by_tol"].append(entry)
    metrics["targets"] = metrics["by_tol"][0]["targets"]
    metrics["paper"] = PAPER
    return metrics


def _ci(d: dict, digits: int = 2) -> str:
    return f"{d['point']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def results_table(metrics: dict) -> str:
    """Markdown: for each tolerance, perplexity in the layout of Tables 1 and 4 (with 95% intervals and the share of
    kNN's gain), KL in the layout of Table 3, and the solver's statistics; every table names its maps."""
    sv = metrics["solver"]
    targets = list(metrics["maps"])
    maps = "".join(f"- **{LABELS[t]}**: {metrics['maps'][t]}\n" for t in targets)
    text = (f"Maps (`--target`):\n\n{maps}\nSolver: Adam, lr {sv['lr']}, ≤ {sv['max_steps']} steps, patience "
            f"{sv['patience'] or 'off'}; each position keeps its best iterate (z0 included). "
            f"{metrics['n_tokens']} tokens; intervals: bootstrap 95% over positions ({sv['n_boot']} resamples, seed "
            f"{sv['seed']}); share = (log ppl_lm − log ppl_proj) / (log ppl_lm − log ppl_knnlm).\n")
    heads = ["run", "LM", "kNN-LM"] + [LABELS[t] for t in targets]
    paper_rows = [[f"paper Table {n[-1]} ({PAPER[n]['setting']})", PAPER[n]["lm"], PAPER[n]["knnlm"]]
                  + [PAPER[n].get(PAPER_COLUMN[t]) for t in targets] for n in ("table1", "table4")]
    for entry in metrics["by_tol"]:
        tg, tol = entry["targets"], entry["tol"]
        ours = [f"ours (tol {tol:g})", _ci(metrics["ppl_lm_ci"]), _ci(metrics["ppl_knnlm_ci"])]
        rows = paper_rows + [ours + [_ci(tg[t]["ppl_proj_ci"]) for t in targets],
                             ["share of kNN's gain", "0", "1"] + [_ci(tg[t]["share_of_knn_gain_ci"]) for t in targets]]
        text += (f"\n## Tolerance {tol:g}\n\n### Perplexity (layout of Tables 1 and 4; f as listed above)\n\n"
                 + markdown_table(heads, rows))
        kl_rows = [["paper Table 3 (mean)"] + [PAPER["table3"].get(PAPER_COLUMN[t]) for t in targets],
                   ["ours, mean"] + [tg[t]["kl_mean"] for t in targets],
                   ["ours, median"] + [tg[t]["kl_median"] for t in targets],
                   ["ours at z0 (before solving), mean"] + [tg[t]["kl_init_mean"] for t in targets],
                   ["ours at z0, median"] + [tg[t]["kl_init_median"] for t in targets]]
        text += (f"\n### KL[p_proj ‖ p_knnlm] in nats (layout of Table 3), tol {tol:g}\n\n"
                 + markdown_table(["run"] + [LABELS[t] for t in targets], kl_rows, digits=4))
        step_rows = [[LABELS[t], tg[t]["stopped_by"]["tol"], tg[t]["stopped_by"]["patience"],
                      tg[t]["stopped_by"]["max_steps"], tg[t]["steps_mean"], tg[t]["steps_median"], tg[t]["steps_max"],
                      tg[t]["best_step_median"],
                      "–" if tg[t]["worse_than_start_fraction"] is None else 100 * tg[t]["worse_than_start_fraction"]]
                     for t in targets]
        text += (f"\n### Solver, tol {tol:g}\n\n"
                 + markdown_table(["target", "stopped by tol", "by patience", "by max_steps", "steps mean",
                                   "median", "max", "best step median", "% ending worse than z0"], step_rows, digits=1))
        bins = tg[targets[0]]["steps_histogram"]
        hist_rows = [[f"{lo}" if lo == hi else f"{lo}–{hi}"] + [
            next(c for a, b, c in tg[t]["steps_histogram"] if a == lo) for t in targets] for lo, hi, _ in bins]
        text += (f"\nSteps per position (histogram; PNGs `steps_<target>_tol{tol:g}.png`):\n\n"
                 + markdown_table(["steps"] + [LABELS[t] for t in targets], hist_rows))
    text += (f"\nKL[p_lm ‖ p_knnlm]: mean {fmt(metrics['kl_lm_knnlm']['mean'], 4)}, "
             f"median {fmt(metrics['kl_lm_knnlm']['median'], 4)}. k = {metrics.get('k')}, λ = {metrics.get('lmbda')} "
             f"(weight of p_knn), T = {metrics.get('knn_temp')}, datastore N = {metrics.get('datastore_N')}.\n")
    timing = metrics.get("timing")
    if timing:
        text += (f"Wall time {timing['wall_s']:.0f} s; solver: "
                 + ", ".join(f"{LABELS[t]} {s:.0f} s" for t, s in timing.get("solve_s", {}).items()) + ".\n")
    return text


# ---------------------------------------------------------------------------------------------------------------- claims
# The paper's criteria, fixed before any run:
#  Tables 1/3: f(z*) "reaches the kNN-LM's perplexity": the 95% interval of the share of kNN's gain lies above 0.9.
#  Table 4:    at lr 0.001 for 100 steps f∘g gains less than half of what f gains: the 95% interval of
#              (log ppl_lm − log ppl_fg) / (log ppl_lm − log ppl_f) lies below 0.5. f∘g is f_norm∘g, so f_norm is the
#              like-for-like f; the paper's f (f_out, no norm) is reported beside it.
#  A Table 1 solution is unfinished when more than NOT_CONVERGED_SHARE of its positions hit --max_steps still improving:
#  its share is then a lower bound of the converged one (claims.Claim.lower_bound).
SHARE_THRESHOLD, RATIO_THRESHOLD, NOT_CONVERGED_SHARE = 0.9, 0.5, 0.05
CLAIM_NAMES = {"f_out": "f(z*) reaches the kNN-LM's perplexity (Table 1; f = output layer, the paper's f)",
               "f_norm": "f_norm(z*) reaches the kNN-LM's perplexity (Table 1; final norm + output layer)",
               "fg": "f∘g(z*) reaches the kNN-LM's perplexity (Table 1)"}
TABLE4_CLAIM = "with a small learning rate f∘g gains less than half of what f gains (Table 4)"


def _still_improving(v: dict, max_steps: int) -> Optional[float]:
    """The share of positions still improving at the cap; for a run that predates the count, at least half when the
    median best step is the cap, else unknown (None)."""
    if "still_improving_fraction" in v:
        return v["still_improving_fraction"]
    return 0.5 if v.get("best_step_median", 0) >= max_steps else None


def table1_claims(metrics: dict, label: str) -> list[Claim]:
    """Per tolerance and KL target: does p_proj reach the kNN-LM (share of kNN's gain above 0.9)?"""
    out = []
    for entry in metrics["by_tol"]:
        for t in ("f_out", "f_norm", "fg"):
            v = entry["targets"].get(t)
            if v is None:
                continue
            share = _still_improving(v, v.get("max_steps", metrics["solver"]["max_steps"]))
            unfinished = "" if share is None or share <= NOT_CONVERGED_SHARE else (
                f"not converged: {share:.0%} of positions still improving at step {v['max_steps']}")
            out.append(Claim(CLAIM_NAMES[t], f"{label}, tol {entry['tol']:g}", "share of kNN's gain",
                             Interval.from_dict(v["share_of_knn_gain_ci"]), SHARE_THRESHOLD, "above",
                             lower_bound=unfinished))
    return out


def table4_claims(metrics: dict, label: str) -> list[Claim]:
    """f∘g's gain as a share of f_norm's (like with like) and of f_out's (the paper's f), first tolerance."""
    ratios = metrics["by_tol"][0].get("fg_gain_over_f_gain", {})
    names = {"f_norm": "vs f_norm (like with like)", "f_out": "vs f_out (the paper's f)"}
    return [Claim(TABLE4_CLAIM, f"{label}, {names[f]}", "f∘g gain / f gain (log ppl)", Interval.from_dict(ratios[f]),
                  RATIO_THRESHOLD, "below") for f in ("f_norm", "f_out") if f in ratios]


# ---------------------------------------------------------------------------------------------------------------- report
# knnlm reproduce's tables: (title, headers, the paper's rows). f = the paper's f (f_out); f_norm = final norm + output
# layer; f∘g = f_norm∘g (docs/projection.md).
_GAIN_RATIO = math.log(PAPER["table4"]["lm"] / PAPER["table4"]["fg"]) / math.log(PAPER["table4"]["lm"] / PAPER["table4"]["f"])
TABLES = {
    "table1": ("Table 1 — perplexity of p_proj (Eq. 2, lr 0.1), 95% block-bootstrap intervals, by stopping tolerance",
               ["model", "tol", "LM", "kNN-LM", "f → p_knnlm", "f_norm → p_knnlm", "f∘g → p_knnlm",
                "still improving at the cap (f, f_norm, f∘g)"],
               [["paper (16-layer WT-103 LM)", "", PAPER["table1"]["lm"], PAPER["table1"]["knnlm"],
                 PAPER["table1"]["f"], "–", PAPER["table1"]["fg"], ""]]),
    "table3": ("Table 3 — mean KL[p_proj ‖ p_knnlm], by stopping tolerance", ["model", "tol", "f", "f_norm", "f∘g"],
               [["paper", "", PAPER["table3"]["f"], "–", PAPER["table3"]["fg"]]]),
    "table4": ("Table 4 — projection with lr 0.001, 100 steps (f = output layer only; f∘g = f_norm∘g, so f_norm is "
               "the like-for-like f)",
               ["model", "LM", "kNN-LM", "f", "f_norm", "f∘g", "f∘g → y", "f∘g gain / f_norm gain",
                "f∘g gain / f gain"],
               [["paper", PAPER["table4"]["lm"], PAPER["table4"]["knnlm"], PAPER["table4"]["f"], "–",
                 PAPER["table4"]["fg"], PAPER["table4"]["fg_to_y"], "–", f"{_GAIN_RATIO:.2f}"]]),
}


def _ppl_cell(v: Optional[dict]) -> Optional[str]:
    return None if not v else Interval.from_dict(v["ppl_proj_ci"]).fmt()


def table1_rows(metrics: dict, entry: dict, out: Path) -> dict[str, list]:
    """Tables 1 and 3: one row per tolerance."""
    lm, knn = Interval.from_dict(metrics["ppl_lm_ci"]).fmt(), Interval.from_dict(metrics["ppl_knnlm_ci"]).fmt()
    rows1, rows3 = [], []
    for e in metrics["by_tol"]:
        tg = {t: e["targets"].get(t) for t in ("f_out", "f_norm", "fg")}
        cells = [None if v is None else f"{_ppl_cell(v)}; share {v['share_of_knn_gain']:.2f}" for v in tg.values()]
        improving = ", ".join("–" if v is None or "still_improving_fraction" not in v else
                              f"{v['still_improving_fraction']:.0%}" for v in tg.values())
        rows1.append([entry["label"], f"{e['tol']:g}", lm, knn, *cells, improving])
        rows3.append([entry["label"], f"{e['tol']:g}"] + [None if v is None else v["kl_mean"] for v in tg.values()])
    return {"table1": rows1, "table3": rows3}


def table4_rows(metrics: dict, entry: dict, out: Path) -> dict[str, list]:
    e = metrics["by_tol"][0]
    ratios = e.get("fg_gain_over_f_gain", {})
    return {"table4": [[entry["label"], metrics["ppl_lm"], metrics["ppl_knnlm"]]
                       + [_ppl_cell(e["targets"].get(t)) for t in ("f_out", "f_norm", "fg", "fg_to_y")]
                       + [Interval.from_dict(ratios[f]).fmt() if f in ratios else None for f in ("f_norm", "f_out")]]}

