"""Corpora (plain text, JSONL, HF datasets) streamed to an int32 token file, and the sliding windows over it."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .errors import KnnlmError
from .fileio import atomic_path, sha256_file

log = logging.getLogger(__name__)

# plain text is tokenized in 256k-character pieces: a fast tokenizer's per-token Python objects (ids, offsets) cost
# ~150 bytes a token, so the piece size, not the file size, sets the peak memory
_CHUNK_CHARS = 1 << 18
_CARRY_TOKENS = 8  # tokens re-tokenized across a piece boundary (see _encode_long_text)


@dataclass
class CorpusArgs:
    train_file: Optional[str] = field(default=None, metadata={"help": "Training corpus: a .txt file (one document) or .jsonl/.json (one document per line)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation corpus, same formats as --train_file."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A Hugging Face `datasets` name or local dataset folder, instead of a file."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The `datasets` configuration, e.g. wikitext-103-raw-v1."})
    split: Optional[str] = field(default=None, metadata={"help": "The `datasets` split to read (default: train for datastores, validation for evaluation)."})
    text_field: str = field(default="text", metadata={"help": "Field holding the text in JSONL rows or dataset rows."})
    block_size: int = field(default=0, metadata={"help": "Window length in tokens; 0 = the model's context length, capped at 1024."})
    stride: int = field(default=0, metadata={"help": "Tokens the window advances by; 0 = block_size // 2. Each token is scored once, with the longest context the window allows."})
    concat_documents: bool = field(default=True, metadata={"help": "Join JSONL/dataset documents with EOS into one stream (run_clm style); false windows each document on its own."})
    max_tokens: Optional[int] = field(default=None, metadata={"help": "Use only the first N tokens of the corpus (quick runs)."})

    def validate(self) -> None:
        if self.block_size < 0 or self.stride < 0:
            raise KnnlmError("--block_size/--stride: must be >= 0 (0 picks the default)")
        if self.block_size and self.stride > self.block_size:
            raise KnnlmError(f"--stride: {self.stride} exceeds --block_size {self.block_size}; tokens would be skipped")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise KnnlmError("--max_tokens: needs at least 2 tokens")

    def require(self, which: str) -> None:
        """Fails fast (before any model is loaded) when the corpus to read is missing or unreadable."""
        if self.dataset_name:
            return
        path = self.train_file if which == "train" else self.validation_file
        if not path:
            raise KnnlmError(f"--{which}_file: required (or --dataset_name): the corpus to read")
        _check_file(path, f"--{which}_file")

    def resolved_window(self, model_context: int) -> tuple[int, int]:
        block = self.block_size or min(model_context, 1024)
        if block > model_context:
            raise KnnlmError(f"--block_size: {block} exceeds the model's context length {model_context}")
        stride = self.stride or max(1, block // 2)
        if stride > block:
            raise KnnlmError(f"--stride: {stride} exceeds the block size {block}; tokens would be skipped")
        return block, stride


# ---------------------------------------------------------------------------------------------------------------- reading
def _check_file(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise KnnlmError(f"{flag}: {p} does not exist or is not a file; pass a readable .txt or .jsonl file")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as e:
        raise KnnlmError(f"{flag}: {p} cannot be read ({e.strerror}); check its permissions") from None
    return p


def _jsonl_texts(path: Path, text_field: str, flag: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise KnnlmError(f"{flag}: {path}:{lineno} is not valid JSON; one JSON object per line is expected") from None
            if not isinstance(row, dict) or text_field not in row:
                raise KnnlmError(f"{flag}: {path}:{lineno} has no field '{text_field}'; set --text_field")
            yield str(row[text_field])


def _dataset_texts(args: CorpusArgs, split: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=split)
    except Exception as e:  # datasets raises many kinds; all mean the same thing to the user
        raise KnnlmError(f"--dataset_name: cannot load {args.dataset_name!r} ({args.dataset_config_name}, split "
                         f"{split}): {str(e).splitlines()[0]}") from None
    if args.text_field not in ds.column_names:
        raise KnnlmError(f"--text_field: dataset has no column '{args.text_field}' (columns: {ds.column_names})")
    for row in ds:
        yield row[args.text_field]


def _encode_long_text(tokenizer, path: Path, add_special: bool) -> Iterator[np.ndarray]:
    """Tokenizes a text file piece by piece with the result of tokenizing it as one string.

    Each piece's last few tokens are dropped and their text carried into the next piece, so no token straddling a
    piece boundary is ever cut (pre-tokenization regexes are local, so tokens further back are final).
    """
    carry, first = "", True
    with open(path, encoding="utf-8", newline="") as fh:
        while True:
            piece = fh.read(_CHUNK_CHARS)
            text = carry + piece
            if not text:
                return
            enc = tokenizer(text, add_special_tokens=add_special and first, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            if not piece:  # end of file: everything is final
                yield np.asarray(ids, np.int32)
                return
            keep = max(0, len(ids) - _CARRY_TOKENS)
            while keep > 0 and offsets[keep][0] == 0 and offsets[keep][1] == 0:  # special token: keep with the piece
                keep -= 1
            cut = offsets[keep][0] if keep < len(ids) else len(text)
            final = np.asarray(ids[:keep], np.int32)
            del enc, ids, offsets  # free this piece's Python objects before the next piece is tokenized
            carry, first = text[cut:], False
            yield final


def _documents(lm, args: CorpusArgs, which: str) -> Iterator[tuple[list[int] | np.ndarray, bool]]:
    """Yields ``(token ids, continues_previous)``: documents encoded as ``lm.encode`` does (BOS where the tokenizer adds
    one); a long plain-text document arrives in several pieces, all but the first marked as continuing."""
    if args.dataset_name:
        split = args.split or ("train" if which == "train" else "validation")
        for text in _dataset_texts(args, split):
            yield lm.encode(text), False
        return
    flag = f"--{which}_file"
    path_str = args.train_file if which == "train" else args.validation_file
    if not path_str:
        raise KnnlmError(f"{flag}: required (or --dataset_name)")
    path = _check_file(path_str, flag)
    if path.suffix in (".jsonl", ".json"):
        for text in _jsonl_texts(path, args.text_field, flag):
            yield lm.encode(text), False
    elif getattr(lm.tokenizer, "is_fast", False):
        for i, piece in enumerate(_encode_long_text(lm.tokenizer, path, add_special=True)):
            yield piece, i > 0
    else:
        yield lm.encode(path.read_text(encoding="utf-8")), False


# ---------------------------------------------------------------------------------------------------------------- token file
@dataclass
class TokenFile:
    """Corpus tokens on disk: ``tokens`` int32 [n] and ``doc_starts`` int64 [n_docs + 1] (last entry = n)."""

    path: Path
    doc_path: Path

    @property
    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.int32, mode="r") if self.path.stat().st_size else np.zeros(0, np.int32)

    @property
    def doc_starts(self) -> np.ndarray:
        return np.fromfile(self.doc_path, dtype=np.int64)

    def sha256(self) -> str:
        return sha256_file(self.path)[:16] + sha256_file(self.doc_path)[:16]


def tokenize_to_file(lm, args: CorpusArgs, which: str, out_path: str | Path) -> TokenFile:
    """Streams the corpus through the tokenizer into ``out_path`` (int32) and ``out_path.docs`` (document starts).

    With ``concat_documents`` the documents form one stream joined by EOS. Written to temp names, renamed at the end.
    """
    out_path = Path(out_path)
    doc_path = out_path.with_name(out_path.name + ".docs")
    if out_path.exists() and doc_path.exists():
        return TokenFile(out_path, doc_path)
    starts, n, limit = [0], 0, args.max_tokens
    eos = lm.eos_token_id
    with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
        for ids, continued in _documents(lm, args, which):
            if not continued and n > starts[-1]:  # a new document begins
                if args.concat_documents:
                    if eos is not None:
                        fh.write(np.asarray([eos], np.int32).tobytes())
                        n += 1
                else:
                    starts.append(n)
            if limit is not None:
                ids = ids[: max(0, limit - n)]
            fh.write(np.asarray(ids, np.int32).tobytes())
            n += len(ids)
            if limit is not None and n >= limit:
                break
        starts.append(n)
        if n < 2:
            which_flag = "--dataset_name" if args.dataset_name else f"--{which}_file"
            raise KnnlmError(f"{which_flag}: the corpus is empty (fewer than 2 tokens); pass a file with text in it")
        with atomic_path(doc_path) as dtmp:
            np.asarray(starts, np.int64).tofile(dtmp)
    log.info("tokenized %s corpus: %d tokens, %d documents", which, n, len(starts) - 1)
    return TokenFile(out_path, doc_path)


# ---------------------------------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    """Input tokens ``[start, end)``; targets ``[first_target, end)``; ``row`` = datastore row of ``first_target``."""

    start: int
    end: int
    first_target: int
    row: int

    @property
    def n_targets(self) -> int:
        return self.end - self.first_target


def windows(doc_starts, block_size: int, stride: int) -> list[Window]:
    """Sliding windows over each document: every token but a document's first is a target exactly once.

    Target ``t`` is predicted from position ``t - 1`` with context ``[start, t)``; windows advance by ``stride`` and a
    window scores only the tokens its predecessor did not, so each target gets the longest context the window allows.
    """
    if stride > block_size or stride < 1:
        raise KnnlmError(f"--stride: must be in [1, block_size={block_size}], got {stride}")
    out: list[Window] = []
    row = 0
    for doc_start, doc_end in zip(doc_starts[:-1], doc_starts[1:]):
        doc_start, doc_end = int(doc_start), int(doc_end)
        prev_end = doc_start + 1  # the first token of a document has no context
        start = doc_start
        while prev_end < doc_end:
            end = min(start + block_size, doc_end)
            w = Window(start, end, prev_end, row)
            out.append(w)
            row += w.n_targets
            prev_end = end
            start = min(start + stride, end - 1)  # a target's predicting position must lie inside its window
    return out


def _token_array(tokens) -> np.ndarray:
    return tokens.tokens if isinstance(tokens, TokenFile) else tokens


def batch_inputs(tokens, batch: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T] and attention mask [B, T] of a batch of windows over ``tokens`` (a
    :class:`TokenFile`, read only where the windows are, or any int array)."""
    length = max(w.end - w.start for w in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    token_arr = _token_array(tokens)
    for i, w in enumerate(batch):
        ids[i, : w.end - w.start] = torch.from_numpy(np.asarray(token_arr[w.start: w.end], dtype=np.int64))
        mask[i, : w.end - w.start] = 1
    return ids, mask


def target_positions(batch: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in the batch [n], predicting position [n]) of each scored target, in window order."""
    rows, pos = [], []
    for i, w in enumerate(batch):
        p = torch.arange(w.first_target - 1 - w.start, w.end - 1 - w.start)
        rows.append(torch.full_like(p, i))
        pos.append(p)
    return torch.cat(rows), torch.cat(pos)


def target_tokens(tokens, batch: list[Window]) -> torch.Tensor:
    """The scored (gold) tokens of a batch of windows, in the order of :func:`target_positions`: [n] int64."""
    token_arr = _token_array(tokens)
    return torch.from_numpy(np.concatenate([np.asarray(token_arr[w.first_target: w.end], dtype=np.int64)
                                            for w in batch]))


def count_targets(wins: list[Window]) -> int:
    return sum(w.n_targets for w in wins)


def windowing_meta(block_size: int, stride: int, args: CorpusArgs) -> dict:
    return {"block_size": block_size, "stride": stride, "concat_documents": args.concat_documents,
            "max_tokens": args.max_tokens}


def describe(args: CorpusArgs, which: str) -> dict:
    d = dataclasses.asdict(args)
    d["which"] = which
    return d
