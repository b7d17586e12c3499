"""The MLP-hurdle study (paper Appendix E, Figures 4 and 5): does the last block's MLP slow early training?

Three GPT-2 models are built from one config and one seed: ``with_last_mlp``; ``without_last_mlp``, the same initialised
model with the last block's feed-forward sublayer removed (that block's output is h + attn(LN(h)): the residual passes
through); and the control ``without_first_mlp``, which removes the first block's instead (the same lost capacity in
another place). All are trained on the same batches in the same order, and evaluated at steps 0, eval_every, ...:

- Macondo mode (``--data macondo`` or a generated village folder): trained on the test split's sentences, as the paper does;
  the metric is the log-likelihood of each child's name given its prefix, per number of children and averaged (Figure 4).
- Text mode (``--data FILE``): the metric is the training loss (EMA-smoothed, Figure 5) and the loss on a fixed
  validation slice.

Each (seed, model) run trains on `knnlm.train`'s loop (its AdamW, checkpoints and exact resume) with the hurdle's own batches,
schedule (:func:`lr_at`) and per-step records (EMA of the loss, data digest), so a rerun resumes.

The verdict statistic is the paired area between a pruned model's curve and the full model's over the first
``--area_fraction`` (40%) of training, per seed (:func:`paired_area`), with a bootstrap interval over seeds.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..claims import Claim, claims_table
from ..errors import KnnlmError
from ..fileio import atomic_write_json, claim_output_dir, read_json
from ..stats import Interval, as_interval
from ..train import collate_causal
from .study import check_resumable, mean_std, seed_path

log = logging.getLogger(__name__)

MODELS = ("with_last_mlp", "without_last_mlp", "without_first_mlp")
PRUNED = MODELS[1:]  # compared with MODELS[0], paired per seed


# ---------------------------------------------------------------------------------------------------------------- config
@dataclass
class HurdleArgs:
    data: str = field(default="macondo", metadata={"help": "`macondo` (generate a village into OUT/macondo with the --macondo_* knobs), a folder holding a generated village (its test.jsonl), or a plain-text training file (text mode)."})
    size: str = field(default="gpt2-small", metadata={"help": "Named from-scratch GPT-2 size (knnlm.assets.SCRATCH_SIZES: tiny, small, gpt2-small)."})
    n_layer: int = field(default=0, metadata={"help": "Blocks, overriding --size's (0: the size's). GPT-2 small's shape at reduced width: e.g. --n_layer 4 --n_embd 128 --n_head 4."})
    n_embd: int = field(default=0, metadata={"help": "Width, overriding --size's (0: the size's)."})
    n_head: int = field(default=0, metadata={"help": "Attention heads, overriding --size's (0: the size's); must divide the width."})
    preset: Optional[str] = field(default=None, metadata={"help": "Preset values (flags and --config win), from configs/hurdle-preset-<name>-<mode>.yaml: `cpu` (2x64, 2 CPU cores, <= 10 min per mode), `cpu-deep` (4x128, 10 seeds: the depth at which removing one MLP of four can show the paper's effect) or `paper` (GPT-2 small, a GPU)."})
    area_fraction: float = field(default=0.4, metadata={"help": "The paired area (the verdict statistic) is taken over the first this fraction of training."})
    bootstrap: int = field(default=10000, metadata={"help": "Bootstrap resamples of the seeds for the interval of the paired area."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Run folder: checkpoints, results.json, results.md, PNGs (required). A rerun resumes it."})
    max_steps: int = field(default=10000, metadata={"help": "Optimizer steps per model.", "deprecated": ("steps",)})
    eval_every: int = field(default=1000, metadata={"help": "Evaluate every N steps (and at step 0 and the last step); checkpoints are written at the same points."})
    num_seeds: int = field(default=5, metadata={"help": "Number of seeds (0..num_seeds-1); each seed gives both models their initial weights and data order.", "deprecated": ("seeds",)})
    batch_size: int = field(default=8, metadata={"help": "Examples per step: sentences in Macondo mode, blocks of --block_size tokens in text mode."})
    block_size: int = field(default=1024, metadata={"help": "Text mode: tokens per training block and validation block."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate of AdamW.", "deprecated": ("lr",)})
    warmup: float = field(default=0.05, metadata={"help": "Linear warm-up: a fraction of --max_steps when < 1, else a number of steps; then linear decay to 0."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only; biases, norms untouched)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    vocab_size: int = field(default=0, metadata={"help": "0: the tokenizer's full vocabulary. N > 0: keep the N-1 most frequent tokens of the training data and map the rest to one unknown id (a CPU speed-up; likelihoods are then over that reduced vocabulary)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Text mode: validation text (default: valid.txt beside a training file named train.txt, as in WikiText)."})
    val_tokens: int = field(default=0, metadata={"help": "Text mode: score the first N validation tokens (0 = all)."})
    max_train_tokens: int = field(default=0, metadata={"help": "Text mode: use only the first N training tokens (0 = all)."})
    ema_beta: float = field(default=0.98, metadata={"help": "Smoothing of the recorded training loss: ema = beta*ema + (1-beta)*loss (bias-corrected)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Examples per forward pass when evaluating."})
    macondo_seed: int = field(default=0, metadata={"help": "Macondo mode: seed of the generated village."})
    macondo_num_villagers: int = field(default=500, metadata={"help": "Macondo mode: villagers in the generated village."})
    macondo_num_parents: int = field(default=100, metadata={"help": "Macondo mode: parents (an equal share for each number of children)."})
    macondo_max_children: int = field(default=5, metadata={"help": "Macondo mode: parents have 1..N children."})
    macondo_examples_per_child: int = field(default=5, metadata={"help": "Macondo mode: training examples per parent-child pair (the train split, unused here but generated)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})
    log_every: int = field(default=50, metadata={"help": "Record the smoothed training loss (and update the progress bar) every N steps."})

    @property
    def mode(self) -> str:
        return "text" if Path(self.data).is_file() else "macondo"

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.max_steps)) if self.warmup < 1 else int(self.warmup)

    def eval_steps(self) -> list[int]:
        return sorted(set(range(0, self.max_steps + 1, self.eval_every)) | {self.max_steps})

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the run folder for checkpoints and results")
        from ..assets import SCRATCH_SIZES

        if self.size not in SCRATCH_SIZES:
            raise KnnlmError(f"--size: {self.size!r} is not a from-scratch GPT-2 size; use one of {', '.join(SCRATCH_SIZES)}")
        if self.data != "macondo" and not Path(self.data).exists():
            raise KnnlmError(f"--data: {self.data} does not exist; pass `macondo`, a Macondo folder or a text file")
        if self.data != "macondo" and Path(self.data).is_dir() and not (Path(self.data) / "test.jsonl").is_file():
            raise KnnlmError(f"--data: {self.data} is a folder without test.jsonl; pass a folder from `knnlm macondo generate`")
        for name in ("max_steps", "eval_every", "num_seeds", "batch_size", "block_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_every > self.max_steps:
            raise KnnlmError(f"--eval_every: {self.eval_every} exceeds --max_steps {self.max_steps}; lower it")
        if self.learning_rate <= 0 or self.warmup < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise KnnlmError("--learning_rate/--warmup/--weight_decay/--max_grad_norm: must be positive (learning_rate) "
                             "or >= 0")
        if self.warmup_steps >= self.max_steps:
            raise KnnlmError(f"--warmup: {self.warmup} gives {self.warmup_steps} warm-up steps, not fewer than --max_steps "
                             f"{self.max_steps}")
        if not 0 <= self.ema_beta < 1:
            raise KnnlmError(f"--ema_beta: must be in [0, 1), got {self.ema_beta}")
        if min(self.n_layer, self.n_embd, self.n_head) < 0:
            raise KnnlmError("--n_layer/--n_embd/--n_head: must be >= 0 (0: the --size's value)")
        from ..assets import SCRATCH_SIZES as _S

        layers, width, heads = (v or d for v, d in zip((self.n_layer, self.n_embd, self.n_head), _S[self.size]))
        if width % heads:
            raise KnnlmError(f"--n_head: {heads} heads do not divide the width {width}")
        if layers < 2:
            raise KnnlmError(f"--n_layer: {layers} blocks leave no first-vs-last MLP control; use >= 2")
        if not 0 < self.area_fraction <= 1:
            raise KnnlmError(f"--area_fraction: must be in (0, 1], got {self.area_fraction}")
        if self.bootstrap < 1:
            raise KnnlmError(f"--bootstrap: must be >= 1, got {self.bootstrap}")
        if self.vocab_size < 0 or self.vocab_size == 1:
            raise KnnlmError("--vocab_size: 0 (full vocabulary) or >= 2")
        if self.device not in ("auto", "cpu", "cuda"):
            raise KnnlmError(f"--device: {self.device!r} is not one of auto, cpu, cuda")
        self.resolved_device()  # cuda without a GPU: the one-line error
        if self.mode == "text":
            val = self.validation_path()
            if val is None:
                raise KnnlmError(f"--validation_file: required in text mode (no valid.txt beside {self.data})")
            if not val.is_file():
                raise KnnlmError(f"--validation_file: {val} does not exist; pass a plain-text validation file")

    def validation_path(self) -> Optional[Path]:
        if self.validation_file:
            return Path(self.validation_file)
        sibling = Path(self.data).with_name("valid.txt")
        return sibling if Path(self.data).name == "train.txt" and sibling.is_file() else None

    def resolved_device(self) -> torch.device:
        from ..models import resolve_device

        return resolve_device(self.device)


# Presets are YAML files, one per (preset, mode): configs/hurdle-preset-<name>-<macondo|text>.yaml (flat keys of
# HurdleArgs, never `data`). `cpu`: both models x 5 seeds in <= 10 min on 2 cores per mode, one torch thread (two threads
# on a busy 2-core machine were measured 20x slower per step than one).
def preset_names() -> list[str]:
    from ..config import PRESETS_DIR

    return sorted({p.stem[len("hurdle-preset-"):].rsplit("-", 1)[0] for p in PRESETS_DIR.glob("hurdle-preset-*-*.yaml")})


def preset_values(preset: str, mode: str) -> dict:
    """The values of ``--preset`` for a mode (``macondo`` or ``text``), read from its YAML file."""
    from ..config import PRESETS_DIR, load_config_file

    path = PRESETS_DIR / f"hurdle-preset-{preset}-{mode}.yaml"
    if not path.is_file():
        raise KnnlmError(f"--preset: {preset!r} is not one of {', '.join(preset_names())}")
    return load_config_file(path)


# Fields that do not change what a run computes: a rerun into the same folder may change them and still resume it.
_FREE_KEYS = ("output_dir", "device", "num_threads", "num_seeds", "eval_batch_size", "preset", "area_fraction",
              "bootstrap")


def resolve_args(cli: dict, config_file: Optional[str] = None) -> HurdleArgs:
    """HurdleArgs from CLI values (None = unset), a YAML/JSON config file and a preset: flag > file > preset > default."""
    from ..config import load_config_file, rename_deprecated, resolve

    # new names here (resolve() warns about the old ones), so that a preset's key does not shadow a file's old one
    file_vals = rename_deprecated(load_config_file(config_file), HurdleArgs, warn=False) if config_file else {}
    cli = rename_deprecated({k: v for k, v in cli.items() if v is not None}, HurdleArgs, source="flags")
    preset = cli.get("preset", file_vals.get("preset"))
    if preset is not None:
        data = cli.get("data", file_vals.get("data", HurdleArgs.data))
        mode = "text" if Path(str(data)).is_file() else "macondo"
        for key, value in preset_values(preset, mode).items():
            if key not in file_vals and key not in cli:
                cli[key] = value
    return resolve(HurdleArgs, cli, config_file)


# ---------------------------------------------------------------------------------------------------------------- models
class ZeroMLP(nn.Module):
    """Stands in for a removed feed-forward sublayer: returns zeros, so the block adds nothing to the residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        return torch.zeros_like(x)


