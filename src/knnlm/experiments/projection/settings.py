"""The projection study's settings: ``ProjectionArgs`` (beside the library's ``ModelArgs``, ``CorpusArgs`` and
``KNNArgs`` on ``knnlm analyze projection``) and the targets z is projected through."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ...errors import KnnlmError, require_finite, require_in_range, require_seed
from ...stats import MAX_RESAMPLES

log = logging.getLogger(__name__)

# `knnlm reproduce --smoke`: the flags that shrink an `analyze projection` stage to seconds
SMOKE = {"analyze projection": {"--device": "cpu", "--dtype": "float32", "--max_tokens": "64", "--max_steps": "5",
                                "--batch_size": "64"}}
# target -> the key point z starts from
TARGETS = {"f_out": "final_hidden", "f_norm": "block_output", "fg": "ffn_residual", "fg_to_y": "ffn_residual"}
DEPRECATED = {"f": "f_norm"}  # old name -> new name
LABELS = {"f_out": "f → p_knnlm", "f_norm": "f_norm → p_knnlm", "fg": "f∘g → p_knnlm", "fg_to_y": "f∘g → y"}
# what each target's map is, for every table's caption
MAPS = {"f_out": "f = output layer + softmax, z from final_hidden (the paper's f)",
        "f_norm": "f_norm = final norm + output layer + softmax, z from block_output",
        "fg": "f∘g = f_norm(g(z)), g = last feed-forward sublayer with its residual, z from ffn_residual",
        "fg_to_y": "f∘g as above, maximising the gold token's log-probability"}
# which paper column each target is compared with
PAPER_COLUMN = {"f_out": "f", "f_norm": None, "fg": "fg", "fg_to_y": "fg_to_y"}  # the paper has no f_norm
STOP_REASONS = ("tol", "patience", "max_steps")  # codes 0, 1, 2 in per_token.npz
# config.json fields a rerun into the same folder may change (the rest must match to resume or keep the results):
# where the run goes and runs, and the training file the study does not read
_FREE_KEYS = ("output_dir", "device", "train_file")


def resolve_targets(names: Sequence[str]) -> list[str]:
    """Maps deprecated target names to their new names (logging a deprecation warning); order kept."""
    for t in names:
        if t in DEPRECATED:
            log.warning("--target %s is deprecated: it is %s (%s); the paper's f is f_out (output layer only). "
                        "Running it as %s.", t, DEPRECATED[t], MAPS[DEPRECATED[t]], DEPRECATED[t])
    return [DEPRECATED.get(t, t) for t in names]


@dataclass
class ProjectionArgs:
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for results.json, results.md, per_token.npz, the KL and step histograms (required)."})
    datastore: Optional[str] = field(default=None, metadata={"help": "Datastore folder that defines p_knnlm (built with `knnlm datastore build` from the LM's training set; required)."})
    target: list[str] = field(default_factory=lambda: ["f_out", "fg"], metadata={"help": "What to project through: f_out (the paper's f: output layer only, z from final_hidden), f_norm (final norm + output layer, z from block_output), fg (f_norm∘g, z from ffn_residual), fg_to_y (as fg, maximising the gold token's log-probability); a comma list runs several from one LM/kNN pass. f is a deprecated name of f_norm."})
    learning_rate: float = field(default=0.1, metadata={"help": "Adam learning rate for z (paper: 0.1; Table 4: 0.001).", "deprecated": ("lr",)})
    tol: list[float] = field(default_factory=lambda: [1e-3], metadata={"help": "A position stops when one step changes its objective by less than this (paper: 1e-3); 0 never stops early. A comma list (e.g. 1e-3,1e-4,0) reports each tolerance from one shared trajectory."})
    max_steps: int = field(default=1000, metadata={"help": "Cap on Adam steps per position (Table 4: 100)."})
    patience: int = field(default=0, metadata={"help": "Also stop a position after this many consecutive steps without a new lowest objective (0: off)."})
    batch_size: int = field(default=512, metadata={"help": "Scored positions optimised together (memory grows as batch_size x vocabulary)."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples (over blocks of 256 consecutive positions) for the 95% intervals of perplexities and of the share of kNN's gain."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder for results.json")
        if not self.datastore:
            raise KnnlmError("--datastore: required; p_knnlm needs a datastore (`knnlm datastore build`)")
        bad = [t for t in self.target if t not in TARGETS and t not in DEPRECATED]
        if bad or not self.target:
            raise KnnlmError(f"--target: {','.join(bad) or 'empty'} is not one of {', '.join(TARGETS)}")
        self.target = resolve_targets(self.target)
        if len(set(self.target)) != len(self.target):
            raise KnnlmError(f"--target: {','.join(self.target)} names a target twice (f is f_norm)")
        require_finite("learning_rate", self.learning_rate)
        if not self.tol or any(not t >= 0 for t in self.tol):
            raise KnnlmError(f"--tol: every tolerance must be >= 0, got {','.join(map(str, self.tol)) or 'none'}")
        if len(set(self.tol)) != len(self.tol):
            raise KnnlmError(f"--tol: {','.join(map(str, self.tol))} names a tolerance twice")
        self.tol = sorted(self.tol, reverse=True)  # largest first: its column stops earliest
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise KnnlmError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        require_in_range("n_boot", self.n_boot, 1, MAX_RESAMPLES)
        if self.patience < 0:
            raise KnnlmError(f"--patience: must be >= 0 (0: off), got {self.patience}")
        require_seed("seed", self.seed)
