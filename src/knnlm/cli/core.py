"""`knnlm datastore build`, `knnlm index build`, `knnlm eval`: the kNN-LM core."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import add_command, resolve, save_config, to_dict
from ..distributed import is_main, rank_and_world
from ..errors import KnnlmError


def register(sub) -> None:
    from ..corpus import CorpusArgs
    from ..datastore import DatastoreArgs
    from ..evaluate import EvalArgs
    from ..index import IndexArgs
    from ..knn import KNNArgs
    from ..models import ModelArgs

    ds = sub.add_parser("datastore", help="build a kNN datastore (keys + next tokens) from a corpus")
    ds_sub = ds.add_subparsers(dest="action", required=True)
    add_command(ds_sub, "build", (ModelArgs, CorpusArgs, DatastoreArgs), cmd_datastore_build,
                help="encode a corpus into keys.f16 / vals.i32 (resumable; torchrun-aware)")

    dv = ds_sub.add_parser("verify", help="check a store in full: sizes, value range, finite keys, the sha256 of "
                                          "keys/values/tokens (and of its index) against those recorded at build time")
    dv.add_argument("datastore", help="datastore folder")
    dv.set_defaults(func=cmd_datastore_verify)

    from ..clusters import ClusterArgs

    dc = add_command(ds_sub, "cluster", ClusterArgs, cmd_datastore_cluster,
                     help="k-means clusters of the keys for RetoMaton (--retomaton true --no_clusters false); resumable")
    dc.add_argument("datastore", help="datastore folder")

    ix = sub.add_parser("index", help="build a FAISS index over a datastore")
    ix_sub = ix.add_subparsers(dest="action", required=True)
    ib = add_command(ix_sub, "build", IndexArgs, cmd_index_build,
                     help="Flat / IVF-PQ / any factory string; resumable; recall vs exact search")
    ib.add_argument("datastore", help="datastore folder")
    from ..ray_search import RayServeArgs

    serve = add_command(ix_sub, "serve", RayServeArgs, cmd_index_serve,
                        help="keep the index's shards loaded on named Ray actors (--search_backend ray --ray_index NAME)")
    serve.add_argument("datastore", help="datastore folder (the same path on every Ray node)")
    stop = add_command(ix_sub, "stop", (), cmd_index_stop, help="stop a group of shard actors started by `knnlm index serve`")
    stop.add_argument("name", help="the group's --name")
    stop.add_argument("--ray_address", default=RayServeArgs.ray_address, help="the Ray cluster (auto, HOST:PORT or ray://HOST:PORT)")

    ev = add_command(sub, "eval", (ModelArgs, CorpusArgs, KNNArgs, EvalArgs), cmd_eval,
                     help="perplexity of the LM, kNN-LM and MLP-LM on a corpus")
    ev.add_argument("--key_point", default=None, help="check the datastore holds this key point (default: its own)")


def cmd_datastore_build(args) -> int:
    from ..corpus import CorpusArgs
    from ..datastore import DatastoreArgs, build_datastore
    from ..models import ModelArgs, load_model

    from ..datastore import KIND, OWN_FILES
    from ..fileio import claim_output_dir

    margs, cargs, dargs = resolve([ModelArgs, CorpusArgs, DatastoreArgs], args, args.config)
    cargs.require("train")
    claim_output_dir(dargs.output_dir, KIND, None, dargs.overwrite, own_files=OWN_FILES)  # before the model loads
    lm = load_model(margs)
    started = time.time()
    ds = build_datastore(lm, cargs, dargs.output_dir, key_point=dargs.key_point, batch_size=dargs.batch_size,
                         overwrite=dargs.overwrite)
    save_config(dargs.output_dir, margs, cargs, dargs)
    if not is_main():  # under a launch of several processes the main one reports
        return 0
    skipped = ds.meta.get("skipped_rows")
    print(f"datastore {ds.dir}: N={ds.N} keys, d={ds.d}, key point {ds.key_point}, "
          f"{ds.nbytes() / 2**20:.1f} MiB, {time.time() - started:.1f}s"
          + (f"; {skipped} rows without text skipped" if skipped else ""))
    return 0


def cmd_datastore_verify(args) -> int:
    from ..clusters import verify_clusters
    from ..datastore import Datastore
    from ..index import verify_store

    started = time.time()
    report = verify_store(args.datastore, flag="datastore")  # the positional argument, not a --datastore flag
    ds = Datastore.open(args.datastore, flag="datastore")
    clusters = verify_clusters(ds, flag="datastore")  # RetoMaton's, if built (their own fix: datastore cluster)
    sums = report["checksums"]
    index = report.get("index")
    print(f"datastore {args.datastore}: intact: N={report['N']} keys (all finite), d={report['d']}, values in "
          f"[0, {report['values'][1]}]; sha256 "
          + (f"of {', '.join(sums)} as recorded at build time" if isinstance(sums, dict) else
             "not recorded (built by an older knnlm: rebuild with --overwrite to record them)")
          + ("" if index is None else f"; index {index['factory']}: " + (
              f"sha256 of {', '.join(index['checksums'])} as recorded" if isinstance(index["checksums"], dict)
              else "built for this store, no sha256 recorded"))
          + ("" if clusters is None else f"; {clusters['num_clusters']} clusters built from it")
          + f" ({time.time() - started:.1f}s)")
    return 0


def cmd_datastore_cluster(args) -> int:
    from ..clusters import FILE, ClusterArgs, build_clusters
    from ..datastore import Datastore

    cargs = resolve(ClusterArgs, args, args.config)
    ds = Datastore.open(args.datastore, flag="datastore")
    started = time.time()
    record = build_clusters(ds, cargs)
    print(f"clusters {ds.dir / FILE}: {cargs.num_clusters} clusters of {ds.N} keys (sizes {record['sizes']['min']}-"
          f"{record['sizes']['max']}), {time.time() - started:.1f}s")
    return 0


def cmd_index_build(args) -> int:
    from ..datastore import Datastore
    from ..index import IndexArgs, build_index

    iargs = resolve(IndexArgs, args, args.config)
    ds = Datastore.open(args.datastore, flag="datastore")  # the positional argument
    started = time.time()
    info = build_index(ds, iargs)
    recall = info.get("recall")
    print(f"index {Path(args.datastore) / 'index'}: {info['factory']} over {info['ntotal']} keys, "
          f"{info['shards']} shard(s), {time.time() - started:.1f}s" + (f"; recall vs exact: {recall}" if recall else ""))
    return 0


def cmd_index_serve(args) -> int:
    from ..ray_search import RayServeArgs, serve

    sargs = resolve(RayServeArgs, args, args.config)
    for d in serve(args.datastore, sargs):
        print(f"shard {d['shard']}: rows {d['bounds'][0]}..{d['bounds'][1]} on node {d['node_ip']} ({d['node_id'][:8]})")
    print(f"serving {sargs.name}: evaluate with --search_backend ray --ray_address {sargs.ray_address} "
          f"--ray_index {sargs.name}; stop with `knnlm index stop {sargs.name}`")
    return 0


def cmd_index_stop(args) -> int:
    from ..ray_search import stop

    print(f"stopped {args.name}: {stop(args.name, args.ray_address)} shard actor(s)")
    return 0


def cmd_eval(args) -> int:
    from ..corpus import CorpusArgs
    from ..datastore import Datastore
    from ..evaluate import EvalArgs, commit_neighbour_cache, evaluate, remove_progress, sweep_from_cache, sweep_key
    from ..knn import KNNArgs
    from ..models import ModelArgs
    from ..report import finish_outputs, markdown_table

    margs, cargs, kargs, eargs = resolve([ModelArgs, CorpusArgs, KNNArgs, EvalArgs], args, args.config)
    if rank_and_world()[1] > 1:  # (a second process was refused by the output folder's lock, naming no reason)
        raise KnnlmError("eval: runs as one process (its windows are not split across processes); launch it without "
                         "torchrun / accelerate launch")
    started = time.time()
    out = Path(eargs.output_dir)
    if not eargs.from_neighbors:
        cargs.require("validation")
        kargs.refuse_inactive(bool(eargs.datastore), bool(eargs.mlp_memory))
    _claim_eval_dir(out, margs, cargs, eargs, eargs.overwrite)
    if eargs.from_neighbors:
        held, k, temps = _cache_settings(args, margs, kargs, eargs)
        sweep = sweep_from_cache(eargs.from_neighbors, kargs.lmbda, temps, k)
        # the cache's numbers are checked finite when read, so only λ = 1 can give a non-finite perplexity here
        _refuse_non_finite({"sweep_knn": {lam: sweep[sweep_key(lam, t)] for t in temps for lam in kargs.lmbda},
                            "k": k})
        metrics = {"sweep_knn_cached": sweep, "k": k, "k_cached": held["k"], "temps": temps, "cache": held}
        # the run's config says what the numbers were computed from: the cache's model and store, this k and T
        margs.model_name_or_path, eargs.datastore = held.get("model_name_or_path"), held.get("datastore")
        kargs.k, kargs.knn_temp = k, temps[0]
        rows = [[k, v] for k, v in sweep.items()]
        table = markdown_table(["setting", "ppl_knnlm"], rows)
    else:
        from ..corpus import skipped_rows
        from ..models import load_model

        datastore = Datastore.open(eargs.datastore) if eargs.datastore else None
        lm = load_model(margs)
        memory = None
        if eargs.mlp_memory:
            from ..memory import MLPMemory
            memory = MLPMemory.load(eargs.mlp_memory, lm)
        metrics = evaluate(lm, cargs, out, eargs, datastore=datastore, knn=kargs, memory=memory, key_point=args.key_point,
                           commit_cache=False, keep_progress=True)
        metrics["skipped_rows"] = skipped_rows(out / "tokens.i32")
        _refuse_non_finite(metrics)
        table = results_table(metrics)
    save_config(out, margs, cargs, kargs, eargs)
    finish_outputs(out, to_dict(margs, cargs, kargs, eargs), metrics, table, started)
    # after the results that describe it (a refused or killed run keeps the earlier one)
    commit_neighbour_cache(out, {k: v for k, v in to_dict(margs, cargs, kargs, eargs).items()
                                 if k not in ("output_dir", "overwrite")})
    remove_progress(out)  # the run is finished: until here a rerun resumes it with no batch left to score
    print(table, end="")
    print(f"results: {out / 'results.json'}")
    return 0


def _refuse_non_finite(metrics: dict) -> None:
    """A NaN/inf perplexity is never a result: it comes from a corrupt store or memory, or from λ = 1, the kNN
    distribution alone, which gives p(gold) = 0 (an infinite perplexity, never NaN) wherever the gold token is not the
    value of any of the k neighbours."""
    import math

    bad = {k: v for k, v in metrics.items() if k.startswith("ppl") and not math.isfinite(v)}
    bad.update({f"{name}[{lam}]": v for name in ("sweep_knn", "sweep_mlp") for lam, v in metrics.get(name, {}).items()
                if not math.isfinite(v)})
    pure_knn = {"sweep_knn[1.0]"} | ({"ppl_knnlm"} if metrics.get("lmbda") == 1 else set())
    if bad and set(bad) <= pure_knn and all(v == math.inf for v in bad.values()):
        raise KnnlmError(f"--lmbda: λ = 1 weighs the kNN distribution alone, and it gives an infinite perplexity: "
                         f"p(gold) = 0 wherever the gold token is none of the k = {metrics.get('k')} neighbours' "
                         "values; use a --lmbda below 1 (e.g. 0.25); no results were written")
    if bad:
        name = next(iter(bad))
        source = ("--mlp_memory" if "mlp" in name else "--datastore") if ("mlp" in name or "knn" in name) else \
            "--model_name_or_path"
        raise KnnlmError(f"{source}: the evaluation gave {name} = {bad[name]} (NaN/inf scores): the "
                         f"{'memory' if 'mlp' in name else 'store' if 'knn' in name else 'model'} is corrupt; check "
                         "stores with `knnlm datastore verify DS`, retrain or rebuild it; no results were written")


def _cache_settings(args, margs, kargs, eargs) -> tuple[dict, int, list[float]]:
    """What a neighbour cache holds (k, and from the eval run that wrote it: model, datastore, search settings), the
    k and temperatures this run computes from it, or a one-line error for a setting it cannot honour: a larger k,
    another model or datastore, other search settings. A smaller k and any temperature are recomputed exactly
    from the cached distances."""
    from ..evaluate import CACHE_SETTINGS, neighbour_cache_k
    from ..fileio import read_json, resolve_path
    from ..knn import KNNArgs

    cache = Path(eargs.from_neighbors)
    held = {"k": neighbour_cache_k(cache)}  # (checked: its files agree with each other and with k.txt)
    if held["k"] == 0:
        raise KnnlmError(f"--from_neighbors: {cache} is the cache of an eval without --datastore (LM log-probs, no "
                         "neighbours); pass the neighbors/ folder of an eval run with --datastore and --save_neighbors true")
    run = cache / CACHE_SETTINGS  # (a cache from before it named its settings: its run folder's config.json)
    run = run if run.is_file() else cache.parent / "config.json"
    config = read_json(run) if run.is_file() else {}
    for key in ("model_name_or_path", "datastore", "recompute_dists", "ignore_top", "key_point"):
        if key in config:
            held[key] = config[key]
    default = KNNArgs()
    k = kargs.k if (getattr(args, "k", None) is not None or kargs.k != default.k) else held["k"]
    if k > held["k"]:
        raise KnnlmError(f"--k: the cache {cache} holds {held['k']} neighbours per token, fewer than --k {k}; use "
                         f"--k {held['k']} or less, or run a new eval with --save_neighbors true --k {k}")
    given = {"model_name_or_path": margs.model_name_or_path, "datastore": eargs.datastore,
             "recompute_dists": kargs.recompute_dists if kargs.recompute_dists != default.recompute_dists else None,
             "ignore_top": kargs.ignore_top if kargs.ignore_top != default.ignore_top else None}
    for key, value in given.items():
        if value is None:
            continue
        mine, theirs = value, held.get(key)
        if key == "datastore" and theirs:
            mine, theirs = resolve_path(mine, "--datastore"), resolve_path(theirs, "--from_neighbors")
        if mine != theirs:
            raise KnnlmError(f"--{key}: the cache {cache} was made with {key} {held.get(key, 'unrecorded')}; "
                             f"--from_neighbors cannot change it: drop --{key} or run a new eval with "
                             "--save_neighbors true")
    temps = list(eargs.sweep_temps)
    if kargs.knn_temp != default.knn_temp or getattr(args, "knn_temp", None) is not None:
        temps = [kargs.knn_temp] + [t for t in temps if t != kargs.knn_temp]
    return held, k, temps


# what `knnlm eval` writes into its folder (a folder made before the knnlm-run.json marker holds nothing else)
_EVAL_FILES = ("config.json", "results.json", "results.md", "tokens.i32", "tokens.i32.docs", "tokens.i32.json",
               "eval-progress.json",  # (evaluate.PROGRESS_FILE: where a killed run resumes)
               "neighbors", "neighbors.*-tmp")  # (its staged rebuild and the one it replaces, fileio.staging_dir)


def _claim_eval_dir(out: Path, margs, cargs, eargs, overwrite: bool) -> None:
    """Refuses an output folder holding anything but this command's own runs; an earlier eval of other inputs (model,
    corpus, windowing, datastore, memory) only with --overwrite. k, λ and T are settings: a rerun may change them."""
    import dataclasses

    from ..corpus import source_fingerprint
    from ..evaluate import remove_progress
    from ..fileio import claim_output_dir, resolve_path

    if eargs.from_neighbors:
        inputs = {"from_neighbors": str(resolve_path(eargs.from_neighbors, "--from_neighbors"))}
    else:
        corpus = {k: v for k, v in dataclasses.asdict(cargs).items()
                  if k not in ("train_file", "validation_file") and (k != "skip_bad_rows" or v)}  # (older runs)
        model = {k: v for k, v in dataclasses.asdict(margs).items() if k != "device"}
        inputs = {"model": model, "corpus": corpus, "source": source_fingerprint(cargs, "validation"),
                  "datastore": eargs.datastore and str(resolve_path(eargs.datastore, "--datastore")),
                  "mlp_memory": eargs.mlp_memory and str(resolve_path(eargs.mlp_memory, "--mlp_memory"))}
    # the earlier run's files go (but the cache this run reads): none may be mistaken for this run's
    keep = [resolve_path(eargs.from_neighbors, "--from_neighbors")] if eargs.from_neighbors else []
    claim_output_dir(out, "eval", inputs, overwrite, own_files=_EVAL_FILES, remove_on_replace=True, keep=keep)
    if overwrite:  # starts over, even a killed run of the same inputs: its progress record is not resumed
        remove_progress(out)


def results_table(metrics: dict) -> str:
    from ..report import markdown_table

    rows = [["LM", "–", metrics["ppl_lm"]]]
    for name, key in (("kNN-LM", "sweep_knn"), ("MLP-LM", "sweep_mlp")):
        for lam, ppl in metrics.get(key, {}).items():
            rows.append([name, lam, ppl])
    table = markdown_table(["model", "λ", f"perplexity ({metrics['n_tokens']} tokens)"], rows)
    if "searches" in metrics:
        table += (f"\nkNN searches: {metrics['searches']} of {metrics['steps']} positions (fraction saved "
                  f"{metrics['foss']:.3f}), {metrics['candidates_per_step']:.1f} neighbours per position\n")
    return table
