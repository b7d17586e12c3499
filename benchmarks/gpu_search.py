"""The torch search backend: recall of its half-precision candidates by margin, and kNN-LM / LM-only time.

    # recall of the exact top-k by --search_margin and --search_dtype, on a store's keys (its last --holdout rows are
    # the queries, searched among the others: held-out text, like validation queries) or on random keys
    python benchmarks/gpu_search.py recall --datastore DS [--k 1024] [--device cuda]
    python benchmarks/gpu_search.py recall --random 1000000,576 [--k 1024] [--device cuda]
    # kNN-LM (torch backend, default settings) and exact float32 search (--search_dtype float32, no margin: the
    # search the H200 measured on 2026-11-29) against LM-only evaluation: wall-time ratios and perplexities
    python benchmarks/gpu_search.py eval --model_name_or_path smollm2-135m --datastore DS \\
        --validation_file ../shared/data/wikitext-2/valid.txt --max_tokens 65536 --k 1024 --device cuda --batch_size 8

Each measurement prints one JSON line; ``--out FILE`` also writes them all as one JSON object. Times are the scoring
loop's wall time (``evaluate``'s timing: no model or key loading), medians over ``--reps`` alternating runs after one
untimed warm-up run of each variant. The reference of ``recall`` is the exact top-k (ties by row id): float32-ranked
candidates (k + 1024 of them) re-ranked by exact distances.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MARGINS = "0,8,16,32,64,128,256"


def _recall(ids: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(mean, minimum) over queries of the share of the reference rows [B, k] that ``ids`` [B, k] holds."""
    hits = [np.intersect1d(a[a >= 0], r[r >= 0]).size / max(1, int((r >= 0).sum()))
            for a, r in zip(ids.cpu().numpy(), ref.cpu().numpy())]
    return float(np.mean(hits)), float(np.min(hits))


def _keys_and_queries(args):
    """(keys [N, d] float16, queries [B, d] float32, what they are)."""
    if args.random:
        n, d = (int(x) for x in args.random.split(","))
        rng = np.random.default_rng(0)
        keys = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
        rows = rng.choice(n, args.queries, replace=False)
        queries = keys[rows].astype(np.float32) + 0.3 * rng.standard_normal((args.queries, d), dtype=np.float32)
        return keys, torch.from_numpy(queries), f"random {n} x {d}"
    from knnlm.datastore import Datastore

    ds = Datastore.open(args.datastore)
    hold = min(args.holdout, ds.N // 2)
    keys = np.asarray(ds.keys[: ds.N - hold])
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(hold, min(args.queries, hold), replace=False)) + ds.N - hold
    return keys, torch.from_numpy(np.asarray(ds.keys[rows], dtype=np.float32)), f"{args.datastore} ({ds.N - hold} keys)"


