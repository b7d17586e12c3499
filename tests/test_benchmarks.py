"""benchmarks/*.py: every script's --help, and a tiny run of each on the CPU whose printed numbers are checked: counts,
perplexities that two paths must agree on, ratios that must be finite and positive. Never a timing: at this size the
timings mean nothing, and a timed test fails on a busy machine. (gpu_search.py's eval mode: tests/test_gpu_search.py.)
The fast scripts run in this process (runpy, their ``__main__``); those that start worker processes or Ray, slow, run
as subprocesses."""
import importlib.util
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    return env


def _run(script: str, *args, timeout: int = 600, rc: int = 0) -> str:
    """``python benchmarks/<script> args`` in a fresh process; -> its stdout (asserting its exit status)."""
    res = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                         env=_env(), timeout=timeout, cwd=REPO)
    assert res.returncode == rc, f"{script} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res.stdout + ("" if rc == 0 else res.stderr)


def _in_process(script: str, args, monkeypatch, capsys) -> str:
    """The script's ``__main__`` run here, as ``python benchmarks/<script> args`` would; -> what it printed."""
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *map(str, args)])
    capsys.readouterr()
    runpy.run_path(str(BENCH / script), run_name="__main__")
    return capsys.readouterr().out


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return float(m.group(1))


def _finite_positive(*xs: float) -> None:
    for x in xs:
        assert math.isfinite(x) and x > 0, xs


@pytest.fixture(scope="module")
def store(tiny_lm, wikitext_dir, tmp_path_factory):
    """The tiny GPT-2's store over the first 12k tokens of WikiText-2 train (d 64) with an IVF16,PQ8 index (one
    shard) and 80 clusters (RetoMaton with clusters)."""
    from knnlm.clusters import ClusterArgs, build_clusters
    from knnlm.corpus import CorpusArgs
    from knnlm.datastore import build_datastore
    from knnlm.index import IndexArgs, build_index

    corpus = CorpusArgs(train_file=str(wikitext_dir / "train.txt"), max_tokens=12_000, block_size=128, stride=128)
    ds = build_datastore(tiny_lm, corpus, tmp_path_factory.mktemp("bench") / "ds", batch_size=16)
    build_index(ds, IndexArgs(factory="IVF16,PQ8", recall_queries=100))
    build_clusters(ds, ClusterArgs(num_clusters=80, niter=5))
    return ds


@pytest.fixture(scope="module")
def sharded_store(store, tmp_path_factory):
    """The same keys with an IVF16,PQ8 index of 2 shards (the Ray benchmarks search shards on actors)."""
    from knnlm.datastore import Datastore
    from knnlm.index import IndexArgs, build_index

    out = tmp_path_factory.mktemp("bench2") / "ds"
    shutil.copytree(store.dir, out, ignore=shutil.ignore_patterns("index", "clusters*"))
    ds = Datastore.open(out)
    build_index(ds, IndexArgs(factory="IVF16,PQ8", recall_queries=100, shards=2))
    return ds


# ------------------------------------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    """Each script's imports resolve and its flags parse (ray_fault_run.py imports ray and knnlm.cli at the top)."""
    if script == "ray_fault_run.py" and not HAS_RAY:
        pytest.skip("ray is not installed")
    assert _run(script, "--help", timeout=180).startswith("usage:")


def test_every_script_is_covered():
    """A new script gets a tiny run here too (this list, beside its test)."""
    assert SCRIPTS == ["datastore_build.py", "faiss_search.py", "generate_speed.py", "gpu_search.py", "knn_eval.py",
                       "mlp_memory.py", "ray_fault_run.py", "ray_search.py", "retomaton.py"]


