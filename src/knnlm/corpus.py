"""Corpora (plain text, JSONL, HF datasets) streamed to an int32 token file, and the sliding windows over it."""
from __future__ import annotations

import codecs
import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .errors import KnnlmError
from .fileio import atomic_path, atomic_write_json, read_json, sha256_file, sha256_folder

log = logging.getLogger(__name__)

# plain text is tokenized in 256k-character pieces: a fast tokenizer's per-token Python objects (ids, offsets) cost
# ~150 bytes a token, so the piece size, not the file size, sets the peak memory
_CHUNK_CHARS = 1 << 18  # bytes read per piece (at most as many characters)

TEXT_FIELD = "text"  # the default --text_field
JSONL_SUFFIXES = (".jsonl", ".json")
# tables, read through HF datasets' own (offline) builders: suffix -> (builder, its options)
# (pandas' defaults read a text of 'NA', 'null', 'None', 'nan' or an empty cell as missing and drop blank lines, so such
# rows were refused or skipped where the same rows in JSONL are documents: a row's text is read as written. Fields are
# CSV-quoted in both, as pandas writes them, so a .tsv text that starts with '"' must be quoted)
_AS_WRITTEN = {"keep_default_na": False, "na_filter": False, "skip_blank_lines": False}
TABLE_SUFFIXES = {".csv": ("csv", _AS_WRITTEN), ".tsv": ("csv", {**_AS_WRITTEN, "delimiter": "\t"}),
                  ".parquet": ("parquet", {})}
ROW_SUFFIXES = JSONL_SUFFIXES + tuple(TABLE_SUFFIXES)  # files of rows with a text field; any other file is plain text
_CARRY_TOKENS = 8  # tokens re-tokenized across a piece boundary (see _encode_long_text)
# a UTF-8 byte order mark opening a file (Windows editors write one) is a signature, not text: the table and `datasets`
# readers drop it, so a plain-text or JSONL file drops it too (kept, it is 3 tokens before the text, and a first JSONL
# row that is not valid JSON)
BOM = "\ufeff"


def skip_bad_rows_field():
    """The one ``--skip_bad_rows`` option (corpora, `lm train`'s files, `generate`'s prompt files)."""
    return field(default=False, metadata={"help": "JSONL/dataset rows that are not a JSON object with a string in the text field (null, a number, a list, an object, a boolean, a missing field, a line that is not JSON): false refuses the file naming the row; true skips them and counts them in the output."})


