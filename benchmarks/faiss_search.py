"""What one FAISS search costs per query, at several k: the floor under a kNN-LM evaluation's retrieval.

    .venv/bin/python benchmarks/faiss_search.py --datastore runs/bench14/ds-own610k [--queries 4096] [--nprobe 32] \
        [--k 1,64,256,1024] [--precomputed_table both]

Loads the store's built index (one shard) as `knnlm eval` does, takes ``--queries`` of the store's last keys (plus a
small offset, so no query is exactly a key) as queries, and prints, per k: CPU µs per query (best of ``--reps``, one
thread), and FAISS's ``IndexIVFStats``: codes scanned per query, coarse-quantizer and scan time, top-k heap updates per
query. Comparing k = 1 with k = 1024 separates scanning the probed lists from collecting the k results. With
``--precomputed_table both`` the IVF-PQ search is also timed with FAISS's precomputed distance table off
(``use_precomputed_table = -1``) and the largest distance difference is printed.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datastore", required=True, help="a datastore with a built IVF index (knnlm index build)")
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--k", default="1,64,256,1024", help="comma list")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--precomputed_table", choices=("on", "both"), default="on")
    args = p.parse_args()

    import faiss

    from knnlm.datastore import Datastore
    from knnlm.index import load_index

    faiss.omp_set_num_threads(1)
    ds = Datastore.open(args.datastore)
    index = load_index(ds.dir, nprobe=args.nprobe, use_gpu=False)
    if index is None:
        raise SystemExit(f"{ds.dir} has no built index: knnlm index build {ds.dir}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise SystemExit(f"{ds.dir}: the index is not an IVF index (one shard of IVF...,PQ... or IVF...,Flat)")
    ivf = faiss.downcast_index(ivf)
    q = np.ascontiguousarray(ds.keys[ds.N - min(args.queries, ds.N):], dtype=np.float32) + np.float32(0.01)  # [n, d]
    print(f"{type(ivf).__name__}: nlist {ivf.nlist}, ntotal {ivf.ntotal}, list imbalance "
          f"{ivf.invlists.imbalance_factor():.3f}, nprobe {ivf.nprobe}, {len(q)} queries, one thread")
    modes = [1, -1] if args.precomputed_table == "both" and hasattr(ivf, "use_precomputed_table") else [None]
    ks = [int(x) for x in args.k.split(",")]
    stats = faiss.cvar.indexIVF_stats
    widest = {}  # mode -> distances [n, max k] of its last timed search, for the comparison below
    for mode in modes:
        if mode is not None:
            ivf.use_precomputed_table = mode
            ivf.precompute_table()
        for k in ks:
            best = None
            for _ in range(args.reps):
                stats.reset()
                t0 = time.process_time()
                dists, _ = index.search(q, k)  # [n, k] each
                cpu = time.process_time() - t0
                if best is None or cpu < best[0]:
                    best = (cpu, stats.ndis / len(q), stats.quantization_time, stats.search_time,
                            stats.nheap_updates / len(q))
            if k == max(ks):
                widest[mode] = dists
            label = "" if mode is None else f"use_precomputed_table {mode:+d}, "
            print(f"{label}k {k:5d}: {best[0] / len(q) * 1e6:7.1f} µs/query (best of {args.reps}); codes scanned/query "
                  f"{best[1]:.0f}; quantizer {best[2]:.0f} ms, scan {best[3]:.0f} ms; heap updates/query {best[4]:.0f}")
    if len(modes) == 2:
        print(f"largest distance difference, table off vs on, k {max(ks)}: {np.abs(widest[-1] - widest[1]).max():.2e}")

if __name__ == "__main__":
    main()
