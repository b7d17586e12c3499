"""The shared training loop for causal LMs: AdamW + warm-up/decay, gradient accumulation, accelerate, exact resume.

``train(model, batches, args, ckpt_dir)`` runs ``args`` (a :class:`TrainArgs`) over the micro-batches that
``batches(epoch, seed)`` yields, evaluates at step 0, every ``eval_every`` steps and at the end, and checkpoints into
``ckpt_dir``. The data order must be a pure function of ``(seed, epoch)``: a rerun with the same ``ckpt_dir`` skips the
micro-batches already consumed and continues, giving (on CPU) bit-identical weights and history to an uninterrupted run.

Checkpoint layout (``ckpt_dir``): ``latest.json`` (pointer, written last) -> ``step-<N>/state.pt`` (trainable
parameters and persistent buffers, optimizer, scheduler, counters, eval history, the args) and ``step-<N>/rng-<rank>.pt``
(torch/CUDA/numpy/python RNG states of each process). Only parameters with ``requires_grad`` are stored: for a PEFT model
that is the adapter, so a resume must rebuild the same frozen base model before calling ``train`` again.

Early stopping (``--early_stopping_patience``, off by default): after each evaluation the monitored loss (a mean NLL,
``val_loss`` unless the caller names another) is compared with the best so far; an evaluation whose perplexity is not
at least ``--early_stopping_min_delta`` (relative) below the best perplexity counts against the patience, and when
``patience`` evaluations in a row have done so the run stops. The lowest loss seen is the best iterate: its trainable
tensors are kept in ``best.pt`` (atomically, beside the checkpoint) and loaded into the model when the run ends.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional

import numpy as np
import torch

from .corpus import pad_right
from .errors import KnnlmError, require_finite, require_seed
from .fileio import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

Batches = Callable[[int, int], Iterable[dict]]  # (epoch, seed) -> micro-batches {input_ids, attention_mask, labels};
# an epoch may offer start_at(i) -> its micro-batches from the i-th on, for a cheap resume (_my_share)
OnEval = Callable[[int, torch.nn.Module], dict]  # (step, model) -> metrics recorded in the history
OnStep = Callable[[int, float, list], None]  # (step, mean loss of the step, its micro-batches) after each optimizer step
LrSchedule = Callable[[int], float]  # optimizer step k (1-based) -> its learning rate
LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, micro-batch) -> loss SUMMED over its labels != -100
_MODEL_KEYS = ("input_ids", "attention_mask", "labels")
_LATEST = "latest.json"
_BEST = "best.pt"  # early stopping: the best evaluation's trainable tensors
_EARLY_STOPPING = ("early_stopping_patience", "early_stopping_min_delta")


@dataclass
class TrainArgs:
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of AdamW (the paper: 1e-5 for fine-tuning; from-scratch models want ~1e-3)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of the optimizer steps spent warming the learning rate up linearly from 0."})
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup"] = field(default="linear", metadata={"help": "Learning-rate decay after warm-up (transformers.get_scheduler): linear to 0 at the last step, cosine to 0, or constant."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per micro-batch on each process (the caller's batches() decides; recorded here for the config)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step (per process), weighted by their tokens: one batch of batch_size x this; global batch = that x processes."})
    epochs: int = field(default=50, metadata={"help": "Passes over the training data (ignored when --max_steps is set)."})
    max_steps: Optional[int] = field(default=None, metadata={"help": "Total optimizer steps; overrides --epochs (the data is re-read epoch after epoch as needed).", "deprecated": ("steps",)})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient L2 norm to this value before each step (0 = no clipping)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay, applied to matrices only (not to biases, norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    seed: int = field(default=42, metadata={"help": "Seeds the data order (batches(epoch, seed)) and dropout."})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bf16 mixed precision (autocast, float32 master weights); unset = on CUDA only, float32 on CPU."})
    log_every: int = field(default=50, metadata={"help": "Log loss, learning rate and gradient norm every N steps."})
    checkpoint_every: Optional[int] = field(default=None, metadata={"help": "Also checkpoint every N steps (evaluation points always checkpoint)."})
    early_stopping_patience: Optional[int] = field(default=None, metadata={"help": "Stop when this many evaluations in a row fail to lower the best validation perplexity by --early_stopping_min_delta; the model kept is the best evaluation's (unset = off: train to the last step)."})
    early_stopping_min_delta: float = field(default=0.0, metadata={"help": "With --early_stopping_patience: the relative drop of validation perplexity below the best so far (0.005 = 0.5%) that counts as an improvement."})

    def validate(self) -> None:
        require_finite("learning_rate", self.learning_rate)
        require_seed("seed", self.seed)
        if not 0 <= self.warmup_ratio < 1:
            raise KnnlmError(f"--warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        for name in ("batch_size", "gradient_accumulation_steps", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1 (or unset), got {getattr(self, name)}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise KnnlmError(f"--early_stopping_patience: must be >= 1 (or unset), got {self.early_stopping_patience}")
        if not 0 <= self.early_stopping_min_delta < 1:
            raise KnnlmError(f"--early_stopping_min_delta: must be in [0, 1), got {self.early_stopping_min_delta}")
        if self.early_stopping_min_delta and self.early_stopping_patience is None:  # read by early stopping alone
            raise KnnlmError("--early_stopping_min_delta: acts only with --early_stopping_patience; pass it, or drop "
                             "--early_stopping_min_delta")
        for name in ("max_grad_norm", "weight_decay", "adam_epsilon"):
            require_finite(name, getattr(self, name), inclusive=True)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.bf16 and not torch.cuda.is_available():
            raise KnnlmError("--bf16: true needs a CUDA GPU; leave it unset for float32 on CPU")

    def use_bf16(self) -> bool:
        return torch.cuda.is_available() if self.bf16 is None else self.bf16

    def resume_key(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it (logging cadence may change)."""
        d = dataclasses.asdict(self)
        for k in ("log_every", "checkpoint_every"):
            d.pop(k)
        if self.early_stopping_patience is None:  # off: the key of every run from before the option
            for k in _EARLY_STOPPING:
                d.pop(k)
        return d


