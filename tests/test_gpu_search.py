"""The torch search backend (half-precision candidates, exact re-ranking, IVF, shards) against float64 brute force and
FAISS, on the CPU (torch CPU tensors stand in for the device; the CUDA tests skip without a GPU)."""
import faiss
import numpy as np
import pytest
import torch

from knnlm.gpu_search import TorchSearch, train_centroids
from knnlm.knn import KNNArgs

DEFAULT_MARGIN = KNNArgs().search_margin
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _random(n=30_000, d=48, b=40, seed=0, offset=0.0):
    """Gaussian keys (float16, as stores keep them) around ``offset``; queries near keys (not keys themselves)."""
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((n, d)) + offset).astype(np.float16)
    noise = 0.3 * rng.standard_normal((b, d)).astype(np.float32)
    queries = keys[rng.choice(n, b, replace=False)].astype(np.float32) + noise
    return keys, torch.from_numpy(queries)


def _brute(keys, queries, k):
    """float64 distances to every key [B, N]; the k nearest ids (ties by id) and their distances."""
    d = ((queries.double().numpy()[:, None, :] - keys.astype(np.float64)[None]) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def _recall(ids, ref_ids):
    return float(np.mean([len(np.intersect1d(a[a >= 0], r)) / len(r) for a, r in zip(ids, ref_ids)]))


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, tiny_lm, wikitext_dir):
    """A store of the tiny GPT-2's ffn_input keys over the first 12k tokens of WikiText-2 train (d 64)."""
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import build_datastore

    corpus = CorpusArgs(train_file=str(wikitext_dir / "train.txt"), max_tokens=12_000, block_size=128, stride=128)
    return build_datastore(tiny_lm, corpus, tmp_path_factory.mktemp("real") / "ds", batch_size=16)


def _real_queries(ds, b=40, seed=1):
    """Store keys moved a little (hidden states of similar contexts): queries with a dense neighbourhood."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(ds.N, b, replace=False)
    keys = np.asarray(ds.keys[rows], dtype=np.float32)
    return torch.from_numpy(keys + 0.05 * keys.std() * rng.standard_normal(keys.shape).astype(np.float32))


@pytest.mark.parametrize("offset", [0.0, 20.0])  # centred keys, and keys far from the origin (‖q‖² >> distances)
def test_recall_on_random_keys_at_the_default_margin(offset):
    keys, q = _random(offset=offset)
    k = 1024
    _, ref = _brute(keys, q, k)
    d, ids = TorchSearch(keys, margin=DEFAULT_MARGIN).search(q, k)
    assert _recall(ids.numpy(), ref) >= 0.999
    assert _recall(TorchSearch(keys, margin=0).search(q, k)[1].numpy(), ref) < 1.0  # the margin is what buys it


def test_recall_on_real_keys_at_the_default_margin(real_store):
    keys = np.asarray(real_store.keys)
    q = _real_queries(real_store)
    _, ref = _brute(keys, q, 1024)
    _, ids = TorchSearch(keys, margin=DEFAULT_MARGIN).search(q, 1024)
    assert _recall(ids.numpy(), ref) >= 0.999


def test_distances_are_exact(real_store):
    """The returned distances are float32 sums of squared differences: within 1e-6 (relative) of float64."""
    keys = np.asarray(real_store.keys)
    q = _real_queries(real_store)
    d, ids = TorchSearch(keys, margin=DEFAULT_MARGIN).search(q, 256)
    exact = ((keys.astype(np.float64)[ids.numpy()] - q.double().numpy()[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(d.numpy(), exact, rtol=1e-6, atol=1e-6)
    assert (np.diff(d.numpy(), axis=1) >= 0).all() and d.dtype == torch.float32 and ids.dtype == torch.int64


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_gemm_dtypes_find_the_same_neighbours(dtype):
    keys, q = _random(n=8000, d=32, offset=3.0)
    _, ref = _brute(keys, q, 64)
    d, ids = TorchSearch(keys, dtype=dtype, margin=256).search(q, 64)
    assert (ids.numpy() == ref).all()


def test_large_norms_do_not_overflow_float16():
    """Keys whose squared norms (~1e7) are far beyond float16's 65504: scores are scaled by a power of two."""
    keys, q = _random(n=5000, d=32, offset=500.0)
    _, ref = _brute(keys, q * 1.0, 32)
    _, ids = TorchSearch(keys, margin=DEFAULT_MARGIN).search(q, 32)
    assert (ids.numpy() == ref).all()
    far = q * 4  # queries farther out than any key: the scale grows for them instead of float16 overflowing
    ref_d, _ = _brute(keys, far, 32)
    ts = TorchSearch(keys, margin=DEFAULT_MARGIN)
    scale = ts.shards[0].scale
    d, ids = ts.search(far, 32)
    assert ts.shards[0].scale > scale and (ids >= 0).all()
    # every key lies within 0.2% of the same distance from these queries, about float16's grain (2^-11 = 0.05%):
    # what comes back is near the nearest to that grain, exact in its distance, and finite (nothing overflowed)
    np.testing.assert_allclose(d.numpy()[:, 0], ref_d[:, 0], rtol=1e-3)


