"""FAISS indexes: Flat equals numpy brute force; IVF-PQ recall; shards equal one index; resumable builds."""
import numpy as np
import torch
import pytest

from knnlm.datastore import Datastore
from knnlm.errors import KnnlmError
from knnlm.fileio import atomic_write_json
from knnlm.index import IndexArgs, build_index, default_factory, exact_knn, load_index, recall_at_k


def make_store(path, n=4000, d=16, seed=0):
    """A synthetic datastore folder in the on-disk format (clustered keys so IVF has structure)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d)) * 4
    keys = (centers[rng.integers(0, 20, n)] + rng.normal(size=(n, d))).astype(np.float16)
    path.mkdir(parents=True)
    keys.tofile(path / "keys.f16")
    rng.integers(0, 100, n).astype(np.int32).tofile(path / "vals.i32")
    atomic_write_json(path / "meta.json", {"N": n, "d": d, "key_point": "ffn_input"})
    return Datastore.open(path)


def test_flat_equals_numpy(tmp_path):
    ds = make_store(tmp_path / "ds")
    build_index(ds, IndexArgs(factory="Flat"))
    index = load_index(ds.dir)
    q = np.asarray(ds.keys[:50], dtype=np.float32) + 0.1
    d, i = index.search(q, 8)
    keys = np.asarray(ds.keys, dtype=np.float32)
    ref = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    ref_i = np.argsort(ref, axis=1, kind="stable")[:, :8]
    np.testing.assert_allclose(d, np.take_along_axis(ref, ref_i, 1), rtol=1e-4)
    assert recall_at_k(i, ref_i) == 1.0
    # the streaming brute force, 13 chunks of 333 keys merged: the same ids and distances as numpy
    assert ds.N > 10 * 333 and len(np.unique(ref_i // 333)) > 5  # the true neighbours lie in many chunks
    ed, ei = exact_knn(ds, q, 8, chunk=333)
    assert ed.shape == ei.shape == (50, 8)
    np.testing.assert_allclose(ed, np.take_along_axis(ref, ref_i, 1), rtol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(ref, ei, 1), np.take_along_axis(ref, ref_i, 1), rtol=1e-5)
    # the ids themselves wherever the rank is unambiguous (float32 rounding can swap near-ties: those are covered
    # by the distances at the ids above)
    top9 = np.sort(((q[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1), axis=1)[:, :9]
    gap = np.diff(top9, axis=1)  # [50, 8]: to the next one
    clear = np.minimum(gap, np.concatenate([np.full((50, 1), np.inf), gap[:, :-1]], axis=1)) > 1e-3  # both sides
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ei[clear], ref_i[clear])


def test_ivfpq_recall_and_shards(tmp_path):
    ds = make_store(tmp_path / "ds")
    info = build_index(ds, IndexArgs(factory="IVF32,PQ8x4", nprobe=8, train_size=2000, recall_k=10, recall_queries=200))
    assert info["recall"]["recall@10"] > 0.5
    ds2 = make_store(tmp_path / "ds2")
    info2 = build_index(ds2, IndexArgs(factory="IVF32,Flat", nprobe=32, shards=3, recall_k=10, recall_queries=200))
    assert info2["recall"]["recall@10"] == pytest.approx(1.0)  # every list probed: exact
    index = load_index(ds2.dir, nprobe=32)
    assert index.ntotal == ds2.N
    q = np.asarray(ds2.keys[100:110], dtype=np.float32)
    _, ids = index.search(q, 1)
    assert list(ids[:, 0]) == list(range(100, 110))  # shard ids are global rows


def test_more_shards_than_keys_is_refused(tmp_path):
    ds = make_store(tmp_path / "ds", n=50)
    with pytest.raises(KnnlmError, match=r"^--shards: 51 shards for 50 keys would leave shards empty; use at most 50$"):
        build_index(ds, IndexArgs(factory="Flat", shards=51, recall_queries=0))
    assert not (ds.dir / "index" / "shard50.faiss").exists()
    with pytest.raises(KnnlmError, match=r"^--factory: 'IVF4,Bogus' is not a valid faiss.index_factory string"):
        build_index(ds, IndexArgs(factory="IVF4,Bogus", recall_queries=0))
    assert not (ds.dir / "index").exists()  # nothing half-made left beside the store
    build_index(ds, IndexArgs(factory="Flat", recall_queries=0))
    # over a built index, a bad string is named first (it asked for --overwrite, then the rerun named the string), with
    # FAISS's reason whole (it was cut at 120 characters, inside the condition)
    with pytest.raises(KnnlmError, match=rf"^--factory: 'IVF4,PQ7' is not a valid faiss.index_factory string for "
                                         rf"d={ds.d} \(The dimension of the vector \(d\) should be a multiple of the "
                                         r"number of subquantizers \(M\)\)$"):
        build_index(ds, IndexArgs(factory="IVF4,PQ7", recall_queries=0))


def test_resume_after_kill(tmp_path, monkeypatch):
    import knnlm.index as index_mod

    ds = make_store(tmp_path / "ds")
    args = IndexArgs(factory="IVF16,Flat", add_chunk=500, train_size=1000, recall_queries=0)
    real_chunks = index_mod._key_chunks

    def dying(*a, **kw):  # the process "dies" while adding the fourth chunk
        for i, item in enumerate(real_chunks(*a, **kw)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(index_mod, "CHECKPOINT_S", 0.0)
    monkeypatch.setattr(index_mod, "_key_chunks", dying)
    with pytest.raises(KeyboardInterrupt):
        build_index(ds, args)
    monkeypatch.setattr(index_mod, "_key_chunks", real_chunks)
    import faiss
    assert faiss.read_index(str(ds.dir / "index" / "partial0.faiss")).ntotal == 1500
    info = build_index(ds, args)
    index = load_index(ds.dir, nprobe=16)
    assert index.ntotal == ds.N == info["ntotal"]
    _, ids = index.search(np.asarray(ds.keys[:20], dtype=np.float32), 1)
    assert list(ids[:, 0]) == list(range(20))


def test_default_factory_and_errors(tmp_path):
    assert default_factory(1000, 64, 10_000) == "Flat"
    assert default_factory(1_000_000, 576, 10_000) == "IVF4096,PQ64"
    assert default_factory(2_000_000, 64, 10_000).endswith("PQ16")
    ds = make_store(tmp_path / "ds", n=500)
    with pytest.raises(KnnlmError, match="--factory"):
        build_index(ds, IndexArgs(factory="NotAnIndex"))
    build_index(ds, IndexArgs(factory="Flat"))
    with pytest.raises(KnnlmError, match="--overwrite"):
        build_index(ds, IndexArgs(factory="IVF4,Flat"))


def test_recomputed_distances_are_exact(tmp_path, monkeypatch):
    """With a PQ index, --recompute_dists gives numpy's exact distances to the retrieved keys, chunked or not."""
    import knnlm.distances as knn_mod
    from knnlm.knn import KNNArgs, Retriever

    ds = make_store(tmp_path / "ds")
    build_index(ds, IndexArgs(factory="IVF32,PQ8x4", nprobe=8, train_size=2000, recall_queries=0))
    q = np.asarray(ds.keys[:37], dtype=np.float32) + 0.05
    keys = np.asarray(ds.keys, dtype=np.float32)
    found = {}
    # float32 keys in RAM; float16 keys read from disk (no RAM to spare) in chunks of 3 queries (the last one short)
    for floats, ram in ((1 << 22, 1 << 40), (16 * 10 * 3, 0)):
        monkeypatch.setattr(knn_mod, "_RECOMPUTE_FLOATS", floats)
        monkeypatch.setattr(knn_mod, "_available_ram", lambda: ram)
        retriever = Retriever(ds, KNNArgs(k=10, recompute_dists=True, nprobe=8))
        assert retriever.backend.keys.dtype == (torch.float32 if ram else torch.float16)
        _, ids = retriever.backend.index.search(q, 10)
        dists, vals = retriever.search(torch.from_numpy(q))
        ref = ((q[:, None, :] - keys[ids]) ** 2).sum(-1)
        np.testing.assert_allclose(dists.numpy(), ref, rtol=1e-5)
        assert (vals.numpy() == np.asarray(ds.vals)[ids]).all()
        found[floats] = dists.numpy()
    np.testing.assert_allclose(*found.values(), rtol=1e-6)  # the two paths sum in different orders


