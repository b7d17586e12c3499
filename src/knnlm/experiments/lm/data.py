"""`knnlm lm train`'s data: the tokenizer (GPT-2's, a BPE trained on the training file, or any HF one), the token files,
shuffled contiguous blocks and the validation perplexity."""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ...corpus import ROW_SUFFIXES, TEXT_FIELD, BadRows, row_texts, text_pieces
from ...errors import KnnlmError
from ...train import epoch_permutation
from .settings import EOS_TOKEN, LMArgs, bpe_vocab

log = logging.getLogger(__name__)


def train_bpe_tokenizer(files: list[str | Path], vocab_size: int, model_max_length: int = 1024,
                        skip_bad_rows: bool = False):
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet; ``ByteLevelBPETokenizer`` equivalent) trained on
    ``files``, wrapped as a ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` (id 0) as BOS/EOS/PAD/UNK. Plain text is
    read as it is; JSONL and table files by the text of their rows (not their JSON or CSV syntax).

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
    files = [Path(f) for f in files]
    # (lm train has no --encoding_errors to suggest: a byte that is not UTF-8 is named, with how to re-encode)
    if any(f.suffix in ROW_SUFFIXES for f in files):
        rows = BadRows("--train_file", TEXT_FIELD, skip_bad_rows)
        texts = (t for f in files for t in (row_texts(f, TEXT_FIELD, "--train_file", rows=rows, encoding_flag=False)
                                            if f.suffix in ROW_SUFFIXES else
                                            ["".join(text_pieces(f, "--train_file", encoding_flag=False))]))
        tok.train_from_iterator(texts, trainer)
    else:
        try:
            tok.train([str(f) for f in files], trainer)
        except Exception as e:  # the Rust trainer's "stream did not contain valid UTF-8" names neither file nor byte
            if "UTF-8" not in str(e):
                raise
            for f in files:  # read again, only now: the first byte that is not UTF-8 is the one-line error
                for _ in text_pieces(f, "--train_file", encoding_flag=False):
                    pass
            raise
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                  unk_token=EOS_TOKEN, model_max_length=model_max_length)


def build_tokenizer(spec: str, train_file: str | Path, model_max_length: int, skip_bad_rows: bool = False):
    """``gpt2`` | ``bpe:N`` (trained on ``train_file`` only) | a hub id or folder -> a fast tokenizer with an EOS and PAD."""
    from transformers import AutoTokenizer

    from ...assets import resolve_tokenizer_source

    n = bpe_vocab(spec)
    if n is not None:
        log.info("training a byte-level BPE tokenizer (vocabulary %d) on %s", n, train_file)
        tok = train_bpe_tokenizer([train_file], n, model_max_length, skip_bad_rows)
        if len(tok) < n:  # the trainer stops when no pair occurs twice: the model is built for the vocabulary made
            log.warning("--tokenizer %s: %s has too few repeated pairs for %d tokens; the vocabulary is %d (the "
                        "records' vocab_size)", spec, train_file, n, len(tok))
        return tok
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
    from ...corpus import CorpusArgs, TextEncoder, tokenize_to_file

    enc = TextEncoder(tokenizer)
    corpus = CorpusArgs(train_file=args.train_file, validation_file=args.validation_file, max_tokens=args.max_train_tokens,
                        skip_bad_rows=args.skip_bad_rows)
    # (lm train has no --encoding_errors to suggest)
    train_tokens = tokenize_to_file(enc, corpus, "train", work / "train.i32", encoding_flag=False).tokens  # int32 [n]
    val_corpus = dataclasses.replace(corpus, max_tokens=None)
    return train_tokens, tokenize_to_file(enc, val_corpus, "validation", work / "valid.i32", encoding_flag=False).tokens


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
    from ...corpus import batch_inputs, target_positions, target_tokens, windows
    from ...scoring import head_gold_log_probs

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
    with open(path, encoding="utf-8-sig") as fh:  # (a BOM is no word: the tokens drop it too)
        for line in fh:
            n += len(line.split()) + line.endswith("\n")
    return n


def _word_ppl(final: dict, validation_file: str) -> float | None:
    """Perplexity per word (comparable across tokenizers) for a plain-text file; None for JSONL or a table."""
    if Path(validation_file).suffix in ROW_SUFFIXES:
        return None
    return math.exp(final["val_loss"] * final["val_tokens"] / count_words(validation_file))
