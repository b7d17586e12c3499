"""Early stopping in the shared training loop: the patience rule on a hand-made validation curve, the best weights kept,
a killed run resumed to the same result, and off by default (the resume key of every earlier run unchanged)."""
import copy
import json
import math

import pytest
import torch
from test_train import Killed, loss_on, sentence_batches, sentences, strip_time, tiny_model

from knnlm.errors import KnnlmError
from knnlm.train import TrainArgs, train

torch.set_num_threads(1)


def _scripted(curve: dict, snapshots: dict):
    """on_eval returning ``val_loss`` = log(curve[step]) (a perplexity by hand) and keeping each step's weights."""
    def on_eval(step, model):
        snapshots[step] = copy.deepcopy(model.state_dict())
        return {"val_loss": math.log(curve[step])}
    return on_eval


def _args(**kw):
    return TrainArgs(**{"learning_rate": 3e-3, "warmup_ratio": 0.0, "max_steps": 20, "seed": 0,
                        "early_stopping_patience": 2, "early_stopping_min_delta": 0.005, **kw})


def _same_weights(model, state_dict) -> bool:
    got = model.state_dict()
    return all(torch.equal(got[k], state_dict[k]) for k in state_dict)


def test_patience_rule_on_a_hand_made_curve(tmp_path):
    # perplexity 100 -> 90 (10% better: an improvement) -> 89.8 (0.22% better: the new best, but < 0.5%: 1 against the
    # patience) -> 89.9 (worse: 2 against it) => stop at step 6, keep step 4's weights
    curve = {0: 100.0, 2: 90.0, 4: 89.8, 6: 89.9, 8: 1.0}
    snaps = {}
    model = tiny_model(seed=1)
    hist = train(model, sentence_batches(sentences(10)), _args(), tmp_path, eval_every=2,
                 on_eval=_scripted(curve, snaps))
    assert [h["step"] for h in hist] == [0, 2, 4, 6]
    assert [h["best_step"] for h in hist] == [0, 2, 4, 4]
    assert [h["evals_without_improvement"] for h in hist] == [0, 0, 1, 2]
    assert [h["stopped_early"] for h in hist] == [False, False, False, True]
    assert _same_weights(model, snaps[4]) and not _same_weights(model, snaps[6])
    assert not model.training
    assert json.loads((tmp_path / "latest.json").read_text()) == {"dir": "step-6", "step": 6, "done": True}

    # a rerun of the finished run trains nothing and hands back the same best weights
    again = tiny_model(seed=1)
    assert strip_time(train(again, sentence_batches(sentences(10)), _args(), tmp_path, eval_every=2,
                            on_eval=_scripted(curve, {}))) == strip_time(hist)
    assert _same_weights(again, snaps[4])


def test_an_exact_half_percent_counts_and_patience_one(tmp_path):
    # 100 -> 99.5 is exactly 0.5% (an improvement: >= min_delta); 99.5 -> 99.1 is 0.40% (not one): patience 1 stops
    curve = {0: 100.0, 5: 99.5, 10: 99.1, 15: 50.0, 20: 40.0}
    snaps = {}
    model = tiny_model(seed=1)
    hist = train(model, sentence_batches(sentences(10)), _args(early_stopping_patience=1), tmp_path, eval_every=5,
                 on_eval=_scripted(curve, snaps))
    assert [(h["step"], h["best_step"], h["stopped_early"]) for h in hist] == [(0, 0, False), (5, 5, False),
                                                                              (10, 10, True)]
    assert _same_weights(model, snaps[10])  # the lowest loss is kept even when its drop was too small to count


def test_patience_running_out_at_the_last_step_is_not_an_early_stop(tmp_path):
    curve = {0: 100.0, 2: 120.0, 4: 130.0}
    snaps = {}
    model = tiny_model(seed=1)
    hist = train(model, sentence_batches(sentences(10)), _args(max_steps=4), tmp_path, eval_every=2,
                 on_eval=_scripted(curve, snaps))
    assert [h["step"] for h in hist] == [0, 2, 4] and hist[-1]["stopped_early"] is False
    assert hist[-1]["best_step"] == 0 and _same_weights(model, snaps[0])


