"""Bad command lines through the real CLI: each is one ``knnlm: error:`` line naming the flag or file and the fix, exit
2, no traceback, no output that looks finished and nothing of the user's lost (the helpers are test_faults')."""
import pytest
from test_faults import assert_one_line, build_ds, cli, files, model_args  # noqa: F401 -- files is a fixture

LM_TRAIN = ["--size", "tiny", "--block_size", 32, "--batch_size", 2, "--max_steps", 2, "--eval_every", 2,
            "--eval_tokens", 64]


@pytest.mark.parametrize("flag,value,needle", [
    ("--learning_rate", "inf", "finite number > 0"),  # before: exit 0, a NaN model and "validation perplexity nan"
    ("--learning_rate", "nan", "finite number > 0"),  # before: internal error (torch's ValueError), exit 1
    ("--adam_beta1", "1.0", "[0, 1)"),
    ("--adam_beta2", "-0.1", "[0, 1)"),
    ("--adam_epsilon", "-1", "finite number >= 0"),
    ("--weight_decay", "nan", "finite number >= 0"),
])
def test_lm_train_optimizer_settings_are_checked_before_the_folder_is_made(flag, value, needle, files, tmp_path,
                                                                           capsys):
    out = tmp_path / "lm"
    rc, err = cli(["lm", "train", "--train_file", files / "a.txt", "--validation_file", files / "b.txt",
                   "--output_dir", out, *LM_TRAIN, flag, value], capsys)
    assert_one_line(rc, err, flag, needle)
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--learning_rate", "inf"), ("--weight_decay", "nan")])
def test_mlp_train_non_finite_settings_are_refused(flag, value, tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: exit 0 and a finished-looking memory with NaN weights (final_loss null)."""
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    out = tmp_path / "mem"
    rc, err = cli(["mlp", "train", *model_args(tiny_gpt2_dir), "--datastore", ds.dir, "--output_dir", out,
                   "--max_steps", 2, "--hidden_size", 16, flag, value], capsys)
    assert_one_line(rc, err, flag, "finite number")
    assert not out.exists()


def test_mlp_train_into_its_own_damaged_memory_says_overwrite_and_overwrite_retrains(tiny_gpt2_dir, files, tmp_path,
                                                                                     capsys):
    """Before: a rerun into a finished memory whose weights were truncated or deleted said "--mlp_memory: ... cannot
    be read; retrain the memory" (a flag mlp train does not have), and --overwrite gave the same error, so the memory
    could not be retrained in that folder."""
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    out = tmp_path / "mem"
    train = ["mlp", "train", *model_args(tiny_gpt2_dir), "--datastore", ds.dir, "--output_dir", out, "--max_steps", 2,
             "--hidden_size", 16]
    assert cli(train, capsys)[0] == 0
    good = (out / "memory.safetensors").read_bytes()
    for damage in (lambda p: p.write_bytes(good[:100]), lambda p: p.unlink()):
        damage(out / "memory.safetensors")
        line = assert_one_line(*cli(train, capsys), "--output_dir", str(out), "memory.safetensors", "--overwrite")
        assert "--mlp_memory" not in line
        rc, err = cli([*train, "--overwrite"], capsys)
        assert rc == 0, err
        assert (out / "memory.safetensors").read_bytes() == good  # seeded: the same memory as the first training
        assert cli(train, capsys)[0] == 0


@pytest.mark.parametrize("cmd,flag", [
    (["analyze", "projection", "--validation_file", "{a}", "--datastore", "{ds}"], "--learning_rate"),
    (["overspec", "run"], "--mlp_learning_rate"),
    (["overspec", "run"], "--learning_rate"),
    (["hurdle", "run"], "--learning_rate"),
])
def test_study_learning_rates_must_be_finite(cmd, flag, tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: `analyze projection --learning_rate inf` exited 0 with results.json (the solver never moved z: lr
    recorded as null, ppl_proj = ppl_lm); overspec's --mlp_learning_rate inf would train NaN memories."""
    if "--datastore" in cmd:
        build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    cmd = [c.format(a=files / "a.txt", ds=tmp_path / "ds") for c in cmd]
    model = [] if cmd[0] == "hurdle" else model_args(tiny_gpt2_dir)
    out = tmp_path / "out"
    assert_one_line(*cli([*cmd, *model, "--output_dir", out, flag, "inf"], capsys), flag, "finite number > 0")
    assert not out.exists()
