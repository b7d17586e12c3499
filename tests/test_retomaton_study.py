"""`knnlm analyze retomaton` (knnlm.experiments.retomaton): its kNN-LM row equals `knnlm eval --recompute_dists true`,
a RetoMaton row `knnlm eval --retomaton true --min_knns M`, a random-skip row `--skip_search_prob P`; the per-token
log-probabilities give the rows' perplexities and the claim's interval; a rerun reuses finished settings; the figure
holds the series; refusals are one line."""
import json
import math

import numpy as np
import pytest

from knnlm.claims import check_record, judge
from knnlm.cli import main
from knnlm.clusters import ClusterArgs, build_clusters
from knnlm.corpus import CorpusArgs
from knnlm.datastore import Datastore, build_datastore
from knnlm.experiments.retomaton import report, run as study_run
from knnlm.models import ModelArgs, load_model

SENTENCES = ["the cat sat on the mat.", "the dog sat on the log.", "a cat and a dog sat together on a mat.",
             "the bird sang on the tree and the cat sat below.", "a dog and a bird sat on the log together."]
K, TEMP = 16, 2.0


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_gpt2_dir):
    d = tmp_path_factory.mktemp("retomaton_study")
    _jsonl(d / "train.jsonl", [" ".join(SENTENCES[i:] + SENTENCES[:i]) * 2 for i in range(len(SENTENCES))])
    _jsonl(d / "valid.jsonl", [" ".join(SENTENCES[1:4]), " ".join(SENTENCES[::-1]), SENTENCES[0] * 3])
    lm = load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cpu"))
    ds = build_datastore(lm, CorpusArgs(train_file=str(d / "train.jsonl"), concat_documents=False, block_size=32,
                                        stride=16), d / "ds", batch_size=4)
    build_clusters(ds, ClusterArgs(num_clusters=24, sample_size=200, seed=3))
    return d


def _common(tiny_gpt2_dir, files):
    return ["--model_name_or_path", str(tiny_gpt2_dir), "--validation_file", str(files / "valid.jsonl"),
            "--concat_documents", "false", "--block_size", "16", "--stride", "8", "--datastore", str(files / "ds"),
            "--k", str(K), "--knn_temp", str(TEMP), "--lmbda", "0.25", "--batch_size", "3"]


def _study(tiny_gpt2_dir, files, out, *extra):
    argv = ["analyze", "retomaton", *_common(tiny_gpt2_dir, files), "--min_knns", "1,4", "--skip_probs", "0.5",
            "--clusters", "true", "--output_dir", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())["metrics"]


def _eval_ppl(tiny_gpt2_dir, files, out, *extra) -> float:
    assert main(["eval", *_common(tiny_gpt2_dir, files), "--recompute_dists", "true", "--output_dir", str(out),
                 *extra]) == 0
    return json.loads((out / "results.json").read_text())["metrics"]["ppl_knnlm"]


