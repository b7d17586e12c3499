"""--search_backend ray: shard actors give the ids and distances of one-process IndexShards (and of Flat), the same
kNN-LM perplexity as --search_backend faiss (also with a shard actor killed mid-evaluation), one-line errors for
missing or foreign shards, `index serve` / `index stop`. One local Ray of 2 CPUs for the whole module."""
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from knnlm.cli import main  # noqa: E402
from knnlm.errors import KnnlmError  # noqa: E402
from knnlm.index import IndexArgs, _read_index, build_index, flat_index, load_index, trained_fingerprint  # noqa: E402
from knnlm.knn import KNNArgs  # noqa: E402
from knnlm.ray_search import RayBackend, check_shards, served_actors  # noqa: E402
from knnlm.search import IndexBackend, make_backend  # noqa: E402
from test_index import make_store  # noqa: E402

CPUS = "0.5"  # per shard actor: a served group and an evaluation's own group fit the 2 CPUs together


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray (2 CPUs, no dashboard) for the module; afterwards no Ray process of this test run is left."""
    import psutil

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="knnlm", log_to_driver=False)
    yield
    ray.shutdown()
    deadline = time.time() + 20
    while time.time() < deadline:
        left = [p.name() for p in psutil.Process().children(recursive=True)
                if any(n in p.name() for n in ("raylet", "gcs_server"))]
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"Ray processes left after shutdown: {left}"


def _args(**kw) -> KNNArgs:
    args = KNNArgs(search_backend="ray", ray_shard_cpus=float(CPUS), **kw)
    args.validate()
    return args


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A 4,000-key synthetic store with a 2-shard Flat index, and one with a 2-shard IVF-PQ index."""
    root = tmp_path_factory.mktemp("ray_stores")
    flat = make_store(root / "flat")
    build_index(flat, IndexArgs(factory="Flat", shards=2))
    pq = make_store(root / "pq")
    build_index(pq, IndexArgs(factory="IVF32,PQ8x4", shards=2, train_size=2000, recall_queries=0))
    return {"flat": flat, "pq": pq}


@pytest.mark.parametrize("kind,k,nprobe", [("flat", 10, 1), ("flat", 2100, 1), ("pq", 50, 8), ("pq", 300, 2)])
def test_ids_and_distances_equal_index_shards(stores, kind, k, nprobe):
    ds = stores[kind]
    q = torch.from_numpy(np.asarray(ds.keys[::200], dtype=np.float32) + 0.05)  # [20, d]
    ref = IndexBackend(load_index(ds.dir, nprobe=nprobe, use_gpu=False), ds)  # faiss.IndexShards in this process
    backend = make_backend(ds, _args(nprobe=nprobe))
    try:
        assert isinstance(backend, RayBackend) and len(backend.actors) == 2
        dists, ids = backend.search(q, k)
        ref_d, ref_i = ref.search(q, k)
        assert torch.equal(ids, ref_i) and torch.equal(dists, ref_d)
        if (kind, k) == ("flat", 2100):  # more than a shard holds: both shards pad with -1, the merge fills all k
            assert (ids >= 0).all() and (ids < 2000).any(1).all() and (ids >= 2000).any(1).all()
        if (kind, k) == ("pq", 300):  # 2 of 32 lists hold fewer than 300 keys: unfilled -1 / inf, as IndexShards
            assert (ids < 0).any() and torch.isinf(dists[ids < 0]).all()
        if kind == "flat":  # exact search over the two shards = one Flat index over the store
            one_d, one_i = IndexBackend(flat_index(ds, use_gpu=False), ds).search(q, k)
            assert torch.equal(ids, one_i) and torch.equal(dists, one_d)
        probe = torch.cat([ids[:, :7], torch.full((len(q), 1), -1)], dim=1)  # both shards' rows and a -1
        got = backend.distances(q, probe)
        assert torch.equal(got, ref.distances(q, probe)) and torch.isinf(got[:, -1]).all()
        brute = ((np.asarray(ds.keys, dtype=np.float64)[probe[:, :7].clamp_min(0).numpy()]
                  - q.numpy()[:, None, :].astype(np.float64)) ** 2).sum(-1)
        np.testing.assert_allclose(got[:, :7].numpy(), brute, rtol=1e-5)
    finally:
        backend.close()


