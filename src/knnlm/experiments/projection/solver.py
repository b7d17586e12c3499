"""The projection's objective (KL with a closed-form gradient) and its solver: one Adam trajectory per position, all
positions of a batch together, several tolerances from one trajectory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...errors import KnnlmError
from .settings import TARGETS


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
            stop[j, rows] = torch.where(by_tol[j], 0, torch.where(by_patience, 1, 2)).to(torch.int8)[ends[j]]
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
