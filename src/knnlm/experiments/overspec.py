"""The over-specification study (paper §4.3, Appendix C, Figures 1 and 3, Table 5).

Per seed: a Macondo village (the seed drives the village, the model's initialisation where it is built from scratch, the
LoRA initialisation and the data order), a model fine-tuned on the over-specified training sentences with
:func:`knnlm.train.train`, and at step 0, every ``eval_every`` steps and the last step, the log-likelihood of each child's
name given the bare test prefix "[villager] is the parent of", grouped by the parent's number of children:

- (a) vanilla: the model as it is at that step;
- (b) kNN-augmented: a datastore of the current model's keys over every training-set token (rebuilt per eval point;
  each sentence its own document), interpolated with k/λ/T of the core (all keys when the store is smaller than k);
- (c) MLP memory (``--mlp_memory true``): an MLP memory trained on that datastore, interpolated with the same λ.

The control split ``test_overspecified`` (an attribute clause the pair's training sentences did not use) is scored the
same way. Mean ± std over seeds go to ``results.json``, ``results.md`` (Table 5's layout) and ``overspec.png``
(Figure 1's style).

Layout of a run folder::

    config.json                     the resolved config (a rerun must agree with it to resume)
    tokenizer/                      the model's tokenizer (the Macondo generator's single-token checks use it)
    seed-<S>/data/                  the village (train/test/test_overspecified JSONL, villagers.json, meta.json)
    seed-<S>/init/                  the randomly initialised model (from-scratch sizes only)
    seed-<S>/ckpt/                  the trainer's checkpoint (latest evaluation point); removed when the seed finishes
    seed-<S>/evals/step-<N>.json    one evaluation point (written atomically; reused by a resumed run when the weights
                                    hash matches)
    seed-<S>/evals/step-<N>/        its datastore, memory (and model with --save_models); removed unless kept
    seed-<S>/history.json           the finished seed: every evaluation point with the training loss
    results.json results.md overspec.png overspec_control.png

A killed run resumes from its last evaluation point: finished seeds are read back, the running seed continues from the
trainer's checkpoint, and the trainer replays the data order exactly (bit-identical weights on CPU).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from ..claims import Claim, claims_table
from ..errors import KnnlmError
from ..fileio import atomic_write_json, claim_output_dir, read_json
from ..knn import KNNArgs
from ..macondo.generate import MacondoArgs
from ..memory import MemoryArgs, last_fifth_drop
from ..models import ModelArgs
from ..stats import Interval, as_interval
from ..train import TrainArgs
from .study import check_resumable, mean_std, seed_path

log = logging.getLogger(__name__)

SPLITS = ("test", "test_overspecified", "train")  # "train": a fixed sample of the training sentences (--train_eval_per_pair)
SPLIT_TITLES = {"test": "Test split (bare statements: the paper's Table 5)",
                "test_overspecified": "Control: test_overspecified (an attribute clause the pair's training sentences did not use)",
                "train": "Training split (a fixed sample of the training sentences: has the model fitted its data?)"}
METHODS = ("lm", "knn", "mlp")
METHOD_NAMES = {"lm": "vanilla", "knn": "kNN", "mlp": "MLP", "bare": "bare-trained"}
# LoRA targets per architecture: embeddings, attention q/k/v/o and every MLP projection (the paper's Mistral setting).
LORA_TARGETS = {
    "gpt2": ["wte", "c_attn", "c_proj", "c_fc"],  # c_attn: fused q/k/v; c_proj: attention output and MLP down
    "llama": ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["embed_in", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _mirror(cls, name: str, default=dataclasses.MISSING, help: str | None = None, deprecated: tuple = ()):
    """A field that mirrors ``cls.name``: same default (unless given) and help text (unless given); ``deprecated``: its
    own old names (``knnlm.config``)."""
    src = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = {"help": help or src.metadata["help"], **({"deprecated": deprecated} if deprecated else {})}
    if default is dataclasses.MISSING:
        if src.default_factory is not dataclasses.MISSING:
            return field(default_factory=src.default_factory, metadata=meta)
        default = src.default
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------- config
@dataclass
class OverspecArgs:
    # model
    model_name_or_path: str = field(default="gpt2", metadata={"help": "The model to fine-tune: a hub id or local folder (the paper: gpt2, gpt2-xl, mistralai/Mistral-7B-v0.1), smollm2-135m (offline), or a from-scratch GPT-2 size (tiny, small, gpt2-small), randomly initialised with each seed."})
    revision: Optional[str] = _mirror(ModelArgs, "revision")
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto = float32 master weights when every weight trains (bf16 autocast on a GPU, see --bf16), the model's bfloat16 on a GPU for the frozen base of --lora; or float32, bfloat16, float16."})
    device: str = _mirror(ModelArgs, "device")
    # seeds and village
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds (comma list), one run each; a seed drives its Macondo village and its training (the paper: 5 seeds)."})
    num_villagers: int = _mirror(MacondoArgs, "num_villagers")
    num_parents: int = field(default=100, metadata={"help": "Villagers who have children, shared equally over 1..--max_children children."})
    max_children: int = field(default=5, metadata={"help": "Most children of a parent (parents have 1..N)."})
    examples_per_child: int = _mirror(MacondoArgs, "examples_per_child")
    # training (knnlm.train.TrainArgs; the paper: HF Trainer defaults, AdamW, lr 1e-5, warm-up 0.05, batch 4, 50 epochs)
    learning_rate: float = _mirror(TrainArgs, "learning_rate")
    warmup_ratio: float = _mirror(TrainArgs, "warmup_ratio")
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup"] = _mirror(TrainArgs, "lr_scheduler_type")
    batch_size: int = _mirror(TrainArgs, "batch_size", help="Training sentences per micro-batch (the paper: 4); the loss covers the whole sentence.")
    gradient_accumulation_steps: int = _mirror(TrainArgs, "gradient_accumulation_steps")
    epochs: int = _mirror(TrainArgs, "epochs")
    max_steps: Optional[int] = _mirror(TrainArgs, "max_steps")
    max_grad_norm: float = _mirror(TrainArgs, "max_grad_norm")
    weight_decay: float = _mirror(TrainArgs, "weight_decay")
    bf16: Optional[bool] = _mirror(TrainArgs, "bf16")
    eval_every: int = field(default=2000, metadata={"help": "Evaluate every N optimizer steps (and at step 0 and the last step); the paper: 2000."})
    train_eval_per_pair: int = field(default=1, metadata={"help": "Training sentences per parent-child pair scored as the 'train' split at every evaluation point (each pair's first N: a fixed sample), to show whether the model fits its training data; 0 = none."})
    bare_reference: bool = field(default=False, metadata={"help": "Also train the same model (same initialisation, seed, data-order seed, batch size and number of steps) on the bare test sentences, each repeated --examples_per_child times, and score the test split with it (vanilla) at the same points: the paper's gray line (Fig. 2), the level reached when nothing is over-specified."})
    # LoRA (peft)
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of every weight (the paper's Mistral-7B setting)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (the paper: 8)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling factor alpha (the paper: 16)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (the paper: 0.05)."})
    lora_targets: list[str] = field(default_factory=list, metadata={"help": "Module names that get adapters; empty = the embeddings, attention q/k/v/o and every MLP projection of the architecture (gpt2: wte,c_attn,c_proj,c_fc; llama/mistral: embed_tokens,q/k/v/o_proj,gate/up/down_proj; gpt_neox: embed_in,query_key_value,dense,dense_h_to_4h,dense_4h_to_h)."})
    # kNN
    k: int = _mirror(KNNArgs, "k")
    lmbda: list[float] = _mirror(KNNArgs, "lmbda", help="Weight of p_knn (and of the MLP memory) in the interpolation; a comma list scores several from one pass (tables and plot use the first).")
    knn_temp: float = _mirror(KNNArgs, "knn_temp")
    key_point: str = field(default="ffn_input", metadata={"help": "Hidden state used as datastore key (and MLP memory input): ffn_input, ffn_residual, block_output, final_hidden."})
    # MLP memory
    mlp_memory: bool = field(default=True, metadata={"help": "Also train an MLP memory on each evaluation point's datastore and score the MLP-augmented model (costs time)."})
    mlp_hidden_size: int = _mirror(MemoryArgs, "hidden_size")
    mlp_learning_rate: float = _mirror(MemoryArgs, "learning_rate", deprecated=("mlp_lr",))
    mlp_epochs: int = _mirror(MemoryArgs, "epochs", default=10, help="Passes of the MLP memory over the datastore (the paper: 10 for Macondo).")
    mlp_batch_tokens: int = _mirror(MemoryArgs, "batch_tokens")
    mlp_at: Literal["every", "last"] = field(default="every", metadata={"help": "Evaluation points that train and score an MLP memory: every point, or only the last (cheaper, for a memory trained long enough to plateau)."})
    # evaluation and output
    eval_batch_size: int = field(default=32, metadata={"help": "Sentences per forward pass when building datastores and scoring."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Run folder: villages, checkpoints, results.json, results.md, PNGs (required). A rerun resumes it."})
    keep_datastores: bool = field(default=False, metadata={"help": "Keep each evaluation point's datastore and MLP memory (seed-S/evals/step-N/); by default they are removed once scored."})
    save_models: bool = field(default=False, metadata={"help": "Save each evaluation point's model (save_pretrained; the adapter with --lora) into seed-S/evals/step-N/model."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})

    # ------------------------------------------------------------------------------------------------------------ derived
    @property
    def scratch(self) -> bool:
        """True when --model_name_or_path names a from-scratch GPT-2 size (and no folder of that name exists)."""
        from ..assets import SCRATCH_SIZES

        return self.model_name_or_path in SCRATCH_SIZES and not Path(self.model_name_or_path).exists()

    def train_args(self, seed: int):
        names = ("learning_rate", "warmup_ratio", "lr_scheduler_type", "batch_size", "gradient_accumulation_steps",
                 "epochs", "max_steps", "max_grad_norm", "weight_decay", "bf16")
        return TrainArgs(**{n: getattr(self, n) for n in names}, seed=seed)

    def knn_args(self):
        return KNNArgs(k=self.k, lmbda=list(self.lmbda), knn_temp=self.knn_temp)

    def macondo_args(self, seed: int, output_dir: str, tokenizer: str):
        return MacondoArgs(output_dir=output_dir, seed=seed, tokenizer=tokenizer, format="plain",
                           num_villagers=self.num_villagers, num_parents=self.num_parents, min_children=1,
                           max_children=self.max_children, examples_per_child=self.examples_per_child)

    def memory_args(self, datastore: str, output_dir: str, seed: int):
        return MemoryArgs(datastore=datastore, output_dir=output_dir, hidden_size=self.mlp_hidden_size,
                          learning_rate=self.mlp_learning_rate,
                          epochs=self.mlp_epochs, batch_tokens=self.mlp_batch_tokens,
                          micro_batch_tokens=min(1024, self.mlp_batch_tokens), seed=seed, overwrite=True)

    def validate(self) -> None:
        from ..models import KEY_POINTS

        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the run folder for checkpoints and results")
        if not self.model_name_or_path:
            raise KnnlmError("--model_name_or_path: required (a hub id, a local folder, smollm2-135m, tiny or small)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise KnnlmError(f"--seeds: need one or more distinct seeds >= 0, got {self.seeds}")
        if self.eval_every < 1:
            raise KnnlmError(f"--eval_every: must be >= 1, got {self.eval_every}")
        if self.eval_batch_size < 1 or self.num_threads < 0:
            raise KnnlmError("--eval_batch_size/--num_threads: must be >= 1 / >= 0")
        if self.key_point not in KEY_POINTS:
            raise KnnlmError(f"--key_point: {self.key_point!r} is not one of {', '.join(KEY_POINTS)}")
        if not self.lmbda:
            raise KnnlmError("--lmbda: give at least one weight in [0, 1], e.g. 0.25")
        if self.lora_r < 1 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise KnnlmError(f"--lora_r/--lora_alpha/--lora_dropout: need r >= 1, alpha > 0, 0 <= dropout < 1; got "
                             f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}")
        if self.train_eval_per_pair < 0 or self.train_eval_per_pair > self.examples_per_child:
            raise KnnlmError(f"--train_eval_per_pair: must be in 0..--examples_per_child ({self.examples_per_child}), "
                             f"got {self.train_eval_per_pair}")
        if self.max_children < 1:
            raise KnnlmError(f"--max_children: must be >= 1, got {self.max_children}")
        ModelArgs(model_name_or_path=self.model_name_or_path, revision=self.revision,
                  dtype=self.dtype, device=self.device).validate()
        self.train_args(self.seeds[0]).validate()
        self.knn_args().validate()
        self.macondo_args(self.seeds[0], str(self.output_dir), "gpt2").validate()
        for name in ("mlp_hidden_size", "mlp_epochs", "mlp_batch_tokens"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if not self.mlp_learning_rate > 0:
            raise KnnlmError(f"--mlp_learning_rate: must be > 0, got {self.mlp_learning_rate}")


# Fields that do not change what a run computes: a rerun may change them and still resume.
_FREE_KEYS = ("output_dir", "seeds", "num_threads", "eval_batch_size", "keep_datastores", "save_models", "bare_reference")


# what `knnlm overspec run` writes into its folder (a folder from before the run marker holds nothing else)
OWN_FILES = ("config.json", "results.json", "results.md", "overspec*.png", "seed-*", "tokenizer")


def resolve_args(cli: dict | None = None, config_file: str | None = None) -> OverspecArgs:
    """OverspecArgs from CLI values (None = unset), a YAML/JSON config file and defaults (flag > file > default).

    Unknown config keys and bad values raise :class:`KnnlmError` here, before anything is loaded or trained.
    """
    from ..config import resolve

    return resolve(OverspecArgs, cli or {}, config_file)


# ---------------------------------------------------------------------------------------------------------------- models
def _model_dtype(args: OverspecArgs, device: torch.device) -> str:
    if args.dtype != "auto":
        return args.dtype
    if args.lora and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"  # the base is frozen; adapters stay float32 (peft autocast_adapter_dtype)
    return "float32"


def build_lm(args: OverspecArgs, seed: int, seed_dir: Path):
    """The model of one seed, ready to train: loaded (or built from scratch with the seed), LoRA-wrapped with --lora."""
    from ..assets import build_scratch_gpt2
    from ..models import LM, load_model, resolve_device

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
    from peft import LoraConfig, get_peft_model

    targets = list(args.lora_targets) or LORA_TARGETS.get(lm.model_type)
    if not targets:
        raise KnnlmError(f"--lora_targets: no default adapter targets for model_type {lm.model_type!r}; name them")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, fan_in_fan_out=lm.model_type == "gpt2", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapters' initialisation
        try:
            model = get_peft_model(lm.model, config)
        except ValueError as e:
            raise KnnlmError(f"--lora_targets: {targets} do not fit {lm.model_type} ({str(e).splitlines()[0][:160]})") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %d trainable parameters", args.lora_r, args.lora_alpha, ",".join(targets), trainable)
    return LM(model, lm.tokenizer, lm.name)


# ---------------------------------------------------------------------------------------------------------------- data
def ensure_village(args: OverspecArgs, seed: int, seed_dir: Path, tokenizer_dir: Path) -> Path:
    """Generates the seed's village (children's names single tokens under the model's tokenizer), or reuses the one a
    previous session of this run generated."""
    from ..macondo.generate import generate_macondo

    data = seed_dir / "data"
    if (data / "meta.json").is_file():
        return data
    return generate_macondo(args.macondo_args(seed, str(data), str(tokenizer_dir.resolve())))


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
    from ..macondo.generate import read_split

    rows = read_split(data, "test")
    for r in rows:
        if r["text"] != f"{r['parent']} is the parent of {r['child']}" or r.get("attribute") is not None:
            raise KnnlmError(f"--bare_reference: {data}/test.jsonl holds {r['text']!r}, not a bare statement")
    return [dict(r) for r in rows for _ in range(examples_per_child)]


def total_steps(args: OverspecArgs, n_rows: int) -> int:
    """The trainer's number of optimizer steps for ``n_rows`` sentences (one process)."""
    import math

    per_epoch = math.ceil(n_rows / args.batch_size)
    return args.max_steps or args.epochs * math.ceil(per_epoch / args.gradient_accumulation_steps)