def test_shard_keys_from_a_slice_file(stores, tmp_path):
    """A node holding only its shard's rows (index/shard<s>.keys.f16) gives the same exact distances."""
    src = stores["flat"]
    shutil.copytree(src.dir, tmp_path / "ds")
    from knnlm.datastore import Datastore

    ds = Datastore.open(tmp_path / "ds")
    np.asarray(ds.keys[2000:]).tofile(ds.dir / "index" / "shard1.keys.f16")
    q = torch.from_numpy(np.asarray(ds.keys[::400], dtype=np.float32) + 0.05)
    backend = make_backend(ds, _args(recompute_dists=True))
    try:
        assert backend.descs[1]["keys"].endswith("shard1.keys.f16")
        ids = torch.tensor([[1999, 2000, 3999]] * len(q))
        assert torch.equal(backend.distances(q, ids), IndexBackend(None, ds).distances(q, ids))
    finally:
        backend.close()


def test_trained_fingerprint_tells_builds_apart(stores, tmp_path):
    idir = stores["pq"].dir / "index"
    fps = {trained_fingerprint(_read_index(idir / f)) for f in ("trained.faiss", "shard0.faiss", "shard1.faiss")}
    assert len(fps) == 1  # one trained quantizer, whatever was added
    other = make_store(tmp_path / "other")
    build_index(other, IndexArgs(factory="IVF32,PQ8x4", shards=2, train_size=2000, recall_queries=0, seed=1))
    assert trained_fingerprint(_read_index(other.dir / "index" / "shard0.faiss")) not in fps


def test_foreign_store_and_wrong_rows_refused():
    """check_shards, on what the shard actors of another store's copy on some node would report."""
    want = {"N": 4000, "meta_sha256": "aaaa"}
    expected = {"datastore": want, "factory": "Flat", "shards": 2, "bounds": [0, 2000, 4000], "trained": "t"}
    good = {"error": None, "datastore": want, "store": want, "bounds": [0, 2000], "ntotal": 2000, "factory": "Flat",
            "trained": "t", "keys": "keys.f16", "shard": 0, "node_ip": "10.0.0.7", "node_id": "abcdef123456"}
    second = {**good, "shard": 1, "bounds": [2000, 4000]}
    check_shards([good, second], expected, "--search_backend ray", need_keys=True)
    cases = [({"store": {"N": 5000, "meta_sha256": "bbbb"}}, "another datastore (N=5000, meta bbbb"),
             ({"datastore": {"N": 4000, "meta_sha256": "cccc"}}, "another datastore (N=4000, meta cccc"),
             ({"ntotal": 1999}, "holds 1999 rows"),
             ({"trained": "u"}, "another trained quantizer"),
             ({"keys": None}, "no keys for exact distances")]
    for change, needle in cases:
        with pytest.raises(KnnlmError) as e:
            check_shards([good, {**second, **change}], expected, "--search_backend ray", need_keys=True)
        msg = str(e.value)
        assert needle in msg and "shard 1 on node 10.0.0.7 (abcdef12)" in msg and "\n" not in msg


def _wait_dead(actor, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=10)
        except ray.exceptions.RayError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed shard actor still answers")


def test_dead_shard_after_retries_is_one_line(stores):
    backend = make_backend(stores["flat"], _args())
    try:
        q = torch.from_numpy(np.asarray(stores["flat"].keys[:4], dtype=np.float32))
        backend.search(q, 5)
        ray.kill(backend.actors[1], no_restart=True)  # gone for good: Ray's retries cannot bring it back
        _wait_dead(backend.actors[1])  # ray.kill is asynchronous: a search sent at once could still be answered
        with pytest.raises(KnnlmError) as e:
            backend.search(q, 5)
        msg = str(e.value)
        assert "shard 1 on node" in msg and "did not answer after 3 retries" in msg and "\n" not in msg
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------------- the eval path
@pytest.fixture(scope="module")
def lm_store(tiny_gpt2_dir, wikitext_dir, tmp_path_factory):
    """The tiny GPT-2's store over 3,000 WikiText-2 tokens with a 2-shard IVF-PQ index; the eval flags."""
    root = tmp_path_factory.mktemp("ray_lm")
    model = ["--model_name_or_path", str(tiny_gpt2_dir)]
    win = ["--block_size", "128", "--stride", "64"]
    assert main(["datastore", "build", *model, *win, "--train_file", str(wikitext_dir / "train.txt"),
                 "--max_tokens", "3000", "--output_dir", str(root / "ds")]) == 0
    assert main(["index", "build", str(root / "ds"), "--factory", "IVF16,PQ8", "--shards", "2",
                 "--recall_queries", "0"]) == 0
    flags = [*model, *win, "--validation_file", str(wikitext_dir / "valid.txt"), "--max_tokens", "700",
             "--k", "64", "--nprobe", "4", "--recompute_dists", "true", "--batch_size", "2"]
    return root, flags


