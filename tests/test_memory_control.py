"""The memory against more training of the LM (equal compute): the LM-only eval's per-token cache, the paired gap
log ppl(control) - log ppl(MLP-LM) with its block-bootstrap interval on hand-made arrays and its verdicts, claim 1 not
judged while the LM is still improving, the under-training note, and the recipe's wiring."""
import json
import math

import numpy as np
import pytest
import yaml

from knnlm.claims import FAILS, HOLDS, INCONCLUSIVE, NOT_JUDGED
from knnlm.cli import main
from knnlm.config import PRESETS_DIR
from knnlm.errors import KnnlmError
from knnlm.experiments.memory.check import control_gap
from knnlm.experiments.memory.report import (LM_SCHEDULE_UNFINISHED, LM_STILL_IMPROVING, control_part, report_part,
                                            under_training_note)


def _memory_cache(folder, lm_p, mlp_p):
    """An eval-with-memory cache (k = 1 neighbour, the gold token) with per-token p_lm and p_mlp."""
    n = len(lm_p)
    folder.mkdir(parents=True)
    gold = np.arange(n, dtype=np.int32) % 7
    np.zeros((n, 1), np.float32).tofile(folder / "dists.f32")
    gold.reshape(n, 1).tofile(folder / "vals.i32")
    np.log(np.asarray(lm_p, np.float32)).tofile(folder / "lm_gold.f32")
    gold.tofile(folder / "gold.i32")
    np.log(np.asarray(mlp_p, np.float32)).tofile(folder / "mlp_gold.f32")
    (folder / "k.txt").write_text("1")


def _lm_cache(folder, lm_p, gold=None):
    """An LM-only eval's cache (what `knnlm eval --save_neighbors true` writes without --datastore)."""
    n = len(lm_p)
    folder.mkdir(parents=True)
    np.log(np.asarray(lm_p, np.float32)).tofile(folder / "lm_gold.f32")
    (np.arange(n, dtype=np.int32) % 7 if gold is None else gold).tofile(folder / "gold.i32")
    (folder / "k.txt").write_text("0")


N, LAM = 1024, 0.5  # MLP-LM on LM_es: p = 0.5 * 0.1 + 0.5 * 0.3 = 0.2 on every token -> log ppl = log 5


def _setup(tmp_path, ctrl_p, lmbda=LAM):
    _memory_cache(tmp_path / "eval-es" / "neighbors", [0.1] * N, [0.3] * N)
    (tmp_path / "eval-es" / "results.json").write_text(json.dumps({"metrics": {"ppl_lm": 10.0, "lmbda": lmbda,
                                                                               "ppl_mlplm": 5.0}}))
    _lm_cache(tmp_path / "eval-ctrl" / "neighbors", ctrl_p)
    ev = {"ppl_lm": math.exp(-float(np.mean(np.log(ctrl_p))))}
    return control_part(ev, {"folder": "eval-ctrl", "label": "ctrl", "memory": "eval-es"}, tmp_path)


def test_gap_hand_computed(tmp_path):
    _setup(tmp_path, [0.1] * N)
    g = control_gap(tmp_path / "eval-ctrl" / "neighbors", tmp_path / "eval-es" / "neighbors", LAM, unit_tokens=8,
                    n_resamples=200)
    assert g["ppl_control"] == pytest.approx(10.0, rel=1e-5) and g["ppl_mlplm"] == pytest.approx(5.0, rel=1e-5)
    ci = g["gap_ci"]  # log 10 - log 5 on every token: no spread
    assert (ci["point"], ci["lo"], ci["hi"]) == pytest.approx((math.log(2),) * 3, rel=1e-5)


@pytest.mark.parametrize("ctrl_p, verdict", [
    ([0.1] * N, HOLDS),  # control ppl 10 vs MLP-LM 5: +log 2 everywhere
    ([0.4] * N, FAILS),  # control ppl 2.5: -log 2 everywhere
    ([0.1] * 512 + [0.4] * 512, INCONCLUSIVE),  # +log 2 on 2 of the 4 blocks of 256, -log 2 on 2: holds 0
])
def test_control_claim_verdicts(tmp_path, ctrl_p, verdict):
    rows, (claim,) = _setup(tmp_path, ctrl_p)
    assert claim.verdict == verdict and claim.threshold == 0 and claim.direction == "above"
    if verdict == INCONCLUSIVE:
        assert claim.interval.point == pytest.approx(0.0, abs=1e-6) and claim.interval.lo < 0 < claim.interval.hi
    (row,) = rows["memory_control"]
    assert row[0] == "ctrl" and row[1] == pytest.approx(math.exp(-np.mean(np.log(ctrl_p))))