def gpt2_config(size: str, vocab_size: int, n_positions: int, eos_token_id: int, n_layer: int = 0, n_embd: int = 0,
                n_head: int = 0):
    """The GPT2Config of a named from-scratch size (``knnlm.assets.scratch_config``) with this vocabulary; non-zero
    ``n_layer`` / ``n_embd`` / ``n_head`` override the size's shape."""
    from ..assets import scratch_config

    config = scratch_config(size, n_positions=max(1024, n_positions))  # GPT-2's context, as the paper's models
    for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        if value:
            setattr(config, key, value)
    config.vocab_size = vocab_size
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos_token_id
    return config


def remove_mlp(model, block_index: int) -> nn.Module:
    """In place: block ``block_index``'s feed-forward sublayer (ln_2 and mlp) becomes a pass-through of the residual."""
    block = model.transformer.h[block_index]
    block.mlp = ZeroMLP()
    block.ln_2 = nn.Identity()
    return model


def remove_last_mlp(model) -> nn.Module:
    return remove_mlp(model, -1)


def remove_first_mlp(model) -> nn.Module:
    """The control: the first block's MLP goes instead of the last's (the same parameters lost, another place)."""
    return remove_mlp(model, 0)


def build_pair(config, seed: int) -> dict[str, nn.Module]:
    """The models of one seed (``MODELS``): the same initial weights everywhere they share (the pruned ones are copies)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    full = GPT2LMHeadModel(config)
    full.loss_type = "ForCausalLM"  # transformers warns when it has to guess
    return {"with_last_mlp": full, "without_last_mlp": remove_last_mlp(copy.deepcopy(full)),
            "without_first_mlp": remove_first_mlp(copy.deepcopy(full))}


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied input/output embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------- data
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of the batch of update ``step`` (0-based): each epoch a fresh permutation seeded by (seed, epoch),
    read in order; a pure function of its arguments, so both models of a pair (and a resumed run) see the same batches."""
    out: list[np.ndarray] = []
    pos, need = step * batch_size, batch_size
    while need:
        epoch, offset = divmod(pos, n)
        take = min(need, n - offset)
        out.append(_epoch_permutation(n, seed, epoch)[offset:offset + take])
        pos, need = pos + take, need - take
    return np.concatenate(out)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class Vocab:
    """Maps tokenizer ids to model ids: identity for the full vocabulary, else kept tokens + one unknown id (the last)."""

    size: int
    kept: Optional[np.ndarray] = None  # [size - 1] tokenizer ids, most frequent first

    @classmethod
    def build(cls, token_arrays: list[np.ndarray], full_size: int, vocab_size: int) -> "Vocab":
        if vocab_size == 0:
            return cls(full_size)
        counts = np.bincount(np.concatenate(token_arrays), minlength=full_size)
        seen = np.flatnonzero(counts)
        order = seen[np.lexsort((seen, -counts[seen]))]  # most frequent first, ties by id
        kept = order[: vocab_size - 1]
        return cls(len(kept) + 1, kept)

    @functools.cached_property
    def _table(self) -> np.ndarray:
        table = np.full(int(self.kept.max()) + 1 if len(self.kept) else 1, self.unk, dtype=np.int64)
        table[self.kept] = np.arange(len(self.kept))
        return table

    @property
    def unk(self) -> Optional[int]:
        return None if self.kept is None else self.size - 1

    def map(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.kept is None:
            return ids
        out = np.full(ids.shape, self.unk, dtype=np.int64)
        inside = ids < len(self._table)
        out[inside] = self._table[ids[inside]]
        return out


@dataclass
class Examples:
    """Training examples: Macondo sentences (variable length) or fixed text blocks, as model ids."""

    seqs: Optional[list[np.ndarray]] = None  # Macondo: one array per sentence
    tokens: Optional[np.ndarray] = None  # text: the token stream, cut into blocks
    block_size: int = 0

    def __len__(self) -> int:
        return len(self.seqs) if self.seqs is not None else len(self.tokens) // self.block_size

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> input_ids [B, T], attention_mask [B, T], labels [B, T] (-100 on padding)."""
        if self.seqs is not None:
            b = collate_causal([self.seqs[i] for i in idx], 0)
            return b["input_ids"], b["attention_mask"], b["labels"]
        rows = [self.tokens[i * self.block_size:(i + 1) * self.block_size] for i in idx]
        ids = torch.as_tensor(np.stack(rows), dtype=torch.long)  # full blocks: no padding
        return ids, torch.ones_like(ids), ids.clone()


@dataclass
class StudyData:
    mode: str
    train: Examples
    vocab: Vocab
    eos_id: int  # model id
    rows: Optional[list[dict]] = None  # Macondo: the test split's rows (scored with knnlm.macondo.score)
    tokenizer: object = None
    val_blocks: Optional[Examples] = None  # text: the fixed validation slice


class _TokenizerLM:
    """What ``knnlm.corpus.tokenize_to_file`` needs from an LM, for a bare tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]


