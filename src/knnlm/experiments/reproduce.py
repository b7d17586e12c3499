"""`knnlm reproduce`: every study of the paper at a chosen scale, then one report beside the published numbers.

A scale is a recipe (``configs/reproduce-<scale>.yaml``): an ordered list of stages, each one `knnlm` command line
with ``{data}`` and ``{out}`` placeholders. A finished stage leaves ``OUT/stages/<name>.done``; a rerun skips it, and
each command resumes its own work when it was killed half-way. The report stage reads the stages' results.json files.

A recipe may name ``requires`` (a condition of this machine, e.g. ``cuda``, without which it is refused unless
``--smoke``). A stage may also carry ``when`` (run it only where a condition of this machine holds, e.g. ``no-faiss-gpu``),
``budget_s`` (its estimated wall time at the recipe's scale, shown beside the measured one) and ``smoke`` (flag
overrides for ``--smoke``). ``--smoke`` runs every stage in seconds on a CPU, so a recipe cannot rot between the runs it
was written for: ``{data}`` becomes a few kB cut from the data folder, and each command gets the overrides of
``SMOKE_OVERRIDES`` (tiny models, a few steps and tokens, CPU, float32) and then its stage's own ``smoke`` ones.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..config import PRESETS_DIR, load_config_file
from ..errors import KnnlmError
from ..fileio import atomic_write_json, atomic_write_text, read_json, run_info
from ..report import fmt, markdown_table, write_markdown, write_results

log = logging.getLogger(__name__)

# The paper's numbers (Chiang et al.), keyed as our report rows.
PAPER = {
    "table1": {"LM": 20.13, "kNN-LM": 16.92, "f": 16.76, "fg": 16.78},
    "table2": {"macondo": {"LM": 19.66, "kNN-LM": 17.69, "MLP-LM": 10.76},
               "wikitext": {"LM": 20.13, "kNN-LM": 16.92, "MLP-LM": 18.68}},
    "table3": {"f": 0.07, "fg": 0.10},
    "table4": {"LM": 20.13, "kNN-LM": 16.92, "f": 16.70, "fg": 19.97, "fg_to_y": 19.41},
    "table5_last": {"1": (-1.02, -0.92), "2": (-3.67, -2.93), "3": (-4.34, -3.83), "4": (-4.17, -3.89),
                    "5": (-4.29, -4.27), "avg": (-3.50, -3.17)},
}


@dataclass
class ReproduceArgs:
    scale: Literal["cpu", "gpu", "paper"] = field(default="cpu", metadata={"help": "cpu: WikiText-2, a small GPT-2 trained here, SmolLM2-135M and from-scratch models on a laptop; gpu: all of WikiText-2 with SmolLM2-135M and GPT-2-small-shaped models trained here, ~10 min on one H100-class GPU (offline); paper: the paper's models and WikiText-103 on GPUs."})
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


def _faiss_gpu() -> bool:
    from ..index import gpu_available

    return gpu_available()


def _gpu_search() -> bool:
    from ..index import gpu_search_available

    return gpu_search_available()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Conditions a stage's ``when`` can name (``no-<name>`` negates): facts about this machine.
CONDITIONS = {"faiss-gpu": _faiss_gpu, "gpu-search": _gpu_search, "cuda": _cuda}


def condition_holds(when: str) -> bool:
    """Whether a stage's ``when`` (a name of ``CONDITIONS``, or ``no-`` and one) holds on this machine."""
    return CONDITIONS[when.removeprefix("no-")]() != when.startswith("no-")


