"""The Python API (docs/python_api.md) checks its arguments as the CLI checks its flags: a KnnlmError naming the
setting, never a finite number from a setting the CLI refuses (a negative temperature gave a plausible perplexity)
nor an exception from deep inside FAISS or pathlib (an empty AssertionError for k=0)."""
from __future__ import annotations

import math

import pytest
import torch

from knnlm.corpus import CorpusArgs
from knnlm.datastore import Datastore, build_datastore
from knnlm.errors import KnnlmError
from knnlm.evaluate import EvalArgs, evaluate
from knnlm.knn import KNNArgs, Retriever, interpolate
from knnlm.memory import MemoryArgs, train_memory

TEXT = " ".join(f"The {w} of the river {i % 7} was seen by the people of Macondo ." for i, w in
                enumerate(["colour", "name", "sound", "end", "source"] * 12)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "a.txt"
    path.write_text(TEXT)
    return CorpusArgs(train_file=str(path), validation_file=str(path), block_size=32)


@pytest.fixture(scope="module")
def store(tiny_lm, corpus, tmp_path_factory):
    return build_datastore(tiny_lm, corpus, tmp_path_factory.mktemp("ds") / "ds")


BAD_KNN = [  # before: a finite ppl_knnlm, NaN, "math domain error", FAISS's empty AssertionError, TypeErrors
    ({"knn_temp": -1.0}, "--knn_temp: must be a finite number > 0"),
    ({"knn_temp": math.nan}, "--knn_temp: must be a finite number > 0"),
    ({"lmbda": [1.5]}, "--lmbda: 1.5 is outside [0, 1]"),
    ({"k": 0}, "--k: must be >= 1"),
    ({"k": 2.5}, "--k: must be a whole number"),
    ({"lmbda": 0.25}, "--lmbda: a list of weights"),
]


@pytest.mark.parametrize("settings, needle", BAD_KNN, ids=[next(iter(s)) + str(i) for i, (s, _) in enumerate(BAD_KNN)])
def test_knn_settings_are_checked_by_evaluate_and_retriever(settings, needle, tiny_lm, corpus, store, tmp_path):
    knn = KNNArgs(**settings)
    with pytest.raises(KnnlmError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        evaluate(tiny_lm, corpus, tmp_path / "ev", EvalArgs(output_dir=str(tmp_path / "ev")), datastore=store, knn=knn)
    with pytest.raises(KnnlmError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        Retriever(store, knn)


@pytest.mark.parametrize("lmbda", [1.5, -0.1, math.nan])
def test_interpolate_refuses_a_weight_outside_the_unit_interval(lmbda):
    lp = torch.log_softmax(torch.randn(3, 5), dim=-1)
    with pytest.raises(KnnlmError, match="--lmbda: .* is outside"):
        interpolate(lp, lp, lmbda)
    assert interpolate(lp, lp, 0.0) is lp  # the identities stay
    assert torch.allclose(interpolate(lp, lp.flip(-1), 0.5),
                          torch.log(0.5 * lp.exp() + 0.5 * lp.flip(-1).exp()), atol=1e-6)


def test_a_store_may_be_given_as_its_folder(tiny_lm, corpus, store, tmp_path):
    """Before: AttributeError ('str' object has no attribute 'check_compatible' / 'dir')."""
    knn = KNNArgs(k=8, lmbda=[0.25])
    by_store = evaluate(tiny_lm, corpus, tmp_path / "a", EvalArgs(output_dir=str(tmp_path / "a")), datastore=store, knn=knn)
    by_path = evaluate(tiny_lm, corpus, tmp_path / "b", EvalArgs(output_dir=str(tmp_path / "b")),
                       datastore=str(store.dir), knn=knn)
    assert by_path["ppl_knnlm"] == by_store["ppl_knnlm"] and by_path["n_tokens"] == by_store["n_tokens"]
    queries = torch.randn(2, store.d)
    assert torch.equal(Retriever(str(store.dir), knn).search_ids(queries)[1], Retriever(store, knn).search_ids(queries)[1])
    assert Datastore.open(store) is store


def test_output_folders_and_memory_settings_are_checked(tiny_lm, corpus, store, tmp_path):
    """Before: pathlib's TypeError for a missing folder, and a memory with a 0-wide MLP trained and written."""
    with pytest.raises(KnnlmError, match="--output_dir: required"):
        evaluate(tiny_lm, corpus, None, EvalArgs())
    with pytest.raises(KnnlmError, match="--output_dir: required"):
        train_memory(tiny_lm, store, MemoryArgs(hidden_size=8, max_steps=2))
    with pytest.raises(KnnlmError, match="--hidden_size: must be >= 1, got 0"):
        train_memory(tiny_lm, store, MemoryArgs(hidden_size=0, max_steps=2), out_dir=tmp_path / "m0")
    assert not (tmp_path / "m0").exists()
    mem = train_memory(tiny_lm, str(store.dir), MemoryArgs(hidden_size=8, max_steps=2), out_dir=tmp_path / "m")
    assert mem.log_probs(torch.randn(3, store.d)).shape == (3, tiny_lm.vocab_size)


def test_queries_of_another_width_and_a_model_name_are_named(tiny_lm, store):
    """Before: FAISS's empty AssertionError (a [B, 32] query of a 64-wide store), numpy's "not enough values to
    unpack" (a 1-D query) and an AttributeError in models.py (augment("model", ...))."""
    from knnlm.augmented import augment

    retriever = Retriever(store, KNNArgs(k=4))
    for shape in ((2, store.d // 2), (store.d,)):
        with pytest.raises(KnnlmError, match=rf"queries: shape \({', '.join(map(str, shape))},?\), but the datastore"):
            retriever.log_probs(torch.randn(*shape), tiny_lm.vocab_size)
    assert retriever.log_probs(torch.randn(2, store.d), tiny_lm.vocab_size).shape == (2, tiny_lm.vocab_size)
    with pytest.raises(KnnlmError, match="augment: model 'gpt2' is a name, not a model"):
        augment("gpt2", tiny_lm.tokenizer, datastore=store)


@pytest.mark.parametrize("settings", [{"retomaton": True}, {"skip_search_prob": 0.5}])
def test_scorers_of_independent_positions_refuse_a_stateful_retriever(settings, tiny_lm, corpus, store):
    """score_positions (Macondo's scorer) has no automaton: it gave the plain kNN-LM under RetoMaton's settings."""
    from knnlm.scoring import score_positions

    at = {store.key_point: torch.zeros(2, store.d), "final_hidden": torch.zeros(2, store.d)}
    flag = "--retomaton" if "retomaton" in settings else "--skip_search_prob"
    with pytest.raises(KnnlmError, match=f"{flag}: RetoMaton and random search skips follow a text in order"):
        score_positions(tiny_lm, at, torch.tensor([1, 2]), Retriever(store, KNNArgs(**settings)))
    plain = score_positions(tiny_lm, at, torch.tensor([1, 2]), Retriever(store, KNNArgs()))
    assert plain.knn.shape == (2,)