def _ppl(out) -> float:
    return json.loads((out / "results.json").read_text())["metrics"]["ppl_knnlm"]


def _eval(lm_store, tmp_path, name, *extra) -> float:
    root, flags = lm_store
    assert main(["eval", *flags, "--datastore", str(root / "ds"), "--output_dir", str(tmp_path / name), *extra]) == 0
    return _ppl(tmp_path / name)


@pytest.fixture(scope="module")
def faiss_ppl(lm_store, tmp_path_factory):
    return _eval(lm_store, tmp_path_factory.mktemp("faiss_eval"), "faiss", "--search_backend", "faiss")


def test_perplexity_equal_to_faiss_with_a_shard_killed(lm_store, faiss_ppl, tmp_path, monkeypatch):
    """The real eval path; the process of shard 0 is SIGKILLed before the third batch is sent: Ray restarts it, it
    reloads its shard, the batch is retried, and the perplexity is that of --search_backend faiss."""
    calls, killed, after = [], [], []
    real = RayBackend.search

    def search(self, queries, k):
        calls.append(len(queries))
        if len(calls) == 3:
            killed.append(self.descs[0]["pid"])
            os.kill(killed[0], signal.SIGKILL)
        out = real(self, queries, k)
        if len(calls) == 3:
            after.append(ray.get(self.actors[0].describe.remote()))
        return out

    monkeypatch.setattr(RayBackend, "search", search)
    ppl = _eval(lm_store, tmp_path, "ray", "--search_backend", "ray", "--ray_shard_cpus", CPUS)
    assert after[0]["restarted"] and after[0]["pid"] != killed[0]  # a new process, which reloaded shard 0
    assert len(calls) > 3 and ppl == pytest.approx(faiss_ppl, rel=1e-6, abs=0)
    assert ppl == faiss_ppl  # in fact bit-equal: the same shard searches, the same merge


