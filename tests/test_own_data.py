"""The own-data MLP-memory stage (issue 18): the datastore holds exactly the LM's training tokens (hashes match), the
share of kNN's gain and its bootstrap interval on a hand-built cache, and the recipe wires the stages together."""
import math

import numpy as np
import pytest
import yaml

from knnlm.cli import main
from knnlm.config import PRESETS_DIR
from knnlm.experiments.memory.check import gain_share, own_data_check

TEXT = ("the river rose in the spring and the village moved its mills to the hill . " * 40
        + "a cat sat on the mat and a dog sat on the log . " * 40)


def test_datastore_over_the_lm_training_tokens_matches_by_hash(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "valid.txt").write_text(TEXT[:400])
    lm = tmp_path / "lm"
    assert main(["lm", "train", "--train_file", str(tmp_path / "train.txt"), "--validation_file",
                 str(tmp_path / "valid.txt"), "--size", "tiny", "--tokenizer", "gpt2", "--block_size", "16",
                 "--max_train_tokens", "192", "--max_steps", "1", "--batch_size", "2", "--output_dir", str(lm)]) == 0
    for name, max_tokens in (("ds", "192"), ("ds-more", "208")):
        assert main(["datastore", "build", "--model_name_or_path", str(lm), "--train_file", str(tmp_path / "train.txt"),
                     "--max_tokens", max_tokens, "--output_dir", str(tmp_path / name)]) == 0
    same = own_data_check(lm, tmp_path / "ds")
    assert same["match"] and same["same_model"]
    assert same["lm_train_tokens"] == same["datastore_tokens"] == same["lm_trained_tokens"] == 192
    assert same["lm_tokens_sha256"] == same["datastore_corpus_hash"]
    assert same["datastore_keys"] == 191  # every token but the first is a target
    more = own_data_check(lm, tmp_path / "ds-more")  # 16 tokens the LM never trained on
    assert not more["match"] and more["datastore_tokens"] == 208
    # the eval's per-token cache (the additive mlp_gold.f32 hook) reproduces the eval's own perplexities
    assert main(["mlp", "train", "--datastore", str(tmp_path / "ds"), "--model_name_or_path", str(lm), "--hidden_size",
                 "16", "--batch_tokens", "64", "--max_steps", "2", "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "mem")]) == 0
    ev = tmp_path / "eval"
    assert main(["eval", "--model_name_or_path", str(lm), "--validation_file", str(tmp_path / "valid.txt"), "--datastore",
                 str(tmp_path / "ds"), "--mlp_memory", str(tmp_path / "mem"), "--k", "8", "--lmbda", "0.25",
                 "--save_neighbors", "true", "--output_dir", str(ev)]) == 0
    metrics = yaml.safe_load((ev / "results.json").read_text())["metrics"]
    g = gain_share(ev / "neighbors", [0.25], n_resamples=50)["lmbda"]["0.25"]
    assert g["ppl_lm"] == pytest.approx(metrics["ppl_lm"], rel=1e-5)
    assert g["ppl_knnlm"] == pytest.approx(metrics["ppl_knnlm"], rel=1e-5)
    assert g["ppl_mlplm"] == pytest.approx(metrics["ppl_mlplm"], rel=1e-5)
    assert np.fromfile(ev / "neighbors" / "mlp_gold.f32", np.float32).shape == (metrics["n_tokens"],)


def _cache(folder, lm_p, knn_p, mlp_p):
    """A neighbour cache whose kNN gold probability is exactly knn_p per token: k = 2 neighbours at equal distance,
    the gold token in 1 or 2 of them (p_knn 0.5 or 1)."""
    n = len(lm_p)
    folder.mkdir()
    gold = np.arange(n, dtype=np.int32) % 7
    vals = np.stack([gold, np.where(np.asarray(knn_p) == 1.0, gold, gold + 1)], axis=1).astype(np.int32)
    np.zeros((n, 2), np.float32).tofile(folder / "dists.f32")
    vals.tofile(folder / "vals.i32")
    np.log(np.asarray(lm_p, np.float32)).tofile(folder / "lm_gold.f32")
    gold.tofile(folder / "gold.i32")
    np.log(np.asarray(mlp_p, np.float32)).tofile(folder / "mlp_gold.f32")
    (folder / "k.txt").write_text("2")


def test_gain_share_hand_computed(tmp_path):
    n = 64
    lm_p, knn_p, mlp_p = [0.1] * n, [0.5] * n, [0.3] * n
    _cache(tmp_path / "c", lm_p, knn_p, mlp_p)
    g = gain_share(tmp_path / "c", [0.5], unit_tokens=8, n_resamples=200)
    r = g["lmbda"]["0.5"]
    # every token alike: ppl = 1 / ((1 - λ) p_lm + λ p_x)
    ppl_lm, ppl_knn, ppl_mlp = 1 / 0.1, 1 / 0.3, 1 / 0.2
    assert (r["ppl_lm"], r["ppl_knnlm"], r["ppl_mlplm"]) == pytest.approx((ppl_lm, ppl_knn, ppl_mlp), rel=1e-5)
    assert r["share"] == pytest.approx((ppl_lm - ppl_mlp) / (ppl_lm - ppl_knn), rel=1e-5)  # 5 / (20/3) = 0.75
    assert (r["share_ci"]["lo"], r["share_ci"]["hi"]) == pytest.approx((0.75, 0.75), rel=1e-5)  # identical units: no spread
    assert g["n_units"] == 8
    # unequal blocks: the interval has width and holds the point estimate
    mixed_mlp = [0.3] * 32 + [0.1] * 32
    mixed_knn = [0.5] * 32 + [1.0] * 32
    _cache(tmp_path / "m", lm_p, mixed_knn, mixed_mlp)
    m = gain_share(tmp_path / "m", [0.25, 0.5], unit_tokens=8, n_resamples=500)
    r = m["lmbda"]["0.25"]
    nll = lambda ps: -np.mean(np.log(0.75 * 0.1 + 0.25 * np.asarray(ps)))  # noqa: E731
    share = (10 - math.exp(nll(mixed_mlp))) / (10 - math.exp(nll(mixed_knn)))
    assert r["share"] == pytest.approx(share, rel=1e-5)
    assert r["share_ci"]["lo"] < share < r["share_ci"]["hi"]
    assert m["best"]["ppl_knnlm"] == min(v["ppl_knnlm"] for v in m["lmbda"].values())
    # a position whose search found no neighbour (an IVF probe of empty lists: all distances inf) is the LM there,
    # as eval scores it (before: p_knn NaN made every perplexity and the share NaN)
    dists = np.fromfile(tmp_path / "c" / "dists.f32", np.float32).reshape(n, 2)
    dists[5] = np.inf
    dists.tofile(tmp_path / "c" / "dists.f32")
    r = gain_share(tmp_path / "c", [0.5], unit_tokens=8, n_resamples=200)["lmbda"]["0.5"]
    nll_knn = -(63 * math.log(0.3) + math.log(0.1)) / 64
    assert r["ppl_knnlm"] == pytest.approx(math.exp(nll_knn), rel=1e-5)
    assert r["share"] == pytest.approx((10 - 5) / (10 - math.exp(nll_knn)), rel=1e-5)


def test_recipe_builds_the_own_datastore_over_the_lm_training_tokens():
    recipe = yaml.safe_load((PRESETS_DIR / "reproduce-cpu.yaml").read_text())
    stages = {s["name"]: s["argv"] for s in recipe["stages"]}
    lm_cfg = yaml.safe_load((PRESETS_DIR / "lm-wikitext2-full-cpu.yaml").read_text())
    flag = lambda argv, name: argv[argv.index(name) + 1] if name in argv else None  # noqa: E731
    lm, ds, held, mlp, ev = (stages[k] for k in ("lm-full", "datastore-full", "datastore-full-heldout", "mlp-full",
                                                 "eval-full"))
    assert flag(lm, "--config") == "lm-wikitext2-full-cpu"
    assert flag(ds, "--train_file") == flag(lm, "--train_file") == "{data}/train.txt"
    assert flag(ds, "--max_tokens") is None and lm_cfg.get("max_train_tokens") is None  # the same tokens: all of the file
    assert flag(ds, "--model_name_or_path") == flag(lm, "--output_dir") == flag(mlp, "--model_name_or_path") == \
        flag(held, "--model_name_or_path")
    assert flag(held, "--train_file") == "{data}/test.txt" and flag(ev, "--validation_file") == "{data}/valid.txt"
    assert flag(mlp, "--validation_datastore") == flag(held, "--output_dir")
    assert flag(mlp, "--datastore") == flag(ds, "--output_dir") == flag(ev, "--datastore")
    assert flag(ev, "--mlp_memory") == flag(mlp, "--output_dir") and flag(ev, "--save_neighbors") == "true"
    assert lm_cfg["size"] == "small"  # 4 x 256: wider than the rank-64 regime
    rows = {m["folder"]: m for m in recipe["report"]["studies"] if m["study"] == "memory"}
    assert rows["eval-full"]["data"] == "own" and rows["eval-smollm2"]["data"] == "other"
    assert (rows["eval-full"]["lm"], rows["eval-full"]["datastore"]) == ("lm-full", "ds-full")


def test_share_not_judged_before_the_memory_plateaus(tmp_path):
    """The share of kNN's gain is judged only where the memory's `mlp train` stage (the recipe entry's `mlp:`) ended
    with its loss dropping by at most memory.PLATEAU_DROP (1%) over the last fifth of its curve."""
    import json

    from knnlm.claims import NOT_JUDGED
    from knnlm.experiments.memory.report import report_part

    ev = {"ppl_lm": 20.0, "ppl_knnlm": 16.0, "ppl_mlplm": 18.0, "storage": {"datastore_over_mlp": 40.0}}
    entry = {"folder": "eval", "label": "t", "data": "own", "mlp": "mlp"}
    (tmp_path / "mlp").mkdir()

    def share_claim(drop):
        (tmp_path / "mlp" / "results.json").write_text(json.dumps({"metrics": {"training": {"last_fifth_drop": drop}}}))
        return report_part(ev, entry, tmp_path)[1][0]

    assert share_claim(0.0142).reason == ("the memory's loss still fell 1.4% over its last fifth (> 1%: not at its "
                                          "plateau)")
    assert share_claim(0.0142).verdict == NOT_JUDGED
    # plateaued: judged on its own merits (here no per-token cache, so not judged for that reason instead)
    assert share_claim(0.0093).reason == "no per-token cache for an interval (eval --save_neighbors true)"