def load_recipe(args: ReproduceArgs) -> dict:
    path = args.recipe or PRESETS_DIR / f"reproduce-{args.scale}.yaml"
    recipe = load_config_file(path)
    if "stages" not in recipe:
        raise KnnlmError(f"--recipe: {path} has no 'stages' list")
    requires = recipe.get("requires")
    if requires is not None and str(requires).removeprefix("no-") not in CONDITIONS:
        raise KnnlmError(f"--recipe: {path}: requires: {requires!r} is not one of "
                         + ", ".join(f"{c}, no-{c}" for c in CONDITIONS))
    for stage in recipe["stages"]:
        extra = set(stage) - STAGE_KEYS
        if extra or "name" not in stage or "argv" not in stage:
            raise KnnlmError(f"--recipe: {path}: stage {stage.get('name')!r} needs 'name' and 'argv' and may have only "
                             f"{', '.join(sorted(STAGE_KEYS))} (got {', '.join(sorted(map(str, stage)))})")
        when = stage.get("when")
        if when is not None and str(when).removeprefix("no-") not in CONDITIONS:
            raise KnnlmError(f"--recipe: {path}: stage {stage['name']}: when: {when!r} is not one of "
                             + ", ".join(f"{c}, no-{c}" for c in CONDITIONS))
    data_files = sorted({a.split("/", 1)[1] for s in recipe["stages"] for a in map(str, s["argv"]) if a.startswith("{data}/")})
    if data_files:
        missing = [f for f in data_files if not args.data_dir or not (Path(args.data_dir) / f).is_file()]
        if missing:
            raise KnnlmError(f"--data_dir: {args.data_dir} must hold WikiText {', '.join(data_files)} (lacks "
                             f"{', '.join(missing)}; e.g. ../shared/data/wikitext-2)")
    return recipe


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
    "lm train": {"--size": "tiny", "--block_size": "64", "--batch_size": "4", "--max_steps": "3", "--eval_every": "3",
                 "--eval_tokens": "256", "--bf16": "false"},
    "datastore build": {**_CPU, "--max_tokens": "400", "--batch_size": "2"},
    "index build": {"--factory": "Flat", "--use_gpu": "false", "--recall_queries": "0"},
    "mlp train": {**_CPU, "--hidden_size": "64", "--batch_tokens": "128", "--micro_batch_tokens": "128",
                  "--max_steps": "3"},
    "eval": {**_CPU, "--max_tokens": "200", "--batch_size": "2"},
    "analyze projection": {**_CPU, "--max_tokens": "64", "--max_steps": "5", "--batch_size": "64"},
    "overspec run": {"--device": "cpu", "--seeds": "0", "--num_villagers": "10", "--num_parents": "2",
                     "--max_children": "2", "--examples_per_child": "1", "--batch_size": "4", "--max_steps": "2",
                     "--eval_every": "2", "--mlp_hidden_size": "64", "--mlp_epochs": "1", "--mlp_batch_tokens": "64"},
    "hurdle run": {"--device": "cpu", "--size": "tiny", "--num_seeds": "2", "--max_steps": "4", "--eval_every": "2",
                   "--batch_size": "4", "--block_size": "32", "--val_tokens": "256", "--macondo_num_villagers": "20",
                   "--macondo_num_parents": "5", "--log_every": "1"},
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
        if src.is_file() and not (folder / name).is_file():
            with open(src, "rb") as f:
                head = f.read(size)
            cut = head.rfind(b"\n") + 1 or len(head)
            atomic_write_text(folder / name, head[:cut].decode("utf-8", errors="ignore"))
    return dataclasses.replace(args, data_dir=str(folder))


def check_run_kind(out: Path, args: ReproduceArgs) -> None:
    """One folder holds one kind of run: a smoke run's finished stages must never be taken for a real run's."""
    path = Path(out) / "stages" / "run.json"
    kind = {"scale": args.scale, "smoke": args.smoke}
    if path.exists():
        before = read_json(path)
        if before != kind:
            raise KnnlmError(f"--output_dir: {out} holds a {before['scale']}{' --smoke' if before['smoke'] else ''} "
                             f"run, not {args.scale}{' --smoke' if args.smoke else ''}; pass another --output_dir")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, kind)


def load_timings(out: Path) -> dict:
    """Wall seconds of each finished stage, as ``run_stages`` recorded them (``OUT/stages/timings.json``)."""
    path = Path(out) / "stages" / "timings.json"
    return read_json(path) if path.exists() else {}


