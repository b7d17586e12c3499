"""kNN distribution and interpolation against hand computations and a brute-force numpy reference."""
import math

import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.knn import KNNArgs, interpolate, knn_gold_log_prob, knn_log_probs


def test_knn_distribution_by_hand():
    # neighbours: tokens 2, 0, 2 at squared distances 1, 2, 3; T = 1
    dists = torch.tensor([[1.0, 2.0, 3.0]])
    vals = torch.tensor([[2, 0, 2]])
    w = np.exp([-1.0, -2.0, -3.0])
    expected = np.log(np.array([w[1], 1.0, w[0] + w[2]]) / w.sum())  # index 1 unused
    got = knn_log_probs(dists, vals, vocab_size=3, temp=1.0)[0].numpy()
    assert got[1] == -math.inf
    np.testing.assert_allclose(got[[0, 2]], expected[[0, 2]], rtol=1e-6)
    gold = knn_gold_log_prob(dists, vals, torch.tensor([2]), temp=1.0)
    np.testing.assert_allclose(gold.numpy(), [expected[2]], rtol=1e-6)


def test_temperature_flattens():
    dists = torch.tensor([[1.0, 5.0]])
    vals = torch.tensor([[0, 1]])
    sharp = knn_log_probs(dists, vals, 2, temp=0.5).exp()[0]
    flat = knn_log_probs(dists, vals, 2, temp=10.0).exp()[0]
    assert sharp[0] > flat[0] > 0.5
    np.testing.assert_allclose(flat.numpy(), np.exp([-0.1, -0.5]) / np.exp([-0.1, -0.5]).sum(), rtol=1e-6)


def test_gold_matches_full_distribution_random():
    g = torch.Generator().manual_seed(0)
    dists = torch.rand(16, 32, generator=g) * 50
    vals = torch.randint(0, 20, (16, 32), generator=g)
    gold = torch.randint(0, 20, (16,), generator=g)
    full = knn_log_probs(dists, vals, 20, temp=3.0)
    torch.testing.assert_close(knn_gold_log_prob(dists, vals, gold, 3.0), full.gather(1, gold[:, None])[:, 0])


def test_missing_neighbours_get_no_mass():
    dists = torch.tensor([[1.0, math.inf]])
    vals = torch.tensor([[4, 0]])
    lp = knn_log_probs(dists, vals, 5, 1.0)[0]
    assert lp[4].item() == pytest.approx(0.0, abs=1e-6) and lp[0] == -math.inf


def test_interpolation_identities_and_value():
    lm = torch.log_softmax(torch.randn(4, 7), -1)
    kn = torch.log_softmax(torch.randn(4, 7), -1)
    assert interpolate(lm, kn, 0.0) is lm  # λ = 0 is the LM, bit for bit
    assert interpolate(lm, kn, 1.0) is kn
    mixed = interpolate(lm, kn, 0.25).exp()
    torch.testing.assert_close(mixed, 0.75 * lm.exp() + 0.25 * kn.exp())
    with_minus_inf = interpolate(lm, torch.full_like(kn, -math.inf), 0.25)
    torch.testing.assert_close(with_minus_inf, lm + math.log(0.75))


@pytest.mark.parametrize("kwargs, flag", [({"k": 0}, "--k"), ({"lmbda": [1.5]}, "--lmbda"), ({"lmbda": [-0.1]}, "--lmbda"),
                                           ({"knn_temp": 0.0}, "--knn_temp"), ({"knn_temp": -1.0}, "--knn_temp")])
def test_bad_knn_args(kwargs, flag):
    with pytest.raises(KnnlmError, match=flag):
        KNNArgs(**kwargs).validate()


