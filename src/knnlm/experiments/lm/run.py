"""`knnlm lm train`'s run: a seeded GPT-2 of a named size trained on ``knnlm.train``; ``OUTPUT_DIR/work`` holds what a
rerun resumes from."""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from ...corpus import check_file, skipped_rows
from ...errors import KnnlmError
from ...fileio import (LOCK_FILE, RUN_MARKER, atomic_write_json, claim_output_dir, read_json, read_record,
                       releases_locks, remove_own_files, sha256_file)
from ...train import TrainArgs, train
from .data import _tokenize_files, _word_ppl, block_batches, build_tokenizer, perplexity
from .init import init_key, init_record, kept_step_lr, load_init, train_output_layer_only
from .report import save_final
from .settings import TRAINING_JSON, LMArgs

log = logging.getLogger(__name__)


def build_model(size: str, tokenizer, block_size: int, dropout: float, seed: int):
    """A seeded random-init ``GPT2LMHeadModel`` of a named size with the tokenizer's vocabulary and context ``block_size``."""
    from transformers import GPT2LMHeadModel

    from ...assets import scratch_config

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
    key = {**dataclasses.asdict(args), **targs.resume_key()}
    for k in ("overwrite", "output_dir"):
        key.pop(k)
    for k, off in (("skip_bad_rows", False), ("init_from", None), ("train_only", "all"), ("lr_from_init", False)):
        if key[k] == off:
            key.pop(k)  # (runs from before the option resume)
    if args.init_from:
        key.update(init_key(args))
    # the corpora by content, not only by path: a file replaced under the same name is another run (not the finished
    # model, nor a checkpoint of the old text to resume on the new one)
    # (checked first: a folder or a missing file was an OSError naming the path but not the flag)
    key[CORPUS_KEY] = {name: sha256_file(check_file(getattr(args, name), f"--{name}"))[:16]
                       for name in ("train_file", "validation_file")}
    return key


def _settings(key: dict) -> dict:
    """A run key less the corpora's hashes: its paths and settings."""
    return {k: v for k, v in key.items() if k != CORPUS_KEY}


def _same_run(recorded, key: dict) -> bool:
    """Whether a recorded run key is this run's; one recorded before the corpora's hashes were (its paths and settings
    equal) is too."""
    if isinstance(recorded, dict) and CORPUS_KEY not in recorded:
        return recorded == _settings(key)
    return recorded == key


def _refuse_changed_corpus(out: Path, recorded, key: dict) -> None:
    """A run whose settings are this one's but whose corpus file changed: named by its flag."""
    if not isinstance(recorded, dict) or recorded.get(CORPUS_KEY) in (None, key[CORPUS_KEY]):
        return
    if _settings(recorded) != _settings(key):
        return
    name = next(n for n, h in key[CORPUS_KEY].items() if recorded[CORPUS_KEY].get(n) != h)
    raise KnnlmError(f"--{name}: {key[name]} is not the text {out} was trained on (its content changed); pass "
                     "--overwrite true to train on it from the start, or another --output_dir")


