"""The kNN datastore: keys (float16, N x d) and values (int32, N) streamed to disk, resumable and distributable.

Layout of a datastore folder::

    keys.f16      float16 [N, d]  hidden state at the key point for the position before each target token
    vals.i32      int32   [N]     the target (next) token
    tokens.i32    int32           the corpus tokens (+ tokens.i32.docs: int64 document starts)
    meta.json     written last: its presence marks a finished store

Work is split in fixed batches of windows. Batch ``b`` is encoded by rank ``b % world_size`` and written at its own
rows with positioned writes (no memory map, so resident memory stays flat); ``done.u8`` flags finished batches, so a
killed build resumes where it stopped and gives the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import (CorpusArgs, TokenFile, Window, batch_inputs, count_targets, source_fingerprint,
                     tokenize_to_file, windowing_meta, windows)
from .corpus import batch_inputs as _batch_inputs  # noqa: F401  (old private name: benchmarks/ --baseline_src runs older sources)
from .distributed import barrier, start_group
from .errors import KnnlmError
from .models import KEY_POINTS  # noqa: F401  (the key points a store can hold; callers import it from here too)
from .fileio import (atomic_write_json, claim_output_dir, lock_output_dir, package_versions, read_json,
                     releases_locks, restore_interrupted_swap, same_record, sha256_file, staging_dir, swap_into_place,
                     write_error)

log = logging.getLogger(__name__)

_DATA_FILES = ("keys.f16", "vals.i32", "tokens.i32", "tokens.i32.docs", "tokens.i32.json", "done.u8", "build.json",
               "meta.json", "clusters.i32", "clusters.json")
# what `knnlm datastore build` writes into its folder (an earlier build holds nothing else); `index` is `knnlm index build`'s,
# `clusters.*` `knnlm datastore cluster`'s
OWN_FILES = (*_DATA_FILES, "index", "index.rebuild-tmp", "index.replaced-tmp", "clusters.work", "config.json")
CHECKSUMMED = ("keys.f16", "vals.i32", "tokens.i32", "tokens.i32.docs")  # sha256 recorded in meta.json at build time
KIND = "datastore build"


@dataclass
class DatastoreArgs:
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder of the datastore (required)."})
    key_point: str = field(default="ffn_input", metadata={"help": f"Hidden state used as key: {', '.join(KEY_POINTS)}."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a different datastore already in --output_dir (built beside it, swapped in when complete); with the same inputs, rebuild it only if it is damaged (truncated, checksums differ). Never deletes files the build did not write: a folder holding any is refused."})

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder the datastore is written to")
        if self.key_point not in KEY_POINTS:
            raise KnnlmError(f"--key_point: {self.key_point!r} is not one of {', '.join(KEY_POINTS)}")
        if self.batch_size < 1:
            raise KnnlmError("--batch_size: must be >= 1")


# ---------------------------------------------------------------------------------------------------------------- opening
@dataclass
class Datastore:
    dir: Path
    meta: dict
    keys: np.memmap  # float16 [N, d]
    vals: np.memmap  # int32 [N]
    max_val: int = -1  # the largest token id among the values (checked against a model's vocabulary)

    @property
    def N(self) -> int:
        return int(self.meta["N"])

    @property
    def d(self) -> int:
        return int(self.meta["d"])

    @property
    def key_point(self) -> str:
        return self.meta["key_point"]

    @classmethod
    def open(cls, directory: "str | Path | Datastore", flag: str = "--datastore") -> "Datastore":
        """The finished store in ``directory``; a missing, unfinished or truncated one is refused in one line naming
        ``flag`` (the option the caller read the folder from). An open ``Datastore`` is returned as it is, so that
        the library's functions take a folder or a store alike."""
        if isinstance(directory, Datastore):
            return directory
        directory = Path(directory)
        if not directory.is_dir():
            what = "is a file, not a datastore folder" if directory.exists() else \
                "is a symlink to nothing (or a symlink loop)" if directory.is_symlink() else "does not exist"
            raise KnnlmError(f"{flag}: {directory} {what}; build one with `knnlm datastore build`")
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            hint = " (a build was started: rerun `knnlm datastore build` to finish it)" if (directory / "build.json").exists() else ""
            raise KnnlmError(f"{flag}: {directory} has no meta.json, so it is not a finished datastore{hint}")
        meta = read_json(meta_path, fix="rebuild the datastore with `knnlm datastore build ... --overwrite`")
        try:
            n, d = int(meta["N"]), int(meta["d"])
            if n < 1 or d < 1 or meta.get("key_point") not in KEY_POINTS:
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise KnnlmError(f"{flag}: {meta_path} is not the meta.json of a knnlm datastore (N, d, key_point); "
                             "rebuild the datastore with `knnlm datastore build ... --overwrite`") from None
        for name, expected in (("keys.f16", n * d * 2), ("vals.i32", n * 4)):
            path = directory / name
            size = path.stat().st_size if path.exists() else -1
            if size != expected:
                raise KnnlmError(f"{flag}: {path} is {'missing' if size < 0 else f'{size} bytes'}, expected "
                                 f"{expected} (N={n}, d={d}); the store is truncated: rebuild it with --overwrite")
        keys = np.memmap(directory / "keys.f16", dtype=np.float16, mode="r", shape=(n, d))
        vals = np.memmap(directory / "vals.i32", dtype=np.int32, mode="r", shape=(n,))
        lo, hi = _value_range(vals)
        vocab = meta.get("vocab_size")
        if lo < 0 or (isinstance(vocab, int) and hi >= vocab):
            raise KnnlmError(f"{flag}: {directory / 'vals.i32'} holds token ids outside [0, {vocab or 'vocab'}) "
                             f"(min {lo}, max {hi}): the store is corrupt; rebuild it with `knnlm datastore build ... "
                             "--overwrite`")
        return cls(directory, meta, keys, vals, hi)

    def check_compatible(self, lm, key_point: str | None = None, flag: str = "--datastore",
                         key_point_flag: str = "--key_point") -> None:
        """Refuses a store built with another model, tokenizer or key point than the one querying it; the message names
        ``flag`` (or ``key_point_flag`` for a key point other than the one asked for)."""
        checks = [("weights_hash", lm.weights_hash(), "model weights"),
                  ("tokenizer_hash", lm.tokenizer_hash(), "tokenizer")]
        for key, mine, what in checks:
            if self.meta.get(key) != mine:
                raise KnnlmError(f"{flag}: {self.dir} was built with different {what} "
                                 f"({self.meta.get('model_name_or_path')}, {key} {str(self.meta.get(key))[:12]} vs "
                                 f"{mine[:12]}){dtype_hint(self.meta, lm) if key == 'weights_hash' else ''}; "
                                 "rebuild it with this model")
        if self.max_val >= lm.vocab_size:
            raise KnnlmError(f"{flag}: {self.dir / 'vals.i32'} holds token id {self.max_val}, beyond the model's "
                             f"vocabulary of {lm.vocab_size}: the store is corrupt or not this model's; rebuild it")
        if key_point is not None and key_point != self.key_point:
            raise KnnlmError(f"{key_point_flag}: the datastore {self.dir} holds '{self.key_point}' keys, not '{key_point}'")

    def nbytes(self) -> int:
        return (self.dir / "keys.f16").stat().st_size + (self.dir / "vals.i32").stat().st_size

    def check_keys_finite(self, chunk: int = 1 << 16) -> None:
        """Reads every key once; a NaN/inf one is a one-line error (:func:`check_finite`)."""
        for lo in range(0, self.N, chunk):
            check_finite(np.asarray(self.keys[lo: lo + chunk], dtype=np.float32), self.dir, lo)


