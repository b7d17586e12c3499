"""kNN-LM evaluation cost against LM-only evaluation and a bare forward pass; index build cost; before/after.

    .venv/bin/python benchmarks/knn_eval.py --model_name_or_path runs/lm-4x256 --datastore runs/ds-4x256 \
        --validation_file ../shared/data/wikitext-2/valid.txt --max_tokens 32768 --reps 3 \
        [--baseline_src runs/old/src] [--index_build] [--device cuda]

Every measured run is a fresh process (its own CPU times, page faults and peak RSS) scoring the same windows:
``bare`` (the LM body + output layer at the scored positions: the logits, nothing else), ``lm`` (LM-only
``evaluate``), ``knn_pq`` (kNN-LM with the index's PQ distances) and ``knn_exact`` (``--recompute_dists``). Variants
and code versions (``--baseline_src``: another checkout's ``src`` folder, e.g. the commit before a change) alternate
within each repetition, the order reversed every other one; the script prints medians and the ratios of issue 14:
knn_exact / lm (target <= 1.3), knn_pq / lm (<= 1.15), lm / bare (<= 1.05), system / CPU time (<= 0.15), and that the
perplexities agree across versions. ``--index_build`` also builds the store's index with and without polysemous
training (alternating, in a temporary folder) and prints CPU seconds and recall@k (target <= 0.6, recall within 0.01).

``--device cuda``: bf16 forward and, when ``faiss`` has GPU support (``faiss-gpu-cu12``), GPU search.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("bare", "lm", "knn_pq", "knn_exact")
# on request: "knn_flat" (exact search, Flat index) and "knn_pq_k1" (the same IVF-PQ search with k = 1: the scan of the
# probed lists without the k = 1024 top-k collection, a floor under knn_pq that no change to knnlm's loop can go below)


def _usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime, "minflt": r.ru_minflt, "wall": time.perf_counter()}


_LOOP_START: dict = {}


def _mark_loop_start(*args, **kwargs):
    """Stands in for ``tqdm`` in ``knnlm.evaluate``: the scoring loop starts where its progress bar is made, so what
    is measured is the loop (as evaluate's own tokens/s), not model, index or key loading."""
    from tqdm.auto import tqdm

    _LOOP_START.update(_usage())
    return tqdm(*args, **kwargs)


def _bare(lm, corpus, out_dir: Path, batch_size: int) -> dict:
    """Forward passes returning the logits at the scored positions [n, V], as evaluation computes them."""
    import torch

    from knnlm.corpus import tokenize_to_file, windows
    from knnlm.datastore import _batch_inputs
    from knnlm.evaluate import _target_positions

    tokens = tokenize_to_file(lm, corpus, "validation", out_dir / "tokens.i32")
    block, stride = corpus.resolved_window(lm.max_positions)
    wins = windows(tokens.doc_starts, block, stride)
    n = 0
    _LOOP_START.update(_usage())
    for b in range(0, len(wins), batch_size):
        batch = wins[b: b + batch_size]
        ids, mask = _batch_inputs(tokens, batch, lm.eos_token_id or 0)
        rows, pos = _target_positions(batch)
        with torch.inference_mode():
            h = lm.hidden_states(ids.to(lm.device), mask.to(lm.device), "final_hidden")  # [B, T, d]
            logits = lm.output_layer(h[rows.to(h.device), pos.to(h.device)]).float()  # [n, V]
        n += logits.shape[0]
    return {"n_tokens": n}


def worker(args) -> None:
    """One measured run in this process; prints one JSON line."""
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    try:  # what the `knnlm` command does at start-up (absent in older versions)
        from knnlm.cli import keep_freed_memory

        keep_freed_memory()
    except ImportError:
        pass
    import knnlm.evaluate
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import Datastore
    from knnlm.evaluate import EvalArgs, evaluate
    from knnlm.knn import KNNArgs
    from knnlm.models import ModelArgs, load_model

    knnlm.evaluate.tqdm = _mark_loop_start
    cuda = args.device == "cuda"
    lm = load_model(ModelArgs(model_name_or_path=args.model_name_or_path, device=args.device,
                              dtype="bfloat16" if cuda else "float32"))
    corpus = CorpusArgs(validation_file=args.validation_file, max_tokens=args.max_tokens)
    out = Path(tempfile.mkdtemp(prefix="knnlm-bench-"))
    try:
        if args.variant == "bare":
            m = _bare(lm, corpus, out, args.batch_size)
        elif args.variant == "lm":
            m = evaluate(lm, corpus, out, EvalArgs(output_dir=str(out), batch_size=args.batch_size))
        else:
            from knnlm.index import flat_index

            ds = Datastore.open(args.datastore)
            knn = KNNArgs(k=1 if args.variant == "knn_pq_k1" else args.k, nprobe=args.nprobe, lmbda=[args.lmbda],
                          recompute_dists=args.variant == "knn_exact")
            m = evaluate(lm, corpus, out, EvalArgs(output_dir=str(out), batch_size=args.batch_size), datastore=ds,
                         knn=knn, index=flat_index(ds) if args.variant == "knn_flat" else None)
        if cuda:
            torch.cuda.synchronize()
        end = _usage()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    start = _LOOP_START
    res = {k: end[k] - start[k] for k in ("user_s", "sys_s", "minflt")}
    whole = resource.getrusage(resource.RUSAGE_SELF)  # the whole process, as `knnlm eval` would be
    res.update(wall_s=end["wall"] - start["wall"], proc_user_s=whole.ru_utime, proc_sys_s=whole.ru_stime,
               peak_rss_mib=whole.ru_maxrss / 1024, n_tokens=m["n_tokens"], ppl_lm=m.get("ppl_lm"),
               ppl_knnlm=m.get("ppl_knnlm"))
    print(json.dumps(res))


def index_worker(args) -> None:
    """Builds the store's index into a temporary folder (keys linked, not copied); prints one JSON line."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from knnlm.datastore import Datastore
    from knnlm.index import IndexArgs, build_index

    tmp = Path(tempfile.mkdtemp(prefix="knnlm-bench-index-"))
    try:
        for name in ("keys.f16", "vals.i32", "meta.json"):
            os.symlink(Path(args.datastore).resolve() / name, tmp / name)
        ds = Datastore.open(tmp)
        start = _usage()
        info = build_index(ds, IndexArgs(factory=args.factory, nprobe=args.nprobe, recall_k=args.k,
                                         recall_queries=args.recall_queries, polysemous=args.variant == "polysemous"))
        end = _usage()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = info["build_timing"]
    print(json.dumps({"build_cpu_s": t["train_cpu_s"] + t["add_cpu_s"], "build_s": t["train_s"] + t["add_s"],
                      "cpu_s": end["user_s"] + end["sys_s"] - start["user_s"] - start["sys_s"],
                      "recall": info["recall"][f"recall@{min(args.k, ds.N)}"]}))


def _run(args, variant: str, src: str | None, mode: str = "--worker") -> dict:
    cmd = [sys.executable, __file__, mode, "--variant", variant]
    for name in ("model_name_or_path", "datastore", "validation_file", "max_tokens", "k", "lmbda", "nprobe",
                 "batch_size", "threads", "device", "factory", "recall_queries"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name}", str(value)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src or str(Path(__file__).resolve().parents[1] / "src"),
                                                     env.get("PYTHONPATH")) if p)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"{variant} ({src or 'this checkout'}) failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {mode[2:]} {variant:>10} {'before' if src else 'after':>6}: {json.dumps(out)}", flush=True)
    return out


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _eval_report(args) -> None:
    versions = ["after"] + (["before"] if args.baseline_src else [])
    src = {"after": None, "before": args.baseline_src}
    variants = args.variants.split(",")
    runs: dict = {(v, var): [] for v in versions for var in variants}
    order = [(var, v) for var in variants for v in versions]
    for rep in range(args.reps):
        for var, v in (order if rep % 2 == 0 else order[::-1]):
            runs[(v, var)].append(_run(args, var, src[v]))
    print(f"\ntokens scored: {runs[('after', 'lm')][0]['n_tokens']}; medians of {args.reps} alternating runs; the "
          f"scoring loop's wall s | its CPU s = user + sys | its sys share | its minor faults | peak RSS MiB")
    for (v, var), rs in runs.items():
        cpu = [r["user_s"] + r["sys_s"] for r in rs]
        print(f"{var:>10} {v:>6}: {_median(rs, 'wall_s'):8.1f} | {statistics.median(cpu):8.1f} | "
              f"{statistics.median(r['sys_s'] / (r['user_s'] + r['sys_s']) for r in rs):.3f} | "
              f"{_median(rs, 'minflt'):10.0f} | {_median(rs, 'peak_rss_mib'):6.0f}")
    n_tok = runs[(versions[0], variants[0])][0]["n_tokens"]
    print("\ntokens/s of the scoring loop (medians): " + ", ".join(
        f"{var} {v} {n_tok / _median(runs[(v, var)], 'wall_s'):,.0f}" for v in versions for var in variants))
    print("\nratios (medians; wall time, then CPU time)   target")
    for v in versions:
        def ratio(a, b, key):
            return _median(runs[(v, a)], key) / _median(runs[(v, b)], key)

        for a, b, target in (("knn_exact", "lm", 1.3), ("knn_pq", "lm", 1.15), ("knn_flat", "lm", "(exact search)"),
                             ("knn_pq_k1", "lm", "(floor: search at k = 1)"), ("lm", "bare", 1.05)):
            if a not in variants or b not in variants:
                continue
            cpu = [statistics.median(r["user_s"] + r["sys_s"] for r in runs[(v, x)]) for x in (a, b)]
            print(f"  {v:>6} {a} / {b}: wall {ratio(a, b, 'wall_s'):.3f}, CPU {cpu[0] / cpu[1]:.3f}   <= {target}")
        for var in [x for x in ("lm", "knn_exact") if x in variants]:
            share = statistics.median(r["proc_sys_s"] / (r["proc_user_s"] + r["proc_sys_s"]) for r in runs[(v, var)])
            print(f"  {v:>6} system / CPU time, whole process, {var}: {share:.3f}   <= 0.15")
    for var in [x for x in variants if x != "bare"]:
        key = "ppl_lm" if var == "lm" else "ppl_knnlm"
        values = {v: runs[(v, var)][0][key] for v in versions}
        same_run = all(r[key] == values[v] for v in versions for r in runs[(v, var)])
        line = f"ppl {var}: " + ", ".join(f"{v} {x:.6f}" for v, x in values.items())
        if "before" in values:
            line += f" (relative difference {abs(values['after'] / values['before'] - 1):.2e}; target <= 1e-6)"
        print(line + ("" if same_run else "  [differs between repetitions]"))


def _index_report(args) -> None:
    runs: dict = {"polysemous": [], "plain": []}
    for rep in range(args.reps):
        for var in (("polysemous", "plain") if rep % 2 == 0 else ("plain", "polysemous")):
            runs[var].append(_run(args, var, None, mode="--index_worker"))
    for var, rs in runs.items():
        print(f"index {args.factory} {var:>10}: build {_median(rs, 'build_s'):.1f} s wall, "
              f"{_median(rs, 'build_cpu_s'):.1f} CPU-s; recall@{args.k} {_median(rs, 'recall'):.4f}")
    print(f"ratio index build CPU-s, no polysemous / polysemous (today's default): "
          f"{_median(runs['plain'], 'build_cpu_s') / _median(runs['polysemous'], 'build_cpu_s'):.3f}   <= 0.6; "
          f"recall difference {_median(runs['plain'], 'recall') - _median(runs['polysemous'], 'recall'):+.4f}   "
          f"within 0.01")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--datastore", required=True, help="a finished datastore (with a built index for knn_pq / knn_exact)")
    p.add_argument("--validation_file", required=True)
    p.add_argument("--max_tokens", type=int, default=32_768)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads of each measured process")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}, knn_flat, knn_pq_k1")
    p.add_argument("--baseline_src", default=None, help="a `src` folder of the version to compare with (before)")
    p.add_argument("--index_build", action="store_true", help="also time index builds with/without polysemous training")
    p.add_argument("--skip_eval", action="store_true", help="only the index build comparison")
    p.add_argument("--factory", default="IVF4096,PQ64")
    p.add_argument("--recall_queries", type=int, default=500)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--index_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.index_worker:
        return index_worker(args)
    if not args.skip_eval:
        needs_index = {"knn_pq", "knn_exact", "knn_pq_k1"} & set(args.variants.split(","))  # knn_flat builds its own exact index
        if needs_index and not (Path(args.datastore) / "index" / "index.json").exists():
            sys.exit(f"{args.datastore} has no index: build it first (knnlm index build --factory {args.factory})")
        _eval_report(args)
    if args.index_build:
        _index_report(args)


if __name__ == "__main__":
    main()