def test_chunked_equals_unchunked(real_store):
    keys = np.asarray(real_store.keys)
    q = _real_queries(real_store)
    whole = TorchSearch(keys, query_batch=4096, key_chunk=1 << 20).search(q, 300)
    for query_batch, key_chunk in [(7, 1000), (1, 333), (40, 4096)]:
        part = TorchSearch(keys, query_batch=query_batch, key_chunk=key_chunk).search(q, 300)
        assert torch.equal(part[0], whole[0]) and torch.equal(part[1], whole[1])


def test_several_devices_merge_to_one_device(real_store):
    """The rows split over 3 "devices" (CPU shards), their exact top-k merged: the same result as one device."""
    keys = np.asarray(real_store.keys)
    q = _real_queries(real_store)
    one = TorchSearch(keys, key_chunk=2000).search(q, 500)
    three = TorchSearch(keys, devices=["cpu"] * 3, key_chunk=2000)
    assert len(three.shards) == 3 and sum(s.n for s in three.shards) == len(keys)
    d, ids = three.search(q, 500)
    assert torch.equal(d, one[0]) and torch.equal(ids, one[1])
    # exact distances of given rows from whichever shard holds them; -1 is inf
    some = torch.cat([ids[:, :5], torch.full((len(q), 1), -1), ids[:, -3:]], dim=1)
    got = three.distances(q, some)
    np.testing.assert_allclose(got[:, :5].numpy(), d[:, :5].numpy(), rtol=1e-6)
    assert torch.isinf(got[:, 5]).all()


def test_ivf_equals_faiss_ivf_flat_with_the_same_centroids(real_store):
    keys = np.asarray(real_store.keys)
    q = _real_queries(real_store, b=60)
    centroids = train_centroids(keys, 32)
    quantizer = faiss.IndexFlatL2(keys.shape[1])
    quantizer.add(centroids)
    ref = faiss.IndexIVFFlat(quantizer, keys.shape[1], len(centroids))
    ref.add(keys.astype(np.float32))
    for nprobe in (1, 4):
        ref.nprobe = nprobe
        d_ref, i_ref = ref.search(q.numpy(), 100)
        for devices in (["cpu"], ["cpu"] * 2):
            ts = TorchSearch(keys, devices=devices, centroids=centroids, nprobe=nprobe, query_batch=16, key_chunk=500)
            d, ids = ts.search(q, 100)
            assert (np.sort(ids.numpy(), 1) == np.sort(i_ref, 1)).all()  # the same rows (FAISS orders ties otherwise)
            np.testing.assert_allclose(d.numpy(), d_ref, rtol=1e-5, atol=1e-5)


def test_k_beyond_store_pads_and_a_key_is_its_own_nearest():
    keys, q = _random(n=10, d=8, b=3)
    d, ids = TorchSearch(keys).search(q, 16)
    assert (ids[:, :10] >= 0).all() and (ids[:, 10:] == -1).all() and torch.isinf(d[:, 10:]).all()
    assert sorted(ids[0, :10].tolist()) == list(range(10))
    keys, _ = _random(n=300, d=8)
    d, ids = TorchSearch(keys, key_chunk=64).search(torch.from_numpy(keys[[7, 123]].astype(np.float32)), 5)
    assert ids[:, 0].tolist() == [7, 123] and (d[:, 0] == 0).all()


def test_fewer_rows_than_devices_and_no_rows_asked():
    """Before: exact distances on a device holding no rows (3 keys on 4 devices) raised from index_select, and asking
    for no rows divided by zero."""
    keys, q = _random(n=3, d=8, b=2)
    ref_d, ref_ids = _brute(keys, q, 3)
    ts = TorchSearch(keys, devices=["cpu"] * 4)
    d, ids = ts.search(q, 3)
    assert (ids.numpy() == ref_ids).all()
    got = ts.distances(q, torch.as_tensor(ref_ids))
    np.testing.assert_allclose(got.numpy(), ref_d, rtol=1e-6)
    assert ts.distances(q, torch.empty(2, 0, dtype=torch.int64)).shape == (2, 0)


