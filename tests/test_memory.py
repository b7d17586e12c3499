"""MLP memory: the formula on hand-set weights, overfitting, save/load, storage, refusals, resume, evaluation and CLI.

Most tests use a stand-in LM with a small vocabulary (the memory only needs its output layer and hashes) so training
steps are cheap; the evaluation and CLI tests use the tiny GPT-2.
"""
import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import brute_knn_gold_prob
import knnlm.memory as memory_mod
import knnlm.train as train_mod
from knnlm.cli import main
from knnlm.corpus import CorpusArgs, TokenFile
from knnlm.datastore import Datastore, build_datastore
from knnlm.errors import KnnlmError
from knnlm.evaluate import EvalArgs, evaluate
from knnlm.knn import KNNArgs
from knnlm.memory import MemoryArgs, MLPMemory, epoch_batches, train_memory


class StubLM:
    """What the memory uses of an LM: output layer W [V, d], hidden size, device, hashes, name, config."""

    def __init__(self, d=16, vocab=40, seed=0, activation="gelu_new"):
        g = torch.Generator().manual_seed(seed)
        self.output_layer = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.output_layer.weight.copy_(torch.randn(vocab, d, generator=g))
        self.hidden_size, self.vocab_size, self.device, self.name = d, vocab, torch.device("cpu"), f"stub-{seed}"
        self.model = SimpleNamespace(config=SimpleNamespace(activation_function=activation))
        self._seed = seed

    def weights_hash(self):
        return f"weights{self._seed:012d}"

    def tokenizer_hash(self):
        return "tokenizer0000000"