# ---------------------------------------------------------------------------------------------------------------- data helpers
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def collate_causal(seqs: list[list[int]], pad_id: int) -> dict:
    """Right-pads token lists: ``input_ids``/``attention_mask``/``labels`` [B, T], labels -100 on padding only.

    Labels are the inputs (the model shifts them): the loss covers every token of the sentence but the first.
    """
    ids, mask = pad_right(seqs, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------- state
@dataclass
class _State:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    position: int = 0  # micro-batches of the current epoch already consumed (on this process's share)
    history: list = field(default_factory=list)
    loss_sum: float = 0.0  # training loss summed over the steps since the last evaluation
    loss_steps: int = 0
    elapsed_s: float = 0.0  # training wall time (evaluations excluded), summed over sessions
    done: bool = False
    extra: dict = field(default_factory=dict)  # the caller's hook state (train(extra_state=...)), checkpointed with ours
    best_step: Optional[int] = None  # early stopping: the evaluation with the lowest monitored loss so far
    best_value: Optional[float] = None
    bad_evals: int = 0  # evaluations in a row without an improvement of --early_stopping_min_delta
    stopped_early: bool = False


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a resume needs: trainable parameters and persistent buffers (frozen weights are the caller's)."""
    out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    persistent = set(model.state_dict(keep_vars=True))
    out.update({n: b.detach() for n, b in model.named_buffers() if n in persistent})
    return out


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _save_checkpoint(ckpt_dir: Path, accelerator, model, optimizer, scheduler, state: _State, args: TrainArgs) -> None:
    """Writes ``step-<N>/`` under a temp name, renames it, then points ``latest.json`` at it and drops older ones."""
    name = f"step-{state.step}"
    tmp = ckpt_dir / f"{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        payload = {"model": _trainable(accelerator.unwrap_model(model)), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "state": dataclasses.asdict(state),
                   "args": args.resume_key(), "num_processes": accelerator.num_processes}
        torch.save(payload, tmp / "state.pt")
        final = ckpt_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_json(ckpt_dir / _LATEST, {"dir": name, "step": state.step, "done": state.done})
        for old in ckpt_dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(ckpt_dir: Path, accelerator, model, optimizer, scheduler, args: TrainArgs) -> _State | None:
    pointer = ckpt_dir / _LATEST
    if not pointer.is_file():
        return None
    folder = ckpt_dir / json.loads(pointer.read_text())["dir"]
    payload = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    if payload["args"] != args.resume_key():
        changed = sorted(k for k in payload["args"] if payload["args"][k] != args.resume_key().get(k))
        raise KnnlmError(f"checkpoint {ckpt_dir} was written with other training settings ({', '.join(changed)}); "
                         "rerun with the same settings to resume, or use a new output folder")
    if payload["num_processes"] != accelerator.num_processes:
        raise KnnlmError(f"checkpoint {ckpt_dir} was written by {payload['num_processes']} process(es), this run has "
                         f"{accelerator.num_processes}; resume with the same number of processes")
    unwrapped = accelerator.unwrap_model(model)
    targets = _trainable(unwrapped)
    if set(targets) != set(payload["model"]):
        raise KnnlmError(f"checkpoint {ckpt_dir} holds other trainable tensors than this model; "
                         "rebuild the same model (and adapter) or use a new output folder")
    with torch.no_grad():
        for name, t in targets.items():
            t.copy_(payload["model"][name])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    _set_rng_state(torch.load(folder / f"rng-{accelerator.process_index}.pt", map_location="cpu", weights_only=False))
    state = _State(**payload["state"])
    log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", folder, state.step, state.epoch, state.position)
    return state


# ---------------------------------------------------------------------------------------------------------------- early stopping
def _track_best(state: _State, value: float, args: TrainArgs) -> tuple[bool, bool]:
    """Updates the best-so-far of ``state`` with an evaluation's monitored loss ``value`` (a mean NLL); returns
    (new best: its weights are to be kept, the patience has run out).

    Counted as an improvement: a perplexity at least ``min_delta`` (relative) below the best perplexity,
    ``1 - exp(value - best) >= min_delta``; a smaller drop still makes this the best iterate but counts against the
    patience."""
    if not math.isfinite(value):
        raise KnnlmError(f"--early_stopping_patience: the monitored validation loss is {value} at step {state.step}; "
                         "lower --learning_rate or turn early stopping off")
    first = state.best_value is None
    new_best = first or value < state.best_value
    improved = first or (new_best and 1.0 - math.exp(value - state.best_value) >= args.early_stopping_min_delta)
    if new_best:
        state.best_step, state.best_value = state.step, value
    state.bad_evals = 0 if improved else state.bad_evals + 1
    return new_best, state.bad_evals >= args.early_stopping_patience


def _save_best(ckpt_dir: Path, accelerator, model, step: int) -> None:
    """The best iterate's trainable tensors into ``best.pt`` (written whole or not at all)."""
    if accelerator.is_main_process:
        with atomic_path(ckpt_dir / _BEST) as tmp:
            torch.save({"step": step, "model": _trainable(accelerator.unwrap_model(model))}, tmp)
    accelerator.wait_for_everyone()


def _load_best(ckpt_dir: Path, accelerator, model, step: int) -> None:
    payload = torch.load(ckpt_dir / _BEST, map_location="cpu", weights_only=False)
    if payload["step"] != step:  # (a kill between best.pt and the checkpoint is redone identically on resume)
        raise KnnlmError(f"{ckpt_dir / _BEST} holds step {payload['step']}, the run's best is step {step}; "
                         "rerun the same command to resume, or use a new output folder")
    with torch.no_grad():
        for name, t in _trainable(accelerator.unwrap_model(model)).items():
            t.copy_(payload["model"][name])
    log.info("early stopping: kept the weights of step %d (the best evaluation)", step)


# ---------------------------------------------------------------------------------------------------------------- loop
def _optimizer(model: torch.nn.Module, args: TrainArgs, device: str, fused_gpu: bool) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel on the CPU, where torch's default is a loop over the tensors (SmolLM2-135M on 2
    cores: 0.08 s an update against 0.3-0.45 s, a fifth of the step); on a GPU torch's default (foreach), whose numbers
    the GPU records hold, unless ``fused_gpu``. The kernels agree to float rounding, not bit for bit."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise KnnlmError("train: the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if fused_gpu and not all(p.is_cuda for p in params):
        raise KnnlmError("train: the fused AdamW kernel needs the model on a GPU before train() is called")
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             fused=True if fused_gpu or device == "cpu" else None)


