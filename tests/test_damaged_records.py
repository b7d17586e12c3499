"""A run's own JSON record that is valid JSON but not an object (``[]``: cut, or overwritten by hand) is a one-line
error naming the file and the fix when a rerun reads it back, not an internal TypeError / AttributeError."""
import json
import shutil

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


def test_study_settings_record_that_is_not_an_object_names_it(tmp_path):
    """Before: `[1]` was an internal TypeError (dict() of a list); `[]` was read as a run of every default setting."""
    import pytest

    from knnlm.errors import KnnlmError
    from knnlm.experiments.hurdle.settings import HurdleArgs
    from knnlm.experiments.study import check_resumable

    out = tmp_path / "h"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "seed-0-with_last_mlp.json").write_text("{}")  # the run did work: its settings are checked
    for damage in ("[1]", "[]"):
        (out / "config.json").write_text(damage)
        with pytest.raises(KnnlmError, match=r"config.json is corrupt \(not a JSON object: \[1?\]\); .*pass a new "
                                             r"--output_dir"):
            check_resumable(out, HurdleArgs(output_dir=str(out)), ())


def test_reproduce_records_that_are_not_objects_name_them(tmp_path):
    """Before: internal TypeErrors (`before['scale']`, `timings[name] = ...`, `before["wall_s"]` of a list). Each
    fix it gives works: deleting a damaged times record runs on."""
    import pytest
    import yaml

    from knnlm.errors import KnnlmError
    from knnlm.experiments.reproduce import ReproduceArgs, run_stages

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"name": "a", "argv": ["eval", "--k", "4"]},
                                                 {"name": "b", "argv": ["eval", "--k", "8"]}]}))
    out = tmp_path / "out"
    args = ReproduceArgs(output_dir=str(out), recipe=str(recipe))
    ran = []
    assert set(run_stages(args, lambda argv: ran.append(argv) or 0)) == {"a", "b"}
    stages = out / "stages"
    (stages / "b.done").unlink()
    for name, needle in (("run.json", "pass another --output_dir"), ("timings.json", "delete it"),
                         ("runs.json", "delete it"), ("b.elapsed.json", "delete it")):
        kept = (stages / name).read_text() if (stages / name).exists() else None
        (stages / name).write_text("[]")
        with pytest.raises(KnnlmError, match=rf"{stages / name} is corrupt \(not a JSON object: \[\]\); .*{needle}"):
            run_stages(args, lambda argv: ran.append(argv) or 0)
        if kept is None:
            (stages / name).unlink()
        else:
            (stages / name).write_text(kept)
    (stages / "timings.json").unlink()  # the fix it gives: the stages' times start over
    assert run_stages(args, lambda argv: ran.append(argv) or 0).keys() == {"b"}
    assert [a[-1] for a in ran] == ["4", "8", "8"]


def test_init_from_a_model_whose_training_json_is_not_an_object(files, tmp_path, capsys):
    """Before: with --lr_from_init an internal AttributeError ('list' object has no attribute 'get'); without it the
    record was never read (beside weights, the folder was taken for a finished `lm train` model)."""
    init = tmp_path / "init"
    init.mkdir()
    (init / "training.json").write_text("[]")
    argv = ["lm", "train", "--size", "tiny", "--max_steps", 1, "--block_size", 32, "--batch_size", 2, "--train_file",
            files / "a.txt", "--validation_file", files / "b.txt", "--output_dir", tmp_path / "lm", "--init_from", init]
    for extra in (["--lr_from_init", "true"], []):
        assert_one_line(*cli([*argv, *extra], capsys),
                        f"--init_from: {init / 'training.json'} is corrupt (not a JSON object: [])",
                        "pass a folder `knnlm lm train` finished")
    assert not (tmp_path / "lm").exists()


def test_memory_study_own_data_check_names_a_damaged_training_json(tmp_path):
    """Before: internal TypeError (list indices must be integers or slices, not str)."""
    import pytest

    from knnlm.errors import KnnlmError
    from knnlm.experiments.memory.check import own_data_check

    lm, ds = tmp_path / "lm", tmp_path / "ds"
    lm.mkdir()
    ds.mkdir()
    (lm / "training.json").write_text("[]")
    (ds / "meta.json").write_text("{}")
    with pytest.raises(KnnlmError, match=r"training.json is corrupt \(not a JSON object: \[\]\); train the model again"):
        own_data_check(lm, ds)


def test_index_build_over_a_progress_record_that_is_not_an_object_starts_over(tiny_gpt2_dir, files, tmp_path,
                                                                             capsys):
    """Before: internal AttributeError ('list' object has no attribute 'get'); a cut record already started over."""
    from test_faults import build_ds

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    (ds.dir / "index").mkdir()
    (ds.dir / "index" / "progress.json").write_text("[1]")
    rc, err = cli(["index", "build", ds.dir, "--factory", "Flat"], capsys)
    assert rc == 0, err
    info = json.loads((ds.dir / "index" / "index.json").read_text())
    assert info["factory"] == "Flat" and info["datastore"]["N"] == ds.N


