"""The hurdle study's data: seeded batch order, the (reduced) vocabulary, Macondo sentences or text blocks, and the
scoring adapter of ``knnlm.macondo.score``."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ...errors import KnnlmError
from ...train import collate_causal, epoch_permutation
from ..study import library_args
from .settings import HurdleArgs


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


_epoch_permutation = functools.lru_cache(maxsize=4)(epoch_permutation)  # the batches of one epoch share it


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


def load_tokenizer():
    from transformers import AutoTokenizer

    from ...assets import gpt2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir()))
    tokenizer.model_max_length = 1 << 62  # whole files are tokenized at once; the models see short blocks
    return tokenizer


def _macondo_rows(args: HurdleArgs, out: Path) -> list[dict]:
    from ...macondo.generate import MacondoArgs, generate_macondo, read_split

    if args.data != "macondo":
        return read_split(args.data, "test")
    folder = out / "macondo"
    if not (folder / "meta.json").is_file():
        generate_macondo(library_args(MacondoArgs, args, "macondo_", output_dir=str(folder), tokenizer="gpt2",
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
        from ...macondo.score import encode_rows

        rows = _macondo_rows(args, out)
        raw = [np.asarray(ids, np.int64) for ids, _ in encode_rows(ScoringLM(tokenizer, Vocab(full)), rows)]
        vocab = Vocab.build(raw, full, args.vocab_size)
        scoring = ScoringLM(tokenizer, vocab)
        encoded = encode_rows(scoring, rows)  # exactly what score_split feeds: prefix + target, in model ids
        if vocab.unk is not None and any(vocab.unk in ids[n:] for ids, n in encoded):
            raise KnnlmError(f"--vocab_size: {args.vocab_size} drops some children's names; raise it (or 0)")
        train = Examples(seqs=[np.asarray(ids, np.int64) for ids, _ in encoded])
        return StudyData("macondo", train, vocab, scoring.eos_token_id, rows=rows, tokenizer=tokenizer)
    from ...corpus import CorpusArgs, TextEncoder, tokenize_to_file

    shim = TextEncoder(tokenizer)
    corpus = CorpusArgs(train_file=args.data, validation_file=str(args.validation_path()),
                        max_tokens=args.max_train_tokens or None)
    # (named by hurdle's flags: --data is the training text, and hurdle has no --encoding_errors)
    train_tokens = np.asarray(tokenize_to_file(shim, corpus, "train", out / "data" / "train.tokens", flag="--data",
                                               encoding_flag=False).tokens)
    corpus.max_tokens = args.val_tokens or None
    val_tokens = np.asarray(tokenize_to_file(shim, corpus, "validation", out / "data" / "valid.tokens",
                                             encoding_flag=False).tokens)
    if len(train_tokens) < args.block_size * args.batch_size:
        raise KnnlmError(f"--data: {args.data} has {len(train_tokens)} tokens, fewer than one batch "
                         f"(--batch_size x --block_size = {args.batch_size * args.block_size})")
    if len(val_tokens) < args.block_size:
        raise KnnlmError(f"--validation_file: {len(val_tokens)} tokens, fewer than one --block_size block")
    vocab = Vocab.build([train_tokens], full, args.vocab_size)
    return StudyData("text", Examples(tokens=vocab.map(train_tokens), block_size=args.block_size), vocab,
                     int(vocab.map([tokenizer.eos_token_id])[0]),
                     val_blocks=Examples(tokens=vocab.map(val_tokens), block_size=args.block_size))