# ----------------------------------------------------------------------------------------------- fast, in-process
def test_faiss_search(store, monkeypatch, capsys):
    out = _in_process("faiss_search.py", ["--datastore", store.dir, "--queries", 200, "--nprobe", 4, "--k", "1,64",
                                          "--reps", 1, "--precomputed_table", "both"], monkeypatch, capsys)
    assert f"ntotal {store.N}," in out and "nprobe 4, 200 queries" in out
    rows = re.findall(r"use_precomputed_table ([+-]1), k +(\d+): +([\d.]+) µs/query .*codes scanned/query (\d+);"
                      r".*heap updates/query (\d+)", out)
    assert [(r[0], r[1]) for r in rows] == [("+1", "1"), ("+1", "64"), ("-1", "1"), ("-1", "64")], out
    _finite_positive(*(float(r[2]) for r in rows))
    # the same 4 lists probed, whatever k or the table: the same codes scanned
    assert len({r[3] for r in rows}) == 1 and int(rows[0][3]) > 0
    assert int(rows[1][4]) >= 64  # k 64 results collected per query
    # the table changes how the PQ distances are summed, not what they are
    assert _number(r"largest distance difference, table off vs on, k 64: (\S+)", out) < 1e-2


def test_generate_speed(tiny_gpt2_dir, store, monkeypatch, capsys):
    """Runs the script's own check that the augmented model searches once per new token (an assert)."""
    out = _in_process("generate_speed.py", ["--model_name_or_path", tiny_gpt2_dir, "--datastore", store.dir,
                                            "--new_tokens", 6, "--reps", 1, "--k", 16], monkeypatch, capsys)
    assert f"datastore N={store.N}, d=64, k=16" in out and "6 new tokens" in out
    assert "index: IndexIVFPQ over" in out
    _finite_positive(_number(r"lm +tokens/s: median (\S+)", out), _number(r"knnlm +tokens/s: median (\S+)", out),
                     _number(r"ratio kNN-LM / LM generation speed: (\S+)", out))
    assert re.search(r"^LM    : '.+'$", out, re.M) and re.search(r"^kNN-LM: '.+'$", out, re.M)


def test_gpu_search_recall_on_the_cpu():
    """The recall mode as a command (tests/test_gpu_search.py runs both modes' main() in-process)."""
    out = _run("gpu_search.py", "recall", "--random", "3000,16", "--queries", 20, "--k", 32, "--margins", "0,64",
               "--device", "cpu", timeout=180)
    rec = {r["dtype"]: r for r in map(json.loads, out.strip().splitlines()) if "dtype" in r}
    assert set(rec) == {"float16", "bfloat16"}
    assert rec["float16"]["64"] == {"mean": 1.0, "min": 1.0} and rec["bfloat16"]["64"]["mean"] == 1.0
    assert 0.5 < rec["bfloat16"]["0"]["mean"] <= 1.0


def test_mlp_memory(tiny_gpt2_dir, store, wikitext_dir, tmp_path, monkeypatch, capsys):
    out = _in_process("mlp_memory.py", [
        "--model_name_or_path", tiny_gpt2_dir, "--datastore", store.dir, "--output_dir", tmp_path / "mlp",
        "--validation_file", wikitext_dir / "valid.txt", "--max_tokens", 300, "--device", "cpu", "--hidden_size", 64,
        "--batch_tokens", 256, "--micro_batch_tokens", 128, "--max_steps", 3, "--k", 32, "--lmbda", "0.25,0.5"],
        monkeypatch, capsys)
    summary = json.loads(out.strip().splitlines()[-1])
    _finite_positive(summary["pairs_per_s"], summary["storage_ratio"])
    assert math.isfinite(summary["gain_recovered"])
    res = json.loads((tmp_path / "mlp" / "benchmark.json").read_text())
    assert res["training"]["steps"] == 3 and res["training"]["pairs"] == 3 * 256
    assert res["datastore"]["N"] == store.N and res["eval"]["n_tokens"] == 299
    ev = res["eval"]
    assert set(ev["sweep_knn"]) == set(ev["sweep_mlp"]) and len(ev["sweep_knn"]) == 2
    _finite_positive(ev["ppl_lm"], ev["ppl_knnlm"], ev["ppl_mlplm"], *ev["sweep_knn"].values(),
                     *ev["sweep_mlp"].values())
    assert ev["ppl_knnlm"] != ev["ppl_lm"]  # the datastore was searched
    assert res["gain_recovered"] == pytest.approx((ev["ppl_lm"] - ev["ppl_mlplm"]) / (ev["ppl_lm"] - ev["ppl_knnlm"]))


