"""Macondo scoring against hand computations on the tiny GPT-2: vanilla, kNN (brute force), MLP memory, summaries, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from knnlm.macondo.generate import MacondoArgs, generate_macondo, read_split
from knnlm.macondo.score import encode_rows, score_split, summarize

K, TEMP = 8, 3.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_macondo(MacondoArgs(seed=2, num_villagers=40, num_parents=5,
                                        output_dir=str(tmp_path_factory.mktemp("m") / "d")))


@pytest.fixture(scope="module")
def rows(data):
    multi = {"text": "Sal Gougis is the parent of Zyxwvutsrq", "prefix": "Sal Gougis is the parent of",
             "target": " Zyxwvutsrq", "parent": "Sal Gougis", "n_children": 2, "attribute": None, "child": "Zyxwvutsrq"}
    return read_split(data, "test")[:8] + read_split(data, "train")[:4] + [multi]


@pytest.fixture(scope="module")
def datastore(tiny_lm, data, tmp_path_factory):
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import build_datastore

    args = CorpusArgs(train_file=str(data / "train.jsonl"), concat_documents=False)
    return build_datastore(tiny_lm, args, tmp_path_factory.mktemp("ds") / "ds", key_point="ffn_input", batch_size=16)


def _by_hand(lm, row):
    """Per target token: (log p_lm(gold), ffn_input query [d], block_output [d], gold) from one unpadded forward."""
    prefix = lm.encode(row["prefix"])
    target = lm.tokenizer(row["target"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix + target])
    with torch.no_grad():
        logits, caps = lm.forward(ids, torch.ones_like(ids), key_points=("ffn_input", "block_output"))
    logp = torch.log_softmax(logits[0].double(), dim=-1)  # [T, V]
    return [(float(logp[len(prefix) - 1 + j, t]), caps["ffn_input"][0, len(prefix) - 1 + j],
             caps["block_output"][0, len(prefix) - 1 + j], t) for j, t in enumerate(target)]


def test_vanilla_matches_hand_computation(tiny_lm, rows, caplog):
    assert len(tiny_lm.tokenizer(rows[-1]["target"], add_special_tokens=False)["input_ids"]) > 1  # a summed target
    with caplog.at_level("WARNING", logger="knnlm.macondo.score"):
        encoded = encode_rows(tiny_lm, rows)
    assert [r.getMessage()[:48] for r in caplog.records] == ["1 of 13 targets are more than one token under thi"[:48]]
    assert encode_rows(tiny_lm, rows[:-1]) and len(caplog.records) == 1  # one-token names: nothing said
    for (ids, n_prefix), row in zip(encoded, rows):
        assert ids == tiny_lm.encode(row["text"])  # the target is appended as it would be tokenized in the sentence
    lls = score_split(tiny_lm, rows, batch_size=3)  # right padding within batches of different lengths
    assert lls["knn"] == {} and lls["mlp"] == {}
    for row, ll in zip(rows, lls["lm"]):
        ref = sum(lp for lp, *_ in _by_hand(tiny_lm, row))
        assert ll == pytest.approx(ref, abs=1e-4)
    np.testing.assert_allclose(lls["lm"], score_split(tiny_lm, rows, batch_size=32)["lm"], atol=1e-5)


def _knn_gold_brute(keys: np.ndarray, vals: np.ndarray, q: np.ndarray, gold: int) -> float:
    d = ((keys - q[None, :]) ** 2).sum(1)  # [N] squared L2
    top = np.argsort(d, kind="stable")[:K]
    logits = -d[top] / TEMP
    hit = vals[top] == gold
    if not hit.any():
        return -math.inf
    m = logits.max()
    return float(np.log(np.exp(logits[hit] - m).sum()) - np.log(np.exp(logits - m).sum()))


def test_knn_matches_brute_force_and_lambda0_is_vanilla(tiny_lm, rows, datastore):
    from knnlm.knn import KNNArgs, Retriever

    retriever = Retriever(datastore, KNNArgs(k=K, knn_temp=TEMP))
    lls = score_split(tiny_lm, rows, retriever=retriever, lmbdas=[0.0, 0.5, 1.0], batch_size=4)
    assert lls["knn"][0.0] == lls["lm"]  # bit-exact
    keys, vals = np.asarray(datastore.keys, dtype=np.float64), np.asarray(datastore.vals)
    finite = 0
    for i, row in enumerate(rows):
        per_token = [(lp, _knn_gold_brute(keys, vals, q.double().numpy(), t)) for lp, q, _, t in _by_hand(tiny_lm, row)]
        half = sum(np.logaddexp(lp + math.log(0.5), kn + math.log(0.5)) for lp, kn in per_token)
        assert lls["knn"][0.5][i] == pytest.approx(half, abs=2e-3)
        full = sum(kn for _, kn in per_token)
        if math.isinf(full):
            assert lls["knn"][1.0][i] == -math.inf
        else:
            finite += 1
            assert lls["knn"][1.0][i] == pytest.approx(full, abs=2e-3)
    assert finite > 0  # the training sentences themselves retrieve their own next tokens


class _Memory:
    """An MLP memory stand-in: p_mem = the LM's own last layers f at block_output, i.e. exactly p_lm."""

    key_point = "block_output"

    def __init__(self, lm):
        self.lm, self.queries = lm, 0

    def log_probs(self, z):  # [n, d] -> [n, V]
        self.queries += z.shape[0]
        return self.lm.f(z)

    __call__ = log_probs  # the scoring kernel calls the memory for logits; log-probabilities are logits too