def make_batches(lm, rows: list[dict], batch_size: int):
    """``batches(epoch, seed)`` for :func:`knnlm.train.train`: every training sentence once per epoch, in an order that
    depends only on (seed, epoch); each sentence is ``lm.encode(text)``, the loss covers all of it."""
    from ..train import collate_causal, epoch_permutation

    seqs = [lm.encode(r["text"]) for r in rows]
    pad = lm.eos_token_id if lm.eos_token_id is not None else 0

    def batches(epoch: int, seed: int) -> list[dict]:
        order = epoch_permutation(len(seqs), seed, epoch)
        return [collate_causal([seqs[i] for i in order[b: b + batch_size]], pad)
                for b in range(0, len(order), batch_size)]

    return batches


# ---------------------------------------------------------------------------------------------------------------- evaluation
def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def evaluate_point(lm, args: OverspecArgs, data: Path, point_dir: Path, seed: int, last: bool = True) -> dict:
    """Scores one evaluation point: -> {"splits": {split: summarize_scores}, "lls": {split: per-row scores}, ...}.

    Builds the datastore of the current model over every training token, trains the MLP memory on it (with
    --mlp_memory; with --mlp_at last only when ``last``), and scores the test and control splits and the training
    sample (--train_eval_per_pair) vanilla / kNN / MLP; the training sample's vanilla summary carries "optimum_fit".
    """
    from ..corpus import CorpusArgs
    from ..knn import Retriever
    from ..macondo.generate import read_split
    from ..macondo.score import fit_optimum, score_split, summarize_scores
    from ..memory import train_memory

    t0 = time.time()
    corpus = CorpusArgs(train_file=str(data / "train.jsonl"), concat_documents=False)
    ds = build_datastore_point(lm, corpus, point_dir / "datastore", args)
    t_ds = time.time() - t0
    rank, world = _rank_world()
    if rank != 0:
        return {}
    memory = None
    if args.mlp_memory and (last or args.mlp_at == "every"):
        with torch.enable_grad():  # the trainer evaluates under no_grad
            memory = train_memory(lm, ds, args.memory_args(str(ds.dir), str(point_dir / "memory"), seed))
    t_mem = time.time() - t0 - t_ds
    retriever = Retriever(ds, args.knn_args())
    out = {"n_keys": ds.N, "splits": {}, "lls": {}}
    if memory is not None:  # the memory's loss curve over all datastore pairs (does it plateau?)
        rec = read_json(point_dir / "memory" / "train.json")
        out["mlp_training"] = {k: rec[k] for k in ("steps", "first_loss", "final_loss", "loss_curve")}
    all_train = read_split(data, "train")
    for split in SPLITS:
        if split == "train" and not args.train_eval_per_pair:
            continue
        rows = train_sample(all_train, args.train_eval_per_pair) if split == "train" else read_split(data, split)
        lls = score_split(lm, rows, retriever=retriever, knn=args.knn_args(), memory=memory,
                          batch_size=args.eval_batch_size)
        out["lls"][split] = {"lm": lls["lm"], "mem": lls["mem"],
                             **{m: {str(lam): v for lam, v in lls[m].items()} for m in ("knn", "mlp")}}
        out["lls"][split]["n_children"] = [int(r["n_children"]) for r in rows]
        out["splits"][split] = summarize_scores(rows, lls, fit_optimum(rows, all_train) if split == "train" else None)
    out["time_s"] = {"datastore": round(t_ds, 3), "mlp_memory": round(t_mem, 3),
                     "total": round(time.time() - t0, 3)}
    return out