def test_control_not_judged_without_the_memory_eval_and_refused_on_other_tokens(tmp_path):
    _lm_cache(tmp_path / "eval-ctrl" / "neighbors", [0.1] * N)
    _, (claim,) = control_part({"ppl_lm": 10.0}, {"folder": "eval-ctrl", "label": "c", "memory": "eval-es"}, tmp_path)
    assert claim.verdict == NOT_JUDGED and claim.reason == "the memory's eval (eval-es) has not run"
    _memory_cache(tmp_path / "eval-es" / "neighbors", [0.1] * N, [0.3] * N)
    _lm_cache(tmp_path / "other" / "neighbors", [0.1] * N, gold=np.full(N, 3, np.int32))
    with pytest.raises(KnnlmError, match="not those of"):
        control_gap(tmp_path / "other" / "neighbors", tmp_path / "eval-es" / "neighbors", LAM)


def test_control_claim_takes_the_memorys_plateau_gate(tmp_path):
    """An entry naming the memory's `mlp train` stage is judged only where that memory plateaued, as its share is."""
    _setup(tmp_path, [0.1] * N)
    ev, entry = {"ppl_lm": 10.0}, {"folder": "eval-ctrl", "label": "ctrl", "memory": "eval-es", "mlp": "mlp"}
    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "results.json").write_text(json.dumps({"metrics": {"training": {"last_fifth_drop": 0.03}}}))
    _, (claim,) = control_part(ev, entry, tmp_path)
    assert claim.verdict == NOT_JUDGED and "still fell 3.0% over its last fifth" in claim.reason
    (tmp_path / "mlp" / "results.json").write_text(json.dumps({"metrics": {"training": {"last_fifth_drop": 0.004}}}))
    assert control_part(ev, entry, tmp_path)[1][0].verdict == HOLDS


def test_reference_rows_carry_the_under_training_note(tmp_path):
    _memory_cache(tmp_path / "eval-es" / "neighbors", [0.1] * N, [0.3] * N)  # memory alone: ppl 1/0.3 < LM's 10
    rows, claims = control_part({"ppl_lm": 10.0, "ppl_mlplm": 5.0, "lmbda": LAM},
                                {"folder": "eval-es", "label": "LM_es"}, tmp_path)
    assert claims == []
    lm, mem, mlplm = rows["memory_control"]
    assert mem[1] == pytest.approx(1 / 0.3, rel=1e-5) and "still under-trained" in mem[3]
    assert under_training_note(60.0, 56.0) == "memory alone 60.00 >= LM 56.00"


def _plateaued_memory(root):
    """An `mlp train` stage's record whose loss plateaued (the share's other gate)."""
    (root / "mlp").mkdir()
    (root / "mlp" / "results.json").write_text(json.dumps({"metrics": {"training": {"last_fifth_drop": 0.005}}}))


def test_memory_entry_without_its_mlp_stage_is_not_judged(tmp_path):
    """A recipe entry that names no `mlp train` stage (or one with no record) leaves the memory's plateau unknown."""
    from knnlm.memory import PLATEAU_UNKNOWN

    ev = {"ppl_lm": 20.0, "ppl_knnlm": 16.0, "ppl_mlplm": 18.0}
    entry = {"folder": "eval", "label": "t", "data": "own"}
    assert report_part(ev, entry, tmp_path)[1][0].reason == PLATEAU_UNKNOWN
    assert report_part(ev, {**entry, "mlp": "mlp"}, tmp_path)[1][0].reason == PLATEAU_UNKNOWN
    _plateaued_memory(tmp_path)
    assert report_part(ev, {**entry, "mlp": "mlp"}, tmp_path)[1][0].reason == \
        "no per-token cache for an interval (eval --save_neighbors true)"