def load_tokenizer():
    from transformers import AutoTokenizer

    from ..assets import gpt2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir()))
    tokenizer.model_max_length = 1 << 62  # whole files are tokenized at once; the models see short blocks
    return tokenizer


def _macondo_rows(args: HurdleArgs, out: Path) -> list[dict]:
    from ..macondo.generate import MacondoArgs, generate_macondo, read_split

    if args.data != "macondo":
        return read_split(args.data, "test")
    folder = out / "macondo"
    if not (folder / "meta.json").is_file():
        generate_macondo(MacondoArgs(seed=args.macondo_seed, output_dir=str(folder),
                                     num_villagers=args.macondo_num_villagers, num_parents=args.macondo_num_parents,
                                     max_children=args.macondo_max_children,
                                     examples_per_child=args.macondo_examples_per_child, tokenizer="gpt2",
                                     format="plain"))
    return read_split(folder, "test")


class ScoringLM:
    """What ``knnlm.macondo.score`` needs from an LM (encode, tokenizer, forward, ...), for a model in memory whose
    vocabulary may be the reduced one: text is tokenized by the GPT-2 tokenizer, then mapped by ``vocab``."""

    def __init__(self, tokenizer, vocab: Vocab, model: Optional[nn.Module] = None, device=torch.device("cpu")):
        self.model, self.vocab, self.device = model, vocab, device
        self._tokenizer = tokenizer
        self.eos_token_id = int(vocab.map([tokenizer.eos_token_id])[0])
        self.max_positions = model.config.n_positions if model is not None else 1 << 30

    def tokenizer(self, text: str, add_special_tokens: bool = True, **kwargs) -> dict:
        ids = self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": self.vocab.map(ids).tolist()}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def forward(self, input_ids, attention_mask=None, key_points=()):
        """-> (logits [B, T, V] float32, {}); no key points (no datastore in this study)."""
        if key_points:
            raise ValueError("ScoringLM captures no key points")
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), {}