def run_stages(args: ReproduceArgs, run_command) -> dict:
    """Runs the recipe's stages in order with ``run_command(argv) -> exit code``; returns their timings."""
    recipe = load_recipe(args)
    out = Path(args.output_dir)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    names = [s["name"] for s in recipe["stages"]]
    unknown = sorted(set(args.stages) - set(names))
    if unknown:
        raise KnnlmError(f"--stages: unknown stage(s) {', '.join(unknown)}; the {args.scale} recipe has {', '.join(names)}")
    if recipe.get("requires") and not args.smoke and not condition_holds(recipe["requires"]):
        raise KnnlmError(f"--scale: the {args.scale} recipe requires {recipe['requires']}, which this machine lacks; "
                         "run it where it holds, or pass --smoke to check it here in seconds")
    check_run_kind(out, args)
    timings = load_timings(out)
    for stage in recipe["stages"]:
        name = stage["name"]
        done = out / "stages" / f"{name}.done"
        if (args.stages and name not in args.stages) or done.exists():
            continue
        if stage.get("when") and not condition_holds(stage["when"]):
            log.info("stage %s: skipped here (when: %s)", name, stage["when"])
            continue
        argv = stage_argv(stage, args)
        log.info("stage %s: knnlm %s", name, " ".join(argv))
        started = time.time()
        code = run_command(argv)
        if code:
            raise KnnlmError(f"stage {name} failed (exit {code}); fix the cause and rerun the same command to resume")
        timings[name] = round(time.time() - started, 1)
        atomic_write_json(out / "stages" / "timings.json", timings)
        done.write_text(" ".join(argv) + "\n")
    return timings


# ---------------------------------------------------------------------------------------------------------------- report
def _results(out: Path, folder: str) -> Optional[dict]:
    path = out / folder / "results.json"
    return read_json(path)["metrics"] if path.exists() else None


def _claim(text: str, holds: Optional[bool], numbers: str) -> str:
    verdict = "n/a (stage not run)" if holds is None else ("holds" if holds else "does not hold")
    return f"- **{text}** — {verdict} at this scale: {numbers}"


def _wikitext_rows(out: Path, models: list[dict]) -> tuple[list, list, list, list, list]:
    """Rows of Tables 1, 2 (WikiText), 3 and 4 for each WikiText model, and the claims they support."""
    t1, t2, t3, t4, claims = [], [], [], [], []
    p = PAPER
    # f = the paper's f (output layer only, f_out); f_norm = final norm + output layer (docs/projection.md)
    t1.append(["paper (16-layer WT-103 LM)", "", p["table1"]["LM"], p["table1"]["kNN-LM"], p["table1"]["f"], "–",
               p["table1"]["fg"]])
    t3.append(["paper", "", p["table3"]["f"], "–", p["table3"]["fg"]])
    t4.append(["paper", p["table4"]["LM"], p["table4"]["kNN-LM"], p["table4"]["f"], "–", p["table4"]["fg"],
               p["table4"]["fg_to_y"], f"{math.log(20.13 / 19.97) / math.log(20.13 / 16.70):.2f}"])
    t2.append(["paper", p["table2"]["wikitext"]["LM"], p["table2"]["wikitext"]["kNN-LM"], p["table2"]["wikitext"]["MLP-LM"],
               "> 25x", "own training data (WikiText-103)", "45%"])
    for m in models:
        ev, pr, pr4 = (_results(out, m.get(k, "-")) for k in ("eval", "projection", "projection_table4"))
        if ev:
            storage = ev.get("storage", {}).get("datastore_over_mlp")
            data, own, share = _memory_data(out, m, ev)
            t2.append([m["label"], ev["ppl_lm"], ev.get("ppl_knnlm"), ev.get("ppl_mlplm"),
                       f"{storage:.1f}x" if storage else "–", data, share])
            if ev.get("ppl_knnlm") and ev.get("ppl_mlplm"):
                gain_knn, gain_mlp = ev["ppl_lm"] - ev["ppl_knnlm"], ev["ppl_lm"] - ev["ppl_mlplm"]
                # "much of": the paper's memory keeps 45% of kNN's gain (20.13 -> 18.68 vs 16.92); we ask for a third.
                # Judged on the LM's own training data only (the paper's setting, issue 18); other text is reported.
                text = (f"{m['label']} [{data}]: the MLP memory keeps much (≥ 1/3) of kNN's gain with > 25x less "
                        "storage (< 4%)")
                numbers = (f"LM {ev['ppl_lm']:.2f}, kNN-LM {ev['ppl_knnlm']:.2f}, MLP-LM {ev['ppl_mlplm']:.2f} "
                           f"({gain_mlp / gain_knn:.0%} of kNN's gain{'' if share == '–' else ', ' + share}), "
                           f"datastore/memory = {storage or float('nan'):.1f}x")
                if own:
                    claims.append(_claim(text, gain_mlp >= gain_knn / 3 and (storage or 0) > 25, numbers))
                else:
                    claims.append(f"- **{text}** — not judged ({data}: the memory adapts the LM to text it was not "
                                  f"trained on, not the paper's setting): {numbers}")
        if pr:
            rows1, rows3, proj_claims = _projection_rows(m["label"], pr)
            t1 += rows1
            t3 += rows3
            claims += proj_claims
        if pr4:
            row4, claim4 = _table4_row(m["label"], pr4)
            t4.append(row4)
            if claim4:
                claims.append(claim4)
    return t1, t2, t3, t4, claims