# what `knnlm lm train` writes into its folder: the HF model and tokenizer files, its records, and work/ while running
OWN_FILES = ("work", TRAINING_JSON, "config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "added_tokens.json", "chat_template.jinja", "results.json", "results.md", "val_ppl.png")
KIND = "lm train"
CORPUS_KEY = "corpus_sha256"  # run-key entry: the first 16 hex of each corpus file's sha256


def _nothing_to_keep(out: Path) -> bool:
    """Whether ``out`` holds only what a run stopped before its first checkpoint leaves (its marker and a work/ of
    tokens and tokenizer, remade from any settings): nothing to resume or to lose, so other settings may replace it."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    checkpoint = out / "work" / "checkpoint"
    return names <= {RUN_MARKER, LOCK_FILE, "work"} and not (checkpoint.exists() and any(checkpoint.iterdir()))


def _prepare_output(args: LMArgs, targs: TrainArgs) -> Path | None:
    """Returns the work folder to (re)start in, or None when ``output_dir`` already holds this finished model.

    ``--overwrite`` deletes only this command's own files (a datastore built inside the model folder, a user's file:
    the folder is refused instead). A run of other settings that stopped before its first checkpoint (at a bad input)
    is replaced without it: the corrected rerun would otherwise be refused over a folder with nothing in it to keep."""
    out = Path(args.output_dir)
    work = out / "work"
    key = _run_key(args, targs)
    finished = _read_run_record(out / TRAINING_JSON, args.overwrite, "run_key")
    unfinished = _read_run_record(work / "run.json", args.overwrite)
    if not args.overwrite:
        for recorded in (finished, unfinished):
            _refuse_changed_corpus(out, recorded, key)
    if _same_run(finished, key) and not args.overwrite:
        _check_results(out)
        shutil.rmtree(work, ignore_errors=True)  # what a run killed after writing its record had left to delete
        return None
    replaceable = args.overwrite or _nothing_to_keep(out)
    marked = _read_key(out / RUN_MARKER, "inputs")
    # a run marked before the corpora's hashes were keeps its marker's form, so that it resumes
    claim_key = marked if marked != key and _same_run(marked, key) else key
    state = claim_output_dir(out, KIND, claim_key, replaceable, own_files=OWN_FILES, what="model")
    other = state == "replace" or not (finished is None or _same_run(finished, key)) or \
        not (unfinished is None or _same_run(unfinished, key))
    if other and not replaceable:  # (a folder from before the marker: its own records say whose it is)
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


_DAMAGED_FIX = "pass --overwrite true to train the model again, or another --output_dir"
# the fields of training.json that `lm train`'s summary of a finished model indexes (every record has them)
TRAINING_FIELDS = ("history", "n_parameters", "vocab_size", "val_ppl", "steps", "epochs", "train_wall_s")


def _read_run_record(path: Path, overwrite: bool, field_name: str | None = None):
    """The run key recorded in ``training.json`` (``field_name``) or ``work/run.json``; None when there is none. A
    record that is not JSON or not an object is refused naming it (as a key it would match no run: "other settings"),
    but with ``overwrite``, which replaces the run anyway, it counts as none."""
    if not path.is_file():
        return None
    try:
        record = read_record(path, fix=_DAMAGED_FIX)
    except KnnlmError:
        if overwrite:
            return None
        raise
    return record.get(field_name) if field_name else record


def _check_results(out: Path) -> None:
    """Refuses a finished model whose ``results.json`` is missing or damaged: it is written just before
    ``training.json``, so the folder is not the finished run its ``training.json`` says, and the training checkpoint
    that could rebuild it is gone."""
    path = out / "results.json"
    if not path.is_file():
        raise KnnlmError(f"--output_dir: {out} holds this model but its results.json is missing; {_DAMAGED_FIX}")
    record = read_record(path, fix=_DAMAGED_FIX)
    if not isinstance(record.get("metrics"), dict):
        raise KnnlmError(f"{path} is corrupt (no 'metrics' record); {_DAMAGED_FIX}")


def _tokenizer_in(work: Path, args: LMArgs):
    from transformers import AutoTokenizer

    from ...assets import atomic_dir

    folder = work / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        tok = build_tokenizer(args.tokenizer, args.train_file, args.block_size, args.skip_bad_rows)
        with atomic_dir(folder) as tmp:
            tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder)


@releases_locks
def train_lm(args: LMArgs, targs: TrainArgs) -> dict:
    """Runs (or resumes) the whole pipeline; returns the ``training.json`` record of the finished model."""
    from accelerate import PartialState

    started = time.time()
    if args.lr_from_init:  # resolved before the run key: the record says the rate this run trained at
        targs = dataclasses.replace(targs, learning_rate=kept_step_lr(init_record(args), args.init_from))
        log.info("--lr_from_init: peak learning rate %.4g (the init run's after its kept step)", targs.learning_rate)
    dist = PartialState(cpu=not torch.cuda.is_available())  # several processes: the main one prepares and saves
    out = Path(args.output_dir)
    work = _prepare_output(args, targs) if dist.is_main_process else None
    dist.wait_for_everyone()
    if not dist.is_main_process:
        work = out / "work" if (out / "work" / "run.json").is_file() else None
    if work is None:
        log.info("%s already holds this model; nothing to do (--overwrite true retrains)", out)
        return read_record(out / TRAINING_JSON, fix=_DAMAGED_FIX, required=TRAINING_FIELDS)
    with dist.main_process_first():
        tokenizer = _tokenizer_in(work, args)
        train_tokens, val_tokens = _tokenize_files(tokenizer, args, work)
    batches = block_batches(train_tokens, args.block_size, targs.batch_size)  # refuses a --block_size too long
    if args.init_from:
        model = load_init(args, tokenizer, args.block_size)
    else:
        model = build_model(args.size, tokenizer, args.block_size, args.dropout, targs.seed)
    if args.train_only == "lm_head":
        train_output_layer_only(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("GPT-2 %s: %d parameters (%d trained), vocabulary %d; %d training tokens (%d blocks of %d), %d validation "
             "tokens", args.size, n_params, n_trainable, len(tokenizer), len(train_tokens),
             len(train_tokens) // args.block_size, args.block_size, len(val_tokens))

    val_eval = val_tokens if args.eval_tokens is None else val_tokens[: args.eval_tokens]

    def on_eval(step: int, m) -> dict:
        return perplexity(m, val_eval, args.block_size, args.eval_batch_size)

    history = train(model, batches, targs, work / "checkpoint", eval_every=args.eval_every, on_eval=on_eval,
                    progress_desc=f"lm {args.size} seed {targs.seed}")
    # the model now holds the kept step's weights: with early stopping the best evaluation's, else the last step's
    early = targs.early_stopping_patience is not None
    kept = next(h for h in history if h["step"] == history[-1]["best_step"]) if early else history[-1]
    final = kept if args.eval_tokens is None else perplexity(model, val_tokens, args.block_size, args.eval_batch_size)
    if not math.isfinite(final["val_loss"]):  # diverged: its NaN weights were saved as a finished model, exit 0
        raise KnnlmError(f"--learning_rate: training diverged (validation loss {final['val_loss']} at step "
                         f"{kept['step']}); lower --learning_rate (or set --max_grad_norm) and rerun with --overwrite "
                         "true")
    # the trainer's steps per epoch (each process takes an equal share of an epoch's micro-batches): a short last
    # micro-batch makes a step of fewer blocks, so steps x batch overstated the blocks seen (1.032 for one epoch)
    per_epoch = math.ceil(len(batches(0, targs.seed)) // dist.num_processes / targs.gradient_accumulation_steps)
    record = {
        "run_key": _run_key(args, targs), "args": dataclasses.asdict(args), "train_args": dataclasses.asdict(targs),
        "n_parameters": n_params, "n_trainable_parameters": n_trainable, "vocab_size": len(tokenizer),
        "train_tokens": int(len(train_tokens)),
        "stopped_early": bool(early and history[-1]["stopped_early"]), "best_step": kept["step"],
        "best_val_ppl": kept["val_ppl"],
        "steps": history[-1]["step"], "epochs": history[-1]["step"] / per_epoch,
        "val_loss": final["val_loss"], "val_ppl": final["val_ppl"], "val_tokens": final["val_tokens"],
        "val_word_ppl": _word_ppl(final, args.validation_file),
        "train_wall_s": history[-1]["elapsed_s"], "history": history,
        "skipped_rows": {"train": skipped_rows(work / "train.i32"), "validation": skipped_rows(work / "valid.i32")},
    }
    if dist.is_main_process:
        save_final(out, work, model, tokenizer, record, started)
    dist.wait_for_everyone()
    return record
