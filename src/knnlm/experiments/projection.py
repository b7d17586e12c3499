"""Projection study (Chiang et al. §3, Appendices A.2 and E): is the softmax bottleneck why kNN-LM beats the LM?

For every scored token, Eq. 2 finds the hidden state z* whose image under the LM's own frozen last layers is closest to
the kNN-LM's distribution, z* = argmin_z KL[f(z) ‖ p_knnlm] (this direction: Σ f(z) (log f(z) − log p_knnlm)), starting
from the LM's own hidden state. If the last layers could not express p_knnlm, p_proj = f(z*) would score no better than
the LM. Targets:

- ``f``: z starts at ``block_output`` (residual stream after the last block); p_proj = f(z) (final norm, output layer).
- ``fg``: z starts at ``ffn_residual`` (residual stream entering the last feed-forward sublayer); p_proj = f(g(z)).
- ``fg_to_y``: as ``fg``, but z maximises log f(g(z))[gold] (Table 4's third column).

Each position has its own z; all positions of a batch are optimised together with Adam, and each one stops (its z
frozen, its step count recorded) when one step changes its objective by less than ``tol``; ``max_steps`` caps it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..corpus import CorpusArgs, count_targets, tokenize_to_file, windows
from ..datastore import _batch_inputs
from ..errors import KnnlmError
from ..evaluate import _target_positions
from ..fileio import atomic_path, atomic_write_json, read_json
from ..knn import KNNArgs, Retriever, interpolate
from ..report import fmt, histogram, markdown_table

log = logging.getLogger(__name__)

# target -> the key point z starts from
TARGETS = {"f": "block_output", "fg": "ffn_residual", "fg_to_y": "ffn_residual"}
LABELS = {"f": "f → p_knnlm", "fg": "f∘g → p_knnlm", "fg_to_y": "f∘g → y"}

# Chiang et al.: a 16-layer LM on WikiText-103, k = 1024, λ = 0.25, L2
PAPER = {
    "table1": {"setting": "lr 0.1, until ΔKL < 1e-3", "lm": 20.13, "knnlm": 16.92, "f": 16.76, "fg": 16.78},
    "table3": {"f": 0.07, "fg": 0.10},
    "table4": {"setting": "lr 0.001, 100 steps", "lm": 20.13, "knnlm": 16.92, "f": 16.70, "fg": 19.97,
               "fg_to_y": 19.41},
}
_CHECKPOINT_EVERY_S = 60.0


@dataclass
class ProjectionArgs:
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for results.json, results.md, per_token.npz and the KL histograms (required)."})
    datastore: Optional[str] = field(default=None, metadata={"help": "Datastore folder that defines p_knnlm (built with `knnlm datastore build` from the LM's training set; required)."})
    target: list[str] = field(default_factory=lambda: ["f", "fg"], metadata={"help": "What to project through: f (z from block_output, p_proj = f(z)), fg (z from ffn_residual, p_proj = f(g(z))), fg_to_y (as fg, maximising the gold token's log-probability); a comma list runs several from one LM/kNN pass."})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate for z (paper: 0.1; Table 4: 0.001)."})
    tol: float = field(default=1e-3, metadata={"help": "A position stops when one step changes its objective by less than this (paper: 1e-3); 0 runs every position for --max_steps."})
    max_steps: int = field(default=1000, metadata={"help": "Cap on Adam steps per position (Table 4: 100)."})
    batch_size: int = field(default=512, metadata={"help": "Scored positions optimised together (memory grows as batch_size x vocabulary)."})

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder for results.json")
        if not self.datastore:
            raise KnnlmError("--datastore: required; p_knnlm needs a datastore (`knnlm datastore build`)")
        bad = [t for t in self.target if t not in TARGETS]
        if bad or not self.target:
            raise KnnlmError(f"--target: {','.join(bad) or 'empty'} is not one of {', '.join(TARGETS)}")
        if len(set(self.target)) != len(self.target):
            raise KnnlmError(f"--target: {','.join(self.target)} names a target twice")
        if not self.lr > 0:
            raise KnnlmError(f"--lr: must be > 0, got {self.lr}")
        if self.tol < 0:
            raise KnnlmError(f"--tol: must be >= 0, got {self.tol}")
        if self.max_steps < 1:
            raise KnnlmError(f"--max_steps: must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise KnnlmError("--batch_size: must be >= 1")


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
    z: torch.Tensor  # [n, d] float32, each row where its position stopped
    objective: torch.Tensor  # [n] at z
    objective_init: torch.Tensor  # [n] at z0
    steps: torch.Tensor  # [n] int64, Adam steps taken by each position


def _value_and_grad(objective: Callable, z: torch.Tensor, rows: torch.Tensor):
    with torch.enable_grad():
        zr = z[rows].requires_grad_(True)  # [a, d]
        value = objective(zr, rows)  # [a]; rows are independent, so d(sum)/dz_i = d(value_i)/dz_i
        (grad,) = torch.autograd.grad(value.sum(), zr)
    return value.detach(), grad


def solve(objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z0: torch.Tensor, lr: float = 0.1,
          tol: float = 1e-3, max_steps: int = 1000, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8) -> Solution:
    """Minimises ``objective(z[rows], rows) -> [len(rows)]`` for every row of ``z0 [n, d]`` with Adam (torch's update
    rule and defaults), all rows together; row i stops after the first step that changes its objective by less than
    ``tol`` (its z is then frozen and its step count kept), or after ``max_steps``."""
    z = z0.detach().float().clone()  # [n, d]
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    n = z.shape[0]
    steps = torch.zeros(n, dtype=torch.long, device=z.device)
    active = torch.arange(n, device=z.device)
    value, grad = _value_and_grad(objective, z, active)
    objective_init, current = value.clone(), value.clone()
    b1, b2 = betas
    t = 0
    while active.numel() and t < max_steps:
        t += 1
        m[active] = b1 * m[active] + (1 - b1) * grad
        v[active] = b2 * v[active] + (1 - b2) * grad * grad
        m_hat, v_hat = m[active] / (1 - b1 ** t), v[active] / (1 - b2 ** t)
        z[active] -= lr * m_hat / (v_hat.sqrt() + eps)
        steps[active] = t
        value, grad = _value_and_grad(objective, z, active)
        keep = (value - current[active]).abs() >= tol  # [a]
        current[active] = value
        active, grad = active[keep], grad[keep]
    return Solution(z, current, objective_init, steps)


def logits_fn(lm, target: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """z [n, d] -> logits [n, V] float32 through the LM's frozen last layers: f for ``f``, f∘g for ``fg``/``fg_to_y``."""
    if target == "f":
        return lambda z: lm.f_logits(z.to(lm.dtype)).float()
    return lambda z: lm.f_logits(lm.g(z.to(lm.dtype))).float()


