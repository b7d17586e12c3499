"""`knnlm mlp train`: an MLP memory trained on a datastore's key/value pairs (paper §5)."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import add_command, resolve, save_config, to_dict


def register(sub) -> None:
    from ..memory import MemoryArgs
    from ..models import ModelArgs

    mlp = sub.add_parser("mlp", help="MLP memory: a trained network in place of the kNN datastore")
    mlp_sub = mlp.add_subparsers(dest="action", required=True)
    add_command(mlp_sub, "train", (ModelArgs, MemoryArgs), cmd_mlp_train,
                help="train W(z + LN(MLP(z))) on a datastore's (key, next token) pairs (resumable)")


def cmd_mlp_train(args) -> int:
    from ..datastore import Datastore
    from ..evaluate import storage_report
    from ..memory import MemoryArgs, train_memory
    from ..models import ModelArgs, load_model
    from ..report import finish_outputs, markdown_table

    margs, memargs = resolve([ModelArgs, MemoryArgs], args, args.config)
    started = time.time()
    ds = Datastore.open(memargs.datastore)  # a missing or truncated store is reported before the model loads
    lm = load_model(margs)
    mem = train_memory(lm, ds, memargs, memargs.output_dir)
    out = Path(memargs.output_dir)
    save_config(out, margs, memargs)
    training = _read_training(out)
    storage = storage_report(ds, mem)
    metrics = {"training": training, "storage": storage, "n_parameters": mem.n_parameters()}
    rows = [["MLP memory", storage["mlp_memory_bytes"], 1.0],
            ["datastore (keys + values)", storage["datastore_bytes"], storage.get("datastore_over_mlp")]]
    if storage.get("index_bytes"):
        rows.append(["FAISS index", storage["index_bytes"], storage.get("index_over_mlp")])
    table = markdown_table(["storage", "bytes", "× the memory"], rows, digits=1)
    finish_outputs(out, to_dict(margs, memargs), metrics, table, started)
    print(f"memory {out}: {mem.n_parameters()} parameters, key point {mem.key_point}, "
          f"loss {_fmt(training.get('first_loss'))} -> {_fmt(training.get('final_loss'))} over {training.get('steps')} steps, "
          f"{training.get('pairs_per_s', 0):.0f} pairs/s"
          + (f", loss drop over the last fifth {training['last_fifth_drop']:.1%}"
             if training.get("last_fifth_drop") is not None else "")
          + (f"; held-out loss {_fmt(training['heldout_curve'][0]['loss'])} -> {_fmt(training['heldout_final_loss'])}, "
             f"best {_fmt(training['heldout_best_loss'])} at epoch {training['heldout_best_epoch']:g}"
             if training.get("heldout_curve") else ""))
    print(table, end="")
    print(f"results: {out / 'results.json'}")
    return 0


def _read_training(out: Path) -> dict:
    from ..fileio import read_record
    from ..memory import TRAIN_LOG, TRAIN_LOG_FIELDS

    record = read_record(out / TRAIN_LOG, fix="rerun with --overwrite to train the memory again",
                         required=TRAIN_LOG_FIELDS)
    record.pop("loss_curve", None)
    return record


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4f}"
