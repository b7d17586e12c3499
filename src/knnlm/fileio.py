"""Atomic writes, hashing and run provenance (versions, git hash)."""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable, Optional

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


def remove_stale_temps(folder: str | Path, name: str = "*") -> int:
    """Deletes ``<name>.tmp-<pid>`` files (and folders) left in ``folder`` by killed processes; returns how many.

    A temp file of a live process (another rank, a concurrent run) is kept.
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
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
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
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, fix: str = "delete it or rebuild what it belongs to"):
    """A JSON file; a corrupt or non-UTF-8 one is a ``KnnlmError`` naming it (``fix`` says what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KnnlmError(f"{path} is corrupt (not valid JSON: {str(e).splitlines()[0][:80]}); {fix}") from None


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_PACKAGES = ("knnlm", "torch", "transformers", "faiss-cpu", "faiss-gpu", "numpy", "peft", "datasets", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def git_hash() -> str | None:
    """The commit of the knnlm checkout (None when installed from a wheel); '+dirty' marks local changes."""
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


def run_info() -> dict:
    """Provenance recorded in every results.json."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"versions": package_versions(), "git_hash": git_hash(), "device": device,
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------- output folders
RUN_MARKER = "knnlm-run.json"  # {"kind": ..., "inputs": ...}: which command made this folder, from what

_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                "adapter_config.json", "tokenizer.json", "tokenizer_config.json")


def describe_folder(path: Path) -> str | None:
    """What a folder holds, in words, when it is recognisably a knnlm or Hugging Face artefact (else None)."""
    marker = path / RUN_MARKER
    if marker.is_file():
        with contextlib.suppress(KnnlmError, AttributeError):
            return f"the output of `knnlm {read_json(marker).get('kind')}`"
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
                     own_files: Iterable[str] = (), flag: str = "--output_dir", what: Optional[str] = None) -> str:
    """Makes ``path`` the output folder of one ``knnlm <kind>`` run with the given ``inputs`` (a JSON-able dict of
    what the outputs are made from), or refuses it with a one-line ``KnnlmError``.

    Returns ``"new"`` (a new or empty folder), ``"same"`` (this command's own earlier run of the same inputs: resume or
    reuse it) or ``"replace"`` (its own run of other inputs and ``overwrite``: the caller replaces its files). A folder
    holding anything else (a model, a datastore, another command's run, unknown files, a file) is refused, with or
    without ``overwrite``. ``inputs=None`` only checks the folder (cheap, before a model is loaded) and writes nothing. ``own_files``: names this command writes, so a folder made before the marker existed (and
    holding nothing else) is recognised as its own (glob patterns allowed: ``seed-*``); ``what`` names the artefact in messages ("MLP memory"). Writes
    ``knnlm-run.json`` (the marker) atomically.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KnnlmError(f"{flag}: {path} is a file, not a folder; pass a new or empty folder")
    inputs = json.loads(json.dumps(inputs, default=str)) if inputs is not None else None  # as read back from JSON
    marker = path / RUN_MARKER
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    entries = [e for e in entries if _TMP not in e]  # temp files of killed runs are cleaned below
    if not entries or entries == [RUN_MARKER]:
        state = "new"
    elif marker.is_file():
        record = read_json(marker, fix=f"delete {marker} if the folder is yours, or choose another {flag}")
        if not isinstance(record, dict) or record.get("kind") != kind:
            other = record.get("kind") if isinstance(record, dict) else "?"
            raise KnnlmError(f"{flag}: {path} holds the output of `knnlm {other}`, not of `knnlm {kind}`; "
                             "choose another folder (it is never overwritten)")
        if inputs is None or record.get("inputs") == inputs:
            state = "same"
        elif overwrite:
            state = "replace"
        else:
            raise KnnlmError(f"{flag}: {path} already holds a different {what or f'`knnlm {kind}` run'} (other "
                             f"inputs: {_first_difference(record.get('inputs'), inputs)}); pass --overwrite to replace "
                             "it or choose another folder")
    elif own_files and all(any(fnmatch.fnmatchcase(e, pat) for pat in own_files) for e in entries):
        state = "same"  # made before the marker existed; the caller's own checks compare its inputs
    else:
        what = describe_folder(path) or f"{len(entries)} other file(s), e.g. {entries[0]}"
        raise KnnlmError(f"{flag}: {path} already holds {what}; `knnlm {kind}` never writes into it "
                         "(with or without --overwrite): choose a new or empty folder")
    if inputs is None:
        return state
    try:
        path.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        if state != "same" or not marker.is_file():
            atomic_write_json(marker, {"kind": kind, "inputs": inputs})
    except OSError as e:
        raise write_error(path, e, flag) from None
    return state


def _first_difference(old, new, prefix: str = "") -> str:
    """The first differing entry of two nested dicts, e.g. ``source.file: valid.txt vs test.txt``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.') or 'inputs'}: {str(old)[:40]} vs {str(new)[:40]}"
