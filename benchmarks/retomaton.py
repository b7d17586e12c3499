"""RetoMaton: perplexity against the fraction of saved searches (the paper's Fig. 2), and its cost against LM-only.

    # the sweep = `knnlm analyze retomaton` (RetoMaton with and without clusters over --min_knns, the random-skip
    # kNN-LM over --skip_probs; results.md, results.json, retomaton.png in --output_dir)
    .venv/bin/python benchmarks/retomaton.py sweep --model_name_or_path runs/bench/lm-own \
        --datastore runs/retomaton/ds-own610k --validation_file ../shared/data/wikitext-2/valid.txt \
        --max_tokens 32768 --min_knns 1,2,4,8,16,32,64 --skip_probs 0.25,0.5,0.75 --output_dir runs/retomaton/sweep
    # the cost: LM-only, the kNN-LM (one search per token, exact distances) and RetoMaton at one setting
    .venv/bin/python benchmarks/retomaton.py timing ... --min_knns 1 [--clusters --cluster_min_knns 4] --reps 3

``sweep`` runs `knnlm analyze retomaton` with these flags (docs/retomaton.md). Every ``timing`` run is a fresh process
(`knn_eval.py`'s method: one torch and one FAISS thread, the scoring loop timed from its progress bar on, wall and
user + system CPU time); ``timing`` prints medians and ratios. The kNN-LM and RetoMaton use exact distances
(``--recompute_dists``; RetoMaton's are always exact).
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


def sweep(args) -> None:
    """The sweep is the study `knnlm analyze retomaton` (one process, each setting saved and reused on a rerun)."""
    from knnlm.cli import main as knnlm_main

    argv = ["analyze", "retomaton", "--device", "cpu"]
    for name in ("model_name_or_path", "datastore", "validation_file", "max_tokens", "k", "lmbda", "nprobe",
                 "batch_size", "min_knns", "max_knns", "skip_probs", "output_dir"):
        argv += [f"--{name}", str(getattr(args, name))]
    sys.exit(knnlm_main(argv + ["--clusters", "true" if args.clusters else "false"]))


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
    p.add_argument("mode", choices=("sweep", "timing", "worker"))
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
    p.add_argument("--output_dir", default="runs/retomaton/sweep")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    {"sweep": sweep, "timing": timing, "worker": worker}[args.mode](args)


if __name__ == "__main__":
    main()