def build_datastore_point(lm, corpus, ds_dir: Path, args: OverspecArgs):
    from ..datastore import build_datastore

    return build_datastore(lm, corpus, ds_dir, key_point=args.key_point, batch_size=args.eval_batch_size,
                           overwrite=True)


def make_on_eval(lm, args: OverspecArgs, data: Path, seed_dir: Path, seed: int, last_step: int | None = None):
    """``on_eval(step, model)`` for the trainer: scores the point (or reuses its saved result when the weights match)
    and returns the compact metrics stored in the trainer's history."""
    from ..models import LM

    evals = seed_dir / "evals"

    def on_eval(step: int, model) -> dict:
        point = lm if model is lm.model else LM(model, lm.tokenizer, lm.name)  # one LM: its hashes are cached
        path = evals / f"step-{step:07d}.json"
        weights = point.weights_hash()
        if path.is_file():
            saved = read_json(path)
            if saved.get("weights_hash") == weights:
                log.info("seed %d step %d: reusing %s", seed, step, path)
                return _compact(saved)
            log.warning("seed %d step %d: %s was scored with other weights; scoring again", seed, step, path)
        point_dir = evals / f"step-{step:07d}"
        result = evaluate_point(point, args, data, point_dir, seed, last=last_step is None or step >= last_step)
        rank, world = _rank_world()
        if rank == 0:
            result.update(step=step, seed=seed, weights_hash=weights)
            if args.save_models:
                model.save_pretrained(point_dir / "model")
                lm.tokenizer.save_pretrained(point_dir / "model")
            atomic_write_json(path, result)
            if not args.keep_datastores:
                shutil.rmtree(point_dir / "datastore", ignore_errors=True)
                shutil.rmtree(point_dir / "memory", ignore_errors=True)
        if world > 1:
            torch.distributed.barrier()
            result = read_json(path)
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
def run_seed(args: OverspecArgs, seed: int, out: Path) -> dict:
    """Trains and evaluates one seed (resuming); -> its record: {"seed", "history", "n_train", "steps", "wall_s"}."""
    from ..macondo.generate import read_split
    from ..train import train

    seed_dir = seed_path(out, seed)
    done = seed_dir / "history.json"
    if done.is_file():
        log.info("seed %d: finished earlier (%s)", seed, done)
        return read_json(done)
    started = time.time()
    seed_dir.mkdir(parents=True, exist_ok=True)
    lm = build_lm(args, seed, seed_dir)
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        from ..assets import atomic_dir

        with atomic_dir(tokenizer_dir) as tmp:
            lm.tokenizer.save_pretrained(tmp)
    data = ensure_village(args, seed, seed_dir, tokenizer_dir)
    rows = read_split(data, "train")
    targs = args.train_args(seed)
    last = total_steps(args, len(rows))
    history = train(lm.model, make_batches(lm, rows, args.batch_size), targs, seed_dir / "ckpt",
                    eval_every=args.eval_every, on_eval=make_on_eval(lm, args, data, seed_dir, seed, last),
                    progress_desc=f"seed {seed}")
    for entry in history:  # the full summaries of each point, from its file; per-row scores of the last point
        saved = read_json(seed_dir / "evals" / f"step-{entry['step']:07d}.json")
        entry["splits"] = saved["splits"]
    history[-1]["lls"] = saved["lls"]
    if "mlp_training" in saved:
        history[-1]["mlp_training"] = saved["mlp_training"]
    return _finish_run(done, seed, len(rows), history, started)