def test_a_rising_validation_loss_stops_at_patience_with_the_initial_weights(tmp_path):
    """A real curve: lr 0.3 throws the tiny model off its random-init optimum (~uniform over 48 tokens)."""
    seqs = sentences(10)
    init = copy.deepcopy(tiny_model(seed=1).state_dict())
    model = tiny_model(seed=1)
    args = _args(learning_rate=0.3, max_steps=40)
    hist = train(model, sentence_batches(seqs), args, tmp_path, eval_every=2,
                 on_eval=lambda step, m: {"val_loss": loss_on(seqs[5:])(step, m)["loss_all"]})
    losses = [h["val_loss"] for h in hist]
    assert losses[0] == pytest.approx(math.log(48), abs=0.15) and min(losses[1:]) > losses[0]
    assert [h["step"] for h in hist] == [0, 2, 4] and hist[-1]["stopped_early"] and hist[-1]["best_step"] == 0
    assert _same_weights(model, init)


def _killable(tmp_path, name, args, curve, kill_after=None):
    read = [0]

    def on_yield():
        read[0] += 1
        if kill_after is not None and read[0] > kill_after:
            raise Killed

    model = tiny_model(seed=1)
    try:
        hist = train(model, sentence_batches(sentences(10), 2, on_yield), args, tmp_path / name, eval_every=3,
                     on_eval=lambda step, m: {"val_loss": math.log(curve[step]),
                                              "real": loss_on(sentences(4))(step, m)["loss_all"]})
    except Killed:
        hist = None
    return model, hist


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    curve = {0: 100.0, 3: 80.0, 6: 79.9, 9: 70.0, 12: 69.9, 15: 69.95, 18: 10.0}
    args = _args(max_steps=30, checkpoint_every=4)
    ref_model, ref_hist = _killable(tmp_path, "ref", args, curve)
    assert [h["step"] for h in ref_hist] == [0, 3, 6, 9, 12, 15] and ref_hist[-1]["stopped_early"]
    assert ref_hist[-1]["best_step"] == 12
    # one micro-batch a step: killed reading micro-batch 14 (step 12 done: best.pt and the checkpoint of step 12 written)
    _, hist = _killable(tmp_path, "run", args, curve, kill_after=13)
    assert hist is None and json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 12
    model, hist = _killable(tmp_path, "run", args, curve)
    assert strip_time(hist) == strip_time(ref_hist) and _same_weights(model, ref_model.state_dict())


def test_off_by_default_changes_nothing(tmp_path):
    plain = TrainArgs(learning_rate=3e-3, max_steps=4, seed=0)
    assert "early_stopping_patience" not in plain.resume_key()  # checkpoints and run keys from before still resume
    assert {"early_stopping_patience", "early_stopping_min_delta"} <= set(_args().resume_key())
    model = tiny_model(seed=1)
    hist = train(model, sentence_batches(sentences(10)), plain, tmp_path, eval_every=2,
                 on_eval=lambda step, m: {"val_loss": 1.0})
    assert [h["step"] for h in hist] == [0, 2, 4] and "best_step" not in hist[-1]
    assert not (tmp_path / "best.pt").exists()


def test_bad_settings_and_a_missing_metric_are_refused(tmp_path):
    with pytest.raises(KnnlmError, match="--early_stopping_patience: must be >= 1"):
        _args(early_stopping_patience=0).validate()
    with pytest.raises(KnnlmError, match="--early_stopping_min_delta: must be in"):
        _args(early_stopping_min_delta=1.5).validate()
    with pytest.raises(KnnlmError, match="records no 'val_loss'"):
        train(tiny_model(), sentence_batches(sentences(4)), _args(), tmp_path, eval_every=2,
              on_eval=lambda step, m: {"acc": 1.0})