@dataclass
class CorpusArgs:
    train_file: Optional[str] = field(default=None, metadata={"help": "Training corpus: a plain-text file (.txt or any other suffix: one document), .jsonl/.json (one document per line) or a .csv/.tsv/.parquet table (one document per row), whose rows hold the text in --text_field."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation corpus, same formats as --train_file."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A Hugging Face `datasets` name or a local dataset folder (data files, or one written by save_to_disk: a DatasetDict's splits, or a Dataset read whatever --split), instead of a file."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The `datasets` configuration, e.g. wikitext-103-raw-v1."})
    split: Optional[str] = field(default=None, metadata={"help": "The `datasets` split to read (default: train for datastores, validation for evaluation)."})
    text_field: str = field(default=TEXT_FIELD, metadata={"help": "Field (column) holding the text in JSONL, table or dataset rows; plain text has none."})
    block_size: int = field(default=0, metadata={"help": "Window length in tokens; 0 = the model's context length, capped at 1024."})
    stride: int = field(default=0, metadata={"help": "Tokens the window advances by; 0 = block_size // 2. Each token is scored once, with the longest context the window allows."})
    concat_documents: bool = field(default=True, metadata={"help": "Join JSONL/table/dataset documents into one stream with the tokenizer's EOS between them (fairseq's way, an EOS per line; run_clm joins without one); false windows each document on its own."})
    max_tokens: Optional[int] = field(default=None, metadata={"help": "Use only the first N tokens of the corpus (quick runs)."})
    encoding_errors: str = field(default="strict", metadata={"help": "Bytes that are not UTF-8 in a corpus file: strict (an error naming the byte offset), replace (U+FFFD) or ignore (dropped)."})
    skip_bad_rows: bool = skip_bad_rows_field()

    def validate(self) -> None:
        if self.block_size < 0 or self.stride < 0:
            raise KnnlmError("--block_size/--stride: must be >= 0 (0 picks the default)")
        if self.block_size == 1:
            raise KnnlmError("--block_size: 1 leaves no context to predict a token from; use at least 2 (0 = the "
                             "model's context length)")
        if self.encoding_errors not in ("strict", "replace", "ignore"):
            raise KnnlmError(f"--encoding_errors: {self.encoding_errors!r} is not one of strict, replace, ignore")
        if self.block_size and self.stride > self.block_size:
            raise KnnlmError(f"--stride: {self.stride} exceeds --block_size {self.block_size}; tokens would be skipped")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise KnnlmError("--max_tokens: needs at least 2 tokens")

    def require(self, which: str) -> None:
        """Fails fast (before any model is loaded) when the corpus to read is missing, unreadable or named twice, or
        when a corpus flag given could not act (the other split's file, a text field of plain text)."""
        path = self.train_file if which == "train" else self.validation_file
        other = "validation" if which == "train" else "train"
        if getattr(self, f"{other}_file"):  # it would be silently ignored
            raise KnnlmError(f"--{other}_file: this command reads only --{which}_file (or --dataset_name); drop "
                             f"--{other}_file")
        if self.dataset_name:
            if path:  # the dataset would be read and the file silently ignored
                raise KnnlmError(f"--{which}_file: {path} and --dataset_name {self.dataset_name} both name the corpus to "
                                 "read; pass one of them")
            return
        if not path:
            raise KnnlmError(f"--{which}_file: required (or --dataset_name): the corpus to read")
        for name in ("split", "dataset_config_name"):  # a dataset's coordinates: a file has neither (it was read whole)
            if getattr(self, name):
                raise KnnlmError(f"--{name}: acts only with --dataset_name; --{which}_file {path} is read whole: drop "
                                 f"--{name}")
        check_file(path, f"--{which}_file")
        if self.text_field != TEXT_FIELD and Path(path).suffix not in ROW_SUFFIXES:
            raise KnnlmError(f"--text_field: {path} is read as plain text (one document without fields); drop "
                             f"--text_field, or name the file {' / '.join(ROW_SUFFIXES)} if it holds rows")

    def resolved_window(self, model_context: int) -> tuple[int, int]:
        """(block, stride) for a model with ``model_context`` positions: a window of ``block >= 2`` tokens that
        advances by ``1 <= stride <= block`` tokens (so every window scores at least one new token)."""
        block = self.block_size or min(model_context, 1024)
        if block > model_context:
            raise KnnlmError(f"--block_size: {block} exceeds the model's context length {model_context}")
        if block < 2:
            raise KnnlmError(f"--block_size: {block} leaves no context to predict a token from (the model's context "
                             f"length is {model_context}); use at least 2")
        stride = self.stride or max(1, block // 2)
        if stride > block:
            raise KnnlmError(f"--stride: {stride} exceeds the block size {block}; tokens would be skipped")
        return block, stride


# ---------------------------------------------------------------------------------------------------------------- reading
# a compressed file's opening bytes -> (its format, the command that decompresses it): no reader here decompresses, and
# with --encoding_errors replace/ignore (the advice of the not-UTF-8 error) such bytes would be tokenized as text, a
# datastore of noise built without a word said
_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip -k"), b"BZh": ("bzip2", "bunzip2 -k"), b"\xfd7zXZ\x00": ("xz", "unxz -k"),
               b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"), b"PK\x03\x04": ("zip", "unzip")}


def _compression(head: bytes) -> Optional[tuple[str, str]]:
    for magic, what in _COMPRESSED.items():
        # (bzip2's "BZh" could open a text: its block size digit and block magic must follow)
        if head.startswith(magic) and (magic != b"BZh" or (head[3:4].isdigit() and head[4:10] == b"1AY&SY")):
            return what
    return None


def check_file(path: str, flag: str) -> Path:
    """``path`` as a Path, or a one-line error naming ``flag`` when it is not a readable file (missing, a folder, no
    permission to read) or a compressed one: checked before a model loads, and before a corpus is hashed."""
    p = Path(path)
    if not p.is_file():
        raise KnnlmError(f"{flag}: {p} does not exist or is not a file; pass a readable text, .jsonl or table (.csv, "
                         ".tsv, .parquet) file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(10)
    except OSError as e:
        raise KnnlmError(f"{flag}: {p} cannot be read ({e.strerror}); check its permissions") from None
    compressed = _compression(head)
    if compressed:
        raise KnnlmError(f"{flag}: {p} is {compressed[0]}-compressed, and corpora are read uncompressed; decompress "
                         f"it first (`{compressed[1]} {p}`) and pass the decompressed file")
    return p


def _not_utf8(flag: str, path: Path, offset: int, e: UnicodeDecodeError, encoding_flag: bool = True) -> KnnlmError:
    """The error for a byte that is not UTF-8; ``encoding_flag`` False leaves out the advice to pass --encoding_errors,
    for a command without that flag (lm train, hurdle run)."""
    hint = " or pass --encoding_errors replace (or ignore)" if encoding_flag else ""
    return KnnlmError(f"{flag}: {path} is not UTF-8 at byte {offset} (0x{e.object[e.start]:02x}); re-encode it "
                      f"(e.g. `iconv -f latin1 -t utf-8`){hint}")


def text_pieces(path: Path, flag: str, errors: str = "strict", chunk: Optional[int] = None,
                 encoding_flag: bool = True) -> Iterator[str]:
    """The file decoded as UTF-8, ``chunk`` bytes at a time (newlines kept as they are); a byte that is not UTF-8 is
    an error naming its offset (and, with ``encoding_flag``, --encoding_errors), unless ``errors`` replaces or drops
    it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    chunk = chunk or _CHUNK_CHARS
    pos = 0  # bytes fed to the decoder so far
    at_start = True  # no character decoded yet (a BOM may still come)
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _not_utf8(flag, path, pos - pending + e.start, e, encoding_flag) from None
            pos += len(block)
            if at_start and text:
                text, at_start = text.removeprefix(BOM), False
            if text:
                yield text
            if not block:
                return


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
               dict: "an object"}


class BadRows:
    """Rows of a JSONL file or dataset that hold no text: an error naming the first, or (``skip``) counted."""

    def __init__(self, flag: str, text_field: str, skip: bool):
        self.flag, self.text_field, self.skip, self.count = flag, text_field, skip, 0

    def bad(self, where: str, what: str, fix: str) -> None:
        if not self.skip:
            raise KnnlmError(f"{self.flag}: {where} {what}; {fix}, or pass --skip_bad_rows true to skip such rows")
        if not self.count:
            log.warning("%s: skipping rows without text (the first: %s %s)", self.flag, where, what)
        self.count += 1

    def text(self, row, where: str, fields: tuple[str, ...] = ()) -> Optional[str]:
        """The string in the row's text field (the first of ``fields`` present, default the text field); None for a
        skipped row."""
        fields = fields or (self.text_field,)
        if not isinstance(row, dict):  # e.g. a whole-file JSON array: valid JSON, but not JSON Lines
            what = _JSON_TYPES.get(type(row), type(row).__name__)
            self.bad(where, f"is {what}, not a JSON object", "write one JSON object per line (JSON Lines)")
            return None
        name = next((f for f in fields if f in row), None)
        if name is None:
            self.bad(where, f"has no field {' or '.join(repr(f) for f in fields)}", "set --text_field")
            return None
        value = row[name]
        if not isinstance(value, str):
            what = _JSON_TYPES.get(type(value), type(value).__name__)
            shown = "" if value is None else f" ({json.dumps(value, default=str)[:40]})"
            self.bad(where, f"has {what} in its '{name}' field{shown}, not a string", "fix the row")
            return None
        return value


def _jsonl_texts(path: Path, text_field: str, flag: str, errors: str = "strict",
                 rows: Optional[BadRows] = None, encoding_flag: bool = True) -> Iterator[str]:
    rows = rows or BadRows(flag, text_field, False)
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise _not_utf8(flag, path, offset + e.start, e, encoding_flag) from None
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                rows.bad(f"{path}:{lineno}", "is not valid JSON", "one JSON object per line is expected")
                continue
            text = rows.text(row, f"{path}:{lineno}")
            if text is not None:
                yield text


def _load_rows(load, what: str, flag: str, flags_by_text: Optional[dict] = None):
    """A ``datasets.Dataset`` from ``load(datasets)``; any failure is one line naming ``flag`` (or the flag of
    ``flags_by_text`` whose key the error's text holds) and ``what``."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its own error log would repeat the one line raised here
    try:
        return load(datasets)
    except Exception as e:  # datasets raises many kinds; all mean the same thing to the user
        first = (str(e).strip().splitlines() or [""])[0]  # (an empty JSONL file: a StopIteration with no text)
        reason = first or ("it holds no rows" if isinstance(e, StopIteration) else type(e).__name__)
        flag = next((f for text, f in (flags_by_text or {}).items() if text in first), flag)
        raise KnnlmError(f"{flag}: cannot load {what}: {reason}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _row_texts(ds, where: str, rows: BadRows) -> Iterator[str]:
    if rows.text_field not in ds.column_names:
        raise KnnlmError(f"--text_field: {where} has no column '{rows.text_field}' (columns: {ds.column_names})")
    for i, row in enumerate(ds):
        text = rows.text(row, f"{where} row {i}")
        if text is not None:
            yield text


# the flag a `datasets` error is about, by its text ("Unknown split ...", "BuilderConfig 'x' not found ...")
_DATASET_FLAGS = {"Unknown split": "--split", "BuilderConfig": "--dataset_config_name"}


def _dataset_split(args: CorpusArgs, which: str) -> str:
    return args.split or ("train" if which == "train" else "validation")


def _load_dataset(args: CorpusArgs, split: str):
    """The ``datasets.Dataset`` of ``--dataset_name`` / ``--dataset_config_name`` at ``split``: a save_to_disk folder
    read with load_from_disk, anything else (a hub name, a folder of data files) with load_dataset."""
    what = f"{args.dataset_name!r} ({args.dataset_config_name}, split {split})"
    folder = Path(args.dataset_name)
    if folder.is_file():  # (datasets looked it up on the hub)
        raise KnnlmError(f"--dataset_name: {folder} is a file; pass it as --train_file or --validation_file")
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():  # a save_to_disk folder
        if args.dataset_config_name:
            raise KnnlmError(f"--dataset_config_name: {args.dataset_name} is a folder written by save_to_disk, which "
                             "has no configurations; drop --dataset_config_name")

        def from_disk(d):
            if not any(folder.rglob("*.arrow")):  # (datasets fails on it with "list index out of range")
                raise ValueError("it holds no rows (no .arrow files)")
            return d.load_from_disk(str(folder))

        ds = _load_rows(from_disk, what, "--dataset_name")
        if hasattr(ds, "keys"):  # a DatasetDict: its splits; a Dataset is one table, read whatever the split
            if split not in ds:
                raise KnnlmError(f"--split: {args.dataset_name} has no split {split!r} (it has {', '.join(ds)}); "
                                 "pass --split with one of them")
            ds = ds[split]
        return ds
    if not folder.exists() and _packaged_builder(args.dataset_name):  # datasets: "An error occurred while generating"
        raise KnnlmError(f"--dataset_name: {args.dataset_name!r} is datasets' builder for local data files, which it "
                         "needs and this flag cannot give: pass the file as --train_file / --validation_file, or a "
                         "folder of them as --dataset_name")
    return _load_rows(lambda d: d.load_dataset(args.dataset_name, args.dataset_config_name, split=split), what,
                      "--dataset_name", _DATASET_FLAGS)


def _packaged_builder(name: str) -> bool:
    """Whether ``name`` is one of datasets' own builders (json, text, csv, parquet...), which read data files."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return name in _PACKAGED_DATASETS_MODULES


def _dataset_texts(args: CorpusArgs, split: str, rows: Optional[BadRows] = None) -> Iterator[str]:
    rows = rows or BadRows("--dataset_name", args.text_field, False)
    ds = _load_dataset(args, split)
    yield from _row_texts(ds, f"{args.dataset_name} ({split})", rows)


def _table_texts(path: Path, text_field: str, flag: str, errors: str = "strict",
                 rows: Optional[BadRows] = None) -> Iterator[str]:
    """The text column of a .csv/.tsv/.parquet file, a row a document (through datasets' csv/parquet builders)."""
    builder, options = TABLE_SUFFIXES[path.suffix]
    if builder == "csv":
        options = {**options, "encoding_errors": errors}
    ds = _load_rows(lambda d: d.load_dataset(builder, data_files=str(path), split="train", **options),
                    f"{path} as a {path.suffix[1:]} table", flag)
    yield from _row_texts(ds, str(path), rows or BadRows(flag, text_field, False))


def row_texts(path: Path, text_field: str, flag: str, errors: str = "strict",
              rows: Optional[BadRows] = None, encoding_flag: bool = True) -> Iterator[str]:
    """The documents of a JSONL or table file (``path.suffix in ROW_SUFFIXES``), a row each; ``encoding_flag`` as for
    :func:`_not_utf8` (a table that is not UTF-8 is the table loader's error, which names no flag)."""
    if path.suffix in JSONL_SUFFIXES:
        yield from _jsonl_texts(path, text_field, flag, errors, rows, encoding_flag)
    else:
        yield from _table_texts(path, text_field, flag, errors, rows)


def _encode_long_text(tokenizer, path: Path, add_special: bool, flag: str = "--train_file",
                      errors: str = "strict", encoding_flag: bool = True) -> Iterator[tuple[np.ndarray, bool]]:
    """Tokenizes a text file piece by piece with the result of tokenizing it as one string; yields (ids, whether the
    piece's text holds anything but whitespace).

    Each piece's last few tokens are dropped and their text carried into the next piece, so no token straddling a
    piece boundary is ever cut (pre-tokenization regexes are local, so tokens further back are final). A tokenizer may
    also treat the start of a string specially (SentencePiece-style ones, Llama-2 and Mistral, prepend '▁'), so the
    next piece is tokenized after the text of the last few tokens already emitted (the context), whose tokens are
    dropped again: past its first words the context tokenizes as it did, and the piece as it does in the one string
    (checked: a warning where it does not).
    """
    carry, first, context, tail = "", True, "", []  # tail: the ids the context's text was tokenized to
    pieces = text_pieces(path, flag, errors, encoding_flag=encoding_flag)
    while True:
        piece = next(pieces, "")
        if not carry and not piece:
            return
        ids, offsets, start, text = _encode_after(tokenizer, context, tail, carry + piece, add_special and first)
        body = text[len(context):]  # carry + piece
        if not piece:  # end of file: everything is final
            yield np.asarray(ids[start:], np.int32), bool(body.strip())
            return
        keep = max(start, len(ids) - _CARRY_TOKENS)
        while keep > start and offsets[keep][0] == 0 and offsets[keep][1] == 0:  # special token: keep with the piece
            keep -= 1
        # a character of several byte tokens (CJK, emoji) shares one span: cut before all of them, not inside it
        while keep > start and keep < len(ids) and offsets[keep - 1][1] > offsets[keep][0]:
            keep -= 1
        cut = offsets[keep][0] if keep < len(ids) else len(text)
        final = ids[start:keep]
        has_text = bool(text[len(context):cut].strip())
        lo = max(0, keep - _CARRY_TOKENS)
        while lo < keep and offsets[lo][0] == offsets[lo][1]:  # (a special token has no text to give as context)
            lo += 1
        context, tail = text[offsets[lo][0]:cut] if lo < keep else "", ids[lo:keep]
        carry, first = text[cut:], first and keep == start  # (nothing final yet: a BOS is still to come)
        del ids, offsets  # free this piece's Python objects before the next piece is tokenized
        yield np.asarray(final, np.int32), has_text


def _encode_after(tokenizer, context: str, tail: list, body: str, add_special: bool):
    """Tokenizes ``context + body`` -> (ids, offsets, index of body's first token, the text tokenized). Where the
    context's tokens do not end with ``tail`` (all but its first two, which the string's start may change) or body's
    first token does not start exactly at the context's end, the boundary is tokenized otherwise than in one string:
    a warning says so (no tokenizer the tests know does this)."""
    text = context + body
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not context:
        return ids, offsets, 0, text
    start = next((j for j, (a, b) in enumerate(offsets) if a >= len(context) and b > a), len(ids))
    check = tail[2:]
    if (start < len(ids) and offsets[start][0] != len(context)) or (check and ids[start - len(check):start] != check):
        log.warning("a piece boundary of the text is tokenized otherwise after %d characters of context than in one "
                    "string; the tokens there may differ from tokenizing the file at once", len(context))
    return ids, offsets, start, text


def _documents(lm, args: CorpusArgs, which: str, rows: Optional[BadRows] = None, flag: Optional[str] = None,
               encoding_flag: bool = True) -> Iterator[tuple[list[int] | np.ndarray, bool, bool]]:
    """Yields ``(token ids, continues_previous, has_text)``: documents encoded as ``lm.encode`` does (BOS where the
    tokenizer adds one); a long plain-text document arrives in several pieces, all but the first marked as continuing;
    ``has_text`` is False for whitespace-only text. ``rows`` counts the JSONL/dataset rows skipped; ``encoding_flag``
    as for :func:`_not_utf8`."""
    if args.dataset_name:
        for text in _dataset_texts(args, _dataset_split(args, which), rows):
            yield lm.encode(text), False, bool(text.strip())
        return
    flag = flag or f"--{which}_file"
    path_str = args.train_file if which == "train" else args.validation_file
    if not path_str:
        raise KnnlmError(f"{flag}: required (or --dataset_name)")
    path = check_file(path_str, flag)
    if path.suffix in ROW_SUFFIXES:
        for text in row_texts(path, args.text_field, flag, args.encoding_errors, rows, encoding_flag):
            yield lm.encode(text), False, bool(text.strip())
    elif getattr(lm.tokenizer, "is_fast", False):
        pieces = _encode_long_text(lm.tokenizer, path, True, flag, args.encoding_errors, encoding_flag)
        for i, (piece, has_text) in enumerate(pieces):
            yield piece, i > 0, has_text
    else:
        text = "".join(text_pieces(path, flag, args.encoding_errors, encoding_flag=encoding_flag))
        yield lm.encode(text), False, bool(text.strip())


# ---------------------------------------------------------------------------------------------------------------- token file
@dataclass
class TokenFile:
    """Corpus tokens on disk: ``tokens`` int32 [n] and ``doc_starts`` int64 [n_docs + 1] (last entry = n)."""

    path: Path
    doc_path: Path
    # set by tokenize_to_file: it replaced token files recorded as made otherwise (a reader or key that changed), so a
    # killed run's work over the earlier tokens is not to be resumed over these
    replaced: bool = field(default=False, compare=False)

    @property
    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.int32, mode="r") if self.path.stat().st_size else np.zeros(0, np.int32)

    @property
    def doc_starts(self) -> np.ndarray:
        return np.fromfile(self.doc_path, dtype=np.int64)

    def sha256(self) -> str:
        return sha256_file(self.path)[:16] + sha256_file(self.doc_path)[:16]

    @property
    def skipped_rows(self) -> int:
        """JSONL/dataset rows skipped for holding no text (``--skip_bad_rows``), as recorded when tokenized."""
        return skipped_rows(self.path)


def token_record_path(token_path: str | Path) -> Path:
    """``<tokens>.json`` beside a token file: what the tokens were made from (written last; see tokenize_to_file)."""
    return Path(token_path).with_name(Path(token_path).name + ".json")


def skipped_rows(token_path: str | Path) -> int:
    record_path = token_record_path(token_path)
    try:
        record = read_json(record_path) if record_path.is_file() else {}
    except KnnlmError:
        return 0
    return int(record.get("skipped_rows", 0)) if isinstance(record, dict) else 0


def source_fingerprint(args: CorpusArgs, which: str) -> dict:
    """What a corpus is, for checking cached work against: the file's name and sha256, or the dataset's coordinates
    and what its contents are known by: for a local dataset folder the first 16 hex of its files' sha256, for a hub
    dataset the fingerprint `datasets` gives the split it loads (it changes with the dataset's revision: a name, config
    and split alone stay the same when the dataset is updated on the hub)."""
    if args.dataset_name:
        source = {"dataset": args.dataset_name, "config": args.dataset_config_name, "split": args.split}
        if Path(args.dataset_name).is_dir():
            source["sha256"] = sha256_folder(args.dataset_name)[:16]
        else:
            source["fingerprint"] = _load_dataset(args, _dataset_split(args, which))._fingerprint
        return source
    flag = f"--{which}_file"
    path = check_file((args.train_file if which == "train" else args.validation_file) or "", flag)
    return {"file": path.name, "sha256": sha256_file(path)}


def _tokenizer_id(lm) -> str:
    if hasattr(lm, "tokenizer_hash"):
        return lm.tokenizer_hash()
    tok = lm.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else f"{type(tok).__name__}:{getattr(tok, 'name_or_path', '')}"
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _token_key(lm, args: CorpusArgs, which: str, source: Optional[dict]) -> dict:
    """Everything a token file depends on (windowing is not among them: windows are cut from it afterwards)."""
    source = source or source_fingerprint(args, which)  # (once: a file's is the sha256 of all of it)
    return {"format": "knnlm-tokens/1", "source": source,
            "tokenizer_hash": _tokenizer_id(lm), "eos_token_id": lm.eos_token_id, "text_field": args.text_field,
            "concat_documents": args.concat_documents, "max_tokens": args.max_tokens,
            "encoding_errors": args.encoding_errors,
            **({"skip_bad_rows": True} if args.skip_bad_rows else {}),  # (only when set: older files stay valid)
            **_reader_version(source), **_bom_version(args, which, source)}


def _bom_version(args: CorpusArgs, which: str, source: dict) -> dict:
    """The key field of a plain-text or JSONL file that opens with a BOM (read as text by older readers), so that its
    older token files are rebuilt; none for any other file, whose older token files stay valid."""
    if "file" not in source or Path(source["file"]).suffix in TABLE_SUFFIXES:
        return {}
    with open(args.train_file if which == "train" else args.validation_file, "rb") as fh:
        return {"bom": "dropped"} if fh.read(3) == BOM.encode() else {}


def _reader_version(source: dict) -> dict:
    """The key field of a reader whose tokens changed, so that older token files of such a source are not reused: a
    text file's pieces are read after a context (under a SentencePiece-style tokenizer older files hold a spurious
    word start per piece); a .csv/.tsv row's text as written (pandas read 'NA', 'null', '' as missing)."""
    suffix = Path(source["file"]).suffix if "file" in source else None
    if suffix in (".csv", ".tsv"):
        return {"table_reader": "as-written"}
    return {"text_pieces": "after-context"} if suffix is not None and suffix not in ROW_SUFFIXES else {}


def _valid_token_files(out_path: Path, doc_path: Path, key_path: Path, key: dict) -> bool:
    """True when the token files were finished for exactly ``key`` and have the sizes their record says."""
    if not (out_path.is_file() and doc_path.is_file() and key_path.is_file()):
        return False
    try:
        record = read_json(key_path)
    except KnnlmError:
        return False
    if not isinstance(record, dict) or record.get("key") != json.loads(json.dumps(key)):
        return False
    n, n_docs = record.get("n_tokens"), record.get("n_documents")
    return (isinstance(n, int) and isinstance(n_docs, int) and n >= 2 and out_path.stat().st_size == 4 * n
            and doc_path.stat().st_size == 8 * (n_docs + 1) and int(np.fromfile(doc_path, np.int64)[-1]) == n)


class TextEncoder:
    """What :func:`tokenize_to_file` needs from an LM (``tokenizer``, ``eos_token_id``, ``encode``), for a bare tokenizer:
    a study that tokenizes before it has a model. Whole files are encoded at once, so its copy of the tokenizer has no
    length limit (no "sequence longer than the model" warning)."""

    def __init__(self, tokenizer):
        self.tokenizer = copy.copy(tokenizer)
        self.tokenizer.model_max_length = int(1e12)
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]


def tokenize_to_file(lm, args: CorpusArgs, which: str, out_path: str | Path, source: Optional[dict] = None,
                     flag: Optional[str] = None, encoding_flag: bool = True) -> TokenFile:
    """Streams the corpus through the tokenizer into ``out_path`` (int32) and ``out_path.docs`` (document starts).

    With ``concat_documents`` the documents form one stream joined by EOS. Written to temp names, size-checked and
    renamed at the end; ``out_path.json`` (written last) records what they were made from (corpus sha256, tokenizer
    hash, options; ``source`` saves hashing the corpus again), so the files of another corpus or tokenizer, or short
    or empty ones, are rebuilt rather than reused. A corpus of whitespace only is refused. ``flag`` names the corpus
    in errors for a command that calls it otherwise than --train_file/--validation_file (hurdle: --data), and
    ``encoding_flag`` False leaves out the advice to pass --encoding_errors, for a command without that flag.
    """
    out_path = Path(out_path)
    doc_path = out_path.with_name(out_path.name + ".docs")
    key_path = token_record_path(out_path)
    key = _token_key(lm, args, which, source)
    if _valid_token_files(out_path, doc_path, key_path, key):
        return TokenFile(out_path, doc_path)
    previous = key_path.read_bytes() if key_path.is_file() else None
    for p in (key_path, out_path, doc_path):  # stale or partial: the record goes first, so no half state looks valid
        p.unlink(missing_ok=True)
    flag = "--dataset_name" if args.dataset_name else (flag or f"--{which}_file")
    starts, n, limit = [0], 0, args.max_tokens
    n_docs = n_blank = 0  # documents read, and those of whitespace only
    doc_has_text = True
    eos = lm.eos_token_id
    rows = BadRows(flag, args.text_field, args.skip_bad_rows)
    with atomic_path(out_path) as tmp:  # a full disk here is a one-line error naming the file; nothing is renamed
        with open(tmp, "wb") as fh:
            for ids, continued, has_text in _documents(lm, args, which, rows, flag, encoding_flag):
                if continued:
                    doc_has_text |= has_text
                else:
                    n_blank += not doc_has_text
                    n_docs, doc_has_text = n_docs + 1, has_text
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
        n_blank += not doc_has_text
        what = "a dataset" if args.dataset_name else "a file"
        if n < 2:
            skipped = f" after --skip_bad_rows skipped {rows.count} row(s) without text" if rows.count else ""
            raise KnnlmError(f"{flag}: the corpus is empty (fewer than 2 tokens{skipped}); pass {what} with text in it")
        if n_blank >= n_docs:
            raise KnnlmError(f"{flag}: the corpus holds only whitespace ({n} tokens of blanks and line breaks); "
                             f"pass {what} with text in it")
        if n_blank:
            log.warning("%s: %d of %d documents hold only whitespace; they are kept (each adds its EOS with "
                        "--concat_documents)", flag, n_blank, n_docs)
        if tmp.stat().st_size != 4 * n:
            raise KnnlmError(f"{flag}: {out_path}: wrote {tmp.stat().st_size} bytes, expected {4 * n} (a short "
                             "write: is the disk full?); rerun the same command")
        with atomic_path(doc_path, expected_bytes=8 * len(starts)) as dtmp:
            np.asarray(starts, np.int64).tofile(dtmp)
    record = {"key": key, "n_tokens": n, "n_documents": len(starts) - 1, "skipped_rows": rows.count}
    atomic_write_json(key_path, record)  # last: marks them valid
    log.info("tokenized %s corpus: %d tokens, %d documents%s", which, n, len(starts) - 1,
             f", {rows.count} rows without text skipped" if rows.count else "")
    return TokenFile(out_path, doc_path, replaced=previous is not None and key_path.read_bytes() != previous)


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
    if block_size < 2:  # a 1-token window predicts nothing and would never advance
        raise KnnlmError(f"--block_size: must be >= 2, got {block_size}")
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


def pad_right(seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's one right-padding: token sequences (lists or int arrays) -> input ids [B, T] (``pad_id`` after
    each sequence) and attention mask [B, T] (1 on tokens, 0 on padding); T is the longest sequence's length."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        mask[i, : len(s)] = 1
    return ids, mask


def batch_inputs(tokens, batch: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T] and attention mask [B, T] of a batch of windows over ``tokens`` (a
    :class:`TokenFile`, read only where the windows are, or any int array)."""
    token_arr = _token_array(tokens)
    return pad_right([token_arr[w.start: w.end] for w in batch], pad_id)


def target_positions(batch: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in the batch [n], predicting position [n]) of each scored target, in window order."""
    rows, pos = [], []
    for i, w in enumerate(batch):
        p = torch.arange(w.first_target - 1 - w.start, w.end - 1 - w.start)
        rows.append(torch.full_like(p, i))
        pos.append(p)
    return torch.cat(rows), torch.cat(pos)


def target_rows(batch: list[Window]) -> torch.Tensor:
    """The datastore rows of a batch's targets, in the order of :func:`target_positions`: [n] int64 (a store built on
    these tokens: rows count the targets in order, whatever the windowing)."""
    return torch.cat([torch.arange(w.row, w.row + w.n_targets) for w in batch])


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
