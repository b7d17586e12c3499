"""kNN-LM evaluation throughput and IVF-PQ vs Flat, on a datastore with >= 1M keys.

    .venv/bin/python benchmarks/knn_eval.py --model_name_or_path runs/lm-wikitext2-cpu --datastore runs/ds-wt2-small \
        --validation_file ../shared/data/wikitext-2/valid.txt --max_tokens 20000

Prints tokens/s of LM-only and kNN-LM evaluation, FAISS search throughput (one search per batch of positions), and for
an IVF-PQ index against exact Flat search: recall@k and the perplexity difference. All numbers come from this one run.
"""
from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--datastore", required=True, help="a finished datastore (its IVF-PQ index is built if missing)")
    p.add_argument("--validation_file", required=True)
    p.add_argument("--max_tokens", type=int, default=20_000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--factory", default=None, help="approximate index (default: the IVF-PQ default for this size)")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4)
    args = p.parse_args()

    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import Datastore
    from knnlm.evaluate import EvalArgs, evaluate
    from knnlm.index import IndexArgs, build_index, default_factory, flat_index
    from knnlm.knn import KNNArgs
    from knnlm.models import ModelArgs, load_model

    lm = load_model(ModelArgs(model_name_or_path=args.model_name_or_path))
    ds = Datastore.open(args.datastore)
    corpus = CorpusArgs(validation_file=args.validation_file, max_tokens=args.max_tokens)
    print(f"datastore: N={ds.N} keys, d={ds.d}")
    factory = args.factory or default_factory(ds.N, ds.d, flat_threshold=1)
    t0 = time.time()
    info = build_index(ds, IndexArgs(factory=factory, nprobe=args.nprobe, recall_k=min(args.k, 1024)))
    print(f"index {factory}: built/loaded in {time.time() - t0:.1f}s; recall vs exact: {info.get('recall')}")

    with tempfile.TemporaryDirectory() as tmp:
        eargs = EvalArgs(output_dir=tmp, batch_size=args.batch_size)
        lm_only = evaluate(lm, corpus, tmp + "/lm", eargs)
        knn = KNNArgs(k=args.k, nprobe=args.nprobe, recompute_dists=True)
        approx = evaluate(lm, corpus, tmp + "/ivfpq", eargs, datastore=ds, knn=knn)
        exact = evaluate(lm, corpus, tmp + "/flat", eargs, datastore=ds, knn=knn, index=flat_index(ds))

    n = lm_only["n_tokens"]
    print(f"tokens scored: {n}")
    print(f"LM-only eval: {lm_only['timing']['tokens_per_s']:.0f} tokens/s")
    for name, m in (("kNN-LM (IVF-PQ)", approx), ("kNN-LM (Flat, exact)", exact)):
        t = m["timing"]
        print(f"{name}: {t['tokens_per_s']:.0f} tokens/s; search {t['search_queries_per_s']:.0f} queries/s "
              f"(k={m['k']}); ppl {m['ppl_knnlm']:.3f}")
    print(f"ppl LM {lm_only['ppl_lm']:.3f}; kNN-LM exact {exact['ppl_knnlm']:.3f}; IVF-PQ {approx['ppl_knnlm']:.3f} "
          f"(difference {approx['ppl_knnlm'] - exact['ppl_knnlm']:+.3f})")
    print(f"ratio kNN-LM (IVF-PQ) / LM-only eval time: "
          f"{approx['timing']['wall_s'] / lm_only['timing']['wall_s']:.2f}")


if __name__ == "__main__":
    main()
