"""Over-specification runner: recorded scores vs an independent computation, the per-point datastore, resume after a
kill, config errors, the outputs; the full cpu-tiny preset as a slow test."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.experiments.overspec.report import OVERSPEC_CLAIMS, fit_reason
from knnlm.experiments.overspec.run import run_study
from knnlm.experiments.overspec.settings import resolve_args

REPO = Path(__file__).resolve().parents[1]
# 12 villagers, 5 parents with 1..5 children (15 pairs), 1 training sentence per pair: 15 sentences, 4 micro-batches of
# 4 per epoch, 2 epochs = 8 steps; evaluation points 0, 4, 8.
TINY = dict(model_name_or_path="tiny", seeds="0,1", num_villagers=12, num_parents=5, max_children=5, examples_per_child=1,
            epochs=2, eval_every=4, learning_rate=1e-3, mlp_hidden_size=16, mlp_epochs=1, mlp_batch_tokens=64,
            mlp_learning_rate=1e-3, eval_batch_size=16, device="cpu")
STEPS = [0, 4, 8]
# cpu-tiny / demo-scratch, seed 0, last step (480): training-split and test vanilla averages of this code (AdamW's
# fused CPU kernel since c6ae4cb), by the vector instructions of torch's CPU kernels (results.json run.cpu_capability),
# as for the demo's goldens (tests/test_demo.py): 480 CPU training steps differ in their last bits between kernel sets
# and between AdamW's kernels, and that grows into the second decimal. AVX2: `overspec run --config
# configs/cpu-tiny.yaml --seeds 0` at c6ae4cb on a 2-core AMD EPYC, 2026-12-07 (AdamW's loop kernel gave -0.5286 /
# -1.8392 there, and -0.5326 / -1.8063 on the first machine). A kernel set with no record has its sanity checks only.
GOLDEN_SEED0 = {"AVX2": {"train_lm": -0.5290, "test_lm": -1.8918}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overspec") / "run"
    args = resolve_args({**TINY, "output_dir": str(out), "keep_datastores": True, "save_models": True,
                         "bare_reference": True})
    result = run_study(args)
    return out, result


def _point(out: Path, seed: int, step: int) -> dict:
    return json.loads((out / f"seed-{seed}" / "evals" / f"step-{step:07d}.json").read_text())


def _rows(out: Path, seed: int, split: str) -> list[dict]:
    path = out / f"seed-{seed}" / "data" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _load_hf(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _ffn_input_and_logp(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the last block's MLP [T, d], log-softmax of the logits [T, V]) for one sequence: plain HF + a hook."""
    caught = {}
    hook = model.transformer.h[-1].mlp.register_forward_pre_hook(lambda m, a: caught.__setitem__("z", a[0]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    hook.remove()
    return caught["z"][0], torch.log_softmax(logits.double(), -1)


# ---------------------------------------------------------------------------------------------------------------- scoring
def test_recorded_scores_equal_an_independent_computation(tiny_run):
    """At the last point of seed 0: vanilla, kNN and MLP log-likelihoods recomputed from the saved model, datastore and
    memory with plain transformers/numpy equal the recorded per-row scores and group means."""
    out, _ = tiny_run
    from safetensors.torch import load_file

    point = _point(out, 0, 8)
    folder = out / "seed-0" / "evals" / "step-0000008"
    model, tok = _load_hf(folder / "model")
    keys = np.fromfile(folder / "datastore" / "keys.f16", dtype=np.float16).astype(np.float64).reshape(-1, 64)
    vals = np.fromfile(folder / "datastore" / "vals.i32", dtype=np.int32)
    mem = load_file(str(folder / "memory" / "memory.safetensors"))
    lam = 0.25
    rows = _rows(out, 0, "test")
    lm_ll, knn_ll, mlp_ll = [], [], []
    for row in rows:
        prefix = tok(row["prefix"])["input_ids"]
        (target,) = tok(row["target"], add_special_tokens=False)["input_ids"]  # children's names are one token
        z, logp = _ffn_input_and_logp(model, prefix + [target])
        p_lm = math.exp(float(logp[len(prefix) - 1, target]))
        q = z[len(prefix) - 1].double().numpy()
        d = ((keys - q) ** 2).sum(1)  # every key: the store holds fewer than k=1024
        w = np.exp(-(d - d.min()))
        p_knn = w[vals == target].sum() / w.sum()
        zt = z[len(prefix) - 1].double()
        h = torch.nn.functional.linear(zt, mem["mlp.0.weight"].double(), mem["mlp.0.bias"].double())
        h = torch.nn.functional.linear(0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))),
                                       mem["mlp.2.weight"].double(), mem["mlp.2.bias"].double())  # gelu_new MLP
        h = torch.nn.functional.layer_norm(h, (64,), mem["ln.weight"].double(), mem["ln.bias"].double())
        p_mlp = float(torch.softmax(model.lm_head.weight.detach().double() @ (zt + h), -1)[target])
        lm_ll.append(math.log(p_lm))
        knn_ll.append(math.log((1 - lam) * p_lm + lam * p_knn))
        mlp_ll.append(math.log((1 - lam) * p_lm + lam * p_mlp))
    np.testing.assert_allclose(point["lls"]["test"]["lm"], lm_ll, atol=1e-4)
    np.testing.assert_allclose(point["lls"]["test"]["knn"]["0.25"], knn_ll, atol=1e-3)
    np.testing.assert_allclose(point["lls"]["test"]["mlp"]["0.25"], mlp_ll, atol=1e-3)
    summary = point["splits"]["test"]
    for n in range(1, 6):
        sel = [i for i, r in enumerate(rows) if r["n_children"] == n]
        assert len(sel) == n  # one parent per number of children
        assert summary["lm"][str(n)] == pytest.approx(np.mean([lm_ll[i] for i in sel]), abs=1e-4)
        assert summary["knn"]["0.25"][str(n)] == pytest.approx(np.mean([knn_ll[i] for i in sel]), abs=1e-3)
    assert summary["lm"]["optimum"]["5"] == pytest.approx(math.log(1 / 5))
    assert p_knn > 0  # the kNN part is live: a training sentence holds every child's name


