"""The over-specification study's runs: per seed a model (from scratch, fine-tuned or LoRA), its village, training on
``knnlm.train`` and at each evaluation point a datastore, an MLP memory and the scores of every split; the bare-trained
reference; ``run_study`` over the seeds (resuming)."""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch

from ...distributed import barrier, is_main, rank_and_world, start_group
from ...errors import KnnlmError
from ...fileio import atomic_write_json, claim_output_dir, read_json, read_record, reusable
from ...models import ModelArgs
from ..study import check_resumable, finish_run, read_finished, seed_path
from .report import aggregate, write_outputs
from .settings import _FREE_KEYS, METHODS, OWN_FILES, SPLITS, OverspecArgs, point_dir as eval_dir

log = logging.getLogger(__name__)


def _model_dtype(args: OverspecArgs, device: torch.device) -> str:
    if args.dtype != "auto":
        return args.dtype
    if args.lora and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"  # the base is frozen; adapters stay float32 (peft autocast_adapter_dtype)
    return "float32"


def build_lm(args: OverspecArgs, seed: int, seed_dir: Path):
    """The model of one seed, ready to train: loaded (or built from scratch with the seed), LoRA-wrapped with --lora."""
    from ...assets import build_scratch_gpt2
    from ...models import add_lora, load_model, resolve_device

    device = resolve_device(args.device)
    source = args.model_name_or_path
    if args.scratch:
        source = str(build_scratch_gpt2(args.model_name_or_path, seed_dir / "init", seed=seed))
    margs = ModelArgs(model_name_or_path=source, revision=None if args.scratch else args.revision,
                      dtype=_model_dtype(args, device), device=args.device)
    lm = load_model(margs)
    lm.name = f"{args.model_name_or_path} (seed {seed})"
    if not args.lora:
        return lm
    return add_lora(lm, args.lora_r, args.lora_alpha, args.lora_dropout, list(args.lora_targets), seed)


# ---------------------------------------------------------------------------------------------------------------- data
def train_sample(train_rows: list[dict], per_pair: int) -> list[dict]:
    """The fixed sample of training sentences scored as the 'train' split: each parent-child pair's first ``per_pair``
    sentences (rows are ordered by parent, child, example), in file order."""
    seen: dict[tuple, int] = {}
    out = []
    for r in train_rows:
        key = (r["parent"], r["child"])
        if seen.get(key, 0) < per_pair:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out


def bare_training_rows(data: Path, examples_per_child: int) -> list[dict]:
    """The bare-trained reference's training data: every bare test sentence ("[villager] is the parent of [child]"),
    repeated ``examples_per_child`` times, so that it has as many sentences (hence batches and steps per epoch) and as
    many sentences per fact as the over-specified training set. Raises when a row is not the bare template."""
    from ...macondo.generate import read_split

    rows = read_split(data, "test")
    for r in rows:
        if r["text"] != f"{r['parent']} is the parent of {r['child']}" or r.get("attribute") is not None:
            raise KnnlmError(f"--bare_reference: {data}/test.jsonl holds {r['text']!r}, not a bare statement")
    return [dict(r) for r in rows for _ in range(examples_per_child)]