def _memory_data(out: Path, model: dict, ev: dict) -> tuple[str, bool, str]:
    """What a memory row measures: "own training data" (the datastore is the LM's training text; verified by hash when
    the recipe names the LM and datastore stages) or "other text"; and the share of kNN's gain with its bootstrap
    interval when the eval cached per-token log-probs (--save_neighbors with --mlp_memory)."""
    own = model.get("data") == "own"
    data = "own training data" if own else "other text" if model.get("data") == "other" else "–"
    if own and model.get("lm") and model.get("datastore"):
        from .own_data import own_data_check

        if (out / model["lm"]).is_dir() and (out / model["datastore"]).is_dir():
            check = own_data_check(out / model["lm"], out / model["datastore"])
            data = ("own training data (hashes match)" if check["match"] else
                    "own training data NOT verified: the datastore's tokens differ from the LM's")
            own = check["match"]
    share = "–"
    cache = out / model["eval"] / "neighbors"
    if (cache / "mlp_gold.f32").is_file():
        from .own_data import gain_share

        lam = ev.get("lmbda", 0.25)
        g = gain_share(cache, [lam])["lmbda"][str(lam)]
        share = f"{g['share']:.0%} [{g['share_ci95'][0]:.0%}, {g['share_ci95'][1]:.0%}]"
    elif ev.get("ppl_knnlm") and ev.get("ppl_mlplm"):
        share = f"{(ev['ppl_lm'] - ev['ppl_mlplm']) / (ev['ppl_lm'] - ev['ppl_knnlm']):.0%}"
    return data, own, share


def _proj_by_tol(pr: dict) -> list[dict]:
    """The per-tolerance entries of a projection results.json (an older one without ``by_tol``: its single run, with
    the old target ``f`` read as ``f_norm``)."""
    if "by_tol" in pr:
        return pr["by_tol"]
    targets = {("f_norm" if t == "f" else t): v for t, v in pr.get("targets", {}).items()}
    return [{"tol": next(iter(targets.values()), {}).get("tol"), "targets": targets}]


def _with_ci(entry: dict, key: str) -> Optional[str]:
    if not entry:
        return None
    ci = entry.get(f"{key}_ci")
    return f"{entry[key]:.2f} [{ci['lo']:.2f}, {ci['hi']:.2f}]" if ci else f"{entry[key]:.2f}"