def prepare_data(args: HurdleArgs, tokenizer) -> StudyData:
    """Tokenizes the training (and evaluation) data once; cached token files live in OUT/data."""
    out = Path(args.output_dir)
    full = len(tokenizer)
    if args.mode == "macondo":
        from ..macondo.score import encode_rows

        rows = _macondo_rows(args, out)
        raw = [np.asarray(ids, np.int64) for ids, _ in encode_rows(ScoringLM(tokenizer, Vocab(full)), rows)]
        vocab = Vocab.build(raw, full, args.vocab_size)
        scoring = ScoringLM(tokenizer, vocab)
        encoded = encode_rows(scoring, rows)  # exactly what score_split feeds: prefix + target, in model ids
        if vocab.unk is not None and any(vocab.unk in ids[n:] for ids, n in encoded):
            raise KnnlmError(f"--vocab_size: {args.vocab_size} drops some children's names; raise it (or 0)")
        train = Examples(seqs=[np.asarray(ids, np.int64) for ids, _ in encoded])
        return StudyData("macondo", train, vocab, scoring.eos_token_id, rows=rows, tokenizer=tokenizer)
    from ..corpus import CorpusArgs, tokenize_to_file

    shim = _TokenizerLM(tokenizer)
    corpus = CorpusArgs(train_file=args.data, validation_file=str(args.validation_path()),
                        max_tokens=args.max_train_tokens or None)
    train_tokens = np.asarray(tokenize_to_file(shim, corpus, "train", out / "data" / "train.tokens").tokens)
    corpus.max_tokens = args.val_tokens or None
    val_tokens = np.asarray(tokenize_to_file(shim, corpus, "validation", out / "data" / "valid.tokens").tokens)
    if len(train_tokens) < args.block_size * args.batch_size:
        raise KnnlmError(f"--data: {args.data} has {len(train_tokens)} tokens, fewer than one batch "
                         f"(--batch_size x --block_size = {args.batch_size * args.block_size})")
    if len(val_tokens) < args.block_size:
        raise KnnlmError(f"--validation_file: {len(val_tokens)} tokens, fewer than one --block_size block")
    vocab = Vocab.build([train_tokens], full, args.vocab_size)
    return StudyData("text", Examples(tokens=vocab.map(train_tokens), block_size=args.block_size), vocab,
                     int(vocab.map([tokenizer.eos_token_id])[0]),
                     val_blocks=Examples(tokens=vocab.map(val_tokens), block_size=args.block_size))


# ---------------------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def mean_loss(model: nn.Module, blocks: Examples, batch_size: int, device: torch.device) -> float:
    """Mean next-token negative log-likelihood over every block (token-weighted). Gold log-probs come from the shared
    kernel (``knnlm.scoring``) on the body's last hidden states, summed in float64: no [B, T, V] tensor is kept."""
    from ..scoring import head_gold_log_probs

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids, _, _ = blocks.batch(np.arange(start, min(start + batch_size, len(blocks))))
            ids = ids.to(device)
            hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))[0]  # [B, T, d]
            logp = head_gold_log_probs(model.get_output_embeddings(), hidden[:, :-1].flatten(0, 1),
                                       ids[:, 1:].flatten())  # [B * (T - 1)]
            total, count = total - float(logp.double().sum()), count + logp.numel()
    model.train(was_training)
    return total / count


def evaluate_point(model: nn.Module, data: StudyData, args: HurdleArgs, device: torch.device) -> dict[str, float]:
    """The metrics of one eval point. Macondo (``knnlm.macondo.score``): ll_<n> per number of children n, ll_avg_groups
    (mean of the group means: the paper's Average) and ll_avg (mean over children). Text: val_loss."""
    if data.mode == "macondo":
        from ..macondo.score import score_split, summarize

        was_training = model.training
        model.eval()
        lls = score_split(ScoringLM(data.tokenizer, data.vocab, model, device), data.rows,
                          batch_size=args.eval_batch_size)["lm"]
        model.train(was_training)
        summary = summarize(data.rows, lls)
        groups = [k for k in summary if k.isdigit()]
        return {"ll_avg_groups": summary["avg_groups"], "ll_avg": summary["avg"],
                **{f"ll_{n}": summary[n] for n in groups}}
    return {"val_loss": mean_loss(model, data.val_blocks, args.eval_batch_size, device)}


# ---------------------------------------------------------------------------------------------------------------- training
def lr_at(step: int, args: HurdleArgs) -> float:
    """Learning rate of update ``step`` (1-based): linear warm-up to --learning_rate, then linear decay to 0 at
    --max_steps."""
    warm = args.warmup_steps
    if step <= warm:
        return args.learning_rate * step / max(1, warm)
    return args.learning_rate * max(0.0, (args.max_steps - step) / max(1, args.max_steps - warm))