def test_no_polysemous_training_unless_asked(tmp_path):
    """index_factory turns polysemous training on for IVF-PQ; knnlm's default trains as the factory's 'np' form does
    (same PQ centroids, bit for bit), --polysemous true reorders them; index.json records the flag and timings."""
    import faiss

    ds = make_store(tmp_path / "ds")
    info = build_index(ds, IndexArgs(factory="IVF16,PQ4", train_size=2000, recall_k=10, recall_queries=100))
    assert info["polysemous"] is False and info["recall"]["recall@10"] > 0.3
    assert {"train_s", "train_cpu_s", "add_s", "add_cpu_s", "recall_s"} <= set(info["build_timing"])
    ours = faiss.read_index(str(tmp_path / "ds" / "index" / "trained.faiss"))
    sample = np.asarray(ds.keys[np.sort(np.random.default_rng(0).choice(ds.N, 2000, replace=False))], np.float32)
    plain = faiss.index_factory(ds.d, "IVF16,PQ4np")
    plain.train(sample)
    np.testing.assert_array_equal(faiss.vector_to_array(ours.pq.centroids), faiss.vector_to_array(plain.pq.centroids))
    ds2 = make_store(tmp_path / "ds2")
    build_index(ds2, IndexArgs(factory="IVF16,PQ4", train_size=2000, recall_queries=0, polysemous=True))
    poly = faiss.read_index(str(tmp_path / "ds2" / "index" / "trained.faiss"))
    assert not np.array_equal(faiss.vector_to_array(poly.pq.centroids), faiss.vector_to_array(plain.pq.centroids))


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "SQ8"])
def test_polysemous_without_pq_codes_is_refused_before_any_folder(tmp_path, factory):
    """--polysemous true with a factory that has no PQ codes did nothing and the build went on as if it had."""
    ds = make_store(tmp_path / "ds", n=500)
    with pytest.raises(KnnlmError, match=r"^--polysemous: the factory .* has no PQ codes"):
        build_index(ds, IndexArgs(factory=factory, recall_queries=0, polysemous=True))
    assert not (tmp_path / "ds" / "index").exists()