def dtype_hint(record: dict, lm) -> str:
    """Why the weights of the same model may hash differently: the hash covers the weights as loaded, so another
    --dtype is another model to a store or memory. '' when the record names another model."""
    dtype, mine = record.get("dtype"), str(getattr(lm, "dtype", "")).replace("torch.", "")
    if dtype and mine and dtype != mine:
        return f": it was built with the model in {dtype}, this run loads it in {mine}; pass --dtype {dtype}"
    if record.get("model_name_or_path") == getattr(lm, "name", None) and not dtype:
        return ": the same model name, so perhaps another --dtype than at build time (the hash covers the weights as loaded)"
    return ""


def _value_range(vals: np.ndarray, chunk: int = 1 << 24) -> tuple[int, int]:
    """(min, max) of the values, read in 64 MiB pieces (one pass over vals.i32: cheap next to the keys)."""
    lo, hi = 0, -1
    for s in range(0, len(vals), chunk):
        piece = vals[s: s + chunk]
        lo, hi = (min(lo, int(piece.min())), max(hi, int(piece.max()))) if s else (int(piece.min()), int(piece.max()))
    return lo, hi


def check_finite(keys: np.ndarray, store: Path, first_row: int = 0, rows: Optional[np.ndarray] = None) -> None:
    """Refuses NaN/inf among keys read from ``store``: ``keys`` [n, d] are rows ``first_row + i`` (or ``rows[i]``)."""
    bad = ~np.isfinite(keys).all(axis=1)  # [n]
    if bad.any():
        i = int(np.argmax(bad))
        row = int(rows[i]) if rows is not None else first_row + i
        raise KnnlmError(f"--datastore: {store} holds non-finite keys (NaN/inf; {int(bad.sum())} of the {len(bad)} "
                         f"rows read here, the first row {row}): the store is corrupt; see `knnlm datastore verify "
                         f"{store}` and rebuild it with `knnlm datastore build ... --overwrite`")


