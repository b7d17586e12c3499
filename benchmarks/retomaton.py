"""RetoMaton: perplexity against the fraction of saved searches (the paper's Fig. 2), and its cost against LM-only.

    # the sweep = `knnlm analyze retomaton` (RetoMaton with and without clusters over --min_knns, the random-skip
    # kNN-LM over --skip_probs; results.md, results.json, retomaton.png in --output_dir)
    .venv/bin/python benchmarks/retomaton.py sweep --model_name_or_path runs/bench/lm-own \
        --datastore runs/retomaton/ds-own610k --validation_file ../shared/data/wikitext-2/valid.txt \
        --max_tokens 32768 --min_knns 1,2,4,8,16,32,64 --skip_probs 0.25,0.5,0.75 --output_dir runs/retomaton/sweep
    # the cost: LM-only, the kNN-LM (one search per token, exact distances) and RetoMaton at one setting
    .venv/bin/python benchmarks/retomaton.py timing ... --min_knns 1 [--clusters --cluster_min_knns 4] --reps 3
    # the floor: LM-only, and the searches a RetoMaton saving --saved of them still makes (with their exact distances)
    .venv/bin/python benchmarks/retomaton.py bound ... --saved 0.634 --reps 3

``sweep`` runs `knnlm analyze retomaton` with these flags (docs/retomaton.md). Every ``timing`` run is a fresh process
(`knn_eval.py`'s method: one torch and one FAISS thread, the scoring loop timed from its progress bar on, wall and
user + system CPU time); ``timing`` prints medians and ratios. The kNN-LM and RetoMaton use exact distances
(``--recompute_dists``; RetoMaton's are always exact).

``bound`` measures what no bookkeeping can remove: the LM-only loop, and (1 − ``--saved``) × tokens searches (k,
nprobe as given, in batches of ``--batch_size`` queries like the streams) plus the exact distances of the rows they
return, timed alone in one process with one thread. The queries are stored keys (seeded sample): they lie where the
validation queries lie, so the IVF lists scanned are of the same sizes. RetoMaton's CPU / LM-only is at least
1 + (search CPU / LM CPU), whatever its pointers cost.
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


def search_worker(args) -> None:
    """One process: ``--n_searches`` searches of stored keys (seeded sample) in batches of ``--batch_size``, each with
    the exact distances of its k rows, through the eval's own Retriever -> one JSON line (CPU and wall seconds)."""
    import faiss
    import numpy as np
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from knnlm.datastore import Datastore
    from knnlm.knn import KNNArgs, Retriever

    ds = Datastore.open(args.datastore)
    r = Retriever(ds, KNNArgs(k=args.k, nprobe=args.nprobe, lmbda=[args.lmbda], recompute_dists=True))
    rows = np.sort(np.random.default_rng(0).choice(ds.N, size=args.n_searches, replace=False))
    queries = torch.from_numpy(np.asarray(ds.keys[rows], dtype=np.float32))  # [n, d]
    def cpu() -> float:
        u = _usage()
        return u["user_s"] + u["sys_s"]

    split = {"search_s": 0.0, "distances_s": 0.0}
    start, cpu0 = _usage(), cpu()
    for i in range(0, len(queries), args.batch_size):
        q = queries[i:i + args.batch_size]  # [B, d]
        t0 = cpu()
        _, ids = r.backend.search(q, r.k)  # [B, k]
        t1 = cpu()
        r.backend.distances(q, ids)
        split["search_s"] += t1 - t0
        split["distances_s"] += cpu() - t1
    print(json.dumps({"cpu_s": cpu() - cpu0, "wall_s": _usage()["wall"] - start["wall"], "n_searches": len(queries),
                      **split}))


def bound(args) -> None:
    """LM-only and the searches left at ``--saved``, alternating, medians; the floor of RetoMaton's ratio."""
    lm_runs, search_runs = [], []
    for rep in range(args.reps):  # rep 0 runs the LM first: its token count sets the number of searches
        for which in ("lm", "search") if rep % 2 == 0 else ("search", "lm"):
            if which == "lm":
                lm_runs.append(_run(args, "lm"))
                args.n_searches = round((1 - args.saved) * lm_runs[0]["n_tokens"])
            else:
                search_runs.append(_run(args, "search"))
    lm_cpu = statistics.median(r["user_s"] + r["sys_s"] for r in lm_runs)
    lm_wall = statistics.median(r["wall_s"] for r in lm_runs)
    s = {k: statistics.median(r[k] for r in search_runs) for k in ("cpu_s", "wall_s", "search_s", "distances_s")}
    n = search_runs[-1]["n_searches"]
    print(f"\n{lm_runs[0]['n_tokens']} tokens; medians of {args.reps} alternating runs, one thread each")
    print(f"  LM only: {lm_wall:.2f} s wall, {lm_cpu:.2f} s CPU")
    print(f"  {n} searches ({1 - args.saved:.3f} of the tokens; k {args.k}, nprobe {args.nprobe}, {args.batch_size} "
          f"queries a call): {s['cpu_s']:.2f} s CPU = search {s['search_s']:.2f} + exact distances "
          f"{s['distances_s']:.2f}; {1e3 * s['search_s'] / n:.3f} ms a search")
    print(f"  floor of RetoMaton's CPU / LM-only at {args.saved:.3f} saved: {1 + s['cpu_s'] / lm_cpu:.3f} "
          f"(searches alone {1 + s['search_s'] / lm_cpu:.3f})   target <= 1.3")
    need = 1 - 0.3 * lm_cpu / (s["search_s"] / n * lm_runs[0]["n_tokens"])  # <= 0: a search per token is cheap enough
    print("  saved fraction at which the searches alone reach 1.3x: "
          + (f"{need:.3f}" if need > 0 else "none needed (a search per token stays under 1.3x)"))


def _run(args, settings) -> dict:
    if settings == "search":
        cmd = [sys.executable, __file__, "search_worker", "--n_searches", str(args.n_searches)]
    else:
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
    p.add_argument("mode", choices=("sweep", "timing", "bound", "worker", "search_worker"))
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
    p.add_argument("--saved", type=float, default=0.634,
                   help="bound: the fraction of searches saved (default: RetoMaton min_knns 1 on the 610k store)")
    p.add_argument("--n_searches", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    {"sweep": sweep, "timing": timing, "bound": bound, "worker": worker, "search_worker": search_worker}[args.mode](args)


if __name__ == "__main__":
    main()