@pytest.mark.parametrize("rerun", [{"shards": 3}, {"factory": "IVF8,Flat"}, {"seed": 1}])
def test_an_interrupted_build_of_other_settings_leaves_nothing_in_the_new_one(tmp_path, monkeypatch, rerun):
    """A build killed while adding, rerun with other shards, factory or seed, trained anew but kept the killed build's
    partial shards, and filled them on: rows of another range or quantizer under the new index.json."""
    import faiss

    import knnlm.index as index_mod

    first = dict(factory="IVF16,Flat", add_chunk=500, train_size=1000, recall_queries=0, shards=2)
    real_chunks = index_mod._key_chunks

    def dying(*a, **kw):  # dies while adding the second shard's third chunk: partial1 holds its first 1,000 rows
        for i, item in enumerate(real_chunks(*a, **kw)):
            if a[1] > 0 and i == 2:
                raise KeyboardInterrupt
            yield item

    ds = make_store(tmp_path / "ds")
    monkeypatch.setattr(index_mod, "CHECKPOINT_S", 0.0)
    monkeypatch.setattr(index_mod, "_key_chunks", dying)
    with pytest.raises(KeyboardInterrupt):
        build_index(ds, IndexArgs(**first))
    monkeypatch.setattr(index_mod, "_key_chunks", real_chunks)
    assert faiss.read_index(str(ds.dir / "index" / "partial1.faiss")).ntotal == 1000
    build_index(ds, IndexArgs(**{**first, **rerun}))
    clean = make_store(tmp_path / "clean")
    build_index(clean, IndexArgs(**{**first, **rerun}))
    shards = {**first, **rerun}["shards"]
    for s in range(shards):  # the same bytes as a build that was never interrupted
        assert (ds.dir / "index" / f"shard{s}.faiss").read_bytes() == (clean.dir / "index" / f"shard{s}.faiss").read_bytes()
    assert not list((ds.dir / "index").glob("partial*"))