# ---------------------------------------------------------------------------------------------------------------- overlap
def _find_span(haystack: np.ndarray, probe: np.ndarray) -> int:
    """The first position of ``probe`` as a contiguous span of ``haystack`` (-1 if none); vectorised: candidates
    matching the first token are narrowed one token at a time."""
    n = len(haystack) - len(probe) + 1
    if n < 1:
        return -1
    cand = np.flatnonzero(np.asarray(haystack[:n]) == probe[0])
    for j in range(1, len(probe)):
        if not len(cand):
            break
        cand = cand[np.asarray(haystack[cand + j]) == probe[j]]
    return int(cand[0]) if len(cand) else -1


def shared_text(held: "Datastore", train: "Datastore", probes: int = 16, span: int = 32,
                min_span: int = 8) -> tuple[int, int, int]:
    """How much of ``held``'s corpus is ``train``'s text: ``(found, tried, position)``: of ``tried`` spans of up to
    ``span`` tokens spread over ``held``'s documents (one document each, at least ``min_span`` tokens), ``found``
    occur verbatim in ``train``'s corpus (the first at token ``position`` there, else -1)."""
    a = TokenFile(train.dir / "tokens.i32", train.dir / "tokens.i32.docs")
    b = TokenFile(held.dir / "tokens.i32", held.dir / "tokens.i32.docs")
    if not all(p.is_file() for p in (a.path, a.doc_path, b.path, b.doc_path)):  # a store written without its corpus
        return 0, 0, -1
    ta, tb, starts = a.tokens, b.tokens, b.doc_starts
    if len(ta) == 0 or len(tb) == 0:
        return 0, 0, -1
    spans = set()
    for p in np.linspace(0, len(tb) - 1, probes).astype(np.int64):  # spread over the corpus, each inside a document
        d = int(np.searchsorted(starts, p, side="right")) - 1
        s, e = int(starts[d]), int(starts[d + 1])
        lo = max(s, min(int(p), e - span))
        if min(e, lo + span) - lo >= min_span:
            spans.add((lo, min(e, lo + span)))
    found, first = 0, -1
    for lo, hi in sorted(spans):
        pos = _find_span(ta, np.asarray(tb[lo:hi]))
        if pos >= 0:
            found += 1
            first = pos if first < 0 else first
    return found, len(spans), first


