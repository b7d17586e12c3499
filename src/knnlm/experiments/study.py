"""What every study runner shares (docs/studies.md: run folders, resuming, aggregating seeds, devices): run-folder
names per seed, the resume check, finished runs, seed aggregation, settings declared from and composed into the
library's dataclasses, and the run's output files.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from dataclasses import field
from typing import Callable, Iterable, Optional

import numpy as np

from ..errors import KnnlmError
from ..fileio import atomic_write_json, read_record


def seed_path(root: str | Path, seed: int, rest: str = "") -> Path:
    """``root/seed-<seed><rest>``, or the older ``root/seed<seed><rest>`` where only that one exists."""
    root = Path(root)
    new, old = root / f"seed-{seed}{rest}", root / f"seed{seed}{rest}"
    return old if old.exists() and not new.exists() else new


def check_resumable(out: Path, args, free_keys: Iterable[str]) -> None:
    """Refuses a rerun into ``out`` whose ``config.json`` differs from ``args`` (a dataclass, or a tuple of the
    dataclasses a command saves together with ``config.save_config``) on any field outside ``free_keys`` (threads,
    output folder, number of seeds and the like). A field the old config lacks (one added since it was written) is
    compared as its default, the value that run had where the field was added with the behaviour before it as its
    default (not always so: overspec's train_eval_per_pair defaults to 1 where earlier runs scored no training split);
    deprecated names in it count as their new ones. A folder where the earlier run wrote nothing but its settings (it
    stopped at a bad flag before any work) takes the new ones: there is nothing to resume or to lose."""
    from ..config import field_default, rename_deprecated, to_dict
    from ..fileio import LOCK_FILE, RUN_MARKER

    path = out / "config.json"
    bookkeeping = {path, out / RUN_MARKER, out / LOCK_FILE}
    if not path.is_file() or not any(p.is_file() and p not in bookkeeping for p in out.rglob("*")):
        return
    configs = args if isinstance(args, tuple) else (args,)
    recorded = read_record(path, fix="it records the settings this folder's run was made with: pass a new --output_dir")
    old = rename_deprecated(recorded, [type(a) for a in configs], warn=False)
    new = to_dict(*configs)
    free = set(free_keys)
    defaults = {f.name: field_default(f) for c in configs for f in dataclasses.fields(c)}
    recorded = {k: old.get(k, defaults[k]) for k in new}
    changed = [k for k in new if k not in free and recorded[k] != new[k]]
    if changed:
        diff = ", ".join(f"{k}: {recorded[k]!r}{'' if k in old else ' (not recorded: its default)'} -> {new[k]!r}"
                         for k in changed)
        raise KnnlmError(f"--output_dir: {out} holds a run with other settings ({diff}); rerun with those settings to "
                         "resume it, or pass a new --output_dir")


def mean_std(values: Iterable[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample std (ddof 1) over seeds of the values that are not None; (None, None) without any, std None
    with one: one seed measures no spread, and 0.0 would claim it did (tables then print the mean alone)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(arr):
        return None, None
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None


def curve_mean_std(curves: Iterable[list]) -> tuple[list, list]:
    """Per point of curves aligned over seeds (one list per seed): :func:`mean_std` of the seeds' values there;
    -> (means, stds)."""
    pairs = [mean_std(point) for point in zip(*curves)]
    return [m for m, _ in pairs], [s for _, s in pairs]


def finish_run(done: Path, record: dict, ckpt: Path, write: bool = True) -> dict:
    """Marks a run finished: ``record`` written to ``done`` (a rerun reads it back instead of training), then the run's
    checkpoint ``ckpt`` removed. ``write`` False (a process other than the main one): nothing is touched."""
    if write:
        atomic_write_json(done, record)
        shutil.rmtree(ckpt, ignore_errors=True)
    return record


def read_finished(done: Path, required: Iterable[str] = ()) -> dict:
    """The record :func:`finish_run` wrote to ``done``; one that is not a JSON object (cut short, overwritten) or lacks
    a ``required`` field is a one-line error naming it. Deleting it makes a rerun train that run again (its checkpoint
    went when it finished)."""
    return read_record(done, fix="delete it to train that run again, or pass another --output_dir", required=required)


def stage_record(out: Path, folder: str, name: str = "results.json", required: Iterable[str] = ()) -> dict:
    """The record ``name`` in the stage folder ``OUT/<folder>`` of a ``knnlm reproduce`` run, as its report reads it (a
    study's report part reads other stages' records too: the memory's LM and `mlp train`); one that is not a JSON object
    or without a ``required`` field is a one-line error whose fix runs the stage again (:func:`rerun_stage_fix`, which
    reads the run's stage markers: only for such a record, not for every record read)."""
    return read_record(Path(out) / folder / name, fix=lambda: rerun_stage_fix(Path(out), folder), required=required)


def rerun_stage_fix(out: Path, folder: str) -> str:
    """How to have ``knnlm reproduce`` write the stage folder ``OUT/<folder>`` again: delete the folder and the
    ``.done`` marker of the stage whose --output_dir it is (``reproduce.run_stages``). The marker alone would not do:
    its stage is skipped while it is there, and without it the stage's command finds its own finished run in the
    folder (``lm train`` refuses one with a damaged results.json unless --overwrite, which the recipe does not pass)."""
    target = (out / folder).resolve()
    given = {}  # marker -> the --output_dir values its command line names
    for marker in sorted((out / "stages").glob("*.done")):
        words = marker.read_text(errors="replace").split()
        given[marker] = {words[i + 1] for i in range(len(words) - 1) if words[i] == "--output_dir"}
    # the folder itself first: only then (a marker holds OUT's absolute path when the stage ran, and a folder moved
    # since matches by its end) one ending in it, which another stage's OUT/x/<folder> does too
    for found in (lambda g: Path(g) == target, lambda g: g.endswith(f"/{folder}")):
        for marker, dirs in given.items():
            if any(found(g) for g in dirs):
                return f"delete {out / folder} and {marker}, then rerun `knnlm reproduce`: that stage runs again"
    return (f"delete {out / folder} and the .done marker of the stage that writes it in {out / 'stages'}, then rerun "
            "`knnlm reproduce`: that stage runs again")


def mirror(cls, name: str, default=dataclasses.MISSING, help: str | None = None, deprecated: tuple = ()):
    """A study setting declared from the library's dataclass ``cls``: the field ``name`` with its default (unless given)
    and help text (unless given); ``deprecated``: the study's own old names for it (``knnlm.config``)."""
    src = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = {"help": help or src.metadata["help"], **({"deprecated": deprecated} if deprecated else {})}
    if default is dataclasses.MISSING:
        if src.default_factory is not dataclasses.MISSING:
            return field(default_factory=src.default_factory, metadata=meta)
        default = src.default
    return field(default=default, metadata=meta)


def library_args(cls, settings, prefix: str = "", **given):
    """The library's dataclass ``cls`` composed from a study's ``settings``: every field of ``cls`` the settings declare
    as ``prefix + name`` (e.g. ``mlp_epochs`` for ``MemoryArgs.epochs``), then ``given`` (which wins)."""
    names = {f.name for f in dataclasses.fields(settings)}
    values = {f.name: getattr(settings, prefix + f.name) for f in dataclasses.fields(cls) if prefix + f.name in names}
    return cls(**{**values, **given})


def write_outputs(out: Path, args, metrics: dict, started: float, claims: list, markdown: str,
                  plots: Callable[[], list]) -> dict:
    """Writes ``results.md`` and the plots (``plots()`` -> their paths), then ``results.json`` (``args`` as its config,
    ``metrics``, the claims as records: ``report.finish_outputs``); -> ``{"results": path, "table": path, "plots":
    [paths]}``."""
    from ..report import finish_outputs

    made: list = []
    results = finish_outputs(out, dataclasses.asdict(args), metrics, markdown, started,
                             plots=lambda: made.extend(plots()), claims=[c.record() for c in claims])
    return {"results": results, "table": out / "results.md", "plots": made}