def test_share_not_judged_while_the_lm_still_improves(tmp_path):
    ev = {"ppl_lm": 20.0, "ppl_knnlm": 16.0, "ppl_mlplm": 18.0, "storage": {"datastore_over_mlp": 40.0}}
    entry = {"folder": "eval", "label": "t", "data": "own", "lm": "lm", "converged": True, "mlp": "mlp"}
    _plateaued_memory(tmp_path)
    (tmp_path / "lm").mkdir()

    def share_claim(stopped):
        (tmp_path / "lm" / "results.json").write_text(json.dumps({"metrics": {"stopped_early": stopped}}))
        return report_part(ev, entry, tmp_path)[1][0]

    assert share_claim(False).verdict == NOT_JUDGED and share_claim(False).reason == LM_STILL_IMPROVING
    assert share_claim(True).reason == "no per-token cache for an interval (eval --save_neighbors true)"
    unconverged = report_part(ev, {**entry, "converged": False}, tmp_path)[1][0]  # (not gated on the LM)
    assert (unconverged.verdict, unconverged.reason) == (NOT_JUDGED, "no per-token cache for an interval (eval "
                                                                     "--save_neighbors true)")


def test_share_not_judged_unless_the_annealed_lm_ended_its_schedule(tmp_path):
    ev = {"ppl_lm": 20.0, "ppl_knnlm": 16.0, "ppl_mlplm": 18.0}
    entry = {"folder": "eval", "label": "t", "data": "own", "lm": "lm", "converged": "annealed", "mlp": "mlp"}
    _plateaued_memory(tmp_path)
    assert report_part(ev, entry, tmp_path)[1][0].reason == LM_SCHEDULE_UNFINISHED  # no LM run recorded
    (tmp_path / "lm").mkdir()

    def reason(schedule, steps, max_steps, stopped=False):
        (tmp_path / "lm" / "results.json").write_text(json.dumps(
            {"config": {"lr_scheduler_type": schedule, "max_steps": max_steps},
             "metrics": {"steps": steps, "stopped_early": stopped}}))
        return report_part(ev, entry, tmp_path)[1][0].reason

    assert reason("linear", 5972, 5972) == "no per-token cache for an interval (eval --save_neighbors true)"
    assert reason("cosine", 100, 100) == "no per-token cache for an interval (eval --save_neighbors true)"
    assert reason("linear", 4000, 5972) == LM_SCHEDULE_UNFINISHED  # killed or cut before the end
    assert reason("constant_with_warmup", 5972, 5972) == LM_SCHEDULE_UNFINISHED  # the rate never decays
    assert reason("linear", 3000, 5972, stopped=True) == LM_SCHEDULE_UNFINISHED
    assert reason("linear", 5972, None) == LM_SCHEDULE_UNFINISHED  # by --epochs: no training.json, no rate known
    # by --epochs: its training.json's last logged rate (a linear run of 2 epochs, 34 steps, ended at 0.0: it was
    # "not ended" before, judged by a step cap it never had)
    for lr, want in ((0.0, "no per-token cache for an interval (eval --save_neighbors true)"),
                     (2.9e-5, LM_SCHEDULE_UNFINISHED)):
        (tmp_path / "lm" / "training.json").write_text(json.dumps({"history": [{"step": 0, "lr": 1e-3},
                                                                               {"step": 34, "lr": lr}]}))
        assert reason("linear", 34, None) == want
    assert reason("constant_with_warmup", 34, None) == LM_SCHEDULE_UNFINISHED


