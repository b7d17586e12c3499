"""The over-specification study's settings: ``OverspecArgs`` (its training, kNN, Macondo and memory settings declared
from the library's dataclasses: ``knnlm.train.TrainArgs``, ``knnlm.knn.KNNArgs``, ``MacondoArgs``, ``MemoryArgs``)."""
from __future__ import annotations

import math

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

from ...config import changed_fields
from ...errors import THREAD_LIMIT, KnnlmError, require_finite, require_in_range, require_seed
from ...knn import KNNArgs
from ...macondo.generate import MacondoArgs
from ...memory import MemoryArgs
from ...models import ModelArgs
from ...train import TrainArgs
from ..study import library_args, mirror as _mirror

# `knnlm reproduce --smoke`: the flags that shrink an `overspec run` stage to seconds
SMOKE = {"overspec run": {"--device": "cpu", "--seeds": "0", "--num_villagers": "10", "--num_parents": "2",
                          "--max_children": "2", "--examples_per_child": "1", "--batch_size": "4", "--max_steps": "2",
                          "--eval_every": "2", "--mlp_hidden_size": "64", "--mlp_epochs": "1",
                          "--mlp_batch_tokens": "64"}}

SPLITS = ("test", "test_overspecified", "train")  # "train": a fixed sample of the training sentences (--train_eval_per_pair)
METHODS = ("lm", "knn", "mlp")


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
    control_holdout: Literal["pair", "parent"] = _mirror(MacondoArgs, "control_holdout")
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
        from ...assets import SCRATCH_SIZES

        return self.model_name_or_path in SCRATCH_SIZES and not Path(self.model_name_or_path).exists()

    def train_args(self, seed: int) -> TrainArgs:
        return library_args(TrainArgs, self, seed=seed)

    def knn_args(self) -> KNNArgs:
        return library_args(KNNArgs, self, lmbda=list(self.lmbda))

    def macondo_args(self, seed: int, output_dir: str, tokenizer: str) -> MacondoArgs:
        return library_args(MacondoArgs, self, output_dir=output_dir, seed=seed, tokenizer=tokenizer, format="plain",
                            min_children=1)

    def memory_args(self, datastore: str, output_dir: str, seed: int) -> MemoryArgs:
        return library_args(MemoryArgs, self, "mlp_", datastore=datastore, output_dir=output_dir, seed=seed,
                            micro_batch_tokens=min(1024, self.mlp_batch_tokens), overwrite=True)

    def validate(self) -> None:
        from ...models import KEY_POINTS

        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the run folder for checkpoints and results")
        if not self.model_name_or_path:
            raise KnnlmError("--model_name_or_path: required (a hub id, a local folder, smollm2-135m, tiny or small)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise KnnlmError(f"--seeds: need one or more distinct seeds, got {self.seeds}")
        for seed in self.seeds:
            require_seed("seeds", seed)
        for name in ("eval_every", "max_children", "mlp_hidden_size", "mlp_epochs", "mlp_batch_tokens"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_batch_size < 1:
            raise KnnlmError(f"--eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        require_in_range("num_threads", self.num_threads, 0, THREAD_LIMIT, " (0 = torch's default)")
        if self.key_point not in KEY_POINTS:
            raise KnnlmError(f"--key_point: {self.key_point!r} is not one of {', '.join(KEY_POINTS)}")
        if not self.lmbda:
            raise KnnlmError("--lmbda: give at least one weight in [0, 1], e.g. 0.25")
        if self.lora_r < 1 or not 0 < self.lora_alpha < math.inf or not 0 <= self.lora_dropout < 1:
            raise KnnlmError(f"--lora_r/--lora_alpha/--lora_dropout: need r >= 1, alpha > 0, 0 <= dropout < 1; got "
                             f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}")
        if self.train_eval_per_pair < 0 or self.train_eval_per_pair > self.examples_per_child:
            raise KnnlmError(f"--train_eval_per_pair: must be in 0..--examples_per_child ({self.examples_per_child}), "
                             f"got {self.train_eval_per_pair}")
        library_args(ModelArgs, self).validate()
        self.train_args(self.seeds[0]).validate()
        self.knn_args().validate()
        self.macondo_args(self.seeds[0], str(self.output_dir), "gpt2").validate()
        require_finite("mlp_learning_rate", self.mlp_learning_rate)
        if not self.lora:  # as a memory setting below: recorded as if it had acted, every weight trained
            moved = changed_fields(self, ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"))
            if moved:
                raise KnnlmError(f"--{moved[0]}: a LoRA setting, which acts only with --lora true; pass it, or drop "
                                 f"--{moved[0]}")
        if not self.mlp_memory:  # a memory setting would be recorded in config.json as if it had acted
            moved = changed_fields(self, (f.name for f in fields(self) if f.name.startswith("mlp_")
                                          and f.name != "mlp_memory"))
            if moved:
                raise KnnlmError(f"--{moved[0]}: a memory setting, which acts only with --mlp_memory true; pass it, "
                                 f"or drop --{moved[0]}")


# Fields that do not change what a run computes: a rerun may change them and still resume.
_FREE_KEYS = ("output_dir", "seeds", "num_threads", "eval_batch_size", "keep_datastores", "save_models", "bare_reference")


# what `knnlm overspec run` writes into its folder (a folder from before the run marker holds nothing else)
OWN_FILES = ("config.json", "results.json", "results.md", "overspec*.png", "seed-*", "tokenizer")


def point_dir(run_dir: Path, step: int) -> Path:
    """The folder of an evaluation point of a training run (``run_dir``: a seed's folder or its ``bare`` run); its
    scores are the file of the same name with ``.json``."""
    return run_dir / "evals" / f"step-{step:07d}"


def resolve_args(cli: dict | None = None, config_file: str | None = None) -> OverspecArgs:
    """OverspecArgs from CLI values (None = unset), a YAML/JSON config file and defaults (flag > file > default);
    unknown config keys and bad values raise :class:`KnnlmError` here, before anything is loaded or trained."""
    from ...config import resolve

    return resolve(OverspecArgs, cli or {}, config_file)