# ------------------------------------------------------------------------------ slow: worker processes, Ray
@pytest.mark.slow  # ~20 s: two builds and a model load, each a fresh process
def test_datastore_build(tiny_gpt2_dir, wikitext_dir):
    out = _run("datastore_build.py", "--model_name_or_path", tiny_gpt2_dir, "--train_file", wikitext_dir / "train.txt",
               "--tokens", 1000, "--batch_size", 4, "--block_size", 128)
    assert "build 1000 tokens:" in out and "build 4000 tokens:" in out
    _finite_positive(*(_number(rf"ratio {what}: (\S+)", out) for what in (
        r"build / bare forward \(body only\)", r"build / bare forward \(with head, for reference\)",
        r"build time 4x / 1x", r"peak RSS 4x / 1x")))


@pytest.mark.slow  # ~35 s: six fresh processes
def test_knn_eval_against_itself_as_baseline(tiny_gpt2_dir, store, wikitext_dir):
    """--baseline_src the same sources: 'before' and 'after' score the same windows to the same perplexities."""
    out = _run("knn_eval.py", "--model_name_or_path", tiny_gpt2_dir, "--datastore", store.dir, "--validation_file",
               wikitext_dir / "valid.txt", "--max_tokens", 300, "--k", 32, "--nprobe", 4, "--reps", 1,
               "--variants", "bare,lm,knn_exact", "--baseline_src", REPO / "src")
    assert "tokens scored: 299;" in out
    for var in ("lm", "knn_exact"):
        m = re.search(rf"^ppl {var}: after (\S+), before (\S+) \(relative difference (\S+);", out, re.M)
        assert m and m.group(1) == m.group(2) and float(m.group(3)) == 0.0, out
        _finite_positive(float(m.group(1)))
    assert "[differs between repetitions]" not in out
    ppl = {v: _number(rf"(?m)^ppl {v}: after (\S+),", out) for v in ("lm", "knn_exact")}
    assert ppl["knn_exact"] != ppl["lm"]
    for v in ("after", "before"):
        for a, b in (("knn_exact", "lm"), ("lm", "bare")):
            _finite_positive(_number(rf"{v} {a} / {b}: wall (\S+),", out),
                             _number(rf"{v} {a} / {b}: wall \S+, CPU (\S+)", out))


@pytest.mark.slow  # ~20 s: polysemous PQ training
def test_knn_eval_index_build(tiny_gpt2_dir, store, wikitext_dir):
    out = _run("knn_eval.py", "--model_name_or_path", tiny_gpt2_dir, "--datastore", store.dir, "--validation_file",
               wikitext_dir / "valid.txt", "--skip_eval", "--index_build", "--factory", "IVF16,PQ8", "--k", 32,
               "--recall_queries", 50, "--reps", 1)
    recall = {v: _number(rf"index IVF16,PQ8 +{v}: .*recall@32 (\S+)", out) for v in ("polysemous", "plain")}
    assert 0 < recall["plain"] <= 1
    # polysemous training only renumbers each sub-quantizer's centroids: the same distances, the same neighbours
    assert recall["polysemous"] == recall["plain"]
    _finite_positive(_number(r"no polysemous / polysemous \(today's default\): (\S+)", out))