def _finish_run(done: Path, seed: int, n_train: int, history: list, started: float) -> dict:
    """The record of a finished training run (over-specified or bare): written to ``done``, which marks the run as
    finished for a rerun, then the run's checkpoints beside it are removed."""
    record = {"seed": seed, "n_train": n_train, "steps": history[-1]["step"], "history": history,
              "wall_s": round(time.time() - started, 3)}
    if _rank_world()[0] == 0:
        atomic_write_json(done, record)
        shutil.rmtree(done.parent / "ckpt", ignore_errors=True)
    return record


def run_bare_seed(args: OverspecArgs, seed: int, out: Path) -> dict:
    """The bare-trained reference of one seed (resuming): the same model, initialisation and training settings as the
    seed's over-specified run, trained on :func:`bare_training_rows` (as many sentences, so as many steps, and the same
    data-order seed); at the same evaluation steps the test split is scored vanilla. -> {"seed", "history",
    "n_train", "steps", "wall_s"}; the last history entry carries the per-row test scores ("lls")."""
    from ..macondo.generate import read_split
    from ..macondo.score import score_split, summarize
    from ..models import LM
    from ..train import train

    seed_dir = seed_path(out, seed)
    bare_dir = seed_dir / "bare"
    done = bare_dir / "history.json"
    if done.is_file():
        return read_json(done)
    started = time.time()
    data = seed_dir / "data"
    rows = bare_training_rows(data, args.examples_per_child)
    n_over = len(read_split(data, "train"))
    if len(rows) != n_over:  # same number of sentences -> same batches per epoch and optimizer steps
        raise KnnlmError(f"--bare_reference: {len(rows)} bare sentences but {n_over} over-specified ones in {data}")
    test = read_split(data, "test")
    lm = build_lm(args, seed, seed_dir)  # the same initial weights (scratch: seed-S/init; LoRA: seeded adapters)
    evals = bare_dir / "evals"

    def on_eval(step: int, model) -> dict:
        point = lm if model is lm.model else LM(model, lm.tokenizer, lm.name)
        path = evals / f"step-{step:07d}.json"
        weights = point.weights_hash()
        if path.is_file() and read_json(path).get("weights_hash") == weights:
            saved = read_json(path)
        else:
            lls = score_split(point, test, batch_size=args.eval_batch_size)["lm"]
            saved = {"step": step, "seed": seed, "weights_hash": weights, "lls": lls,
                     "summary": summarize(test, lls)}
            if _rank_world()[0] == 0:
                atomic_write_json(path, saved)
        return {"test_bare": saved["summary"]["avg_groups"]}

    history = train(lm.model, make_batches(lm, rows, args.batch_size), args.train_args(seed), bare_dir / "ckpt",
                    eval_every=args.eval_every, on_eval=on_eval, progress_desc=f"seed {seed} bare")
    for entry in history:
        saved = read_json(evals / f"step-{entry['step']:07d}.json")
        entry["summary"] = saved["summary"]
    history[-1]["lls"] = saved["lls"]
    return _finish_run(done, seed, len(rows), history, started)