def test_more_equal_keys_than_the_margin_holds_are_taken_by_id():
    """600 equal keys (a context repeated verbatim, e.g. templated sentences) around a query, k 10 + margin 64: the
    first stage's top-k took any 74 of them, so the rows kept depended on the key chunk and the shards (870..879 with
    the default chunk, 713..722 with 256) where FAISS and the brute force take the lowest ids (700..709)."""
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 8)).astype(np.float16)
    other = (rng.standard_normal((2000, 8)) * 3).astype(np.float16)
    keys = np.concatenate([other[:700], np.repeat(one, 600, 0), other[700:]])  # rows 700..1299 equal
    q = torch.from_numpy(one.astype(np.float32) + 0.001)
    ref_d, ref_ids = _brute(keys, q, 10)
    assert ref_ids[0].tolist() == list(range(700, 710))
    flat = faiss.IndexFlatL2(8)
    flat.add(keys.astype(np.float32))
    assert flat.search(q.numpy(), 10)[1][0].tolist() == list(range(700, 710))
    for chunk in (1 << 19, 256, 97):
        for devices in (["cpu"], ["cpu"] * 3):
            d, ids = TorchSearch(keys, devices=devices, key_chunk=chunk).search(q, 10)
            assert ids[0].tolist() == list(range(700, 710)), (chunk, len(devices))
            np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5)
    centroids = train_centroids(keys, 4)  # IVF: the equal keys share a list
    d, ids = TorchSearch(keys, centroids=centroids, nprobe=4, key_chunk=97).search(q, 10)
    assert ids[0].tolist() == list(range(700, 710))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_queries_on_a_group_of_equal_keys_in_any_query_batch(dtype):
    """Queries on 300 equal keys (a store queried with its own text): searched again with fewer queries, another GEMM
    shape summed the scores near 0 otherwise (5e-4 apart in float32), a band relative to the score counted no key, and
    the query came back with no neighbour at all."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2000, 32)).astype(np.float16)
    group = np.sort(rng.choice(2000, 300, replace=False))
    keys[group] = keys[group[0]]
    q = np.concatenate([keys[group[:1]].astype(np.float32).repeat(4, 0),
                        rng.standard_normal((4, 32)).astype(np.float32)])
    ref_d, ref_ids = _brute(keys, torch.from_numpy(q), 5)
    for batch in (1, 3, 8):
        d, ids = TorchSearch(keys, dtype=dtype, margin=4, key_chunk=100, query_batch=batch).search(torch.from_numpy(q), 5)
        assert (ids.numpy() == ref_ids).all(), (batch, ids[:4].tolist())
        np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-5, atol=1e-5)


def test_ivf_lists_with_fewer_than_k_keys_pad_with_minus_one():
    keys, q = _random(n=400, d=8, b=5)
    d, ids = TorchSearch(keys, centroids=train_centroids(keys, 16, points_per_list=25), nprobe=1).search(q, 200)
    filled = (ids >= 0).sum(dim=1)
    assert (filled < 200).all() and (filled > 0).all()
    assert torch.isinf(d[ids < 0]).all() and torch.isfinite(d[ids >= 0]).all()


def test_retriever_and_bad_settings(real_store):
    from knnlm.errors import KnnlmError
    from knnlm.knn import Retriever

    q = _real_queries(real_store)
    r = Retriever(real_store, KNNArgs(k=32, search_backend="torch", recompute_dists=True))
    assert r.backend.name == "torch" and not r.recompute  # its distances are exact already
    d, vals = r.search(q)
    d_f, vals_f = Retriever(real_store, KNNArgs(k=32, recompute_dists=True)).search(q)
    np.testing.assert_allclose(d.numpy(), d_f.numpy(), rtol=1e-6)
    assert torch.equal(vals, vals_f)
    for bad, flag in [(dict(search_dtype="int8"), "--search_dtype"), (dict(search_margin=-1), "--search_margin"),
                      (dict(search_nlist=-2), "--search_nlist")]:
        with pytest.raises(KnnlmError, match=flag):
            KNNArgs(**bad).validate()


def test_perplexity_equals_faiss_flat_through_evaluate(tiny_lm, real_store, wikitext_dir, tmp_path):
    """kNN-LM perplexity through the real evaluate path: --search_backend torch vs faiss (exact Flat), to 1e-5."""
    from knnlm.corpus import CorpusArgs
    from knnlm.evaluate import EvalArgs, evaluate

    corpus = CorpusArgs(validation_file=str(wikitext_dir / "valid.txt"), max_tokens=1500, block_size=128, stride=64)
    out = {}
    for backend in ("torch", "faiss"):
        knn = KNNArgs(k=256, lmbda=[0.25, 0.5], search_backend=backend)
        out[backend] = evaluate(tiny_lm, corpus, tmp_path / backend, EvalArgs(output_dir=str(tmp_path / backend)),
                                datastore=real_store, knn=knn)
    assert out["torch"]["ppl_lm"] == out["faiss"]["ppl_lm"]
    assert out["torch"]["ppl_knnlm"] != out["torch"]["ppl_lm"]
    for lam, ppl in out["faiss"]["sweep_knn"].items():
        assert out["torch"]["sweep_knn"][lam] == pytest.approx(ppl, rel=1e-5)


def test_augmented_model_distribution_equals_faiss(tiny_lm, real_store):
    """Generation's full distribution (augment's logits) with the torch backend: the faiss backend's, to 1e-5."""
    from knnlm.augmented import augment, detach

    ids = torch.tensor([tiny_lm.encode(" The game was released in Japan and the United States in 2011 .")])
    out = {}
    for backend in ("torch", "faiss"):
        model = augment(tiny_lm, datastore=real_store, k=128, lmbda=0.3, search_backend=backend)
        try:  # tiny_lm is the session's: no hook may outlive this test, even a failed one
            with torch.no_grad():
                out[backend] = model(ids).logits  # [1, T, V] log p_knnlm
            assert model.knnlm.retriever.backend.name == backend
        finally:
            detach(model)
    torch.testing.assert_close(out["torch"], out["faiss"], rtol=1e-5, atol=1e-5)


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_search.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_search", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_runs_at_tiny_size(tiny_gpt2_dir, real_store, wikitext_dir, tmp_path):
    """benchmarks/gpu_search.py's plumbing on the CPU (its timings mean nothing at this size)."""
    bench = _benchmark()
    rec = bench.main(["recall", "--random", "3000,16", "--queries", "20", "--k", "32", "--margins", "0,64",
                      "--device", "cpu", "--out", str(tmp_path / "recall.json")])
    assert rec["recall"]["float16"][64] == {"mean": 1.0, "min": 1.0} and (tmp_path / "recall.json").exists()
    assert 0.5 < rec["recall"]["bfloat16"][0]["mean"] <= 1.0
    res = bench.main(["eval", "--model_name_or_path", str(tiny_gpt2_dir), "--datastore", str(real_store.dir),
                      "--validation_file", str(wikitext_dir / "valid.txt"), "--max_tokens", "400", "--reps", "1",
                      "--k", "64", "--device", "cpu", "--threads", "1", "--batch_size", "2"])
    assert res["n_tokens"] > 300 and res["ppl_relative_difference"] < 1e-5
    assert res["ppl_knnlm"] != res["ppl_lm"]