class _Uniform:
    key_point = "ffn_input"

    def __init__(self, vocab):
        self.vocab = vocab

    def log_probs(self, z):
        return torch.full((z.shape[0], self.vocab), -math.log(self.vocab))

    __call__ = log_probs


def test_memory_interpolation(tiny_lm, rows, datastore):
    from knnlm.knn import KNNArgs, Retriever

    mem = _Memory(tiny_lm)
    lls = score_split(tiny_lm, rows, retriever=Retriever(datastore, KNNArgs(k=K)), memory=mem,
                      knn=KNNArgs(lmbda=[0.3, 1.0]), batch_size=5)  # two key points in one forward
    n_targets = sum(len(ids) - n for ids, n in encode_rows(tiny_lm, rows))
    assert mem.queries == n_targets and set(lls["mlp"]) == set(lls["knn"]) == {0.3, 1.0}
    np.testing.assert_allclose(lls["mlp"][1.0], lls["lm"], atol=1e-4)  # f(block_output) == the LM's logits
    np.testing.assert_allclose(lls["mlp"][0.3], lls["lm"], atol=1e-4)
    V = tiny_lm.vocab_size
    uni = score_split(tiny_lm, rows, memory=_Uniform(V), lmbdas=[0.25], batch_size=7)["mlp"][0.25]
    for row, ll in zip(rows, uni):
        ref = sum(np.logaddexp(lp + math.log(0.75), math.log(0.25 / V)) for lp, *_ in _by_hand(tiny_lm, row))
        assert ll == pytest.approx(ref, abs=1e-4)


def test_summarize_by_hand():
    rows = [{"n_children": n} for n in (1, 2, 2, 3, 3, 3)]
    s = summarize(rows, [-1.0, -2.0, -4.0, -3.0, -3.0, -6.0])
    assert (s["1"], s["2"], s["3"]) == (-1.0, -3.0, -4.0)
    assert s["avg"] == pytest.approx(-19 / 6) and s["avg_groups"] == pytest.approx(-8 / 3)
    assert s["count"] == {"1": 1, "2": 2, "3": 3}
    o = s["optimum"]
    assert o["1"] == 0.0 and o["2"] == pytest.approx(math.log(1 / 2)) and o["3"] == pytest.approx(math.log(1 / 3))
    assert o["avg"] == pytest.approx((2 * math.log(1 / 2) + 3 * math.log(1 / 3)) / 6)
    assert o["avg_groups"] == pytest.approx((math.log(1 / 2) + math.log(1 / 3)) / 3)
    # the paper's Table 5 "Average" is the mean over groups: its step-0 vanilla row
    paper = summarize([{"n_children": n} for n in range(1, 6)], [-10.89, -10.69, -10.82, -10.67, -10.68])
    assert round(paper["avg_groups"], 2) == -10.75