def _projection_rows(label: str, pr: dict) -> tuple[list, list, list]:
    """Tables 1 and 3 rows (one per tolerance) and the Table 1 claims, judged by the paper's criterion: the share of
    kNN's gain recovered has its 95% interval above 0.9 (`projection.table1_verdicts`)."""
    from .projection import SHARE_THRESHOLD, table1_verdicts

    rows1, rows3, claims = [], [], []
    lm = {"ppl_lm": pr["ppl_lm"], "ppl_lm_ci": pr.get("ppl_lm_ci")}
    knn = {"ppl_knnlm": pr["ppl_knnlm"], "ppl_knnlm_ci": pr.get("ppl_knnlm_ci")}
    for e in _proj_by_tol(pr):
        tg = e["targets"]

        def cell(t):
            v = tg.get(t)
            if not v:
                return None
            share = v.get("share_of_knn_gain")
            return _with_ci(v, "ppl_proj") + ("" if share is None else f"; share {share:.2f}")

        tol = f"{e['tol']:g}" if e.get("tol") is not None else "?"
        rows1.append([label, tol, _with_ci(lm, "ppl_lm"), _with_ci(knn, "ppl_knnlm"), cell("f_out"), cell("f_norm"),
                      cell("fg")])
        rows3.append([label, tol] + [tg[t]["kl_mean"] if t in tg else None for t in ("f_out", "f_norm", "fg")])
    if "by_tol" not in pr:
        return rows1, rows3, claims
    names = {"f_out": "f(z*) (f = output layer, the paper's f)", "f_norm": "f_norm(z*) (final norm + output layer)",
             "fg": "f∘g(z*)"}
    for v in table1_verdicts(pr):
        ci = v["share"]
        verdict = {True: "holds", False: "does not hold", None: "inconclusive"}[v["holds"]]
        claims.append(f"- **{label}: {names[v['target']]} reaches the kNN-LM's perplexity (Table 1; share of kNN's "
                      f"gain with its 95% interval above {SHARE_THRESHOLD})** — {verdict} at tol {v['tol']:g}: "
                      f"LM {pr['ppl_lm']:.2f}, kNN-LM {pr['ppl_knnlm']:.2f}, p_proj {v['ppl_proj']:.2f}, share "
                      f"{fmt(ci['point'])} [{fmt(ci['lo'])}, {fmt(ci['hi'])}]")  # (null: not finite)
    return rows1, rows3, claims


def _table4_row(label: str, pr4: dict) -> tuple[list, Optional[str]]:
    """Table 4's row and its claim: at lr 0.001 for 100 steps f∘g gains less than half of what f gains (the 95%
    interval of the log-perplexity gain ratio below 0.5; `projection.table4_verdict`), f being the paper's f_out."""
    from .projection import RATIO_THRESHOLD, table4_verdict

    e = _proj_by_tol(pr4)[0]
    tg = e["targets"]
    ratio = e.get("fg_gain_over_f_gain", {}).get("f_out")
    row = [label, pr4["ppl_lm"], pr4["ppl_knnlm"]] + [_with_ci(tg.get(t), "ppl_proj")
                                                     for t in ("f_out", "f_norm", "fg", "fg_to_y")]
    row.append(f"{fmt(ratio['point'])} [{fmt(ratio['lo'])}, {fmt(ratio['hi'])}]" if ratio else None)
    v = table4_verdict(pr4) if "by_tol" in pr4 else None
    if v is None:
        return row, None
    verdict = {True: "holds", False: "does not hold", None: "inconclusive"}[v["holds"]]
    r = v["ratio"]
    return row, (f"- **{label}: with a small learning rate, f∘g is much harder to solve than f (Table 4; f∘g's "
                 f"log-perplexity gain over the LM < {RATIO_THRESHOLD} of f's, 95% interval)** — {verdict}: LM "
                 f"{v['ppl_lm']:.2f}, f {v['ppl_f']:.2f}, f∘g {v['ppl_fg']:.2f}, ratio {fmt(r['point'])} "
                 f"[{fmt(r['lo'])}, {fmt(r['hi'])}] (lr {tg['fg']['lr']}, {tg['fg']['max_steps']} steps; paper: LM "
                 f"20.13, f 16.70, f∘g 19.97, ratio 0.04)")


