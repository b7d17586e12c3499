"""`knnlm reproduce` (docs/reproduce.md): every study of the paper at a chosen scale, then one report beside the
published numbers. A scale is a recipe (``configs/reproduce-<scale>.yaml``): ordered stages, each one `knnlm` command
line with ``{data}`` and ``{out}`` placeholders, optional ``when`` (a condition of this machine), ``budget_s`` and
``smoke`` (flag overrides); a finished stage leaves ``OUT/stages/<name>.done`` and a rerun skips it. ``--smoke`` runs
every stage in seconds on a CPU (a few kB of the data; ``SMOKE_OVERRIDES``, then the stage's own ``smoke``). The report
is one loop over the recipe's registered studies (``studies.STUDIES``): their claims, then the paper's tables.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..claims import Claim, claims_table
from ..config import PRESETS_DIR, load_config_file
from ..errors import KnnlmError
from ..fileio import atomic_path, atomic_write_json, atomic_write_text, read_record, run_info
from ..report import finish_outputs, markdown_table
from .studies import STUDIES, TABLE_ORDER
from .study import stage_record

log = logging.getLogger(__name__)

@dataclass
class ReproduceArgs:
    scale: Literal["cpu", "gpu", "paper"] = field(default="cpu", metadata={"help": "cpu: WikiText-2, a small GPT-2 trained here, SmolLM2-135M and from-scratch models on a laptop; gpu: all of WikiText-2 with SmolLM2-135M and GPT-2-small-shaped models trained here, ~34 min of stage time on one H100-class GPU (measured on an H200 shared by two chains, three stages estimated; offline); paper: the paper's models and WikiText-103 on GPUs."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for every stage's outputs and report.md (required); a rerun resumes."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Folder with WikiText train.txt / valid.txt: WikiText-2 for cpu and gpu (e.g. ../shared/data/wikitext-2), WikiText-103 for paper. Omitted: the scale's WikiText is exported once from HF datasets (hub access) into OUT/data."})
    stages: list[str] = field(default_factory=list, metadata={"help": "Run only these stages (comma list; default: all of the recipe)."})
    recipe: Optional[str] = field(default=None, metadata={"help": "A recipe YAML to use instead of the scale's shipped one."})
    smoke: bool = field(default=False, metadata={"help": "Shrink every stage to seconds on CPU (a few kB of the data, tiny models, a few steps): checks that the recipe runs end to end; its numbers mean nothing. Use its own --output_dir."})
    report_only: bool = field(default=False, metadata={"help": "Run no stage: write report.md and results.json from the stages finished so far (e.g. after a time-limited run)."})

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder for the stages' outputs and report.md")


STAGE_KEYS = {"name", "argv", "when", "budget_s", "smoke"}


def _index_check(name: str):
    """A condition that ``knnlm.index`` answers (imported when asked: FAISS is slow to import)."""
    return lambda: getattr(importlib.import_module("knnlm.index"), name)()


# Conditions a stage's ``when`` can name (``no-<name>`` negates): facts about this machine.
CONDITIONS = {"faiss-gpu": _index_check("gpu_available"), "gpu-search": _index_check("gpu_search_available"),
              "cuda": lambda: importlib.import_module("torch").cuda.is_available()}


def condition_holds(when: str) -> bool:
    """Whether a stage's ``when`` (a name of ``CONDITIONS``, or ``no-`` and one) holds on this machine."""
    return CONDITIONS[when.removeprefix("no-")]() != when.startswith("no-")


def _check_condition(value, where: str) -> None:
    """A recipe's ``requires`` or a stage's ``when`` (absent, or a name of ``CONDITIONS`` with or without ``no-``)."""
    if value is not None and str(value).removeprefix("no-") not in CONDITIONS:
        raise KnnlmError(f"--recipe: {where}: {value!r} is not one of " + ", ".join(f"{c}, no-{c}" for c in CONDITIONS))


def load_recipe(args: ReproduceArgs) -> dict:
    """The recipe, checked, with ``--data_dir`` holding the files its stages read."""
    recipe = read_recipe(args)
    check_data_dir(recipe, args)
    return recipe