def test_cli_score_writes_results_and_table(tiny_gpt2_dir, tiny_lm, data, datastore, tmp_path, capsys):
    from knnlm.cli import main

    out = tmp_path / "score"
    argv = ["macondo", "score", "--model_name_or_path", str(tiny_gpt2_dir), "--device", "cpu", "--data", str(data),
            "--split", "test", "--datastore", str(datastore.dir), "--k", str(K), "--lmbda", "0,0.5",
            "--output_dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    test_rows = read_split(data, "test")
    ref = summarize(test_rows, score_split(tiny_lm, test_rows)["lm"])
    m = res["metrics"]
    assert m["n_examples"] == len(test_rows) == 15 and m["split"] == "test"
    for key in ("1", "2", "3", "4", "5", "avg", "avg_groups"):
        assert m["lm"][key] == pytest.approx(ref[key], abs=1e-4)
        assert m["knn"]["0.0"][key] == m["lm"][key]
    assert m["lm"]["optimum"]["5"] == pytest.approx(math.log(1 / 5)) and m["datastore_N"] == datastore.N
    table = (out / "results.md").read_text()
    assert table in printed
    assert "| vanilla | kNN λ=0.0 | kNN λ=0.5 | optimum log(1/n) |" in table
    assert "| average (groups) | 15 |" in table and "| 5 | 5 |" in table
    assert res["config"]["lmbda"] == [0.0, 0.5] and (out / "config.json").is_file()


def test_cli_score_bad_split(tiny_gpt2_dir, data, tmp_path, capsys):
    from knnlm.cli import main

    rc = main(["macondo", "score", "--model_name_or_path", str(tiny_gpt2_dir), "--data", str(data), "--split", "dev",
               "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and "--split" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_fit_optimum_is_the_empirical_conditional_frequency():
    """By hand: a prefix that introduces one child -> 0; the same prefix (same parent, same clause) introducing two
    children, one of them twice -> log(2/3) and log(1/3); a pair absent from training -> -inf; summarize's
    optimum_fit averages those per group like the scores."""
    from knnlm.macondo.score import fit_optimum

    def row(prefix, child, n):
        return {"prefix": prefix, "target": " " + child, "n_children": n}

    train = [row("A, who was born in Lyon, is the parent of", "Bo", 1),
             row("C, who married in 1975, is the parent of", "Di", 2),
             row("C, who married in 1975, is the parent of", "Di", 2),
             row("C, who married in 1975, is the parent of", "Ed", 2),
             row("C, who was born in 1950, is the parent of", "Ed", 2)]
    got = fit_optimum(train + [row("A is the parent of", "Bo", 1)], train)
    assert got[:5] == pytest.approx([0.0, math.log(2 / 3), math.log(2 / 3), math.log(1 / 3), 0.0])
    assert got[5] == float("-inf")
    s = summarize(train, [-1.0] * 5, got[:5])
    assert s["optimum_fit"]["1"] == 0.0
    assert s["optimum_fit"]["2"] == pytest.approx((2 * math.log(2 / 3) + math.log(1 / 3)) / 4)
    assert s["optimum_fit"]["avg_groups"] == pytest.approx(s["optimum_fit"]["2"] / 2)
    assert s["optimum"]["2"] == pytest.approx(math.log(1 / 2))  # log(1/n) stays beside it


def test_memory_alone_scores_are_reported(tiny_lm, rows):
    """score_split's "mem" is the memory's own log-probability (λ = 1 of the MLP interpolation), summed per row."""
    V = tiny_lm.vocab_size
    lls = score_split(tiny_lm, rows, memory=_Uniform(V), lmbdas=[1.0], batch_size=5)
    n_tokens = [len(tiny_lm.tokenizer(r["target"], add_special_tokens=False)["input_ids"]) for r in rows]
    np.testing.assert_allclose(lls["mem"], [-n * math.log(V) for n in n_tokens], rtol=1e-6)
    np.testing.assert_allclose(lls["mlp"][1.0], lls["mem"], rtol=1e-6)
    assert score_split(tiny_lm, rows[:2])["mem"] == []


def test_names_are_tokenized_in_their_sentence_under_a_sentencepiece_tokenizer(tmp_path):
    """A Llama-2/Mistral-style tokenizer encodes " Name" alone as ['▁', '▁Name'] but in the sentence as ['▁Name']:
    scoring took the name's tokens alone (an extra '▁' token: up to 9 nats from lm-eval's score of the same row) and
    the generator's one-token check accepted no name at all."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from knnlm.macondo.generate import load_tokenizer, single_token_names
    from knnlm.models import ModelArgs, load_model

    names = ["Maurice", "Heather", "Lucia", "Pedro"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [f"Sal Gougis is the parent of {n}" for n in names] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(tmp_path / "sp")
    assert hf.convert_ids_to_tokens(hf(" Maurice", add_special_tokens=False)["input_ids"])[0] == "▁"  # alone: extra '▁'
    assert single_token_names(load_tokenizer(str(tmp_path / "sp")), names, "plain") == names
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id)).save_pretrained(tmp_path / "sp")
    lm = load_model(ModelArgs(model_name_or_path=str(tmp_path / "sp"), device="cpu"))
    row = {"prefix": "Sal Gougis is the parent of", "target": " Maurice", "text": "Sal Gougis is the parent of Maurice"}
    (ids, n_prefix), = encode_rows(lm, [row])
    assert ids == lm.encode(row["text"]) and hf.convert_ids_to_tokens(ids[n_prefix:]) == ["▁Maurice"]