def project(lm, target: str, z0: torch.Tensor, target_logp: torch.Tensor, gold: torch.Tensor, lr: float, tol: float,
            max_steps: int) -> dict[str, torch.Tensor]:
    """Solves Eq. 2 (or the gold objective for ``fg_to_y``) for a batch of positions.

    z0 [n, d] (on the LM's device), target_logp [n, V] = log p_knnlm, gold [n]. Returns per position (CPU): ``logp``
    (log p_proj of the gold token), ``kl`` (KL[p_proj ‖ p_knnlm]), ``kl_init`` (at z0), ``steps``, ``objective``.
    """
    fn = logits_fn(lm, target)
    if target == "fg_to_y":
        def objective(z, rows):
            return -torch.log_softmax(fn(z), dim=-1).gather(1, gold[rows, None])[:, 0]
    else:
        def objective(z, rows):
            return kl_from_logits(fn(z), target_logp[rows])
    sol = solve(objective, z0, lr=lr, tol=tol, max_steps=max_steps)
    with torch.no_grad():
        logits = fn(sol.z)  # [n, V]
        logp = torch.log_softmax(logits, dim=-1).gather(1, gold[:, None])[:, 0]
        kl = kl_from_logits(logits, target_logp)
        kl_init = kl_from_logits(fn(z0.float()), target_logp)
    return {"logp": logp.cpu(), "kl": kl.cpu(), "kl_init": kl_init.cpu(), "steps": sol.steps.cpu(),
            "objective": sol.objective.cpu()}


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
        self.last_save = time.time()
        if self.path.exists() and self.state.exists() and read_json(self.state)["fingerprint"] == fingerprint:
            with np.load(self.path) as saved:
                self.columns = {k: [saved[k]] for k in saved.files}
            self.windows_done = int(read_json(self.state)["windows_done"])
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
            atomic_write_json(self.state, {"fingerprint": self.fingerprint, "windows_done": self.windows_done})
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
                    "resolution are lost (most with a small --lr); use --dtype float32 for the datastore and this run",
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
    token_arr, device = tokens.tokens, lm.device
    started = time.time()
    with tqdm(total=count_targets(wins), initial=records.n_tokens, unit="tok", desc="projection") as bar:
        for group in _groups(wins[records.windows_done:], args.batch_size):
            ids, mask = _batch_inputs(tokens, group, lm.eos_token_id or 0)
            rows, pos = _target_positions(group)
            gold = torch.from_numpy(np.concatenate([np.asarray(token_arr[w.first_target: w.end], dtype=np.int64)
                                                    for w in group])).to(device)  # [n]
            with torch.no_grad():
                hidden = lm.hidden_states(ids.to(device), mask.to(device), points)  # {point: [B, T, d]}
                at = {p: h[rows.to(h.device), pos.to(h.device)] for p, h in hidden.items()}  # {point: [n, d]}
            for lo in range(0, len(gold), args.batch_size):
                sl = slice(lo, lo + args.batch_size)
                _score_batch(lm, retriever, datastore.key_point, {p: a[sl] for p, a in at.items()}, gold[sl], lmbda,
                             args, records)
                bar.update(len(gold[sl]))
                bar.set_postfix(steps=float(records.columns[f"{args.target[0]}.steps"][-1].mean()))
            records.windows_done_add(len(group))
    arrays = records.finish(out / "per_token.npz")
    metrics = summarize(arrays, args, lmbda=lmbda, k=retriever.k - int(knn.ignore_top), knn_temp=knn.knn_temp)
    metrics.update(datastore_N=datastore.N, block_size=block, stride=stride,
                   timing={"wall_s": time.time() - started})
    for t in args.target:
        histogram(out / f"kl_{t}.png", arrays[f"{t}.kl"], title=f"KL[p_proj ‖ p_knnlm] per token, {LABELS[t]}",
                  xlabel="KL (nats)", log_x=True)
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
        res = project(lm, t, at[TARGETS[t]], target_logp, gold, args.lr, args.tol, args.max_steps)
        cols.update({f"{t}.{k}": v for k, v in res.items()})
    records.add(**cols)