def test_reproduce_report_over_a_damaged_stage_record_names_the_stage_to_run_again(tmp_path, capsys):
    """Before: `[]` in a stage's results.json (the eval's, or the memory study's LM's) or in its LM's training.json was
    an internal TypeError / AttributeError when the report read it. The fix it gives (delete the stage's folder and its
    .done marker) runs that stage again, and the report is as before."""
    import shutil
    from pathlib import Path

    import yaml

    from knnlm.experiments.reproduce import ReproduceArgs, run_stages

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "stages": [{"name": "train", "argv": ["lm", "train", "--output_dir", "{out}/lm"]},
                   {"name": "eval", "argv": ["eval", "--k", "4", "--output_dir", "{out}/e"]}],
        "report": {"studies": [{"study": "memory", "folder": "e", "label": "x", "lm": "lm",
                                "converged": "annealed"}]}}))
    out = tmp_path / "out"
    args = ReproduceArgs(output_dir=str(out), recipe=str(recipe))
    records = {"lm": {"results.json": {"config": {"lr_scheduler_type": "linear"}, "metrics": {"steps": 4}},
                      "training.json": {"history": [{"step": 4, "lr": 0.0}]}},
               "e": {"results.json": {"metrics": {"ppl_lm": 20.0, "ppl_knnlm": 17.0, "ppl_mlplm": 18.0}}}}
    ran = []

    def run(argv):  # each stage's command: writes its folder's records
        folder = Path(argv[-1])
        ran.append(folder.name)
        folder.mkdir(parents=True, exist_ok=True)
        for name, record in records[folder.name].items():
            (folder / name).write_text(json.dumps(record))
        return 0

    report = ["reproduce", "--report_only", "true", "--recipe", recipe, "--output_dir", out, "--data_dir", tmp_path]
    run_stages(args, run)
    rc, err = cli(report, capsys)
    assert rc == 0, err
    before = json.loads((out / "results.json").read_text())
    assert before["claims"] and before["metrics"]["tables"]["table2"][1][:4] == ["x", 20.0, 17.0, 18.0]
    for folder, name, stage in (("e", "results.json", "eval"), ("lm", "results.json", "train"),
                                ("lm", "training.json", "train")):
        (out / folder / name).write_text("[]")
        marker = out / "stages" / f"{stage}.done"
        assert_one_line(*cli(report, capsys), f"{out / folder / name} is corrupt (not a JSON object: [])",
                        f"delete {out / folder} and {marker}, then rerun `knnlm reproduce`")
        shutil.rmtree(out / folder)  # the fix it gives
        marker.unlink()
        ran.clear()
        run_stages(args, run)
        assert ran == [folder]  # that stage alone ran again
        rc, err = cli(report, capsys)
        assert rc == 0, err
        again = json.loads((out / "results.json").read_text())
        assert again["claims"] == before["claims"] and again["metrics"]["tables"] == before["metrics"]["tables"]


def test_overspec_resumed_seed_over_a_damaged_evaluation_point_names_it(tmp_path, capsys, monkeypatch):
    """Before: a seed resumed from its checkpoint read back the points scored before it (seed-S/evals/step-N.json)
    unchecked: `[]` was an internal TypeError (list indices must be integers or slices, not str), exit 1; a missing one
    an OSError naming no fix. The fix it gives (delete the point and the checkpoint) trains the seed again from step
    0."""
    from knnlm.errors import KnnlmError
    from knnlm.experiments.overspec import run as overspec_run

    out = tmp_path / "o"
    argv = [*OVERSPEC_TINY, "--output_dir", out]
    real = overspec_run.evaluate_point

    def killed_at_the_last_point(*a, last=True, **kw):
        if last:
            raise KnnlmError("killed")
        return real(*a, last=last, **kw)

    monkeypatch.setattr(overspec_run, "evaluate_point", killed_at_the_last_point)
    assert cli(argv, capsys)[0] == 2  # stopped after the step-4 point and its checkpoint
    monkeypatch.setattr(overspec_run, "evaluate_point", real)
    seed, point = out / "seed-0", out / "seed-0" / "evals" / "step-0000000.json"
    assert (seed / "ckpt").is_dir() and not (seed / "history.json").exists()
    before = json.loads(point.read_text())
    fix = f"delete it and the checkpoint {seed / 'ckpt'}: seed 0 is then trained again from step 0"
    point.write_text("[]")
    assert_one_line(*cli(argv, capsys), f"{point} is corrupt (not a JSON object: [])", fix)
    point.write_text('{"step": 0}')  # an object without its scores (before: an internal KeyError)
    assert_one_line(*cli(argv, capsys), f"{point} is corrupt (no 'splits' field)", fix)
    point.unlink()
    assert_one_line(*cli(argv, capsys), f"{point} is missing", f"delete the checkpoint {seed / 'ckpt'}")
    shutil.rmtree(seed / "ckpt")  # the fix it gives (the point is deleted already)
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    history = json.loads((seed / "history.json").read_text())
    assert [h["step"] for h in history["history"]] == [0, 4, 8]
    assert history["history"][0]["splits"] == json.loads(point.read_text())["splits"] == before["splits"]