def train_args(args: HurdleArgs, seed: int):
    """The shared loop's settings for one run (``knnlm.train``): AdamW at --learning_rate (the schedule is :func:`lr_at`),
    float32, one micro-batch per step, --max_steps steps."""
    from ..train import TrainArgs

    return TrainArgs(learning_rate=args.learning_rate, warmup_ratio=0.0, batch_size=args.batch_size,
                     max_steps=args.max_steps, max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
                     seed=seed, bf16=False, log_every=args.log_every)


def _batches(data: StudyData, args: HurdleArgs):
    """``knnlm.train``'s data: one unending stream per seed, batch k = :func:`batch_indices` of step k (epochs are the
    hurdle's own: a batch may straddle two)."""
    def stream(epoch: int, seed: int):
        for step in itertools.count():
            ids, mask, labels = data.train.batch(batch_indices(len(data.train), args.batch_size, seed, step))
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return stream


def train_one(model: nn.Module, name: str, seed: int, data: StudyData, args: HurdleArgs, run_dir: Path,
              device: torch.device) -> dict:
    """Trains one (seed, model) run on ``knnlm.train``'s loop, resuming from its checkpoint folder; -> its record
    (metrics per eval step, the smoothed loss curve, the digest of the batches fed).

    The record is written to ``run_dir/seed-<s>-<name>.json`` when the run finishes (``study.seed_path``: a folder's
    earlier ``seed<s>-`` names are kept); its checkpoint is then removed.
    """
    from ..train import train

    done_path = seed_path(run_dir, seed, f"-{name}.json")
    if done_path.is_file():
        return read_json(done_path)
    ckpt_dir = seed_path(run_dir, seed, f"-{name}")
    old_ckpt = run_dir / f"seed{seed}-{name}.pt"  # the checkpoint of the hurdle's former own training loop
    if old_ckpt.is_file() and not ckpt_dir.exists():
        log.warning("%s: a checkpoint of the hurdle's earlier training loop; seed %d %s restarts from step 0 "
                    "(the same numbers: the run is seeded)", old_ckpt, seed, name)
    model.to(device).train()  # before the optimizer is built: on a GPU it takes the fused AdamW kernel, as it did
    eval_at = set(args.eval_steps())
    # the hooks' running values, checkpointed by the loop: ema of the loss, digest chaining the batches fed
    # (d_k = sha256(d_{k-1} + input_ids_k)) and the record under construction
    extra = {"ema": 0.0, "smoothed": None, "digest": "",
             "record": {"seed": seed, "model": name, "params": count_params(model), "evals": {}, "curve": {}}}

    def on_step(step: int, loss: float, group: list[dict]) -> None:
        digest = hashlib.sha256(bytes.fromhex(extra["digest"]) + group[0]["input_ids"].numpy().tobytes())
        extra["digest"] = digest.hexdigest()
        extra["ema"] = args.ema_beta * extra["ema"] + (1 - args.ema_beta) * loss
        extra["smoothed"] = extra["ema"] / (1 - args.ema_beta ** step)
        if step % args.log_every == 0 or step in eval_at:
            extra["record"]["curve"][str(step)] = extra["smoothed"]

    def on_eval(step: int, model: nn.Module) -> dict:
        metrics = evaluate_point(model, data, args, device)
        evals = {**metrics, "train_loss": None} if step == 0 else {"train_loss": extra["smoothed"], **metrics}
        extra["record"]["evals"][str(step)] = evals
        if step:
            log.info("seed %d %s step %d/%d: %s", seed, name, step, args.max_steps,
                     ", ".join(f"{k} {v:.4f}" for k, v in evals.items() if not k[3:].isdigit()))
        return evals

    history = train(model, _batches(data, args), train_args(args, seed), ckpt_dir, eval_every=args.eval_every,
                    on_eval=on_eval, progress_desc=f"seed {seed} {name}", on_step=on_step, extra_state=extra,
                    lr_schedule=functools.partial(lr_at, args=args), device=device.type,
                    fused_adamw=device.type == "cuda")
    record = extra["record"]
    record["train_s"] = history[-1]["elapsed_s"]  # training time, evaluations excluded
    record["data_digest"] = extra["digest"]
    atomic_write_json(done_path, record)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    old_ckpt.unlink(missing_ok=True)
    return record


# ---------------------------------------------------------------------------------------------------------------- study
def run_study(args: HurdleArgs) -> dict:
    """Trains both models for every seed (resuming), aggregates and writes results.json, results.md and PNGs.

    Returns ``{"results": path, "table": path, "plots": [paths], "metrics": metrics}``.
    """
    from ..config import save_config

    started = time.time()
    out = Path(args.output_dir)
    # a model, a datastore, another run: refused (a folder from before the run marker holds only these names)
    claim_output_dir(out, "hurdle run", {}, own_files=("config.json", "results.json", "results.md", "*.png", "runs",
                                                       "data", "macondo"))
    check_resumable(out, args, _FREE_KEYS)  # (its own earlier run: the settings must match)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = args.resolved_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tokenizer = load_tokenizer()
    data = prepare_data(args, tokenizer)
    n_positions = args.block_size if data.mode == "text" else max(len(s) for s in data.train.seqs)
    config = gpt2_config(args.size, data.vocab.size, n_positions, data.eos_id, args.n_layer, args.n_embd, args.n_head)
    save_config(out, args)
    run_dir = out / "runs"
    run_dir.mkdir(exist_ok=True)
    records: dict[str, dict[int, dict]] = {m: {} for m in MODELS}
    params: dict[str, int] = {}
    for name, model in build_pair(config, 0).items():
        params[name] = count_params(model)
        log.info("%s: %d parameters", name, params[name])
    for seed in range(args.num_seeds):
        done = {name: seed_path(run_dir, seed, f"-{name}.json") for name in MODELS}
        if all(p.is_file() for p in done.values()):  # a finished seed: nothing to build
            records_seed = {name: read_json(p) for name, p in done.items()}
        else:
            records_seed = {name: train_one(model, name, seed, data, args, run_dir, device)
                            for name, model in build_pair(config, seed).items()}
        for name in MODELS:
            records[name][seed] = records_seed[name]
    metrics = aggregate(records, args, data)
    metrics["params"] = params
    metrics["vocab_size"] = data.vocab.size
    metrics["train_examples"] = len(data.train)
    metrics["device"] = str(device)
    paths = write_outputs(out, args, metrics, started)
    return {**paths, "metrics": metrics}


