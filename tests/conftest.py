"""Shared fixtures: tiny random-init models (GPT-2, Llama, GPT-NeoX) with the GPT-2 tokenizer, the WikiText-2 folder."""
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: no hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_DIR = REPO.parent / "shared" / "data" / "wikitext-2"
GPT2_EOS = 50256


@pytest.fixture(autouse=True)
def _forget_claims():
    """fileio remembers, for the life of a process, the folders a command claimed empty (abandon_fresh_claims empties
    them when the command fails): in production one command per process; here one test's claims are not the next's."""
    yield
    from knnlm import fileio

    fileio.release_output_dirs()
    fileio._fresh_claims.clear()
    fileio._made_dirs.clear()


def window_gold_log_probs(model, tokens, block: int, stride: int):
    """The reference for `knnlm eval`: each of its windows over ``tokens`` (a ``corpus.TokenFile``) one forward of the
    HF ``model``, float64 log-softmax; -> (gold [n] int64, log p(gold) [n] float64 tensors), targets in text order."""
    import numpy as np

    from knnlm.corpus import windows

    arr = np.asarray(tokens.tokens, dtype=np.int64)
    golds, logps = [], []
    for w in windows(tokens.doc_starts, block, stride):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.from_numpy(arr[w.start: w.end])[None]).logits[0].double(),
                                     dim=-1)  # [T, V]
        gold = torch.from_numpy(arr[w.first_target: w.end])
        golds.append(gold)
        logps.append(logp[torch.arange(w.first_target - 1 - w.start, w.end - 1 - w.start), gold])
    return torch.cat(golds), torch.cat(logps)



def brute_knn_gold_prob(q, keys, vals, gold, k: int, temp: float):
    """The kNN distribution's probability of each gold token by brute force, in float64: squared L2 from every query
    to every key, the k nearest (ties by index), softmax of -distance / temp over them, the mass on the gold token.
    q [n, d], keys [N, d], vals [N], gold [n] -> [n]."""
    import numpy as np

    d = ((np.asarray(q, np.float64)[:, None, :] - np.asarray(keys, np.float64)[None]) ** 2).sum(-1)  # [n, N]
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    nd = np.take_along_axis(d, nn, 1)
    w = np.exp(-(nd - nd.min(1, keepdims=True)) / temp)
    return (w * (np.asarray(vals)[nn] == np.asarray(gold)[:, None])).sum(1) / w.sum(1)


# A reuse check pins each file's mtime to this old value first: a rewrite, or a replacement by a new file, stamps the
# current time, which an mtime compared before and after may not show (a rewrite within the clock's granularity).
OLD_NS = 1_000_000_000 * 10**9


def empty_list_ivf(store):
    """An IVF index over ``store``'s keys whose probed list is always empty, so every search finds no neighbour (ids
    -1, distances inf): every key goes to list 0 near the keys' mean, then the two centroids are swapped."""
    import faiss
    import numpy as np

    keys = np.asarray(store.keys, dtype=np.float32)
    near, far = keys.mean(0, keepdims=True), keys.mean(0, keepdims=True) + 1e4
    quantizer = faiss.IndexFlatL2(store.d)
    quantizer.add(np.concatenate([near, far]))
    ivf = faiss.IndexIVFFlat(quantizer, store.d, 2)
    ivf.add(keys)  # every key in list 0 (near the mean)
    quantizer.reset()
    quantizer.add(np.concatenate([far, near]))  # the keys' list now looks far: a query probes the empty list 1
    ivf.nprobe = 1
    return ivf


def file_stamps(paths) -> dict:
    """name -> (mtime ns, inode) of each file."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in paths}


def pin_mtimes(paths) -> dict:
    """Sets each file's mtime to ``OLD_NS``; -> :func:`file_stamps` as a file that is only read keeps them."""
    paths = list(paths)
    for p in paths:
        os.utime(p, ns=(OLD_NS, OLD_NS))
    return file_stamps(paths)


def save_tiny(model_cls, config, out_dir: Path, seed: int = 0) -> Path:
    """Saves a seeded random-init ``model_cls(config)`` and the GPT-2 tokenizer into ``out_dir``."""
    from transformers import AutoTokenizer

    from knnlm.assets import gpt2_tokenizer_dir

    torch.manual_seed(seed)
    model_cls(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_dir()).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """GPT-2, 2 layers, n_embd 64, 2 heads, n_positions 128, seed 0 (the scratch size ``tiny``)."""
    from knnlm.assets import build_scratch_gpt2

    return build_scratch_gpt2("tiny", tmp_path_factory.mktemp("tiny_gpt2"), seed=0, n_positions=128)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Llama, 2 layers, hidden 64, intermediate 128, 2 heads (1 key/value head: grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, tie_word_embeddings=False)
    return save_tiny(LlamaForCausalLM, config, tmp_path_factory.mktemp("tiny_llama"), seed=1)


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory) -> Path:
    """GPT-NeoX, 2 layers, hidden 64, 2 heads, sequential residual (``use_parallel_residual=False``)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=128, use_parallel_residual=False,
                           bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS)
    return save_tiny(GPTNeoXForCausalLM, config, tmp_path_factory.mktemp("tiny_neox"), seed=2)


@pytest.fixture(scope="session")
def tiny_lm(tiny_gpt2_dir):
    """The tiny GPT-2 loaded as a ``knnlm.models.LM`` (CPU, float32, eval mode). Do not modify its weights."""
    from knnlm.models import ModelArgs, load_model

    return load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cpu"))


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    """``../shared/data/wikitext-2`` (train.txt, valid.txt, test.txt); skips the test when it is absent."""
    if not (WIKITEXT_DIR / "valid.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT_DIR}")
    return WIKITEXT_DIR
