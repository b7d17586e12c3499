"""A run's own JSON record that is valid JSON but not an object (``[]``: cut, or overwritten by hand) is a one-line
error naming the file and the fix when a rerun reads it back, not an internal TypeError / AttributeError."""
import json

import test_faults  # noqa: F401  (its fixtures)
from test_faults import assert_one_line, cli, files  # noqa: F401

HURDLE_TEXT = ["hurdle", "run", "--size", "tiny", "--max_steps", 2, "--eval_every", 1, "--num_seeds", 1, "--device",
               "cpu", "--block_size", 32, "--batch_size", 2]
OVERSPEC_TINY = ["overspec", "run", "--model_name_or_path", "tiny", "--seeds", 0, "--num_villagers", 12,
                 "--num_parents", 5, "--max_children", 5, "--examples_per_child", 1, "--epochs", 2, "--eval_every", 4,
                 "--learning_rate", "1e-3", "--eval_batch_size", 16, "--device", "cpu", "--mlp_memory", "false"]
FIX = "delete it to train that run again, or pass another --output_dir"


def test_hurdle_seed_record_that_is_not_an_object_names_it(files, tmp_path, capsys):
    """Before: internal error (TypeError: list indices must be integers or slices, not str), exit 1."""
    out = tmp_path / "h"
    argv = [*HURDLE_TEXT, "--data", files / "a.txt", "--validation_file", files / "b.txt", "--output_dir", out]
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    record = out / "runs" / "seed-0-with_last_mlp.json"
    before = json.loads(record.read_text())
    record.write_text("[]")
    assert_one_line(*cli(argv, capsys), f"{record} is corrupt (not a JSON object: [])", FIX)
    record.unlink()  # the fix it gives: that run is trained again, to the same numbers (it is seeded)
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    again = json.loads(record.read_text())
    assert again["evals"] == before["evals"] and again["data_digest"] == before["data_digest"]


def test_overspec_seed_history_that_is_not_an_object_names_it(tmp_path, capsys):
    """Before: internal error (TypeError: list indices must be integers or slices, not str), exit 1."""
    out = tmp_path / "o"
    argv = [*OVERSPEC_TINY, "--output_dir", out]
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    history = out / "seed-0" / "history.json"
    before = json.loads(history.read_text())
    history.write_text("[]")
    assert_one_line(*cli(argv, capsys), f"{history} is corrupt (not a JSON object: [])", FIX)
    history.unlink()
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    again = json.loads(history.read_text())
    assert again["steps"] == before["steps"] == 8 and again["n_train"] == before["n_train"]
    assert [h["test_lm"] for h in again["history"]] == [h["test_lm"] for h in before["history"]]


def test_mlp_train_into_its_memory_whose_train_json_is_damaged(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: `[]` was an internal error (TypeError: pop expected at most 1 argument, got 2), exit 1; a cut file was
    "delete it or rebuild what it belongs to", and deleting it was an internal FileNotFoundError."""
    from test_faults import build_ds

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    mem = tmp_path / "mem"
    argv = ["mlp", "train", "--model_name_or_path", tiny_gpt2_dir, "--device", "cpu", "--datastore", ds.dir,
            "--output_dir", mem, "--max_steps", 1, "--hidden_size", 8]
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    log = mem / "train.json"
    before = json.loads(log.read_text())
    for damage, why in (("[]", "not a JSON object: []"), ('{"steps": ', "not valid JSON"), (None, "is missing")):
        log.unlink(missing_ok=True)
        if damage is not None:
            log.write_text(damage)
        assert_one_line(*cli(argv, capsys), f"--output_dir: {mem} holds this memory but it is damaged ({log}", why,
                        "rerun with --overwrite to train it again")
    rc, err = cli([*argv, "--overwrite", "true"], capsys)
    assert rc == 0, err
    again = json.loads(log.read_text())
    assert again["steps"] == before["steps"] == 1 and again["first_loss"] == before["first_loss"]


def test_lm_train_into_its_finished_model_with_damaged_records(files, tmp_path, capsys):
    """Before: a rerun into a finished model folder whose results.json was `[]`, cut short, lacked its metrics or was
    gone said "already holds this model" and exited 0, pointing at that results.json; a training.json of `[]` was
    "holds a model trained with other settings", and a cut one was refused even with --overwrite."""
    out = tmp_path / "lm"
    argv = ["lm", "train", "--size", "tiny", "--max_steps", 1, "--block_size", 32, "--batch_size", 2, "--train_file",
            files / "a.txt", "--validation_file", files / "b.txt", "--output_dir", out]
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    results, training = out / "results.json", out / "training.json"
    val_ppl = json.loads(results.read_text())["metrics"]["val_ppl"]
    fix = "pass --overwrite true to train the model again, or another --output_dir"
    for damage, why in (("[]", f"{results} is corrupt (not a JSON object: [])"),
                        ('{"metrics": ', f"{results} is corrupt (not valid JSON"),
                        ('{"config": {}}', f"{results} is corrupt (no 'metrics' record)"),
                        (None, f"--output_dir: {out} holds this model but its results.json is missing")):
        results.unlink(missing_ok=True)
        if damage is not None:
            results.write_text(damage)
        assert_one_line(*cli(argv, capsys), why, fix)
    training.write_text("[]")
    assert_one_line(*cli(argv, capsys), f"{training} is corrupt (not a JSON object: [])", fix)
    training.write_text('{"run_key": ')
    assert_one_line(*cli(argv, capsys), f"{training} is corrupt (not valid JSON", fix)
    rc, err = cli([*argv, "--overwrite", "true"], capsys)  # trains it again: the same seeded model
    assert rc == 0, err
    assert json.loads(results.read_text())["metrics"]["val_ppl"] == val_ppl
    assert json.loads(training.read_text())["val_ppl"] == val_ppl
    rc, err = cli(argv, capsys)  # finished again: nothing to do
    assert rc == 0, err