def run_study(args: OverspecArgs) -> dict:
    """Runs every seed (resuming), aggregates, writes results.json, results.md and the PNGs.

    Returns ``{"results": path, "table": path, "plots": [paths], "metrics": metrics}``.
    """
    from ..config import save_config

    started = time.time()
    out = Path(args.output_dir)
    claim_output_dir(out, "overspec run", {}, own_files=OWN_FILES)  # a model, a datastore, another run: refused
    check_resumable(out, args, _FREE_KEYS)  # (its own earlier run: the settings must match)
    save_config(out, args)
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
    if _rank_world()[0] != 0:
        return {"metrics": metrics}
    paths = write_outputs(out, args, metrics, started)
    return {**paths, "metrics": metrics}


# ---------------------------------------------------------------------------------------------------------------- aggregation
def _point_value(entry: dict, split: str, method: str, lam: str, group: str) -> Optional[float]:
    s = entry["splits"].get(split)
    if s is None:
        return None
    summary = s["lm"] if method == "lm" else s.get(method, {}).get(lam)
    return None if summary is None else summary[group]


def _intervals(records: list[dict], bare: Optional[list[dict]], methods: list[str], lam: str) -> dict:
    """Paired bootstrap intervals (``Interval.as_dict``) at the last step over seeds and examples (stratified by number
    of children) of the Average (mean of the group means): kNN/MLP − vanilla and MLP − kNN per split, bare-trained −
    vanilla and the vanilla gap to log(1/n) on the test split."""
    from ..stats import hierarchical_bootstrap, paired_bootstrap

    out: dict = {}
    lls = [r["history"][-1].get("lls") for r in records]
    if any(x is None for x in lls):
        return out
    for split in lls[0]:
        per = [x[split] for x in lls]
        strata = [x["n_children"] for x in per]
        got = {m: [x[m][lam] for x in per] for m in methods[1:] if all(x[m].get(lam) for x in per)}
        got["lm"] = [x["lm"] for x in per]
        pairs = [(m, "lm") for m in methods[1:]] + [("mlp", "knn")]
        out[split] = {f"{a}_minus_{b}": paired_bootstrap(got[a], got[b], strata).as_dict()
                      for a, b in pairs if a in got and b in got}
        if split == "test":
            gap = [np.log(1 / np.asarray(n, float)) - np.asarray(v) for n, v in zip(strata, got["lm"])]
            out[split]["lm_gap_to_optimum"] = hierarchical_bootstrap(gap, strata).as_dict()
            if bare:
                out[split]["bare_minus_lm"] = paired_bootstrap([b["history"][-1]["lls"] for b in bare], got["lm"],
                                                               strata).as_dict()
    return out


def _final(records: list[dict], mean: dict, methods: list[str], splits: list[str], groups: list[str], optimum: dict,
           lam: str, with_bare: bool) -> dict:
    """Per split at the last step: each method's means, gaps to log(1/n), differences from vanilla and the share of
    (seed, step > 0) points where it beats vanilla (descriptive; the claims use the intervals)."""
    final = {}
    n_steps = len(records[0]["history"])
    for split in splits:
        f = {}
        extra = ["bare"] if split == "test" and with_bare else []
        for m in methods + extra:
            if mean[split][m]["avg_groups"][-1] is None:
                continue
            f[m] = {g: mean[split][m][g][-1] for g in groups}
            f[f"{m}_gap_to_optimum"] = {g: optimum[g] - mean[split][m][g][-1] for g in groups}
        for m in [m for m in methods[1:] + extra if m in f]:
            f[f"{m}_minus_lm"] = {g: mean[split][m][g][-1] - mean[split]["lm"][g][-1] for g in groups}
            if m == "bare":
                continue
            pairs = [(_point_value(r["history"][i], split, m, lam, "avg_groups"),
                      _point_value(r["history"][i], split, "lm", lam, "avg_groups"))
                     for r in records for i in range(1, n_steps)]
            wins = [a > b for a, b in pairs if a is not None]
            f[f"{m}_beats_lm_fraction"] = sum(wins) / len(wins) if wins else None
        final[split] = f
    return final