# ---------------------------------------------------------------------------------------------------------------- verifying
def checksums(directory: str | Path) -> dict:
    """sha256 of the store's data files (what meta.json records at build time)."""
    return {name: sha256_file(Path(directory) / name) for name in CHECKSUMMED if (Path(directory) / name).is_file()}


def store_problems(directory: str | Path, flag: str = "--datastore", chunk: int = 1 << 16) -> tuple[dict, list[str]]:
    """Checks a finished store in full: sizes and value range (:meth:`Datastore.open`), every key finite, the sha256
    of keys, values and tokens against those recorded at build time -> (what was checked, what is damaged)."""
    ds = Datastore.open(directory, flag=flag)
    problems = []
    n_bad = 0
    for lo in range(0, ds.N, chunk):
        n_bad += int((~np.isfinite(np.asarray(ds.keys[lo: lo + chunk], dtype=np.float32)).all(axis=1)).sum())
    if n_bad:
        problems.append(f"{n_bad} of {ds.N} keys are not finite (NaN/inf)")
    recorded = ds.meta.get("sha256")
    report = {"N": ds.N, "d": ds.d, "values": [0, ds.max_val], "checksums": "none recorded"}
    if isinstance(recorded, dict):
        actual = checksums(ds.dir)
        bad = [name for name, h in recorded.items() if actual.get(name) != h]
        problems += [f"{name} differs from the sha256 recorded at build time" for name in bad]
        report["checksums"] = {name: "ok" if name not in bad else "differs" for name in recorded}
    return report, problems


def refuse_damaged(directory: str | Path, flag: str, problems: list[str]) -> None:
    """One ``KnnlmError`` listing what is damaged (nothing: returns)."""
    if problems:
        raise KnnlmError(f"{flag}: {Path(directory)} is damaged: {'; '.join(problems)}; rebuild it with `knnlm "
                         "datastore build ... --overwrite` (the index with `knnlm index build DS --overwrite`)")


def verify(directory: str | Path, flag: str = "--datastore", chunk: int = 1 << 16) -> dict:
    """:func:`store_problems`, raising one ``KnnlmError`` listing what is damaged; returns what was checked (the store
    with its index: :func:`knnlm.index.verify_store`)."""
    report, problems = store_problems(directory, flag, chunk)
    refuse_damaged(directory, flag, problems)
    return report


# ---------------------------------------------------------------------------------------------------------------- building
def _build_fingerprint(lm, args: CorpusArgs, which: str, key_point: str, block: int, stride: int, batch_size: int,
                       source: dict) -> dict:
    fp = {"model_name_or_path": lm.name, "weights_hash": lm.weights_hash(), "tokenizer_hash": lm.tokenizer_hash(),
          "key_point": key_point, "source": source, "text_field": args.text_field,
          **windowing_meta(block, stride, args), "batch_size": batch_size}
    if args.encoding_errors != "strict":  # recorded only when set, so stores built before the option still resume
        fp["encoding_errors"] = args.encoding_errors
    if args.skip_bad_rows:
        fp["skip_bad_rows"] = True
    return fp


def _clear(out_dir: Path) -> None:
    for name in _DATA_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in ("index", "index.rebuild-tmp", "index.replaced-tmp", "clusters.work"):  # (staging folders too)
        shutil.rmtree(out_dir / name, ignore_errors=True)