def test_means_and_stds_over_seeds(tiny_run):
    out, result = tiny_run
    m = result["metrics"]
    assert m["steps"] == STEPS and m["seeds"] == [0, 1] and m["methods"] == ["lm", "knn", "mlp"]
    for split in ("test", "test_overspecified"):
        for method, key in (("lm", None), ("knn", "0.25"), ("mlp", "0.25")):
            for i, step in enumerate(STEPS):
                per_seed = []
                for seed in (0, 1):
                    s = _point(out, seed, step)["splits"][split][method]
                    per_seed.append((s if key is None else s[key])["avg_groups"])
                assert m["mean"][split][method]["avg_groups"][i] == pytest.approx(np.mean(per_seed), abs=1e-12)
                assert m["std"][split][method]["avg_groups"][i] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert m["train_loss"]["0"][0] is None and all(x > 0 for x in m["train_loss"]["0"][1:])
    # training moves the weights: every point is scored with other weights
    assert len({_point(out, 0, s)["weights_hash"] for s in STEPS}) == 3


# ---------------------------------------------------------------------------------------------------------------- datastore
def test_datastore_at_a_point_holds_exactly_the_training_tokens(tiny_run):
    """The store at each point has one entry per training token after each sentence's first; its keys are that
    point's model's hidden states (rebuilt per point)."""
    out, _ = tiny_run
    from knnlm.datastore import Datastore

    model, tok = _load_hf(out / "seed-0" / "evals" / "step-0000008" / "model")
    train = _rows(out, 0, "train")
    assert len(train) == 15
    sentences = [tok(r["text"])["input_ids"] for r in train]
    expected = np.concatenate([s[1:] for s in sentences])
    stores = {s: Datastore.open(out / "seed-0" / "evals" / f"step-{s:07d}" / "datastore") for s in STEPS}
    for step, ds in stores.items():
        assert ds.N == len(expected) == sum(len(s) - 1 for s in sentences)
        np.testing.assert_array_equal(np.asarray(ds.vals), expected)
        assert ds.meta["weights_hash"] == _point(out, 0, step)["weights_hash"]
    z, _ = _ffn_input_and_logp(model, sentences[0])  # the first sentence's keys: positions 0..T-2
    first = np.asarray(stores[8].keys[: len(sentences[0]) - 1], dtype=np.float32)
    np.testing.assert_allclose(first, z[:-1].numpy(), atol=2e-2, rtol=2e-3)  # float16 storage
    assert not np.allclose(np.asarray(stores[0].keys, np.float32), np.asarray(stores[8].keys, np.float32), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("kill_at,retrained", [(6, 4), (2, 8)])
def test_resume_after_a_kill_gives_the_same_results(tiny_run, tmp_path, monkeypatch, kill_at, retrained):
    """Killed at step 6 (between points 4 and 8), the rerun resumes from the step-4 checkpoint (only steps 5-8 are
    trained again) and every recorded number equals the uninterrupted run's. Killed at step 2, before the first
    checkpoint, it trains from step 0 again, reusing step 0's results: the same numbers too (training step 0's memory
    reseeded the LM's dropout, so a rerun that reused it trained with other dropout masks)."""
    import knnlm.train as train_mod

    full_out, _ = tiny_run
    real_step = train_mod._step
    calls = {"n": 0, "kill_at": kill_at}

    def step(*a, **kw):
        if kw.get("loss_fn", a[6] if len(a) > 6 else None) is None:  # the LM's steps (not its memories')
            calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **kw)

    monkeypatch.setattr(train_mod, "_step", step)
    out = tmp_path / "run"
    args = resolve_args({**TINY, "seeds": "0", "output_dir": str(out)})
    with pytest.raises(KeyboardInterrupt):
        run_study(args)
    assert (out / "seed-0" / "evals" / f"step-{kill_at - kill_at % 4:07d}.json").is_file()
    assert not (out / "seed-0" / "evals" / "step-0000008.json").exists() and not (out / "seed-0" / "history.json").exists()
    calls.update(n=0, kill_at=-1)
    result = run_study(args)
    assert calls["n"] == retrained  # steps 5..8, or 1..8
    for step_ in STEPS:
        mine, full = _point(out, 0, step_), _point(full_out, 0, step_)
        assert mine["weights_hash"] == full["weights_hash"]
        assert mine["lls"] == full["lls"] and mine["splits"] == full["splits"]
    full_hist = json.loads((full_out / "seed-0" / "history.json").read_text())["history"]
    assert [e["train_loss"] for e in result["metrics"]["per_seed"]["0"]] == [e["train_loss"] for e in full_hist]
    assert not (out / "seed-0" / "ckpt").exists()  # removed once the seed finished
    assert not (out / "seed-0" / "evals" / "step-0000004" / "datastore").exists()  # not kept by default


