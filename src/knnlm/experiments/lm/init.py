"""`knnlm lm train --init_from`: training a finished LM further (the memory study's equal-compute controls) -- the model
loaded and checked against this run's tokenizer and size, the output-layer-only setting, the learning rate it left off
at."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...errors import KnnlmError
from ...fileio import read_record, sha256_file
from .settings import TRAINING_JSON, LMArgs

log = logging.getLogger(__name__)


def init_record(args: LMArgs) -> dict:
    """The ``training.json`` of ``--init_from`` (a finished `knnlm lm train` folder)."""
    folder = Path(args.init_from)
    if not (folder / TRAINING_JSON).is_file():
        raise KnnlmError(f"--init_from: {folder} holds no finished `knnlm lm train` model ({TRAINING_JSON}); "
                         "train it first or pass that command's --output_dir")
    try:
        return read_record(folder / TRAINING_JSON, fix="pass a folder `knnlm lm train` finished",
                           required=("steps", "history"))  # (kept_step_lr's)
    except KnnlmError as e:
        raise KnnlmError(f"--init_from: {e}") from None


def init_key(args: LMArgs) -> dict:
    """What a run started from ``--init_from`` depends on beyond its own settings: the init model's weights."""
    init_record(args)
    folder = Path(args.init_from)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise KnnlmError(f"--init_from: {folder} has no model.safetensors; pass a folder written by `knnlm lm train`")
    return {"init_sha256": sha256_file(weights)}


def kept_step_lr(record: dict, folder: str) -> float:
    """The learning rate the init run would have used next after its kept step (the best evaluation with early
    stopping, else its last): where ``--lr_from_init`` continues its schedule."""
    step = record.get("best_step", record["steps"])
    lr = next(h["lr"] for h in record["history"] if h["step"] == step)
    if not lr > 0:
        raise KnnlmError(f"--lr_from_init: {folder}'s learning rate after its kept step {step} is {lr} (its schedule "
                         "had ended); pass --learning_rate and --lr_from_init false")
    return float(lr)


def _vocabulary(tokenizer) -> dict:
    """A fast tokenizer's model (vocabulary and merges) and special tokens: what makes two token streams the same."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return {"model": spec["model"], "added_tokens": spec["added_tokens"]}


def load_init(args: LMArgs, tokenizer, n_positions: int):
    """``--init_from``'s GPT-2 with this run's dropout; refused in one line when its tokenizer is not ``tokenizer`` or
    its shape is not ``--size`` with context ``n_positions``."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from ...assets import SCRATCH_SIZES

    folder = Path(args.init_from)
    theirs = AutoTokenizer.from_pretrained(folder)
    if _vocabulary(theirs) != _vocabulary(tokenizer):
        raise KnnlmError(f"--init_from: {folder}'s tokenizer ({len(theirs)} entries) is not the one --tokenizer "
                         f"{args.tokenizer} builds on --train_file ({len(tokenizer)} entries); pass the --tokenizer "
                         "and --train_file that model was trained with")
    model = GPT2LMHeadModel.from_pretrained(folder, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
                                            attn_pdrop=args.dropout)
    c = model.config
    if (c.n_layer, c.n_embd, c.n_head) != SCRATCH_SIZES[args.size] or c.n_positions != n_positions:
        raise KnnlmError(f"--init_from: {folder} is a GPT-2 of {c.n_layer} layers x {c.n_embd}, context "
                         f"{c.n_positions}, not --size {args.size} with --block_size {n_positions}; pass its size and "
                         "block size")
    log.info("starting from %s", folder)
    return model


def train_output_layer_only(model) -> None:
    """Freezes every parameter but the output layer's. GPT-2's output layer is its input embedding (tied): it becomes a
    trainable copy of its own, so training it leaves the input embeddings as they were; saved with
    ``tie_word_embeddings`` false."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # [V, d], no longer the embedding's storage
    model.config.tie_word_embeddings = False
