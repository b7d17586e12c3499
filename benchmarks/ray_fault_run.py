"""The Ray backend's fault run on a real store: kNN-LM perplexity with --search_backend faiss, with Ray (the run's own
shard actors), with a served group whose shard 0 is SIGKILLed after its 5th call mid-evaluation, and a second
evaluation on the same group; then `index stop`. Prints the perplexities, their differences from faiss and the kill.

    .venv/bin/python benchmarks/ray_fault_run.py --datastore runs/ray/ds-own610k --model runs/bench/lm-own \
        --validation_file ../shared/data/wikitext-2/valid.txt --out runs/ray/fault
"""
import argparse
import json
import os
import signal
import sys
import threading
import time

import ray

from knnlm.cli import main

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
for flag in ("--datastore", "--model", "--validation_file", "--out"):
    p.add_argument(flag, required=True)
p.add_argument("--max_tokens", default="8192")
args = p.parse_args()
OUT, DS = args.out, args.datastore
common = ["--model_name_or_path", args.model, "--validation_file", args.validation_file, "--max_tokens",
          args.max_tokens, "--block_size", "128", "--stride", "64", "--datastore", DS, "--k", "1024",
          "--recompute_dists", "true", "--lmbda", "0.25"]
# address="local": the run's own Ray (the evaluations' --ray_address auto then keeps this connection); without it
# ray.init joins the latest cluster started on this machine (RAY_ADDRESS, /tmp/ray/ray_current_cluster), which
# refuses num_cpus, or whose shard 0 of another group of the same name this script would kill
ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="knnlm", log_to_driver=False)


def ev(name, *extra):
    t = time.time()
    assert main(["eval", *common, "--output_dir", f"{OUT}/{name}", *extra]) == 0
    m = json.load(open(f"{OUT}/{name}/results.json"))["metrics"]
    return m["ppl_knnlm"], m["n_tokens"], time.time() - t


res = {"faiss": ev("faiss", "--search_backend", "faiss"),
       "ray_own": ev("ray_own", "--search_backend", "ray", "--ray_address", "auto")}
assert main(["index", "serve", DS, "--name", "bench610k"]) == 0
a0 = ray.get_actor("bench610k/shard0", namespace="knnlm")
killed = {}
# set when the evaluation returns or fails: one that makes fewer than 5 searches on shard 0 (a small --max_tokens)
# never meets the kill, and the killer would poll, and the script hang in th.join(), forever
eval_done = threading.Event()


def killer():
    while not eval_done.is_set():
        d = ray.get(a0.describe.remote())
        if d["searches"] >= 5:
            os.kill(d["pid"], signal.SIGKILL)
            killed.update(pid=d["pid"], after_searches=d["searches"], at=time.time(),
                          during_eval=not eval_done.is_set())
            return
        time.sleep(0.05)


th = threading.Thread(target=killer)
th.start()
served = ["--search_backend", "ray", "--ray_address", "auto", "--ray_index", "bench610k"]
try:
    res["ray_served_killed"] = ev("ray_served_killed", *served)
finally:
    eval_done.set()
    th.join()
if not killed:
    main(["index", "stop", "bench610k"])
    ray.shutdown()
    sys.exit(f"shard 0 served fewer than 5 searches in the whole evaluation: no kill; raise --max_tokens "
             f"(now {args.max_tokens})")
after = ray.get(a0.describe.remote())
killed.update(new_pid=after["pid"], restarted=after["restarted"], searches_since_restart=after["searches"])
res["ray_served_2"] = ev("ray_served_2", *served)
assert main(["index", "stop", "bench610k"]) == 0
ray.shutdown()
print(json.dumps({"ppl_tokens_wall": res, "kill": killed}, indent=1))
for k, v in res.items():
    print(f"{k}: ppl_knnlm {v[0]!r}  diff vs faiss {v[0] - res['faiss'][0]:+.3e}  tokens {v[1]}  wall {v[2]:.1f}s")