def test_missing_or_foreign_shard_exit_2(lm_store, tmp_path, capsys):
    root, flags = lm_store
    copy = tmp_path / "ds"
    shutil.copytree(root / "ds", copy)
    run = ["eval", *flags, "--datastore", str(copy), "--search_backend", "ray", "--ray_shard_cpus", CPUS]
    (copy / "index" / "shard1.faiss").unlink()
    assert main([*run, "--output_dir", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "knnlm: error: --search_backend ray: shard 1 on node" in err
    assert "shard1.faiss does not exist" in err
    # shard 1 of a second build of the same store, trained on another sample: another quantizer
    other = tmp_path / "other"
    shutil.copytree(root / "ds", other)
    assert main(["index", "build", str(other), "--factory", "IVF16,PQ8", "--shards", "2", "--recall_queries", "0",
                 "--train_size", "2000", "--seed", "7", "--overwrite"]) == 0  # another training sample
    shutil.copy(other / "index" / "shard1.faiss", copy / "index" / "shard1.faiss")
    capsys.readouterr()
    assert main([*run, "--output_dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "shard 1 on node" in err and "another trained quantizer" in err


def test_serve_two_evaluations_stop(lm_store, faiss_ppl, tmp_path, capsys):
    root, _ = lm_store
    assert main(["index", "serve", str(root / "ds"), "--name", "t27", "--ray_shard_cpus", CPUS]) == 0
    assert "serving t27" in capsys.readouterr().out
    assert served_actors(ray, "t27") == ["t27/shard0", "t27/shard1"]
    assert main(["index", "serve", str(root / "ds"), "--name", "t27"]) == 2  # the name is taken
    served = ["--search_backend", "ray", "--ray_address", "auto", "--ray_index", "t27"]
    assert _eval(lm_store, tmp_path, "e1", *served) == faiss_ppl
    assert _eval(lm_store, tmp_path, "e2", *served) == faiss_ppl
    searches = [ray.get(ray.get_actor(f"t27/shard{s}", namespace="knnlm").describe.remote())["searches"]
                for s in range(2)]
    assert searches[0] == searches[1] > 0  # both evaluations searched the served shards
    capsys.readouterr()
    assert main(["index", "stop", "t27"]) == 0
    assert "stopped t27: 2 shard actor(s)" in capsys.readouterr().out
    assert served_actors(ray, "t27") == []
    assert main(["eval", *lm_store[1], "--datastore", str(root / "ds"), "--output_dir", str(tmp_path / "e3"),
                 *served]) == 2
    assert "--ray_index: no group named 't27' is served; start it with `knnlm index serve" in capsys.readouterr().err
    assert main(["index", "stop", "t27"]) == 2


def test_index_serve_of_what_is_not_a_datastore(tmp_path, capsys):
    """Before: a file, a model folder or a missing path got '--search_backend ray: X has no built index' (a flag
    index serve does not have, and a fix that cannot work)."""
    (tmp_path / "a.txt").write_text("x")
    for target, needle in ((tmp_path / "a.txt", "is a file, not a datastore folder"),
                           (tmp_path / "missing", "does not exist")):
        assert main(["index", "serve", str(target), "--name", "g"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"knnlm: error: index serve: {target} {needle}") and err.count("\n") == 1, err


def test_an_address_where_nothing_listens_is_one_line_at_once(monkeypatch):
    """Before: Ray retried such an address for minutes (`index stop --ray_address 127.0.0.1:9` ran 200 s). One TCP
    connection attempt per address, bounded by CONNECT_TIMEOUT_S (the ray:// prefix stripped), not a timed wait."""
    import socket

    from knnlm.ray_search import CONNECT_TIMEOUT_S, _require_listening

    tried = []

    def refused(address, timeout=None):
        tried.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    for address in ("127.0.0.1:6390", "ray://127.0.0.1:6390"):
        with pytest.raises(KnnlmError, match=rf"^--ray_address {address}: nothing answers there \(Connection refused\); "
                                             r"start a cluster with `ray start --head`, or pass the address it prints$"):
            _require_listening(address, "start a cluster with `ray start --head`")
    assert tried == [(("127.0.0.1", 6390), CONNECT_TIMEOUT_S)] * 2
    monkeypatch.undo()
    with socket.socket() as s:  # a listening port passes
        s.bind(("127.0.0.1", 0))
        s.listen()
        _require_listening(f"127.0.0.1:{s.getsockname()[1]}", "")


@pytest.mark.parametrize("argv, needle", [
    (["index", "serve", "DS", "--name", "a b"], "--name: 'a b' is not a group name"),
    (["index", "serve", "DS", "--name", "a/b"], "--name: 'a/b' is not a group name"),
    (["index", "stop", ""], "name: '' is not a group name"),
    (["index", "stop", "a b", "--ray_address", "127.0.0.1:9"], "name: 'a b' is not a group name"),
    (["eval", "--model_name_or_path", "M", "--validation_file", "V", "--datastore", "DS", "--output_dir", "O",
      "--search_backend", "ray", "--ray_address", "auto", "--ray_index", "a;b"], "--ray_index: 'a;b' is not a group"),
])
def test_a_group_name_a_shell_would_split_is_refused_before_ray_starts(argv, needle, capsys):
    """Before: `index serve --name "a b"` served it and printed `--ray_index a b` / `knnlm index stop a b` unquoted,
    which break when pasted; `index stop ""` went to the cluster first."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"knnlm: error: {needle}") and err.count("\n") == 1, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pair_distances_equal_the_batch_layout(dtype):
    """What a shard actor computes for its (query, row) pairs is what exact_sq_dists gives for [B, k] ids."""
    from knnlm.distances import exact_sq_dists, exact_sq_dists_pairs

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(300, 24, generator=g).to(dtype)  # float32 in RAM, or float16 as a memory map would be
    queries = torch.randn(5, 24, generator=g)
    ids = torch.randint(0, 300, (5, 40), generator=g)
    qrows = torch.arange(5).repeat_interleave(40)
    got = exact_sq_dists_pairs(keys, queries, qrows, ids.reshape(-1))
    assert torch.equal(got, exact_sq_dists(keys, queries, ids).reshape(-1))
    ref = ((keys.double()[ids] - queries.double()[:, None]) ** 2).sum(-1).reshape(-1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_stateful_runs_need_the_keys_on_every_node(stores, monkeypatch):
    """RetoMaton and the random-skip kNN-LM always compute exact distances (pointers, searched rows): a shard node
    without the keys was accepted at start unless --recompute_dists was set, and the run failed at its first step."""
    import knnlm.ray_search as rs

    seen, real = [], rs.check_shards
    monkeypatch.setattr(rs, "check_shards", lambda descs, expected, flag, need_keys:
                        (seen.append(need_keys), real(descs, expected, flag, need_keys))[1])
    for kw in ({}, {"retomaton": True}, {"skip_search_prob": 0.5}, {"recompute_dists": True}):
        make_backend(stores["flat"], _args(**kw)).close()
    assert seen == [False, True, True, True]