def test_rows_equal_knnlm_eval_and_rerun_reuses(tiny_gpt2_dir, files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    m = _study(tiny_gpt2_dir, files, out)
    runs = {(r["series"], r["setting"]): r["metrics"] for r in m["runs"]}
    assert list(runs) == [("kNN-LM (a search per token)", "–"), ("RetoMaton", "min_knns 1"),
                          ("RetoMaton", "min_knns 4"), ("RetoMaton, clusters", "min_knns 1"),
                          ("RetoMaton, clusters", "min_knns 4"), ("kNN-LM, random skips", "skip 0.5")]
    knn = runs[("kNN-LM (a search per token)", "–")]
    assert knn["ppl_knnlm"] == pytest.approx(_eval_ppl(tiny_gpt2_dir, files, tmp_path / "e0"), rel=1e-9, abs=0)
    assert knn["foss"] == 0.0
    assert runs[("RetoMaton", "min_knns 4")]["ppl_knnlm"] == pytest.approx(
        _eval_ppl(tiny_gpt2_dir, files, tmp_path / "e1", "--retomaton", "true", "--min_knns", "4"), rel=1e-9, abs=0)
    assert runs[("RetoMaton, clusters", "min_knns 1")]["ppl_knnlm"] == pytest.approx(
        _eval_ppl(tiny_gpt2_dir, files, tmp_path / "e2", "--retomaton", "true", "--min_knns", "1",
                  "--no_clusters", "false"), rel=1e-9, abs=0)
    assert runs[("kNN-LM, random skips", "skip 0.5")]["ppl_knnlm"] == pytest.approx(
        _eval_ppl(tiny_gpt2_dir, files, tmp_path / "e3", "--skip_search_prob", "0.5"), rel=1e-9, abs=0)
    md = (out / "results.md").read_text()
    assert 0 < runs[("RetoMaton", "min_knns 1")]["foss"] < 1  # the tiny store does save searches
    # the per-token log-probabilities (text order) give each row's perplexity; the claim's interval is of their ratio
    # and the search flags each row's fraction of saved searches (the automaton's own count)
    for r in m["runs"]:
        stem = study_run.setting_stem(r["overrides"])
        logp = np.load(out / "settings" / f"{stem}.npy")
        assert len(logp) == knn["n_tokens"] and math.exp(-logp.mean()) == pytest.approx(r["metrics"]["ppl_knnlm"],
                                                                                         rel=1e-9)
        searched = np.load(out / "settings" / f"{stem}-searched.npy")
        assert searched.dtype == bool and 1 - searched.mean() == pytest.approx(r["metrics"]["foss"], abs=1e-12)
    c = m["claim"]
    rt = runs[("RetoMaton", "min_knns 1")]
    assert c["min_knns"] == 1 and c["foss"] == rt["foss"]
    ci, saved = c["ppl_ratio_minus_1"], c["saved"]
    assert ci["point"] == pytest.approx(rt["ppl_knnlm"] / knn["ppl_knnlm"] - 1, rel=1e-9) and ci["lo"] <= ci["point"] <= ci["hi"]
    assert saved["point"] == pytest.approx(rt["foss"], abs=1e-12) and saved["lo"] <= saved["point"] <= saved["hi"]
    claims = report.report_part(m, {"label": "tiny"}, out)[1]
    assert [(x.claim, x.threshold, x.direction) for x in claims] == [
        (report.CLAIM_SAVED, 0.5, "above"), (report.CLAIM_PPL, 0.01, "below")]
    for claim, interval in zip(claims, (saved, ci)):
        check_record(claim.record())
        assert claim.interval.as_dict() == interval
        assert claim.verdict == "not judged" and claim.reason.startswith(f"{-(-knn['n_tokens'] // 256)} block(s)")  # tiny
        assert claim.claim in md
    assert judge(claims[1].interval, 0.01, "below") == (
        "holds" if ci["hi"] < 0.01 else "does not hold" if ci["lo"] > 0.01 else "inconclusive")
    assert json.loads((out / "results.json").read_text())["claims"] == [c.record() for c in report.claim(m, "this run")]
    # results.md: a row per setting; the figure is a PNG
    assert md.count("| RetoMaton |") == 2 and md.count("| RetoMaton, clusters |") == 2
    assert (out / "retomaton.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("eval-*"))  # evaluate's scratch folders are removed
    # a rerun after a kill (the last setting's record gone) evaluates only that setting
    (out / "settings" / "skip_search_prob=0.5.json").unlink()
    (out / "eval-killed").mkdir()  # the killed setting's scratch folder
    calls = []
    real = study_run.evaluate
    monkeypatch.setattr(study_run, "evaluate", lambda *a, **kw: calls.append(kw["knn"]) or real(*a, **kw))
    again = _study(tiny_gpt2_dir, files, out)
    assert [k.skip_search_prob for k in calls] == [0.5]
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in m["runs"]]
    assert not (out / "eval-killed").exists()
    # another --min_knns adds settings (the ones already evaluated are reused); another --k would change every
    # setting's numbers, so it is refused before any work and the results stay as they were
    calls.clear()
    grown = _study(tiny_gpt2_dir, files, out, "--min_knns", "1,2,4")
    assert [(k.min_knns, k.no_clusters) for k in calls] == [(2, True), (2, False)]
    assert [r["setting"] for r in grown["runs"]].count("min_knns 2") == 2
    results = (out / "results.json").read_bytes()
    calls.clear()
    argv = ["analyze", "retomaton", *_common(tiny_gpt2_dir, files), "--min_knns", "1,2,4", "--skip_probs", "0.5",
            "--clusters", "true", "--k", "8", "--output_dir", str(out)]
    assert main(argv) == 2 and not calls
    assert f"holds a run with other settings (k: {K} -> 8)" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == results


def test_figure_series(tiny_gpt2_dir, files, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(report, "line_plot", lambda path, series, **kw: drawn.update(series=series, **kw))
    m = _study(tiny_gpt2_dir, files, tmp_path / "study")
    assert [s["label"] for s in drawn["series"]] == ["RetoMaton", "RetoMaton, clusters", "kNN-LM, random skips"]
    for s in drawn["series"]:  # each from the kNN-LM's point (0 saved) on, sorted by the fraction saved
        assert s["x"][0] == 0.0 and s["y"][0] == m["ppl_knnlm"] and s["x"] == sorted(s["x"]) and len(s["x"]) >= 2
    assert [h["y"] for h in drawn["hlines"]] == [m["ppl_knnlm"], m["ppl_lm"]]


@pytest.mark.parametrize("flags,start", [
    (["--min_knns", "1,0"], "--min_knns:"),
    (["--min_knns", "1,x"], "--min_knns:"),
    (["--skip_probs", "1.5"], "--skip_probs:"),
    (["--lmbda", "0.25,0.5"], "--lmbda:"),
    (["--retomaton", "true"], "--retomaton:"),
    (["--min_knns", "1,4", "--max_knns", "2"], "--min_knns: 4 exceeds --max_knns 2"),  # as eval refuses the setting
])
def test_refusals(tiny_gpt2_dir, files, tmp_path, capsys, flags, start):
    argv = ["analyze", "retomaton", *_common(tiny_gpt2_dir, files), "--output_dir", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"knnlm: error: {start}") and "\n" not in err


def test_clusters_refused_without_clusters(tiny_gpt2_dir, files, tmp_path, capsys):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(files / "ds", copy, ignore=shutil.ignore_patterns("clusters.*"))
    argv = ["analyze", "retomaton", *_common(tiny_gpt2_dir, files), "--datastore", str(copy), "--clusters", "true",
            "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("knnlm: error: --clusters:") and "knnlm datastore cluster" in err and "\n" not in err
    assert not (tmp_path / "o" / "settings").exists()


def test_token_log_probs_pair_the_same_targets(tiny_gpt2_dir, files, tmp_path):
    """evaluate(token_log_probs=): every target once, whatever the scoring order (RetoMaton's streams reorder the
    windows); the log-probabilities average to the run's perplexity; the search flags sit on their targets' rows (the
    random skips draw from the row: searched where skip_draws(row) >= p; the kNN-LM searches every target)."""
    from knnlm.evaluate import EvalArgs, evaluate
    from knnlm.knn import KNNArgs
    from knnlm.retomaton import skip_draws

    lm = load_model(ModelArgs(model_name_or_path=str(tiny_gpt2_dir), device="cpu"))
    corpus = CorpusArgs(validation_file=str(files / "valid.jsonl"), concat_documents=False, block_size=16, stride=8)
    ds = Datastore.open(files / "ds")
    got = {}
    for name, extra in {"knn": {}, "retomaton": {"retomaton": True}, "skip": {"skip_search_prob": 0.5}}.items():
        per = {}
        m = evaluate(lm, corpus, tmp_path / name, EvalArgs(output_dir=str(tmp_path / name), batch_size=3), datastore=ds,
                     knn=KNNArgs(k=K, knn_temp=TEMP, lmbda=[0.25], recompute_dists=True, **extra), token_log_probs=per)
        assert len(per["row"]) == len(set(per["row"].tolist())) == m["n_tokens"]
        assert math.exp(-per["log_prob"].mean()) == pytest.approx(m["ppl_knnlm"], rel=1e-9)
        assert 1 - per["searched"].mean() == pytest.approx(m["foss"], abs=1e-12)
        got[name] = per
    assert got["knn"]["searched"].all() and 0 < got["retomaton"]["searched"].mean() < 1
    assert got["skip"]["searched"].tolist() == (skip_draws(got["skip"]["row"]) >= 0.5).tolist()
    assert sorted(got["knn"]["row"].tolist()) == sorted(got["retomaton"]["row"].tolist())
    assert got["knn"]["row"].tolist() != got["retomaton"]["row"].tolist()  # the streams do score in another order


def test_a_rerun_after_the_clusters_change_evaluates_again(tiny_gpt2_dir, files, tmp_path):
    """Rebuilding the store's clusters (or index) leaves its meta.json as it was: a rerun into the same folder reused
    every setting's old numbers (the review's repro); it now evaluates them again and matches a fresh folder."""
    import shutil

    shutil.copytree(files / "ds", tmp_path / "ds")

    def study(out):
        argv = ["analyze", "retomaton", *_common(tiny_gpt2_dir, files), "--min_knns", "1", "--skip_probs", "",
                "--clusters", "true", "--datastore", str(tmp_path / "ds"), "--output_dir", str(out)]
        assert main(argv) == 0
        return [r["metrics"] for r in json.loads((out / "results.json").read_text())["metrics"]["runs"]]

    before = study(tmp_path / "study")
    build_clusters(Datastore.open(tmp_path / "ds"), ClusterArgs(num_clusters=3, sample_size=200, seed=3, overwrite=True))
    again, fresh = study(tmp_path / "study"), study(tmp_path / "fresh")
    assert again == fresh
    assert again[-1]["ppl_knnlm"] != before[-1]["ppl_knnlm"]  # the clusters' row moved with its clusters


def test_a_run_finished_while_this_one_loaded_its_model_is_not_overwritten(tiny_gpt2_dir, files, tmp_path, monkeypatch,
                                                                           capsys):
    """The settings were checked before the folder's lock only: a run of another k that finished in the folder while
    this one loaded its model was overwritten (the review's repro). The check is repeated under the lock."""
    import knnlm.models

    out = tmp_path / "study"
    real = knnlm.models.load_model

    def slow_load(*a, **kw):  # meanwhile another run of k 8 finishes here
        monkeypatch.setattr(knnlm.models, "load_model", real)
        assert main(["analyze", "retomaton", *_common(tiny_gpt2_dir, files), "--min_knns", "1", "--skip_probs", "",
                     "--k", "8", "--output_dir", str(out)]) == 0
        return real(*a, **kw)

    monkeypatch.setattr(knnlm.models, "load_model", slow_load)
    argv = ["analyze", "retomaton", *_common(tiny_gpt2_dir, files), "--min_knns", "1", "--skip_probs", "",
            "--output_dir", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    assert f"holds a run with other settings (k: 8 -> {K})" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["metrics"]["k"] == 8
