"""`knnlm lm train`: a from-scratch GPT-2 language model on a text file (e.g. "a small GPT-2 trained on WikiText-2").

Pipeline: tokenizer (GPT-2's BPE, a byte-level BPE trained on the training file, or any HF tokenizer) -> the training
and validation files streamed to int32 token files -> a seeded random-init GPT-2 of a named size
(``knnlm.assets.SCRATCH_SIZES``) with the tokenizer's vocabulary -> :func:`knnlm.train.train` on shuffled contiguous
blocks -> validation perplexity at evaluation points -> an HF folder that ``AutoModelForCausalLM.from_pretrained`` and
``knnlm.models.load_model`` load.

While it runs, ``OUTPUT_DIR/work/`` holds the run's settings, the tokenizer, the token files and the trainer's
checkpoint, so a rerun of the same command resumes. At the end the model and tokenizer files, ``training.json``
(settings, validation curve, wall time), ``results.json``, ``results.md`` and ``val_ppl.png`` are moved into
``OUTPUT_DIR`` (``config.json`` is the model's HF config there, not the run config) and ``work/`` is deleted.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional

import numpy as np
import torch

from ..corpus import skip_bad_rows_field, skipped_rows
from ..errors import KnnlmError
from ..fileio import atomic_write_json, claim_output_dir, read_json, releases_locks, remove_own_files
from ..train import TrainArgs, epoch_permutation, train

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
TRAINING_JSON = "training.json"  # written last into the output folder: marks a finished model


@dataclass
class LMArgs:
    train_file: Optional[str] = field(default=None, metadata={"help": "Training text (.txt: one document, newlines kept; .jsonl: one document per line, joined with EOS)."})
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

    def validate(self) -> None:
        for name in ("train_file", "validation_file", "output_dir"):
            if not getattr(self, name):
                raise KnnlmError(f"--{name}: required")
        from ..assets import SCRATCH_SIZES

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


@dataclass
class LMTrainArgs(TrainArgs):
    """:class:`knnlm.train.TrainArgs` with from-scratch defaults (fine-tuning's 1e-5 barely moves a random model)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of AdamW (from scratch: ~1e-3 with warm-up)."})
    batch_size: int = field(default=16, metadata={"help": "Blocks per micro-batch on each process."})
    epochs: int = field(default=1, metadata={"help": "Passes over the training blocks (ignored when --max_steps is set)."})


# ---------------------------------------------------------------------------------------------------------------- tokenizer
def bpe_vocab(spec: str) -> int | None:
    """``bpe:N`` -> N (checked); anything else -> None."""
    if not spec.startswith("bpe:"):
        return None
    try:
        n = int(spec[4:])
    except ValueError:
        n = -1
    if n < 257:
        raise KnnlmError(f"--tokenizer: {spec!r} needs a vocabulary size >= 257 (256 bytes + {EOS_TOKEN}), e.g. bpe:8192")
    return n


def train_bpe_tokenizer(files: list[str | Path], vocab_size: int, model_max_length: int = 1024):
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet; ``ByteLevelBPETokenizer`` equivalent) trained on
    ``files``, wrapped as a ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` (id 0) as BOS/EOS/PAD/UNK.

    BPE training is deterministic (merges ranked by count, ties broken by the pair), so no seed is needed: the same
    files and vocabulary size give the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                  unk_token=EOS_TOKEN, model_max_length=model_max_length)


def build_tokenizer(spec: str, train_file: str | Path, model_max_length: int):
    """``gpt2`` | ``bpe:N`` (trained on ``train_file`` only) | a hub id or folder -> a fast tokenizer with an EOS and PAD."""
    from transformers import AutoTokenizer

    from ..assets import resolve_tokenizer_source

    n = bpe_vocab(spec)
    if n is not None:
        log.info("training a byte-level BPE tokenizer (vocabulary %d) on %s", n, train_file)
        return train_bpe_tokenizer([train_file], n, model_max_length)
    try:
        tok = AutoTokenizer.from_pretrained(resolve_tokenizer_source(spec))
    except (OSError, ValueError) as e:
        raise KnnlmError(f"--tokenizer: cannot load {spec!r} ({str(e).splitlines()[0]}); pass gpt2, bpe:<vocab_size> "
                         "or a local tokenizer folder") from None
    if tok.eos_token_id is None or not tok.is_fast:
        raise KnnlmError(f"--tokenizer: {spec!r} must be a fast tokenizer with an EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = model_max_length
    return tok


def _tokenize_files(tokenizer, args: LMArgs, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation files -> int32 token memmaps, through ``corpus.tokenize_to_file`` (streamed, as the
    datastore tokenizes a corpus) with the part of ``knnlm.models.LM`` it uses."""
    import copy

    from ..corpus import CorpusArgs, tokenize_to_file

    tok = copy.copy(tokenizer)
    tok.model_max_length = int(1e12)  # whole files are encoded at once: no "sequence longer than the model" warning
    enc = SimpleNamespace(tokenizer=tok, eos_token_id=tok.eos_token_id, encode=lambda text: tok(text)["input_ids"])
    corpus = CorpusArgs(train_file=args.train_file, validation_file=args.validation_file, max_tokens=args.max_train_tokens,
                        skip_bad_rows=args.skip_bad_rows)
    train_tokens = tokenize_to_file(enc, corpus, "train", work / "train.i32").tokens  # int32 memmap [n]
    val_corpus = dataclasses.replace(corpus, max_tokens=None)
    return train_tokens, tokenize_to_file(enc, val_corpus, "validation", work / "valid.i32").tokens


# ---------------------------------------------------------------------------------------------------------------- data
class BlockBatches:
    """An epoch of micro-batches over contiguous ``block_size`` blocks of a token array, in a (seed, epoch) order.

    Block ``i`` is ``tokens[i*L : (i+1)*L]`` (a ragged tail is dropped, as run_clm does); the last batch may be short.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, epoch: int):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.order = epoch_permutation(len(tokens) // block_size, seed, epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        L = self.block_size
        for i in range(0, len(self.order), self.batch_size):
            ids = np.stack([self.tokens[b * L:(b + 1) * L] for b in self.order[i:i + self.batch_size]])  # [B, L]
            ids = torch.from_numpy(ids.astype(np.int64))
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def block_batches(tokens: np.ndarray, block_size: int, batch_size: int):
    """The ``batches(epoch, seed)`` callable of :func:`knnlm.train.train` over contiguous blocks."""
    if len(tokens) // block_size == 0:
        raise KnnlmError(f"--train_file: {len(tokens)} tokens make no block of --block_size {block_size}; "
                         "use a longer file or a smaller block")
    return lambda epoch, seed: BlockBatches(tokens, block_size, batch_size, seed, epoch)


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, block_size: int, batch_size: int = 16) -> dict:
    """Token-weighted perplexity over windows of ``block_size`` that overlap by one token, so every token but the first
    is scored exactly once (``corpus.windows`` with stride = block size): ``val_loss`` (mean NLL, nats), ``val_ppl``,
    ``val_tokens``. Gold log-probs come from the shared kernel (``knnlm.scoring``) on the model body's last hidden
    states at the scored positions, so no [B, T, V] log-softmax is built."""
    from ..corpus import batch_inputs, target_positions, target_tokens, windows
    from ..scoring import head_gold_log_probs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = windows(np.asarray([0, len(tokens)]), block_size, block_size)
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for i in range(0, len(wins), batch_size):
            group = wins[i:i + batch_size]
            ids, mask = batch_inputs(tokens, group, pad_id=0)  # [B, T] each
            rows, pos = target_positions(group)  # [n] each: position pos of row rows predicts the next token
            hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))[0]  # [B, T, d]
            gold_logp = head_gold_log_probs(model.get_output_embeddings(), hidden[rows.to(device), pos.to(device)],
                                            target_tokens(tokens, group))  # [n]
            nll -= gold_logp.double().sum().cpu()
            count += len(gold_logp)
    model.train(was_training)
    loss = float(nll) / count
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_tokens": count}


def count_words(path: str | Path) -> int:
    """Whitespace-separated words plus line breaks (WikiText's word-level count, which scores one <eos> per line)."""
    n = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            n += len(line.split()) + line.endswith("\n")
    return n


def _word_ppl(final: dict, validation_file: str) -> float | None:
    """Perplexity per word (comparable across tokenizers) for a plain-text file; None for JSONL."""
    if Path(validation_file).suffix in (".jsonl", ".json"):
        return None
    return math.exp(final["val_loss"] * final["val_tokens"] / count_words(validation_file))


# ---------------------------------------------------------------------------------------------------------------- model
def build_model(size: str, tokenizer, block_size: int, dropout: float, seed: int):
    """A seeded random-init ``GPT2LMHeadModel`` of a named size with the tokenizer's vocabulary and context ``block_size``."""
    from transformers import GPT2LMHeadModel

    from ..assets import scratch_config

    config = scratch_config(size, n_positions=block_size)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


# ---------------------------------------------------------------------------------------------------------------- runner
def _run_key(args: LMArgs, targs: TrainArgs) -> dict:
    key = {**dataclasses.asdict(args), **dataclasses.asdict(targs)}
    for k in ("overwrite", "log_every", "checkpoint_every", "output_dir"):
        key.pop(k)
    if not key["skip_bad_rows"]:
        key.pop("skip_bad_rows")  # (runs from before the option resume)
    return key


# what `knnlm lm train` writes into its folder: the HF model and tokenizer files, its records, and work/ while running
OWN_FILES = ("work", TRAINING_JSON, "config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "added_tokens.json", "chat_template.jinja", "results.json", "results.md", "val_ppl.png")
KIND = "lm train"


def _prepare_output(args: LMArgs, targs: TrainArgs) -> Path | None:
    """Returns the work folder to (re)start in, or None when ``output_dir`` already holds this finished model.

    ``--overwrite`` deletes only this command's own files (a datastore built inside the model folder, a user's file:
    the folder is refused instead)."""
    out = Path(args.output_dir)
    work = out / "work"
    key = _run_key(args, targs)
    finished = _read_key(out / TRAINING_JSON, "run_key")
    if finished == key and not args.overwrite:
        return None
    state = claim_output_dir(out, KIND, key, args.overwrite, own_files=OWN_FILES, what="model")
    unfinished = _read_key(work / "run.json")
    other = state == "replace" or finished not in (None, key) or unfinished not in (None, key)
    if other and not args.overwrite:  # (a folder from before the marker: its own records say whose it is)
        raise KnnlmError(f"--output_dir: {out} holds " + ("a model trained with other settings; pass --overwrite true "
                         "to replace it, or another folder" if finished is not None else "an unfinished run with other "
                         "settings; rerun it with the same settings to resume, or pass --overwrite true to start over"))
    if args.overwrite or other:
        removed = remove_own_files(out, OWN_FILES)
        if removed:
            log.info("--overwrite: deleted %s of the earlier run in %s", ", ".join(removed), out)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "run.json", key)
    return work


def _read_key(path: Path, field_name: str | None = None):
    """A run key recorded in ``path`` (or its ``field_name``); None when there is none."""
    if not path.is_file():
        return None
    record = read_json(path)
    return record.get(field_name) if field_name and isinstance(record, dict) else record


def _tokenizer_in(work: Path, args: LMArgs):
    from transformers import AutoTokenizer

    from ..assets import atomic_dir

    folder = work / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        tok = build_tokenizer(args.tokenizer, args.train_file, args.block_size)
        with atomic_dir(folder) as tmp:
            tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder)


@releases_locks
def train_lm(args: LMArgs, targs: TrainArgs) -> dict:
    """Runs (or resumes) the whole pipeline; returns the ``training.json`` record of the finished model."""
    from accelerate import PartialState

    started = time.time()
    dist = PartialState(cpu=not torch.cuda.is_available())  # several processes: the main one prepares and saves
    out = Path(args.output_dir)
    work = _prepare_output(args, targs) if dist.is_main_process else None
    dist.wait_for_everyone()
    if not dist.is_main_process:
        work = out / "work" if (out / "work" / "run.json").is_file() else None
    if work is None:
        log.info("%s already holds this model; nothing to do (--overwrite true retrains)", out)
        return read_json(out / TRAINING_JSON)
    with dist.main_process_first():
        tokenizer = _tokenizer_in(work, args)
        train_tokens, val_tokens = _tokenize_files(tokenizer, args, work)
    model = build_model(args.size, tokenizer, args.block_size, args.dropout, targs.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("GPT-2 %s: %d parameters, vocabulary %d; %d training tokens (%d blocks of %d), %d validation tokens",
             args.size, n_params, len(tokenizer), len(train_tokens), len(train_tokens) // args.block_size,
             args.block_size, len(val_tokens))

    val_eval = val_tokens if args.eval_tokens is None else val_tokens[: args.eval_tokens]

    def on_eval(step: int, m) -> dict:
        return perplexity(m, val_eval, args.block_size, args.eval_batch_size)

    history = train(model, block_batches(train_tokens, args.block_size, targs.batch_size), targs, work / "checkpoint",
                    eval_every=args.eval_every, on_eval=on_eval, progress_desc=f"lm {args.size} seed {targs.seed}")
    final = history[-1] if args.eval_tokens is None else perplexity(model, val_tokens, args.block_size,
                                                                    args.eval_batch_size)
    tokens_seen = history[-1]["step"] * targs.batch_size * targs.gradient_accumulation_steps * dist.num_processes \
        * args.block_size
    record = {
        "run_key": _run_key(args, targs), "args": dataclasses.asdict(args), "train_args": dataclasses.asdict(targs),
        "n_parameters": n_params, "vocab_size": len(tokenizer), "train_tokens": int(len(train_tokens)),
        "steps": history[-1]["step"], "epochs": tokens_seen / (len(train_tokens) // args.block_size * args.block_size),
        "val_loss": final["val_loss"], "val_ppl": final["val_ppl"], "val_tokens": final["val_tokens"],
        "val_word_ppl": _word_ppl(final, args.validation_file),
        "train_wall_s": history[-1]["elapsed_s"], "history": history,
        "skipped_rows": {"train": skipped_rows(work / "train.i32"), "validation": skipped_rows(work / "valid.i32")},
    }
    if dist.is_main_process:
        _save_final(out, work, model, tokenizer, record, started)
    dist.wait_for_everyone()
    return record


def _save_final(out: Path, work: Path, model, tokenizer, record: dict, started: float) -> None:
    """Writes everything into ``work/final``, moves the files into ``out`` (``training.json`` last), drops ``work``."""
    from ..report import line_plot, markdown_table, write_markdown, write_results

    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    hist = record["history"]
    shown = hist[1:] if len(hist) > 1 else hist  # step 0 (perplexity ~ the vocabulary size) would flatten the curve
    line_plot(final / "val_ppl.png", [{"x": [h["step"] for h in shown], "y": [h["val_ppl"] for h in shown],
                                       "label": "validation perplexity", "marker": "o"}],
              title=f"GPT-2 {record['args']['size']} on {Path(record['args']['train_file']).name} "
                    f"(step 0: {hist[0]['val_ppl']:.0f})", xlabel="step", ylabel="perplexity")
    rows = [[h["step"], h["epoch"], h["train_loss"], h["val_ppl"], h["val_tokens"], h["elapsed_s"]] for h in hist]
    table = markdown_table(["step", "epoch", "train loss", "val ppl", "val tokens", "train s"], rows)
    table += (f"\nFinal: validation perplexity {record['val_ppl']:.2f} per token over all {record['val_tokens']} tokens"
              + (f", {record['val_word_ppl']:.2f} per word" if record["val_word_ppl"] else "") + ".\n")
    write_markdown(final, table)
    metrics = {k: record[k] for k in ("val_ppl", "val_word_ppl", "val_loss", "val_tokens", "n_parameters", "vocab_size",
                                      "train_tokens", "steps", "epochs", "train_wall_s", "skipped_rows")}
    metrics["curve"] = [{"step": h["step"], "val_ppl": h["val_ppl"], "train_loss": h["train_loss"]} for h in hist]
    write_results(final, {**record["args"], **record["train_args"]}, metrics, started)
    atomic_write_json(final / TRAINING_JSON, record)
    names = sorted(p.name for p in final.iterdir() if p.name not in ("config.json", TRAINING_JSON))
    for name in [*names, "config.json", TRAINING_JSON]:  # config.json late: no loadable half-folder; training.json last
        os.replace(final / name, out / name)
    shutil.rmtree(work)
    log.info("model saved to %s: validation perplexity %.2f", out, record["val_ppl"])