def aggregate(records: list[dict], args: OverspecArgs, bare: Optional[list[dict]] = None) -> dict:
    """Mean and std over seeds for every (split, method, group) at every evaluation step; the bare-trained reference
    (test split, vanilla) as method "bare"; the last step's gaps, differences and bootstrap intervals."""

    steps = [e["step"] for e in records[0]["history"]]
    for r in list(records) + list(bare or []):
        if [e["step"] for e in r["history"]] != steps:
            raise KnnlmError(f"--seeds: seed {r['seed']} was evaluated at other steps than seed {records[0]['seed']}; "
                             "all seeds need the same village size and training settings")
    lam = str(float(args.lmbda[0]))
    first = records[0]["history"][0]["splits"]["test"]["lm"]
    groups = [g for g in first["count"]] + ["avg_groups", "avg"]
    methods = ["lm", "knn"] + (["mlp"] if args.mlp_memory else [])
    splits = [s for s in SPLITS if s in records[0]["history"][0]["splits"]]
    mean: dict = {}
    std: dict = {}
    for split in splits:
        mean[split], std[split] = {}, {}
        for m in methods:
            mean[split][m] = {g: [] for g in groups}
            std[split][m] = {g: [] for g in groups}
            for i in range(len(steps)):
                for g in groups:
                    mu, sd = mean_std([_point_value(r["history"][i], split, m, lam, g) for r in records])
                    mean[split][m][g].append(mu)
                    std[split][m][g].append(sd)
    if bare:
        mean["test"]["bare"] = {g: [] for g in groups}
        std["test"]["bare"] = {g: [] for g in groups}
        for i in range(len(steps)):
            for g in groups:
                mu, sd = mean_std([b["history"][i]["summary"][g] for b in bare])
                mean["test"]["bare"][g].append(mu)
                std["test"]["bare"][g].append(sd)
    optimum = first["optimum"]
    final = _final(records, mean, methods, splits, groups, optimum, lam, with_bare=bool(bare))
    final["step"] = steps[-1]
    metrics = {"steps": steps, "seeds": [r["seed"] for r in records], "lmbda": float(args.lmbda[0]), "methods": methods,
               "splits": splits, "groups": groups, "optimum": optimum, "counts": first["count"], "mean": mean,
               "std": std, "final": final,
               "train_loss": {str(r["seed"]): [e["train_loss"] for e in r["history"]] for r in records},
               "n_keys": {str(r["seed"]): r["history"][0]["n_keys"] for r in records},
               "n_train": {str(r["seed"]): r["n_train"] for r in records},
               "seed_wall_s": {str(r["seed"]): r["wall_s"] for r in records},
               "per_seed": {str(r["seed"]): [{k: v for k, v in e.items() if k != "lls"} for e in r["history"]]
                            for r in records}}
    if "train" in splits:
        fits = [r["history"][-1]["splits"]["train"]["lm"]["optimum_fit"] for r in records]
        metrics["optimum_fit"] = {g: float(np.mean([x[g] for x in fits])) for g in groups}
        final["train"]["lm_gap_to_fit_optimum"] = {g: metrics["optimum_fit"][g] - final["train"]["lm"][g]
                                                   for g in groups}
        mem = [r["history"][-1]["splits"]["train"].get("mem") for r in records]
        if all(mem):  # the MLP memory alone on the training sample's child positions: its training loss there
            metrics["mlp_child_loss"] = {"mean": -float(np.mean([x["avg"] for x in mem])),
                                         "per_seed": {str(r["seed"]): -x["avg"] for r, x in zip(records, mem)}}
    curves = [r["history"][-1].get("mlp_training") for r in records]
    if curves and all(curves):
        metrics["mlp_training"] = {str(r["seed"]): {**c, "plateau": last_fifth_drop(c["loss_curve"])}
                                   for r, c in zip(records, curves)}
    if bare:
        metrics["bare"] = {"train_loss": {str(b["seed"]): [e["train_loss"] for e in b["history"]] for b in bare},
                           "seed_wall_s": {str(b["seed"]): b["wall_s"] for b in bare},
                           "n_train": {str(b["seed"]): b["n_train"] for b in bare}}
    metrics["intervals"] = _intervals(records, bare, methods, lam)
    return metrics


# ---------------------------------------------------------------------------------------------------------------- claims
# Fixed before any run (docs/overspec.md). The claims are judged only where the model fits its over-specified training
# sentences (its training-split Average within FIT_MARGIN_NATS of the training optimum, the log-likelihood of a model
# reproducing their empirical distribution): a model that has not learnt its data says nothing about over-specification.
# A model at chance on 30 children is ~2.5 nats away.
FIT_MARGIN_NATS, FAR_NATS = 0.5, 0.5
OVERSPEC_CLAIMS = (  # (claim, interval key in metrics["intervals"]["test"], statistic, threshold)
    ("over-specification: trained on the bare sentences the same model gets closer to log(1/n) (§4, Fig. 2)",
     "bare_minus_lm", "bare-trained − over-specified vanilla (nats)", 0.0),
    ("kNN augmentation beats the vanilla LM on the bare test sentences (Fig. 1)", "knn_minus_lm",
     "kNN − vanilla (nats)", 0.0),
    ("the MLP memory beats kNN on Macondo (Table 2)", "mlp_minus_knn", "MLP − kNN (nats)", 0.0),
    (f"the fine-tuned LM stays far (> {FAR_NATS} nats) from the optimum log(1/n)", "lm_gap_to_optimum",
     "log(1/n) − vanilla (nats)", FAR_NATS),
)