def _overspec_sections(out: Path, entries) -> tuple[str, list, list]:
    """:func:`_overspec_section` for the recipe's ``report.overspec``: one folder name, or a list of {folder, label}
    (e.g. the from-scratch model and SmolLM2); Table 2's paper row once."""
    if isinstance(entries, str):
        entries = [{"folder": entries, "label": ""}]
    texts, claims, t2 = [], [], []
    for i, e in enumerate(entries):
        md, c, rows = _overspec_section(out, e["folder"], e.get("label", ""))
        texts.append((f"### {e['label']}\n\n" if e.get("label") else "") + (md or "(stage not run)\n"))
        claims += c
        t2 += rows if i == 0 else rows[1:]
    return "\n".join(texts), claims, t2


def _overspec_section(out: Path, folder: str, label: str = "") -> tuple[str, list, list]:
    """The Macondo results.md, its claims, and Table 2's Macondo rows (perplexity of the children's names)."""
    m = _results(out, folder)
    tag = f"{label}: " if label else ""
    paper_t2 = PAPER["table2"]["macondo"]
    t2 = [["paper (GPT-2 fine-tuned)", paper_t2["LM"], paper_t2["kNN-LM"], paper_t2["MLP-LM"]]]
    if not m:
        return "", [_claim(f"{tag}over-specification shown (§4, Fig. 1-2)", None, ""),
                    _claim(f"{tag}kNN augmentation improves generalisation from over-specified data (Fig. 1)", None, "")], t2
    report = (out / folder / "results.md").read_text() if (out / folder / "results.md").exists() else ""
    final = m["final"]["test"]
    van, knn = final["lm"]["avg_groups"], final["knn"]["avg_groups"]
    paper_van, paper_knn = PAPER["table5_last"]["avg"]
    verdict = m.get("verdict")
    if verdict:  # issue 17: shown only when the model fits its data, the bare-trained reference is clearly closer to
        # log(1/n), and the kNN - vanilla interval is above 0 (knnlm.experiments.overspec_stats, docs/overspec.md)
        why = "; ".join(f"{'ok' if c['ok'] else 'FAILED'} {c['name']}: {c['detail']}" for c in verdict["conditions"])
        lead = "all three conditions hold" if verdict["shown"] else f"not shown: {', '.join(verdict['failed'])} failed"
        claims = [_claim(f"{tag}over-specification shown: the LM fits its over-specified training sentences yet stays "
                         "farther from log(1/n) on the bare ones than a model trained on them, and kNN narrows the gap "
                         "(§4, Fig. 1-2)", verdict["shown"], f"{lead}. {why}")]
    else:
        claims = [_claim(f"{tag}over-specification shown (§4, Fig. 1-2)", None,
                         "the overspec results hold no verdict (an older run: rerun the stage)")]
    claims += [_claim(f"{tag}kNN augmentation beats the vanilla LM on the bare test sentences (Fig. 1)", knn > van,
                     f"mean log-likelihood over groups at step {m['final']['step']}: vanilla {van:.2f}, kNN {knn:.2f} "
                     f"(kNN ahead at {final['knn_beats_lm_fraction']:.0%} of seed × eval points; paper GPT-2 XL at "
                     f"16k steps: {paper_van} / {paper_knn})" + _interval_text(m, "knn_minus_lm")),
              _claim(f"{tag}the fine-tuned LM stays far from the optimum log(1/n)", final["lm_gap_to_optimum"]["avg_groups"] > 0.5,
                     f"gap to log(1/n): vanilla {final['lm_gap_to_optimum']['avg_groups']:.2f} nats, kNN "
                     f"{final['knn_gap_to_optimum']['avg_groups']:.2f}")]
    mlp = final["mlp"]["avg_groups"] if "mlp" in final else None
    t2.append([f"{label or 'this run'} (step {m['final']['step']})", math.exp(-van), math.exp(-knn),
               None if mlp is None else math.exp(-mlp)])
    if mlp is not None:
        loss = m.get("mlp_child_loss", {}).get("mean")
        claims.append(_claim(f"{tag}the MLP memory beats kNN on Macondo (Table 2)", mlp > knn,
                             f"mean log-likelihood: MLP {mlp:.2f} vs kNN {knn:.2f} vs vanilla {van:.2f} "
                             f"(perplexity of the names: {math.exp(-mlp):.2f} / {math.exp(-knn):.2f} / "
                             f"{math.exp(-van):.2f}; paper 10.76 / 17.69 / 19.66)" + _interval_text(m, "mlp_minus_lm")
                             + ("" if loss is None else f"; the memory's own loss on the training children: {loss:.2f}")))
    return report, claims, t2