# ------------------------------------------------------------------------------------------------------ CUDA only
@cuda
def test_cuda_matches_cpu_and_keeps_results_on_the_gpu():
    keys, q = _random(n=50_000, d=64, b=64)
    cpu = TorchSearch(keys).search(q, 1024)
    gpu = TorchSearch(keys, devices=["cuda"]).search(q.cuda(), 1024)
    assert gpu[0].is_cuda and gpu[1].is_cuda
    _, ref = _brute(keys, q, 1024)
    assert _recall(gpu[1].cpu().numpy(), ref) >= 0.999
    np.testing.assert_allclose(gpu[0].cpu().numpy()[:, :100], cpu[0].numpy()[:, :100], rtol=1e-5)


@cuda
def test_cuda_ivf_and_shards_equal_faiss(real_store):
    keys = np.asarray(real_store.keys)
    q = _real_queries(real_store)
    centroids = train_centroids(keys, 32)
    quantizer = faiss.IndexFlatL2(keys.shape[1])
    quantizer.add(centroids)
    ref = faiss.IndexIVFFlat(quantizer, keys.shape[1], len(centroids))
    ref.add(keys.astype(np.float32))
    ref.nprobe = 4
    d_ref, i_ref = ref.search(q.numpy(), 100)
    d, ids = TorchSearch(keys, devices=["cuda", "cuda"], centroids=centroids, nprobe=4).search(q.cuda(), 100)
    assert (np.sort(ids.cpu().numpy(), 1) == np.sort(i_ref, 1)).all()  # the same rows (FAISS orders ties otherwise)
    np.testing.assert_allclose(d.cpu().numpy(), d_ref, rtol=1e-5, atol=1e-5)


@cuda
def test_cuda_evaluate_keeps_the_knn_path_on_the_gpu(tiny_gpt2_dir, real_store, wikitext_dir, tmp_path):
    from knnlm.corpus import CorpusArgs
    from knnlm.evaluate import EvalArgs, evaluate
    from knnlm.models import ModelArgs, load_model

    lm = load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cuda", dtype="float32"))
    corpus = CorpusArgs(validation_file=str(wikitext_dir / "valid.txt"), max_tokens=1500, block_size=128, stride=64)
    out = {}
    for backend in ("torch", "faiss"):
        out[backend] = evaluate(lm, corpus, tmp_path / backend, EvalArgs(output_dir=str(tmp_path / backend)),
                                datastore=real_store, knn=KNNArgs(k=256, search_backend=backend))
    assert out["torch"]["ppl_knnlm"] == pytest.approx(out["faiss"]["ppl_knnlm"], rel=1e-5)