# ---------------------------------------------------------------------------------------------------------------- aggregation
def _higher_is_better(metric: str) -> bool:
    return metric.startswith("ll_")


def compare(steps: list[int], with_mean: list, without_mean: list, higher_is_better: bool, total_steps: int) -> dict:
    """Where the pruned model leads: its advantage per step (positive = without_last_mlp ahead, in the metric's units),
    the eval steps at which the lead changes hands, and the advantage at the eval step nearest 1/4 of training."""
    sign = 1.0 if higher_is_better else -1.0
    adv = [None if a is None or b is None else sign * (b - a) for a, b in zip(with_mean, without_mean)]
    crossings, prev = [], None
    for step, a in zip(steps, adv):
        if step == 0 or a is None or a == 0:
            continue
        if prev is not None and (a > 0) != (prev > 0):
            crossings.append(step)
        prev = a
    quarter = min((s for s in steps if s > 0), key=lambda s: (abs(s - total_steps / 4), s))
    return {"advantage_without_last_mlp": dict(zip(map(str, steps), adv)), "crossings": crossings,
            "quarter_step": quarter, "advantage_at_quarter": adv[steps.index(quarter)],
            "leader_at_quarter": None if not adv[steps.index(quarter)] else
            ("without_last_mlp" if adv[steps.index(quarter)] > 0 else "with_last_mlp")}