def read_recipe(args: ReproduceArgs) -> dict:
    """The recipe checked as far as it can be without the data: its stages' shape, ``--stages`` and ``--smoke``
    (checked before ``--data_dir`` is exported, so that a typo in ``--stages`` is not blamed on the data)."""
    path = args.recipe or PRESETS_DIR / f"reproduce-{args.scale}.yaml"
    recipe = load_config_file(path, flag="--recipe")
    if not isinstance(recipe.get("stages"), list):
        raise KnnlmError(f"--recipe: {path} has no 'stages' list (a list of {{name, argv}} mappings)")
    _check_condition(recipe.get("requires"), f"{path}: requires")
    for i, stage in enumerate(recipe["stages"], 1):
        if not isinstance(stage, dict):
            raise KnnlmError(f"--recipe: {path}: stage {i} is {stage!r}, not a mapping with 'name' and 'argv'")
        extra = set(stage) - STAGE_KEYS
        if extra or "name" not in stage or "argv" not in stage:
            raise KnnlmError(f"--recipe: {path}: stage {stage.get('name')!r} needs 'name' and 'argv' and may have only "
                             f"{', '.join(sorted(STAGE_KEYS))} (got {', '.join(sorted(map(str, stage)))})")
        if not isinstance(stage["argv"], list) or not stage["argv"]:
            raise KnnlmError(f"--recipe: {path}: stage {stage['name']}: argv must be a list of words, e.g. "
                             f"[eval, --model_name_or_path, ...] (got {stage['argv']!r})")
        _check_condition(stage.get("when"), f"{path}: stage {stage['name']}: when")
    names = [str(s["name"]) for s in recipe["stages"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise KnnlmError(f"--recipe: {path}: stage name(s) {', '.join(twice)} used twice; each stage needs its own name")
    unknown = sorted(set(args.stages) - set(names))
    if unknown:
        raise KnnlmError(f"--stages: unknown stage(s) {', '.join(unknown)}; the recipe {path} has {', '.join(names)}")
    uncut = [f for f in _data_files(recipe) if f not in SMOKE_DATA_BYTES]
    if args.smoke and uncut:
        raise KnnlmError(f"--recipe: {path}: --smoke cuts only {', '.join(SMOKE_DATA_BYTES)} of --data_dir, not "
                         f"{', '.join(uncut)}; run that recipe without --smoke")
    return recipe


def _data_files(recipe: dict) -> list[str]:
    return sorted({a.split("/", 1)[1] for s in recipe["stages"] for a in map(str, s["argv"]) if a.startswith("{data}/")})


def check_data_dir(recipe: dict, args: ReproduceArgs) -> None:
    data_files = _data_files(recipe)
    if data_files:
        missing = [f for f in data_files if not args.data_dir or not (Path(args.data_dir) / f).is_file()]
        if missing:
            raise KnnlmError(f"--data_dir: {args.data_dir} must hold WikiText {', '.join(data_files)} (lacks "
                             f"{', '.join(missing)}; e.g. ../shared/data/wikitext-2)")


WIKITEXT_CONFIGS = {"cpu": "wikitext-2-raw-v1", "gpu": "wikitext-2-raw-v1", "paper": "wikitext-103-raw-v1"}


def with_data_dir(args: ReproduceArgs) -> ReproduceArgs:
    """Without ``--data_dir``, exports the scale's WikiText from HF ``datasets`` to ``OUT/data`` (once) and uses it."""
    if args.data_dir:
        return args
    folder = Path(args.output_dir) / "data"
    if not (folder / "valid.txt").is_file():
        import datasets

        config = WIKITEXT_CONFIGS[args.scale]
        try:
            ds = datasets.load_dataset("wikitext", config)
        except Exception as e:  # offline, no such config, ...: all mean "give a folder instead"
            raise KnnlmError(f"--data_dir: not given, and HF datasets 'wikitext' ({config}) cannot be loaded "
                             f"({str(e).splitlines()[0]}); pass a folder with train.txt, valid.txt and test.txt") from None
        for split, name in (("train", "train.txt"), ("test", "test.txt"), ("validation", "valid.txt")):  # valid.txt last: marks a finished export
            atomic_write_text(folder / name, "".join(ds[split]["text"]))
        log.info("exported wikitext %s to %s", config, folder)
    return dataclasses.replace(args, data_dir=str(folder))


# --smoke: how much of each data file the stages read (cut at a line end), and the flags that shrink each command.
SMOKE_DATA_BYTES = {"train.txt": 12_000, "valid.txt": 3_000, "test.txt": 3_000}
_CPU = {"--device": "cpu", "--dtype": "float32"}
SMOKE_OVERRIDES: dict[str, dict[str, Optional[str]]] = {
    "datastore build": {**_CPU, "--max_tokens": "400", "--batch_size": "2"},
    "index build": {"--factory": "Flat", "--use_gpu": "false", "--recall_queries": "0"},
    "eval": {**_CPU, "--max_tokens": "200", "--batch_size": "2"},
    **{command: flags for study in STUDIES.values() for command, flags in study.smoke.items()},
}


def override_flags(argv: list[str], overrides: dict) -> list[str]:
    """``argv`` with each ``--flag value`` pair of ``overrides`` replaced (or appended; a None value removes the flag)."""
    argv = list(argv)
    for flag, value in overrides.items():
        if flag in argv:
            i = argv.index(flag)
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            del argv[i: i + 1 + has_value]
        if value is not None:
            argv += [flag, str(value)]
    return argv


def stage_argv(stage: dict, args: ReproduceArgs) -> list[str]:
    data = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    out = str(Path(args.output_dir).resolve())
    argv = [str(a).format(data=data, out=out) for a in stage["argv"]]
    if args.smoke:
        command = " ".join(argv[:2]) if " ".join(argv[:2]) in SMOKE_OVERRIDES else argv[0]  # `lm train`, `eval`
        argv = override_flags(argv, SMOKE_OVERRIDES.get(command, {}))
        argv = override_flags(argv, stage.get("smoke") or {})
    return argv


def with_smoke_data(args: ReproduceArgs) -> ReproduceArgs:
    """With ``--smoke``: the data folder's files cut to ``SMOKE_DATA_BYTES`` (at a line end) in ``OUT/smoke-data``."""
    if not args.smoke or not args.data_dir:
        return args
    folder = Path(args.output_dir) / "smoke-data"
    for name, size in SMOKE_DATA_BYTES.items():
        src = Path(args.data_dir) / name
        if not src.is_file():
            continue
        with open(src, "rb") as f:
            head = f.read(size)
        cut = head.rfind(b"\n") + 1 or len(head)
        text = head[:cut].decode("utf-8", errors="ignore")
        if not (folder / name).is_file():
            atomic_write_text(folder / name, text)
        elif (folder / name).read_bytes() != text.encode("utf-8"):  # the stages' {data} is this folder either way
            raise KnnlmError(f"--data_dir: {src} is not the file {args.output_dir}'s smoke run was cut from "
                             f"({folder / name} differs); pass another --output_dir")
    return dataclasses.replace(args, data_dir=str(folder))


def check_run_kind(out: Path, args: ReproduceArgs) -> None:
    """One folder holds one kind of run: a smoke run's finished stages must never be taken for a real run's."""
    path = Path(out) / "stages" / "run.json"
    kind = {"scale": args.scale, "smoke": args.smoke}
    if path.exists():
        before = read_record(path, fix="it says which kind of run (scale, --smoke) the folder holds: pass another "
                             "--output_dir", required=("scale", "smoke"))
        if before != kind:
            raise KnnlmError(f"--output_dir: {out} holds a {before['scale']}{' --smoke' if before['smoke'] else ''} "
                             f"run, not {args.scale}{' --smoke' if args.smoke else ''}; pass another --output_dir")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, kind)


def load_timings(out: Path, name: str = "timings.json") -> dict:
    """Wall seconds of each finished stage, as ``run_stages`` recorded them (``OUT/stages/timings.json``; with
    ``name="runs.json"``, how many runs each took)."""
    path = Path(out) / "stages" / name
    return read_record(path, fix="delete it: the stages finished so far are kept, their times are no longer "
                       "reported") if path.exists() else {}


# How often a running stage saves its wall time so far: a run ended by a kill still counts, up to its last save.
HEARTBEAT_S = 30.0


def timed_run(path: Path, run) -> tuple[int, dict]:
    """``run()``'s exit code and ``{"wall_s", "runs"}``: its wall time added to what earlier runs of the stage spent
    (``path``, saved every ``HEARTBEAT_S`` and when it ends or fails), so a resumed stage's time is all of its runs'."""
    before = read_record(path, fix="delete it: the stage's time then counts from this run",
                         required=("wall_s", "runs")) if path.exists() else {"wall_s": 0.0, "runs": 0}
    started, stop = time.time(), threading.Event()

    def save() -> dict:
        now = {"wall_s": round(before["wall_s"] + time.time() - started, 1), "runs": before["runs"] + 1}
        atomic_write_json(path, now)
        return now

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            save()

    save()  # the run counts from its start, even if killed before the first heartbeat
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        code = run()
    finally:
        stop.set()
        thread.join()
        spent = save()
    return code, spent


def finished_as_now(stage: dict, args: ReproduceArgs) -> bool:
    """Whether the stage finished as its command line now reads (its ``OUT/stages/<name>.done`` names it): after a
    recipe edit or another ``--data_dir`` its outputs, and its recorded time, are another command's."""
    done = Path(args.output_dir) / "stages" / f"{stage['name']}.done"
    return done.is_file() and _same_command(done.read_text().strip(), " ".join(stage_argv(stage, args)),
                                            str(Path(args.output_dir).resolve()))


def _same_command(recorded: str, line: str, out: str) -> bool:
    """Whether a marker's command line ``recorded`` is ``line`` but for where OUT was: the marker holds OUT's absolute
    path (and that of a --smoke or exported data folder inside it), so a folder moved or renamed since its stages ran
    would otherwise have none of them finished (--report_only reported each as not run; a rerun ran each again).
    A marker that names OUT where it is now was written here, so only the same line matches it: a recipe edit that
    took ``{out}/sub/x`` to ``{out}/x`` would otherwise read as OUT once at ``OUT/sub``. The old OUT is one path, no
    whitespace in it, so that it cannot stand for other arguments (the same line elsewhere but for them)."""
    if recorded == line:
        return True
    at_out = re.escape(out) + r"(?=/|\s|$)"
    parts = re.split(at_out, line)
    if len(parts) == 1 or re.search(at_out, recorded):
        return False
    pattern = re.escape(parts[0]) + r"(?P<out>/\S+?)" + "(?P=out)".join(re.escape(p) for p in parts[1:])
    return re.fullmatch(pattern, recorded) is not None


def run_stages(args: ReproduceArgs, run_command, recipe: Optional[dict] = None) -> dict:
    """Runs the recipe's stages in order with ``run_command(argv) -> exit code``; returns their timings. ``recipe``:
    the one ``load_recipe(args)`` read (the caller's, so that its report describes the stages that ran)."""
    recipe = recipe or load_recipe(args)
    out = Path(args.output_dir)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    if recipe.get("requires") and not args.smoke and not condition_holds(recipe["requires"]):
        raise KnnlmError(f"--scale: the {args.scale} recipe requires {recipe['requires']}, which this machine lacks; "
                         "run it where it holds, or pass --smoke to check it here in seconds")
    check_run_kind(out, args)
    timings, runs = load_timings(out), load_timings(out, "runs.json")
    for stage in recipe["stages"]:
        name = stage["name"]
        done = out / "stages" / f"{name}.done"
        if args.stages and name not in args.stages:
            continue
        argv = stage_argv(stage, args)
        if done.exists():
            if finished_as_now(stage, args):
                continue
            # another --data_dir or an edited recipe: the finished stage's results are not this command's; its
            # command resumes what it can and refuses, in one line, an output folder of other settings
            log.warning("stage %s: finished as `knnlm %s`, now `knnlm %s`: running it again", name,
                        done.read_text().strip(), " ".join(argv))
            done.unlink()
        if stage.get("when") and not condition_holds(stage["when"]):
            log.info("stage %s: skipped here (when: %s)", name, stage["when"])
            continue
        log.info("stage %s: knnlm %s", name, " ".join(argv))
        elapsed = out / "stages" / f"{name}.elapsed.json"
        code, spent = timed_run(elapsed, lambda: run_command(argv))
        if code:
            raise KnnlmError(f"stage {name} failed (exit {code}); fix the cause and rerun the same command to resume")
        timings[name], runs[name] = spent["wall_s"], spent["runs"]
        atomic_write_json(out / "stages" / "timings.json", timings)
        atomic_write_json(out / "stages" / "runs.json", runs)
        # atomically: a marker cut by a kill or a full disk names no command, so the finished stage would run again
        atomic_write_text(done, " ".join(argv) + "\n")
        elapsed.unlink()
    return timings


# ---------------------------------------------------------------------------------------------------------------- report
def finished_folders(recipe: dict, args: ReproduceArgs) -> dict[str, bool]:
    """Each ``--output_dir {out}/<folder>`` of the recipe's stages -> whether its stage finished as this recipe's
    command (its ``.done`` names that command line): a stage rerun after a recipe edit and killed, or not rerun yet,
    keeps the earlier command's results.json, which are not this recipe's."""
    status = {}
    for stage in recipe["stages"]:
        argv = [str(a) for a in stage["argv"]]
        if "--output_dir" in argv[:-1] and argv[argv.index("--output_dir") + 1].startswith("{out}/"):
            status[argv[argv.index("--output_dir") + 1][len("{out}/"):]] = finished_as_now(stage, args)
    return status


def collect(out: Path, entries: list[dict], finished: Optional[dict] = None) -> tuple[list[Claim], dict[str, list], list[str]]:
    """One loop over the recipe's studies: each finished stage's report part gives its table rows and claims; a study
    whose stage has not run yet is named in the third list. ``finished``: :func:`finished_folders` (a folder it names
    False is not run yet, whatever it holds)."""
    claims: list[Claim] = []
    tables: dict[str, list] = {}
    missing = []
    for entry in entries:
        study = STUDIES.get(entry.get("study"))
        if study is None or study.report is None:
            raise KnnlmError(f"--recipe: report study {entry.get('study')!r} is not one of "
                             + ", ".join(name for name, s in STUDIES.items() if s.report))
        for name, (_, _, paper) in study.tables.items():
            tables.setdefault(name, list(paper))
        path = out / entry["folder"] / "results.json"
        if not path.exists() or (finished or {}).get(entry["folder"]) is False:
            missing.append(f"{entry['study']}: {entry.get('label', '')} ({entry['folder']})")
            continue
        rows, found = study.report(stage_record(out, entry["folder"], required=("metrics",))["metrics"], entry, out)
        claims += found
        for name, r in rows.items():
            tables[name] += r
    return claims, tables, missing


def _table_sections(tables: dict[str, list]) -> list[str]:
    known = {name: spec for study in STUDIES.values() for name, spec in study.tables.items()}
    order = [t for t in TABLE_ORDER if t in tables] + [t for t in tables if t not in TABLE_ORDER]
    parts = []
    for name in order:
        title, headers, _ = known[name]
        body = "\n".join(tables[name]) if headers is None else markdown_table(headers, tables[name])
        parts += [f"## {title}\n", body or "(stage not run)\n"]
    return parts


def _stage_rows(recipe: dict, timings: dict, runs: dict) -> tuple[list, dict, dict]:
    """Rows (stage, budget s, wall s, runs) in recipe order plus a total; the measured times and the budgets as dicts."""
    order = [s["name"] for s in recipe["stages"]]
    ordered = {k: timings[k] for k in sorted(timings, key=lambda k: order.index(k) if k in order else len(order))}
    budgets = {s["name"]: s["budget_s"] for s in recipe["stages"] if "budget_s" in s}
    rows = [[s["name"], budgets.get(s["name"]),
             timings.get(s["name"], f"skipped (when: {s['when']})" if s.get("when") and not condition_holds(s["when"])
                         else None), runs.get(s["name"])] for s in recipe["stages"]]
    rows += [[k, None, v, runs.get(k)] for k, v in ordered.items() if k not in order]
    rows.append(["total", sum(budgets.values()) if budgets else None, round(sum(timings.values()), 1), None])
    return rows, ordered, budgets


def current_times(recipe: dict, args: ReproduceArgs, times: dict) -> dict:
    """``times`` (timings.json's or runs.json's) less the recipe's stages that have not finished as their command now
    reads: the time recorded for such a stage is its earlier command's (its rerun, killed or not started yet, records
    its own when it finishes)."""
    stale = {s["name"] for s in recipe["stages"] if not finished_as_now(s, args)}
    return {name: t for name, t in times.items() if name not in stale}


def write_report(args: ReproduceArgs, timings: dict, recipe: Optional[dict] = None) -> Path:
    """Writes ``OUT/report.md`` (the claims table, then the paper's tables beside ours, figures, stage times) and
    ``OUT/results.json`` (the claims as records, the tables, the times); ``recipe`` as for :func:`run_stages`."""
    recipe = recipe or load_recipe(args)
    out = Path(args.output_dir)
    rep = recipe.get("report", {})
    finished = finished_folders(recipe, args)
    claims, tables, missing = collect(out, rep.get("studies", []), finished)
    figures = []
    for fig in rep.get("figures", []):
        src, folder = out / fig["path"], Path(fig["path"]).parts[0]
        if src.exists() and (out / folder / "results.json").exists() and finished.get(folder) is not False:
            dst = out / "figures" / fig["name"]
            dst.parent.mkdir(exist_ok=True)
            with atomic_path(dst) as tmp:  # (a kill mid-copy leaves no cut PNG that report.md links to)
                shutil.copyfile(src, tmp)
            figures.append(f"![{fig['caption']}](figures/{fig['name']})\n\n*{fig['caption']}*\n")
    timings, runs = current_times(recipe, args, timings), current_times(recipe, args, load_timings(out, "runs.json"))
    stage_rows, ordered, budgets = _stage_rows(recipe, timings, runs)
    total = stage_rows[-1][2]
    faiss_gpu = condition_holds("faiss-gpu")
    search = "FAISS" if faiss_gpu else "torch" if condition_holds("gpu-search") else "no"
    info = run_info()
    header = [f"# knnlm reproduce — scale `{args.scale}`{' (smoke run)' if args.smoke else ''}\n",
              f"Machine: {info['device']} (CPU kernels: {info['cpu_capability']}); FAISS on GPU: "
              f"{'yes' if faiss_gpu else 'no'}; exact search on GPU: {search}.\n"]
    if args.smoke:
        header.append("**Smoke run** (`--smoke`): every stage shrunk to seconds on CPU to check that the recipe runs "
                      "end to end. The numbers below mean nothing.\n")
    parts = [*header, "## Claims\n", CLAIMS_NOTE, claims_table(claims),
             *(f"- not run yet: {m}\n" for m in missing), "", *_table_sections(tables),
             "## Figures\n", *figures, *(f"- {note}\n" for note in rep.get("figure_notes", [])),
             "## Stages\n", "Wall time of each stage summed over its runs (a stage failed, or killed and resumed, "
             f"counts every run; a killed run up to its last save, every {HEARTBEAT_S:.0f} s); a stage skipped as "
             "finished keeps its time, and one whose command changed since it finished has none until it finishes "
             "again. Runs –: not counted (the time is its last, completing run's). Budget: the "
             "recipe's `budget_s`, the stage's cost measured on this scale's machine (or estimated where not).\n",
             markdown_table(["stage", "budget s", "wall s", "runs"], stage_rows, digits=1)]
    finish_outputs(out, dataclasses.asdict(args), {"stage_wall_s": ordered, "total_wall_s": total, "stage_runs": runs,
                                                   "stage_budget_s": budgets, "tables": tables}, "\n".join(parts),
                   markdown_name="report.md", claims=[c.record() for c in claims])
    return out / "report.md"


CLAIMS_NOTE = ("Each claim is judged on its 95% bootstrap interval: it holds when the whole interval lies on the "
               "claimed side of the threshold, does not hold when the whole interval lies on the other side, and is "
               "inconclusive otherwise; a setting that is not the paper's is not judged (the reason is given), as is "
               "an interval over too few blocks of tokens (stats.MIN_BLOCKS), one over seeds alone (the hurdle's) from too few "
               "seeds (stats.MAX_RANGE_SEEDS: it is their range) and a "
               "share of a gain its reference (the kNN-LM, or f) does not make (stats.no_gain); a solver still "
               "improving at its last step leaves a failing share inconclusive (not converged). Macondo's intervals resample "
               "seeds and, within each, examples: over the 1-3 seeds a setting names they speak for those seeds' "
               "models, and cover the spread between seeds' training runs only partly.\n")