def test_recall_leaves_each_querys_own_row_out(tmp_path):
    """The recall check's queries are stored keys: each one's own row is its nearest key, so recall@1 read 1.0 whatever
    the index (0.534 for held-out queries in the review's repro). Both lists now leave it out; the numbers equal a
    brute-force count."""
    ds = make_store(tmp_path / "ds")
    args = IndexArgs(factory="IVF32,PQ4x4", nprobe=2, train_size=2000, recall_k=10, recall_queries=200, seed=3)
    rec = build_index(ds, args)["recall"]
    rows = np.sort(np.random.default_rng(args.seed + 1).choice(ds.N, size=200, replace=False))
    keys = np.asarray(ds.keys, dtype=np.float64)
    dist = ((keys[rows][:, None, :] - keys[None]) ** 2).sum(-1)
    dist[np.arange(200), rows] = np.inf  # the query's own row
    exact = np.argsort(dist, axis=1, kind="stable")[:, :10]
    _, found = load_index(ds.dir, nprobe=2).search(np.asarray(ds.keys[rows], dtype=np.float32), 11)
    approx = np.stack([f[f != r][:10] for f, r in zip(found, rows)])
    assert rec["self_excluded"] and rec["queries"] == 200 and rec["nprobe"] == 2
    assert rec["recall@10"] == pytest.approx(recall_at_k(approx, exact), abs=0.01)  # (float32 near-ties aside)
    assert rec["recall@1"] == pytest.approx(recall_at_k(approx[:, :1], exact[:, :1]), abs=0.01)
    assert rec["recall@1"] < 0.9  # a PQ4x4 index: no longer 1.0 by construction


def test_a_rerun_of_other_build_settings_is_refused_and_of_other_recall_settings_remeasures(tmp_path, caplog):
    """A finished index was returned as it was for any rerun with the same factory and shards: another --seed,
    --train_size or --polysemous left the old index (the user believed a new one was built), another --nprobe left its
    recall record at the old nprobe. Searches at another --nprobe than the record's say so."""
    import logging

    ds = make_store(tmp_path / "ds")
    base = dict(factory="IVF32,PQ4x4", nprobe=2, train_size=2000, recall_k=10, recall_queries=100)
    first = build_index(ds, IndexArgs(**base))
    for flag, value in (("seed", 7), ("train_size", 3000), ("polysemous", True)):
        with pytest.raises(KnnlmError, match=rf"^--{flag}: .* already holds an index built with {flag} .*--overwrite"):
            build_index(ds, IndexArgs(**{**base, flag: value}))
    again = build_index(ds, IndexArgs(**{**base, "nprobe": 32}))
    assert again["nprobe"] == again["recall"]["nprobe"] == 32 and again["sha256"] == first["sha256"]
    assert again["recall"]["recall@10"] > first["recall"]["recall@10"]
    with caplog.at_level(logging.WARNING, logger="knnlm.index"):
        load_index(ds.dir, nprobe=8)
    assert "measured at nprobe 32; this search visits 8 lists" in caplog.text


def test_a_rerun_of_an_index_recorded_before_its_seed_was_is_not_refused(tmp_path):
    """A record from before index.json kept seed and train_size cannot say them: a rerun with a non-default --seed was
    refused, naming a value the build never had (found reviewing this session's diff). A store smaller than
    --recall_queries keeps its recall record on a rerun (it was measured again every time)."""
    import json

    ds = make_store(tmp_path / "ds", n=500)
    base = dict(factory="IVF8,PQ4x4", nprobe=2, train_size=400, recall_k=10, seed=5)  # 1,000 queries > 500 keys
    build_index(ds, IndexArgs(**base))
    info_path = ds.dir / "index" / "index.json"
    before = info_path.read_bytes()
    assert build_index(ds, IndexArgs(**base))["recall"]["queries"] == 500 and info_path.read_bytes() == before
    old = json.loads(before)
    del old["seed"], old["train_size"]
    info_path.write_text(json.dumps(old))
    assert build_index(ds, IndexArgs(**base))["factory"] == "IVF8,PQ4x4"
