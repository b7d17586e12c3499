"""`knnlm lm train` for the memory study's controls: early stopping through the command (the saved model is the best
evaluation's, the record says so), --init_from (refusing another tokenizer), --train_only lm_head (every other tensor
bit-identical, untied) and --lr_from_init."""
import json

import numpy as np
import pytest
import torch
from test_train import TEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

from knnlm.cli import main
from knnlm.experiments.lm.data import perplexity


def _argv(tmp_path, out, *extra):
    return ["lm", "train", "--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"),
            "--size", "tiny", "--tokenizer", "bpe:280", "--block_size", "32", "--batch_size", "4",
            "--output_dir", str(tmp_path / out), *extra]


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "valid.txt").write_text(TEXT[:300], encoding="utf-8")
    return tmp_path


def _valid_ppl(folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return perplexity(model, np.asarray(tok(TEXT[:300])["input_ids"], dtype=np.int32), 32)["val_ppl"]


def test_early_stopping_keeps_the_best_model(texts, capsys):
    # lr 0.5 throws the model off its random init: step 0 stays the best, patience 1 stops at step 2 of 10
    assert main(_argv(texts, "es", "--max_steps", "10", "--eval_every", "2", "--learning_rate", "0.5",
                      "--warmup_ratio", "0", "--early_stopping_patience", "1", "--early_stopping_min_delta", "0.005")) == 0
    printed = capsys.readouterr().out
    assert "early stopping: stopped before the step cap; kept step 0" in printed
    assert " of the kept step 0; trained 2 steps (" in printed  # the perplexity is the kept step's
    rec = json.loads((texts / "es" / "training.json").read_text())
    assert [h["step"] for h in rec["history"]] == [0, 2] and rec["steps"] == 2
    assert rec["stopped_early"] and rec["best_step"] == 0
    assert rec["history"][1]["val_ppl"] > rec["history"][0]["val_ppl"] == rec["best_val_ppl"] == rec["val_ppl"]
    metrics = json.loads((texts / "es" / "results.json").read_text())["metrics"]
    assert (metrics["stopped_early"], metrics["best_step"], metrics["best_val_ppl"]) == (True, 0, rec["val_ppl"])
    assert _valid_ppl(texts / "es", texts) == pytest.approx(rec["val_ppl"], rel=1e-6)  # the saved model is step 0's

    # off (the default): the record says so, the kept model is the last step's
    assert main(_argv(texts, "plain", "--max_steps", "2", "--eval_every", "2", "--learning_rate", "5e-3")) == 0
    plain = json.loads((texts / "plain" / "training.json").read_text())
    assert (plain["stopped_early"], plain["best_step"]) == (False, 2) and "early_stopping_patience" not in plain["run_key"]


def test_output_layer_only_from_a_trained_lm(texts, capsys):
    assert main(_argv(texts, "base", "--max_steps", "4", "--eval_every", "2", "--learning_rate", "5e-3")) == 0
    base_rec = json.loads((texts / "base" / "training.json").read_text())
    head = ["--init_from", str(texts / "base"), "--train_only", "lm_head", "--warmup_ratio", "0", "--max_steps", "3",
            "--eval_every", "3"]
    # the base run ended its linear schedule: its learning rate 0 cannot be continued
    assert main(_argv(texts, "head", *head, "--lr_from_init", "true")) == 2
    assert "learning rate after its kept step 4 is 0.0" in capsys.readouterr().err
    assert main(_argv(texts, "head", *head, "--learning_rate", "1e-2")) == 0
    rec = json.loads((texts / "head" / "training.json").read_text())
    assert rec["n_trainable_parameters"] == 280 * 64 and rec["run_key"]["train_only"] == "lm_head"
    assert rec["run_key"]["init_sha256"] and rec["history"][-1]["val_ppl"] != base_rec["val_ppl"]

    base = AutoModelForCausalLM.from_pretrained(texts / "base").state_dict()
    head_model = AutoModelForCausalLM.from_pretrained(texts / "head")
    assert head_model.config.tie_word_embeddings is False
    head = head_model.state_dict()
    for name, t in base.items():
        if name != "lm_head.weight":
            assert torch.equal(head[name], t), name  # the body and the input embedding: bit-identical
    assert torch.equal(base["lm_head.weight"], base["transformer.wte.weight"])  # the base is tied
    assert not torch.equal(head["lm_head.weight"], head["transformer.wte.weight"])  # the control's head was trained
    assert head_model.lm_head.weight.data_ptr() != head_model.transformer.wte.weight.data_ptr()


def test_init_from_continues_at_the_kept_learning_rate(texts):
    assert main(_argv(texts, "es", "--max_steps", "10", "--eval_every", "2", "--learning_rate", "0.5",
                      "--warmup_ratio", "0", "--early_stopping_patience", "1")) == 0
    es = json.loads((texts / "es" / "training.json").read_text())
    assert es["best_step"] == 0
    kept_lr = es["history"][0]["lr"]
    assert kept_lr == 0.5  # kept step 0, no warm-up: the next step would have run at the peak
    assert main(_argv(texts, "ctrl", "--init_from", str(texts / "es"), "--lr_from_init", "true", "--warmup_ratio", "0",
                      "--max_steps", "2", "--eval_every", "2")) == 0
    ctrl = json.loads((texts / "ctrl" / "training.json").read_text())
    assert ctrl["train_args"]["learning_rate"] == kept_lr and ctrl["history"][0]["lr"] == kept_lr
    # step 0 of the control is the init model itself
    assert ctrl["history"][0]["val_ppl"] == pytest.approx(es["best_val_ppl"], rel=1e-6)


def test_init_from_refuses_another_tokenizer_and_shape(texts, capsys):
    assert main(_argv(texts, "base", "--max_steps", "1")) == 0
    capsys.readouterr()
    other_tok = _argv(texts, "x", "--init_from", str(texts / "base"), "--max_steps", "1")
    other_tok[other_tok.index("bpe:280")] = "bpe:300"
    assert main(other_tok) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init_from:" in err and "tokenizer (280 entries)" in err and "(300 entries)" in err
    other_size = _argv(texts, "y", "--init_from", str(texts / "base"), "--max_steps", "1")
    other_size[other_size.index("tiny")] = "small"
    assert main(other_size) == 2 and "not --size small with --block_size 32" in capsys.readouterr().err
    assert main(_argv(texts, "z", "--train_only", "lm_head", "--max_steps", "1")) == 2
    assert "--train_only: needs --init_from" in capsys.readouterr().err
    assert main(_argv(texts, "w", "--init_from", str(texts / "nowhere"), "--max_steps", "1")) == 2
    assert "holds no finished `knnlm lm train` model" in capsys.readouterr().err
