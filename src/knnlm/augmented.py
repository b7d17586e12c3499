"""The kNN-LM (or MLP-LM) as a drop-in Hugging Face model: ``augment(model, datastore=...)``.

``augment`` attaches two hooks to the causal-LM module itself and returns that same module, so everything that takes
a ``PreTrainedModel`` takes the augmented one unchanged: ``model.generate()`` (greedy, sampling, beam search, KV cache),
``transformers.pipeline("text-generation", model=...)``, lm-evaluation-harness's ``HFLM(pretrained=...)``.

- A forward pre-hook opens :meth:`knnlm.models.LM.capture` at the store's key point for the duration of the call.
- A forward hook replaces ``logits`` [B, T', V] by log p_knnlm = log((1 - λ) p_lm + λ p_knn) (``knn.interpolate``),
  float32. Only the positions whose logits the model returns are queried: with a KV cache and ``logits_to_keep=1``
  (what ``generate`` passes) that is one retrieval per new position, and none for padding where an attention mask
  marks it (0; lm-evaluation-harness's HFLM passes none, so its right padding is queried and then discarded).

The logits are log-probabilities, so ``softmax(logits)`` is p_knnlm and anything computing ``log_softmax(logits)``
(the harness, beam search, ``knnlm serve``) gets log p_knnlm back. A ``labels`` loss is recomputed from them.
``detach(model)`` (or ``model.knnlm.detach()``) removes the hooks: the model is bit-for-bit the plain one again.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from .config import changed_fields
from .corpus import JSONL_SUFFIXES, skip_bad_rows_field
from .errors import KnnlmError, require_finite, require_seed
from .knn import KNNArgs, Retriever, interpolate, knn_log_probs, lm_where, no_neighbours

log = logging.getLogger(__name__)

ATTR = "knnlm"  # the attribute of an augmented model holding its :class:`Augmentation`


@dataclass
class AugmentArgs:
    datastore: Optional[str] = field(default=None, metadata={"help": "Datastore folder: the model's next-token distribution becomes the kNN-LM's (k, λ, T from --k --lmbda --knn_temp)."})
    mlp_memory: Optional[str] = field(default=None, metadata={"help": "MLP memory folder (instead of --datastore): the distribution becomes the MLP-LM's, λ from --lmbda."})

    def validate(self) -> None:
        if self.datastore and self.mlp_memory:
            raise KnnlmError("--datastore/--mlp_memory: pass one of them; the model interpolates with one memory")


class Augmentation:
    """The hooks that turn a causal LM's logits into log p_knnlm / log p_mlplm. Made by :func:`augment`.

    One forward at a time: the capture hooks live on the model's modules, so two threads calling the same augmented
    model at once would mix their keys (``knnlm serve`` computes one request at a time for this reason)."""

    def __init__(self, lm, lmbda: float, retriever: Optional[Retriever] = None, memory=None):
        self.lm, self.lmbda, self.retriever, self.memory = lm, float(lmbda), retriever, memory
        self.key_point = retriever.ds.key_point if retriever is not None else memory.key_point
        self.n_queries = 0  # positions queried so far (retrievals, or MLP-memory evaluations)
        self._stack: Optional[contextlib.ExitStack] = None
        self._caps: dict = {}
        self._mask = self._ids = None
        self._past = 0
        self.tracker = None  # RetoMaton / the random-skip kNN-LM: state carried across calls
        if retriever is not None and retriever.args.stateful:
            from .retomaton import Automaton, Tracker

            self.tracker = Tracker(Automaton(retriever))
        model = lm.model
        self._hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                       model.register_forward_hook(self._after, with_kwargs=True, always_call=True)]
        setattr(model, ATTR, self)

    @property
    def model(self):
        return self.lm.model

    # -------------------------------------------------------------------------------------------------------- hooks
    def _before(self, module, args, kwargs):
        self._stack = contextlib.ExitStack()
        self._caps = self._stack.enter_context(self.lm.capture((self.key_point,)))
        self._mask = kwargs.get("attention_mask")
        self._ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (the name of transformers 5, then 4)
        self._past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0

    def _after(self, module, args, kwargs, out):
        try:
            if out is None:  # the forward raised (always_call): only release the capture hooks
                return None
            logits = out[int(kwargs.get("labels") is not None)] if isinstance(out, tuple) else out.logits
            new = self._replace_logits(out, kwargs.get("labels"))
            return _inference_only(new) if torch.is_grad_enabled() and logits.requires_grad else new
        finally:
            self._stack.close()
            self._stack, self._caps, self._mask, self._ids = None, {}, None, None

    @torch.no_grad()
    def _replace_logits(self, out, labels):
        tuple_out = isinstance(out, tuple)  # return_dict=False: (loss, logits, ...) with labels, else (logits, ...)
        at = int(labels is not None) if tuple_out else None
        logits = out[at] if tuple_out else out.logits  # [B, T', V]; T' = T or the positions kept
        z = self._keys(logits.shape[0])[:, -logits.shape[1]:]  # [B, T', d]: the queries of the returned positions
        lm_logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T', V]
        sel = torch.ones(lm_logp.shape[:2], dtype=torch.bool, device=lm_logp.device)  # [B, T']
        mask = self._mask
        if mask is not None and mask.dim() == 2 and mask.shape[1] >= logits.shape[1]:
            sel = mask[:, -logits.shape[1]:].to(lm_logp.device).bool()  # padding is not queried
        new = lm_logp
        if self.tracker is not None:
            return self._finish_out(out, tuple_out, at, self._stateful(lm_logp, sel), labels)
        if sel.any():
            q = z[sel.to(z.device)]  # [n, d]
            self.n_queries += q.shape[0]
            new = lm_logp.clone()
            if self.retriever is not None:
                dists, vals = self.retriever.search(q)  # [n, k] each
                knn_logp = knn_log_probs(dists, vals, lm_logp.shape[-1], self.retriever.args.knn_temp)  # [n, V]
                mixed = interpolate(lm_logp[sel], knn_logp.to(lm_logp.device), self.lmbda)
                new[sel] = lm_where(no_neighbours(dists), lm_logp[sel], mixed)
            else:
                new[sel] = interpolate(lm_logp[sel], self.memory.log_probs(q).to(lm_logp.device), self.lmbda)
        return self._finish_out(out, tuple_out, at, new, labels)

    def _keys(self, batch: int) -> torch.Tensor:
        """The captured keys as [B, T, d]: OPT runs its FFN on flattened rows, so its ffn_* captures are [B*T, d]."""
        z = self._caps[self.key_point]
        return z if z.dim() == 3 else z.reshape(batch, -1, z.shape[-1])

    def _stateful(self, lm_logp: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """log p_knnlm [B, T', V] of RetoMaton / the random-skip kNN-LM: the tracker steps every real input position
        (the state needs them) and returns p_knn at the returned ones; a position without neighbours keeps the LM."""
        z = self._keys(lm_logp.shape[0])  # [B, T, d]
        ids = self._ids if self._ids is not None else torch.zeros(z.shape[:2], dtype=torch.long)
        mask = torch.ones(z.shape[:2], dtype=torch.bool)
        if self._mask is not None and self._mask.dim() == 2 and self._mask.shape[1] >= ids.shape[1]:
            mask = self._mask[:, -ids.shape[1]:].cpu().bool()  # (with a cache the mask covers the past too)
        before = self.tracker.automaton.steps
        knn_logp, none = self.tracker.log_probs(z, ids.cpu(), mask, self._past, lm_logp.shape[1], lm_logp.shape[-1])
        self.n_queries += self.tracker.automaton.steps - before
        mixed = interpolate(lm_logp[sel], knn_logp.to(lm_logp.device), self.lmbda)  # [n, V]
        new = lm_logp.clone()
        new[sel] = lm_where(none, lm_logp[sel], mixed)
        return new

    def _finish_out(self, out, tuple_out: bool, at, new: torch.Tensor, labels):
        loss = None
        if labels is not None and new.shape[1] == labels.shape[1]:
            # the causal-LM loss of the returned distribution: mean NLL of token t+1 at position t, -100 ignored
            loss = torch.nn.functional.nll_loss(new[:, :-1].reshape(-1, new.shape[-1]),
                                                labels[:, 1:].reshape(-1).to(new.device), ignore_index=-100)
        if tuple_out:
            return (loss, new, *out[2:]) if at == 1 else (new, *out[1:])
        out.logits = new
        if loss is not None and getattr(out, "loss", None) is not None:
            out.loss = loss
        return out

    # ----------------------------------------------------------------------------------------------------- detaching
    def detach(self):
        """Removes the hooks; returns the plain model (its forward is the original one again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self.model, ATTR, None) is self:
            delattr(self.model, ATTR)
        return self.model

    def summary(self) -> str:
        """One line: what the logits come from."""
        if self.retriever is not None:
            return (f"kNN-LM: {self.retriever.ds.dir}, N={self.retriever.ds.N}, k={self.retriever.k}, "
                    f"λ={self.lmbda}, T={self.retriever.args.knn_temp}, key {self.key_point}")
        return f"MLP-LM: {self.memory.dir}, λ={self.lmbda}, key {self.key_point}"

    def describe(self) -> dict:
        out = {"lmbda": self.lmbda, "key_point": self.key_point}
        if self.retriever is not None:
            out.update(datastore=str(self.retriever.ds.dir), datastore_N=self.retriever.ds.N, k=self.retriever.k,
                       knn_temp=self.retriever.args.knn_temp)
            if self.tracker is not None:
                a = self.retriever.args
                out.update(retomaton=a.retomaton, min_knns=a.min_knns, max_knns=a.max_knns, no_pointer=a.no_pointer,
                           no_clusters=a.no_clusters, skip_search_prob=a.skip_search_prob,
                           **self.tracker.automaton.metrics())
        else:
            out.update(mlp_memory=str(self.memory.dir))
        return out


def _as_lm(model, tokenizer):
    """An ``LM`` (models.py) around a loaded HF causal LM, or the given ``LM`` itself."""
    from .models import LM

    if isinstance(model, LM):
        return model
    if isinstance(model, (str, Path)):  # (an AttributeError deep in models.py before)
        raise KnnlmError(f"augment: model {str(model)!r} is a name, not a model; load it first (transformers' "
                         "AutoModelForCausalLM.from_pretrained, or knnlm.models.load_model)")
    if tokenizer is None:
        raise KnnlmError("augment: pass the tokenizer with an HF model (it is checked against the datastore's)")
    return LM(model, tokenizer, name=getattr(model, "name_or_path", "") or "")


def augment(model, tokenizer=None, *, datastore=None, mlp_memory=None, key_point: Optional[str] = None, index=None,
            **knn_settings):
    """Makes ``model``'s forward return log p_knnlm (with ``datastore``) or log p_mlplm (with ``mlp_memory``).

    ``model``: a ``knnlm.models.LM`` or a loaded HF causal LM (then ``tokenizer`` is required). ``datastore``: a folder
    or an open ``Datastore``; ``mlp_memory``: a folder or a loaded ``MLPMemory``. A store or memory built for other
    weights, another tokenizer or (when ``key_point`` is given) another key point is refused, as in ``knnlm eval``.
    ``knn_settings``: any field of :class:`knnlm.knn.KNNArgs` (``k``, ``lmbda`` — one value —, ``knn_temp``,
    ``recompute_dists``, ``nprobe``, ``search_backend``, ...), with its defaults.
    Returns the HF model itself, augmented in place; ``detach(model)`` restores it.
    """
    from .datastore import Datastore
    from .memory import MLPMemory

    lm = _as_lm(model, tokenizer)
    if hasattr(lm.model, ATTR):
        raise KnnlmError("augment: this model is augmented already; detach(model) first")
    if (datastore is None) == (mlp_memory is None):
        raise KnnlmError("augment: pass exactly one of datastore= and mlp_memory=")
    args = knn_args(**knn_settings)
    args.refuse_inactive(datastore=datastore is not None, memory=mlp_memory is not None)  # as the CLI's do
    retriever = memory = None
    if datastore is not None:
        ds = Datastore.open(datastore)
        ds.check_compatible(lm, key_point)
        retriever = Retriever(ds, args, index=index)
    else:
        memory = mlp_memory if isinstance(mlp_memory, MLPMemory) else MLPMemory.load(Path(mlp_memory), lm, key_point)
    aug = Augmentation(lm, args.lmbda[0], retriever=retriever, memory=memory)
    log.info("augmented %s: %s", lm.name or lm.model_type, aug.describe())
    return lm.model


def knn_args(**settings) -> KNNArgs:
    """KNNArgs from keyword settings (KNNArgs' defaults for the rest), validated; ``lmbda`` is one value (a float or
    a one-element list): an augmented model interpolates with one λ."""
    names = {f.name for f in fields(KNNArgs)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise KnnlmError(f"augment: unknown setting(s) {', '.join(unknown)}; the kNN settings are {', '.join(sorted(names))}")
    if "lmbda" in settings:
        lmbda = settings["lmbda"]
        lmbda = list(lmbda) if isinstance(lmbda, (list, tuple)) else [lmbda]
        if len(lmbda) != 1:
            raise KnnlmError(f"--lmbda: the augmented model takes one λ, got {','.join(map(str, lmbda))}")
        settings["lmbda"] = [float(lmbda[0])]
    args = KNNArgs(**settings)
    args.validate()
    return args


def detach(model):
    """Removes what :func:`augment` attached; returns the plain model. A plain model is returned unchanged."""
    aug = getattr(model, ATTR, None)
    return aug.detach() if isinstance(aug, Augmentation) else model


def augment_from_args(lm, aug: AugmentArgs, knn: KNNArgs):
    """The CLI's entry: augments ``lm.model`` from ``--datastore``/``--mlp_memory`` and ``--k --lmbda --knn_temp``;
    returns the model, or None when neither memory is given."""
    if not aug.datastore and not aug.mlp_memory:
        return None
    if knn.ignore_top:
        raise KnnlmError("--ignore_top: not meaningful for an augmented model (it drops the nearest neighbour of "
                         "every query); leave it off")
    return augment(lm, datastore=aug.datastore, mlp_memory=aug.mlp_memory, **asdict(knn))


class _NoBackward(torch.autograd.Function):
    """Passes a tensor through; its backward is a clear error: the kNN / MLP scores are computed without gradients,
    so an augmented model cannot be trained (docs/python_api.md, "Fine-tuning")."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        raise KnnlmError("backward(): a knnlm-augmented model is inference-only (its kNN/MLP scores carry no "
                         "gradient); fine-tune the plain model (augmentation.detach(), or before knnlm.augment) and "
                         "augment it again")


def _inference_only(out):
    """The augmented logits and loss of ``out`` made to fail clearly on ``backward()`` (with grad enabled)."""
    if isinstance(out, tuple):
        return tuple(_NoBackward.apply(t.detach().requires_grad_()) if torch.is_tensor(t) and t.is_floating_point()
                     and i < 2 else t for i, t in enumerate(out))
    for name in ("logits", "loss"):
        value = getattr(out, name, None)
        if torch.is_tensor(value):
            setattr(out, name, _NoBackward.apply(value.detach().requires_grad_()))
    return out


# ---------------------------------------------------------------------------------------------------------- generation
MAX_BEAMS = 64


@dataclass
class GenerateArgs:
    prompt_file: Optional[str] = field(default=None, metadata={"help": "Prompts, one per line (.txt) or one per JSONL row (field `prompt`, else `text`); adds to --prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per prompt (GenerationConfig.max_new_tokens)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy / beam search."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_k: int = field(default=50, metadata={"help": "Sample from the k most likely tokens (0: all; with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1: none)."})
    seed: int = field(default=0, metadata={"help": "torch seed set before each prompt's generation (sampling)."})
    compare: bool = field(default=False, metadata={"help": "Also generate with the plain LM and show both continuations."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for results.json / results.md (optional)."})
    skip_bad_rows: bool = skip_bad_rows_field()
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier `knnlm generate` run of other settings in --output_dir (anything else is never overwritten)."})

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise KnnlmError(f"--max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        require_finite("temperature", self.temperature)
        require_seed("seed", self.seed)
        if self.top_k < 0:
            raise KnnlmError(f"--top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise KnnlmError(f"--top_p: must be in (0, 1], got {self.top_p}")
        idle = changed_fields(self, ("temperature", "top_k", "top_p"))
        if idle and not self.do_sample:  # greedy and beam search never read them: the run would not be the one asked for
            raise KnnlmError(f"--{idle[0]}: a sampling setting, which acts only with --do_sample true; pass that, or "
                             f"drop --{idle[0]}")
        if not 1 <= self.num_beams <= MAX_BEAMS:  # each beam holds its own KV cache and vocabulary-wide scores
            raise KnnlmError(f"--num_beams: must be in [1, {MAX_BEAMS}], got {self.num_beams} (memory grows with the "
                             "beams: each keeps its own KV cache and a score per vocabulary entry)")

    def generation_kwargs(self) -> dict:
        """The keyword arguments of ``model.generate`` (sampling knobs only when sampling)."""
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kw

    def generation_config(self, lm):
        """The ``GenerationConfig`` of these settings for ``lm`` (a ``knnlm.models.LM``); :func:`generate` runs it
        alone: of the checkpoint's generation_config.json only its end tokens (``lm.stop_token_ids``)."""
        from transformers import GenerationConfig

        eos, pad = lm.eos_token_id, lm.tokenizer.pad_token_id
        return GenerationConfig(**self.generation_kwargs(), eos_token_id=list(lm.stop_token_ids) or None,
                                pad_token_id=eos if pad is None else pad)


def generate(lm, input_ids: torch.Tensor, generation_config, **kwargs) -> torch.Tensor:
    """``lm.model.generate`` on input_ids [B, T] with exactly ``generation_config``. ``generate`` fills every field of
    it left unset from the model's own generation_config (the checkpoint's generation_config.json: a repetition
    penalty, suppress_tokens, min_p, bad_words_ids, forced tokens, sequence_bias...), which changed greedy and sampled
    text away from what was asked; so while it runs the model's is a bare one. On a PEFT model that is the base model's,
    which PEFT's generate copies from."""
    from transformers import GenerationConfig

    owner = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
    saved = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        return lm.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=generation_config, **kwargs)
    finally:
        owner.generation_config = saved


def read_prompts(prompts: list[str] | None, prompt_file: Optional[str],
                 skip_bad_rows: bool = False) -> tuple[list[str], int]:
    """--prompt values followed by the prompts of --prompt_file (.txt: one a line; .jsonl: `prompt` or `text`, a
    string); returns them and the number of JSONL rows skipped (``skip_bad_rows``; else such a row is an error)."""
    import json

    from .corpus import BOM, BadRows

    out = list(prompts or [])
    rows = BadRows("--prompt_file", "prompt", skip_bad_rows)
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise KnnlmError(f"--prompt_file: {path} {what}; pass a .txt (one prompt a line) or .jsonl file")
        try:
            text = path.read_text(encoding="utf-8").removeprefix(BOM)  # (as a corpus drops it; byte offsets kept)
            lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        except UnicodeDecodeError as e:
            raise KnnlmError(f"--prompt_file: {path} is not UTF-8 at byte {e.start} (0x{e.object[e.start]:02x}); "
                             "re-encode it (e.g. `iconv -f latin1 -t utf-8`)") from None
        if path.suffix in JSONL_SUFFIXES:
            for i, ln in lines:
                try:
                    row = json.loads(ln)
                except ValueError:
                    rows.bad(f"{path}:{i}", "is not valid JSON", "one JSON object per line is expected")
                    continue
                text = rows.text(row, f"{path}:{i}", fields=("prompt", "text"))
                if text is not None:
                    out.append(text)
        else:
            out += [ln for _, ln in lines]
    if not out or not all(isinstance(p, str) and p for p in out):
        raise KnnlmError("--prompt/--prompt_file: give at least one non-empty prompt")
    return out, rows.count


@torch.no_grad()
def generate_continuations(lm, prompts: list[str], args: GenerateArgs) -> list[dict]:
    """``lm.model.generate`` on each prompt (one at a time, seeded): [{"prompt", "text", "n_tokens", "seconds"}]."""
    import time

    out = []
    for prompt in prompts:
        ids = lm.encode(prompt)
        if len(ids) + args.max_new_tokens > lm.max_positions:
            raise KnnlmError(f"--max_new_tokens: the prompt {prompt[:40]!r} has {len(ids)} tokens; with "
                             f"{args.max_new_tokens} new ones it exceeds the model's {lm.max_positions} positions")
        x = torch.tensor([ids], device=lm.device)  # [1, T]
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        seq = generate(lm, x, args.generation_config(lm))[0, len(ids):]
        seconds = time.perf_counter() - t0
        text = lm.tokenizer.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        out.append({"prompt": prompt, "text": text, "n_tokens": int(seq.numel()), "seconds": seconds})
    return out