def _prepare_work_dir(out_dir: Path, fingerprint: dict, overwrite: bool) -> tuple[Path, bool]:
    """The folder to build in and whether it already holds this very datastore, finished.

    ``--overwrite`` over another finished store builds beside it (``<out>.rebuild-tmp``, resumed by a rerun) and the
    caller swaps it in when complete: a kill, a full disk or an error during the rebuild leaves the old store usable.
    """
    restore_interrupted_swap(out_dir)  # (before the lock, whose folder would hide a store moved aside)
    claim_output_dir(out_dir, KIND, None, overwrite, own_files=OWN_FILES)  # refused before anything is written
    lock_output_dir(out_dir, KIND)  # held through a rebuild beside it and the swap
    staged = staging_dir(out_dir)
    if overwrite and _holds_other_store(out_dir, fingerprint):
        return staged, _prepare_dir(staged, fingerprint, True)
    finished = _prepare_dir(out_dir, fingerprint, overwrite)
    shutil.rmtree(staged, ignore_errors=True)  # a rebuild given up for this build
    return out_dir, finished


def _holds_other_store(out_dir: Path, fingerprint: dict) -> bool:
    """A finished, readable datastore of other inputs (a corrupt one is not worth keeping: it is replaced in place)."""
    try:
        return (out_dir / "meta.json").is_file() and not same_record(read_json(out_dir / "meta.json").get("build"),
                                                                      fingerprint)
    except (KnnlmError, AttributeError):
        return False


def _prepare_dir(out_dir: Path, fingerprint: dict, overwrite: bool) -> bool:
    """Returns True when ``out_dir`` already holds this very datastore, finished."""
    state = claim_output_dir(out_dir, KIND, fingerprint, overwrite, own_files=OWN_FILES, what="datastore")
    if state == "replace":
        _clear(out_dir)
        return False
    meta, build = out_dir / "meta.json", out_dir / "build.json"
    try:
        record = read_json(meta) if meta.exists() else read_json(build) if build.exists() else None
        existing = record.get("build") if meta.exists() else record
    except (KnnlmError, AttributeError):  # a damaged meta.json / build.json
        if not overwrite:
            raise KnnlmError(f"--output_dir: {meta if meta.exists() else build} is corrupt; pass --overwrite to "
                             "rebuild the datastore") from None
        _clear(out_dir)
        return False
    if existing is not None and not same_record(existing, fingerprint):
        if not overwrite:
            raise KnnlmError(f"--output_dir: {out_dir} already holds a different datastore "
                             f"({existing.get('model_name_or_path')}, {existing.get('key_point')}); pass --overwrite "
                             "to replace it or choose another folder")
        _clear(out_dir)
        return False
    if meta.exists() and overwrite:  # this very store: --overwrite rebuilds it only if it is damaged
        try:
            verify(out_dir, flag="--output_dir")
        except KnnlmError as e:
            log.warning("%s; rebuilding it (--overwrite)", e)
            _clear(out_dir)
            return False
    return meta.exists()


def _preallocate(path: Path, nbytes: int) -> None:
    """Reserves the file's blocks up front, so a disk too small fails now, with the size, not after hours of encoding."""
    if path.exists() and path.stat().st_size == nbytes:
        return
    with open(path, "wb") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, max(1, nbytes))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):  # no fallocate on this filesystem: a sparse file will do
                fh.truncate(nbytes)
                return
            fh.truncate(0)
            free = shutil.disk_usage(path.parent).free
            raise KnnlmError(f"--output_dir: {path} needs {nbytes / 2**20:.1f} MiB but only {free / 2**20:.1f} MiB "
                             "are free; free some space or choose another folder, then rerun the same command") from None
        fh.truncate(nbytes)


def encode_batches(lm, tokens: TokenFile, batches: list[list[Window]], key_point: str):
    """Yields ``(batch index, keys [n, d] float16 numpy, values [n] int32 numpy)`` for the given batches of windows."""
    token_arr = tokens.tokens
    for b, batch in batches:
        ids, mask = batch_inputs(tokens, batch, lm.eos_token_id or 0)
        with torch.inference_mode():
            hidden = lm.hidden_states(ids.to(lm.device), mask.to(lm.device), key_point)  # [B, T, d]
        keys, vals = [], []
        for i, w in enumerate(batch):
            # the key of target t is the state at position t - 1
            lo, hi = w.first_target - 1 - w.start, w.end - 1 - w.start
            keys.append(hidden[i, lo:hi].to(torch.float16).cpu().numpy())
            vals.append(np.asarray(token_arr[w.first_target: w.end], dtype=np.int32))
        yield b, np.concatenate(keys), np.concatenate(vals)


