"""`knnlm lm train`'s settings: ``LMArgs`` beside ``LMTrainArgs`` (the library's ``knnlm.train.TrainArgs`` with
from-scratch defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ...corpus import skip_bad_rows_field
from ...errors import KnnlmError
from ...train import TrainArgs

# `knnlm reproduce --smoke`: the flags that shrink an `lm train` stage to seconds
SMOKE = {"lm train": {"--size": "tiny", "--block_size": "64", "--batch_size": "4", "--max_steps": "3",
                      "--eval_every": "3", "--eval_tokens": "256", "--bf16": "false"}}
EOS_TOKEN = "<|endoftext|>"
TRAINING_JSON = "training.json"  # written last into the output folder: marks a finished model


@dataclass
class LMArgs:
    train_file: Optional[str] = field(default=None, metadata={"help": "Training text (.txt: one document, newlines kept; .jsonl: one document per line, .csv/.tsv/.parquet: one per row of the text column, joined with EOS)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Validation text, same formats; perplexity is reported on it."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder of the trained model (HF format); a rerun of the same command resumes from OUTPUT_DIR/work."})
    size: str = field(default="small", metadata={"help": "From-scratch GPT-2 size, a name of knnlm.assets.SCRATCH_SIZES: tiny (2x64), small (4x256), gpt2-small (12x768)."})
    tokenizer: str = field(default="gpt2", metadata={"help": "gpt2 (offline GPT-2 BPE), bpe:<vocab_size> (a byte-level BPE trained on --train_file), or a tokenizer hub id / folder."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block and evaluation window; also the model's context length (n_positions)."})
    dropout: float = field(default=0.1, metadata={"help": "GPT-2 dropout (residual, embedding, attention); GPT-2 uses 0.1."})
    eval_every: Optional[int] = field(default=None, metadata={"help": "Evaluate validation perplexity every N steps (and always at step 0 and at the end)."})
    eval_tokens: Optional[int] = field(default=None, metadata={"help": "Validation tokens scored at intermediate evaluation points (a prefix of the file; unset = all); the final perplexity always uses the whole file."})
    eval_batch_size: int = field(default=16, metadata={"help": "Windows per forward pass during evaluation."})
    max_train_tokens: Optional[int] = field(default=None, metadata={"help": "Train on the first N tokens of --train_file only (quick runs)."})
    overwrite: bool = field(default=False, metadata={"help": "Delete the knnlm LM run (finished or not) in --output_dir and start over; a folder holding anything else is never deleted."})
    skip_bad_rows: bool = skip_bad_rows_field()
    init_from: Optional[str] = field(default=None, metadata={"help": "Start from this finished `knnlm lm train` model folder instead of a random init (training it further): --tokenizer on --train_file must build its tokenizer, --size and --block_size must be its."})
    train_only: Literal["all", "lm_head"] = field(default="all", metadata={"help": "all: train every parameter; lm_head: only the output layer (needs --init_from; GPT-2 ties it to the input embedding, so it gets its own trainable copy, everything else is frozen and the model is saved untied)."})
    lr_from_init: bool = field(default=False, metadata={"help": "With --init_from: the peak learning rate is the init run's at its kept step (its training.json) instead of --learning_rate; with --lr_scheduler_type linear --warmup_ratio 0 its decay continues from there to 0 over this run."})

    def validate(self) -> None:
        for name in ("train_file", "validation_file", "output_dir"):
            if not getattr(self, name):
                raise KnnlmError(f"--{name}: required")
        from ...assets import SCRATCH_SIZES

        if self.size not in SCRATCH_SIZES:
            raise KnnlmError(f"--size: {self.size!r} is not a from-scratch GPT-2 size; use one of {', '.join(SCRATCH_SIZES)}")
        if self.block_size < 2:
            raise KnnlmError(f"--block_size: must be >= 2, got {self.block_size}")
        if not 0 <= self.dropout < 1:
            raise KnnlmError(f"--dropout: must be in [0, 1), got {self.dropout}")
        for name in ("eval_every", "eval_tokens", "max_train_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise KnnlmError(f"--{name}: must be >= 2 (or unset), got {getattr(self, name)}")
        if self.eval_batch_size < 1:
            raise KnnlmError(f"--eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        bpe_vocab(self.tokenizer)  # checks a bpe:N spec
        for name, on in (("train_only", self.train_only != "all"), ("lr_from_init", self.lr_from_init)):
            if on and not self.init_from:
                raise KnnlmError(f"--{name}: needs --init_from (a trained model to continue from)")


@dataclass
class LMTrainArgs(TrainArgs):
    """:class:`knnlm.train.TrainArgs` with from-scratch defaults (fine-tuning's 1e-5 barely moves a random model)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of AdamW (from scratch: ~1e-3 with warm-up)."})
    batch_size: int = field(default=16, metadata={"help": "Blocks per micro-batch on each process."})
    epochs: int = field(default=1, metadata={"help": "Passes over the training blocks (ignored when --max_steps is set)."})


# ---------------------------------------------------------------------------------------------------------------- tokenizer
BPE_MAX_VOCAB = 2 ** 20  # GPT-2 has 50257 tokens, GPT-4's cl100k_base 100256


def bpe_vocab(spec: str) -> int | None:
    """``bpe:N`` -> N (checked); anything else -> None."""
    if not spec.startswith("bpe:"):
        return None
    try:
        n = int(spec[4:])
    except ValueError:
        raise KnnlmError(f"--tokenizer: {spec!r}: the vocabulary size after bpe: must be a whole number, e.g. "
                         "bpe:8192") from None
    if n < 257:
        raise KnnlmError(f"--tokenizer: {spec!r} needs a vocabulary size >= 257 (256 bytes + {EOS_TOKEN}), e.g. bpe:8192")
    if n > BPE_MAX_VOCAB:  # the tokenizers trainer allocates per entry up front: bpe:999999999999 aborted the process
        raise KnnlmError(f"--tokenizer: {spec!r}: the vocabulary size must be at most {BPE_MAX_VOCAB} (2**20), e.g. "
                         "bpe:8192")
    return n