def fit_reason(metrics: dict, margin: float = FIT_MARGIN_NATS) -> str:
    """Why the setting is not the paper's ("" when the vanilla model fits its training sentences)."""
    train = metrics.get("final", {}).get("train")
    if not (train and train.get("lm") and "optimum_fit" in metrics):
        return "no training-split score to show the model fits its data (rerun with --train_eval_per_pair 1)"
    van, opt = train["lm"]["avg_groups"], metrics["optimum_fit"]["avg_groups"]
    if van >= opt - margin:
        return ""
    return f"the model did not fit its training sentences ({opt - van:.2f} nats from their optimum > {margin})"


def overspec_claims(metrics: dict, label: str) -> list[Claim]:
    """The study's claims on the test split at the last step, each from its paired interval over seeds and examples."""
    unfit = fit_reason(metrics)
    intervals = metrics.get("intervals", {}).get("test", {})
    nan = float("nan")
    setting = f"{label}, step {metrics['final']['step']}"
    claims = []
    for claim, key, statistic, threshold in OVERSPEC_CLAIMS:
        if key.startswith("mlp") and "mlp" not in metrics.get("methods", ()):
            continue
        missing = "" if key in intervals else f"no {statistic.split(' (')[0]} interval in this run"
        interval = as_interval(intervals[key]) if key in intervals else Interval(nan, nan, nan)
        claims.append(Claim(claim, setting, statistic, interval, threshold, "above", not_judged=unfit or missing))
    return claims


# ---------------------------------------------------------------------------------------------------------------- outputs
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
LINESTYLES = {"lm": "-", "knn": ":", "mlp": "-.", "bare": (0, (8, 2, 1, 2, 1, 2))}


def _step_label(step: int) -> str:
    return f"{step // 1000}k" if step and step % 1000 == 0 else str(step)


def _cell(mu: Optional[float], sd: Optional[float], n_seeds: int) -> str:
    if mu is None:
        return "–"
    return f"{mu:.2f} ± {sd:.2f}" if n_seeds > 1 else f"{mu:.2f}"


def _split_methods(metrics: dict, split: str) -> list[str]:
    return [m for m in list(metrics["methods"]) + ["bare"] if m in metrics["mean"][split]]


def table5(metrics: dict, split: str) -> str:
    """Table 5's layout: rows are steps; per number of children and the average (of the group means), one column
    per method (vanilla / kNN [/ MLP] [/ bare-trained on the test split]); mean ± std over seeds; a last row with the
    optimum log(1/n) (and, for the training split, the training optimum: the empirical distribution)."""
    from ..report import markdown_table

    groups = [g for g in metrics["groups"] if g != "avg"]
    methods = _split_methods(metrics, split)
    n = len(metrics["seeds"])
    headers = ["steps"] + [f"{'Average' if g == 'avg_groups' else g} {METHOD_NAMES[m]}" for g in groups for m in methods]
    rows = []
    for i, step in enumerate(metrics["steps"]):
        rows.append([_step_label(step)] + [_cell(metrics["mean"][split][m][g][i], metrics["std"][split][m][g][i], n)
                                           for g in groups for m in methods])
    rows.append(["log(1/n)"] + [f"{metrics['optimum'][g]:.2f}" for g in groups for _ in methods])
    if split == "train" and "optimum_fit" in metrics:
        rows.append(["training optimum"] + [f"{metrics['optimum_fit'][g]:.2f}" for g in groups for _ in methods])
    return markdown_table(headers, rows)


def overview_table(metrics: dict) -> str:
    """The Average (mean of the group means) per step: test, training and control splits side by side, and the
    bare-trained reference."""
    from ..report import markdown_table

    n = len(metrics["seeds"])
    cols = [(split, m) for split in ("test", "train", "test_overspecified") if split in metrics["mean"]
            for m in _split_methods(metrics, split)]
    short = {"test": "test", "train": "train", "test_overspecified": "control"}
    headers = ["steps"] + [f"{short[s]} {METHOD_NAMES[m]}" for s, m in cols]
    rows = [[_step_label(step)] + [_cell(metrics["mean"][s][m]["avg_groups"][i], metrics["std"][s][m]["avg_groups"][i], n)
                                   for s, m in cols] for i, step in enumerate(metrics["steps"])]
    opt = [f"{metrics['optimum']['avg_groups']:.2f}" if s != "train" or "optimum_fit" not in metrics
           else f"{metrics['optimum']['avg_groups']:.2f} / {metrics['optimum_fit']['avg_groups']:.2f}" for s, _ in cols]
    rows.append(["optimum"] + opt)
    return markdown_table(headers, rows)