@releases_locks
def build_datastore(lm, corpus: CorpusArgs, out_dir: str | Path, key_point: str = "ffn_input", batch_size: int = 8,
                    overwrite: bool = False, which: str = "train", flush_every: int = 32) -> Datastore:
    """Encodes the corpus with ``lm`` and writes the datastore to ``out_dir`` (see the module doc).

    Under ``torchrun``/``accelerate launch`` each rank encodes every ``world_size``-th batch; rank 0 finalises. Rerunning
    a killed build continues it. Returns the finished store.
    """
    if key_point not in KEY_POINTS:
        raise KnnlmError(f"--key_point: {key_point!r} is not one of {', '.join(KEY_POINTS)}")
    if batch_size < 1:
        raise KnnlmError("--batch_size: must be >= 1")
    out_dir = Path(out_dir)
    try:
        return _build(lm, corpus, out_dir, key_point, batch_size, overwrite, which, flush_every)
    except OSError as e:  # a full disk or a read-only folder met mid-build: the done flags let a rerun resume
        raise write_error(e.filename or out_dir, e) from None


def _build(lm, corpus: CorpusArgs, out_dir: Path, key_point: str, batch_size: int, overwrite: bool, which: str,
           flush_every: int) -> Datastore:
    rank, world = start_group()
    block, stride = corpus.resolved_window(lm.max_positions)
    source = source_fingerprint(corpus, which)
    fingerprint = _build_fingerprint(lm, corpus, which, key_point, block, stride, batch_size, source)
    final = out_dir
    if rank == 0:
        out_dir, finished = _prepare_work_dir(final, fingerprint, overwrite)
        if not finished:
            atomic_write_json(out_dir / "build.json", fingerprint)
            if tokenize_to_file(lm, corpus, which, out_dir / "tokens.i32", source=source).replaced:
                for name in ("done.u8", "keys.f16", "vals.i32"):  # a killed build's rows are of the earlier tokens
                    (out_dir / name).unlink(missing_ok=True)
    barrier(world)
    staged = staging_dir(final)
    out_dir = staged if (staged / "build.json").exists() or (staged / "meta.json").exists() else final  # every rank
    complete = (out_dir / "meta.json").exists()
    barrier(world)
    if complete:
        if rank == 0 and out_dir != final:  # a rebuild killed between its last write and the swap
            swap_into_place(out_dir, final)
        barrier(world)
        log.info("datastore %s is already complete", final)
        return Datastore.open(final)

    tokens = TokenFile(out_dir / "tokens.i32", out_dir / "tokens.i32.docs")
    wins = windows(tokens.doc_starts, block, stride)
    n, d = count_targets(wins), lm.key_widths[key_point]
    batches = [wins[i: i + batch_size] for i in range(0, len(wins), batch_size)]
    if rank == 0:
        _preallocate(out_dir / "keys.f16", n * d * 2)
        _preallocate(out_dir / "vals.i32", n * 4)
        _preallocate(out_dir / "done.u8", len(batches))
    barrier(world)

    done = np.fromfile(out_dir / "done.u8", dtype=np.uint8)
    todo = [(b, batches[b]) for b in range(rank, len(batches), world) if not done[b]]
    log.info("rank %d/%d: %d of %d batches to encode (%d keys, d=%d)", rank, world, len(todo), len(batches), n, d)
    started = time.time()
    with open(out_dir / "keys.f16", "r+b") as kf, open(out_dir / "vals.i32", "r+b") as vf, \
            open(out_dir / "done.u8", "r+b") as df, \
            tqdm(total=sum(w.n_targets for _, b in todo for w in b), unit="tok", disable=rank != 0,
                 desc=f"datastore {out_dir.name}") as bar:
        pending: list[int] = []
        for b, keys, vals in encode_batches(lm, tokens, todo, key_point):
            row = batches[b][0].row
            _check_encoded(keys, row, key_point, lm)
            kf.seek(row * d * 2)
            kf.write(keys.tobytes())
            vf.seek(row * 4)
            vf.write(vals.tobytes())
            pending.append(b)
            bar.update(len(vals))
            if len(pending) >= flush_every:
                _mark_done(kf, vf, df, pending)
        _mark_done(kf, vf, df, pending)
    log.info("rank %d encoded %d batches in %.1fs", rank, len(todo), time.time() - started)
    barrier(world)
    if rank == 0:
        _finalise(lm, out_dir, fingerprint, tokens, n, d, len(batches), corpus)
        if out_dir != final:
            swap_into_place(out_dir, final)
            log.info("datastore %s replaced by the rebuilt one", final)
    barrier(world)
    return Datastore.open(final)


