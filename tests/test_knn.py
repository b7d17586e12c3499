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
