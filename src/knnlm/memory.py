"""MLP memory (Chiang et al. §5, Appendix D): a trained network in place of the kNN datastore.

logits = W(z + LN(MLP(z))), with z a datastore key, MLP = Linear(d, h) -> act -> Linear(h, d) (act: the LM's own MLP
activation, ``gelu_new`` for GPT-2), LN a LayerNorm(d) and W the LM's output layer. By default W is the LM's, frozen and
not stored: the memory folder holds only the new parameters and a reference to the model it belongs to.

Layout of a memory folder::

    memory.safetensors  float32 parameters: mlp.0.*, mlp.2.*, ln.* (+ output.* with --train_output_layer)
    memory.json         written last: architecture, model/tokenizer hashes, key point, datastore hash, training record
    train.json          loss curve and throughput;  loss.png  the curve
    checkpoint/         only while training: train.train's checkpoint (model, optimizer, RNG, position) and
                        fingerprint.json (what the weights depend on); removed when training finishes

Training runs on the shared loop (``train.train``: AdamW, no warm-up, no clipping, a resumable checkpoint) with the
memory's own loss, the cross-entropy summed over a micro-batch's pairs: a step's loss is the mean over its pairs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datastore import Datastore, dtype_hint, shared_text
from .errors import KnnlmError, require_finite, require_seed
from .fileio import (atomic_path, atomic_write_json, claim_output_dir, package_versions, read_json, read_record,
                     releases_locks, remove_own_files)
from .train import TrainArgs, _rng_state, _set_rng_state, train

log = logging.getLogger(__name__)

FORMAT = "knnlm-mlp-memory/1"
LR_SCHEDULES = ("constant", "linear", "cosine")
WEIGHTS_FILE, CONFIG_FILE, CHECKPOINT_DIR, TRAIN_LOG = "memory.safetensors", "memory.json", "checkpoint", "train.json"
TRAIN_LOG_FIELDS = ("steps", "first_loss", "final_loss", "loss_curve")  # every train.json has them; overspec keeps them
_FINGERPRINT = "fingerprint.json"  # in CHECKPOINT_DIR: the fingerprint of the training it holds
_OLD_CHECKPOINT = "checkpoint.pt"  # a training killed before memories ran on the shared loop: not resumable, removed


@dataclass
class MemoryArgs:
    datastore: Optional[str] = field(default=None, metadata={"help": "Datastore folder whose key/value pairs the memory learns (required)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder the memory is written to (required)."})
    hidden_size: int = field(default=4096, metadata={"help": "Hidden units of the memory's one-hidden-layer MLP (paper: 4096)."})
    activation: str = field(default="auto", metadata={"help": "MLP activation, a transformers ACT2FN name; auto = the LM's own (gelu_new for GPT-2)."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (paper: 1e-5).", "deprecated": ("lr",)})
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = field(default="constant", metadata={"help": "Learning-rate schedule over all optimiser steps, no warm-up (transformers.get_scheduler): constant (the paper's), linear or cosine decay to 0."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_tokens: int = field(default=9216, metadata={"help": "Key/value pairs per optimiser step (paper: 3x3072)."})
    micro_batch_tokens: int = field(default=1024, metadata={"help": "Pairs per forward/backward; gradients accumulate up to --batch_tokens (bounds the [n, V] logits in memory)."})
    epochs: int = field(default=2, metadata={"help": "Passes over the datastore (paper: 2 for WikiText, 10 for Macondo)."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many optimiser steps (0 = run all epochs)."})
    chunk_keys: int = field(default=131072, metadata={"help": "Keys read from the memmap per shuffled chunk (RAM: chunk_keys x d x 2 bytes)."})
    train_output_layer: bool = field(default=False, metadata={"help": "Train (and store) a copy of the output layer W instead of using the LM's frozen W."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation and of the chunk/row shuffles."})
    checkpoint_every: int = field(default=200, metadata={"help": "Optimiser steps between resumable checkpoints."})
    log_every: int = field(default=10, metadata={"help": "Optimiser steps per point of the recorded loss curve."})
    validation_datastore: Optional[str] = field(default=None, metadata={"help": "A datastore of held-out text built with the same model (knnlm datastore build on the validation file): the memory's loss on it is measured before training and after every epoch, recorded and plotted."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a different memory (or unfinished training) already in --output_dir."})

    def validate(self) -> None:
        if not self.datastore:
            raise KnnlmError("--datastore: required; the datastore folder built with `knnlm datastore build`")
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder the memory is written to")
        for name in ("hidden_size", "batch_tokens", "micro_batch_tokens", "epochs", "chunk_keys", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise KnnlmError(f"--max_steps: must be >= 0 (0 = no limit), got {self.max_steps}")
        require_finite("learning_rate", self.learning_rate)
        require_finite("weight_decay", self.weight_decay, inclusive=True)
        require_seed("seed", self.seed)
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise KnnlmError(f"--lr_scheduler_type: one of {', '.join(LR_SCHEDULES)}, got {self.lr_scheduler_type!r}")


# ---------------------------------------------------------------------------------------------------------------- module
_ACTIVATIONS = {"gelu_new": lambda: nn.GELU(approximate="tanh"), "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
                "gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}


def _activation(name: str) -> nn.Module:
    """torch's own module for the common names (gelu_new = tanh-approximated GELU), else transformers' ACT2FN."""
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]()
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise KnnlmError(f"--activation: {name!r} is not a transformers activation (e.g. gelu_new, gelu, silu, relu)")
    return ACT2FN[name]


def lm_activation(lm) -> str:
    """The activation of the LM's MLPs (config ``activation_function`` (GPT-2, OPT), ``hidden_activation`` (Gemma2/3),
    ``hidden_act`` or ``activation`` (Falcon)); gelu_new when unknown."""
    config = getattr(getattr(lm, "base", lm.model), "config", None)
    names = (getattr(config, key, None) for key in ("activation_function", "hidden_activation", "hidden_act", "activation"))
    name = next((n for n in names if n), None)
    return name if isinstance(name, str) else "gelu_new"


class MLPMemory(nn.Module):
    """logits = W(z + LN(MLP(z))); ``log_probs(z)`` is its log-softmax (float32)."""

    def __init__(self, d: int, hidden_size: int, vocab_size: int, activation: str = "gelu_new",
                 output_layer: Optional[nn.Linear] = None, train_output_layer: bool = False, reference: Optional[dict] = None):
        super().__init__()
        self.d, self.hidden_size, self.vocab_size, self.activation = d, hidden_size, vocab_size, activation
        self.train_output_layer = train_output_layer
        self.reference = dict(reference or {})
        self.dir: Optional[Path] = None
        self.mlp = nn.Sequential(nn.Linear(d, hidden_size), _activation(activation), nn.Linear(hidden_size, d))
        self.ln = nn.LayerNorm(d)
        if train_output_layer:
            bias = output_layer is not None and output_layer.bias is not None
            self.output = nn.Linear(d, vocab_size, bias=bias)  # stored and trained
            if output_layer is not None:
                self.load_output_layer(output_layer)
        else:
            self.output = None
            self._frozen = [output_layer]  # a list, so the LM's W is neither a submodule nor in state_dict

    def load_output_layer(self, layer: nn.Linear) -> None:
        with torch.no_grad():
            self.output.weight.copy_(layer.weight.float())
            if self.output.bias is not None:
                self.output.bias.copy_(layer.bias.float())

    @property
    def key_point(self) -> str:
        return self.reference.get("key_point", "ffn_input")

    def bind(self, output_layer: nn.Linear) -> None:
        """Uses ``output_layer`` (the LM's W, frozen) as W; no-op for a memory with its own trained W."""
        if not self.train_output_layer:
            self._frozen = [output_layer]

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        """z [n, d] -> z + LN(MLP(z)) [n, d]."""
        return z + self.ln(self.mlp(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [n, d] (any float dtype, any device) -> logits [n, V] float32."""
        param = self.ln.weight
        h = self.hidden(z.to(param.device, param.dtype))  # [n, d]
        if self.output is not None:
            return self.output(h).float()
        w = self._frozen[0]
        if w is None:
            raise KnnlmError("MLPMemory: no output layer bound; load it with MLPMemory.load(dir, lm)")
        bias = w.bias.detach() if w.bias is not None else None
        return F.linear(h.to(w.weight.dtype), w.weight.detach(), bias).float()  # [n, V]; no gradient into the LM

    def log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """z [n, d] -> [n, V] float32 log-probabilities of softmax(W(z + LN(MLP(z))))."""
        return torch.log_softmax(self(z), dim=-1)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.state_dict().values())

    def nbytes(self) -> int:
        """Bytes of the stored memory files (safetensors + memory.json); parameter bytes when not saved yet. memory.json
        also holds the training record (its wall time among it), so two runs of one seed differ by a few bytes."""
        if self.dir is None:
            return sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return sum((self.dir / name).stat().st_size for name in (WEIGHTS_FILE, CONFIG_FILE))

    # ------------------------------------------------------------------------------------------------------------ storage
    def config(self) -> dict:
        return {"format": FORMAT, "d": self.d, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "activation": self.activation, "train_output_layer": self.train_output_layer,
                "n_parameters": self.n_parameters(), "dtype": "float32", **self.reference}

    def save(self, out_dir: str | Path, extra: Optional[dict] = None) -> Path:
        """Writes memory.safetensors, then memory.json (last; its presence marks a finished memory), both atomically."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        atomic_write_json(out_dir / CONFIG_FILE, {**self.config(), **(extra or {})})
        self.dir = out_dir
        return out_dir

    @classmethod
    def load(cls, directory: str | Path, lm, key_point: Optional[str] = None) -> "MLPMemory":
        """Loads a memory for ``lm``: refuses one trained on another model, tokenizer or key point; binds W."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / CONFIG_FILE
        if not cfg_path.is_file():
            hint = " (training was started: rerun `knnlm mlp train` to finish it)" if (directory / CHECKPOINT_DIR).exists() else ""
            raise KnnlmError(f"--mlp_memory: {directory} has no {CONFIG_FILE}, so it is not a trained memory{hint}; "
                             "train one with `knnlm mlp train`")
        cfg = read_json(cfg_path)
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            found = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
            raise KnnlmError(f"--mlp_memory: {cfg_path} is not a knnlm MLP memory ({found!r})")
        _check_record(cfg, cfg_path)
        for key, mine, what in (("weights_hash", lm.weights_hash(), "model weights"),
                                ("tokenizer_hash", lm.tokenizer_hash(), "tokenizer")):
            if cfg.get(key) != mine:
                raise KnnlmError(f"--mlp_memory: {directory} was trained for different {what} ({cfg.get('model_name_or_path')}, "
                                 f"{key} {str(cfg.get(key))[:12]} vs {mine[:12]})"
                                 f"{dtype_hint(cfg, lm) if key == 'weights_hash' else ''}; train a memory for this model")
        if key_point is not None and key_point != cfg["key_point"]:
            raise KnnlmError(f"--key_point: the memory {directory} was trained on '{cfg['key_point']}' keys, not '{key_point}'")
        reference = {k: cfg[k] for k in _REFERENCE_KEYS if k in cfg}
        mem = cls(cfg["d"], cfg["hidden_size"], cfg["vocab_size"], cfg["activation"], output_layer=None,
                  train_output_layer=cfg["train_output_layer"], reference=reference)
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise KnnlmError(f"--mlp_memory: {path} is missing; retrain the memory with `knnlm mlp train --overwrite`")
        try:
            mem.load_state_dict(load_file(str(path)))
        except Exception as e:  # a truncated or foreign file
            raise KnnlmError(f"--mlp_memory: {path} cannot be read ({str(e).splitlines()[0]}); retrain the memory "
                             "with `knnlm mlp train --overwrite`") from None
        bad = [name for name, p in mem.state_dict().items() if not torch.isfinite(p).all()]
        if bad:  # every score it gave would be NaN
            raise KnnlmError(f"--mlp_memory: {path} holds non-finite weights (NaN/inf in {bad[0]}); retrain the memory "
                             "with `knnlm mlp train --overwrite` on a sound datastore (`knnlm datastore verify`)")
        mem.bind(lm.output_layer)
        mem.dir = directory
        return mem.to(lm.device).eval()


def _check_record(cfg: dict, cfg_path: Path) -> None:
    """Refuses a memory.json whose architecture fields the memory is built from are missing or of the wrong type (an
    edited or damaged record): they would fail inside torch, or be reported as a flag the command does not have."""
    problem = None
    for key in ("d", "hidden_size", "vocab_size"):
        value = cfg.get(key)
        if type(value) is not int or value < 1:  # (a bool is an int to isinstance)
            problem = f"{key} is {value!r}, not a whole number >= 1" if key in cfg else f"no {key!r}"
            break
    else:
        if type(cfg.get("train_output_layer")) is not bool:
            problem = f"train_output_layer is {cfg.get('train_output_layer')!r}, not true or false"
        elif not isinstance(cfg.get("key_point"), str):
            problem = f"key_point is {cfg.get('key_point')!r}, not a key point name"
        elif not isinstance(cfg.get("activation"), str):
            problem = f"activation is {cfg.get('activation')!r}, not an activation name"
        else:
            try:
                _activation(cfg["activation"])
            except KnnlmError:
                problem = f"activation {cfg['activation']!r} is not a transformers activation"
    if problem:
        raise KnnlmError(f"--mlp_memory: {cfg_path} is not a valid knnlm memory record ({problem}); retrain the "
                         "memory with `knnlm mlp train --overwrite`")


_REFERENCE_KEYS = ("model_name_or_path", "weights_hash", "tokenizer_hash", "key_point", "datastore")


def datastore_reference(ds: Datastore) -> dict:
    """What identifies the datastore a memory was trained on (its meta.json's hash, size and corpus)."""
    meta_bytes = (ds.dir / "meta.json").read_bytes()
    return {"dir": str(ds.dir), "meta_sha256": hashlib.sha256(meta_bytes).hexdigest(), "N": ds.N, "d": ds.d,
            "corpus_hash": ds.meta.get("corpus_hash")}


# ---------------------------------------------------------------------------------------------------------------- data
def epoch_chunks(n: int, chunk_keys: int, seed: int, epoch: int) -> np.ndarray:
    """The chunk order of one epoch: chunk c holds rows [c * chunk_keys, (c + 1) * chunk_keys)."""
    return np.random.default_rng([seed, epoch]).permutation(math.ceil(n / chunk_keys))


def epoch_batches(ds: Datastore, batch_tokens: int, chunk_keys: int, seed: int, epoch: int,
                  start_batch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (keys float16 [b, d], values int32 [b]) batches of one epoch, from ``start_batch`` on.

    The epoch's row order: chunks in a seeded order, rows shuffled within each chunk (seeded by epoch and chunk). Only
    one chunk is in RAM at a time; a batch may span two chunks; the last batch of an epoch may be smaller.
    """
    skip = start_batch * batch_tokens
    keys_parts: list[np.ndarray] = []
    vals_parts: list[np.ndarray] = []
    have = 0
    for c in epoch_chunks(ds.N, chunk_keys, seed, epoch):
        lo, hi = int(c) * chunk_keys, min(ds.N, (int(c) + 1) * chunk_keys)
        if skip >= hi - lo:
            skip -= hi - lo
            continue
        perm = np.random.default_rng([seed, epoch, int(c)]).permutation(hi - lo)[skip:]
        skip = 0
        keys = np.asarray(ds.keys[lo:hi])[perm]  # [m, d] float16, one chunk in RAM
        vals = np.asarray(ds.vals[lo:hi])[perm]  # [m]
        pos = 0
        while pos < len(perm):
            take = min(batch_tokens - have, len(perm) - pos)
            keys_parts.append(keys[pos: pos + take])
            vals_parts.append(vals[pos: pos + take])
            have, pos = have + take, pos + take
            if have == batch_tokens:
                yield np.concatenate(keys_parts), np.concatenate(vals_parts)
                keys_parts, vals_parts, have = [], [], 0
    if have:
        yield np.concatenate(keys_parts), np.concatenate(vals_parts)


# ---------------------------------------------------------------------------------------------------------------- training
_RESULT_FIELDS = ("hidden_size", "activation", "lr", "weight_decay", "batch_tokens", "micro_batch_tokens", "epochs",
                  "max_steps", "chunk_keys", "train_output_layer", "seed")


def _fingerprint(lm, ds: Datastore, args: MemoryArgs, activation: str) -> dict:
    """Everything the trained weights depend on (not the output folder, logging or checkpoint cadence)."""
    # the stored key of --learning_rate stays "lr": memories trained before the rename keep resuming / being found
    training = {k: getattr(args, "learning_rate" if k == "lr" else k) for k in _RESULT_FIELDS}
    training["activation"] = activation
    if args.lr_scheduler_type != "constant":  # absent for constant: memories trained before the option keep matching
        training["lr_scheduler_type"] = args.lr_scheduler_type
    return {"model_name_or_path": lm.name, "weights_hash": lm.weights_hash(), "tokenizer_hash": lm.tokenizer_hash(),
            "key_point": ds.key_point, "datastore": datastore_reference(ds), "training": training}


def _strip(f: dict) -> dict:
    """A fingerprint without where things live: the datastore's folder and the model's path may move (the hashes
    identify them)."""
    return {**{k: v for k, v in f.items() if k != "model_name_or_path"},
            "datastore": {k: v for k, v in f["datastore"].items() if k != "dir"}}


def _same(a: dict, b: dict) -> bool:
    return json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)


# what `knnlm mlp train` writes into its folder (a folder made before the knnlm-run.json marker holds nothing else)
_OWN_FILES = (CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_DIR, TRAIN_LOG, "loss.png", "config.json", "results.json",
              "results.md", _OLD_CHECKPOINT)


def _prepare_dir(out: Path, fp: dict, overwrite: bool) -> Optional[str]:
    """'finished' when ``out`` holds this very memory, 'resume' for its checkpoint, None for a fresh start.

    A folder holding anything but this command's own output (a model, a datastore, another run) is refused."""
    if claim_output_dir(out, "mlp train", _strip(fp), overwrite, own_files=_OWN_FILES,
                        what="MLP memory") == "replace":
        remove_own_files(out, _OWN_FILES)
        return None
    cfg, ckpt = out / CONFIG_FILE, out / CHECKPOINT_DIR / _FINGERPRINT
    existing, state = None, None
    if cfg.exists():
        record = read_json(cfg)
        if not isinstance(record, dict):  # JSON, but not a memory's record: `.get` was an internal AttributeError
            if not overwrite:
                raise KnnlmError(f"--output_dir: {cfg} is damaged (not a JSON object); pass --overwrite to train the "
                                 "memory again")
            remove_own_files(out, (CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_DIR, _OLD_CHECKPOINT, TRAIN_LOG, "loss.png"))
            return None
        existing, state = record.get("fingerprint"), "finished"
    elif ckpt.exists():
        existing, state = read_json(ckpt), "resume"
    if existing is None or _same(existing, fp):
        return state
    if not overwrite:
        raise KnnlmError(f"--output_dir: {out} already holds a different MLP memory ({existing.get('model_name_or_path')}, "
                         f"{existing.get('training')}); pass --overwrite to replace it or choose another folder")
    remove_own_files(out, (CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_DIR, _OLD_CHECKPOINT, TRAIN_LOG, "loss.png"))
    return None


def _check_train_log(out: Path) -> None:
    """Refuses a finished memory whose ``train.json`` is missing, not a JSON object or without its fields: the CLI
    reports from it and overspec reads its loss curve, and neither can rebuild it without training the memory again."""
    path = out / TRAIN_LOG
    if not path.is_file():
        raise KnnlmError(f"{path} is missing")
    read_record(path, required=TRAIN_LOG_FIELDS)


def _micro_per_batch(args: MemoryArgs) -> int:
    """Micro-batches in a full batch of ``batch_tokens`` pairs (every batch but an epoch's last is full)."""
    return math.ceil(args.batch_tokens / args.micro_batch_tokens)


class _EpochPairs:
    """One epoch's micro-batches {keys [m, d] float16, labels [m] int64} in :func:`epoch_batches`' order: each batch of
    ``batch_tokens`` pairs split into micro-batches of ``micro`` (the shared loop groups them back into steps)."""

    def __init__(self, ds: Datastore, args: MemoryArgs, epoch: int):
        self.ds, self.args, self.epoch = ds, args, epoch

    def __len__(self) -> int:
        full, rest = divmod(self.ds.N, self.args.batch_tokens)
        return full * _micro_per_batch(self.args) + math.ceil(rest / self.args.micro_batch_tokens)

    def __iter__(self) -> Iterator[dict]:
        return self.start_at(0)

    def start_at(self, i: int) -> Iterator[dict]:
        """The micro-batches from the ``i``-th on, seeking to its batch's chunk (a resumed run reads no earlier one)."""
        a, micro = self.args, self.args.micro_batch_tokens
        first, skip = divmod(i, _micro_per_batch(a))
        for keys, vals in epoch_batches(self.ds, a.batch_tokens, a.chunk_keys, a.seed, self.epoch, start_batch=first):
            for lo in range(skip * micro, len(vals), micro):
                yield {"keys": torch.from_numpy(keys[lo: lo + micro]),
                       "labels": torch.from_numpy(vals[lo: lo + micro].astype(np.int64))}
            skip = 0


def _pair_loss(mem: MLPMemory, batch: dict) -> torch.Tensor:
    """The cross-entropy of the memory's logits at the stored next tokens, summed over the micro-batch's pairs."""
    return F.cross_entropy(mem(batch["keys"].float()), batch["labels"], reduction="sum")


@torch.no_grad()
def heldout_loss(mem: MLPMemory, ds: Datastore, micro: int, device) -> float:
    """Mean cross-entropy (nats) of the memory's next-token distribution over every (key, value) pair of ``ds``, from
    the project's scoring kernel (``scoring.head_gold_log_probs``, as `knnlm eval` scores the memory)."""
    from .scoring import head_gold_log_probs

    was_training = mem.training
    mem.eval()
    total = 0.0
    for lo in range(0, ds.N, micro):
        z = torch.from_numpy(np.array(ds.keys[lo: lo + micro])).to(device).float()  # [m, d] (a copy: memmaps are read-only)
        y = torch.from_numpy(np.asarray(ds.vals[lo: lo + micro]).astype(np.int64))  # [m]
        total -= float(head_gold_log_probs(mem, z, y).double().sum())
    mem.train(was_training)
    return total / ds.N


def _open_heldout(path: Optional[str], lm, ds: Datastore) -> Optional[Datastore]:
    if not path:
        return None
    flag = "--validation_datastore"
    held = Datastore.open(path, flag=flag)
    held.check_compatible(lm, key_point=ds.key_point, flag=flag, key_point_flag=flag)
    if held.meta.get("corpus_hash") is not None and held.meta.get("corpus_hash") == ds.meta.get("corpus_hash"):
        raise KnnlmError(f"--validation_datastore: {held.dir} was built from the same text as --datastore {ds.dir}; "
                         "build it from held-out text (e.g. the validation file)")
    found, tried, pos = shared_text(held, ds)  # a part of the training text (another file, a prefix) is not held out
    if tried and found * 2 >= tried:
        raise KnnlmError(f"{flag}: {held.dir}'s text is part of --datastore {ds.dir}'s ({found} of {tried} spans of "
                         f"its documents occur verbatim in the training corpus, the first at token {pos}); build it "
                         "from held-out text (e.g. the validation file)")
    return held


@releases_locks
def train_memory(lm, ds, args: MemoryArgs, out_dir: str | Path | None = None) -> MLPMemory:
    """Trains an MLP memory on the datastore's (key, next token) pairs; resumable; returns the finished memory.

    Rerunning a finished training returns the stored memory; rerunning a killed one continues from its last checkpoint
    and ends with the same weights as an uninterrupted run (same device and threads).
    """
    ds = Datastore.open(ds)
    out_dir = out_dir or args.output_dir
    # a Python caller's settings are checked as the CLI's: the folders may come as arguments instead
    dataclasses.replace(args, datastore=str(ds.dir), output_dir=str(out_dir or "")).validate()
    ds.check_compatible(lm)
    out = Path(out_dir)
    activation = lm_activation(lm) if args.activation == "auto" else args.activation
    _activation(activation)
    if ds.d != lm.output_layer.in_features:  # W reads z + LN(MLP(z)): as wide as the keys (not so in OPT-350m's ffn_input)
        raise KnnlmError(f"--datastore: {ds.dir} has d={ds.d} keys but the model's output layer reads "
                         f"{lm.output_layer.in_features}-wide inputs (a project_out, as in OPT-350m); the MLP memory "
                         "adds W after a key-wide residual, so use kNN retrieval (knnlm eval --datastore) for this model")
    fp = _fingerprint(lm, ds, args, activation)
    held = _open_heldout(args.validation_datastore, lm, ds)
    status = _prepare_dir(out, fp, args.overwrite)
    if status == "finished":
        try:
            mem = MLPMemory.load(out, lm)
            _check_train_log(out)
        except KnnlmError as e:  # this very memory, but its weights or its training record are missing or damaged
            damage = str(e).removeprefix("--mlp_memory: ").split("; ")[0]
            if not args.overwrite:
                raise KnnlmError(f"--output_dir: {out} holds this memory but it is damaged ({damage}); rerun with "
                                 "--overwrite to train it again") from None
            log.warning("memory %s is damaged (%s): training it again", out, damage)
            remove_own_files(out, _OWN_FILES)
            status = None
        else:
            log.info("memory %s is already trained", out)
            return mem
    for store in (ds, held):  # a NaN key would make every later loss, and the memory, NaN
        if store is not None:
            store.check_keys_finite()

    # the caller's RNGs, before this memory's seed: a caller mid-training (overspec's evaluation points) keeps its own
    rng = _rng_state()
    torch.manual_seed(args.seed)
    reference = {k: fp[k] for k in _REFERENCE_KEYS}
    mem = MLPMemory(ds.d, args.hidden_size, lm.output_layer.out_features, activation, output_layer=lm.output_layer,
                    train_output_layer=args.train_output_layer, reference=reference).to(lm.device)
    steps_per_epoch = math.ceil(ds.N / args.batch_tokens)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    ckpt = out / CHECKPOINT_DIR
    if status != "resume":
        (out / _OLD_CHECKPOINT).unlink(missing_ok=True)  # that training starts over
        ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ckpt / _FINGERPRINT, fp)
    log.info("training MLP memory: N=%d pairs, d=%d, hidden %d, %d steps of %d pairs, lr %g (%s), W %s", ds.N, ds.d,
             args.hidden_size, total_steps, args.batch_tokens, args.learning_rate, args.lr_scheduler_type,
             "trained copy" if args.train_output_layer else "the LM's, frozen")
    record = {"losses": [], "pairs": 0}  # checkpointed with the loop's own state

    def on_step(step: int, loss: float, group: list[dict]) -> None:
        record["losses"].append(loss)
        record["pairs"] += sum(len(b["labels"]) for b in group)

    def on_eval(step: int, model) -> dict:
        return {} if held is None else {"heldout_loss": heldout_loss(mem, held, args.micro_batch_tokens, lm.device)}

    history = train(mem, lambda epoch, seed: _EpochPairs(ds, args, epoch), _loop_args(args, total_steps), ckpt,
                    eval_every=steps_per_epoch, on_eval=on_eval, on_step=on_step, extra_state=record,
                    progress_desc=f"mlp memory {out.name}", loss_fn=_pair_loss,
                    device="cpu" if torch.device(lm.device).type == "cpu" else "auto")
    _set_rng_state(rng)
    state = {"step": history[-1]["step"], "pairs": record["pairs"], "train_s": history[-1]["elapsed_s"],
             "losses": record["losses"], "heldout": [{"step": h["step"], "epoch": h["step"] / steps_per_epoch,
                                                      "loss": h["heldout_loss"]} for h in history if "heldout_loss" in h]}
    for h in state["heldout"][1:]:
        log.info("epoch %.2f: held-out loss %.4f", h["epoch"], h["loss"])
    record = _training_record(state, args, steps_per_epoch)
    _write_train_log(out, record)
    mem.save(out, extra={"fingerprint": fp, "training": {**fp["training"], **{k: v for k, v in record.items() if k != "loss_curve"}},
                         "versions": package_versions()})
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("memory %s: final loss %.4f, %.0f pairs/s, %d bytes", out, record["final_loss"], record["pairs_per_s"], mem.nbytes())
    return mem


def _loop_args(args: MemoryArgs, total_steps: int) -> TrainArgs:
    """The shared loop's settings for a memory: AdamW at a fixed schedule without warm-up or gradient clipping, one
    step per ``batch_tokens`` pairs, float32 (a CUDA GPU: bf16 autocast, as before the shared loop)."""
    return TrainArgs(learning_rate=args.learning_rate, warmup_ratio=0.0, lr_scheduler_type=args.lr_scheduler_type,
                     batch_size=args.micro_batch_tokens, max_steps=total_steps, max_grad_norm=0.0,
                     gradient_accumulation_steps=_micro_per_batch(args),
                     weight_decay=args.weight_decay, seed=args.seed, log_every=args.checkpoint_every,
                     checkpoint_every=args.checkpoint_every)


# A memory's training loss has plateaued when it drops by at most this share over the last fifth of its curve: the
# criterion fixed before the WikiText-2 memory run (docs/mlp_memory.md); a memory still improving faster than this
# is not judged against kNN (it says what a memory trained this long does, not what a memory can store).
PLATEAU_DROP = 0.01


PLATEAU_UNKNOWN = "the memory's plateau is unknown (no recorded loss curve of at least 5 points)"


def plateau_reason(drops: list[Optional[float]]) -> str:
    """Why a memory claim is not judged: "" when every last-fifth drop (one per memory) is at most
    :data:`PLATEAU_DROP`; a memory whose drop is unknown (None: no curve, or one too short) is not judged either."""
    if any(d is None for d in drops):
        return PLATEAU_UNKNOWN
    if not drops or max(drops) <= PLATEAU_DROP:
        return ""
    return f"the memory's loss still fell {max(drops):.1%} over its last fifth (> {PLATEAU_DROP:.0%}: not at its plateau)"


def last_fifth_drop(curve: list[dict]) -> Optional[float]:
    """Relative drop of a loss curve over its last fifth (mean loss of the fifth before it minus that of the last
    fifth, over the former): near 0 once the loss has plateaued; None for curves of fewer than 5 points."""
    losses = [p["loss"] for p in curve]
    k = len(losses) // 5
    if k < 1:
        return None
    before, last = float(np.mean(losses[-2 * k: -k])), float(np.mean(losses[-k:]))
    return (before - last) / before if before else None


def _training_record(state: dict, args: MemoryArgs, steps_per_epoch: int) -> dict:
    losses = state["losses"]
    curve = [{"step": min(i + args.log_every, len(losses)), "epoch": min(i + args.log_every, len(losses)) / steps_per_epoch,
              "loss": float(np.mean(losses[i: i + args.log_every]))} for i in range(0, len(losses), args.log_every)]
    record = {"steps": state["step"], "pairs": state["pairs"], "train_s": state["train_s"],
              "pairs_per_s": state["pairs"] / max(state["train_s"], 1e-9), "first_loss": losses[0] if losses else None,
              "final_loss": curve[-1]["loss"] if curve else None, "last_fifth_drop": last_fifth_drop(curve),
              "loss_curve": curve}
    heldout = state.get("heldout") or []
    if heldout:
        best = min(heldout, key=lambda p: p["loss"])
        record.update(heldout_curve=heldout, heldout_final_loss=heldout[-1]["loss"], heldout_best_loss=best["loss"],
                      heldout_best_epoch=best["epoch"])
    return record


def _write_train_log(out: Path, record: dict) -> None:
    from .report import line_plot

    atomic_write_json(out / TRAIN_LOG, record)
    curve, heldout = record["loss_curve"], record.get("heldout_curve") or []
    if curve:
        lines = [{"x": [p["step"] for p in curve], "y": [p["loss"] for p in curve], "label": "train loss"}]
        if heldout:
            lines.append({"x": [p["step"] for p in heldout], "y": [p["loss"] for p in heldout], "label": "held-out loss"})
        line_plot(out / "loss.png", lines,
                  title="MLP memory training", xlabel="optimiser step", ylabel="cross-entropy (nats)")