def markdown_report(args: OverspecArgs, metrics: dict) -> str:
    n = len(metrics["seeds"])
    lam = metrics["lmbda"]
    names = " / ".join(METHOD_NAMES[m] for m in metrics["methods"])
    counts = ", ".join(f"{g}: {c}" for g, c in metrics["counts"].items())
    text = [f"# Over-specification: {args.model_name_or_path}{' + LoRA' if args.lora else ''}, {n} seed(s)", "",
            f"Log-likelihood of the children's names ({names}; kNN: k={args.k}, λ={lam}, T={args.knn_temp}; "
            f"mean ± std over seeds {', '.join(map(str, metrics['seeds']))}). Test examples per number of children: "
            f"{counts}. Average = mean of the group means (the paper's).", ""]
    if "bare" in metrics["mean"]["test"]:
        text += ["'bare-trained': the same model, initialisation, seed and number of steps trained on the bare test "
                 "sentences instead (each repeated --examples_per_child times), scored on the same test sentences "
                 "(the paper's gray line, Fig. 2).", ""]
    if args.mlp_memory and args.mlp_at == "last":
        text += ["MLP memory trained at the last evaluation point only (--mlp_at last).", ""]
    text += ["## Overview (Average over groups)", "", overview_table(metrics)]
    for split in metrics["splits"]:
        text += [f"## {SPLIT_TITLES[split]}", "", table5(metrics, split)]
    text += ["## At the last step", ""]
    for split in metrics["splits"]:
        f = metrics["final"][split]
        line = [f"- {split}, step {metrics['final']['step']}: average vanilla {f['lm']['avg_groups']:.3f}"]
        for m in metrics["methods"][1:] + ["bare"]:
            if m not in f:
                continue
            extra = "" if f.get(f"{m}_beats_lm_fraction") is None else (
                f"; better than vanilla at {100 * f[f'{m}_beats_lm_fraction']:.0f}% of (seed, step > 0) points")
            line.append(f"{METHOD_NAMES[m]} {f[m]['avg_groups']:.3f} ({f[f'{m}_minus_lm']['avg_groups']:+.3f} over "
                        f"vanilla{extra})")
        line.append("gap to log(1/n): " + ", ".join(
            f"{METHOD_NAMES[m]} {f[f'{m}_gap_to_optimum']['avg_groups']:.3f}" for m in metrics["methods"] + ["bare"]
            if f"{m}_gap_to_optimum" in f))
        if split == "train" and "lm_gap_to_fit_optimum" in f:
            line.append(f"vanilla gap to the training optimum {f['lm_gap_to_fit_optimum']['avg_groups']:.3f}")
        text.append("; ".join(line) + ".")
    if "mlp_child_loss" in metrics:
        text.append(f"- MLP memory alone, loss on the children's positions of the training sample at the last step: "
                    f"{metrics['mlp_child_loss']['mean']:.3f} nats (mean over seeds).")
    if "mlp_training" in metrics:
        parts = []
        for seed, t in metrics["mlp_training"].items():
            drop = "n/a" if t["plateau"] is None else f"{100 * t['plateau']:.1f}%"
            parts.append(f"seed {seed} {t['first_loss']:.2f} -> {t['final_loss']:.2f} in {t['steps']} steps "
                         f"(drop over the last fifth: {drop})")
        text.append("- MLP memory training loss at the last step (all datastore pairs): " + "; ".join(parts) + ".")
    if metrics.get("intervals"):
        text += ["", "## Paired bootstrap intervals (last step; 95%, over seeds and examples, stratified by number of "
                 "children; Average over groups)", ""]
        text += [f"- {split}: {key.replace('_minus_', ' − ').replace('lm_gap_to_optimum', 'log(1/n) − lm')}: "
                 f"{as_interval(ci).fmt(3, '+')} nats" for split, cis in metrics["intervals"].items()
                 for key, ci in cis.items()]
        text += ["", "## Claims", "", claims_table(overspec_claims(metrics, "this run"))]
    return "\n".join(text) + "\n"


def figure1(path: Path, metrics: dict, split: str, title: str) -> Path:
    """Figure 1's style: one colour per number of children; vanilla solid, kNN dotted, MLP dash-dot, bare-trained
    dash-dot-dot; dashed horizontal lines at log(1/n). The legend names the colours once and the line styles once."""
    from ..report import line_plot

    groups = [g for g in metrics["groups"] if g not in ("avg", "avg_groups")]
    methods = _split_methods(metrics, split)
    series, hlines = [], []
    for i, g in enumerate(groups):
        color = COLORS[i % len(COLORS)]
        for m in methods:
            label = (f"{g} child" + ("ren" if g != "1" else "")) if m == "lm" else None
            y = [np.nan if v is None else v for v in metrics["mean"][split][m][g]]
            sparse = sum(np.isfinite(y)) < len(y)  # e.g. --mlp_at last: mark the points that exist
            series.append(dict(x=metrics["steps"], y=y, color=color, linestyle=LINESTYLES[m], label=label,
                               marker="o" if sparse else None))
        hlines.append(dict(y=metrics["optimum"][g], color=color, linestyle="--"))
    for m in methods:  # style key: empty lines that only appear in the legend
        series.append(dict(x=[], y=[], color="black", linestyle=LINESTYLES[m], label=METHOD_NAMES[m]))
    series.append(dict(x=[], y=[], color="grey", linestyle="--", label="log(1/n)"))
    return line_plot(path, series, title=title, xlabel="training step", ylabel="log-likelihood", hlines=hlines)


def write_outputs(out: Path, args: OverspecArgs, metrics: dict, started: float) -> dict:
    from ..report import write_markdown, write_results

    n = len(metrics["seeds"])
    plots = [figure1(out / "overspec.png", metrics, "test",
                     f"{args.model_name_or_path}: test log-likelihood of the children's names ({n} seeds)"),
             figure1(out / "overspec_control.png", metrics, "test_overspecified",
                     f"{args.model_name_or_path}: control split test_overspecified ({n} seeds)")]
    if "train" in metrics["splits"]:
        plots.append(figure1(out / "overspec_train.png", metrics, "train",
                             f"{args.model_name_or_path}: training sentences (fixed sample, {n} seeds)"))
    results = write_results(out, dataclasses.asdict(args), metrics, started=started,
                            claims=[c.record() for c in overspec_claims(metrics, "this run")])
    table = write_markdown(out, markdown_report(args, metrics))
    return {"results": results, "table": table, "plots": plots}


# ---------------------------------------------------------------------------------------------------------------- report
PAPER_TABLE2 = {"LM": 19.66, "kNN-LM": 17.69, "MLP-LM": 10.76}  # Macondo, GPT-2 fine-tuned
TABLES = {"table2_macondo": ("Table 2 — kNN vs MLP memory (Macondo: perplexity of the children's names, test split)",
                             ["model", "LM", "kNN-LM", "MLP-LM"],
                             [["paper (GPT-2 fine-tuned)", *PAPER_TABLE2.values()]]),
          "table5": ("Table 5 / Figure 1 — Macondo over-specification", None, [])}


def report_part(metrics: dict, entry: dict, out: Path) -> tuple[dict, list[Claim]]:
    """Table 2's Macondo row (perplexity of the names at the last step), the run's results.md as Table 5's section,
    and the claims."""
    final = metrics["final"]["test"]
    row = [f"{entry['label']} (step {metrics['final']['step']})"] + [
        math.exp(-final[m]["avg_groups"]) if m in final else None for m in ("lm", "knn", "mlp")]
    md = out / entry["folder"] / "results.md"
    text = md.read_text() if md.is_file() else ""
    text = "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines()) + "\n"  # under ##
    section = (f"### {entry['label']}\n\n" if entry.get("label") else "") + text
    return {"table2_macondo": [row], "table5": [section]}, overspec_claims(metrics, entry["label"])