def recall(args) -> dict:
    """Recall of the exact top-k when the k + margin best half-precision scores are re-ranked exactly."""
    from knnlm.gpu_search import TorchSearch, nearest

    keys, queries, what = _keys_and_queries(args)
    device = [args.device]
    k = min(args.k, len(keys))
    margins = [int(m) for m in args.margins.split(",")]
    exact = TorchSearch(keys, devices=device, dtype="float32", margin=0)
    out = {"keys": what, "k": k, "queries": len(queries), "device": _device_name(args.device), "recall": {}}
    for dtype in args.dtypes.split(","):
        approx = exact if dtype == "float32" else TorchSearch(keys, devices=device, dtype=dtype, margin=0)
        rec: dict = {m: [] for m in margins}
        refs = []
        for s in range(0, len(queries), args.query_batch):
            q = queries[s: s + args.query_batch].to(args.device)
            ref_cand = exact.ranked_candidates(q, k + 1024)  # [b, k + 1024]
            refs.append(nearest(exact.distances(q, ref_cand), ref_cand, k)[1])  # [b, k] the exact top-k
            cand = approx.ranked_candidates(q, k + max(margins))  # [b, k + max margin], best first
            for m in margins:
                c = cand[:, : k + m]
                rec[m].append(nearest(approx.distances(q, c), c, k)[1])
        ref = torch.cat(refs)
        out["recall"][dtype] = {m: dict(zip(("mean", "min"), _recall(torch.cat(rec[m]), ref))) for m in margins}
        print(json.dumps({"dtype": dtype, **{str(m): v for m, v in out["recall"][dtype].items()}}), flush=True)
    return out


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def evaluate_speed(args) -> dict:
    """LM-only, kNN-LM (torch defaults) and kNN-LM (exact float32 search) on the same windows."""
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import Datastore
    from knnlm.evaluate import EvalArgs, evaluate
    from knnlm.gpu_search import TorchSearch
    from knnlm.knn import KNNArgs
    from knnlm.models import ModelArgs, load_model

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    lm = load_model(ModelArgs(model_name_or_path=args.model_name_or_path, device=args.device,
                              dtype="bfloat16" if cuda else "float32"))
    ds = Datastore.open(args.datastore)
    defaults = KNNArgs()
    t0 = time.perf_counter()
    backends = {"knn": TorchSearch(ds.keys, devices=[args.device], dtype=defaults.search_dtype,
                                   margin=defaults.search_margin),
                "knn_exact": TorchSearch(ds.keys, devices=[args.device], dtype="float32", margin=0)}
    load_s = time.perf_counter() - t0
    knn = KNNArgs(k=args.k, lmbda=[args.lmbda], search_backend="torch")
    work = Path(tempfile.mkdtemp(prefix="knnlm-gpu-bench-"))

    def run(variant: str, max_tokens: int) -> dict:
        corpus = CorpusArgs(validation_file=args.validation_file, max_tokens=max_tokens)
        out = work / f"{variant}-{max_tokens}"
        ea = EvalArgs(output_dir=str(out), batch_size=args.batch_size)
        if variant == "lm":
            m = evaluate(lm, corpus, out, ea)
        else:
            m = evaluate(lm, corpus, out, ea, datastore=ds, knn=knn, index=backends[variant])
        if cuda:
            torch.cuda.synchronize()
        return {"variant": variant, "wall_s": m["timing"]["wall_s"], "n_tokens": m["n_tokens"],
                "ppl_lm": m["ppl_lm"], "ppl_knnlm": m.get("ppl_knnlm"), "search_s": m["timing"].get("search_s")}

    variants = ("lm", "knn", "knn_exact")
    for v in variants:  # warm-up: CUDA context, cuBLAS heuristics, the tokenized validation file
        run(v, min(args.max_tokens, 4096))
    runs: dict = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            r = run(v, args.max_tokens)
            runs[v].append(r)
            print(json.dumps(r), flush=True)
    wall = {v: statistics.median(r["wall_s"] for r in rs) for v, rs in runs.items()}
    ppl = {v: runs[v][0]["ppl_knnlm"] for v in ("knn", "knn_exact")}
    out = {"device": _device_name(args.device), "n_tokens": runs["lm"][0]["n_tokens"], "k": args.k,
           "datastore_N": ds.N, "key_load_s": load_s, "wall_s": wall,
           "tokens_per_s": {v: runs["lm"][0]["n_tokens"] / w for v, w in wall.items()},
           "ratio_knn_over_lm": wall["knn"] / wall["lm"], "ratio_exact_over_lm": wall["knn_exact"] / wall["lm"],
           "ppl_lm": runs["lm"][0]["ppl_lm"], "ppl_knnlm": ppl["knn"], "ppl_knnlm_exact_f32": ppl["knn_exact"],
           "ppl_relative_difference": abs(ppl["knn"] / ppl["knn_exact"] - 1),
           "search_margin": defaults.search_margin, "search_dtype": defaults.search_dtype, "reps": args.reps}
    print(f"kNN-LM / LM-only {out['ratio_knn_over_lm']:.2f} (target <= 1.5); exact float32 search / LM-only "
          f"{out['ratio_exact_over_lm']:.2f}; perplexity {ppl['knn']:.6f} vs exact {ppl['knn_exact']:.6f} "
          f"(relative {out['ppl_relative_difference']:.1e}, target <= 1e-4)", flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("recall")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--datastore")
    src.add_argument("--random", help="N,d: Gaussian keys")
    r.add_argument("--holdout", type=int, default=20_000, help="last store rows used as queries only")
    r.add_argument("--queries", type=int, default=1000)
    r.add_argument("--margins", default=MARGINS)
    r.add_argument("--dtypes", default="float16,bfloat16")
    r.add_argument("--query_batch", type=int, default=100, help="queries per ranking ([batch, N] float scores)")
    e = sub.add_parser("eval")
    e.add_argument("--model_name_or_path", required=True)
    e.add_argument("--datastore", required=True)
    e.add_argument("--validation_file", required=True)
    e.add_argument("--max_tokens", type=int, default=65_536)
    e.add_argument("--lmbda", type=float, default=0.25)
    e.add_argument("--batch_size", type=int, default=8)
    e.add_argument("--reps", type=int, default=2)
    e.add_argument("--threads", type=int, default=8)
    for q in (r, e):
        q.add_argument("--k", type=int, default=1024)
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
        q.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    res = recall(args) if args.what == "recall" else evaluate_speed(args)
    res["command"] = " ".join(["python", "benchmarks/gpu_search.py", *(argv if argv is not None else sys.argv[1:])])
    if args.out:
        from knnlm.fileio import atomic_write_json

        atomic_write_json(Path(args.out), res)
    return res


if __name__ == "__main__":
    main()
