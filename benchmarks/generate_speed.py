"""Generation speed of the kNN-LM as an HF model (knnlm.augment) over the plain LM's, KV cache on.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generate_speed.py --model_name_or_path smollm2-135m \
        --datastore runs/ds-smollm2-100k [--new_tokens 64 --reps 5 --k 1024]

Alternates plain and augmented ``model.generate`` (greedy, exactly ``--new_tokens`` tokens each) ``--reps`` times after
one untimed warm-up of each, and prints the median tokens/s of both and their ratio (target: >= 0.5 on CPU), plus the
two continuations. The store is searched exactly (Flat) unless its folder holds a built index. On a CPU shared with
other jobs keep OMP_NUM_THREADS=1: with 2 threads on an oversubscribed machine, torch's and FAISS's OpenMP pools made
even the plain LM's generation crawl.
"""
from __future__ import annotations

import argparse
import statistics
import time

PROMPT = "The history of the city began in the 12th century , when"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--datastore", required=True)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--knn_temp", type=float, default=1.0)
    args = p.parse_args()

    import torch

    from knnlm.augmented import augment, detach
    from knnlm.datastore import Datastore
    from knnlm.index import flat_index, load_index
    from knnlm.models import ModelArgs, load_model

    lm = load_model(ModelArgs(model_name_or_path=args.model_name_or_path, device="cpu"))
    ds = Datastore.open(args.datastore)
    ids = torch.tensor([lm.encode(args.prompt)])  # [1, T]
    print(f"model {lm.name}; datastore N={ds.N}, d={ds.d}, k={args.k}, λ={args.lmbda}; prompt {ids.shape[1]} tokens; "
          f"{args.new_tokens} new tokens; torch threads {torch.get_num_threads()}")
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=lm.tokenizer.pad_token_id)

    t0 = time.perf_counter()
    index = load_index(ds.dir) or flat_index(ds)  # built once, shared by every attach
    print(f"index: {type(index).__name__} over {index.ntotal} keys, {time.perf_counter() - t0:.1f}s")

    def run(augmented: bool):
        if augmented:
            augment(lm, datastore=ds, k=args.k, lmbda=args.lmbda, knn_temp=args.knn_temp, index=index)
            lm.model.knnlm.n_queries = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
        seconds = time.perf_counter() - t0
        queries = lm.model.knnlm.n_queries if augmented else 0
        if augmented:
            detach(lm.model)
        return out, out.numel() / seconds, queries

    plain_out, s_plain, _ = run(False)  # warm-up
    knn_out, s_knn, queries = run(True)
    print(f"warm-up: LM {s_plain:.2f} tokens/s, kNN-LM {s_knn:.2f} tokens/s", flush=True)
    assert queries == args.new_tokens, queries  # one retrieval per new position
    speeds = {"lm": [], "knnlm": []}
    for r in range(args.reps):
        for name, aug in (("lm", False), ("knnlm", True)) if r % 2 == 0 else (("knnlm", True), ("lm", False)):
            speeds[name].append(run(aug)[1])
            print(f"rep {r} {name}: {speeds[name][-1]:.2f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    for name in ("lm", "knnlm"):
        print(f"{name:6s} tokens/s: median {med[name]:.2f} ({', '.join(f'{s:.2f}' for s in speeds[name])})")
    print(f"ratio kNN-LM / LM generation speed: {med['knnlm'] / med['lm']:.3f} (target >= 0.5)")
    print(f"LM    : {lm.tokenizer.decode(plain_out, skip_special_tokens=True)!r}")
    print(f"kNN-LM: {lm.tokenizer.decode(knn_out, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