def _interval_text(m: dict, key: str) -> str:
    ci = m.get("intervals", {}).get("test", {}).get(key)
    return "" if not ci else (f"; 95% paired bootstrap interval over seeds and examples: {ci['estimate']:+.2f} "
                              f"[{ci['low']:+.2f}, {ci['high']:+.2f}]")


def _hurdle_claims(out: Path, folder: str, label: str) -> list:
    m = _results(out, folder)
    text = f"{label}: without the last MLP the model learns faster early on (Appendix E)"
    if not m:
        return [_claim(text, None, "")]
    key = "ll_avg_groups" if m["mode"] == "macondo" else "train_loss"
    if m.get("areas"):  # paired area over the first 40% vs the first-MLP control, bootstrap over seeds (issue 18)
        a = m["areas"][key]
        ci = lambda st: f"{st['mean']:+.4f} [{st['ci95'][0]:+.4f}, {st['ci95'][1]:+.4f}]"  # noqa: E731
        return [_claim(text + ", and more than without the first MLP", a.get("last_mlp_speeds_early_learning"),
                       f"{key}, paired area over steps 0–{m['area_until_step']:g} (mean advantage, 95% CI over "
                       f"{len(m['seeds'])} seeds): without last MLP {ci(a['without_last_mlp'])}, without first MLP "
                       f"{ci(a['without_first_mlp'])}, last − first {ci(a['last_minus_first'])}")]
    c = m["comparison"][key]
    adv = c["advantage_at_quarter"]
    return [_claim(text, None if adv is None else adv > 0,
                   f"{key}: advantage of the model without the last MLP at step {c['quarter_step']} (1/4 of training) "
                   f"{adv if adv is None else round(adv, 3)}; lead changes hands at steps {c['crossings'] or 'never'}")]


def _stage_rows(recipe: dict, timings: dict) -> tuple[list, dict, dict]:
    """Rows (stage, budget s, wall s) in recipe order plus a total; the measured times and the budgets as dicts."""
    order = [s["name"] for s in recipe["stages"]]
    ordered = {k: timings[k] for k in sorted(timings, key=lambda k: order.index(k) if k in order else len(order))}
    budgets = {s["name"]: s["budget_s"] for s in recipe["stages"] if "budget_s" in s}
    rows = [[s["name"], budgets.get(s["name"]),
             timings.get(s["name"], f"skipped (when: {s['when']})" if s.get("when") and not condition_holds(s["when"])
                         else None)] for s in recipe["stages"]]
    rows += [[k, None, v] for k, v in ordered.items() if k not in order]
    rows.append(["total", sum(budgets.values()) if budgets else None, round(sum(timings.values()), 1)])
    return rows, ordered, budgets