@pytest.mark.slow  # ~35 s: eight fresh processes
def test_retomaton_timing_and_bound_agree_with_the_sweep(tiny_gpt2_dir, store, wikitext_dir, tmp_path):
    """`timing` (each variant in a worker) and `sweep` (`knnlm analyze retomaton`) score the same settings to the
    same perplexities; `bound` makes (1 - saved) x tokens searches."""
    common = ["--model_name_or_path", tiny_gpt2_dir, "--datastore", store.dir, "--validation_file",
              wikitext_dir / "valid.txt", "--max_tokens", 300, "--k", 32, "--nprobe", 4, "--reps", 1]
    _run("retomaton.py", "sweep", *common, "--min_knns", "1,4", "--skip_probs", "0.5", "--clusters",
         "--output_dir", tmp_path / "sweep")
    sweep = json.loads((tmp_path / "sweep" / "results.json").read_text())["metrics"]
    assert sweep["n_tokens"] == 299
    by = {(r["series"], r["setting"]): r["metrics"] for r in sweep["runs"]}
    timing = _run("retomaton.py", "timing", *common, "--min_knns", 1, "--clusters", "--cluster_min_knns", 4)
    assert "299 tokens;" in timing
    ppl = {name: _number(rf"(?m)^ +{name}: .*ppl (\S+?),?(?: fraction|$)", timing)
           for name in ("lm", "knn_exact", "retomaton", "retomaton_clusters")}
    assert f"{ppl['lm']:.4f}" == f"{sweep['ppl_lm']:.4f}"
    assert f"{ppl['knn_exact']:.4f}" == f"{by[('kNN-LM (a search per token)', '–')]['ppl_knnlm']:.4f}"
    assert f"{ppl['retomaton']:.4f}" == f"{by[('RetoMaton', 'min_knns 1')]['ppl_knnlm']:.4f}"
    assert f"{ppl['retomaton_clusters']:.4f}" == f"{by[('RetoMaton, clusters', 'min_knns 4')]['ppl_knnlm']:.4f}"
    assert _number(r"knn_exact: .*fraction saved (\S+)", timing) == 0.0
    assert _number(r"retomaton: .*fraction saved (\S+)", timing) > 0
    for name in ("knn_exact", "retomaton", "retomaton_clusters"):
        _finite_positive(_number(rf"{name} / lm: wall (\S+),", timing),
                         _number(rf"{name} / lm: wall \S+, CPU (\S+)", timing))

    bound = _run("retomaton.py", "bound", *common, "--saved", 0.5)
    assert "299 tokens;" in bound and "  150 searches (0.500 of the tokens; k 32, nprobe 4, 4 queries a call)" in bound
    assert _number(r"floor of RetoMaton's CPU / LM-only at 0.500 saved: (\S+)", bound) >= 1


@pytest.mark.slow  # ~10-15 s: starts a local Ray
@needs_ray
def test_ray_search(sharded_store):
    """The script itself asserts that the actors' ids and distances are the in-process IndexShards' ones."""
    out = _run("ray_search.py", "--datastore", sharded_store.dir, "--batch_sizes", "16,64", "--queries", 128, "--k", 32,
               "--nprobe", 4, "--reps", 1, "--distances", 16)
    assert f"N {sharded_store.N}, d 64, 2 shards, k 32, nprobe 4, 128 queries" in out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| \d+ \| \d+ \| ([\d.]+) \|", out, re.M)
    assert [r[0] for r in rows] == ["16", "64"], out
    _finite_positive(*(float(x) for r in rows for x in r[1:]))
    assert re.search(r"^\| 16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.M)  # the exact-distance table
    assert "smallest batch with Ray overhead < 10% of the shards' FAISS time:" in out


@pytest.mark.slow  # ~25 s: four evaluations, a served group, a killed actor
@needs_ray
def test_ray_fault_run(tiny_gpt2_dir, sharded_store, wikitext_dir, tmp_path):
    """faiss, Ray, the served group with shard 0 killed after its 5th search, and the group again: one perplexity."""
    out = _run("ray_fault_run.py", "--datastore", sharded_store.dir, "--model", tiny_gpt2_dir, "--validation_file",
               wikitext_dir / "valid.txt", "--out", tmp_path / "fault", "--max_tokens", 4000)
    res, _ = json.JSONDecoder().raw_decode(out[out.index('{\n "ppl_tokens_wall"'):])
    runs = res["ppl_tokens_wall"]
    assert list(runs) == ["faiss", "ray_own", "ray_served_killed", "ray_served_2"]
    assert len({ppl for ppl, _, _ in runs.values()}) == 1 and all(n == 3999 for _, n, _ in runs.values())
    _finite_positive(runs["faiss"][0])
    kill = res["kill"]
    assert kill["after_searches"] >= 5 and kill["restarted"] and kill["new_pid"] != kill["pid"]


@pytest.mark.slow  # ~15 s
@needs_ray
def test_ray_fault_run_too_few_searches_ends(tiny_gpt2_dir, sharded_store, wikitext_dir, tmp_path):
    """600 tokens are 3 searches: no kill comes; the script says so and ends (it used to wait for the kill forever)."""
    out = _run("ray_fault_run.py", "--datastore", sharded_store.dir, "--model", tiny_gpt2_dir, "--validation_file",
               wikitext_dir / "valid.txt", "--out", tmp_path / "fault", "--max_tokens", 600, timeout=300, rc=1)
    assert "no kill; raise --max_tokens (now 600)" in out