def test_rerun_with_other_settings_is_refused(tiny_run):
    out, _ = tiny_run
    args = resolve_args({**TINY, "output_dir": str(out), "learning_rate": 2e-3})
    with pytest.raises(KnnlmError, match=r"--output_dir: .*learning_rate: 0\.001 -> 0\.002"):
        run_study(args)


# ---------------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value,message", [
    ("learning_rate", -1, "--learning_rate: must be a finite number > 0"),
    ("lmbda", "0.25,1.5", "--lmbda: 1.5 is outside"),
    ("lora_dropout", 1.0, "--lora_r/--lora_alpha/--lora_dropout"),
    ("seeds", "0,0", "--seeds: need one or more distinct"),
    ("key_point", "attn", "--key_point: 'attn' is not one of"),
    ("eval_every", 0, "--eval_every: must be >= 1"),
    ("lr_scheduler_type", "wavy", "--lr_scheduler_type: 'wavy' is not one of"),
    ("num_parents", 20, "--num_parents: 20 parents cannot come from 12"),
    ("mlp_epochs", 0, "--mlp_epochs: must be >= 1"),
    ("epochs", 0, "--epochs: must be >= 1"),
    ("k", 0, "--k: must be >= 1"),
    ("dtype", "int8", "--dtype: 'int8' is not one of"),
    ("warmup_ratio", "lots", "--warmup_ratio: 'lots' is not a valid float"),
])
def test_bad_values_fail_with_a_clear_message(key, value, message, tmp_path):
    with pytest.raises(KnnlmError, match=message):
        resolve_args({**TINY, key: value, "output_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


def test_cli_rejects_unknown_config_key_before_training(tmp_path, capsys):
    from knnlm.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: tiny\nlr: 0.001\n")
    out = tmp_path / "run"
    assert main(["overspec", "run", "--config", str(cfg), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("knnlm: error: --config:") and "unknown key(s) lr;" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------- outputs
def test_outputs_follow_table5_and_figure1(tiny_run):
    out, result = tiny_run
    text = (out / "results.md").read_text()
    test_part = text[text.index("## Test split"):]
    header = next(line for line in test_part.splitlines() if line.startswith("| steps"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["steps"] + [f"{g} {m}" for g in ("1", "2", "3", "4", "5", "Average")
                                 for m in ("vanilla", "kNN", "MLP", "bare-trained")]
    m = result["metrics"]
    row8 = next(line for line in test_part.splitlines() if line.startswith("| 8 |"))
    assert f"{m['mean']['test']['lm']['1'][2]:.2f} ± {m['std']['test']['lm']['1'][2]:.2f}" in row8
    assert f"{m['mean']['test']['bare']['avg_groups'][2]:.2f} ± {m['std']['test']['bare']['avg_groups'][2]:.2f} |" in row8
    assert "| log(1/n) | 0.00 | 0.00 | 0.00 | 0.00 | -0.69 |" in text
    overview = text[text.index("## Overview"):text.index("## Test split")]
    assert ("| steps | test vanilla | test kNN | test MLP | test bare-trained | train vanilla | train kNN | train MLP | "
            "control vanilla | control kNN | control MLP |") in overview
    train_part = text[text.index("## Training split"):]
    assert f"| training optimum | {m['optimum_fit']['1']:.2f} |" in train_part
    assert "test_overspecified" in text and "## Claims" in text and "| not judged — the model did not fit" in text
    for name in ("overspec.png", "overspec_control.png", "overspec_train.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["seeds"] == [0, 1] and saved["metrics"]["steps"] == STEPS
    assert json.loads((out / "config.json").read_text())["model_name_or_path"] == "tiny"


# ---------------------------------------------------------------------------------------------------------------- preset
@pytest.mark.slow
def test_cpu_tiny_preset(tmp_path):
    """The full cpu-tiny preset (5 seeds, vanilla / kNN / MLP): it finishes, and the numbers are sane."""
    from knnlm.cli import main

    out = tmp_path / "cpu-tiny"
    assert main(["overspec", "run", "--config", str(REPO / "configs" / "cpu-tiny.yaml"), "--output_dir", str(out)]) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert m["seeds"] == [0, 1, 2, 3, 4] and m["methods"] == ["lm", "knn", "mlp"]
    for split in ("test", "test_overspecified"):
        for method in m["methods"]:
            values = [v for v in m["mean"][split][method]["avg_groups"] if v is not None]  # (the memory: last point)
            assert len(values) == (1 if method == "mlp" else 6) and all(math.isfinite(v) and v < 0 for v in values)
    first = m["mean"]["test"]["lm"]["avg_groups"][0]
    assert first == pytest.approx(-math.log(50257), abs=0.5)  # a random model: about uniform over GPT-2's vocabulary
    assert m["mean"]["test"]["lm"]["avg_groups"][-1] > first + 1  # training raised the test log-likelihood
    assert m["steps"] == [0, 96, 192, 288, 384, 480] and m["splits"] == ["test", "test_overspecified", "train"]
    assert set(m["steps_per_epoch"].values()) == {480 // json.loads((out / "config.json").read_text())["epochs"]}
    assert fit_reason(m) == ""  # the vanilla model fits its training sentences: the claims are judged
    assert "bare" in m["mean"]["test"] and m["mean"]["test"]["mlp"]["avg_groups"][:-1] == [None] * 5  # --mlp_at last
    # seeded golden (demo-scratch's seed 0 has the same village, initialisation and settings; docs/overspec.md)
    last = m["per_seed"]["0"][-1]
    golden = GOLDEN_SEED0.get(json.loads((out / "results.json").read_text())["run"]["cpu_capability"])
    if golden is not None:
        assert last["train_lm"] == pytest.approx(golden["train_lm"], abs=0.02)
        assert last["test_lm"] == pytest.approx(golden["test_lm"], abs=0.02)


# -------------------------------------------------------------------- the training split and the bare-trained reference
def test_training_split_scores_equal_a_hand_computation(tiny_run):
    """The 'train' split (each pair's first training sentence: all 15 here) at the last point of seed 0: vanilla
    log-likelihoods recomputed from the saved model with plain transformers equal the recorded ones; the training
    optimum is the empirical frequency of the child after that exact prefix in the training sentences."""
    from collections import Counter

    out, result = tiny_run
    point = _point(out, 0, 8)
    model, tok = _load_hf(out / "seed-0" / "evals" / "step-0000008" / "model")
    train = _rows(out, 0, "train")
    ll = []
    for row in train:
        prefix = tok(row["prefix"])["input_ids"]
        (target,) = tok(row["target"], add_special_tokens=False)["input_ids"]
        _, logp = _ffn_input_and_logp(model, prefix + [target])
        ll.append(float(logp[len(prefix) - 1, target]))
    np.testing.assert_allclose(point["lls"]["train"]["lm"], ll, atol=1e-4)
    assert point["lls"]["train"]["n_children"] == [r["n_children"] for r in train]
    prefixes, pairs = Counter(r["prefix"] for r in train), Counter((r["prefix"], r["target"]) for r in train)
    fit = [math.log(pairs[(r["prefix"], r["target"])] / prefixes[r["prefix"]]) for r in train]
    summary = point["splits"]["train"]["lm"]
    for n in range(1, 6):
        sel = [i for i, r in enumerate(train) if r["n_children"] == n]
        assert summary[str(n)] == pytest.approx(np.mean([ll[i] for i in sel]), abs=1e-4)
        assert summary["optimum_fit"][str(n)] == pytest.approx(np.mean([fit[i] for i in sel]), abs=1e-12)
    assert summary["optimum_fit"]["1"] == 0.0  # a parent's only child: its prefix introduces nobody else
    m = result["metrics"]
    assert m["splits"] == ["test", "test_overspecified", "train"]
    assert m["mean"]["train"]["lm"]["avg_groups"][2] == pytest.approx(
        np.mean([_point(out, s, 8)["splits"]["train"]["lm"]["avg_groups"] for s in (0, 1)]), abs=1e-12)
    assert m["final"]["train"]["lm_gap_to_fit_optimum"]["avg_groups"] == pytest.approx(
        m["optimum_fit"]["avg_groups"] - m["mean"]["train"]["lm"]["avg_groups"][2])
    mem = np.mean([-np.mean(_point(out, s, 8)["lls"]["train"]["mem"]) for s in (0, 1)])
    assert m["mlp_child_loss"]["mean"] == pytest.approx(mem) and mem > 0
    for seed in ("0", "1"):  # the memory's own loss curve, from its train.json: 15 sentences' keys, 64 per step
        t = m["mlp_training"][seed]
        assert t["steps"] == math.ceil(m["n_keys"][seed] / 64) and t["final_loss"] == t["loss_curve"][-1]["loss"]
    assert "- MLP memory training loss at the last step" in (out / "results.md").read_text()


def test_train_sample_takes_each_pairs_first_sentences():
    from knnlm.experiments.overspec.run import train_sample

    rows = [{"parent": p, "child": c, "i": i} for p, c, n in (("A", "x", 3), ("A", "y", 2), ("B", "z", 3))
            for i in range(n)]
    assert [(r["child"], r["i"]) for r in train_sample(rows, 1)] == [("x", 0), ("y", 0), ("z", 0)]
    assert [(r["child"], r["i"]) for r in train_sample(rows, 2)] == [("x", 0), ("x", 1), ("y", 0), ("y", 1),
                                                                     ("z", 0), ("z", 1)]


def test_bare_reference_trains_on_exactly_the_bare_sentences(tiny_run, tmp_path, monkeypatch):
    """The bare-trained reference's training data: every bare test sentence, --examples_per_child times, no [desc]
    clause anywhere (no ', who', no attribute value of any villager); it starts from the over-specified run's initial
    weights (same step-0 hash and scores) and takes as many steps."""
    import shutil

    import knnlm.experiments.overspec.run as ov

    out, result = tiny_run
    seen = []
    real = ov.make_batches

    def spy(lm, rows, batch_size):
        seen.append([dict(r) for r in rows])
        return real(lm, rows, batch_size)

    monkeypatch.setattr(ov, "make_batches", spy)
    work = tmp_path / "run"
    for sub in ("data", "init"):
        shutil.copytree(out / "seed-0" / sub, work / "seed-0" / sub)
    args = resolve_args({**TINY, "seeds": "0", "output_dir": str(work), "bare_reference": True})
    record = ov.run_bare_seed(args, 0, work)
    (rows,) = seen
    test = _rows(out, 0, "test")
    assert [r["text"] for r in rows] == [r["text"] for r in test for _ in range(TINY["examples_per_child"])]
    villagers = json.loads((out / "seed-0" / "data" / "villagers.json").read_text())
    values = {str(v[a]) for v in villagers for a in ("birth_year", "birth_city", "lived_in", "friend", "university",
                                                      "marriage_year", "employer")}
    for r in rows:
        assert r["text"] == f"{r['parent']} is the parent of {r['child']}" and ", who " not in r["text"]
        assert not any(v in r["text"].replace(r["parent"], "") for v in values)
    assert len(rows) == len(_rows(out, 0, "train")) and record["steps"] == 8
    bare0 = json.loads((out / "seed-0" / "bare" / "evals" / "step-0000000.json").read_text())
    assert bare0["weights_hash"] == _point(out, 0, 0)["weights_hash"]  # the same initial model
    assert bare0["lls"] == pytest.approx(_point(out, 0, 0)["lls"]["test"]["lm"], abs=1e-9)
    assert record["history"][-1]["lls"] == pytest.approx(
        json.loads((out / "seed-0" / "bare" / "history.json").read_text())["history"][-1]["lls"], abs=1e-9)
    m = result["metrics"]
    assert m["mean"]["test"]["bare"]["avg_groups"][2] == pytest.approx(
        np.mean([json.loads((out / f"seed-{s}" / "bare" / "history.json").read_text())["history"][-1]["summary"]
                 ["avg_groups"] for s in (0, 1)]), abs=1e-12)
    assert m["final"]["test"]["bare_minus_lm"]["avg_groups"] == pytest.approx(
        m["mean"]["test"]["bare"]["avg_groups"][2] - m["mean"]["test"]["lm"]["avg_groups"][2])


def test_intervals_and_claims_in_the_results(tiny_run):
    """The bootstrap intervals are centred on the tables' last-step differences; the claims are recorded, each verdict
    the one its interval gives."""
    from knnlm.claims import check_record

    out, result = tiny_run
    m = result["metrics"]
    for split in ("test", "test_overspecified", "train"):
        for key in ("knn_minus_lm", "mlp_minus_lm"):
            ci = m["intervals"][split][key]
            assert ci["point"] == pytest.approx(m["final"][split][key]["avg_groups"], abs=1e-9)
            assert ci["lo"] <= ci["point"] <= ci["hi"]
        mlp_knn = m["final"][split]["mlp"]["avg_groups"] - m["final"][split]["knn"]["avg_groups"]
        assert m["intervals"][split]["mlp_minus_knn"]["point"] == pytest.approx(mlp_knn, abs=1e-9)
    ci = m["intervals"]["test"]["bare_minus_lm"]
    assert ci["point"] == pytest.approx(m["final"]["test"]["bare_minus_lm"]["avg_groups"], abs=1e-9)
    gap = m["intervals"]["test"]["lm_gap_to_optimum"]
    assert gap["point"] == pytest.approx(m["final"]["test"]["lm_gap_to_optimum"]["avg_groups"], abs=1e-9)
    saved = json.loads((out / "results.json").read_text())
    assert [c["statistic"] for c in saved["claims"]] == [s for _, _, s, _ in OVERSPEC_CLAIMS]
    for rec in saved["claims"]:
        check_record(rec)
    assert "lls" not in saved["metrics"]["per_seed"]["0"][-1]


def test_reproduce_reports_the_claims(tiny_run, tmp_path):
    """knnlm reproduce's overspec report part: Table 2's Macondo row is the perplexity of the names at the last step,
    Table 5's section is the run's results.md, and its claims are the run's own (here not judged: a model 8 steps
    from random init has not fitted its training sentences)."""
    from knnlm.experiments.reproduce import collect

    out, result = tiny_run
    claims, tables, missing = collect(out.parent, [{"study": "overspec", "folder": out.name, "label": "A"},
                                                   {"study": "overspec", "folder": "missing", "label": "B"}])
    final = result["metrics"]["final"]["test"]
    n = len(result["metrics"]["seeds"])  # named from the run itself, after the entry's label
    assert [r[0] for r in tables["table2_macondo"]] == ["paper (GPT-2 fine-tuned)", f"A, {n} seeds (step 8)"]
    assert tables["table2_macondo"][1][1:] == pytest.approx([math.exp(-final[m]["avg_groups"]) for m in ("lm", "knn", "mlp")])
    assert tables["table5"][0].startswith(f"### A, {n} seeds\n\n### Over-specification")
    assert missing == ["overspec: B (missing)"]
    saved = json.loads((out / "results.json").read_text())["claims"]
    assert [c.record() for c in claims] == [{**r, "setting": r["setting"].replace("this run", f"A, {n} seeds")}
                                            for r in saved]
    assert {c.verdict for c in claims} == {"not judged"}

def test_memory_claims_not_judged_before_the_memory_plateaus():
    """The MLP memory's claims are judged only where every seed's memory loss dropped by at most memory.PLATEAU_DROP
    (1%) over the last fifth of its curve; the other claims are untouched; the interval is kept either way."""
    from knnlm.claims import NOT_JUDGED
    from knnlm.experiments.overspec.report import overspec_claims, plateau_reason

    iv = {"estimate": 0.2, "low": 0.1, "high": 0.3}
    metrics = {"final": {"step": 10, "train": {"lm": {"avg_groups": -0.5}}}, "optimum_fit": {"avg_groups": -0.4},
               "methods": ["lm", "knn", "mlp"], "intervals": {"test": {"knn_minus_lm": iv, "mlp_minus_knn": iv}},
               "mlp_training": {"0": {"plateau": 0.005}, "1": {"plateau": 0.0142}}}
    assert plateau_reason(metrics) == ("the memory's loss still fell 1.4% over its last fifth (> 1%: not at its "
                                       "plateau)")
    by = {c.statistic.split(" (")[0]: c for c in overspec_claims(metrics, "t")}
    assert by["MLP − kNN"].verdict == NOT_JUDGED and by["MLP − kNN"].interval.lo == 0.1
    assert by["kNN − vanilla"].verdict == "holds"
    metrics["mlp_training"]["1"]["plateau"] = 0.01  # at the limit: plateaued
    assert plateau_reason(metrics) == ""
    assert {c.statistic.split(" (")[0]: c for c in overspec_claims(metrics, "t")}["MLP − kNN"].verdict == "holds"
    # a seed whose memory curve is missing, or too short to tell: unknown, not judged
    from knnlm.memory import PLATEAU_UNKNOWN, plateau_reason as drops_reason

    assert plateau_reason({**metrics, "seeds": [0, 1, 2]}) == PLATEAU_UNKNOWN
    assert drops_reason([0.005, None]) == PLATEAU_UNKNOWN and drops_reason([]) == ""


def test_two_processes_run_the_study_and_the_memory_is_refused_there(tmp_path):
    """torchrun, 2 CPU processes: every process claimed the output folder (the second was refused as its other writer),
    both wrote the initial weights and the village, and the second crashed on the report only the first writes."""
    import os
    import subprocess
    import sys

    flags = ["--model_name_or_path", "tiny", "--seeds", "0", "--num_villagers", "12", "--num_parents", "5",
             "--max_children", "5", "--examples_per_child", "1", "--epochs", "2", "--eval_every", "4",
             "--learning_rate", "1e-3", "--eval_batch_size", "16", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(port, out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "knnlm", "overspec", "run", *flags, *extra, "--output_dir", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    done = run(29751, tmp_path / "run", "--mlp_memory", "false")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert metrics["steps"] == [0, 4]  # 4 micro-batches an epoch, 2 per process: 2 steps an epoch (one process: 4)
    assert metrics["steps_per_epoch"] == {"0": 2}  # what overspec_lengths reads a point's epochs from
    refused = run(29752, tmp_path / "mem")
    assert refused.returncode != 0 and "knnlm: error: --mlp_memory: the memory is trained by one process" in refused.stderr
    assert not (tmp_path / "mem" / "config.json").exists()