def write_report(args: ReproduceArgs, timings: dict) -> Path:
    """Writes ``OUT/report.md`` (tables beside the paper's, claims, figures) and ``OUT/results.json``."""
    recipe = load_recipe(args)
    out = Path(args.output_dir)
    rep = recipe.get("report", {})
    t1, t2, t3, t4, claims = _wikitext_rows(out, rep.get("wikitext_models", []))
    overspec_md, overspec_claims, t2_macondo = _overspec_sections(out, rep.get("overspec", "overspec"))
    hurdle_claims = [c for h in rep.get("hurdle", []) for c in _hurdle_claims(out, h["folder"], h["label"])]
    claims = claims + overspec_claims + hurdle_claims
    figures = []
    for fig in rep.get("figures", []):
        src = out / fig["path"]
        if src.exists():
            dst = out / "figures" / fig["name"]
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, dst)
            figures.append(f"![{fig['caption']}](figures/{fig['name']})\n\n*{fig['caption']}*\n")
    stage_rows, ordered, budgets = _stage_rows(recipe, timings)
    total = stage_rows[-1][2]
    header = [f"# knnlm reproduce — scale `{args.scale}`{' (smoke run)' if args.smoke else ''}\n",
              f"Machine: {run_info()['device']}; FAISS on GPU: {'yes' if _faiss_gpu() else 'no'}; exact search on GPU: {'FAISS' if _faiss_gpu() else 'torch' if _gpu_search() else 'no'}.\n"]
    if args.smoke:
        header.append("**Smoke run** (`--smoke`): every stage shrunk to seconds on CPU to check that the recipe runs "
                      "end to end. The numbers below mean nothing.\n")
    parts = [*header,
             "## Claims\n", *(c + "\n" for c in claims), "",
             "## Table 1 — perplexity of p_proj (Eq. 2, lr 0.1), 95% bootstrap intervals, by stopping tolerance\n",
             "f = output layer only (the paper's f, z from its input); f_norm = final norm + output layer; f∘g = "
             "f_norm∘g. share = (log ppl_lm − log ppl_proj) / (log ppl_lm − log ppl_knnlm).\n",
             markdown_table(["model", "tol", "LM", "kNN-LM", "f → p_knnlm", "f_norm → p_knnlm", "f∘g → p_knnlm"], t1),
             "## Table 2 — kNN vs MLP memory (WikiText)\n",
             markdown_table(["model", "LM", "kNN-LM", "MLP-LM", "datastore / memory bytes", "datastore is",
                             "share of kNN's gain kept [95% CI]"], t2),
             "## Table 2 — kNN vs MLP memory (Macondo: perplexity of the children's names, test split)\n",
             markdown_table(["model", "LM", "kNN-LM", "MLP-LM"], t2_macondo),
             "## Table 3 — mean KL[p_proj ‖ p_knnlm], by stopping tolerance\n",
             markdown_table(["model", "tol", "f", "f_norm", "f∘g"], t3, digits=3),
             "## Table 4 — projection with lr 0.001, 100 steps (f = output layer only)\n",
             markdown_table(["model", "LM", "kNN-LM", "f", "f_norm", "f∘g", "f∘g → y",
                             "f∘g gain / f gain (log ppl)"], t4),
             "## Table 5 / Figure 1 — Macondo over-specification\n", overspec_md or "(stage not run)\n",
             "## Figures\n", *figures, *(f"- {note}\n" for note in rep.get("figure_notes", [])),
             "## Stages\n", "Wall time of each stage's last (completing) run; a stage skipped as finished keeps its time. "
             "Budget: the recipe's estimate for this scale's machine (`budget_s`).\n",
             markdown_table(["stage", "budget s", "wall s"], stage_rows, digits=1)]
    write_results(out, dataclasses.asdict(args), {"stage_wall_s": ordered, "total_wall_s": total,
                                                  "stage_budget_s": budgets, "claims": claims,
                                                  "table1": t1, "table2": t2, "table2_macondo": t2_macondo,
                                                  "table3": t3, "table4": t4})
    return write_markdown(out, "\n".join(parts), name="report.md")