def test_lm_only_eval_saves_per_token_log_probs(tiny_gpt2_dir, tmp_path, capsys):
    (tmp_path / "valid.txt").write_text("the cat sat on the mat . " * 20)
    out = tmp_path / "ev"
    assert main(["eval", "--model_name_or_path", str(tiny_gpt2_dir), "--validation_file", str(tmp_path / "valid.txt"),
                 "--max_tokens", "100", "--save_neighbors", "true", "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    lm = np.fromfile(out / "neighbors" / "lm_gold.f32", np.float32)
    assert lm.shape == (metrics["n_tokens"],) == np.fromfile(out / "neighbors" / "gold.i32", np.int32).shape
    assert math.exp(-lm.astype(np.float64).mean()) == pytest.approx(metrics["ppl_lm"], rel=1e-5)
    assert sorted(p.name for p in (out / "neighbors").iterdir()) == ["gold.i32", "k.txt", "lm_gold.f32", "settings.json"]
    # per token: gold.i32 holds the scored targets of the eval's windows in text order, and lm_gold.f32 their
    # log-probabilities under the model, recomputed through plain transformers from out/tokens.i32
    from transformers import AutoModelForCausalLM

    from conftest import window_gold_log_probs
    from knnlm.corpus import TokenFile

    tokens = TokenFile(out / "tokens.i32", out / "tokens.i32.docs")
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    want_gold, want_lp = window_gold_log_probs(hf, tokens, metrics["block_size"], metrics["stride"])
    assert len(want_gold) == metrics["n_tokens"] > 50
    assert np.fromfile(out / "neighbors" / "gold.i32", np.int32).tolist() == want_gold.tolist()
    np.testing.assert_allclose(lm, want_lp.numpy(), rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main(["eval", "--from_neighbors", str(out / "neighbors"), "--output_dir", str(tmp_path / "sweep")]) == 2
    assert "is the cache of an eval without --datastore" in capsys.readouterr().err


def test_recipe_wires_the_controls_to_lm_es():
    recipe = yaml.safe_load((PRESETS_DIR / "reproduce-cpu.yaml").read_text())
    stages = {s["name"]: s["argv"] for s in recipe["stages"]}
    flag = lambda argv, f: argv[argv.index(f) + 1]  # noqa: E731
    for name in ("datastore-es", "datastore-es-heldout", "mlp-es", "eval-es"):  # the *-full stages on lm-es
        full = stages[name.replace("-es", "-full")]
        assert [a.replace("-full", "-es") for a in map(str, full)] == stages[name]
    for ctrl in ("lm-ctrl", "lm-ctrl-head"):
        assert flag(stages[ctrl], "--init_from") == "{out}/lm-es"
    for ev, lm in (("eval-ctrl", "lm-ctrl"), ("eval-ctrl-head", "lm-ctrl-head")):
        assert flag(stages[ev], "--model_name_or_path") == f"{{out}}/{lm}" and "--datastore" not in stages[ev]
        for f in ("--validation_file", "--max_tokens", "--save_neighbors"):
            assert flag(stages[ev], f) == flag(stages["eval-es"], f)
    es = yaml.safe_load((PRESETS_DIR / "lm-wikitext2-es-cpu.yaml").read_text())
    full = yaml.safe_load((PRESETS_DIR / "lm-wikitext2-full-cpu.yaml").read_text())
    assert {k: v for k, v in es.items() if k not in full} == {"early_stopping_patience": 2,
                                                              "early_stopping_min_delta": 0.005}
    assert {k for k in es if es[k] != full.get(k)} == {"max_steps", "early_stopping_patience",
                                                       "early_stopping_min_delta"}
    assert es["max_steps"] == 10 * full["max_steps"] and es["eval_every"] == 500 and es["eval_tokens"] == 10000
    ctrl = yaml.safe_load((PRESETS_DIR / "lm-wikitext2-ctrl-cpu.yaml").read_text())
    head = yaml.safe_load((PRESETS_DIR / "lm-wikitext2-ctrl-head-cpu.yaml").read_text())
    assert ctrl["max_steps"] == 4 * full["max_steps"] and head["train_only"] == "lm_head"
    # the head's steps: the memory's FLOPs (6 x 2,099,968 params x 3,058,088 pairs x 8 epochs) over 6 x V d x 2,048
    memory_flops = 6 * (256 * 2048 + 2048 + 2048 * 256 + 256 + 2 * 256 + 4096 * 256) * 3_058_088 * 8
    assert head["max_steps"] == round(memory_flops / (6 * 4096 * 256 * 16 * 128))
    rows = {(m["study"], m["folder"]): m for m in recipe["report"]["studies"]}
    assert rows[("memory", "eval-es")]["converged"] is True and rows[("memory", "eval-es")]["lm"] == "lm-es"
    assert rows[("memory_control", "eval-ctrl")]["memory"] == rows[("memory_control", "eval-ctrl-head")]["memory"] \
        == "eval-es"


def test_share_interval_uses_the_evals_knn_temp(tmp_path, monkeypatch):
    """The share's interval recomputes p_knn from the cache at the eval's own --knn_temp (as its Table 2 perplexity)."""
    from knnlm.experiments.memory import report as R

    (tmp_path / "eval" / "neighbors").mkdir(parents=True)
    (tmp_path / "eval" / "neighbors" / "mlp_gold.f32").write_bytes(b"")
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"config": {"knn_temp": 2.5}, "metrics": {}}))
    seen = {}

    def fake_gain_share(cache, lmbdas, temp=1.0):
        seen["temp"] = temp
        return {"lmbda": {str(lmbdas[0]): {"share_ci": {"point": 0.5, "lo": 0.4, "hi": 0.6}}}}

    monkeypatch.setattr(R, "gain_share", fake_gain_share)
    assert R._share_ci(tmp_path, {"folder": "eval"}, {"lmbda": 0.25}) == {"point": 0.5, "lo": 0.4, "hi": 0.6}
    assert seen["temp"] == 2.5
