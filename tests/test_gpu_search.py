"""TorchFlatIndex (exact search in torch, for GPUs that FAISS cannot use) against FAISS's exact search, on the CPU."""
import faiss
import numpy as np
import pytest
import torch

from knnlm.gpu_search import TorchFlatIndex


def _data(n=5000, d=24, b=37, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float16)  # stores keep float16 keys
    queries = rng.standard_normal((b, d)).astype(np.float32)
    return keys, queries


@pytest.mark.parametrize("key_chunk,query_batch", [(1 << 20, 1024), (777, 5)])  # one chunk; many chunks and batches
def test_matches_faiss_flat(key_chunk, query_batch):
    keys, queries = _data()
    index = TorchFlatIndex(keys, device="cpu", load_chunk=1000, key_chunk=key_chunk, query_batch=query_batch)
    ref = faiss.IndexFlatL2(keys.shape[1])
    ref.add(keys.astype(np.float32))
    k = 64
    d, i = index.search(queries, k)
    d_ref, i_ref = ref.search(queries, k)
    assert d.shape == (len(queries), k) and i.dtype == np.int64
    # same neighbours (ties aside: continuous random data has none), distances exact sums of squared differences
    assert (np.sort(i, axis=1) == np.sort(i_ref, axis=1)).all()
    exact = ((keys.astype(np.float32)[i] - queries[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(d, exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d, d_ref, rtol=1e-4, atol=1e-4)
    assert (np.diff(d, axis=1) >= 0).all()  # nearest first


def test_k_beyond_store_pads_like_faiss():
    keys, queries = _data(n=10, b=3)
    d, i = TorchFlatIndex(keys, device="cpu").search(queries, 16)
    assert (i[:, :10] >= 0).all() and (i[:, 10:] == -1).all() and np.isinf(d[:, 10:]).all()
    assert sorted(i[0, :10].tolist()) == list(range(10))


def test_a_key_is_its_own_nearest_neighbour_at_distance_zero():
    keys, _ = _data(n=300)
    q = keys[[7, 123]].astype(np.float32)
    d, i = TorchFlatIndex(keys, device="cpu", key_chunk=64).search(q, 5)
    assert i[:, 0].tolist() == [7, 123] and (d[:, 0] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    keys, queries = _data(n=20000, d=64)
    d_cpu, i_cpu = TorchFlatIndex(keys, device="cpu").search(queries, 128)
    d_gpu, i_gpu = TorchFlatIndex(keys, device="cuda").search(queries, 128)
    assert (np.sort(i_cpu, 1) == np.sort(i_gpu, 1)).all()
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-5, atol=1e-5)


def test_retriever_takes_its_exact_distances_without_a_second_key_copy(tmp_path):
    """A Retriever over a TorchFlatIndex with --recompute_dists: the index's distances are already exact, so no keys
    are held for recomputation, and the result equals recomputing them over FAISS's exact search."""
    from test_index import make_store

    from knnlm.knn import KNNArgs, Retriever

    ds = make_store(tmp_path / "ds")
    q = torch.from_numpy(np.asarray(ds.keys[:29], dtype=np.float32) + 0.05)
    args = KNNArgs(k=10, recompute_dists=True)
    torch_ret = Retriever(ds, args, index=TorchFlatIndex(ds.keys, device="cpu", key_chunk=300))
    assert not torch_ret.recompute
    faiss_ret = Retriever(ds, args)  # FAISS Flat (no built index), distances recomputed from the keys
    assert faiss_ret.recompute
    (d1, v1), (d2, v2) = torch_ret.search(q), faiss_ret.search(q)
    np.testing.assert_allclose(d1.numpy(), d2.numpy(), rtol=1e-5, atol=1e-6)
    assert (v1 == v2).all()