# ---------------------------------------------------------------------------------------------------------------- report
def _ppl(logp: np.ndarray) -> float:
    return math.exp(-float(np.mean(logp, dtype=np.float64)))


def summarize(arrays: dict[str, np.ndarray], args: ProjectionArgs, **extra) -> dict:
    """Perplexities of the LM, the kNN-LM and each p_proj over the same tokens, KL and step statistics."""
    metrics = {"n_tokens": int(len(arrays["gold"])), "ppl_lm": _ppl(arrays["lm"]), "ppl_knnlm": _ppl(arrays["knnlm"]),
               "kl_lm_knnlm": {"mean": float(np.mean(arrays["kl_lm"])), "median": float(np.median(arrays["kl_lm"]))},
               **extra, "targets": {}}
    for t in args.target:
        steps = arrays[f"{t}.steps"]
        metrics["targets"][t] = {
            "z0": TARGETS[t], "ppl_proj": _ppl(arrays[f"{t}.logp"]),
            "kl_mean": float(np.mean(arrays[f"{t}.kl"])), "kl_median": float(np.median(arrays[f"{t}.kl"])),
            "kl_init_mean": float(np.mean(arrays[f"{t}.kl_init"])),
            "steps_mean": float(np.mean(steps)), "steps_median": float(np.median(steps)), "steps_max": int(steps.max()),
            "capped_fraction": float(np.mean(steps >= args.max_steps)),
            "lr": args.lr, "tol": args.tol, "max_steps": args.max_steps}
    metrics["paper"] = PAPER
    return metrics


def results_table(metrics: dict) -> str:
    """Markdown in the layout of Tables 1 and 4 (perplexity) and Table 3 (KL), the paper's rows beside ours."""
    tg = metrics["targets"]
    any_t = next(iter(tg.values()))
    ours = f"ours ({metrics['n_tokens']} tokens; lr {any_t['lr']}, tol {any_t['tol']}, ≤{any_t['max_steps']} steps)"
    heads = ["run", "LM", "kNN-LM"] + [LABELS[t] for t in TARGETS]
    rows = [[f"paper Table {n[-1]} ({PAPER[n]['setting']})", PAPER[n]["lm"], PAPER[n]["knnlm"]]
            + [PAPER[n].get(t) for t in TARGETS] for n in ("table1", "table4")]
    rows.append([ours, metrics["ppl_lm"], metrics["ppl_knnlm"]] + [tg[t]["ppl_proj"] if t in tg else None for t in TARGETS])
    text = "### Perplexity (layout of Tables 1 and 4)\n\n" + markdown_table(heads, rows)
    kl_rows = [["paper Table 3 (mean)"] + [PAPER["table3"].get(t) for t in TARGETS],
               ["ours, mean"] + [tg[t]["kl_mean"] if t in tg else None for t in TARGETS],
               ["ours, median"] + [tg[t]["kl_median"] if t in tg else None for t in TARGETS],
               ["ours at z0 (before solving), mean"] + [tg[t]["kl_init_mean"] if t in tg else None for t in TARGETS]]
    text += ("\n### KL[p_proj ‖ p_knnlm] in nats (layout of Table 3)\n\n"
             + markdown_table(["run"] + [LABELS[t] for t in TARGETS], kl_rows, digits=4)
             + f"\nKL[p_lm ‖ p_knnlm]: mean {fmt(metrics['kl_lm_knnlm']['mean'], 4)}, "
               f"median {fmt(metrics['kl_lm_knnlm']['median'], 4)}.\n")
    step_rows = [[LABELS[t], tg[t]["steps_mean"], tg[t]["steps_median"], tg[t]["steps_max"],
                  100 * tg[t]["capped_fraction"]] for t in tg]
    text += ("\n### Adam steps per token\n\n"
             + markdown_table(["target", "mean", "median", "max", "% stopped by --max_steps"], step_rows, digits=1))
    text += (f"\nk = {metrics.get('k')}, λ = {metrics.get('lmbda')} (weight of p_knn), T = {metrics.get('knn_temp')}, "
             f"datastore N = {metrics.get('datastore_N')}.\n")
    return text
