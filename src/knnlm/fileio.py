"""Atomic writes, hashing and run provenance (versions, git hash)."""
from __future__ import annotations

import atexit
import contextlib
import errno
import fnmatch
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import KnnlmError

log = logging.getLogger(__name__)

_TMP = ".tmp-"  # temp files are ``<name>.tmp-<pid>``


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path, name: str = "*", own_files: Optional[tuple] = None) -> int:
    """Deletes ``<name>.tmp-<pid>`` files (and folders) left in ``folder`` by killed processes; returns how many.

    A temp file of a live process (another rank, a concurrent run) is kept; with ``own_files``, so is one whose name
    is not a temp of those (a user's ``notes.tmp-2024``).
    """
    import shutil

    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(f"{name}{_TMP}*"):
        pid = p.name.rsplit(_TMP, 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if own_files is not None and not _own_temp(p.name, own_files):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed += 1
            log.info("removed %s, left by a killed run", p)
    return removed


def write_error(path: str | Path, e: OSError, flag: str = "") -> KnnlmError:
    """A one-line error for a failed write: names the file and says how to recover."""
    what = os.strerror(e.errno) if e.errno else str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space (or choose another folder) and rerun the same command: it resumes or restarts by itself"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable folder"
    else:
        fix = "check the folder and rerun the same command"
    return KnnlmError(f"{flag + ': ' if flag else ''}cannot write {path} ({what}); {fix}")


def _fsync(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_path(path: str | Path) -> Path:
    """This process's temp name for ``path`` (``<name>.tmp-<pid>``): skipped by output-folder claims and removed by
    :func:`remove_stale_temps` once the process is gone."""
    path = Path(path)
    return path.with_name(f"{path.name}{_TMP}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path, expected_bytes: Optional[int] = None):
    """Yields a temp path beside ``path``; renames it onto ``path`` only if the block succeeds.

    The temp file is synced to disk before the rename (a crash never leaves a valid-looking empty file) and, with
    ``expected_bytes``, its size is checked (a short write is an error, not a file). Temp files of killed runs with
    the same name are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = temp_path(path)
    try:
        yield tmp
        if expected_bytes is not None and tmp.stat().st_size != expected_bytes:
            raise KnnlmError(f"{path}: wrote {tmp.stat().st_size} bytes, expected {expected_bytes} "
                             "(a short write: is the disk full?); rerun the same command")
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a read-only folder: name the file being written (a bare write() does not)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES) and e.filename in (None, str(tmp), str(path)):
            raise write_error(path, e) from None
        raise
    except RuntimeError as e:  # FAISS's writer reports a failed fwrite as a RuntimeError carrying strerror
        if "No space left on device" in str(e):
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


_REBUILD, _REPLACED = ".rebuild-tmp", ".replaced-tmp"


def staging_dir(final: str | Path) -> Path:
    """Where a rebuild of the folder ``final`` is made (beside it), so the old one stays usable until the new one is
    complete: ``<final>.rebuild-tmp``."""
    final = Path(final)
    return final.with_name(final.name + _REBUILD)


def swap_into_place(staged: str | Path, final: str | Path) -> None:
    """Replaces the folder ``final`` by the complete folder ``staged``: old -> ``<final>.replaced-tmp``, staged ->
    final, then the old one is deleted. A kill between the two renames is undone by ``restore_interrupted_swap``."""
    import shutil

    staged, final = Path(staged), Path(final)
    trash = final.with_name(final.name + _REPLACED)
    shutil.rmtree(trash, ignore_errors=True)
    if final.exists():
        os.replace(final, trash)
    os.replace(staged, final)
    shutil.rmtree(trash, ignore_errors=True)


def restore_interrupted_swap(final: str | Path) -> None:
    """Puts the old folder back when a swap was killed after moving it aside (the staged build then resumes)."""
    import shutil

    final = Path(final)
    trash = final.with_name(final.name + _REPLACED)
    if trash.exists() and not final.exists():
        os.replace(trash, final)
        log.info("restored %s (a rebuild was interrupted while swapping it)", final)
    elif trash.exists():
        shutil.rmtree(trash, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 whatever the locale: reports hold λ, ∘ and ≥, exported corpora any text."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj) -> Path:
    """Valid JSON whatever ``obj`` holds: NaN/inf floats become null (:func:`_finite_json`), other types ``str``."""
    return atomic_write_text(path, json.dumps(_finite_json(obj), indent=2, sort_keys=False, default=str,
                                              allow_nan=False) + "\n")


# What to do about a corrupt file: the text, or a function making it only when one is met (a fix that has to look
# around, as reproduce's "delete the stage's folder and marker", costs nothing on the records that read fine).
Fix = str | Callable[[], str]


def read_json(path: str | Path, fix: Fix = "delete it or rebuild what it belongs to"):
    """A JSON file; a corrupt or non-UTF-8 one is a ``KnnlmError`` naming it (``fix`` says what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KnnlmError(f"{path} is corrupt (not valid JSON: {str(e).splitlines()[0][:80]}); {_fix_text(fix)}") \
            from None


def _fix_text(fix: Fix) -> str:
    return fix() if callable(fix) else fix


def read_record(path: str | Path, fix: Fix = "delete it or rebuild what it belongs to",
                required: Iterable[str] = ()) -> dict:
    """A JSON record (an object) a command wrote: :func:`read_json`, and valid JSON of another shape (``[]``, a number,
    a string) is corrupt alike, naming the file; a caller's ``record["x"]`` or ``.get`` on it is an internal error.
    ``required``: the fields the caller indexes (every record the command writes has them); an object without one
    (``{}``, a hand edit) is corrupt too, not an internal KeyError at its ``record["x"]``."""
    record = read_json(path, fix)
    if not isinstance(record, dict):
        shown = json.dumps(record)
        raise KnnlmError(f"{path} is corrupt (not a JSON object: {shown[:60]}{'...' if len(shown) > 60 else ''}); "
                         f"{_fix_text(fix)}")
    missing = [repr(k) for k in required if k not in record]
    if missing:
        raise KnnlmError(f"{path} is corrupt (no {', '.join(missing)} field{'s' if len(missing) > 1 else ''}); "
                         f"{_fix_text(fix)}")
    return record


def reusable(path: str | Path, key, field: str = "key") -> Optional[dict]:
    """The JSON record saved at ``path`` when it was computed from the same inputs (its ``field`` equals ``key``), else
    None: the one "same run, may resume" test of a saved result (an evaluation point, a cached score, a job's state)."""
    if not Path(path).is_file():
        return None
    record = read_json(path)
    return record if isinstance(record, dict) and same_record(record.get(field), key) else None


def resolve_path(path: str | Path, flag: str) -> Path:
    """``Path(path).resolve()``, with a symlink loop (a RuntimeError or ELOOP from pathlib) as a one-line error."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        raise KnnlmError(f"{flag}: {path} is a symlink loop; point it at a real folder") from None


def _finite_json(obj):
    """``obj`` with every NaN/inf float replaced by None: JSON has no such numbers (a bare NaN is invalid JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_folder(path: str | Path) -> str:
    """sha256 of a folder's files (their paths below it and contents, in path order); hidden files and lock files,
    which a reader may leave, are not part of it."""
    h, root = hashlib.sha256(), Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or f.suffix == ".lock":
            continue
        h.update(f"{rel.as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


_PACKAGES = ("knnlm", "torch", "transformers", "faiss-cpu", "faiss-gpu", "numpy", "peft", "datasets", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


@functools.lru_cache(maxsize=1)
def git_hash() -> str | None:
    """The commit of the knnlm checkout (None when installed from a wheel); '+dirty' marks local changes. Read once
    per process (the CLI reads it when it starts, with the code it imports): read when a run's results were written, it
    named the commits made while the run went on, not the code that ran."""
    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux: ``cpuinfo``'s first ``model name``), else ``platform.processor()``, else "cpu"."""
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip() or "cpu"
    return platform.processor() or "cpu"


def run_info() -> dict:
    """Provenance recorded in every results.json. ``cpu`` and ``cpu_capability`` (the vector instructions torch's CPU
    kernels use, e.g. AVX2 or AVX512) are recorded even on a GPU run: CPU float results, training most of all, differ
    in their last bits between kernels, and over many steps those differences grow into the second decimal."""
    import torch

    cpu = cpu_name()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return {"versions": package_versions(), "git_hash": git_hash(), "device": device, "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------- output folders
RUN_MARKER = "knnlm-run.json"  # {"kind": ..., "inputs": ...}: which command made this folder, from what

_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                "adapter_config.json", "tokenizer.json", "tokenizer_config.json")


def _read_marker(marker: Path, flag: str = "--output_dir") -> dict:
    """A folder's ``knnlm-run.json``; one that is not JSON, or JSON but not a ``{"kind": ..., ...}`` record (a list, a
    number), is corrupt alike: neither says which command made the folder."""
    fix = f"delete {marker} if the folder is yours, or choose another {flag}"
    record = read_json(marker, fix=fix)
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        shown = json.dumps(record)
        raise KnnlmError(f"{marker} is corrupt (not a knnlm run record: {shown[:60]}{'...' if len(shown) > 60 else ''}"
                         f"); {fix}")
    return record


def describe_folder(path: Path) -> str | None:
    """What a folder holds, in words, when it is recognisably a knnlm or Hugging Face artefact (else None)."""
    marker = path / RUN_MARKER
    if marker.is_file():
        with contextlib.suppress(KnnlmError):
            return f"the output of `knnlm {_read_marker(marker)['kind']}`"
        return "a knnlm output folder"
    if any((path / n).exists() for n in _MODEL_FILES) or any(path.glob("*.gguf")):
        return "a model (Hugging Face weights / tokenizer files)"
    if (path / "keys.f16").exists() or (path / "meta.json").exists():
        return "a kNN datastore"
    if (path / "index.json").exists() or any(path.glob("*.faiss")):
        return "a FAISS index"
    if (path / "results.json").exists():
        return "the results of another run"
    return None


def claim_output_dir(path: str | Path, kind: str, inputs: Optional[dict], overwrite: bool = False,
                     own_files: Iterable[str] = (), flag: str = "--output_dir", what: Optional[str] = None,
                     check_only: bool = False, remove_on_replace: bool = False, keep: Iterable[Path] = ()) -> str:
    """Makes ``path`` the output folder of one ``knnlm <kind>`` run with the given ``inputs`` (a JSON-able dict of
    what the outputs are made from), or refuses it with a one-line ``KnnlmError``.

    Returns ``"new"`` (a new or empty folder), ``"same"`` (this command's own earlier run of the same inputs: resume or
    reuse it) or ``"replace"`` (its own run of other inputs and ``overwrite``: the caller replaces its own files,
    :func:`remove_own_files`). A folder holding anything else (a model, a datastore, another command's run, unknown
    files, a file) is refused, with or without ``overwrite``; with ``overwrite`` a folder of this command that also
    holds files it did not write (names outside ``own_files``) is refused too, so an overwrite never drops them.
    ``own_files``: names this command writes (glob patterns allowed: ``seed-*``), which also lets a folder made before
    the marker existed be recognised as its own; ``what`` names the artefact in messages ("MLP memory").

    ``inputs=None`` only checks the folder (cheap, before a model is loaded), including that no live process holds
    it, and writes nothing; so does ``check_only``, which also compares the given inputs with an earlier run's (a
    command that writes only at its end refuses other inputs before its work, not after). Otherwise the folder is
    locked for this process (:func:`lock_output_dir`: a second process writing the same folder is refused, naming the
    holder), checked again under the lock, and ``knnlm-run.json`` (the marker) is written atomically. A folder claimed
    empty is remembered: :func:`abandon_fresh_claims` empties it again if the command fails before any work.
    ``remove_on_replace``: on "replace" the earlier run's own files (but ``keep``) are removed under the lock before
    the marker names the new inputs, so a kill in between leaves the old marker with the old files, never the old
    files under the new marker (which a rerun would take for its own).
    """
    path = Path(path)
    own_files = tuple(own_files)
    state = _claim_state(path, kind, inputs, overwrite, own_files, flag, what)
    if inputs is None or check_only:
        check_not_locked(path, flag)
        return state
    inputs = json.loads(json.dumps(inputs, default=str))  # as read back from JSON
    marker = path / RUN_MARKER
    existed = path.exists() and path.resolve() not in _made_dirs
    try:
        lock_output_dir(path, kind, flag)
        state = _claim_state(path, kind, inputs, overwrite, own_files, flag, what)  # another process may have written
        remove_stale_temps(path, own_files=own_files)
        if state == "replace" and remove_on_replace:
            remove_own_files(path, own_files, keep)
        if state != "same" or not marker.is_file():
            atomic_write_json(marker, {"kind": kind, "inputs": inputs})
    except OSError as e:
        raise write_error(path, e, flag) from None
    if state == "new":
        _fresh_claims.setdefault(path.resolve(), not existed)
    return state


_fresh_claims: dict[Path, bool] = {}  # folder this process claimed empty -> whether this process made it
_made_dirs: set[Path] = set()  # folders this process's locks created


def fresh_claims() -> set[Path]:
    """The folders this process has claimed empty so far (:func:`abandon_fresh_claims`)."""
    return set(_fresh_claims)


def abandon_fresh_claims(keep: Iterable[Path] = ()) -> list[Path]:
    """After a command failed: every folder it claimed empty and wrote only JSON records into (its marker, its
    settings: it stopped at a bad input before any work) is emptied again, and removed where the command made it, so
    that the corrected rerun is not refused as "a different run" and nothing is left that looks like a result. A
    folder holding anything else (tokens, keys, checkpoints: work a rerun resumes) is kept as it is, and so are the
    folders in ``keep`` (claimed before the command began: `knnlm reproduce` runs its stages in its own process).
    Returns the folders emptied."""
    emptied, keep = [], set(keep)
    for folder, made in list(_fresh_claims.items()):
        if folder in keep:
            continue
        del _fresh_claims[folder]
        files = [p for p in folder.rglob("*") if p.is_file() and p.name != LOCK_FILE and _TMP not in p.name]
        if not folder.is_dir() or any(p.suffix != ".json" for p in files):
            continue
        with contextlib.suppress(OSError):
            for p in files:
                p.unlink()
            emptied.append(folder)
            release_output_dirs([folder])
            if made:
                for d in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                    d.rmdir()
                (folder / LOCK_FILE).unlink(missing_ok=True)
                folder.rmdir()
    return emptied


def _entries(path: Path, own_files: tuple) -> list[str]:
    """The names in a folder that count for a claim: the lock and temp files of the command's own files (of killed
    runs) are not content; any other name is, a user's ``notes.tmp-2024`` too."""
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    return [e for e in names if e != LOCK_FILE and not _own_temp(e, own_files)]


def _own_temp(name: str, own_files: tuple) -> bool:
    """``<own name>.tmp-<pid>``: a temp file this command's atomic writes leave (a killed run's). A catch-all pattern
    (``*``: reproduce's folder, all of whose names are its own) names no file, so it makes no name a temp."""
    base, _, pid = name.rpartition(_TMP)
    return bool(base) and pid.isdigit() and _is_own(base, tuple(p for p in own_files if p != "*"))


def _is_own(name: str, own_files: tuple) -> bool:
    return name == RUN_MARKER or any(fnmatch.fnmatchcase(name, pat) for pat in own_files)


def _claim_state(path: Path, kind: str, inputs, overwrite: bool, own_files: tuple, flag: str, what) -> str:
    if path.is_symlink() and not path.exists():
        raise KnnlmError(f"{flag}: {path} is a symlink to nothing (or a symlink loop); pass a real folder")
    if path.exists() and not path.is_dir():
        raise KnnlmError(f"{flag}: {path} is a file, not a folder; pass a new or empty folder")
    inputs = json.loads(json.dumps(inputs, default=str)) if inputs is not None else None
    marker = path / RUN_MARKER
    entries = _entries(path, own_files)
    unknown = [e for e in entries if not _is_own(e, own_files)]
    if not entries or entries == [RUN_MARKER]:
        return "new"
    if marker.is_file():
        record = _read_marker(marker, flag)
        if record["kind"] != kind:
            raise KnnlmError(f"{flag}: {path} holds the output of `knnlm {record['kind']}`, not of `knnlm {kind}`; "
                             "choose another folder (it is never overwritten)")
        if overwrite and own_files and unknown:
            raise KnnlmError(f"{flag}: {path} also holds {len(unknown)} file(s) `knnlm {kind}` did not write, e.g. "
                             f"{unknown[0]}; --overwrite never deletes them: move them out or choose another folder")
        if inputs is None or same_record(record.get("inputs"), inputs):
            return "same"
        if overwrite:
            return "replace"
        raise KnnlmError(f"{flag}: {path} already holds a different {what or f'`knnlm {kind}` run'} (other "
                         f"inputs: {_first_difference(record.get('inputs'), inputs)}); pass --overwrite to replace "
                         "it or choose another folder")
    if own_files and not unknown:
        return "same"  # made before the marker existed; the caller's own checks compare its inputs
    what = describe_folder(path) or f"{len(entries)} other file(s), e.g. {entries[0]}"
    raise KnnlmError(f"{flag}: {path} already holds {what}; `knnlm {kind}` never writes into it "
                     "(with or without --overwrite): choose a new or empty folder")


def remove_own_files(path: str | Path, own_files: Iterable[str], keep: Iterable[Path] = ()) -> list[str]:
    """Deletes what a command wrote into its claimed folder (names matching ``own_files``), never anything else (nor
    the marker, the lock, temp files, or an entry that is or holds a path in ``keep``); returns the names deleted."""
    import shutil

    path, own_files = Path(path), tuple(own_files)
    keep = [Path(k).resolve() for k in keep]
    gone = []
    for name in _entries(path, own_files):
        if name != RUN_MARKER and _is_own(name, own_files):
            p = path / name
            if any(k == p.resolve() or p.resolve() in k.parents for k in keep):
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            gone.append(name)
    return gone


# ---------------------------------------------------------------------------------------------------------------- folder locks
LOCK_FILE = ".knnlm.lock"  # {"pid", "host", "kind", "started"} of the process writing the folder; flock'ed by it
_held: dict[Path, int] = {}  # folder (resolved) -> open descriptor of its lock file, held by this process


def _lock_record(lock: Path) -> dict:
    try:
        record = json.loads(lock.read_text(encoding="utf-8") or "{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy(path: Path, lock: Path, flag: str) -> KnnlmError:
    r = _lock_record(lock)
    doing = "building this store" if r.get("kind") == "datastore build" else "writing this folder"
    since = f", `knnlm {r['kind']}` since {r.get('started', '?')}" if r.get("kind") else ""
    return KnnlmError(f"{flag}: {path} is in use: another knnlm process, pid {r.get('pid', '?')} on "
                      f"{r.get('host', '?')}, is {doing}{since}; wait for it to finish or choose another folder")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock_output_dir(path: str | Path, kind: str, flag: str = "--output_dir") -> None:
    """Takes the folder's lock for this process (created if need be), until :func:`release_output_dirs` or exit.

    The lock is an ``flock`` on ``<folder>/.knnlm.lock``, which records the holder's pid and host: a second process is
    refused with a one-line error naming them; the lock of a process that died is released by the kernel and taken
    over. Re-entrant within one process."""
    import fcntl
    import socket

    path = Path(path)
    try:
        path.mkdir(parents=True)
        _made_dirs.add(path.resolve())
    except FileExistsError:
        if not path.is_dir():
            raise
    key, lock = path.resolve(), path / LOCK_FILE
    if key in _held and _same_file(_held[key], lock):
        return
    for attempt in range(10):  # retried: another process's check holds it for an instant, or its releasing holder
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # unlinked it between our open and flock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if attempt >= 4:
                raise _busy(path, lock, flag) from None
            time.sleep(0.05)
            continue
        if not _same_file(fd, lock):
            os.close(fd)
            continue
        old = _lock_record(lock)
        if old.get("pid") and old.get("pid") != os.getpid():
            log.info("%s: took over the lock of pid %s on %s (no longer running)", path, old.get("pid"), old.get("host"))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "kind": kind,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        _held[key] = fd
        return
    raise _busy(path, lock, flag)


def check_not_locked(path: str | Path, flag: str = "--output_dir") -> None:
    """Refuses a folder whose lock a live process (not this one) holds; takes nothing."""
    import fcntl

    path = Path(path)
    lock = path / LOCK_FILE
    if not lock.is_file() or (path.resolve() in _held and _same_file(_held[path.resolve()], lock)):
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(path, lock, flag) from None
    finally:
        os.close(fd)


def release_output_dirs(keys: Optional[Iterable[Path]] = None) -> None:
    """Releases the folder locks this process holds (all, or those of the resolved folders ``keys``), deleting the
    lock files that are still its own."""
    held = {os.fstat(fd)[1:3] for fd in _held.values()}  # (inode, device) of each
    for key in list(_held if keys is None else keys):
        fd = _held.pop(key, None)
        if fd is None:
            continue
        lock = key / LOCK_FILE
        with contextlib.suppress(OSError):
            if os.stat(lock)[1:3] in held:
                lock.unlink()
        with contextlib.suppress(OSError):
            os.close(fd)


def held_locks() -> set:
    """The folders whose locks this process holds now (for :func:`release_output_dirs` of the ones taken since)."""
    return set(_held)


def releases_locks(func):
    """Decorates a library function that writes output folders: the locks it takes are released when it returns or
    raises (the CLI releases a command's locks at its end anyway; this serves Python callers)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        before = held_locks()
        try:
            return func(*args, **kwargs)
        finally:
            release_output_dirs(held_locks() - before)
    return wrapper


atexit.register(release_output_dirs)


def same_record(old, new) -> bool:
    """Whether a recorded ``old`` (inputs, a build fingerprint) is ``new``. A record made before a hub dataset's
    revision was kept (its ``source`` has the dataset's coordinates but no ``fingerprint``) is taken as the same when
    it matches but for that, with a warning: refusing it would make every such store or run be redone to learn
    nothing new."""
    if old == new:
        return True
    if old != _without_revision(new):
        return False
    names = ", ".join(sorted(set(_hub_sources(old))))
    if names not in _TAKEN_AS_THIS_REVISION:  # once per dataset: a command compares several records of one source
        _TAKEN_AS_THIS_REVISION.add(names)
        log.warning("a record of %s made before hub datasets were known by their revision: taken as this revision's "
                    "(if the dataset changed on the hub since, pass --overwrite)", names)
    return True


_TAKEN_AS_THIS_REVISION: set[str] = set()


def _hub_sources(x):
    """The datasets named in a record (its dicts with a ``dataset``), as name[/config][:split]."""
    if isinstance(x, dict):
        if "dataset" in x:
            yield ("/".join(str(x[k]) for k in ("dataset", "config") if x.get(k))
                   + (f":{x['split']}" if x.get("split") else ""))
        for v in x.values():
            yield from _hub_sources(v)


def _without_revision(x):
    if isinstance(x, dict):
        return {k: _without_revision(v) for k, v in x.items() if not (k == "fingerprint" and "dataset" in x)}
    return x


def _first_difference(old, new, prefix: str = "") -> str:
    """The first differing entry of two nested dicts, e.g. ``source.file: valid.txt vs test.txt``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.') or 'inputs'}: {str(old)[:40]} vs {str(new)[:40]}"