def test_hurdle_seed_record_without_its_fields_names_them(files, tmp_path, capsys):
    """Before: `{}` in a finished run's record was an internal KeyError ('evals') when the seeds were aggregated."""
    out = tmp_path / "h"
    argv = [*HURDLE_TEXT, "--data", files / "a.txt", "--validation_file", files / "b.txt", "--output_dir", out]
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    record = out / "runs" / "seed-0-with_last_mlp.json"
    before = json.loads(record.read_text())
    record.write_text('{"seed": 0}')
    assert_one_line(*cli(argv, capsys), f"{record} is corrupt (no 'evals', 'curve', 'data_digest' fields)", FIX)
    record.unlink()  # the fix it gives
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    again = json.loads(record.read_text())
    assert again["evals"] == before["evals"] and again["data_digest"] == before["data_digest"]


def test_reproduce_records_without_their_fields_name_them(tmp_path):
    """Before: `{}` in stages/<stage>.elapsed.json or stages/run.json was an internal KeyError ('wall_s', 'scale'). The
    fixes they give work: a deleted times record runs on."""
    import pytest
    import yaml

    from knnlm.errors import KnnlmError
    from knnlm.experiments.reproduce import ReproduceArgs, run_stages

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"name": "a", "argv": ["eval", "--k", "4"]}]}))
    out = tmp_path / "out"
    args = ReproduceArgs(output_dir=str(out), recipe=str(recipe))
    ran = []
    run_stages(args, lambda argv: ran.append(argv) or 0)
    stages = out / "stages"
    (stages / "a.done").unlink()
    (stages / "a.elapsed.json").write_text('{"runs": 1}')
    with pytest.raises(KnnlmError, match=rf"{stages / 'a.elapsed.json'} is corrupt \(no 'wall_s' field\); delete it"):
        run_stages(args, lambda argv: ran.append(argv) or 0)
    (stages / "a.elapsed.json").unlink()
    kind = (stages / "run.json").read_text()
    (stages / "run.json").write_text("{}")
    with pytest.raises(KnnlmError, match=rf"{stages / 'run.json'} is corrupt \(no 'scale', 'smoke' fields\); .*pass "
                                         "another --output_dir"):
        run_stages(args, lambda argv: ran.append(argv) or 0)
    (stages / "run.json").write_text(kind)
    assert run_stages(args, lambda argv: ran.append(argv) or 0).keys() == {"a"} and len(ran) == 2
    assert json.loads((stages / "runs.json").read_text()) == {"a": 1}  # the deleted record's run is not counted


def test_mlp_train_into_its_memory_whose_train_json_lacks_its_fields(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: the memory's check passed a train.json without its fields: a rerun of the CLI summarised it (exit 0),
    and overspec, which keeps the loss curve of a memory it finds trained, failed with an internal KeyError. Now: the
    damaged-memory line, and --overwrite trains it again."""
    from test_faults import build_ds

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    mem = tmp_path / "mem"
    argv = ["mlp", "train", "--model_name_or_path", tiny_gpt2_dir, "--device", "cpu", "--datastore", ds.dir,
            "--output_dir", mem, "--max_steps", 1, "--hidden_size", 8]
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    log = mem / "train.json"
    before = json.loads(log.read_text())
    log.write_text(json.dumps({k: v for k, v in before.items() if k != "loss_curve"}))
    assert_one_line(*cli(argv, capsys), f"--output_dir: {mem} holds this memory but it is damaged ({log} is corrupt "
                    "(no 'loss_curve' field)", "rerun with --overwrite to train it again")
    rc, err = cli([*argv, "--overwrite", "true"], capsys)
    assert rc == 0, err
    assert json.loads(log.read_text())["loss_curve"] == before["loss_curve"]


def test_the_rerun_advice_names_the_marker_of_the_stage_that_writes_the_folder(tmp_path):
    """A marker matched the folder by the end of its --output_dir as readily as by the folder itself, so the advice
    for OUT/ds named whichever marker sorted first: a.done, whose stage writes OUT/lm/ds."""
    from knnlm.experiments.study import rerun_stage_fix

    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "a.done").write_text(f"datastore build --output_dir {out.resolve()}/lm/ds\n")
    (out / "stages" / "b.done").write_text(f"datastore build --output_dir {out.resolve()}/ds\n")
    assert str(out / "stages" / "b.done") in rerun_stage_fix(out, "ds")
    assert str(out / "stages" / "a.done") in rerun_stage_fix(out, "lm/ds")
