"""The hurdle study's settings: ``HurdleArgs``, its presets (configs/hurdle-preset-<name>-<mode>.yaml) and its
``--smoke`` flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ...config import changed_fields
from ...errors import THREAD_LIMIT, KnnlmError, require_finite, require_in_range, require_seed
from ...stats import MAX_RESAMPLES
from ...train import TrainArgs
from ..study import library_args, mirror

MODELS = ("with_last_mlp", "without_last_mlp", "without_first_mlp")
PRUNED = MODELS[1:]  # compared with MODELS[0], paired per seed
# `knnlm reproduce --smoke`: the flags that shrink a `hurdle run` stage to seconds
SMOKE = {"hurdle run": {"--device": "cpu", "--size": "tiny", "--num_seeds": "2", "--max_steps": "4", "--eval_every": "2",
                        "--batch_size": "4", "--block_size": "32", "--val_tokens": "256",
                        "--macondo_num_villagers": "20", "--macondo_num_parents": "5", "--log_every": "1"}}


@dataclass
class HurdleArgs:
    data: str = field(default="macondo", metadata={"help": "`macondo` (generate a village into OUT/macondo with the --macondo_* knobs), a folder holding a generated village (its test.jsonl), or a plain-text training file (text mode)."})
    size: str = field(default="gpt2-small", metadata={"help": "Named from-scratch GPT-2 size (knnlm.assets.SCRATCH_SIZES: tiny, small, gpt2-small)."})
    n_layer: int = field(default=0, metadata={"help": "Blocks, overriding --size's (0: the size's). GPT-2 small's shape at reduced width: e.g. --n_layer 4 --n_embd 128 --n_head 4."})
    n_embd: int = field(default=0, metadata={"help": "Width, overriding --size's (0: the size's)."})
    n_head: int = field(default=0, metadata={"help": "Attention heads, overriding --size's (0: the size's); must divide the width."})
    preset: Optional[str] = field(default=None, metadata={"help": "Preset values (flags and --config win), from configs/hurdle-preset-<name>-<mode>.yaml: `cpu` (2x64, 2 CPU cores, <= 10 min per mode), `cpu-deep` (4x128, 10 seeds: the depth at which removing one MLP of four can show the paper's effect) or `paper` (GPT-2 small, a GPU)."})
    area_fraction: float = field(default=0.4, metadata={"help": "The paired area (the verdict statistic) is taken over the first this fraction of training."})
    bootstrap: int = field(default=10000, metadata={"help": "Bootstrap resamples of the seeds for the interval of the paired area."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Run folder: checkpoints, results.json, results.md, PNGs (required). A rerun resumes it."})
    max_steps: int = mirror(TrainArgs, "max_steps", default=10000, help="Optimizer steps per model.", deprecated=("steps",))
    eval_every: int = field(default=1000, metadata={"help": "Evaluate every N steps (and at step 0 and the last step); checkpoints are written at the same points."})
    num_seeds: int = field(default=5, metadata={"help": "Number of seeds (0..num_seeds-1); each seed gives both models their initial weights and data order.", "deprecated": ("seeds",)})
    batch_size: int = field(default=8, metadata={"help": "Examples per step: sentences in Macondo mode, blocks of --block_size tokens in text mode."})
    block_size: int = field(default=1024, metadata={"help": "Text mode: tokens per training block and validation block."})
    learning_rate: float = mirror(TrainArgs, "learning_rate", default=5e-4, deprecated=("lr",))
    warmup: float = field(default=0.05, metadata={"help": "Linear warm-up: a fraction of --max_steps when < 1, else a number of steps; then linear decay to 0."})
    weight_decay: float = mirror(TrainArgs, "weight_decay")
    max_grad_norm: float = mirror(TrainArgs, "max_grad_norm")
    vocab_size: int = field(default=0, metadata={"help": "0: the tokenizer's full vocabulary. N > 0: keep the N-1 most frequent tokens of the training data and map the rest to one unknown id (a CPU speed-up; likelihoods are then over that reduced vocabulary)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Text mode: validation text (default: valid.txt beside a training file named train.txt, as in WikiText)."})
    val_tokens: int = field(default=0, metadata={"help": "Text mode: score the first N validation tokens (0 = all)."})
    max_train_tokens: int = field(default=0, metadata={"help": "Text mode: use only the first N training tokens (0 = all)."})
    ema_beta: float = field(default=0.98, metadata={"help": "Smoothing of the recorded training loss: ema = beta*ema + (1-beta)*loss (bias-corrected)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Examples per forward pass when evaluating."})
    macondo_seed: int = field(default=0, metadata={"help": "Macondo mode: seed of the generated village."})
    macondo_num_villagers: int = field(default=500, metadata={"help": "Macondo mode: villagers in the generated village."})
    macondo_num_parents: int = field(default=100, metadata={"help": "Macondo mode: parents (an equal share for each number of children)."})
    macondo_max_children: int = field(default=5, metadata={"help": "Macondo mode: parents have 1..N children."})
    macondo_examples_per_child: int = field(default=5, metadata={"help": "Macondo mode: training examples per parent-child pair (the train split, unused here but generated)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})
    log_every: int = field(default=50, metadata={"help": "Record the smoothed training loss (and update the progress bar) every N steps."})

    @property
    def mode(self) -> str:
        return "text" if Path(self.data).is_file() else "macondo"

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.max_steps)) if self.warmup < 1 else int(self.warmup)

    def eval_steps(self) -> list[int]:
        return sorted(set(range(0, self.max_steps + 1, self.eval_every)) | {self.max_steps})

    def train_args(self, seed: int) -> TrainArgs:
        """The shared loop's settings for one run (``knnlm.train``): AdamW at --learning_rate (the schedule is the
        hurdle's own, ``run.lr_at``), float32, one micro-batch per step, --max_steps steps."""
        return library_args(TrainArgs, self, warmup_ratio=0.0, seed=seed, bf16=False)

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the run folder for checkpoints and results")
        from ...assets import SCRATCH_SIZES

        if self.size not in SCRATCH_SIZES:
            raise KnnlmError(f"--size: {self.size!r} is not a from-scratch GPT-2 size; use one of {', '.join(SCRATCH_SIZES)}")
        if self.data != "macondo" and not Path(self.data).exists():
            raise KnnlmError(f"--data: {self.data} does not exist; pass `macondo`, a Macondo folder or a text file")
        if self.data != "macondo" and Path(self.data).is_dir() and not (Path(self.data) / "test.jsonl").is_file():
            raise KnnlmError(f"--data: {self.data} is a folder without test.jsonl; pass a folder from `knnlm macondo generate`")
        for name in ("max_steps", "eval_every", "num_seeds", "batch_size", "block_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        require_in_range("bootstrap", self.bootstrap, 1, MAX_RESAMPLES)  # (used only in the report, after the training)
        if self.eval_every > self.max_steps:
            raise KnnlmError(f"--eval_every: {self.eval_every} exceeds --max_steps {self.max_steps}; lower it")
        self.train_args(0).validate()  # --learning_rate, --weight_decay, --max_grad_norm
        require_finite("warmup", self.warmup, 0, inclusive=True)  # NaN passed `< 0` and then int(NaN) raised
        if self.warmup_steps >= self.max_steps:
            raise KnnlmError(f"--warmup: {self.warmup} gives {self.warmup_steps} warm-up steps, not fewer than --max_steps "
                             f"{self.max_steps}")
        if not 0 <= self.ema_beta < 1:
            raise KnnlmError(f"--ema_beta: must be in [0, 1), got {self.ema_beta}")
        if min(self.n_layer, self.n_embd, self.n_head) < 0:
            raise KnnlmError("--n_layer/--n_embd/--n_head: must be >= 0 (0: the --size's value)")
        layers, width, heads = (v or d for v, d in zip((self.n_layer, self.n_embd, self.n_head), SCRATCH_SIZES[self.size]))
        if width % heads:
            raise KnnlmError(f"--n_head: {heads} heads do not divide the width {width}")
        if layers < 2:
            raise KnnlmError(f"--n_layer: {layers} blocks leave no first-vs-last MLP control; use >= 2")
        require_seed("macondo_seed", self.macondo_seed)  # not left to the village's own check, which names --seed
        # nor the sizes of the village it makes: its check names --num_villagers, --num_parents..., flags hurdle lacks
        for name in ("macondo_num_villagers", "macondo_num_parents", "macondo_max_children",
                     "macondo_examples_per_child"):
            if self.data == "macondo" and getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.data == "macondo" and self.macondo_num_villagers < 2:
            raise KnnlmError(f"--macondo_num_villagers: {self.macondo_num_villagers} is too few; friends need at least "
                             "2 villagers")
        if self.data == "macondo" and self.macondo_num_parents > self.macondo_num_villagers:
            raise KnnlmError(f"--macondo_num_parents: {self.macondo_num_parents} parents cannot come from "
                             f"{self.macondo_num_villagers} villagers; lower --macondo_num_parents or raise "
                             "--macondo_num_villagers")
        require_in_range("num_threads", self.num_threads, 0, THREAD_LIMIT, " (0 = torch's default)")
        for name in ("val_tokens", "max_train_tokens"):
            if getattr(self, name) < 0:
                raise KnnlmError(f"--{name}: must be >= 0 (0 = all), got {getattr(self, name)}")
        if not 0 < self.area_fraction <= 1:
            raise KnnlmError(f"--area_fraction: must be in (0, 1], got {self.area_fraction}")
        if self.vocab_size < 0 or self.vocab_size == 1:
            raise KnnlmError("--vocab_size: 0 (full vocabulary) or >= 2")
        if self.device not in ("auto", "cpu", "cuda"):
            raise KnnlmError(f"--device: {self.device!r} is not one of auto, cpu, cuda")
        self.resolved_device()  # cuda without a GPU: the one-line error
        if self.mode == "text":
            val = self.validation_path()
            if val is None:
                raise KnnlmError(f"--validation_file: required in text mode (no valid.txt beside {self.data})")
            if not val.is_file():
                raise KnnlmError(f"--validation_file: {val} does not exist; pass a plain-text validation file")
        elif self.validation_file:  # Macondo mode scores the village's own test split; the file would be ignored
            raise KnnlmError(f"--validation_file: only text mode (--data a training text file) reads it; --data "
                             f"{self.data} is Macondo mode, which scores the village's test split; drop --validation_file")
        knobs = changed_fields(self, ("macondo_seed", "macondo_num_villagers", "macondo_num_parents",
                                      "macondo_max_children", "macondo_examples_per_child"))
        if self.mode == "text" and knobs:  # no village is made
            raise KnnlmError(f"--{knobs[0]}: only Macondo mode reads it; --data {self.data} is text mode; drop "
                             f"--{knobs[0]}")

    def validation_path(self) -> Optional[Path]:
        if self.validation_file:
            return Path(self.validation_file)
        sibling = Path(self.data).with_name("valid.txt")
        return sibling if Path(self.data).name == "train.txt" and sibling.is_file() else None

    def resolved_device(self) -> torch.device:
        from ...models import resolve_device

        return resolve_device(self.device)


# Presets are YAML files, one per (preset, mode): configs/hurdle-preset-<name>-<macondo|text>.yaml (flat keys of
# HurdleArgs, never `data`). `cpu`: both models x 5 seeds in <= 10 min on 2 cores per mode, one torch thread (two threads
# on a busy 2-core machine were measured 20x slower per step than one).
def preset_names() -> list[str]:
    from ...config import PRESETS_DIR

    return sorted({p.stem[len("hurdle-preset-"):].rsplit("-", 1)[0] for p in PRESETS_DIR.glob("hurdle-preset-*-*.yaml")})


def preset_values(preset: str, mode: str) -> dict:
    """The values of ``--preset`` for a mode (``macondo`` or ``text``), read from its YAML file."""
    from ...config import PRESETS_DIR, load_config_file

    path = PRESETS_DIR / f"hurdle-preset-{preset}-{mode}.yaml"
    if not path.is_file():
        raise KnnlmError(f"--preset: {preset!r} is not one of {', '.join(preset_names())}")
    return load_config_file(path)


# Fields that do not change what a run computes: a rerun into the same folder may change them and still resume it.
_FREE_KEYS = ("output_dir", "device", "num_threads", "num_seeds", "eval_batch_size", "preset", "area_fraction",
              "bootstrap")


def resolve_args(cli: dict, config_file: Optional[str] = None) -> HurdleArgs:
    """HurdleArgs from CLI values (None = unset), a YAML/JSON config file and a preset: flag > file > preset > default."""
    from ...config import load_config_file, rename_deprecated, resolve

    # new names here (resolve() warns about the old ones), so that a preset's key does not shadow a file's old one
    file_vals = rename_deprecated(load_config_file(config_file), HurdleArgs, warn=False) if config_file else {}
    cli = rename_deprecated({k: v for k, v in cli.items() if v is not None}, HurdleArgs, source="flags")
    preset = cli.get("preset", file_vals.get("preset"))
    if preset is not None:
        data = cli.get("data", file_vals.get("data", HurdleArgs.data))
        mode = "text" if Path(str(data)).is_file() else "macondo"
        for key, value in preset_values(preset, mode).items():
            if key not in file_vals and key not in cli:
                cli[key] = value
    return resolve(HurdleArgs, cli, config_file)