def _check_encoded(keys: np.ndarray, row: int, key_point: str, lm) -> None:
    """Refuses keys [n, d] float16 that are not finite (a state beyond float16's ±65504, or a model that overflowed
    in its own precision): a store holding them would give meaningless neighbours."""
    bad = ~np.isfinite(keys).all(axis=1)
    if bad.any():
        raise KnnlmError(f"--model_name_or_path: {lm.name} gives non-finite '{key_point}' keys in float16 (NaN/inf, "
                         f"{int(bad.sum())} of {len(bad)} in the batch from row {row}: values beyond float16's range "
                         "±65504, or an overflow in the model's precision); try --dtype float32 or another --key_point")


def _mark_done(kf, vf, df, pending: list[int]) -> None:
    """Makes the written rows durable, then flags their batches (so a flag never points at unwritten rows)."""
    for fh in (kf, vf):
        fh.flush()
        os.fsync(fh.fileno())
    for b in pending:
        df.seek(b)
        df.write(b"\x01")
    df.flush()
    os.fsync(df.fileno())
    pending.clear()


def _finalise(lm, out_dir: Path, fingerprint: dict, tokens: TokenFile, n: int, d: int, n_batches: int,
              corpus: CorpusArgs) -> None:
    done = np.fromfile(out_dir / "done.u8", dtype=np.uint8)
    if int(done.sum()) != n_batches:
        raise KnnlmError(f"--output_dir: {out_dir}: {n_batches - int(done.sum())} batches were not encoded; rerun the "
                         "same command to finish the build")
    sums = checksums(out_dir)  # one more read of the files: `knnlm datastore verify` compares against these
    meta = {"format": "knnlm-datastore/1", "model_name_or_path": lm.name, "weights_hash": lm.weights_hash(),
            "tokenizer_hash": lm.tokenizer_hash(), "key_point": fingerprint["key_point"], "d": d, "N": n,
            "vocab_size": int(lm.vocab_size), "dtype": str(lm.dtype).replace("torch.", ""), "n_tokens": int(tokens.doc_starts[-1]),
            "n_documents": int(len(tokens.doc_starts) - 1), "skipped_rows": tokens.skipped_rows,
            "corpus_hash": sums["tokens.i32"][:16] + sums["tokens.i32.docs"][:16],  # = TokenFile.sha256()
            "sha256": {name: sums[name] for name in CHECKSUMMED}, "corpus": {k: v for k, v in vars(corpus).items()},
            "dtype_keys": "float16", "dtype_vals": "int32", "build": fingerprint, "versions": package_versions()}
    atomic_write_json(out_dir / "meta.json", meta)
    (out_dir / "done.u8").unlink()
    (out_dir / "build.json").unlink()
    log.info("datastore %s finished: N=%d d=%d", out_dir, n, d)

