"""`knnlm datastore build`, `knnlm index build`, `knnlm eval`: the kNN-LM core."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import add_command, resolve, save_config, to_dict


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
    stop.add_argument("--ray_address", default=RayServeArgs.ray_address, help="the Ray cluster (auto or ray://HOST:PORT)")

    ev = add_command(sub, "eval", (ModelArgs, CorpusArgs, KNNArgs, EvalArgs), cmd_eval,
                     help="perplexity of the LM, kNN-LM and MLP-LM on a corpus")
    ev.add_argument("--key_point", default=None, help="check the datastore holds this key point (default: its own)")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace an earlier `knnlm eval` run of other inputs in --output_dir (anything else is never "
                         "overwritten)")


def cmd_datastore_build(args) -> int:
    from ..corpus import CorpusArgs
    from ..datastore import DatastoreArgs, build_datastore
    from ..models import ModelArgs, load_model

    from ..datastore import KIND, OWN_FILES
    from ..fileio import claim_output_dir

    margs, cargs, dargs = resolve([ModelArgs, CorpusArgs, DatastoreArgs], args, args.config)
    cargs.require("train")
    claim_output_dir(dargs.output_dir, KIND, None, own_files=OWN_FILES)  # a model folder etc.: refused before loading
    lm = load_model(margs)
    started = time.time()
    ds = build_datastore(lm, cargs, dargs.output_dir, key_point=dargs.key_point, batch_size=dargs.batch_size,
                         overwrite=dargs.overwrite)
    save_config(dargs.output_dir, margs, cargs, dargs)
    print(f"datastore {ds.dir}: N={ds.N} keys, d={ds.d}, key point {ds.key_point}, "
          f"{ds.nbytes() / 2**20:.1f} MiB, {time.time() - started:.1f}s")
    return 0


def cmd_index_build(args) -> int:
    from ..datastore import Datastore
    from ..index import IndexArgs, build_index

    iargs = resolve(IndexArgs, args, args.config)
    ds = Datastore.open(args.datastore)
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
    from ..evaluate import EvalArgs, evaluate, sweep_from_cache
    from ..knn import KNNArgs
    from ..models import ModelArgs
    from ..report import markdown_table, write_markdown, write_results

    margs, cargs, kargs, eargs = resolve([ModelArgs, CorpusArgs, KNNArgs, EvalArgs], args, args.config)
    started = time.time()
    out = Path(eargs.output_dir)
    if not eargs.from_neighbors:
        cargs.require("validation")
    _claim_eval_dir(out, margs, cargs, eargs, args.overwrite)
    if eargs.from_neighbors:
        sweep = sweep_from_cache(eargs.from_neighbors, kargs.lmbda, eargs.sweep_temps)
        metrics = {"sweep_knn_cached": sweep}
        rows = [[k, v] for k, v in sweep.items()]
        table = markdown_table(["setting", "ppl_knnlm"], rows)
    else:
        from ..models import load_model

        datastore = Datastore.open(eargs.datastore) if eargs.datastore else None
        lm = load_model(margs)
        memory = None
        if eargs.mlp_memory:
            from ..memory import MLPMemory
            memory = MLPMemory.load(eargs.mlp_memory, lm)
        metrics = evaluate(lm, cargs, out, eargs, datastore=datastore, knn=kargs, memory=memory, key_point=args.key_point)
        table = results_table(metrics)
    save_config(out, margs, cargs, kargs, eargs)
    write_results(out, to_dict(margs, cargs, kargs, eargs), metrics, started)
    write_markdown(out, table)
    print(table, end="")
    print(f"results: {out / 'results.json'}")
    return 0


# what `knnlm eval` writes into its folder (a folder made before the knnlm-run.json marker holds nothing else)
_EVAL_FILES = ("config.json", "results.json", "results.md", "tokens.i32", "tokens.i32.docs", "tokens.i32.json",
               "neighbors")


def _claim_eval_dir(out: Path, margs, cargs, eargs, overwrite: bool) -> None:
    """Refuses an output folder holding anything but this command's own runs; an earlier eval of other inputs (model,
    corpus, windowing, datastore, memory) only with --overwrite. k, λ and T are settings: a rerun may change them."""
    import dataclasses
    import shutil

    from ..corpus import source_fingerprint
    from ..fileio import claim_output_dir

    if eargs.from_neighbors:
        inputs = {"from_neighbors": str(Path(eargs.from_neighbors).resolve())}
    else:
        corpus = {k: v for k, v in dataclasses.asdict(cargs).items() if k not in ("train_file", "validation_file")}
        model = {k: v for k, v in dataclasses.asdict(margs).items() if k != "device"}
        inputs = {"model": model, "corpus": corpus, "source": source_fingerprint(cargs, "validation"),
                  "datastore": eargs.datastore and str(Path(eargs.datastore).resolve()),
                  "mlp_memory": eargs.mlp_memory and str(Path(eargs.mlp_memory).resolve())}
    if claim_output_dir(out, "eval", inputs, overwrite, own_files=_EVAL_FILES) == "replace":
        keep = Path(eargs.from_neighbors).resolve() if eargs.from_neighbors else None  # the cache this run reads
        for name in _EVAL_FILES:  # the earlier run's files go: none may be mistaken for this run's
            p = out / name
            if keep is not None and (p.resolve() == keep or p.resolve() in keep.parents):
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def results_table(metrics: dict) -> str:
    from ..report import markdown_table

    rows = [["LM", "–", metrics["ppl_lm"]]]
    for name, key in (("kNN-LM", "sweep_knn"), ("MLP-LM", "sweep_mlp")):
        for lam, ppl in metrics.get(key, {}).items():
            rows.append([name, lam, ppl])
    return markdown_table(["model", "λ", f"perplexity ({metrics['n_tokens']} tokens)"], rows)