@pytest.mark.parametrize("key_dtype", [torch.float16, torch.float32])
def test_exact_sq_dists_equal_float64_brute_force(key_dtype):
    """Keys far from the origin (norms ~ 200) and queries equal or close to keys: the float32 sum of squared differences
    keeps the small distances that ‖q‖² + ‖k‖² − 2 q·k would lose; chunking changes nothing."""
    from knnlm.distances import exact_sq_dists

    g = torch.Generator().manual_seed(0)
    n, d, b, k = 500, 48, 13, 40
    keys = (30.0 + torch.randn(n, d, generator=g) * 3).to(key_dtype)  # [N, d]
    ids = torch.randint(0, n, (b, k), generator=g)  # [B, k]
    q = keys[ids[:, 0]].float() + torch.randn(b, d, generator=g) * 1e-2  # [B, d] near neighbour 0
    q[0] = keys[ids[0, 3]].float()  # one query equal to a key: distance exactly 0
    ref = ((keys.double()[ids] - q.double()[:, None, :]) ** 2).sum(-1)  # [B, k] float64
    got = exact_sq_dists(keys, q, ids)
    assert got.dtype == torch.float32 and got.shape == (b, k)
    assert got[0, 3] == 0.0
    np.testing.assert_allclose(got.double().numpy(), ref.numpy(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(exact_sq_dists(keys, q, ids, max_floats=3 * k * d), got, rtol=0, atol=0)
    if key_dtype == torch.float32:  # the gather path (GPU keys, or float32 not laid out for FAISS) gives the same sums
        strided = torch.cat([keys, keys], dim=1)[:, :d]  # [N, d], not contiguous
        np.testing.assert_allclose(exact_sq_dists(strided, q, ids, max_floats=3 * k * d).double().numpy(), ref.numpy(),
                                   rtol=2e-6, atol=1e-6)
    # the expansion through norms is what this avoids: in float32 it is off by far more on the near neighbours
    expanded = (keys.float()[ids] ** 2).sum(-1) + (q ** 2).sum(-1)[:, None] - 2 * (keys.float()[ids] @ q[:, :, None])[..., 0]
    assert (expanded[:, 0].double() - ref[:, 0]).abs().max() > 10 * (got[:, 0].double() - ref[:, 0]).abs().max()


def test_ignore_top_on_a_one_key_store_is_refused(tiny_lm, tmp_path):
    """Before: --ignore_top on a store of one key left every search empty (k 0): p_knn NaN, and eval reported the plain
    LM as the kNN-LM without a word."""
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import build_datastore
    from knnlm.knn import Retriever

    (tmp_path / "two.txt").write_text("a b")  # two tokens: one (key, next token) row
    ds = build_datastore(tiny_lm, CorpusArgs(train_file=str(tmp_path / "two.txt"), block_size=8), tmp_path / "ds")
    assert ds.N == 1
    assert Retriever(ds, KNNArgs(k=4)).k == 1
    with pytest.raises(KnnlmError, match="--ignore_top: the datastore .* holds 1 key"):
        Retriever(ds, KNNArgs(k=4, ignore_top=True))


def test_drop_own_by_hand():
    from knnlm.knn import drop_own

    d = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 3.0]])
    ids = torch.tensor([[5, 9, 2], [7, 3, 1]])
    got_d, got_i = drop_own(d, ids, torch.tensor([9, 4]))  # 9 found (a tie at 0 with 5); 4 not found: the farthest
    assert got_i.tolist() == [[5, 2], [7, 3]] and got_d.tolist() == [[0.0, 1.0], [0.5, 2.0]]
    assert drop_own(d, ids, None)[1].tolist() == [[9, 2], [3, 1]]  # no rows known: the nearest


def test_ignore_top_leaves_out_each_positions_own_row_on_the_stores_text(tiny_lm, tmp_path):
    """Windows of one token's context that start with the same token (' a') have the same key, followed by another
    token each. Before, --ignore_top dropped the nearest by distance then id, which for all but the first such window
    is another window's row: the query's own row stayed and its gold token leaked back. The reference: p_knn(gold) over
    every other row of the store (k = N - 1, exact distances in float64)."""
    from knnlm.corpus import CorpusArgs, TokenFile, windows
    from knnlm.datastore import build_datastore
    from knnlm.knn import Retriever
    from knnlm.scoring import encode_windows, score_windows

    words = " ".join(f"a {w} x" for w in ["b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m"])
    (tmp_path / "t.txt").write_text(words)
    block = 4  # windows start every 3 tokens: at each ' a'
    ds = build_datastore(tiny_lm, CorpusArgs(train_file=str(tmp_path / "t.txt"), block_size=block, stride=block),
                         tmp_path / "ds", batch_size=4)
    tokens = TokenFile(ds.dir / "tokens.i32", ds.dir / "tokens.i32.docs")
    wins = windows(tokens.doc_starts, block, block)
    assert [int(tokens.tokens[w.start]) for w in wins[1:]] == [tiny_lm.encode(" a")[0]] * (len(wins) - 1)
    retriever = Retriever(ds, KNNArgs(k=ds.N - 1, ignore_top=True, recompute_dists=True))
    batches = [wins[i: i + 3] for i in range(0, len(wins), 3)]
    got = torch.cat([s.knn for s in score_windows(tiny_lm, tokens, batches, retriever, overlap=False)])
    keys, vals = np.asarray(ds.keys, np.float64), np.asarray(ds.vals)
    ref, row = [], 0
    for batch in batches:
        at, gold = encode_windows(tiny_lm, tokens, batch, (ds.key_point,))
        for q, g in zip(at[ds.key_point].double().numpy(), gold.tolist()):
            d = ((keys - q) ** 2).sum(1)
            others = np.arange(ds.N) != row  # the position's own row: targets are the store's rows in order
            logit = -d[others]
            ref.append(np.logaddexp.reduce(logit[vals[others] == g]) - np.logaddexp.reduce(logit))
            row += 1
    assert row == ds.N
    np.testing.assert_allclose(got.numpy(), np.asarray(ref), rtol=1e-5, atol=1e-6)
