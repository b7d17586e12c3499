"""`knnlm reproduce`: stages run in order through the real CLI, finished stages are skipped, a failure resumes, and the
report puts our numbers beside the paper's."""
import json

import pytest
import yaml

from knnlm.cli import main
from knnlm.errors import KnnlmError
from knnlm.experiments.reproduce import ReproduceArgs, run_stages, write_report

TRAIN = "the cat sat on the mat. the dog sat on the log. a cat and a dog sat together on a mat.\n" * 3
VALID = "the dog sat on the mat. a cat sat on the log.\n"


def _recipe(tmp_path, model_dir, k: str) -> str:
    recipe = {
        "stages": [
            {"name": "ds", "argv": ["datastore", "build", "--model_name_or_path", str(model_dir), "--train_file",
                                    "{data}/train.txt", "--output_dir", "{out}/ds"]},
            {"name": "eval", "argv": ["eval", "--model_name_or_path", str(model_dir), "--validation_file",
                                      "{data}/valid.txt", "--datastore", "{out}/ds", "--k", k, "--output_dir", "{out}/eval"]},
        ],
        "report": {"wikitext_models": [{"label": "tiny", "eval": "eval"}]},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.txt").write_text(TRAIN)
    (d / "valid.txt").write_text(VALID)
    return d


def test_stages_resume_and_report(tiny_gpt2_dir, data_dir, tmp_path):
    calls = []

    def run(argv):
        calls.append(argv[0])
        return main(argv)

    out = tmp_path / "out"
    bad = ReproduceArgs(output_dir=str(out), data_dir=str(data_dir), recipe=_recipe(tmp_path, tiny_gpt2_dir, "0"))
    with pytest.raises(KnnlmError, match="stage eval failed"):
        run_stages(bad, run)  # --k 0 is refused: the run stops at the eval stage
    assert calls == ["datastore", "eval"] and (out / "stages" / "ds.done").exists()
    assert not (out / "stages" / "eval.done").exists()

    good = ReproduceArgs(output_dir=str(out), data_dir=str(data_dir), recipe=_recipe(tmp_path, tiny_gpt2_dir, "4"))
    timings = run_stages(good, run)
    assert calls == ["datastore", "eval", "eval"]  # the finished datastore stage was skipped
    assert set(timings) == {"ds", "eval"}
    run_stages(good, run)
    assert calls == ["datastore", "eval", "eval"]  # everything finished: nothing runs

    report = write_report(good, timings)
    m = json.loads((out / "eval" / "results.json").read_text())["metrics"]
    res = json.loads((out / "results.json").read_text())
    paper_row, ours = res["metrics"]["table2"]
    assert paper_row[:4] == ["paper", 20.13, 16.92, 18.68]
    assert ours[:3] == ["tiny", m["ppl_lm"], m["ppl_knnlm"]]
    assert res["metrics"]["table2_macondo"] == [["paper (GPT-2 fine-tuned)", 19.66, 17.69, 10.76]]  # no overspec stage
    assert res["metrics"]["total_wall_s"] == pytest.approx(sum(timings.values()), abs=0.2)
    text = report.read_text()
    assert f"{m['ppl_knnlm']:.2f}" in text and "| total |" in text
    assert "n/a (stage not run)" in text  # no overspec stage in this recipe


def test_bad_arguments(tiny_gpt2_dir, data_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_gpt2_dir, "4")
    with pytest.raises(KnnlmError, match="--stages: unknown stage"):
        run_stages(ReproduceArgs(output_dir=str(tmp_path / "o"), data_dir=str(data_dir), recipe=recipe, stages=["nope"]),
                   main)
    with pytest.raises(KnnlmError, match="--data_dir"):
        run_stages(ReproduceArgs(output_dir=str(tmp_path / "o"), data_dir=str(tmp_path / "missing"), recipe=recipe), main)


def test_shipped_recipes_name_real_subcommands():
    """Every stage of the shipped recipes parses with the real CLI parser (no typo in a flag)."""
    from knnlm.cli import build_parser
    from knnlm.config import PRESETS_DIR

    parser = build_parser()
    for scale in ("cpu", "paper"):
        recipe = yaml.safe_load((PRESETS_DIR / f"reproduce-{scale}.yaml").read_text())
        for stage in recipe["stages"]:
            argv = [str(a).format(data="/d", out="/o") for a in stage["argv"]]
            parser.parse_args(argv)  # exits (SystemExit) on an unknown flag


def test_without_data_dir_wikitext_is_exported_from_datasets(tmp_path, monkeypatch):
    """No --data_dir: the scale's WikiText config is exported once to OUT/data (HF datasets stubbed: no hub here)."""
    import datasets

    from knnlm.experiments.reproduce import with_data_dir

    asked = []

    def load_dataset(name, config):
        asked.append((name, config))
        split = lambda lines: datasets.Dataset.from_dict({"text": lines})  # noqa: E731
        return datasets.DatasetDict({"train": split([" = A = \n", " the cat sat .\n"]), "validation": split([" b c\n"])})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = with_data_dir(ReproduceArgs(output_dir=str(tmp_path / "out"), scale="cpu"))
    assert args.data_dir == str(tmp_path / "out" / "data") and asked == [("wikitext", "wikitext-2-raw-v1")]
    assert (tmp_path / "out" / "data" / "train.txt").read_text() == " = A = \n the cat sat .\n"
    assert (tmp_path / "out" / "data" / "valid.txt").read_text() == " b c\n"
    with_data_dir(ReproduceArgs(output_dir=str(tmp_path / "out"), scale="cpu"))
    assert len(asked) == 1  # exported once

    def offline(name, config):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KnnlmError, match="--data_dir: not given, and HF datasets 'wikitext' \\(wikitext-103-raw-v1\\)"):
        with_data_dir(ReproduceArgs(output_dir=str(tmp_path / "paper"), scale="paper"))