def make_store(folder: Path, lm, keys: np.ndarray, vals: np.ndarray, key_point="ffn_input") -> Datastore:
    """A finished datastore folder in the on-disk format of datastore.py, with the given rows."""
    folder.mkdir(parents=True, exist_ok=True)
    keys.astype(np.float16).tofile(folder / "keys.f16")
    vals.astype(np.int32).tofile(folder / "vals.i32")
    meta = {"format": "knnlm-datastore/1", "model_name_or_path": lm.name, "weights_hash": lm.weights_hash(),
            "tokenizer_hash": lm.tokenizer_hash(), "key_point": key_point, "d": keys.shape[1], "N": len(vals),
            "corpus_hash": "c0ffee"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return Datastore.open(folder)


def random_store(folder, lm, n=64, seed=0):
    g = np.random.default_rng(seed)
    return make_store(folder, lm, g.standard_normal((n, lm.hidden_size)), g.integers(0, lm.vocab_size, n))


def fast_args(ds, out, **kw):
    base = dict(datastore=str(ds.dir), output_dir=str(out), hidden_size=32, learning_rate=1e-2, batch_tokens=16,
                micro_batch_tokens=16, epochs=3, chunk_keys=24, checkpoint_every=1000, log_every=1)
    return MemoryArgs(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------- formula
def _gelu_new(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_forward_matches_formula_on_hand_set_weights():
    # d = 2, hidden = 3, V = 3; logits = W(z + LN(MLP(z))) computed by hand
    W = nn.Linear(2, 3, bias=False)
    mem = MLPMemory(2, 3, 3, "gelu_new", output_layer=W)
    with torch.no_grad():
        W.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        mem.mlp[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        mem.mlp[0].bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        mem.mlp[2].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]))
        mem.mlp[2].bias.copy_(torch.tensor([0.0, -1.0]))
        mem.ln.weight.copy_(torch.tensor([2.0, 0.5]))
        mem.ln.bias.copy_(torch.tensor([0.1, 0.0]))
    z = np.array([1.0, 2.0])
    a = _gelu_new(np.array([1.0, 2.5, -1.0]))  # hidden pre-activations: z0, z1 + 0.5, z0 - z1
    m = np.array([a[0], 2 * a[1] + a[2] - 1.0])
    normed = (m - m.mean()) / math.sqrt(m.var() + 1e-5)  # LayerNorm: biased variance, eps 1e-5
    h = z + normed * np.array([2.0, 0.5]) + np.array([0.1, 0.0])
    logits = np.array([h[0], h[1], h[0] + h[1]])
    expected = logits - np.log(np.exp(logits).sum())
    with torch.no_grad():
        got = mem.log_probs(torch.tensor(z[None], dtype=torch.float32))[0].double().numpy()
        assert mem(torch.tensor(z[None], dtype=torch.float16)).dtype == torch.float32  # keys arrive as float16
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_activation_follows_the_lm(tiny_lm):
    assert memory_mod.lm_activation(tiny_lm) == "gelu_new"  # GPT-2's MLP activation
    assert memory_mod.lm_activation(StubLM(activation="silu")) == "silu"
    with pytest.raises(KnnlmError, match="--activation"):
        MLPMemory(4, 4, 4, "no-such-activation")


# ---------------------------------------------------------------------------------------------------------------- data order
def test_epoch_batches_visit_every_row_once_and_resume_mid_epoch(tmp_path):
    lm = StubLM(d=4, vocab=1000)
    n = 50
    ds = make_store(tmp_path / "ds", lm, np.arange(n * 4).reshape(n, 4) % 97, np.arange(n))
    batches = list(epoch_batches(ds, batch_tokens=8, chunk_keys=12, seed=3, epoch=0))
    order = np.concatenate([v for _, v in batches])
    assert sorted(order) == list(range(n)) and order.tolist() != list(range(n))
    assert [len(v) for _, v in batches] == [8] * 6 + [2]  # batches span chunks; the last one is short
    for k, v in batches:  # keys stay paired with their values
        np.testing.assert_array_equal(k, np.asarray(ds.keys)[v])
    rest = np.concatenate([v for _, v in epoch_batches(ds, 8, 12, seed=3, epoch=0, start_batch=4)])
    np.testing.assert_array_equal(rest, order[32:])
    other = np.concatenate([v for _, v in epoch_batches(ds, 8, 12, seed=3, epoch=1)])
    assert sorted(other) == list(range(n)) and other.tolist() != order.tolist()
    # chunks are contiguous row ranges [12c, 12c + 12), read in the epoch's chunk order, each shuffled inside
    chunks = memory_mod.epoch_chunks(n, 12, seed=3, epoch=0)
    pos = 0
    for c in chunks:
        rows = list(range(12 * c, min(n, 12 * c + 12)))
        assert sorted(order[pos: pos + len(rows)]) == rows
        pos += len(rows)
    assert chunks.tolist() != sorted(chunks.tolist())


# ---------------------------------------------------------------------------------------------------------------- training
def test_overfits_a_tiny_datastore(tmp_path):
    lm = StubLM()
    ds = random_store(tmp_path / "ds", lm, n=64)
    mem = train_memory(lm, ds, fast_args(ds, tmp_path / "mem", hidden_size=64, learning_rate=3e-2, batch_tokens=64,
                                         micro_batch_tokens=32, epochs=150, chunk_keys=64, log_every=10))
    record = json.loads((tmp_path / "mem" / "train.json").read_text())
    assert record["first_loss"] > 2.0 and record["final_loss"] < 0.05
    assert record["last_fifth_drop"] is not None and record["last_fifth_drop"] < 0.5  # recorded with every memory
    assert record["steps"] == 150 and record["pairs"] == 150 * 64
    assert record["pairs_per_s"] == pytest.approx(record["pairs"] / record["train_s"])
    with torch.no_grad():
        logp = mem.log_probs(torch.from_numpy(np.array(ds.keys)))
    assert (logp.argmax(-1).numpy() == np.asarray(ds.vals)).all()
    assert not (tmp_path / "mem" / "checkpoint").exists() and (tmp_path / "mem" / "loss.png").is_file()
    # W stayed the LM's and is not stored
    assert mem.output is None and "output.weight" not in mem.state_dict()


def test_frozen_output_layer_is_not_updated_and_trained_copy_is(tmp_path):
    lm = StubLM()
    before = lm.output_layer.weight.detach().clone()
    ds = random_store(tmp_path / "ds", lm, n=32)
    train_memory(lm, ds, fast_args(ds, tmp_path / "frozen", epochs=2))
    assert torch.equal(lm.output_layer.weight, before) and lm.output_layer.weight.grad is None
    mem = train_memory(lm, ds, fast_args(ds, tmp_path / "trained", epochs=2, train_output_layer=True))
    assert torch.equal(lm.output_layer.weight, before)
    assert not torch.equal(mem.output.weight, before)  # the memory's own copy moved


def test_epoch_pairs_start_at_equals_skipping_the_first_micro_batches(tmp_path):
    lm = StubLM(d=4, vocab=1000)
    ds = make_store(tmp_path / "ds", lm, np.arange(50 * 4).reshape(50, 4) % 97, np.arange(50))
    # batches of 16 split into micro-batches 6, 6, 4; chunks of 12 rows, so batches span chunks; the last batch is 2
    pairs = memory_mod._EpochPairs(ds, fast_args(ds, tmp_path / "m", micro_batch_tokens=6, chunk_keys=12), epoch=1)
    every = [b["labels"].tolist() for b in pairs]
    assert len(every) == len(pairs) == 3 * 3 + 1 and sum(map(len, every)) == 50
    for i in range(len(every) + 1):
        assert [b["labels"].tolist() for b in pairs.start_at(i)] == every[i:], i


def _train_until_killed(lm, ds, args, monkeypatch, at_step: int) -> None:
    """Trains until the process "dies" (KeyboardInterrupt) during optimiser step ``at_step``; restores the step."""
    real, calls = train_mod._step, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train_memory(lm, ds, args)
    monkeypatch.setattr(train_mod, "_step", real)


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    lm = StubLM()
    ds = random_store(tmp_path / "ds", lm, n=60)
    args = dict(epochs=3, checkpoint_every=2)  # 4 steps per epoch (60 pairs / 16), 12 in all
    train_memory(lm, ds, fast_args(ds, tmp_path / "ref", **args))
    real = train_mod._step
    _train_until_killed(lm, ds, fast_args(ds, tmp_path / "resumed", **args), monkeypatch, at_step=8)  # checkpoint: step 6
    assert (tmp_path / "resumed" / "checkpoint").is_dir() and not (tmp_path / "resumed" / "memory.json").exists()
    resumed_steps, reads = [], []
    monkeypatch.setattr(train_mod, "_step", lambda *a, **k: resumed_steps.append(1) or real(*a, **k))
    real_batches = memory_mod.epoch_batches
    monkeypatch.setattr(memory_mod, "epoch_batches",
                        lambda *a, **k: reads.append((a[4], k.get("start_batch", 0))) or real_batches(*a, **k))
    train_memory(lm, ds, fast_args(ds, tmp_path / "resumed", **args))
    assert len(resumed_steps) == 12 - 6  # continued from the checkpoint at step 6
    # the interrupted epoch (1) is entered at its third batch, not read from its start; epoch 2 from the start
    assert [r for r in reads if r[0] >= 1][:1] == [(1, 2)] and (2, 0) in reads
    ref = (tmp_path / "ref" / "memory.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "memory.safetensors").read_bytes() == ref
    losses = [json.loads((tmp_path / d / "train.json").read_text())["loss_curve"] for d in ("ref", "resumed")]
    assert [p["loss"] for p in losses[0]] == [p["loss"] for p in losses[1]]


def test_rerun_returns_the_trained_memory_and_different_args_are_refused(tmp_path, monkeypatch):
    lm = StubLM()
    ds = random_store(tmp_path / "ds", lm, n=32)
    first = train_memory(lm, ds, fast_args(ds, tmp_path / "mem", epochs=1))
    monkeypatch.setattr(train_mod, "_step", lambda *a, **k: pytest.fail("a finished memory was retrained"))
    again = train_memory(lm, ds, fast_args(ds, tmp_path / "mem", epochs=1, log_every=5))  # logging is free to change
    z = torch.from_numpy(np.array(ds.keys))
    assert torch.equal(first.log_probs(z), again.log_probs(z))
    with pytest.raises(KnnlmError, match="--output_dir: .* different MLP memory.*--overwrite"):
        train_memory(lm, ds, fast_args(ds, tmp_path / "mem", epochs=2))


def test_datastore_of_another_model_is_refused_before_training(tmp_path):
    ds = random_store(tmp_path / "ds", StubLM(seed=0), n=16)
    with pytest.raises(KnnlmError, match="--datastore: .* different model weights"):
        train_memory(StubLM(seed=1), ds, fast_args(ds, tmp_path / "mem"))
    assert not (tmp_path / "mem").exists()


def test_bad_arguments():
    for kw, flag in ((dict(datastore=None), "--datastore"), (dict(output_dir=None), "--output_dir"),
                     (dict(hidden_size=0), "--hidden_size"), (dict(learning_rate=0.0), "--learning_rate"), (dict(max_steps=-1), "--max_steps")):
        args = MemoryArgs(**{"datastore": "ds", "output_dir": "out", **kw})
        with pytest.raises(KnnlmError, match=flag):
            args.validate()


# ---------------------------------------------------------------------------------------------------------------- storage
def test_save_load_round_trip_and_storage_count(tmp_path):
    lm = StubLM()
    ds = random_store(tmp_path / "ds", lm, n=32)
    for name, trained_w in (("frozen", False), ("trained", True)):
        mem = train_memory(lm, ds, fast_args(ds, tmp_path / name, epochs=1, train_output_layer=trained_w))
        loaded = MLPMemory.load(tmp_path / name, lm)
        z = torch.from_numpy(np.array(ds.keys))
        assert torch.equal(loaded.log_probs(z), mem.log_probs(z))
        d, h, V = lm.hidden_size, 32, lm.vocab_size
        n_params = d * h + h + h * d + d + 2 * d + (V * d if trained_w else 0)
        assert mem.n_parameters() == loaded.n_parameters() == n_params
        folder = tmp_path / name
        blob = (folder / "memory.safetensors").read_bytes()
        header = 8 + struct.unpack("<Q", blob[:8])[0]
        assert len(blob) == header + 4 * n_params  # float32 tensors + the safetensors header
        assert mem.nbytes() == loaded.nbytes() == len(blob) + (folder / "memory.json").stat().st_size
        assert (folder / "memory.json").stat().st_size < 8192
        cfg = json.loads((folder / "memory.json").read_text())
        assert cfg["weights_hash"] == lm.weights_hash() and cfg["key_point"] == "ffn_input"
        assert cfg["datastore"]["N"] == 32 and len(cfg["datastore"]["meta_sha256"]) == 64


def test_load_refuses_another_model_tokenizer_or_key_point(tmp_path):
    lm = StubLM()
    ds = random_store(tmp_path / "ds", lm, n=16)
    train_memory(lm, ds, fast_args(ds, tmp_path / "mem", epochs=1))
    with pytest.raises(KnnlmError, match="--mlp_memory: .* different model weights") as e:
        MLPMemory.load(tmp_path / "mem", StubLM(seed=7))
    assert "\n" not in str(e.value)
    other_tok = StubLM()
    other_tok.tokenizer_hash = lambda: "tokenizer9999999"
    with pytest.raises(KnnlmError, match="--mlp_memory: .* different tokenizer"):
        MLPMemory.load(tmp_path / "mem", other_tok)
    with pytest.raises(KnnlmError, match="--key_point: .* 'ffn_input' keys, not 'block_output'"):
        MLPMemory.load(tmp_path / "mem", lm, key_point="block_output")
    with pytest.raises(KnnlmError, match="--mlp_memory: .* not a trained memory"):
        MLPMemory.load(tmp_path / "nowhere", lm)
    (tmp_path / "mem" / "memory.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(KnnlmError, match="cannot be read"):
        MLPMemory.load(tmp_path / "mem", lm)


# ---------------------------------------------------------------------------------------------------------------- with the tiny GPT-2
TRAIN = "the cat sat on the mat. the dog sat on the log. a cat and a dog sat together.\n" * 2
VALID = "the dog sat on the mat. a cat sat on the log.\n"


@pytest.fixture(scope="module")
def gpt2_store(tiny_lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mem_gpt2")
    (folder / "train.txt").write_text(TRAIN)
    (folder / "valid.txt").write_text(VALID)
    build_datastore(tiny_lm, CorpusArgs(train_file=str(folder / "train.txt"), block_size=32, stride=16),
                    folder / "ds", batch_size=4)
    return folder


def test_evaluate_lambda0_is_the_lm_and_mixture_matches_by_hand(tiny_lm, gpt2_store, tmp_path):
    ds = Datastore.open(gpt2_store / "ds")
    mem = train_memory(tiny_lm, ds, MemoryArgs(datastore=str(ds.dir), output_dir=str(tmp_path / "mem"), hidden_size=32,
                                               learning_rate=1e-2, batch_tokens=32, epochs=1))
    corpus = CorpusArgs(validation_file=str(gpt2_store / "valid.txt"), block_size=64)
    metrics = evaluate(tiny_lm, corpus, tmp_path / "eval", EvalArgs(output_dir=str(tmp_path / "eval")),
                       knn=KNNArgs(lmbda=[0.0, 0.5]), memory=mem)
    assert metrics["sweep_mlp"]["0.0"] == metrics["ppl_lm"]  # λ = 0: exactly the LM
    # λ = 0.5 by hand: the whole text is one window; p = (p_lm + p_mem) / 2 at every target
    ids = np.asarray(TokenFile(tmp_path / "eval" / "tokens.i32", tmp_path / "eval" / "tokens.i32.docs").tokens)
    x = torch.tensor(ids[None], dtype=torch.long)
    with torch.no_grad():
        logits, caught = tiny_lm.forward(x, torch.ones_like(x), key_points=("ffn_input",))
        p_lm = torch.softmax(logits[0, :-1].double(), -1)
        p_mem = mem.log_probs(caught["ffn_input"][0, :-1]).double().exp()
    gold = torch.from_numpy(ids[1:].astype(np.int64))
    mix = 0.5 * p_lm.gather(1, gold[:, None]) + 0.5 * p_mem.gather(1, gold[:, None])
    assert metrics["sweep_mlp"]["0.5"] == pytest.approx(math.exp(-float(mix.log().mean())), rel=1e-4)
    assert metrics["storage"]["mlp_memory_bytes"] == mem.nbytes()


def test_cli_train_then_eval_reports_mlplm_and_storage(tiny_gpt2_dir, tiny_lm, gpt2_store, tmp_path, capsys):
    mem_dir = tmp_path / "mem"
    rc = main(["mlp", "train", "--datastore", str(gpt2_store / "ds"), "--model_name_or_path", str(tiny_gpt2_dir),
               "--device", "cpu", "--output_dir", str(mem_dir), "--hidden_size", "16", "--batch_tokens", "64",
               "--epochs", "1", "--learning_rate", "1e-3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "pairs/s" in out and "datastore (keys + values)" in out
    result = json.loads((mem_dir / "results.json").read_text())
    storage = result["metrics"]["storage"]
    ds = Datastore.open(gpt2_store / "ds")
    assert storage["datastore_bytes"] == ds.nbytes() == ds.N * (64 * 2 + 4)
    assert storage["datastore_over_mlp"] == pytest.approx(storage["datastore_bytes"] / storage["mlp_memory_bytes"])
    assert result["metrics"]["training"]["steps"] == math.ceil(ds.N / 64)
    assert json.loads((mem_dir / "config.json").read_text())["hidden_size"] == 16

    ev = tmp_path / "eval"
    rc = main(["eval", "--model_name_or_path", str(tiny_gpt2_dir), "--device", "cpu", "--validation_file",
               str(gpt2_store / "valid.txt"), "--datastore", str(gpt2_store / "ds"), "--mlp_memory", str(mem_dir),
               "--lmbda", "0,0.25", "--k", "8", "--output_dir", str(ev)])
    assert rc == 0
    metrics = json.loads((ev / "results.json").read_text())["metrics"]
    assert metrics["sweep_mlp"]["0.0"] == metrics["ppl_lm"] and metrics["ppl_mlplm"] == metrics["sweep_mlp"]["0.0"]
    assert metrics["sweep_knn"]["0.0"] == metrics["ppl_lm"] and metrics["ppl_knnlm"] == metrics["sweep_knn"]["0.0"]
    assert "MLP-LM" in capsys.readouterr().out
    # λ = 0.25 by hand, from the memory on disk and a brute-force search of the store's keys: the text is one window
    ids = np.asarray(TokenFile(ev / "tokens.i32", ev / "tokens.i32.docs").tokens)
    assert metrics["n_tokens"] == len(ids) - 1
    mem = MLPMemory.load(mem_dir, tiny_lm)
    x = torch.tensor(ids[None], dtype=torch.long)
    with torch.no_grad():
        logits, caught = tiny_lm.forward(x, torch.ones_like(x), key_points=("ffn_input",))
        q = caught["ffn_input"][0, :-1]
        p_lm = torch.softmax(logits[0, :-1].double(), -1)
        p_mem = mem.log_probs(q).double().exp()
    gold = ids[1:].astype(np.int64)
    at_gold = np.arange(len(gold)), gold
    keys = np.asarray(ds.keys, dtype=np.float64)  # [N, d] as stored (float16)
    vals = np.asarray(ds.vals, dtype=np.int64)
    p_knn = brute_knn_gold_prob(q.double().numpy(), keys, vals, gold, k=8, temp=1.0)  # --k 8 --knn_temp 1
    lm_gold, mem_gold = p_lm.numpy()[at_gold], p_mem.numpy()[at_gold]
    mlp_ref = math.exp(-np.log(0.75 * lm_gold + 0.25 * mem_gold).mean())
    knn_ref = math.exp(-np.log(0.75 * lm_gold + 0.25 * p_knn).mean())
    assert metrics["ppl_lm"] == pytest.approx(math.exp(-np.log(lm_gold).mean()), rel=1e-5)
    assert metrics["sweep_mlp"]["0.25"] == pytest.approx(mlp_ref, rel=1e-4)
    assert metrics["sweep_knn"]["0.25"] == pytest.approx(knn_ref, rel=1e-4)
    assert metrics["sweep_mlp"]["0.25"] != pytest.approx(metrics["ppl_lm"], rel=1e-3)
    assert metrics["sweep_knn"]["0.25"] != pytest.approx(metrics["ppl_lm"], rel=1e-3)
    assert metrics["storage"]["mlp_memory_bytes"] == storage["mlp_memory_bytes"]

    # the same memory with another model (same size, other seed) is refused with one line
    from knnlm.assets import build_scratch_gpt2

    other = build_scratch_gpt2("tiny", tmp_path / "other", seed=1, n_positions=128)
    rc = main(["eval", "--model_name_or_path", str(other), "--device", "cpu", "--validation_file",
               str(gpt2_store / "valid.txt"), "--mlp_memory", str(mem_dir), "--output_dir", str(tmp_path / "ev2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.endswith("train a memory for this model\n")
    (line,) = [ln for ln in err.splitlines() if "knnlm: error" in ln]
    assert line.startswith("knnlm: error: --mlp_memory:") and "different model weights" in line


def test_cli_truncated_datastore_is_reported_before_training(tiny_gpt2_dir, gpt2_store, tmp_path, capsys):
    import shutil

    broken = tmp_path / "ds"
    shutil.copytree(gpt2_store / "ds", broken)
    with open(broken / "keys.f16", "r+b") as fh:
        fh.truncate(100)
    rc = main(["mlp", "train", "--datastore", str(broken), "--model_name_or_path", str(tiny_gpt2_dir),
               "--output_dir", str(tmp_path / "mem")])
    err = capsys.readouterr().err
    assert rc == 2 and "--datastore:" in err and "truncated" in err
    assert not (tmp_path / "mem").exists()
    rc = main(["mlp", "train", "--datastore", str(tmp_path / "missing"), "--model_name_or_path", str(tiny_gpt2_dir),
               "--output_dir", str(tmp_path / "mem")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err and not (tmp_path / "mem").exists()


def test_last_fifth_drop_on_constructed_curves():
    from knnlm.memory import last_fifth_drop

    falling = [{"loss": float(x)} for x in range(10, 0, -1)]  # 10 points: fifths of 2; (3.5 - 1.5) / 3.5
    assert abs(last_fifth_drop(falling) - 2.0 / 3.5) < 1e-12
    assert last_fifth_drop([{"loss": 2.0}] * 7) == 0.0  # flat: plateaued
    assert last_fifth_drop([{"loss": 1.0}] * 4) is None  # too short to say


# ---------------------------------------------------------------------------------------------------------------- schedule, held-out loss
def test_cosine_schedule_decays_to_zero_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    lm = StubLM()
    ds = random_store(tmp_path / "ds", lm, n=60)
    args = dict(epochs=3, checkpoint_every=2, lr_scheduler_type="cosine")  # 4 steps per epoch, 12 in all
    seen = []
    real = train_mod._step
    monkeypatch.setattr(train_mod, "_step", lambda acc, mem, opt, *a, **k: seen.append(opt.param_groups[0]["lr"]) or real(acc, mem, opt, *a, **k))
    train_memory(lm, ds, fast_args(ds, tmp_path / "ref", **args))
    want = [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(12)]  # lr of step k+1: cosine over 12 steps
    assert seen == pytest.approx(want, rel=1e-9, abs=1e-15) and seen[-1] < 1e-3
    _train_until_killed(lm, ds, fast_args(ds, tmp_path / "resumed", **args), monkeypatch, at_step=8)  # checkpoint: step 6
    seen.clear()
    monkeypatch.setattr(train_mod, "_step", lambda acc, mem, opt, *a, **k: seen.append(opt.param_groups[0]["lr"]) or real(acc, mem, opt, *a, **k))
    train_memory(lm, ds, fast_args(ds, tmp_path / "resumed", **args))
    assert seen == pytest.approx(want[6:], rel=1e-9, abs=1e-15)  # the schedule resumed at step 6, not from the top
    assert (tmp_path / "resumed" / "memory.safetensors").read_bytes() == (tmp_path / "ref" / "memory.safetensors").read_bytes()
    # constant (the default) keeps the old fingerprint; a cosine memory is a different memory
    assert "lr_scheduler_type" not in memory_mod._fingerprint(lm, ds, fast_args(ds, tmp_path / "x"), "gelu_new")["training"]
    with pytest.raises(KnnlmError, match="different MLP memory"):
        train_memory(lm, ds, fast_args(ds, tmp_path / "ref", epochs=3))
    with pytest.raises(KnnlmError, match="--lr_scheduler_type"):
        fast_args(ds, tmp_path / "y", lr_scheduler_type="step").validate()


def test_heldout_loss_is_the_mean_cross_entropy_measured_every_epoch(tmp_path):
    lm = StubLM()
    ds = random_store(tmp_path / "ds", lm, n=48, seed=0)
    held = random_store(tmp_path / "held", lm, n=20, seed=1)
    (held.dir / "meta.json").write_text((held.dir / "meta.json").read_text().replace("c0ffee", "feed"))
    mem = train_memory(lm, ds, fast_args(ds, tmp_path / "mem", epochs=3, validation_datastore=str(held.dir)))
    record = json.loads((tmp_path / "mem" / "train.json").read_text())
    assert [p["epoch"] for p in record["heldout_curve"]] == [0.0, 1.0, 2.0, 3.0]  # untrained, then after every epoch
    with torch.no_grad():  # brute force: -log softmax of the memory's logits at the held-out values, averaged
        logp = torch.log_softmax(mem(torch.from_numpy(np.array(held.keys)).float()).double(), -1)
    want = -logp[torch.arange(20), torch.from_numpy(np.asarray(held.vals).astype(np.int64))].mean().item()
    assert record["heldout_final_loss"] == pytest.approx(want, rel=1e-5)
    assert record["heldout_best_loss"] == min(p["loss"] for p in record["heldout_curve"])
    # the training store itself, or a store of another model, is refused naming the flag
    with pytest.raises(KnnlmError, match="--validation_datastore: .* same text"):
        train_memory(lm, ds, fast_args(ds, tmp_path / "m2", validation_datastore=str(ds.dir)))
    other = random_store(tmp_path / "other", StubLM(seed=3), n=8)
    with pytest.raises(KnnlmError, match="--validation_datastore: .* different model weights"):
        train_memory(lm, ds, fast_args(ds, tmp_path / "m3", validation_datastore=str(other.dir)))
    with pytest.raises(KnnlmError, match="--validation_datastore: "):
        train_memory(lm, ds, fast_args(ds, tmp_path / "m4", validation_datastore=str(tmp_path / "nope")))


# ---------------------------------------------------------------------------------------------------------------- golden run
def test_seeded_training_gives_the_recorded_losses_and_weights(tmp_path):
    """Golden numbers of one seeded run (recorded 2026-12-06): 60 pairs in batches of 16 and micro-batches of 8, so
    every epoch ends on a short batch split unevenly (8 + 4). A change to the training loop that moves them changes
    every memory's numbers, and must say so."""
    lm = StubLM()
    ds = random_store(tmp_path / "ds", lm, n=60)
    mem = train_memory(lm, ds, fast_args(ds, tmp_path / "mem", micro_batch_tokens=8, epochs=3))
    record = json.loads((tmp_path / "mem" / "train.json").read_text())
    want = [13.5780582, 13.5174146, 12.0430412, 12.3452816, 8.1019394, 7.6891656, 9.1384759, 7.5670675, 4.448895,
            7.8120308, 6.0877457, 7.2877636]
    # rel 1e-4: room for another CPU's float rounding over 12 steps; a change of the loss or the step moves them more
    assert [p["loss"] for p in record["loss_curve"]] == pytest.approx(want, rel=1e-4)
    sums = {k: float(v.double().abs().sum()) for k, v in mem.state_dict().items()}
    with torch.no_grad():  # trained from inside another loop's evaluation (overspec): the same memory
        again = train_memory(lm, ds, fast_args(ds, tmp_path / "again", micro_batch_tokens=8, epochs=3))
    assert all(torch.equal(a, b) for a, b in zip(mem.state_dict().values(), again.state_dict().values()))
    assert sums == pytest.approx({"mlp.0.weight": 68.056588, "mlp.0.bias": 3.432234, "mlp.2.weight": 48.879904,
                                  "mlp.2.bias": 1.702361, "ln.weight": 14.942558, "ln.bias": 0.725703}, rel=1e-4)
