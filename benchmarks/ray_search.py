"""What searching a store's index shards on Ray actors costs against the same shards in one process.

    .venv/bin/python benchmarks/ray_search.py --datastore runs/ray/ds-own610k [--batch_sizes 1,4,16,64,256,1024] \
        [--queries 2048] [--k 1024] [--nprobe 32] [--reps 3] [--ray_shard_cpus 1]

The store needs a built index of 2+ shards (`knnlm index build DS --shards 2`). In-process: `faiss.IndexShards`
(threaded: one thread per shard, one FAISS thread each) as `--search_backend faiss` loads it. Ray: a local Ray with
one CPU per shard actor (one FAISS thread each), `--search_backend ray`. Queries: ``--queries`` of the store's keys,
evenly spaced, plus 0.01 (no query is exactly a key). Per batch size B, the medians over ``--reps`` alternating
passes of: ms per batch and µs per query for both, the shard actors' own FAISS time (the slowest shard of each
call, as the actors time it), the merge of the per-shard top-k (`faiss.merge_knn_results`, timed alone on arrays of
the same shape; IndexShards runs the same merge in-process), and the Ray overhead = Ray wall − FAISS − merge (sending
the queries, scheduling the calls, returning the per-shard top-k) as a share of the FAISS time. Then the same for exact
distances of the k results (`--recompute_dists`), and the smallest B whose overhead share is under 10%.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datastore", required=True)
    p.add_argument("--batch_sizes", default="1,4,16,64,256,1024")
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ray_shard_cpus", type=float, default=1.0)
    p.add_argument("--distances", default="16,256", help="batch sizes of the exact-distance comparison ('' skips)")
    args = p.parse_args()

    import faiss
    import ray
    import torch

    from knnlm.datastore import Datastore
    from knnlm.index import load_index
    from knnlm.knn import KNNArgs
    from knnlm.search import IndexBackend, make_backend

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    ds = Datastore.open(args.datastore)
    rows = np.linspace(0, ds.N - 1, args.queries).astype(np.int64)
    queries = torch.from_numpy(np.asarray(ds.keys[rows], dtype=np.float32) + np.float32(0.01))  # [n, d]
    local = IndexBackend(load_index(ds.dir, nprobe=args.nprobe, use_gpu=False), ds)
    # address="local": a new Ray of our own; without it ray.init joins the latest cluster started on this machine
    # (RAY_ADDRESS, /tmp/ray/ray_current_cluster), another job's, which refuses num_cpus or shares its CPUs
    ray.init(address="local", num_cpus=int(np.ceil(2 * args.ray_shard_cpus)), include_dashboard=False,
             log_to_driver=False)
    remote = make_backend(ds, KNNArgs(search_backend="ray", nprobe=args.nprobe, ray_shard_cpus=args.ray_shard_cpus))
    print(f"{ds.dir}: N {ds.N}, d {ds.d}, {len(remote.actors)} shards, k {args.k}, nprobe {args.nprobe}, "
          f"{len(queries)} queries; in-process IndexShards vs Ray actors ({args.ray_shard_cpus:g} CPU each)")

    # the same results first (and a warm-up of both: precomputed tables, page cache, actor imports)
    ld, li = local.search(queries[:64], args.k)
    rd, ri = remote.search(queries[:64], args.k)
    assert torch.equal(li, ri) and torch.equal(ld, rd), "Ray and in-process results differ"
    if args.distances:
        assert torch.equal(local.distances(queries[:64], li), remote.distances(queries[:64], li))

    def search_pass(b: int):
        t_local = t_ray = t_faiss = 0.0
        for s in range(0, len(queries), b):
            q = queries[s: s + b]
            t_local += _timed(local.search, q, args.k)[0]
            t_ray += _timed(remote.search, q, args.k)[0]
            t_faiss += remote.last_search_s
        return t_local, t_ray, t_faiss

    def merge_time(b: int) -> float:
        """The per-shard top-k merge alone (faiss.merge_knn_results, which IndexShards runs in-process too)."""
        rng = np.random.default_rng(0)
        all_d = np.sort(rng.random((len(remote.actors), b, args.k), dtype=np.float32), axis=2)
        all_i = rng.integers(0, ds.N, size=all_d.shape)
        return statistics.median(_timed(faiss.merge_knn_results, all_d, all_i)[0] for _ in range(args.reps))

    rows_out = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        n_batches = -(-len(queries) // b)
        reps = [search_pass(b) for _ in range(args.reps)]
        t_local, t_ray, t_faiss = (statistics.median(r[i] for r in reps) / n_batches for i in range(3))
        rows_out.append((b, t_local, t_ray, t_faiss, merge_time(b)))
    print("\n| batch B | in-process ms/batch | Ray ms/batch | in-process µs/query | Ray µs/query | Ray / in-process | "
          "shards' FAISS ms/batch | merge ms/batch | Ray overhead ms/batch (wall − FAISS − merge) | overhead / FAISS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, tl, tr, tf, tm in rows_out:
        print(f"| {b} | {tl * 1e3:.2f} | {tr * 1e3:.2f} | {tl / b * 1e6:.0f} | {tr / b * 1e6:.0f} | {tr / tl:.2f} | "
              f"{tf * 1e3:.2f} | {tm * 1e3:.2f} | {(tr - tf - tm) * 1e3:.2f} | {(tr - tf - tm) / tf:.1%} |")
    under = [b for b, tl, tr, tf, tm in rows_out if (tr - tf - tm) / tf < 0.10]
    print(f"\nsmallest batch with Ray overhead < 10% of the shards' FAISS time: {under[0] if under else 'none'}")

    if args.distances:
        print("\n| batch B (exact distances of k rows) | in-process ms/batch | Ray ms/batch | Ray / in-process |")
        print("|---|---|---|---|")
        for b in [int(x) for x in args.distances.split(",")]:
            q = queries[:b]
            _, ids = local.search(q, args.k)
            tl = statistics.median(_timed(local.distances, q, ids)[0] for _ in range(args.reps))
            tr = statistics.median(_timed(remote.distances, q, ids)[0] for _ in range(args.reps))
            print(f"| {b} | {tl * 1e3:.2f} | {tr * 1e3:.2f} | {tr / tl:.2f} |")
    remote.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
