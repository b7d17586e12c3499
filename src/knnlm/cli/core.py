"""`knnlm datastore build`, `knnlm index build`, `knnlm eval`: the kNN-LM core."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import add_arguments, add_config_flag, resolve, save_config, to_dict


def register(sub) -> None:
    from ..corpus import CorpusArgs
    from ..datastore import DatastoreArgs
    from ..evaluate import EvalArgs
    from ..index import IndexArgs
    from ..knn import KNNArgs
    from ..models import ModelArgs

    ds = sub.add_parser("datastore", help="build a kNN datastore (keys + next tokens) from a corpus")
    ds_sub = ds.add_subparsers(dest="action", required=True)
    build = ds_sub.add_parser("build", help="encode a corpus into keys.f16 / vals.i32 (resumable; torchrun-aware)")
    add_config_flag(build)
    for cls in (ModelArgs, CorpusArgs, DatastoreArgs):
        add_arguments(build, cls)
    build.set_defaults(func=cmd_datastore_build)

    ix = sub.add_parser("index", help="build a FAISS index over a datastore")
    ix_sub = ix.add_subparsers(dest="action", required=True)
    ib = ix_sub.add_parser("build", help="Flat / IVF-PQ / any factory string; resumable; recall vs exact search")
    ib.add_argument("datastore", help="datastore folder")
    add_config_flag(ib)
    add_arguments(ib, IndexArgs)
    ib.set_defaults(func=cmd_index_build)

    ev = sub.add_parser("eval", help="perplexity of the LM, kNN-LM and MLP-LM on a corpus")
    add_config_flag(ev)
    for cls in (ModelArgs, CorpusArgs, KNNArgs, EvalArgs):
        add_arguments(ev, cls)
    ev.add_argument("--key_point", default=None, help="check the datastore holds this key point (default: its own)")
    ev.set_defaults(func=cmd_eval)


def cmd_datastore_build(args) -> int:
    from ..corpus import CorpusArgs
    from ..datastore import DatastoreArgs, build_datastore
    from ..models import ModelArgs, load_model

    margs, cargs, dargs = resolve([ModelArgs, CorpusArgs, DatastoreArgs], args, args.config)
    cargs.require("train")
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
    if eargs.from_neighbors:
        sweep = sweep_from_cache(eargs.from_neighbors, kargs.lmbda, eargs.sweep_temps)
        metrics = {"sweep_knn_cached": sweep}
        rows = [[k, v] for k, v in sweep.items()]
        table = markdown_table(["setting", "ppl_knnlm"], rows)
    else:
        from ..models import load_model

        cargs.require("validation")
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


def results_table(metrics: dict) -> str:
    from ..report import markdown_table

    rows = [["LM", "–", metrics["ppl_lm"]]]
    for name, key in (("kNN-LM", "sweep_knn"), ("MLP-LM", "sweep_mlp")):
        for lam, ppl in metrics.get(key, {}).items():
            rows.append([name, lam, ppl])
    return markdown_table(["model", "λ", f"perplexity ({metrics['n_tokens']} tokens)"], rows)
