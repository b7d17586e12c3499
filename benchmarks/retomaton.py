"""RetoMaton: perplexity against the fraction of saved searches (the paper's Fig. 2), and its cost against LM-only.

    # the sweep: RetoMaton with and without clusters over --min_knns, the random-skip kNN-LM over --skip_probs
    .venv/bin/python benchmarks/retomaton.py sweep --model_name_or_path runs/bench/lm-own \
        --datastore runs/retomaton/ds-own610k --validation_file ../shared/data/wikitext-2/valid.txt \
        --max_tokens 32768 --min_knns 1,2,4,8,16,32,64 --skip_probs 0.25,0.5,0.75 --output_dir runs/retomaton/sweep
    # the cost: LM-only, the kNN-LM (one search per token, exact distances) and RetoMaton at one setting
    .venv/bin/python benchmarks/retomaton.py timing ... --min_knns 1 [--clusters --cluster_min_knns 4] --reps 3

Every run is a fresh process (`knn_eval.py`'s method: one torch and one FAISS thread, the scoring loop timed from its
progress bar on, wall and user + system CPU time). ``sweep`` writes ``sweep.json``, ``sweep.md`` (the table) and
``retomaton.png`` (perplexity against the fraction of saved searches, report.line_plot; ``plot`` redraws it from
sweep.json) into --output_dir and prints
the smallest --min_knns whose perplexity is within --within of the kNN-LM's; ``timing`` prints medians and ratios.
The kNN-LM and RetoMaton use exact distances (``--recompute_dists``; RetoMaton's are always exact).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_eval import _LOOP_START, _mark_loop_start, _usage  # noqa: E402  (the same measurement as knn_eval.py)


def worker(args) -> None:
    """One run in this process: ``--settings`` (JSON of KNNArgs fields, or "lm") -> one JSON line."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from knnlm.cli import keep_freed_memory

    keep_freed_memory()
    import knnlm.evaluate
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import Datastore
    from knnlm.evaluate import EvalArgs, evaluate
    from knnlm.knn import KNNArgs
    from knnlm.models import ModelArgs, load_model

    knnlm.evaluate.tqdm = _mark_loop_start
    lm = load_model(ModelArgs(model_name_or_path=args.model_name_or_path, device="cpu"))
    corpus = CorpusArgs(validation_file=args.validation_file, max_tokens=args.max_tokens)
    out = Path(tempfile.mkdtemp(prefix="knnlm-bench-rt-"))
    eargs = EvalArgs(output_dir=str(out), batch_size=args.batch_size)
    try:
        if args.settings == "lm":
            m = evaluate(lm, corpus, out, eargs)
        else:
            knn = KNNArgs(k=args.k, nprobe=args.nprobe, lmbda=[args.lmbda], recompute_dists=True,
                          **json.loads(args.settings))
            knn.validate()
            m = evaluate(lm, corpus, out, eargs, datastore=Datastore.open(args.datastore), knn=knn)
        end = _usage()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    res = {k: end[k] - _LOOP_START[k] for k in ("user_s", "sys_s")}
    res.update(wall_s=end["wall"] - _LOOP_START["wall"], n_tokens=m["n_tokens"], ppl_lm=m["ppl_lm"],
               ppl=m.get("ppl_knnlm", m["ppl_lm"]), foss=m.get("foss"), searches=m.get("searches"),
               candidates_per_step=m.get("candidates_per_step"))
    print(json.dumps(res))


def _run(args, settings) -> dict:
    cmd = [sys.executable, __file__, "worker", "--settings", settings if settings == "lm" else json.dumps(settings)]
    for name in ("model_name_or_path", "datastore", "validation_file", "max_tokens", "k", "lmbda", "nprobe",
                 "batch_size"):
        cmd += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"{settings} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {json.dumps(settings)}: {json.dumps(out)}", flush=True)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def sweep(args) -> None:
    from knnlm.fileio import atomic_write_json
    from knnlm.report import markdown_table, write_markdown

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    knn = _run(args, {})
    series = {"RetoMaton": [{"retomaton": True, "min_knns": m, "max_knns": args.max_knns} for m in _ints(args.min_knns)],
              "RetoMaton, clusters": [{"retomaton": True, "min_knns": m, "max_knns": args.max_knns,
                                       "no_clusters": False} for m in _ints(args.min_knns)] if args.clusters else [],
              "kNN-LM, random skips": [{"skip_search_prob": float(p)} for p in args.skip_probs.split(",") if p]}
    runs = {name: [(s, _run(args, s)) for s in settings] for name, settings in series.items() if settings}
    rows = [["kNN-LM (a search per token)", "–", 0.0, knn["ppl"], knn["candidates_per_step"], 0.0]]
    for name, rs in runs.items():
        for s, r in rs:
            setting = f"min_knns {s['min_knns']}" if "min_knns" in s else f"skip {s['skip_search_prob']}"
            rows.append([name, setting, r["foss"], r["ppl"], r["candidates_per_step"], r["ppl"] / knn["ppl"] - 1])
    table = markdown_table(["variant", "setting", "fraction of saved searches", "perplexity", "neighbours per step",
                            "vs kNN-LM"], rows, digits=3)
    table += (f"\nLM perplexity {knn['ppl_lm']:.3f}; {knn['n_tokens']} tokens, k {args.k}, nprobe {args.nprobe}, "
              f"λ {args.lmbda}, exact distances, {args.batch_size} streams.\n")
    best = [(s["min_knns"], r) for s, r in runs.get("RetoMaton", []) if r["ppl"] <= knn["ppl"] * (1 + args.within)]
    if best:
        m, r = max(best, key=lambda x: x[1]["foss"])
        table += (f"\nMost searches saved within {args.within:.0%} of the kNN-LM's perplexity (no clusters): "
                  f"min_knns {m}, fraction saved {r['foss']:.3f}, perplexity {r['ppl']:.3f}.\n")
    write_markdown(out, table, "sweep.md")
    atomic_write_json(out / "sweep.json", {"knn": knn, "runs": {n: [{"settings": s, **r} for s, r in rs]
                                                                 for n, rs in runs.items()}, "args": vars(args)})
    _figure(out / "retomaton.png", knn, {n: [r for _, r in rs] for n, rs in runs.items()})
    print(table)
    print(f"wrote {out / 'sweep.md'}, {out / 'retomaton.png'}")