def steps_per_epoch(n_rows: int, batch_size: int, gradient_accumulation_steps: int, world: int = 1) -> int:
    """The trainer's optimizer steps per pass over ``n_rows`` sentences (``knnlm.train.train``: each of the ``world``
    processes takes an equal share of an epoch's micro-batches)."""
    return math.ceil(math.ceil(n_rows / batch_size) // world / gradient_accumulation_steps)


def total_steps(args: OverspecArgs, n_rows: int) -> int:
    """The trainer's number of optimizer steps for ``n_rows`` sentences (--max_steps overrides --epochs)."""
    return args.max_steps or args.epochs * steps_per_epoch(n_rows, args.batch_size, args.gradient_accumulation_steps,
                                                           rank_and_world()[1])


def make_batches(lm, rows: list[dict], batch_size: int):
    """``batches(epoch, seed)`` for :func:`knnlm.train.train`: every training sentence once per epoch, in an order that
    depends only on (seed, epoch); each sentence is ``lm.encode(text)``, the loss covers all of it."""
    from ...train import collate_causal, epoch_permutation

    seqs = [lm.encode(r["text"]) for r in rows]
    pad = lm.eos_token_id if lm.eos_token_id is not None else 0

    def batches(epoch: int, seed: int) -> list[dict]:
        order = epoch_permutation(len(seqs), seed, epoch)
        return [collate_causal([seqs[i] for i in order[b: b + batch_size]], pad)
                for b in range(0, len(order), batch_size)]

    return batches


# ----------------------------------------------------------------------------------------------------------- evaluation
def evaluate_point(lm, args: OverspecArgs, data: Path, point_dir: Path, seed: int, last: bool = True) -> dict:
    """Scores one evaluation point: builds the datastore of the current model over every training token, trains the
    MLP memory on it (with --mlp_memory; with --mlp_at last only when ``last``) and scores the test and control splits
    and the training sample (--train_eval_per_pair) vanilla / kNN / MLP; -> {"splits": {split: summarize_scores},
    "lls": {split: per-row scores}, ...}, the training sample's vanilla summary with "optimum_fit"."""
    from ...corpus import CorpusArgs
    from ...datastore import build_datastore
    from ...knn import Retriever
    from ...macondo.generate import read_split
    from ...macondo.score import fit_optimum, score_split, summarize_scores
    from ...memory import TRAIN_LOG, TRAIN_LOG_FIELDS, train_memory

    t0 = time.time()
    corpus = CorpusArgs(train_file=str(data / "train.jsonl"), concat_documents=False)
    ds = build_datastore(lm, corpus, point_dir / "datastore", key_point=args.key_point,
                         batch_size=args.eval_batch_size, overwrite=True)
    t_ds = time.time() - t0
    if not is_main():
        return {}
    memory = None
    if args.mlp_memory and (last or args.mlp_at == "every"):
        memory = train_memory(lm, ds, args.memory_args(str(ds.dir), str(point_dir / "memory"), seed))
    t_mem = time.time() - t0 - t_ds
    knn = args.knn_args()
    retriever = Retriever(ds, knn)
    out = {"n_keys": ds.N, "splits": {}, "lls": {}}
    if memory is not None:  # the memory's loss curve over all datastore pairs (does it plateau?)
        rec = read_json(point_dir / "memory" / TRAIN_LOG)  # (written, or checked, by train_memory)
        out["mlp_training"] = {k: rec[k] for k in TRAIN_LOG_FIELDS}
    all_train = read_split(data, "train")
    for split in SPLITS:
        if split == "train" and not args.train_eval_per_pair:
            continue
        rows = train_sample(all_train, args.train_eval_per_pair) if split == "train" else read_split(data, split)
        lls = score_split(lm, rows, retriever=retriever, knn=knn, memory=memory, batch_size=args.eval_batch_size)
        out["lls"][split] = {"lm": lls["lm"], "mem": lls["mem"],
                             **{m: {str(lam): v for lam, v in lls[m].items()} for m in ("knn", "mlp")},
                             "n_children": [int(r["n_children"]) for r in rows]}
        out["splits"][split] = summarize_scores(rows, lls, fit_optimum(rows, all_train) if split == "train" else None)
    out["time_s"] = {"datastore": round(t_ds, 3), "mlp_memory": round(t_mem, 3),
                     "total": round(time.time() - t0, 3)}
    return out


def _scored_point(lm, model, run_dir: Path, seed: int, step: int, score) -> dict:
    """One evaluation point's saved result (:func:`point_dir`'s ``.json``): reused when it was scored with these
    weights, else ``score(point)`` (a dict), recorded with the step, the seed and the weights hash (by the main
    process). ``point``: the trainer's ``model`` as an LM, ``lm`` itself when it is its model (its hashes cached)."""
    from ...models import LM

    point = lm if model is lm.model else LM(model, lm.tokenizer, lm.name)
    path = eval_dir(run_dir, step).with_suffix(".json")
    weights = point.weights_hash()
    saved = reusable(path, weights, "weights_hash")
    if saved is not None:
        log.info("seed %d step %d: reusing %s", seed, step, path)
        return saved
    saved = {**score(point), "step": step, "seed": seed, "weights_hash": weights}
    if is_main():
        atomic_write_json(path, saved)
    return saved


def make_on_eval(lm, args: OverspecArgs, data: Path, seed_dir: Path, seed: int, last_step: int):
    """``on_eval(step, model)`` for the trainer: scores the point (or reuses its saved result when the weights match)
    and returns the compact metrics stored in the trainer's history."""
    def on_eval(step: int, model) -> dict:
        point_dir = eval_dir(seed_dir, step)

        def score(point) -> dict:
            result = evaluate_point(point, args, data, point_dir, seed, last=step >= last_step)
            if is_main() and args.save_models:
                model.save_pretrained(point_dir / "model")
                lm.tokenizer.save_pretrained(point_dir / "model")
            return result

        result = _scored_point(lm, model, seed_dir, seed, step, score)
        if not args.keep_datastores and is_main():
            shutil.rmtree(point_dir / "datastore", ignore_errors=True)
            shutil.rmtree(point_dir / "memory", ignore_errors=True)
        world = rank_and_world()[1]
        if world > 1:  # every process returns the record the main one wrote
            barrier(world)
            result = read_json(point_dir.with_suffix(".json"))
        return _compact(result)

    return on_eval


def _compact(result: dict) -> dict:
    """What the trainer's history (and its log line) keeps of an evaluation point: the average over groups of each
    split and method at the first λ; the full summaries stay in the point's JSON file."""
    out = {"n_keys": result["n_keys"], "eval_s": result["time_s"]["total"]}
    for split, s in result["splits"].items():
        for m in METHODS:
            summary = s["lm"] if m == "lm" else next(iter(s[m].values()), None)
            if summary is not None:
                out[f"{split}_{m}"] = summary["avg_groups"]
    return out


# ---------------------------------------------------------------------------------------------------------------- seeds
# the fields of a finished run's record (seed-S/history.json, seed-S/bare/history.json) that aggregating seeds indexes
RECORD_FIELDS = ("seed", "history", "n_train", "wall_s")


def run_seed(args: OverspecArgs, seed: int, out: Path) -> dict:
    """Trains and evaluates one seed (resuming) on its village, whose children's names are single tokens under the
    model's tokenizer; -> its record: {"seed", "history", "n_train", "steps", "wall_s"}."""
    from ...macondo.generate import generate_macondo, read_split

    seed_dir = seed_path(out, seed)
    done = seed_dir / "history.json"
    if done.is_file():
        log.info("seed %d: finished earlier (%s)", seed, done)
        return read_finished(done, RECORD_FIELDS)
    started = time.time()
    seed_dir.mkdir(parents=True, exist_ok=True)
    data, world = seed_dir / "data", rank_and_world()[1]
    if is_main():  # the initial weights (scratch), the tokenizer and the village, written once; the others read them
        lm = build_lm(args, seed, seed_dir)
        tokenizer_dir = out / "tokenizer"
        if not (tokenizer_dir / "tokenizer_config.json").is_file():
            from ...assets import atomic_dir

            with atomic_dir(tokenizer_dir) as tmp:
                lm.tokenizer.save_pretrained(tmp)
        if not (data / "meta.json").is_file():  # else generated by an earlier session of this run
            generate_macondo(args.macondo_args(seed, str(data), str(tokenizer_dir.resolve())))
    barrier(world)
    if not is_main():
        lm = build_lm(args, seed, seed_dir)
    rows = read_split(data, "train")
    on_eval = make_on_eval(lm, args, data, seed_dir, seed, total_steps(args, len(rows)))
    return _train_run(lm, rows, args, seed, seed_dir, on_eval, started, ("splits",), ("lls", "mlp_training"))


def _train_run(lm, rows: list[dict], args: OverspecArgs, seed: int, run_dir: Path, on_eval, started: float,
               per_point: tuple, last_point: tuple) -> dict:
    """Trains ``lm`` on ``rows`` (resuming from ``run_dir/ckpt``), evaluating with ``on_eval``, which saves each point
    to ``run_dir/evals/step-<N>.json``; -> the finished run's record {"seed", "n_train", "steps", "history",
    "steps_per_epoch", "wall_s"}: each history entry with the ``per_point`` keys of its point's file, the last one also with the
    ``last_point`` ones. The record marks the run finished for a rerun (``study.finish_run``)."""
    from ...train import train

    desc = f"seed {seed}" + (" bare" if run_dir.name == "bare" else "")
    history = train(lm.model, make_batches(lm, rows, args.batch_size), args.train_args(seed), run_dir / "ckpt",
                    eval_every=args.eval_every, on_eval=on_eval, progress_desc=desc, checkpoint_ends=False)
    # A point scored before the checkpoint this run resumed from is not scored again while the checkpoint is there;
    # trained again from step 0, the run scores a deleted point again and reuses the others where the weights match.
    restart = f"the checkpoint {run_dir / 'ckpt'}: {desc} is then trained again from step 0"
    for entry in history:
        path = eval_dir(run_dir, entry["step"]).with_suffix(".json")
        if not path.is_file():
            raise KnnlmError(f"{path} is missing; delete {restart}")
        saved = read_record(path, fix=f"delete it and {restart}", required=per_point)
        entry.update({k: saved[k] for k in per_point})
    history[-1].update({k: saved[k] for k in last_point if k in saved})
    record = {"seed": seed, "n_train": len(rows), "steps": history[-1]["step"], "history": history,
              "steps_per_epoch": steps_per_epoch(len(rows), args.batch_size, args.gradient_accumulation_steps,
                                                 rank_and_world()[1]),
              "wall_s": round(time.time() - started, 3)}
    return finish_run(run_dir / "history.json", record, run_dir / "ckpt", write=is_main())


def run_bare_seed(args: OverspecArgs, seed: int, out: Path) -> dict:
    """The bare-trained reference of one seed (resuming): the same model, initialisation and training settings as the
    seed's over-specified run, trained on :func:`bare_training_rows` (as many sentences, so as many steps, and the same
    data-order seed); at the same evaluation steps the test split is scored vanilla. -> {"seed", "history",
    "n_train", "steps", "wall_s"}; the last history entry carries the per-row test scores ("lls")."""
    from ...macondo.generate import read_split
    from ...macondo.score import score_split, summarize

    seed_dir = seed_path(out, seed)
    bare_dir = seed_dir / "bare"
    done = bare_dir / "history.json"
    if done.is_file():
        return read_finished(done, RECORD_FIELDS)
    started = time.time()
    data = seed_dir / "data"
    rows = bare_training_rows(data, args.examples_per_child)
    n_over = len(read_split(data, "train"))
    if len(rows) != n_over:  # same number of sentences -> same batches per epoch and optimizer steps
        raise KnnlmError(f"--bare_reference: {len(rows)} bare sentences but {n_over} over-specified ones in {data}")
    test = read_split(data, "test")
    lm = build_lm(args, seed, seed_dir)  # the same initial weights (scratch: seed-S/init; LoRA: seeded adapters)

    def score(point) -> dict:
        lls = score_split(point, test, batch_size=args.eval_batch_size)["lm"]
        return {"lls": lls, "summary": summarize(test, lls)}

    def on_eval(step: int, model) -> dict:
        return {"test_bare": _scored_point(lm, model, bare_dir, seed, step, score)["summary"]["avg_groups"]}

    return _train_run(lm, rows, args, seed, bare_dir, on_eval, started, ("summary",), ("lls",))


def run_study(args: OverspecArgs) -> dict:
    """Runs every seed (resuming), aggregates, writes results.json, results.md and the PNGs;
    -> ``{"results": path, "table": path, "plots": [paths], "metrics": metrics}``."""
    from ...config import save_config

    started = time.time()
    out = Path(args.output_dir)
    _, world = start_group()
    if world > 1 and args.mlp_memory:  # (its training would wait on processes that do not train it)
        raise KnnlmError("--mlp_memory: the memory is trained by one process, which several cannot run yet; run this "
                         "study as one process, or pass --mlp_memory false")
    if is_main():  # one process claims the folder (a second claim would be refused as the folder's other writer)
        claim_output_dir(out, "overspec run", {}, own_files=OWN_FILES)  # a model, a datastore, another run: refused
        check_resumable(out, args, _FREE_KEYS)  # (its own earlier run: the settings must match)
        save_config(out, args)
    barrier(world)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    records, bare = [], []
    for i, seed in enumerate(args.seeds):
        log.info("seed %d (%d of %d)", seed, i + 1, len(args.seeds))
        records.append(run_seed(args, seed, out))
        if args.bare_reference:
            log.info("seed %d: the bare-trained reference", seed)
            bare.append(run_bare_seed(args, seed, out))
    metrics = aggregate(records, args, bare or None)
    if not is_main():
        return {"metrics": metrics}
    paths = write_outputs(out, args, metrics, started)
    return {**paths, "metrics": metrics}
