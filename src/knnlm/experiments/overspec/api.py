"""Macondo-Conv with an API model (the paper's §4.4; docs/overspec_api.md): per seed a village, with ``--submit`` a
fine-tuning job through an OpenAI-compatible API (kept in ``OUT/seed-<S>/job.json``, so a rerun waits for the same job
instead of paying for a new one), then each target's log-likelihood from the echoed prompt log-probs of
``/v1/completions`` (vLLM, ``knnlm serve``), cached per seed and split."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from ...config import changed_fields
from ...errors import KnnlmError, require_finite, require_seed
from ...fileio import atomic_write_json, claim_output_dir, reusable, sha256_file
from ...macondo.generate import MacondoArgs
from ...openai_client import finetune as finetune_job, make_client, score_rows
from ..study import mean_std, mirror, seed_path

_SPLITS = ("train", "test", "test_overspecified")
# a job fine-tunes on chat messages, which the server renders with the model's chat template; /v1/completions scores
# the raw text, so a --submit run's scores are of a format the model was not trained on (the job's valid_loss is not)
FORMAT_NOTE = ("the fine-tuned models learned the chat messages (the server's chat template) but are scored on the "
               "plain 'User: … Assistant: [child]' text through /v1/completions, a format they were not trained on; "
               "the jobs' valid_loss is the chat-format reading")
_FINE_TUNE_FIELDS = ("training_file", "validation_split", "n_epochs", "poll_s")  # read only by a --submit job
TOKENIZER = "tiktoken:cl100k_base"  # GPT-3.5's, under which the paper's names are single tokens


@dataclass
class ApiArgs:
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={"help": "OpenAI-compatible API root (…/v1) used for fine-tuning and scoring: https://api.openai.com/v1, a vLLM server, `knnlm serve`."})
    model: list[str] = field(default_factory=list, metadata={"help": "With --submit: the base model to fine-tune (e.g. gpt-4o-mini-2024-07-18). Without: the fine-tuned model to score, one per seed (comma-separated, in seed order)."})
    api_key: Optional[str] = field(default=None, metadata={"help": "API key (default: $OPENAI_API_KEY, else 'EMPTY' for local servers). Never written to config.json."})
    data: Optional[str] = field(default=None, metadata={"help": "A Macondo-Conv folder (generated there with the seed when absent); only with one seed. Default: OUT/seed-<S>/data per seed."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Village seeds, one fine-tuned model each (the paper: 5 runs, 0,1,2,3,4)."})
    tokenizer: str = field(default=TOKENIZER, metadata={"help": "Tokenizer under which generated children's names are single tokens (the paper: tiktoken, GPT-3.5's cl100k_base)."})
    control_holdout: Literal["pair", "parent"] = mirror(MacondoArgs, "control_holdout")
    splits: list[str] = field(default_factory=lambda: ["test", "test_overspecified"], metadata={"help": "Splits to score (test: the paper's; test_overspecified: the control). Empty with --submit: fine-tune only (for an API without prompt log-probs, e.g. OpenAI's; the job's metrics.csv then holds the train/validation loss)."})
    submit: bool = field(default=False, metadata={"help": "Upload the training file, start a fine-tuning job of --model, wait for it and score the result (costs money on a paid API)."})
    training_file: str = field(default="train", metadata={"help": "What --submit trains on: a split of the village (train; test gives the paper's grey 'trained on test' line) or a chat JSONL path."})
    validation_split: Optional[str] = field(default="test", metadata={"help": "Split uploaded as the job's validation file, so the job's metrics record test loss during training (the paper's Figure 2); empty to skip."})
    n_epochs: int = field(default=0, metadata={"help": "Fine-tuning epochs (0: the API's default, 'auto')."})
    poll_s: float = field(default=30.0, metadata={"help": "Seconds between status checks of a fine-tuning job."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per /v1/completions request when scoring."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for results.json, results.md, config.json and per-seed jobs/scores (required)."})

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder for results.json and the per-seed job state")
        if not self.base_url.startswith(("http://", "https://")):
            raise KnnlmError(f"--base_url: {self.base_url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000/v1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise KnnlmError(f"--seeds: need one or more distinct seeds, got {self.seeds}")
        for seed in self.seeds:
            require_seed("seeds", seed)
        if self.data and len(self.seeds) > 1:
            raise KnnlmError("--data: names one village; pass one --seeds value, or leave --data unset to generate one "
                             "village per seed")
        if any(not m.strip() for m in self.model):  # an empty name was sent to the server after the village was made
            raise KnnlmError(f"--model: an empty model name in {','.join(self.model)!r}; name the model(s) to score, "
                             "comma-separated")
        if self.submit and len(self.model) != 1:
            raise KnnlmError("--model: with --submit, name exactly one base model to fine-tune")
        if not self.submit and len(self.model) != len(self.seeds):
            raise KnnlmError(f"--model: give one fine-tuned model per seed ({len(self.seeds)} seed(s), {len(self.model)} "
                             "model(s)), comma-separated in seed order, or pass --submit to fine-tune one")
        if not self.submit:  # no job is started: they would be recorded in config.json as if one had been
            moved = changed_fields(self, _FINE_TUNE_FIELDS)
            if moved:
                raise KnnlmError(f"--{moved[0]}: a fine-tuning setting, which acts only with --submit true; pass it, "
                                 f"or drop --{moved[0]}")
        self.splits = [s for s in self.splits if s]
        unknown = [s for s in self.splits if s not in _SPLITS]
        if unknown or not (self.splits or self.submit):
            raise KnnlmError(f"--splits: {', '.join(unknown) or 'none given'}; choose from {', '.join(_SPLITS)} (an "
                             "empty list only with --submit)")
        if self.validation_split and self.validation_split not in _SPLITS:
            raise KnnlmError(f"--validation_split: {self.validation_split!r} is not one of {', '.join(_SPLITS)}")
        if self.control_holdout not in ("pair", "parent"):
            raise KnnlmError(f"--control_holdout: {self.control_holdout!r} is not one of pair, parent")
        if self.n_epochs < 0:
            raise KnnlmError("--n_epochs: must be >= 0 (0 lets the API choose)")
        require_finite("poll_s", self.poll_s)  # NaN and inf passed `<= 0`: time.sleep raised after the job started
        if self.batch_size < 1:
            raise KnnlmError("--batch_size: must be >= 1")

    def public(self) -> "ApiArgs":
        """A copy safe to write to disk: the key is masked."""
        return dataclasses.replace(self, api_key="***" if self.api_key else None)


# ------------------------------------------------------------------------------------------------------------ data
def ensure_village(data: Path, seed: int, args: ApiArgs) -> dict:
    """The meta.json of the Macondo-Conv village in ``data``, generated there with ``seed`` when the folder holds none."""
    from ...macondo.generate import TEMPLATES, generate_macondo, read_meta

    if not (data / "meta.json").is_file():
        generate_macondo(MacondoArgs(output_dir=str(data), seed=seed, tokenizer=args.tokenizer, format="conv",
                                     control_holdout=args.control_holdout))
    meta = read_meta(data)
    if meta.get("format") not in TEMPLATES:  # e.g. a datastore's meta.json
        raise KnnlmError(f"--data: {data} is not a Macondo village (its meta.json is not `knnlm macondo generate`'s); "
                         "pass a folder from `knnlm macondo generate --format conv`")
    if meta.get("format") != "conv":
        raise KnnlmError(f"--data: {data} holds a {meta.get('format')!r} Macondo village; this study needs "
                         "`knnlm macondo generate --format conv`")
    return meta


def check_village(meta: dict, data: Path, args: ApiArgs) -> None:
    """A village that exists keeps its own tokenizer and control holdout (recorded as the run's ``village_tokenizer``
    and ``village_control_holdout``): one made with another than an explicit --tokenizer / --control_holdout (--data),
    or this run's own village made with another (a rerun), is refused rather than scored as if it were the one asked
    for."""
    default = {f.name: f.default for f in dataclasses.fields(ApiArgs)}
    for flag, theirs in (("tokenizer", meta.get("tokenizer")), ("control_holdout", village_holdout(meta))):
        ours = getattr(args, flag)
        if theirs == ours or (args.data and ours == default[flag]):
            continue
        fix = (f"drop --{flag} (the village's own is used)" if args.data else
               f"pass --{flag} {theirs} to resume this run, or use another --output_dir")
        raise KnnlmError(f"--{flag}: the village in {data} was made with {theirs!r}, not {ours!r}; {fix}")


def village_holdout(meta: dict) -> str:
    """The control holdout a village was made with (villages made before the setting existed: pair)."""
    return meta.get("config", {}).get("control_holdout", "pair")


# ------------------------------------------------------------------------------------------------------------ fine-tune
def finetune(client, args: ApiArgs, data: Path, run_dir: Path, seed: int,
             sleep: Callable[[float], None] = time.sleep) -> dict:
    """The fine-tuning job of one seed on the village in ``data`` (``openai_client.finetune``, resumable through
    ``run_dir/job.json``); -> its state (with ``fine_tuned_model``)."""
    train = data / f"{args.training_file}_chat.jsonl" if args.training_file in _SPLITS else Path(args.training_file)
    if not train.is_file():
        raise KnnlmError(f"--training_file: {train} does not exist; pass a split name ({', '.join(_SPLITS)}) of a "
                         "Macondo-Conv village or a chat JSONL file")
    valid = data / f"{args.validation_split}_chat.jsonl" if args.validation_split else None
    return finetune_job(client, args.base_url, args.model[0], train, valid, args.n_epochs, seed, run_dir, args.poll_s,
                        f"seed {seed}: ", sleep)


def score_split_cached(client, args: ApiArgs, model: str, data: Path, split: str, run_dir: Path, label: str) -> dict:
    """Scores of one split (cached in ``run_dir/scores_<split>.json`` per model and split file)."""
    from ...macondo.generate import read_split

    path = run_dir / f"scores_{split}.json"
    key = {"model": model, "split_sha256": sha256_file(data / f"{split}.jsonl")}
    cached = reusable(path, key)
    if cached is not None:
        return cached
    rows = read_split(data, split)
    scores = score_rows(client, args.base_url, model, rows, args.batch_size, label)
    examples = [{"parent": r["parent"], "target": r["target"], "n_children": r["n_children"], **s}
                for r, s in zip(rows, scores)]
    result = {"key": key, "examples": examples}
    atomic_write_json(path, result)
    return result


# ------------------------------------------------------------------------------------------------------------ study
def run_study(args: ApiArgs) -> dict:
    """:func:`run_api`, then ``config.json`` (no API key), ``results.json`` and ``results.md`` in ``--output_dir``;
    -> {"metrics": ..., "table": the markdown text, "results": path of results.json}."""
    from ...config import save_config, to_dict
    from ...report import finish_outputs

    started = time.time()
    metrics = run_api(args)
    out = Path(args.output_dir)
    save_config(out, args.public())
    table = results_table(metrics)
    results = finish_outputs(out, to_dict(args.public()), metrics, table, started)
    return {"metrics": metrics, "table": table, "results": results}


def run_api(args: ApiArgs) -> dict:
    """The whole study; returns the metrics written to ``results.json`` (one entry per seed, mean and std over seeds)."""
    from ...macondo.score import summarize

    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if not key and urllib.parse.urlsplit(args.base_url).hostname == "api.openai.com":  # else a 401 after the village
        raise KnnlmError(f"--api_key: {args.base_url} needs a key; pass --api_key or set $OPENAI_API_KEY")
    out = Path(args.output_dir)  # a file, a model, a datastore, another command's run: refused before any work
    claim_output_dir(out, "overspec api", {}, own_files=("config.json", "results.json", "results.md", "seed-*"))
    client = make_client(args.base_url, key or "EMPTY")
    runs = []
    for i, seed in enumerate(args.seeds):
        run_dir = seed_path(out, seed)
        data = Path(args.data) if args.data else run_dir / "data"
        meta = ensure_village(data, seed, args)  # (a --data refused here leaves no seed folder)
        check_village(meta, data, args)
        run_dir.mkdir(parents=True, exist_ok=True)
        job = finetune(client, args, data, run_dir, seed) if args.submit else None
        model = job["fine_tuned_model"] if job else args.model[i]
        run = {"seed": seed, "model": model, "data": str(data), "village_seed": meta["seed"],
               "village_tokenizer": meta["tokenizer"], "village_control_holdout": village_holdout(meta), "job": job,
               "splits": {}}
        for split in args.splits:
            ex = score_split_cached(client, args, model, data, split, run_dir, f"seed {seed} {split}")["examples"]
            summary = summarize(ex, [e["ll"] for e in ex])
            run["splits"][split] = {"summary": summary, "n_examples": len(ex),
                                    "straddled": sum(e["straddle"] for e in ex)}
        runs.append(run)
    metrics = {"runs": runs, "over_seeds": _over_seeds(runs, args.splits)}
    if args.submit and args.splits:
        metrics["format_note"] = FORMAT_NOTE
    return metrics


def _over_seeds(runs: list[dict], splits: list[str]) -> dict:
    """Mean and sample std over seeds of every group mean, per split (``knnlm.experiments.study.mean_std``: std None
    with one seed)."""
    agg = {}
    for split in splits:
        summaries = [r["splits"][split]["summary"] for r in runs]
        keys = [k for k in summaries[0] if isinstance(summaries[0][k], float)]
        stats = {k: mean_std(s[k] for s in summaries) for k in keys}
        agg[split] = {"mean": {k: mu for k, (mu, _) in stats.items()}, "std": {k: sd for k, (_, sd) in stats.items()},
                      "optimum": summaries[0]["optimum"], "count": summaries[0]["count"]}
    return agg


def results_table(metrics: dict) -> str:
    """The Macondo table (``knnlm.macondo.score.table``) with one column per split (mean ± std over seeds when there
    are several)."""
    from ...macondo.score import table
    from ...report import pm

    agg, runs = metrics["over_seeds"], metrics["runs"]
    jobs = jobs_table(runs)
    if not agg:
        return jobs
    first = next(iter(agg.values()))

    def cell(split: str, key: str) -> str:  # mean ± std over seeds (the mean alone for one seed)
        return pm(agg[split]["mean"].get(key, math.nan), agg[split]["std"].get(key))

    columns = {s: functools.partial(cell, s) for s in agg}
    models = ", ".join(f"seed {r['seed']}: {r['model']}" for r in runs)
    note = f"{len(runs)} seed(s), mean ± std over seeds" if len(runs) > 1 else "1 seed"
    caveat = f"Note: {metrics['format_note']}.\n\n" if metrics.get("format_note") else ""
    return (f"Macondo-Conv: mean log-likelihood of the children's names ({note}; {models})\n\n" + caveat
            + table(first["count"], first["optimum"], columns) + (f"\n{jobs}" if jobs else ""))


def jobs_table(runs: list[dict]) -> str:
    """Markdown: one row per fine-tuning job (empty without --submit), with the last train/validation loss."""
    from ...report import markdown_table

    jobs = [(r["seed"], r["job"]) for r in runs if r.get("job")]
    if not jobs:
        return ""
    rows = [[seed, job["job_id"], job["fine_tuned_model"], job.get("trained_tokens"),
             job.get("final_metrics", {}).get("train_loss"), job.get("final_metrics", {}).get("valid_loss")]
            for seed, job in jobs]
    return ("Fine-tuning jobs (last logged losses: mean token cross-entropy of the assistant messages)\n\n"
            + markdown_table(["seed", "job", "fine-tuned model", "trained tokens", "train loss", "valid loss"], rows,
                             digits=4))
