"""`knnlm macondo generate` and `knnlm macondo score`: the over-specification dataset and its log-likelihood table."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import add_command, resolve, save_config, to_dict
from ..errors import KnnlmError
from ..fileio import claim_output_dir

RESULT_FILES = ("config.json", "results.json", "results.md")  # what a one-shot command writes into its folder


@dataclass
class ScoreArgs:
    data: Optional[str] = field(default=None, metadata={"help": "Macondo folder written by `knnlm macondo generate` (required)."})
    split: str = field(default="test", metadata={"help": "Split to score: test, test_overspecified or train."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for results.json, results.md and config.json (required)."})
    datastore: Optional[str] = field(default=None, metadata={"help": "kNN datastore folder: adds kNN-augmented scores (k, λ, T from --k --lmbda --knn_temp)."})
    mlp_memory: Optional[str] = field(default=None, metadata={"help": "MLP memory folder (`knnlm mlp train`): adds MLP-augmented scores with the same λ."})
    batch_size: int = field(default=32, metadata={"help": "Sentences per forward pass (and per kNN search)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier `knnlm macondo score` run of other settings in --output_dir (anything else is never overwritten)."})

    def validate(self) -> None:
        if not self.data:
            raise KnnlmError("--data: required; a folder written by `knnlm macondo generate`")
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder for results.json")
        if self.batch_size < 1:
            raise KnnlmError("--batch_size: must be >= 1")


def register(sub) -> None:
    from ..knn import KNNArgs
    from ..macondo.generate import MacondoArgs
    from ..models import ModelArgs

    group = sub.add_parser("macondo", help="the Macondo over-specification dataset: generate it, score a model on it")
    actions = group.add_subparsers(dest="action", required=True)
    add_command(actions, "generate", MacondoArgs, cmd_generate,
                help="write a Macondo village (train/test/test_overspecified JSONL + meta)")
    add_command(actions, "score", (ModelArgs, ScoreArgs, KNNArgs), cmd_score,
                help="log-likelihood of the children's names, vanilla / kNN / MLP memory")


def cmd_generate(args) -> int:
    from ..macondo.generate import MacondoArgs, generate_macondo, read_meta

    margs = resolve(MacondoArgs, args, args.config)
    started = time.time()
    out = generate_macondo(margs)
    meta = read_meta(out)
    c = meta["counts"]
    groups = ", ".join(f"{n}: {k}" for n, k in c["parents_by_n_children"].items())
    print(f"macondo ({meta['format']}, seed {meta['seed']}, tokenizer {meta['tokenizer']}) in {out}")
    print(f"  villagers {c['villagers']}, parents {c['parents']} (by number of children {groups}), "
          f"children {c['children']}")
    print(f"  train {c['train']}, test {c['test']}, test_overspecified {c['test_overspecified']} examples; "
          f"{time.time() - started:.1f}s")
    return 0


def cmd_score(args) -> int:
    from ..datastore import Datastore
    from ..knn import KNNArgs, Retriever
    from ..macondo.generate import read_split
    from ..macondo.score import results_table, score_split, summarize_scores
    from ..models import ModelArgs, load_model
    from ..report import finish_outputs

    margs, sargs, kargs = resolve([ModelArgs, ScoreArgs, KNNArgs], args, args.config)
    if not margs.model_name_or_path:
        raise KnnlmError("--model_name_or_path: required; the model to score")
    kargs.refuse_inactive(bool(sargs.datastore), bool(sargs.mlp_memory))
    kargs.refuse_stateful("`knnlm macondo score`")
    inputs = {k: v for k, v in to_dict(margs, sargs, kargs).items() if k not in ("output_dir", "device", "overwrite")}
    claim_output_dir(sargs.output_dir, "macondo score", inputs, sargs.overwrite, own_files=RESULT_FILES,
                     what="`knnlm macondo score` run", check_only=True)  # before loading and scoring
    started = time.time()
    rows = read_split(sargs.data, sargs.split)
    datastore = Datastore.open(sargs.datastore) if sargs.datastore else None
    lm = load_model(margs)
    retriever = memory = None
    if datastore is not None:
        datastore.check_compatible(lm)
        retriever = Retriever(datastore, kargs)
    if sargs.mlp_memory:
        from ..memory import MLPMemory

        memory = MLPMemory.load(sargs.mlp_memory, lm)
    lls = score_split(lm, rows, retriever=retriever, knn=kargs, memory=memory, batch_size=sargs.batch_size)
    summary = summarize_scores(rows, lls)
    out = Path(sargs.output_dir)
    metrics = {"split": sargs.split, "n_examples": len(rows), **summary,
               "per_example": {"lm": lls["lm"], **{f"knn_{lam}": v for lam, v in lls["knn"].items()},
                               **{f"mlp_{lam}": v for lam, v in lls["mlp"].items()}}}
    if retriever is not None:
        metrics["datastore_N"] = datastore.N
        metrics["k"] = retriever.k
    claim_output_dir(out, "macondo score", inputs, sargs.overwrite, own_files=RESULT_FILES,  # (made only now: bad
                     what="`knnlm macondo score` run", remove_on_replace=True)  # input leaves no folder)
    save_config(out, margs, sargs, kargs)
    table = f"Macondo {sargs.split}: mean log-likelihood of the children's names\n\n" + results_table(summary)
    finish_outputs(out, to_dict(margs, sargs, kargs), metrics, table, started)
    print(table, end="")
    print(f"results: {out / 'results.json'}")
    return 0
