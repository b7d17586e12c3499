"""The shared scoring kernel: gold log-probs equal log_softmax().gather; windows scored against a direct computation."""
import numpy as np
import pytest
import torch
from conftest import brute_knn_gold_prob

from knnlm.corpus import TokenFile, windows
from knnlm.datastore import Datastore
from knnlm.fileio import atomic_write_json
from knnlm.knn import KNNArgs, Retriever
from knnlm.scoring import (SOFTMAX_ROWS, encode_windows, gold_log_probs, head_gold_log_probs, key_points,
                            score_positions, score_windows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gold_log_probs_equal_log_softmax_gather(dtype):
    g = torch.Generator().manual_seed(0)
    n, v = 3 * SOFTMAX_ROWS + 5, 1000  # blocks of rows plus a short last one
    logits = (torch.randn(n, v, generator=g) * 8).to(dtype)
    gold = torch.randint(0, v, (n,), generator=g)
    ref = torch.log_softmax(logits.float(), dim=-1).gather(1, gold[:, None])[:, 0]
    got = gold_log_probs(logits, gold)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref)  # bit for bit: log_softmax works row by row
    # and the value is logit[gold] - logsumexp(logits), by a float64 reference
    ref64 = logits.double().gather(1, gold[:, None])[:, 0] - torch.logsumexp(logits.double(), -1)
    torch.testing.assert_close(got.double(), ref64, rtol=1e-6, atol=1e-5)


def test_head_in_blocks_matches_whole():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(24, 300)
    hidden, gold = torch.randn(29, 24, generator=g), torch.randint(0, 300, (29,), generator=g)
    with torch.no_grad():
        whole = torch.log_softmax(head(hidden), -1).gather(1, gold[:, None])[:, 0]
        torch.testing.assert_close(head_gold_log_probs(head, hidden, gold, rows=7), whole)


def _store(path, n, d, vocab, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    rng.normal(size=(n, d)).astype(np.float16).tofile(path / "keys.f16")
    rng.integers(0, vocab, n).astype(np.int32).tofile(path / "vals.i32")
    atomic_write_json(path / "meta.json", {"N": n, "d": d, "key_point": "final_hidden"})
    return Datastore.open(path)


def test_score_windows_against_direct_computation(tiny_lm, tmp_path):
    """LM gold log-probs from a full forward's logits; p_knn by brute force over the store's keys (float64) and the
    mixture written out; λ = 0 is the LM bit for bit; overlapping the search with the next forward changes nothing.
    (p_knn was checked against the retriever's own search and the mixture against interpolate: a search returning
    wrong distances and values passed.)"""
    tokens = np.random.default_rng(0).integers(0, 500, 300).astype(np.int32)
    tokens.tofile(tmp_path / "tok.i32")
    np.asarray([0, len(tokens)], np.int64).tofile(tmp_path / "tok.i32.docs")
    tf = TokenFile(tmp_path / "tok.i32", tmp_path / "tok.i32.docs")
    wins = windows(tf.doc_starts, 64, 32)
    batches = [wins[i: i + 3] for i in range(0, len(wins), 3)]
    ds = _store(tmp_path / "ds", 700, tiny_lm.hidden_size, 500)
    retriever = Retriever(ds, KNNArgs(k=16, recompute_dists=True))
    lmbdas = [0.0, 0.25]
    overlapped = list(score_windows(tiny_lm, tf, batches, retriever, None, lmbdas, overlap=True))
    serial = list(score_windows(tiny_lm, tf, batches, retriever, None, lmbdas, overlap=False))
    assert len(batches) > 2 and len(overlapped) == len(serial) == len(batches)  # one score per batch, none dropped
    assert sum(len(s.gold) for s in serial) == sum(len(s.gold) for s in overlapped) == len(tokens) - 1
    for a, b in zip(overlapped, serial):
        for name in ("gold", "lm", "knn", "dists", "vals"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    for batch, s in zip(batches, serial):
        assert s.knn_lm[0.0] is s.lm
        with torch.no_grad():
            for i, w in enumerate(batch):
                ids = torch.from_numpy(tokens[w.start: w.end].astype(np.int64))[None]
                logits, hidden = tiny_lm.forward(ids, torch.ones_like(ids), key_points=("final_hidden",))
                pos = torch.arange(w.first_target - 1 - w.start, w.end - 1 - w.start)
                gold = torch.from_numpy(tokens[w.first_target: w.end].astype(np.int64))
                ref_lm = torch.log_softmax(logits[0, pos], -1).gather(1, gold[:, None])[:, 0]
                lo = sum(x.n_targets for x in batch[:i])
                sl = slice(lo, lo + len(gold))
                assert torch.equal(s.gold[sl], gold)
                torch.testing.assert_close(s.lm[sl], ref_lm, rtol=1e-5, atol=1e-5)
                p_knn = brute_knn_gold_prob(hidden["final_hidden"][0, pos].numpy(), ds.keys, ds.vals, gold.numpy(), 16,
                                            retriever.args.knn_temp)  # [n] float64
                with np.errstate(divide="ignore"):  # (log 0 = -inf: no neighbour holds the gold token)
                    log_knn = np.log(p_knn)
                torch.testing.assert_close(s.knn[sl].double(), torch.from_numpy(log_knn), rtol=1e-4, atol=1e-4)
                mixed = np.log(0.75 * np.exp(ref_lm.double().numpy()) + 0.25 * p_knn)
                torch.testing.assert_close(s.knn_lm[0.25][sl].double(), torch.from_numpy(mixed), rtol=1e-4, atol=1e-4)
    # positions scored directly, with the LM part given by the caller (a model exposing only logits): same numbers
    at, gold = encode_windows(tiny_lm, tf, batches[0], key_points(retriever))
    again = score_positions(tiny_lm, {"final_hidden": at["final_hidden"]}, gold, retriever, None, lmbdas,
                            lm_gold=serial[0].lm)
    assert torch.equal(again.knn_lm[0.25], serial[0].knn_lm[0.25]) and torch.equal(again.gold, serial[0].gold)


def test_search_worker_takes_the_callers_faiss_threads(tiny_lm, tmp_path):
    """FAISS's OpenMP thread count is per thread: the overlapped search's worker must search with the caller's, not
    with a new thread's default."""
    import threading

    import faiss

    fresh = []
    t = threading.Thread(target=lambda: fresh.append(faiss.omp_get_max_threads()))
    t.start()
    t.join()
    tokens = np.random.default_rng(1).integers(0, 500, 100).astype(np.int32)
    tokens.tofile(tmp_path / "tok.i32")
    np.asarray([0, len(tokens)], np.int64).tofile(tmp_path / "tok.i32.docs")
    tf = TokenFile(tmp_path / "tok.i32", tmp_path / "tok.i32.docs")
    wins = windows(tf.doc_starts, 32, 16)
    retriever = Retriever(_store(tmp_path / "ds", 200, tiny_lm.hidden_size, 500), KNNArgs(k=4))
    seen = []

    def searcher(queries, gold, batch):
        seen.append(faiss.omp_get_max_threads())
        return retriever.search(queries)

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(fresh[0] + 1)  # not what a new thread starts with
    try:
        list(score_windows(tiny_lm, tf, [wins[:2], wins[2:]], retriever, overlap=True, searcher=searcher))
    finally:
        faiss.omp_set_num_threads(before)
    assert seen == [fresh[0] + 1] * 2
