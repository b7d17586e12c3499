"""The RetoMaton study's settings: ``RetomatonArgs`` (the library's ``KNNArgs`` with ``--min_knns`` as a list, and the
study's own flags; beside ``ModelArgs`` and ``CorpusArgs`` on ``knnlm analyze retomaton``) and the swept settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...errors import KnnlmError, require_in_range, require_seed
from ...knn import KNNArgs
from ...stats import MAX_RESAMPLES
from ..study import library_args

# `knnlm reproduce --smoke`: the flags that shrink the study's stages to seconds
SMOKE = {"analyze retomaton": {"--device": "cpu", "--dtype": "float32", "--max_tokens": "128", "--batch_size": "2",
                               "--k": "16", "--min_knns": "1,4", "--skip_probs": "0.5"},
         "datastore cluster": {"--num_clusters": "8", "--sample_size": "400"}}
# the series of the table and the figure, in their order
KNN, RETOMATON, CLUSTERS, RANDOM = "kNN-LM (a search per token)", "RetoMaton", "RetoMaton, clusters", "kNN-LM, random skips"
# KNNArgs fields the study sets per setting: a value given for them would be silently overridden
_SWEPT = ("retomaton", "no_clusters", "skip_search_prob", "no_pointer")
_DEFAULTS = KNNArgs()
# config.json fields a rerun into the same folder may change: the swept settings (a setting already evaluated is
# reused, a new one evaluated: the study grows), the bootstrap of the claim's interval (recomputed from the saved
# per-token arrays), where the run goes and runs, and the training file it does not read. Any other change (k, λ, the
# corpus, the model) would replace every result, so it is refused.
_FREE_KEYS = ("min_knns", "skip_probs", "clusters", "n_boot", "seed", "output_dir", "device", "train_file")


@dataclass
class RetomatonArgs(KNNArgs):
    min_knns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 64], metadata={"help": "RetoMaton's settings: a comma list of thresholds (search when fewer than this many pointers survive)."})
    skip_probs: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75], metadata={"help": "The random-skip kNN-LM's settings: a comma list of probabilities of skipping a search (empty: none)."})
    clusters: bool = field(default=False, metadata={"help": "Also RetoMaton with clusters at each --min_knns (`knnlm datastore cluster` first)."})
    datastore: Optional[str] = field(default=None, metadata={"help": "Datastore folder (its index and, with --clusters true, its clusters; read only; required)."})
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass = RetoMaton's streams (the same for every setting)."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples (over blocks of 256 consecutive tokens) for the interval of RetoMaton's perplexity against the kNN-LM's."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for results.json, results.md, retomaton.png and each setting's saved metrics (required)."})

    def validate(self) -> None:
        for name in _SWEPT:
            if getattr(self, name) != getattr(_DEFAULTS, name):
                raise KnnlmError(f"--{name}: the study sets it per setting; leave it out (use --min_knns, "
                                 "--skip_probs, --clusters)")
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder for results.json")
        if not self.datastore:
            raise KnnlmError("--datastore: required; the store the kNN-LM and RetoMaton search")
        if not self.min_knns or any(m < 1 for m in self.min_knns):
            raise KnnlmError(f"--min_knns: a comma list of integers >= 1, e.g. 1,2,4,8,16,64; got "
                             f"{','.join(map(str, self.min_knns)) or 'nothing'}")
        for name in ("min_knns", "skip_probs"):
            values = getattr(self, name)
            if len(set(values)) != len(values):  # the same setting twice: its row twice in the table
                raise KnnlmError(f"--{name}: {','.join(map(str, values))} repeats a value; give each once")
        if any(not 0.0 < p < 1.0 for p in self.skip_probs):
            raise KnnlmError(f"--skip_probs: each must be in (0, 1), got {','.join(map(str, self.skip_probs))}")
        if len(self.lmbda) != 1:
            raise KnnlmError(f"--lmbda: the study takes one λ, got {','.join(map(str, self.lmbda))}")
        require_in_range("n_boot", self.n_boot, 1, MAX_RESAMPLES)
        require_seed("seed", self.seed)
        if self.batch_size < 1:
            raise KnnlmError(f"--batch_size: must be >= 1, got {self.batch_size}")
        for _, _, setting in self.settings():  # every setting the study runs passes the library's own checks
            self.knn_args(**setting).validate()

    def knn_args(self, **setting) -> KNNArgs:
        """The library's KNNArgs of one setting: this run's k, nprobe, λ, temperature, … with exact distances."""
        return library_args(KNNArgs, self, **{"min_knns": _DEFAULTS.min_knns, "recompute_dists": True, **setting})

    def settings(self) -> list[tuple[str, str, dict]]:
        """[(series, setting label, KNNArgs overrides)]: the kNN-LM first, then RetoMaton, with clusters, random skips."""
        out = [(KNN, "–", {})]
        out += [(RETOMATON, f"min_knns {m}", {"retomaton": True, "min_knns": m}) for m in self.min_knns]
        if self.clusters:
            out += [(CLUSTERS, f"min_knns {m}", {"retomaton": True, "min_knns": m, "no_clusters": False})
                    for m in self.min_knns]
        out += [(RANDOM, f"skip {p:g}", {"skip_search_prob": p}) for p in self.skip_probs]
        return out
