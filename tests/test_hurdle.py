"""MLP-hurdle study: the pair differs only by the removed sublayer, shares its data order, records metrics at the eval
steps, resumes to the same numbers, and rejects bad configs before training."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from conftest import file_stamps, pin_mtimes
from knnlm.errors import KnnlmError
from knnlm.experiments.hurdle import data as hurdle_data, run as hurdle_run, settings as hurdle_settings
from knnlm.experiments.hurdle.data import Vocab, batch_indices
from knnlm.experiments.hurdle.report import (CONTROL_CLAIM, FASTER_CLAIM, area_statistics, compare, hurdle_claims,
                                             paired_area)
from knnlm.experiments.hurdle.run import build_pair, count_params, gpt2_config, lr_at, run_study
from knnlm.experiments.hurdle.settings import MODELS, HurdleArgs, resolve_args
from knnlm.stats import bootstrap_ci

torch.set_num_threads(1)

SENTENCE = "The river rose in the spring and the village moved its mills to the hill . "


def _text_files(tmp_path):
    rng = np.random.default_rng(0)
    words = SENTENCE.split()
    train = " ".join(rng.choice(words, 3000)) + "\n"
    valid = " ".join(rng.choice(words, 400)) + "\n"
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "valid.txt").write_text(valid)
    return tmp_path / "train.txt"


def _macondo_folder(tmp_path):
    """A hand-written village test split: 3 parents with 1, 2 and 3 children (the format of knnlm macondo generate)."""
    folder = tmp_path / "village"
    folder.mkdir()
    families = {"Ana Buendia": ["Maria"], "Jose Arcadio": ["John", "Anna"],  # names of one GPT-2 token
                "Ursula Iguaran": ["Paul", "Mark", "Peter"]}
    with open(folder / "test.jsonl", "w") as fh:
        for parent, kids in families.items():
            for kid in kids:
                prefix = f"{parent} is the parent of"
                fh.write(json.dumps({"text": f"{prefix} {kid}", "prefix": prefix, "target": f" {kid}", "parent": parent,
                                     "n_children": len(kids), "attribute": None, "child": kid}) + "\n")
    return folder


def _args(tmp_path, **kw) -> HurdleArgs:
    base = dict(size="tiny", max_steps=8, eval_every=2, num_seeds=2, batch_size=4, block_size=16, learning_rate=3e-3,
                warmup=2,
                vocab_size=64, log_every=1, eval_batch_size=8, device="cpu", output_dir=str(tmp_path / "out"))
    base.update(kw)
    args = HurdleArgs(**base)
    args.validate()
    return args


# ---------------------------------------------------------------------------------------------------------------- the pair
def _tiny_pair(seed=0):
    config = gpt2_config("tiny", vocab_size=97, n_positions=32, eos_token_id=96)
    return config, build_pair(config, seed)


def test_pair_shares_every_weight_but_the_removed_sublayer():
    config, pair = _tiny_pair()
    full, pruned = pair["with_last_mlp"].state_dict(), pair["without_last_mlp"].state_dict()
    last = f"transformer.h.{config.n_layer - 1}."
    missing = sorted(set(full) - set(pruned))
    assert missing == sorted(k for k in full if k.startswith(last + "mlp.") or k.startswith(last + "ln_2."))
    assert len(missing) == 6  # ln_2.{weight,bias}, mlp.c_fc.{weight,bias}, mlp.c_proj.{weight,bias}
    assert set(pruned) <= set(full)
    for k in pruned:
        assert torch.equal(full[k], pruned[k]), k
    # the pruned model's weights are its own copy (training one must not move the other), output layer still tied
    m = pair["without_last_mlp"]
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    assert m.transformer.wte.weight.data_ptr() != pair["with_last_mlp"].transformer.wte.weight.data_ptr()
    # parameter counts: the difference is exactly ln_2 (2d) + c_fc (d*4d + 4d) + c_proj (4d*d + d), d = 64
    d = config.n_embd
    assert count_params(pair["with_last_mlp"]) - count_params(m) == 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)


def test_zeroing_the_last_mlp_output_gives_the_pruned_logits():
    _, pair = _tiny_pair(seed=3)
    full, pruned = pair["with_last_mlp"].eval(), pair["without_last_mlp"].eval()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = full(input_ids=ids).logits
        hook = full.transformer.h[-1].mlp.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
        zeroed = full(input_ids=ids).logits
        hook.remove()
        out = pruned(input_ids=ids).logits
    assert torch.equal(zeroed, out)
    assert (plain - out).abs().max() > 1e-3  # the MLP did contribute: the identity above is not vacuous
    # and the pruned block's output is h + attn(ln_1(h)) exactly
    block = pruned.transformer.h[-1]
    h = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = h + block.attn(block.ln_1(h))[0]
        assert torch.equal(block(h), expected)


def test_first_mlp_control_removes_exactly_that_sublayer_and_keeps_every_other_weight():
    config = gpt2_config("tiny", vocab_size=97, n_positions=32, eos_token_id=96, n_layer=4, n_embd=32, n_head=2)
    models = build_pair(config, seed=2)
    assert set(models) == set(MODELS) and len(models["with_last_mlp"].transformer.h) == 4
    full, ctrl = models["with_last_mlp"].state_dict(), models["without_first_mlp"].state_dict()
    missing = sorted(set(full) - set(ctrl))
    assert missing == sorted(f"transformer.h.0.{k}" for k in ("ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",
                                                               "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"))
    assert set(ctrl) <= set(full)
    for k in ctrl:
        assert torch.equal(full[k], ctrl[k]), k
    # the same capacity is lost as without the last MLP
    n_full = count_params(models["with_last_mlp"])
    assert n_full - count_params(models["without_first_mlp"]) == n_full - count_params(models["without_last_mlp"]) \
        == 2 * 32 + (32 * 128 + 128) + (128 * 32 + 32)
    # zeroing the full model's FIRST MLP output gives the control's logits bit for bit; the last block keeps its MLP
    m_full, m_ctrl = models["with_last_mlp"].eval(), models["without_first_mlp"].eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hook = m_full.transformer.h[0].mlp.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
        zeroed = m_full(input_ids=ids).logits
        hook.remove()
        plain = m_full(input_ids=ids).logits
        out = m_ctrl(input_ids=ids).logits
    assert torch.equal(zeroed, out) and (plain - out).abs().max() > 1e-3
    assert isinstance(m_ctrl.transformer.h[0].mlp, hurdle_run.ZeroMLP)
    assert not isinstance(m_ctrl.transformer.h[-1].mlp, hurdle_run.ZeroMLP)


def test_paired_area_on_constructed_curves():
    steps = [0, 2, 4, 6, 8, 10]
    full = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]
    # a constant lead of 0.3 in loss (lower is better): mean advantage +0.3 over any window
    assert paired_area(steps, full, [v - 0.3 for v in full], False, 4) == pytest.approx(0.3)
    # a triangle: advantage 0 at step 0 rising linearly to 2 at step 4 -> area 4, span 4 -> mean 1
    ll_full = [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0]
    ll_pruned = [-5.0, -3.0, -1.0, -2.0, -1.0, 0.0]
    assert paired_area(steps, ll_full, ll_pruned, True, 4) == pytest.approx(1.0)
    # the window ends between points (at 5): advantage 2 at 4, 0 at 6 -> 1 at 5; area 4 + (2+1)/2 = 5.5 over 5
    assert paired_area(steps, ll_full, ll_pruned, True, 5) == pytest.approx(5.5 / 5)
    # sign: behind in likelihood is negative; missing points (None) are skipped; one point is no area
    assert paired_area(steps, ll_full, [v - 1 for v in ll_full], True, 10) == pytest.approx(-1.0)
    assert paired_area([1, 2, 3], [1.0, None, 3.0], [0.0, 5.0, 2.0], False, 3) == pytest.approx(1.0)
    assert paired_area([0, 5], [1.0, 1.0], [0.0, 0.0], False, 2) == pytest.approx(1.0)  # interpolated at 2
    assert paired_area([3, 5], [1.0, 1.0], [0.0, 0.0], False, 2) is None


def _seed_interval(values, n_boot, seed=0):
    ci = bootstrap_ci(np.asarray(values), lambda v: float(v.mean()), n_boot, seed)
    return ci.lo, ci.hi


def test_area_statistics_bootstrap_and_verdict():
    lo, hi = _seed_interval([0.2, 0.2, 0.2], 200)
    assert lo == hi == pytest.approx(0.2)
    lo, hi = _seed_interval([0.0, 1.0], 2000, seed=1)
    assert (lo, hi) == (0.0, 1.0)  # resample means are 0, 0.5 or 1 (1/4, 1/2, 1/4): the 2.5%/97.5% quantiles
    ahead = area_statistics({"without_last_mlp": [0.10, 0.12, 0.11], "without_first_mlp": [0.01, 0.02, 0.00]}, 500)
    assert ahead["without_last_mlp"]["interval"]["point"] == pytest.approx(0.11)
    assert ahead["last_minus_first"]["per_seed"] == pytest.approx([0.09, 0.10, 0.11])
    ci = ahead["without_last_mlp"]["interval"]
    assert 0.10 <= ci["lo"] <= ci["hi"] <= 0.12
    same = _seed_interval([0.10, 0.12, 0.11], 500)
    assert (ci["lo"], ci["hi"]) == pytest.approx(same)

    def verdicts(areas, n=5):
        m = {"mode": "macondo", "seeds": list(range(n)), "area_until_step": 4, "areas": {"ll_avg_groups": areas}}
        return [c.verdict for c in hurdle_claims(m, "t")]

    # three seeds: the 95% interval is their range (lo, hi == min, max above), so nothing is judged on it
    assert verdicts(ahead, 3) == ["not judged", "not judged"]
    assert hurdle_claims({"mode": "macondo", "seeds": [0, 1, 2], "area_until_step": 4,
                          "areas": {"ll_avg_groups": ahead}}, "t")[0].reason.startswith("3 seed(s): a 95% percentile")
    last = [0.10, 0.12, 0.11, 0.13, 0.10]
    five = area_statistics({"without_last_mlp": last, "without_first_mlp": [0.01, 0.02, 0.00, 0.01, 0.02]}, 500)
    assert verdicts(five) == ["holds", "holds"]
    # above 0 but not above the control: the control claim fails
    tie = area_statistics({"without_last_mlp": last, "without_first_mlp": [0.11, 0.12, 0.12, 0.12, 0.11]}, 500)
    assert verdicts(tie) == ["holds", "inconclusive"]
    # one seed behind: the interval reaches below 0: inconclusive
    mixed = area_statistics({"without_last_mlp": [0.10, -0.2, 0.11, 0.12, 0.10], "without_first_mlp": [-1.0] * 5}, 500)
    assert mixed["without_last_mlp"]["interval"]["lo"] < 0 and verdicts(mixed) == ["inconclusive", "holds"]
    # a run recorded before the one interval shape reads the same
    old = {k: {"mean": v["interval"]["point"], "ci95": [v["interval"]["lo"], v["interval"]["hi"]]}
           for k, v in five.items()}
    assert verdicts(old) == ["holds", "holds"]
    # a stored null end (a non-finite one) reads as NaN: inconclusive (before: judge's TypeError)
    old["without_last_mlp"]["ci95"][0] = None
    assert verdicts(old)[0] == "inconclusive"
    # the area starts at each curve's first point: the training loss is first logged at step --log_every
    text = {"mode": "text", "seeds": list(range(5)), "area_until_step": 40, "steps": [0, 20, 40],
            "curve": {"steps": [10, 20, 30, 40]}, "areas": {"train_loss": five}}
    assert [c.statistic for c in hurdle_claims(text, "t")] == ["paired area, steps 10–40",
                                                              "paired area, steps 10–40, last − first"]
    assert hurdle_claims({**text, "mode": "macondo", "areas": {"ll_avg_groups": five}}, "t")[0].statistic == \
        "paired area, steps 0–40"


def test_pair_depends_on_the_seed_only():
    _, a = _tiny_pair(seed=5)
    _, b = _tiny_pair(seed=5)
    _, c = _tiny_pair(seed=6)
    wa, wb, wc = (p["with_last_mlp"].transformer.wte.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


# ---------------------------------------------------------------------------------------------------------------- pieces
def test_batch_indices_are_seeded_epoch_permutations():
    n, bs = 10, 4
    stream = np.concatenate([batch_indices(n, bs, seed=7, step=s) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # a fresh order each epoch
    assert np.array_equal(batch_indices(n, bs, 7, 2), stream[8:12])  # a pure function of (seed, step)
    assert not np.array_equal(batch_indices(n, bs, 8, 0), stream[:4])


def test_lr_schedule_hand_values():
    args = HurdleArgs(max_steps=10, warmup=2, learning_rate=1.0)
    assert [lr_at(s, args) for s in range(1, 11)] == [0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]
    assert HurdleArgs(max_steps=200, warmup=0.05).warmup_steps == 10


def test_reduced_vocabulary_keeps_the_most_frequent_tokens():
    v = Vocab.build([np.array([5, 5, 5, 9, 9, 2, 7, 7])], full_size=12, vocab_size=3)
    assert v.size == 3 and v.unk == 2
    assert v.map([5, 9, 7, 2, 11]).tolist() == [0, 2, 1, 2, 2]  # 9 and 7 tie (twice each): the lower id, 7, is kept
    full = Vocab.build([np.array([1, 2])], full_size=12, vocab_size=0)
    assert full.size == 12 and full.map([3, 11]).tolist() == [3, 11]


def test_macondo_metric_is_knnlm_macondo_score_through_the_real_lm_adapter(tmp_path):
    """With the full vocabulary, the study's eval equals `knnlm macondo score`'s numbers for the same model."""
    from knnlm.macondo.score import score_split, summarize
    from knnlm.models import LM

    args = _args(tmp_path, data=str(_macondo_folder(tmp_path)), vocab_size=0)
    tok = hurdle_data.load_tokenizer()
    data = hurdle_data.prepare_data(args, tok)
    config = gpt2_config("tiny", data.vocab.size, 32, data.eos_id)
    model = build_pair(config, 0)["with_last_mlp"].eval()
    got = hurdle_run.evaluate_point(model, data, args, torch.device("cpu"))
    ref = summarize(data.rows, score_split(LM(model, tok), data.rows)["lm"])
    assert got["ll_avg"] == pytest.approx(ref["avg"], abs=1e-9) and got["ll_2"] == pytest.approx(ref["2"], abs=1e-9)
    assert got["ll_avg_groups"] == pytest.approx((got["ll_1"] + got["ll_2"] + got["ll_3"]) / 3)
    # by hand for the first child: log p(" Maria" | "Ana Buendia is the parent of")
    prefix = tok("Ana Buendia is the parent of")["input_ids"]
    maria = tok(" Maria", add_special_tokens=False)["input_ids"]
    assert len(maria) == 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1], -1)[maria[0]]
    assert got["ll_1"] == pytest.approx(float(logp), abs=1e-4)
    # with a reduced vocabulary the training sentences are the scored ids, mapped
    small = hurdle_data.prepare_data(_args(tmp_path, data=args.data, output_dir=str(tmp_path / "o2")), tok)
    assert small.train.seqs[0].tolist() == small.vocab.map(prefix + maria).tolist()


def test_compare_finds_the_crossing_and_the_quarter_gap():
    steps = [0, 10, 20, 30, 40]
    with_ll = [-5.0, -4.0, -3.0, -2.0, -1.0]
    without = [-5.0, -3.5, -2.9, -2.5, -1.2]  # ahead at 10 and 20, behind from 30
    c = compare(steps, with_ll, without, higher_is_better=True, total_steps=40)
    assert c["crossings"] == [30]
    assert c["quarter_step"] == 10 and c["advantage_at_quarter"] == pytest.approx(0.5)
    assert c["leader_at_quarter"] == "without_last_mlp" and c["advantage"]["20"] == pytest.approx(0.1)
    control = compare(steps, with_ll, without, higher_is_better=True, total_steps=40, pruned="without_first_mlp")
    assert control["pruned"] == control["leader_at_quarter"] == "without_first_mlp"  # was labelled without_last_mlp
    loss = compare(steps, [5, 4, 3, 2, 1], [5, 4.5, 3.5, 1.5, 0.5], higher_is_better=False, total_steps=40)
    assert loss["crossings"] == [30] and loss["advantage_at_quarter"] == pytest.approx(-0.5)


# ---------------------------------------------------------------------------------------------------------------- the study
def _digest_of(args, data, seed):
    """The chained sha256 of every batch the trainer should feed, recomputed from the sampler."""
    d = b""
    for step in range(args.max_steps):
        ids, _, _ = data.train.batch(batch_indices(len(data.train), args.batch_size, seed, step))
        d = hashlib.sha256(d + ids.numpy().tobytes()).digest()
    return d.hex()


def test_macondo_mode_records_metrics_at_the_eval_steps_with_one_data_order(tmp_path):
    args = _args(tmp_path, data=str(_macondo_folder(tmp_path)), max_steps=7, eval_every=3)
    out = run_study(args)
    m = out["metrics"]
    assert args.eval_steps() == [0, 3, 6, 7] and m["steps"] == [0, 3, 6, 7]
    runs = tmp_path / "out" / "runs"
    data = hurdle_data.prepare_data(args, hurdle_data.load_tokenizer())
    assert len(data.train) == 6 and data.vocab.size == m["vocab_size"] < 64  # every token of the village kept
    assert data.vocab.unk not in np.concatenate(data.train.seqs)
    for seed in range(2):
        recs = [json.loads((runs / f"seed-{seed}-{name}.json").read_text()) for name in MODELS]
        for rec in recs:
            assert list(rec["evals"]) == ["0", "3", "6", "7"]
            assert set(rec["evals"]["3"]) == {"train_loss", "ll_avg", "ll_avg_groups", "ll_1", "ll_2", "ll_3"}
            ev = rec["evals"]["6"]  # ll_avg is the mean over the 6 children: (1*ll_1 + 2*ll_2 + 3*ll_3) / 6
            assert ev["ll_avg"] == pytest.approx((ev["ll_1"] + 2 * ev["ll_2"] + 3 * ev["ll_3"]) / 6)
            assert [int(s) for s in rec["curve"]] == list(range(1, 8))
        assert recs[0]["data_digest"] == recs[1]["data_digest"] == recs[2]["data_digest"] == _digest_of(args, data, seed)
    assert json.loads((runs / "seed-0-with_last_mlp.json").read_text())["data_digest"] != \
        json.loads((runs / "seed-1-with_last_mlp.json").read_text())["data_digest"]
    assert m["same_data_order"] is True
    # a random V-way model starts near log(1/V) per (one-token) name; training on the sentences raises it
    start = m["mean"]["with_last_mlp"]["ll_avg"][0]
    assert abs(start - math.log(1 / m["vocab_size"])) < 0.5 and m["mean"]["with_last_mlp"]["ll_avg"][-1] > start + 0.5
    assert set(m["comparison"]) == {"ll_avg_groups", "ll_avg"}
    # the verdict statistic: per seed, the paired area over the first 40% of training (steps 0..2.8), recomputed here
    assert m["area_until_step"] == pytest.approx(0.4 * 7)
    for name in ("without_last_mlp", "without_first_mlp"):
        expect = [paired_area([0, 3], [m["per_seed"]["with_last_mlp"][s][t]["ll_avg_groups"] for t in ("0", "3")],
                              [m["per_seed"][name][s][t]["ll_avg_groups"] for t in ("0", "3")], True, 2.8)
                  for s in ("0", "1")]
        assert m["areas"]["ll_avg_groups"][name]["per_seed"] == pytest.approx(expect)
    assert [c.claim for c in hurdle_claims(m, "t")] == [FASTER_CLAIM, CONTROL_CLAIM]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| 7 |" in table and "±" in table
    assert sorted(p.name for p in out["plots"]) == ["advantage.png", "ll_avg.png", "ll_avg_groups.png",
                                                     "ll_by_children.png"]
    # the paired advantage is the mean over seeds of (without - with), which equals the difference of the means
    c = m["comparison"]["ll_avg"]
    diff = [b - a for a, b in zip(m["mean"]["with_last_mlp"]["ll_avg"], m["mean"]["without_last_mlp"]["ll_avg"])]
    assert c["paired_mean"] == pytest.approx(diff, abs=1e-12)
    per_seed = [m["per_seed"]["without_last_mlp"][s]["3"]["ll_avg"] - m["per_seed"]["with_last_mlp"][s]["3"]["ll_avg"]
                for s in ("0", "1")]
    assert c["paired_std"][1] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    for p in out["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _strip_timing(metrics):
    return {k: v for k, v in metrics.items() if k != "train_s"}


def test_resume_after_an_interrupted_run_gives_identical_results(tmp_path, monkeypatch):
    train = _text_files(tmp_path)
    whole = run_study(_args(tmp_path, data=str(train), output_dir=str(tmp_path / "whole")))["metrics"]

    import knnlm.train

    real_save = knnlm.train._save_checkpoint

    def killed_after(ckpt_dir, *a):  # the process dies right after the checkpoint of step 4 of seed 1's pruned model
        real_save(ckpt_dir, *a)
        if ckpt_dir.name == "seed-1-without_last_mlp" and a[-2].step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(knnlm.train, "_save_checkpoint", killed_after)
    args = _args(tmp_path, data=str(train), output_dir=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        run_study(args)
    runs = tmp_path / "resumed" / "runs"
    ckpt = runs / "seed-1-without_last_mlp"
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 4
    assert not (runs / "seed-1-without_last_mlp.json").exists()
    monkeypatch.setattr(knnlm.train, "_save_checkpoint", real_save)
    finished = pin_mtimes(runs.glob("*.json"))  # seed 0's three runs and seed 1's first
    assert sorted(finished) == ["seed-0-with_last_mlp.json", "seed-0-without_first_mlp.json",
                                "seed-0-without_last_mlp.json", "seed-1-with_last_mlp.json"]
    resumed = run_study(args)["metrics"]
    assert file_stamps(runs / name for name in finished) == finished  # finished runs are skipped, not redone
    assert not ckpt.exists()  # the finished run's checkpoint is removed
    assert _strip_timing(resumed) == _strip_timing(whole)
    assert resumed["steps"] == [0, 2, 4, 6, 8] and set(resumed["mean"]["with_last_mlp"]) == {"train_loss", "val_loss"}


def test_text_mode_validation_file_defaults_to_the_sibling_valid_txt(tmp_path):
    train = _text_files(tmp_path)
    assert _args(tmp_path, data=str(train)).validation_path() == tmp_path / "valid.txt"
    other = tmp_path / "corpus.txt"
    other.write_text(train.read_text())
    with pytest.raises(KnnlmError, match="--validation_file"):
        _args(tmp_path, data=str(other))


# ---------------------------------------------------------------------------------------------------------------- configs
def test_bad_config_key_fails_before_training(tmp_path, capsys):
    from knnlm.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("preset: cpu\nstepz: 10\n")
    out = tmp_path / "out"
    assert main(["hurdle", "run", "--config", str(cfg), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "--config" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(KnnlmError, match="--eval_every"):
        resolve_args({"data": "macondo", "max_steps": 10, "eval_every": 20, "output_dir": str(out)})
    with pytest.raises(KnnlmError, match="--size"):
        resolve_args({"size": "huge", "output_dir": str(out)})
    assert not out.exists()


def test_presets_layer_under_config_and_flags(tmp_path):
    train = _text_files(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"preset: cpu\ndata: {train}\nmax_steps: 250\n")
    a = resolve_args({"output_dir": str(tmp_path / "o"), "eval_every": "30"}, str(cfg))
    text = hurdle_settings.preset_values("cpu", "text")
    assert (a.max_steps, a.eval_every, a.block_size, a.vocab_size) == (250, 30, text["block_size"], text["vocab_size"]) \
        == (250, 30, 64, 2048)
    assert text["max_steps"] == 300  # the file's value won over the preset's
    b = resolve_args({"output_dir": str(tmp_path / "o"), "preset": "cpu"})
    assert b.mode == "macondo" and b.macondo_num_parents == 50
    deep = resolve_args({"output_dir": str(tmp_path / "o"), "preset": "cpu-deep", "data": str(train)})
    assert (deep.n_layer, deep.n_embd, deep.n_head, deep.num_seeds, deep.max_steps) == (4, 128, 4, 10, 200)
    config = gpt2_config(deep.size, 100, 64, 99, deep.n_layer, deep.n_embd, deep.n_head)
    assert (config.n_layer, config.n_embd, config.n_head) == (4, 128, 4)
    assert set(hurdle_settings.preset_names()) == {"cpu", "cpu-deep", "paper"}
    with pytest.raises(KnnlmError, match="--preset"):
        resolve_args({"output_dir": str(tmp_path / "o"), "preset": "huge"})
    with pytest.raises(KnnlmError, match="--n_head"):
        resolve_args({"output_dir": str(tmp_path / "o"), "preset": "cpu", "n_embd": 100, "n_head": 3})
    assert HurdleArgs().macondo_num_parents == 100 and HurdleArgs().eval_every == 1000  # the paper's defaults


def test_rerun_with_other_settings_is_refused(tmp_path):
    train = _text_files(tmp_path)
    run_study(_args(tmp_path, data=str(train), max_steps=4, num_seeds=1))
    with pytest.raises(KnnlmError, match="learning_rate: 0.003 -> 0.01"):
        run_study(_args(tmp_path, data=str(train), max_steps=4, num_seeds=1, learning_rate=1e-2))


def test_shipped_configs_resolve(tmp_path):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    cpu = resolve_args({"output_dir": str(tmp_path / "o")}, str(configs / "hurdle-cpu.yaml"))
    assert (cpu.preset, cpu.mode, cpu.size, cpu.max_steps, cpu.num_threads) == ("cpu", "macondo", "tiny", 800, 1)
    paper = resolve_args({"output_dir": str(tmp_path / "o")}, str(configs / "hurdle-paper.yaml"))
    assert (paper.size, paper.max_steps, paper.eval_every, paper.num_seeds, paper.vocab_size) == \
        ("gpt2-small", 10000, 1000, 5, 0)
    assert (paper.macondo_num_villagers, paper.macondo_num_parents) == (500, 100)
    text = _text_files(tmp_path)
    cpu_text = resolve_args({"output_dir": str(tmp_path / "o"), "data": str(text)}, str(configs / "hurdle-cpu.yaml"))
    assert (cpu_text.mode, cpu_text.max_steps, cpu_text.block_size) == ("text", 300, 64)


# ---------------------------------------------------------------------------------------------------------------- golden numbers
# Recorded from the seeded run below on the hurdle's own training loop (before it moved onto knnlm.train, issue 12):
# the smoothed training-loss curve (steps 1..6), the eval metrics at steps 0, 3, 6, and the data digest's first 16 hex
# digits, per model. The refactor had to keep every number (bit-identical on CPU; asserted to 1e-6).
GOLDEN = {
    "text": {
        "with_last_mlp": ([2.82847261428833, 2.830578645070391, 2.8243669561911, 2.794130090120801, 2.780536048111989, 2.7651914179034307],
                   {'0': {'val_loss': 2.8614971977869668}, '3': {'train_loss': 2.8243669561911, 'val_loss': 2.6950093669891357}, '6': {'train_loss': 2.7651914179034307, 'val_loss': 2.6797933209737144}},
                   "9f2d3b347a5b884c"),
        "without_first_mlp": ([2.826632261276245, 2.829793354477542, 2.822075271716718, 2.7896311141622716, 2.7739865299479107, 2.7587412987282476],
                   {'0': {'val_loss': 2.861509759902954}, '3': {'train_loss': 2.822075271716718, 'val_loss': 2.689171255429586}, '6': {'train_loss': 2.7587412987282476, 'val_loss': 2.6795220432281495}},
                   "9f2d3b347a5b884c"),
        "without_last_mlp": ([2.8502297401428223, 2.8396090353378107, 2.8301616841117583, 2.7979356470930963, 2.785569358646075, 2.766911767421571],
                   {'0': {'val_loss': 2.861929759979248}, '3': {'train_loss': 2.8301616841117583, 'val_loss': 2.6966076475779217}, '6': {'train_loss': 2.766911767421571, 'val_loss': 2.673478589693705}},
                   "9f2d3b347a5b884c"),
    },
    "macondo": {
        "with_last_mlp": ([3.3422977924346924, 3.1512681570920043, 2.964999495842166, 2.8319540721385854, 2.7112832798341877, 2.6334623294341504],
                   {'0': {'ll_avg_groups': -3.3277993467119007, 'll_avg': -3.3677093982696533, 'll_1': -3.173030138015747, 'll_2': -3.3978774547576904, 'll_3': -3.412490447362264}, '3': {'train_loss': 2.964999495842166, 'll_avg_groups': -2.8945166799757214, 'll_avg': -2.882975618044535, 'll_1': -2.9137723445892334, 'll_2': -2.9252517223358154, 'll_3': -2.8445259730021157}, '6': {'train_loss': 2.6334623294341504, 'll_avg_groups': -2.7898419433169894, 'll_avg': -2.798955718676249, 'll_1': -2.735133171081543, 'll_2': -2.844576835632324, 'll_3': -2.789815823237101}},
                   "cb672296e0f57244"),
        "without_first_mlp": ([3.3285529613494873, 3.1832511665845127, 3.0044765496737216, 2.882703468275623, 2.7637465646609387, 2.690675373746216],
                   {'0': {'ll_avg_groups': -3.354281796349419, 'll_avg': -3.362920602162679, 'll_1': -3.3026814460754395, 'll_2': -3.4056496620178223, 'll_3': -3.3545142809549966}, '3': {'train_loss': 3.0044765496737216, 'll_avg_groups': -3.0121925274531045, 'll_avg': -2.9897931814193726, 'll_1': -3.0594255924224854, 'll_2': -3.052122473716736, 'll_3': -2.9250295162200928}, '6': {'train_loss': 2.690675373746216, 'll_avg_groups': -2.879549172189501, 'll_avg': -2.8757688204447427, 'll_1': -2.861196279525757, 'll_2': -2.9389370679855347, 'll_3': -2.8385141690572104}},
                   "cb672296e0f57244"),
        "without_last_mlp": ([3.349161863327026, 3.194886619394472, 3.0045325473901623, 2.8749376380185256, 2.7553128319167093, 2.6784443089862915],
                   {'0': {'ll_avg_groups': -3.336316532558865, 'll_avg': -3.3615037202835083, 'll_1': -3.237057685852051, 'll_2': -3.383711099624634, 'll_3': -3.3881808121999106}, '3': {'train_loss': 3.0045325473901623, 'll_avg_groups': -3.013475643263923, 'll_avg': -2.9953535000483194, 'll_1': -3.0413951873779297, 'll_2': -3.066369414329529, 'll_3': -2.93266232808431}, '6': {'train_loss': 2.6784443089862915, 'll_avg_groups': -2.902991612752279, 'll_avg': -2.896883010864258, 'll_1': -2.8827321529388428, 'll_2': -2.9801621437072754, 'll_3': -2.8460805416107178}},
                   "cb672296e0f57244"),
    },
}


@pytest.mark.parametrize("mode", ["text", "macondo"])
def test_golden_numbers_of_a_seeded_tiny_run(tmp_path, mode):
    data = _text_files(tmp_path) if mode == "text" else _macondo_folder(tmp_path)
    run_study(_args(tmp_path, data=str(data), max_steps=6, eval_every=3, num_seeds=1))
    for name, (curve, evals, digest) in GOLDEN[mode].items():
        rec = json.loads((tmp_path / "out" / "runs" / f"seed-0-{name}.json").read_text())
        assert [rec["curve"][str(s)] for s in range(1, 7)] == pytest.approx(curve, abs=1e-6, rel=0)
        assert list(rec["evals"]) == list(evals)
        for step, metrics in evals.items():
            got = {k: v for k, v in rec["evals"][step].items() if v is not None}
            assert got == pytest.approx(metrics, abs=1e-6, rel=0), (name, step)
        assert rec["data_digest"][:16] == digest


def test_old_setting_names_still_work_with_a_warning(tmp_path, caplog):
    """lr / steps / seeds (before issue 12) are accepted for one release, from a config file and as flags, each with a
    one-line warning naming the new name; a file's old name still wins over the preset's new one."""
    from knnlm.cli import build_parser

    train = _text_files(tmp_path)
    cfg = tmp_path / "old.yaml"
    cfg.write_text(f"preset: cpu\ndata: {train}\nsteps: 250\nlr: 2.0e-3\n")
    with caplog.at_level("WARNING"):
        a = resolve_args({"output_dir": str(tmp_path / "o"), "seeds": 2}, str(cfg))
    assert (a.max_steps, a.learning_rate, a.num_seeds) == (250, 2e-3, 2)
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 3 and any("steps is deprecated, use max_steps" in m for m in warned)
    assert any("lr is deprecated, use learning_rate" in m for m in warned)
    ns = build_parser().parse_args(["hurdle", "run", "--steps", "12", "--lr", "0.01", "--output_dir", "o"])
    assert (ns.max_steps, ns.learning_rate) == ("12", "0.01")
    with pytest.raises(KnnlmError, match="both steps .deprecated. and max_steps"):
        resolve_args({"output_dir": str(tmp_path / "o"), "steps": 5, "max_steps": 6})


def test_a_folder_written_before_issue_12_resumes_to_the_same_numbers(tmp_path, caplog):
    """Old run folders (seed<s>-<model>.json records, a seed<s>-<model>.pt checkpoint of the hurdle's own loop, a
    config.json with lr/steps/seeds) resume: finished records are read, the old checkpoint's run restarts (seeded: the
    same numbers), and the old setting names count as the new ones in the resume check."""
    train = _text_files(tmp_path)
    args = _args(tmp_path, data=str(train), max_steps=4)
    whole = run_study(args)["metrics"]
    out, runs = tmp_path / "out", tmp_path / "out" / "runs"
    for p in runs.glob("seed-0-*.json"):
        p.rename(runs / p.name.replace("seed-0-", "seed0-"))
    for p in runs.glob("seed-1-*.json"):
        p.unlink()
    (runs / "seed1-without_last_mlp.pt").write_bytes(b"a checkpoint of the earlier loop")
    config = json.loads((out / "config.json").read_text())
    for old, new in (("lr", "learning_rate"), ("steps", "max_steps"), ("seeds", "num_seeds")):
        config[old] = config.pop(new)
    (out / "config.json").write_text(json.dumps(config))
    kept = pin_mtimes(runs.glob("seed0-*.json"))
    assert len(kept) == len(MODELS)
    with caplog.at_level("WARNING"):
        resumed = run_study(args)["metrics"]
    assert _strip_timing(resumed) == _strip_timing(whole)
    assert file_stamps(runs.glob("seed0-*.json")) == kept  # read, not retrained
    assert not (runs / "seed1-without_last_mlp.pt").exists() and (runs / "seed-1-without_last_mlp.json").is_file()
    assert any("earlier training loop" in r.getMessage() for r in caplog.records)
    with pytest.raises(KnnlmError, match="learning_rate: 0.003 -> 0.01"):  # an old config's lr is compared as learning_rate
        run_study(_args(tmp_path, data=str(train), max_steps=4, learning_rate=1e-2))


def test_each_seed_names_its_device_and_a_mixed_study_says_so(tmp_path):
    """`device` may change on a resume (it is not a setting the results must match), but the numerics differ (TF32,
    the fused AdamW on a GPU): each seed's record names its device and the study lists every device its seeds ran on
    (it named the last run's device for all of them)."""
    train = _text_files(tmp_path)
    args = _args(tmp_path, data=str(train), num_seeds=1, max_steps=4)
    assert run_study(args)["metrics"]["device"] == "cpu"
    record = tmp_path / "out" / "runs" / "seed-0-without_first_mlp.json"
    assert json.loads(record.read_text())["device"] == "cpu"
    edited = json.loads(record.read_text())
    edited["device"] = "cuda"  # as if this seed had run on a GPU before the study was resumed here
    record.write_text(json.dumps(edited))
    assert run_study(args)["metrics"]["device"] == "cpu,cuda"


def test_a_seed_checkpointed_before_devices_were_recorded_resumes(tmp_path, monkeypatch):
    """A seed killed mid-training by the version before seeds named their device: its checkpointed record has no
    device, and the resumed run trained to the end and then raised KeyError (and again on every rerun)."""
    import knnlm.train

    train = _text_files(tmp_path)
    real_save = knnlm.train._save_checkpoint

    def killed_after(ckpt_dir, *a):
        real_save(ckpt_dir, *a)
        if ckpt_dir.name == "seed-0-without_last_mlp" and a[-2].step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(knnlm.train, "_save_checkpoint", killed_after)
    args = _args(tmp_path, data=str(train), num_seeds=1)
    with pytest.raises(KeyboardInterrupt):
        run_study(args)
    ckpt = tmp_path / "out" / "runs" / "seed-0-without_last_mlp"
    state = ckpt / json.loads((ckpt / "latest.json").read_text())["dir"] / "state.pt"
    payload = torch.load(state, weights_only=False)
    del payload["state"]["extra"]["record"]["device"]  # as the earlier version checkpointed it
    torch.save(payload, state)
    monkeypatch.setattr(knnlm.train, "_save_checkpoint", real_save)
    metrics = run_study(args)["metrics"]
    record = json.loads((tmp_path / "out" / "runs" / "seed-0-without_last_mlp.json").read_text())
    assert record["device"] == "unrecorded,cpu" and metrics["device"] == "cpu,unrecorded"