class _StepSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets the learning rate of optimizer step k (1-based) to ``fn(k)`` in every group: a schedule given by value, not
    as a factor of the peak (``LambdaLR``), so a study's hand-written formula keeps its exact floats."""

    def __init__(self, optimizer, fn: LrSchedule):
        self.fn = fn
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.fn(self.last_epoch + 1) for _ in self.optimizer.param_groups]  # last_epoch = steps done

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "fn")}


def _my_share(micro: Iterable[dict], rank: int, world: int, per_rank: int | None, position: int = 0) -> Iterator[dict]:
    """This process's micro-batches of an epoch from its ``position``-th on: micro-batch i goes to process i % world;
    every process gets the same count (a ragged tail is dropped).

    A resumed run starts at global micro-batch ``position * world``: through the epoch's own ``start_at(i)`` where it
    has one (the memory's datastore epoch seeks to its chunk instead of reading and shuffling the ones before),
    else by reading past the consumed ones."""
    start = position * world
    if start and hasattr(micro, "start_at"):
        micro = micro.start_at(start)
    else:
        micro = itertools.islice(micro, start, None)
    if world == 1:
        return iter(micro)
    return itertools.islice(itertools.islice(micro, rank, None, world), None if per_rank is None else per_rank - position)


def train(model: torch.nn.Module, batches: Batches, args: TrainArgs, ckpt_dir: str | Path,
          eval_every: int | None = None, on_eval: OnEval | None = None, progress_desc: str = "train",
          on_step: OnStep | None = None, extra_state: dict | None = None, lr_schedule: LrSchedule | None = None,
          device: str = "auto", fused_adamw: bool = False, monitor: str = "val_loss",
          loss_fn: LossFn | None = None, checkpoint_ends: bool = True) -> list[dict]:
    """Trains ``model`` in place (resuming from ``ckpt_dir`` when it holds a checkpoint); returns the eval history.

    The history has one entry per evaluation point (step 0, every ``eval_every`` steps, the last step): ``step``,
    ``epoch``, ``train_loss`` (mean loss over the steps since the previous point; None at step 0), ``lr``, ``elapsed_s``
    (training wall time so far; the only entry not reproduced bit for bit) and whatever ``on_eval(step, model)``
    returns. ``on_eval`` runs on every process under ``torch.no_grad()`` with the unwrapped model in eval mode.
    A finished run is not retrained: the final weights are loaded and the history returned.

    Hooks for a study's own records: ``on_step(step, loss, micro_batches)`` runs after every optimizer step (before
    that step's evaluation); ``extra_state`` is a dict the hooks keep their running values in (JSON-like or tensors):
    it is saved in every checkpoint and restored in place on resume. ``lr_schedule(k)`` gives the learning rate of
    step k (1-based) instead of ``args``' warm-up and decay. ``device="cpu"`` trains on the CPU on a machine with a GPU.
    ``fused_adamw`` takes torch's fused AdamW kernel on a GPU too (the caller has put the model on the GPU already; the
    hurdle study's GPU numbers were recorded with it; other callers keep torch's default there and its numbers). On
    the CPU every run takes the fused kernel (:func:`_optimizer`).
    ``loss_fn(model, micro_batch)`` replaces ``model(**batch).loss`` for a model that is not a causal LM (the MLP
    memory): it returns the loss summed over the micro-batch's labels (those != -100), and a step's loss is then the
    mean over every label of its micro-batches, however unevenly they are split, as for the LM's own loss (each
    micro-batch's mean weighted by its scored tokens, so accumulated micro-batches are one batch of their union; within
    a process: DDP averages the processes' steps). Every tensor of such a micro-batch is moved to the device.

    ``checkpoint_ends`` False: no checkpoint after the step-0 evaluation nor of the finished run, for a caller that
    records a finished run itself and deletes ``ckpt_dir``, and whose evaluations are cheap to repeat (overspec caches
    them by weights): a kill before the first evaluation point then starts again from step 0, one after the last
    step from the last checkpoint, to the same weights (the data order and the seeds are functions of the step). Each
    such checkpoint of a 135M-parameter model and its AdamW state is 1.6 GB written (~3-5 s on a laptop disk).

    With ``args.early_stopping_patience`` set, ``on_eval`` must return ``monitor`` (a mean NLL); each history entry then
    also has ``best_step``, ``evals_without_improvement`` and ``stopped_early`` (True on the entry where the patience ran
    out before the last step), and the model handed back holds the best evaluation's weights (module docstring).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    ckpt_dir = Path(ckpt_dir)
    if eval_every is not None and eval_every < 1:
        raise KnnlmError(f"--eval_every: must be >= 1 (or unset), got {eval_every}")
    # cpu=True where there is no GPU: under torchrun / accelerate launch that selects gloo (else accelerate sees no group)
    accelerator = Accelerator(mixed_precision="bf16" if args.use_bf16() else "no",
                              cpu=device == "cpu" or not torch.cuda.is_available())
    world, rank, accum = accelerator.num_processes, accelerator.process_index, args.gradient_accumulation_steps
    epoch0 = batches(0, args.seed)
    if hasattr(epoch0, "__len__"):
        per_rank = len(epoch0) // world
        if per_rank == 0:
            raise KnnlmError(f"train: the data has {len(epoch0)} micro-batch(es), fewer than the {world} process(es)")
        total = args.max_steps or args.epochs * math.ceil(per_rank / accum)
    elif args.max_steps is not None:
        per_rank, total = None, args.max_steps
    else:
        raise KnnlmError("train: batches(epoch, seed) must return a sized iterable (e.g. a list) unless --max_steps is set")

    optimizer = _optimizer(model, args, accelerator.device.type, fused_adamw)
    if lr_schedule is not None:
        scheduler = _StepSchedule(optimizer, lr_schedule)
    else:
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                                  num_warmup_steps=math.ceil(args.warmup_ratio * total), num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand: once per optimizer step
    state = _load_checkpoint(ckpt_dir, accelerator, model, optimizer, scheduler, args)
    if state is None:
        state = _State(extra=extra_state if extra_state is not None else {})
        torch.manual_seed(args.seed + rank)  # dropout; the data order comes from batches(epoch, seed)
        np.random.seed(args.seed + rank)
        random.seed(args.seed + rank)
    elif extra_state is not None:  # the hooks' values as of the checkpoint, into the caller's dict
        extra_state.clear()
        extra_state.update(state.extra)
        state.extra = extra_state
    early = args.early_stopping_patience is not None
    if state.done:
        return _finish(accelerator, model, state, ckpt_dir if early else None)

    def evaluate() -> None:
        unwrapped = accelerator.unwrap_model(model)
        train_loss = None
        if state.loss_steps:
            mean = torch.tensor(state.loss_sum / state.loss_steps, device=accelerator.device)
            train_loss = float(accelerator.reduce(mean, "mean")) if world > 1 else float(mean)
        entry = {"step": state.step, "epoch": state.epoch, "train_loss": train_loss,
                 "lr": scheduler.get_last_lr()[0], "elapsed_s": round(state.elapsed_s, 3)}
        if on_eval is not None:
            was_training = unwrapped.training
            unwrapped.eval()
            with torch.no_grad():
                entry.update(on_eval(state.step, unwrapped) or {})
            unwrapped.train(was_training)
        if early:
            if monitor not in entry:
                raise KnnlmError(f"--early_stopping_patience: the evaluation records no {monitor!r} to monitor "
                                 f"(it has {', '.join(entry)}); turn early stopping off for this run")
            new_best, exhausted = _track_best(state, float(entry[monitor]), args)
            if new_best:
                _save_best(ckpt_dir, accelerator, model, state.step)
            state.stopped_early = exhausted and state.step < total
            state.done = state.done or state.stopped_early
            entry.update(best_step=state.best_step, evals_without_improvement=state.bad_evals,
                         stopped_early=state.stopped_early)
        state.history.append(entry)
        state.loss_sum, state.loss_steps = 0.0, 0
        log.info("%s step %d: %s", progress_desc, state.step,
                 ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "step"))

    if not state.history:
        evaluate()
        if checkpoint_ends:
            _save_checkpoint(ckpt_dir, accelerator, model, optimizer, scheduler, state, args)

    model.train()
    bar = tqdm(total=total, initial=state.step, desc=progress_desc, disable=None if accelerator.is_main_process else True,
               dynamic_ncols=True)
    window = _Window()
    session_t0 = time.time() - state.elapsed_s
    while state.step < total and not state.done:
        micro = _my_share(batches(state.epoch, args.seed), rank, world, per_rank, state.position)
        end_of_epoch = False
        while state.step < total and not end_of_epoch and not state.done:
            group = list(itertools.islice(micro, accum))
            if not group:  # an unsized epoch ran out exactly at a step boundary
                if state.position == 0:
                    raise KnnlmError(f"train: batches(epoch={state.epoch}, seed={args.seed}) yielded no micro-batch")
                state.epoch, state.position = state.epoch + 1, 0
                break
            loss, tokens, grad_norm = _step(accelerator, model, optimizer, scheduler, group, args, loss_fn)
            state.step += 1
            state.position += len(group)
            state.loss_sum += loss
            state.loss_steps += 1
            state.elapsed_s = time.time() - session_t0
            end_of_epoch = len(group) < accum or (per_rank is not None and state.position >= per_rank)
            if end_of_epoch:
                state.epoch, state.position = state.epoch + 1, 0
            if on_step is not None:
                on_step(state.step, loss, group)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            window.add(loss, tokens)
            if state.step % args.log_every == 0:
                log.info("%s step %d/%d: %s, lr %.3e, grad norm %s", progress_desc, state.step, total, window.pop(),
                         scheduler.get_last_lr()[0], "–" if grad_norm is None else f"{grad_norm:.3f}")
            is_eval = state.step == total or (eval_every is not None and state.step % eval_every == 0)
            if is_eval:
                state.done = state.step == total
                eval_t0 = time.time()
                evaluate()
                session_t0 += time.time() - eval_t0  # evaluations do not count as training time
            due = is_eval or (args.checkpoint_every and state.step % args.checkpoint_every == 0)
            if due and (checkpoint_ends or not state.done):
                _save_checkpoint(ckpt_dir, accelerator, model, optimizer, scheduler, state, args)
    bar.close()
    if state.stopped_early:
        log.info("%s: early stopping at step %d: %d evaluation(s) without a %.3g relative improvement; best step %d",
                 progress_desc, state.step, state.bad_evals, args.early_stopping_min_delta, state.best_step)
    return _finish(accelerator, model, state, ckpt_dir if early else None)


def _step(accelerator, model, optimizer, scheduler, group: list[dict], args: TrainArgs,
          loss_fn: LossFn | None = None) -> tuple[float, int, float | None]:
    """One optimizer step over ``group`` (this process's micro-batches): -> (the step's mean loss, its scored tokens,
    gradient norm before clipping), both over every process. Every label of the step weighs the same."""
    # every label of the step weighs the same: the LM's loss predicts token t+1 at t, so its labels are shifted
    counts = [int(((b["labels"] if loss_fn is not None else b["labels"][:, 1:]) != -100).sum()) for b in group]
    world = accelerator.num_processes
    n = sum(counts)
    if world > 1:  # DDP averages the processes' gradients, so each weighs its labels by world / (the step's labels)
        n = int(accelerator.reduce(torch.tensor(n, device=accelerator.device), "sum"))
    step_loss, loss_sum = 0.0, 0.0  # loss_sum: this process's summed token losses
    for i, batch in enumerate(group):
        batch = {k: batch[k].to(accelerator.device) for k in (_MODEL_KEYS if loss_fn is None else batch)}
        sync = i == len(group) - 1  # DDP all-reduces gradients on the last micro-batch only
        # enable_grad: a caller may train from inside another loop's evaluation (no_grad), as overspec's memories do
        with torch.enable_grad(), contextlib.nullcontext() if sync else accelerator.no_sync(model):
            if loss_fn is None:
                loss = model(**batch).loss  # mean token cross-entropy (labels -100 excluded); autocast from prepare()
                share = counts[i] * world / max(n, 1)  # 1.0 for one micro-batch in one process: exact
                accelerator.backward(loss * share)
                step_loss += float(loss.detach()) * share
                loss_sum += float(loss.detach()) * counts[i]
            else:
                loss = loss_fn(model, batch)  # summed over this micro-batch's labels
                accelerator.backward(loss / (n / world))
                loss_sum += float(loss.detach())
    if loss_fn is not None:
        step_loss = loss_sum / (n / world)
    if world > 1:  # every process logs the step's mean loss over all of its labels
        step_loss = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum")) / max(n, 1)
    grad_norm = None
    if args.max_grad_norm:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
    optimizer.step()
    # the fused kernel updates the weights in place without bumping their version counters, on which caches of the
    # weights' hash key (LM.weights_hash)
    torch.autograd.graph.increment_version([p for g in optimizer.param_groups for p in g["params"]])
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, n, grad_norm


class _Window:
    """Loss and throughput over the steps since the last log line."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.t0 = 0.0, 0, 0, time.time()

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens

    def pop(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        text = f"loss {self.loss / max(self.steps, 1):.4f}, {self.tokens / dt:.0f} tokens/s"
        self.__init__()
        return text


def _finish(accelerator, model, state: _State, best_dir: Optional[Path] = None) -> list[dict]:
    """The model in eval mode (with ``best_dir``: the best evaluation's weights loaded); the history."""
    if best_dir is not None:
        _load_best(best_dir, accelerator, model, state.best_step)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    accelerator.free_memory()
    return state.history