def _figure(path: Path, knn: dict, runs: dict) -> None:
    """Perplexity against the fraction of saved searches, each series from the kNN-LM's point (0 saved) on."""
    from knnlm.report import line_plot

    styles = {"RetoMaton": ("tab:blue", "o"), "RetoMaton, clusters": ("tab:green", "s"),
              "kNN-LM, random skips": ("tab:red", "^")}
    series = []
    for name, rs in runs.items():
        points = sorted([(0.0, knn["ppl"])] + [(r["foss"], r["ppl"]) for r in rs])
        series.append({"x": [x for x, _ in points], "y": [y for _, y in points], "label": name,
                       "color": styles[name][0], "marker": styles[name][1]})
    line_plot(path, series, title=f"RetoMaton: perplexity vs saved searches ({knn['n_tokens']} tokens)",
              xlabel="fraction of saved searches", ylabel="perplexity",
              hlines=[{"y": knn["ppl"], "color": "gray", "linestyle": ":", "label": "kNN-LM"},
                      {"y": knn["ppl_lm"], "color": "black", "linestyle": "--", "label": "LM"}])


def plot(args) -> None:
    """Redraws retomaton.png from --output_dir's sweep.json."""
    data = json.loads((Path(args.output_dir) / "sweep.json").read_text())
    _figure(Path(args.output_dir) / "retomaton.png", data["knn"], data["runs"])


def timing(args) -> None:
    variants = {"lm": "lm", "knn_exact": {},
                "retomaton": {"retomaton": True, "min_knns": int(args.min_knns), "max_knns": args.max_knns}}
    if args.clusters:
        variants["retomaton_clusters"] = {"retomaton": True, "min_knns": args.cluster_min_knns,
                                          "max_knns": args.max_knns, "no_clusters": False}
    runs: dict = {name: [] for name in variants}
    for rep in range(args.reps):
        for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
            runs[name].append(_run(args, variants[name]))
    med = {name: {"wall": statistics.median(r["wall_s"] for r in rs),
                  "cpu": statistics.median(r["user_s"] + r["sys_s"] for r in rs)} for name, rs in runs.items()}
    print(f"\n{runs['lm'][0]['n_tokens']} tokens; medians of {args.reps} alternating runs (scoring loop wall s | CPU s)")
    for name, m in med.items():
        print(f"  {name:>10}: {m['wall']:7.2f} | {m['cpu']:7.2f}   ppl {runs[name][0]['ppl']:.4f}"
              + (f", fraction saved {runs[name][0]['foss']:.3f}" if runs[name][0]["foss"] is not None else ""))
    for name in [v for v in variants if v != "lm"]:
        print(f"  {name} / lm: wall {med[name]['wall'] / med['lm']['wall']:.3f}, "
              f"CPU {med[name]['cpu'] / med['lm']['cpu']:.3f}   target <= 1.3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("sweep", "timing", "plot", "worker"))
    p.add_argument("--model_name_or_path")
    p.add_argument("--datastore")
    p.add_argument("--validation_file")
    p.add_argument("--max_tokens", type=int, default=32_768)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4, help="windows per forward pass = RetoMaton's streams")
    p.add_argument("--min_knns", default="1,2,4,8,16,32,64", help="sweep: a comma list; timing: one value")
    p.add_argument("--max_knns", type=int, default=1024)
    p.add_argument("--clusters", action="store_true", help="also RetoMaton with clusters (timing: at --cluster_min_knns)")
    p.add_argument("--cluster_min_knns", type=int, default=4, help="timing: min_knns of RetoMaton with clusters")
    p.add_argument("--skip_probs", default="0.25,0.5,0.75", help="sweep: the random-skip kNN-LM's probabilities")
    p.add_argument("--within", type=float, default=0.01, help="sweep: perplexity tolerance against the kNN-LM")
    p.add_argument("--output_dir", default="runs/retomaton/sweep")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    {"sweep": sweep, "timing": timing, "plot": plot, "worker": worker}[args.mode](args)


if __name__ == "__main__":
    main()