def paired_area(steps: list[int], full: list, pruned: list, higher_is_better: bool, until: float) -> Optional[float]:
    """The area between one seed's pruned and full curves over steps [first point, ``until``], divided by that span:
    the pruned model's mean advantage there (metric units; > 0: it is ahead). Trapezoids between the points, the curves
    interpolated linearly at ``until`` when it falls between two points. None when fewer than two points lie in range.
    """
    sign = 1.0 if higher_is_better else -1.0
    pts = [(s, sign * (b - a)) for s, a, b in zip(steps, full, pruned) if a is not None and b is not None]
    inside = [(s, v) for s, v in pts if s <= until]
    after = [(s, v) for s, v in pts if s > until]
    if inside and after and inside[-1][0] < until:  # close the window exactly at `until`
        (s0, v0), (s1, v1) = inside[-1], after[0]
        inside.append((until, v0 + (v1 - v0) * (until - s0) / (s1 - s0)))
    if len(inside) < 2:
        return None
    x = np.asarray([s for s, _ in inside], dtype=float)
    y = np.asarray([v for _, v in inside], dtype=float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def area_statistics(per_seed: dict[str, list[Optional[float]]], n_resamples: int, seed: int = 0) -> dict:
    """Per pruned model and for the last-minus-first difference (paired per seed): the mean over seeds of the paired
    area with its bootstrap 95% interval over seeds (``interval``, None without a value) and the per-seed values."""
    from ..stats import bootstrap_ci

    out: dict = {}
    series = dict(per_seed)
    if all(k in per_seed for k in PRUNED):
        series["last_minus_first"] = [None if a is None or b is None else a - b
                                      for a, b in zip(per_seed[PRUNED[0]], per_seed[PRUNED[1]])]
    for name, values in series.items():
        vals = np.asarray([v for v in values if v is not None], dtype=float)
        ci = bootstrap_ci(vals, np.mean, n_resamples, seed=seed).as_dict() if len(vals) else None
        out[name] = {"interval": ci, "per_seed": values}
    return out


# The verdict fixed before the runs: removing the last MLP speeds early learning when the interval of its paired area
# lies above 0 and the interval of (last − first) too (the first-MLP control loses the same parameters elsewhere).
AREA_THRESHOLD = 0.0
FASTER_CLAIM = "without the last MLP the model learns faster early on (Appendix E)"
CONTROL_CLAIM = "... and faster than without the first MLP (the control)"


def _area_interval(area: dict) -> Optional[Interval]:
    """An area's interval (a run recorded before the one interval shape stores {mean, ci95})."""
    if area.get("interval"):
        return as_interval(area["interval"])
    return as_interval(area) if area.get("ci95") else None


def hurdle_claims(metrics: dict, label: str) -> list[Claim]:
    """The two claims of one hurdle run on its verdict metric (the paired area over the first --area_fraction)."""
    key = "ll_avg_groups" if metrics["mode"] == "macondo" else "train_loss"
    areas = metrics.get("areas", {}).get(key, {})
    setting = f"{label}, {key}, {len(metrics['seeds'])} seeds"
    stat = f"paired area, steps 0–{metrics['area_until_step']:g}"
    claims = []
    for text, name, suffix in ((FASTER_CLAIM, "without_last_mlp", ""), (CONTROL_CLAIM, "last_minus_first", ", last − first")):
        interval = _area_interval(areas.get(name, {}))
        if interval is not None:
            claims.append(Claim(text, setting, stat + suffix, interval, AREA_THRESHOLD, "above", digits=4))
    return claims


def aggregate(records: dict[str, dict[int, dict]], args: HurdleArgs, data: StudyData) -> dict:
    """Mean and std over seeds of every metric at every eval step (and of the training-loss curve)."""
    steps = args.eval_steps()
    models = [m for m in MODELS if records.get(m)]
    names = sorted({k for recs in records.values() for r in recs.values() for ev in r["evals"].values() for k in ev},
                   key=lambda k: (not k.startswith("ll_avg"), k))  # ll_avg, ll_avg_groups, ll_1.., train_loss
    mean = {m: {k: [] for k in names} for m in models}
    std = {m: {k: [] for k in names} for m in models}
    for m in models:
        for k in names:
            for s in steps:
                mu, sd = mean_std([r["evals"][str(s)].get(k) for r in records[m].values()])
                mean[m][k].append(mu)
                std[m][k].append(sd)
    curve_steps = sorted({int(s) for r in records[MODELS[0]].values() for s in r["curve"]})
    curve = {m: {"mean": [], "std": []} for m in models}
    for m in models:
        for s in curve_steps:
            mu, sd = mean_std([r["curve"].get(str(s)) for r in records[m].values()])
            curve[m]["mean"].append(mu)
            curve[m]["std"].append(sd)
    primary = ["ll_avg_groups", "ll_avg"] if data.mode == "macondo" else ["train_loss", "val_loss"]
    pruned = [m for m in PRUNED if m in models]
    comparison, by_model = {}, {}
    for m in pruned:
        by_model[m] = {k: compare(steps, mean[MODELS[0]][k], mean[m][k], _higher_is_better(k), args.max_steps)
                       for k in primary}
        for k, c in by_model[m].items():  # the same advantage per seed (paired: same init, same batches), mean ± std
            sign = 1.0 if _higher_is_better(k) else -1.0
            paired = [mean_std([None if a.get(k) is None or b.get(k) is None else sign * (b[k] - a[k])
                                 for a, b in ((records[MODELS[0]][seed]["evals"][str(s)],
                                               records[m][seed]["evals"][str(s)]) for seed in records[MODELS[0]])])
                      for s in steps]
            c["paired_mean"], c["paired_std"] = [p[0] for p in paired], [p[1] for p in paired]
            c["paired_std_at_quarter"] = c["paired_std"][steps.index(c["quarter_step"])]
    comparison = by_model[PRUNED[0]]  # without_last_mlp vs with_last_mlp (the study's pair; kept at the top level)
    # The verdict statistic: per seed, the paired area over the first --area_fraction of training. The training loss
    # uses its --log_every curve (Figure 5), the others the eval points.
    until = args.area_fraction * args.max_steps
    areas = {}
    for k in primary:
        per_seed = {}
        for m in pruned:
            vals = []
            for seed in sorted(records[MODELS[0]]):
                full, mine = records[MODELS[0]][seed], records[m][seed]
                if k == "train_loss":
                    xs = sorted(int(s) for s in full["curve"])
                    a, b = [full["curve"][str(s)] for s in xs], [mine["curve"].get(str(s)) for s in xs]
                else:
                    xs = steps
                    a = [full["evals"][str(s)].get(k) for s in xs]
                    b = [mine["evals"][str(s)].get(k) for s in xs]
                vals.append(paired_area(xs, a, b, _higher_is_better(k), until))
            per_seed[m] = vals
        areas[k] = area_statistics(per_seed, args.bootstrap)
    digests = {m: {str(s): r["data_digest"] for s, r in records[m].items()} for m in models}
    return {"mode": data.mode, "steps": steps, "seeds": sorted(records[MODELS[0]]), "mean": mean, "std": std,
            "models": models, "curve": {"steps": curve_steps, **curve}, "comparison": comparison,
            "comparison_by_model": by_model, "areas": areas, "area_until_step": until,
            "verdict_metric": primary[0],
            "per_seed": {m: {str(s): r["evals"] for s, r in records[m].items()} for m in models},
            "same_data_order": all(digests[MODELS[0]][s] == digests[m][s] for m in models for s in digests[MODELS[0]]),
            "train_s": {m: {str(s): r.get("train_s") for s, r in records[m].items()} for m in models}}


# ---------------------------------------------------------------------------------------------------------------- outputs
_COLORS = {"with_last_mlp": "tab:blue", "without_last_mlp": "tab:orange", "without_first_mlp": "tab:green"}
_LABELS = {"with_last_mlp": "with last MLP", "without_last_mlp": "without last MLP",
           "without_first_mlp": "without first MLP (control)"}
_STYLES = {"with_last_mlp": "-", "without_last_mlp": "--", "without_first_mlp": ":"}
_TITLES = {"ll_avg_groups": "log-likelihood of children's names (mean over numbers of children)",
           "ll_avg": "log-likelihood of children's names (mean over children)", "train_loss": "training loss (EMA)",
           "val_loss": "validation loss"}


def _pm(mu, sd, signed: bool = False) -> str:
    if mu is None:
        return "–"
    value = f"{mu:+.3f}" if signed else f"{mu:.3f}"
    return value if sd is None else f"{value} ± {sd:.3f}"


def _ci(stat: dict) -> str:
    interval = _area_interval(stat or {})
    return "–" if interval is None else interval.fmt(4, "+")


def area_lines(metrics: dict) -> list[str]:
    """The verdict table: paired areas (mean advantage over the first --area_fraction of training) with intervals."""
    from ..report import markdown_table

    rows = [[k, _ci(a.get("without_last_mlp")), _ci(a.get("without_first_mlp")), _ci(a.get("last_minus_first"))]
            for k, a in metrics.get("areas", {}).items()]
    return [f"Paired area over steps 0–{metrics['area_until_step']:g} (the first {metrics['area_until_step'] / metrics['steps'][-1]:.0%} "
            "of training): the pruned model's mean advantage over the full one, per seed (same initial weights, same "
            "batches), mean [bootstrap 95% interval over seeds]; > 0 = ahead. Verdict (fixed before the runs): removing "
            "the last MLP speeds early learning iff its interval and the interval of (last − first) both lie above 0.",
            "", markdown_table(["metric", "without last MLP", "without first MLP", "last − first"], rows), "",
            claims_table(hurdle_claims(metrics, "this run"))]


def markdown_report(args: HurdleArgs, metrics: dict) -> str:
    from ..report import markdown_table

    models = metrics.get("models", list(MODELS[:2]))
    primary = list(metrics["comparison"])
    headers = ["step"] + [f"{_LABELS[m]}: {k}" for k in primary for m in models]
    rows = [[s] + [_pm(metrics["mean"][m][k][i], metrics["std"][m][k][i]) for k in primary for m in models]
            for i, s in enumerate(metrics["steps"])]
    p = metrics["params"]
    shape = f"{args.n_layer or '-'}x{args.n_embd or '-'}" if args.n_layer or args.n_embd else ""
    text = [f"# MLP hurdle: {metrics['mode']} mode, size {args.size} {shape}, {len(metrics['seeds'])} seed(s), "
            f"{args.max_steps} steps", "", "Parameters: " + "; ".join(f"{_LABELS[m]} {p[m]:,}" for m in models if m in p)
            + f" (vocabulary {metrics['vocab_size']:,}). Mean ± std over seeds.", "", markdown_table(headers, rows)]
    if metrics.get("areas"):
        text += area_lines(metrics)
    if metrics["mode"] == "macondo":
        ns = sorted(k for k in metrics["mean"][MODELS[0]] if k[3:].isdigit())
        last = len(metrics["steps"]) - 1
        text += [f"Per number of children at step {metrics['steps'][last]} (optimum log(1/n)):", "",
                 markdown_table(["children", "optimum"] + [_LABELS[m] for m in models],
                                [[k[3:], f"{math.log(1 / int(k[3:])):.3f}"] +
                                 [_pm(metrics["mean"][m][k][last], metrics["std"][m][k][last]) for m in models]
                                 for k in ns])]
    for m, comp in metrics.get("comparison_by_model", {MODELS[1]: metrics["comparison"]}).items():
        text.append(f"Advantage of the model {_LABELS[m]} (positive = ahead), paired per seed, mean ± std:\n")
        text.append(markdown_table(["step"] + list(comp),
                                   [[s] + [_pm(c["paired_mean"][i], c["paired_std"][i], signed=True) for c in comp.values()]
                                    for i, s in enumerate(metrics["steps"])]))
        for k, c in comp.items():
            adv = c["advantage_at_quarter"]
            text.append(f"- {k}: lead changes hands at step(s) {c['crossings'] or 'none'}; at step {c['quarter_step']} "
                        f"(~1/4 of training) the model {_LABELS[m]} is ahead by "
                        f"{_pm(adv, c['paired_std_at_quarter'], signed=True)} "
                        f"({'higher' if _higher_is_better(k) else 'lower'} is better).")
    return "\n".join(text) + "\n"


def _band(std: list) -> Optional[list]:
    """The shaded ±std band of a series (0 where a point has none; no band for a single seed)."""
    return None if all(v is None for v in std) else [v or 0.0 for v in std]


def write_outputs(out: Path, args: HurdleArgs, metrics: dict, started: float) -> dict:
    from ..report import line_plot, write_markdown, write_results

    steps = metrics["steps"]
    models = metrics.get("models", list(MODELS[:2]))
    plots = []
    for k in metrics["comparison"]:  # Figures 4 and 5: all three variants
        if k == "train_loss":  # Figure 5: the smoothed training loss at --log_every resolution
            c = metrics["curve"]
            series = [dict(x=c["steps"], y=c[m]["mean"], std=_band(c[m]["std"]), label=_LABELS[m], color=_COLORS[m],
                           linestyle=_STYLES[m]) for m in models]
        else:
            series = [dict(x=steps, y=metrics["mean"][m][k], std=_band(metrics["std"][m][k]), label=_LABELS[m],
                           color=_COLORS[m], marker="o", linestyle=_STYLES[m]) for m in models]
        shape = f" ({args.n_layer or '-'} blocks x {args.n_embd or '-'})" if args.n_layer or args.n_embd else ""
        plots.append(line_plot(out / f"{k}.png", series, title=f"{_TITLES[k]}\n{args.size}{shape}, mean ± std over "
                               f"{len(metrics['seeds'])} seed(s)", xlabel="training step", ylabel=k))
    series = []
    for m, comp in metrics.get("comparison_by_model", {MODELS[1]: metrics["comparison"]}).items():
        for (k, c), style in zip(comp.items(), ("-", "--")):
            series.append(dict(x=steps, y=c["paired_mean"], std=_band(c["paired_std"]), label=f"{_LABELS[m]}: {k}",
                               marker="o", color=_COLORS[m], linestyle=style))
    plots.append(line_plot(out / "advantage.png", series, title="advantage of each pruned model over the full one\n"
                           "(paired per seed, mean ± std; > 0: it is ahead)", xlabel="training step",
                           ylabel="nats", hlines=[dict(y=0.0, color="black", linestyle="-")]))
    if metrics["mode"] == "macondo":
        ns = sorted(int(k[3:]) for k in metrics["mean"][MODELS[0]] if k[3:].isdigit())
        cmap = __import__("matplotlib").colormaps["viridis"]
        series = [dict(x=steps, y=metrics["mean"][m][f"ll_{n}"], label=f"n={n}, {_LABELS[m]}",
                       color=cmap(i / max(1, len(ns) - 1)), linestyle=_STYLES[m])
                  for i, n in enumerate(ns) for m in models]
        hl = [dict(y=math.log(1 / n), color=cmap(i / max(1, len(ns) - 1)), linestyle=(0, (1, 4))) for i, n in enumerate(ns)]
        plots.append(line_plot(out / "ll_by_children.png", series, title="log-likelihood per number of children n\n"
                               "(sparse dots: the optimum log 1/n)",
                               xlabel="training step", ylabel="log-likelihood", hlines=hl))
    results = write_results(out, dataclasses.asdict(args), metrics, started=started,
                            claims=[c.record() for c in hurdle_claims(metrics, "this run")])
    table = write_markdown(out, markdown_report(args, metrics))
    return {"results": results, "table": table, "plots": plots}


def report_part(metrics: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """knnlm reproduce: the hurdle run's claims (its tables and figures stay in its own results.md and PNGs)."""
    return {}, hurdle_claims(metrics, entry["label"])
