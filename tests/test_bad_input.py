"""Bad command lines through the real CLI: each is one ``knnlm: error:`` line naming the flag or file and the fix, exit
2, no traceback, no output that looks finished and nothing of the user's lost (the helpers are test_faults')."""
import pytest
import test_faults
from test_faults import assert_one_line, build_ds, cli, model_args

files = test_faults.files  # the corpora fixture, shared with test_faults

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


def test_a_damaged_memory_record_names_the_file_and_the_retraining(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: memory.json with hidden_size a string or without "d" was an internal error (TypeError, KeyError), and
    an unknown activation was reported as "--activation: ..." by eval, which has no such flag."""
    import json

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    mem = tmp_path / "mem"
    train = ["mlp", "train", *model_args(tiny_gpt2_dir), "--datastore", ds.dir, "--output_dir", mem, "--max_steps", 2,
             "--hidden_size", 16]
    assert cli(train, capsys)[0] == 0
    good = json.loads((mem / "memory.json").read_text())
    out = tmp_path / "ev"
    ev = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--block_size", 32,
          "--mlp_memory", mem, "--output_dir", out]
    for key, value, needle in (("hidden_size", "sixteen", "hidden_size is 'sixteen'"), ("d", None, "no 'd'"),
                               ("activation", "bogus", "activation 'bogus'"), ("vocab_size", True, "vocab_size is True")):
        record = {k: v for k, v in good.items() if k != key or value is not None}
        if value is not None:
            record[key] = value
        (mem / "memory.json").write_text(json.dumps(record))
        line = assert_one_line(*cli(ev, capsys), "--mlp_memory", str(mem / "memory.json"), needle,
                               "mlp train --overwrite")
        assert "--activation" not in line
        assert not out.exists()
    assert cli([*train, "--overwrite"], capsys)[0] == 0
    assert cli(ev, capsys)[0] == 0


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


def test_macondo_damaged_split_names_file_and_line_and_overwrite_regenerates_it(tiny_gpt2_dir, tmp_path, capsys):
    """Before: a truncated split was an internal error (JSONDecodeError, exit 1), a non-UTF-8 byte a message naming
    no file, a row without "prefix" a KeyError; and `macondo generate --overwrite` with the same settings kept the
    damaged file ("already holds this dataset")."""
    data = tmp_path / "village"
    gen = ["macondo", "generate", "--output_dir", data, "--num_villagers", 20, "--num_parents", 4]
    assert cli(gen, capsys)[0] == 0
    good = (data / "test.jsonl").read_bytes()
    score = ["macondo", "score", *model_args(tiny_gpt2_dir), "--data", data, "--split", "test", "--output_dir",
             tmp_path / "score"]
    for damaged, needle in ((good[:300], "test.jsonl:2 is not valid JSON"),
                            (good + '{"text": "caf\xe9"}\n'.encode("latin-1"), "test.jsonl:11 is not UTF-8 (byte 0xe9)"),
                            (good + b'{"text": "x"}\n', "test.jsonl:11 is not a Macondo row ('prefix'")):
        (data / "test.jsonl").write_bytes(damaged)
        assert_one_line(*cli(score, capsys), "--data", str(data), needle, "--overwrite")
        assert not (tmp_path / "score").exists()
        assert_one_line(*cli(gen, capsys), "--output_dir", "test.jsonl", "sha256", "--overwrite")
        assert (data / "test.jsonl").read_bytes() == damaged  # refused: nothing touched
    assert cli([*gen, "--overwrite"], capsys)[0] == 0
    assert (data / "test.jsonl").read_bytes() == good  # seeded: the same dataset again
    rc, err = cli(score, capsys)
    assert rc == 0, err


def test_macondo_split_emptied_cut_or_edited_after_generate_is_refused_before_the_model_loads(tmp_path, capsys):
    """A split that no longer is the file meta.json records scored as n_examples 0 (or a smaller dataset), exit 0."""
    data = tmp_path / "village"
    gen = ["macondo", "generate", "--output_dir", data, "--num_villagers", 20, "--num_parents", 4]
    assert cli(gen, capsys)[0] == 0
    good = (data / "test.jsonl").read_bytes()
    lines = good.splitlines(keepends=True)
    score = ["macondo", "score", "--model_name_or_path", tmp_path / "no-model", "--data", data, "--output_dir",
             tmp_path / "score"]  # no model there: each refusal comes before loading one
    fix = f"`knnlm macondo generate --output_dir {data} --overwrite`"
    edited = lines[0].replace(b'"parent": "', b'"parent": "X')
    for damaged, needle in ((b"", f"{data / 'test.jsonl'} holds 0 rows, not the {len(lines)} its meta.json records"),
                            (b"".join(lines[:3]), f"holds 3 rows, not the {len(lines)} its meta.json records"),
                            (edited + b"".join(lines[1:]), "test.jsonl differs from the sha256 its meta.json records")):
        (data / "test.jsonl").write_bytes(damaged)
        assert_one_line(*cli(score, capsys), "--data: ", needle, fix)
        assert not (tmp_path / "score").exists()
    assert cli([*gen, "--overwrite"], capsys)[0] == 0
    assert (data / "test.jsonl").read_bytes() == good
    hand = tmp_path / "hand"  # a hand-written split (no meta.json) needs rows, nothing more
    hand.mkdir()
    (hand / "test.jsonl").write_text("\n")
    assert_one_line(*cli([*score[:-4], "--data", hand, *score[-2:]], capsys), f"--data: {hand / 'test.jsonl'} holds no "
                                                                               "rows")


def test_generate_prompt_file_folder_and_non_utf8_are_named_as_such(tiny_gpt2_dir, tmp_path, capsys):
    """Before: a folder was reported as "does not exist", and a latin-1 file as "is not UTF-8 text; convert it"
    (no byte, no way to convert)."""
    gen = ["generate", *model_args(tiny_gpt2_dir), "--compare", "true", "--max_new_tokens", 1, "--prompt_file"]
    assert_one_line(*cli([*gen, tmp_path], capsys), "--prompt_file", str(tmp_path), "is a folder", ".txt")
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("The caf\xe9\n".encode("latin-1"))
    assert_one_line(*cli([*gen, latin1], capsys), "--prompt_file", str(latin1), "byte 7 (0xe9)", "iconv")


def test_a_run_stopped_by_bad_input_leaves_no_claim_so_the_corrected_rerun_runs(tiny_gpt2_dir, files, tmp_path,
                                                                               capsys):
    """Before: `datastore build` on a non-UTF-8 file left knnlm-run.json and build.json in its new folder, and the
    corrected rerun (other --max_tokens) was refused as "already holds a different datastore"."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    out, user_dir = tmp_path / "ds", tmp_path / "mine"
    user_dir.mkdir()
    for folder in (out, user_dir):
        build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--output_dir", folder, "--batch_size", 2]
        assert_one_line(*cli([*build, "--train_file", bad], capsys), "--train_file", "UTF-8")
        # the folder it made is gone; the user's own empty folder is kept, empty
        assert (list(folder.iterdir()) == []) if folder == user_dir else not folder.exists()
        rc, err = cli([*build, "--train_file", files / "a.txt", "--max_tokens", 200], capsys)
        assert rc == 0, err
        assert (folder / "keys.f16").is_file()


def test_abandoning_a_fresh_claim_keeps_work_a_rerun_resumes(tmp_path):
    import json

    from knnlm import fileio

    fresh, worked, earlier = (tmp_path.resolve() / name for name in ("fresh", "worked", "earlier"))
    earlier.mkdir()  # an earlier process's run of the same inputs: this one resumes it, and never removes it
    (earlier / fileio.RUN_MARKER).write_text(json.dumps({"kind": "test", "inputs": {"a": 1}}))
    (earlier / "config.json").write_text("{}")
    assert fileio.claim_output_dir(earlier, "test", {"a": 1}, own_files=("*",)) == "same"
    for folder in (fresh, worked):
        assert fileio.claim_output_dir(folder, "test", {"a": 1}, own_files=("*",)) == "new"
        (folder / "config.json").write_text("{}")
    (worked / "tokens.i32").write_bytes(b"\0" * 8)  # work a rerun resumes: the folder is kept with its claim
    assert fileio.abandon_fresh_claims() == [fresh]
    fileio.release_output_dirs()
    assert not fresh.exists()
    assert sorted(p.name for p in worked.iterdir()) == ["config.json", fileio.RUN_MARKER, "tokens.i32"]
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json", fileio.RUN_MARKER]
    assert fileio.abandon_fresh_claims() == []


def test_generate_into_its_earlier_run_of_other_prompts_is_refused_before_generating(tiny_gpt2_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """Before: the earlier run's folder was compared with the new prompts only after the model was loaded and every
    continuation generated, then refused."""
    import knnlm.models

    out = tmp_path / "gen"
    run = ["generate", *model_args(tiny_gpt2_dir), "--max_new_tokens", 2, "--compare", "true", "--output_dir", out]
    assert cli([*run, "--prompt", "the cat"], capsys)[0] == 0
    before = (out / "results.json").read_bytes()
    monkeypatch.setattr(knnlm.models, "load_model", lambda *a: pytest.fail("the model was loaded before the check"))
    assert_one_line(*cli([*run, "--prompt", "a dog"], capsys), "--output_dir", "other inputs", "--overwrite")
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("flag,value", [("--sweep_temps", "nan"), ("--sweep_temps", "1,inf"), ("--knn_temp", "inf"),
                                        ("--knn_temp", "nan")])
def test_eval_temperatures_must_be_finite(flag, value, tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: --sweep_temps nan gave exit 0 and a perplexity of null; --sweep_temps inf and --knn_temp inf were
    accepted."""
    out = tmp_path / "out"
    rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", out,
                   flag, value], capsys)
    assert_one_line(rc, err, flag, "finite number > 0")
    assert not out.exists()


_SEEDED = [  # every command's seed flag; {ds} is a store that does not exist, so the flag must be checked first
    (["index", "build", "{ds}"], "--seed"),
    (["datastore", "cluster", "{ds}"], "--seed"),
    (["mlp", "train", "{model}", "--datastore", "{ds}", "{out}"], "--seed"),
    (["lm", "train", "--train_file", "{a}", "--validation_file", "{b}", *LM_TRAIN, "{out}"], "--seed"),
    (["analyze", "projection", "{model}", "--validation_file", "{b}", "--datastore", "{ds}", "{out}"], "--seed"),
    (["analyze", "retomaton", "{model}", "--validation_file", "{b}", "--datastore", "{ds}", "{out}"], "--seed"),
    (["generate", "{model}", "--prompt", "the", "--compare", "true", "{out}"], "--seed"),
    (["macondo", "generate", "{out}"], "--seed"),
    (["hurdle", "run", "--size", "tiny", "{out}"], "--macondo_seed"),
    (["overspec", "run", "{model}", "{out}"], "--seeds"),
    (["overspec", "api", "--model", "m1,m2", "{out}"], "--seeds"),
]


@pytest.mark.parametrize("value", ["-1", str(2 ** 32)])
@pytest.mark.parametrize("cmd,flag", _SEEDED)
def test_every_seed_flag_is_checked_before_any_work(cmd, flag, value, tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: a negative seed reached numpy (`expected non-negative integer`, `Seed must be between 0 and 2**32 - 1`)
    as an internal error after the model was loaded, the index trained or the analysis done, and lm train and analyze
    projection left a claimed folder that refused the corrected rerun; hurdle's --macondo_seed was reported as
    --seed."""
    out = tmp_path / "out"
    fill = {"{ds}": [tmp_path / "nostore"], "{a}": [files / "a.txt"], "{b}": [files / "b.txt"],
            "{model}": model_args(tiny_gpt2_dir), "{out}": ["--output_dir", out]}
    argv = [a for c in cmd for a in fill.get(c, [c])]
    seed = f"0,{value}" if flag == "--seeds" else value
    assert_one_line(*cli([*argv, flag, seed], capsys), f"{flag}: must be in [0, 2**32)", value)
    assert not out.exists() and not (tmp_path / "nostore").exists()


@pytest.mark.parametrize("value", ["-5", "-1"])
def test_index_recall_queries_must_not_be_negative(value, tmp_path, capsys):
    """Before: -5 trained the IVF index and added every key, then failed (internal error, `negative dimensions`) and
    left index.rebuild-tmp; -1 with a Flat index was accepted silently."""
    assert_one_line(*cli(["index", "build", tmp_path / "nostore", "--recall_queries", value], capsys),
                    "--recall_queries: must be >= 0", "0 skips")


@pytest.mark.parametrize("flag", ["--val_tokens", "--max_train_tokens"])
def test_hurdle_text_mode_negative_token_counts_name_the_flag(flag, files, tmp_path, capsys):
    """Before: --val_tokens -1 was reported as an empty --validation_file, --max_train_tokens -5 as an empty
    --train_file (a flag hurdle does not have), after the folder was claimed and the corpora tokenized."""
    out = tmp_path / "h"
    rc, err = cli(["hurdle", "run", "--size", "tiny", "--max_steps", 2, "--eval_every", 1, "--num_seeds", 1,
                   "--device", "cpu", "--block_size", 32, "--batch_size", 2, "--data", files / "a.txt",
                   "--validation_file", files / "b.txt", "--output_dir", out, flag, -5], capsys)
    line = assert_one_line(rc, err, f"{flag}: must be >= 0", "0 = all")
    assert "corpus is empty" not in line
    assert not out.exists()


def test_macondo_negative_num_parents_says_at_least_one(tmp_path, capsys):
    """Before: "-1 parents cannot come from 20 villagers; lower --num_parents or raise --num_villagers"."""
    out = tmp_path / "v"
    rc, err = cli(["macondo", "generate", "--num_villagers", 20, "--num_parents", -1, "--output_dir", out], capsys)
    line = assert_one_line(rc, err, "--num_parents: must be >= 1")
    assert "lower" not in line
    assert not out.exists()


def test_lm_train_stopped_before_training_does_not_block_the_corrected_rerun(files, tmp_path, capsys, monkeypatch):
    """Before: a --block_size longer than the corpus was refused only after the model was built, and left the folder
    claimed with its tokens, so the corrected rerun was refused as "already holds a different model" (with no model
    there). A folder holding a checkpoint or a finished model is still protected."""
    import knnlm.experiments.lm.run as lm_run

    def train(folder, *extra):
        return cli(["lm", "train", "--train_file", files / "a.txt", "--validation_file", files / "b.txt",
                    "--output_dir", folder, *LM_TRAIN, *extra], capsys)

    out, resumable = tmp_path / "lm", tmp_path / "lm2"
    built = lm_run.build_model
    monkeypatch.setattr(lm_run, "build_model", lambda *a: pytest.fail("the model was built before the check"))
    for folder in (out, resumable):
        assert_one_line(*train(folder, "--block_size", 100000), "--train_file", "--block_size 100000")
    monkeypatch.setattr(lm_run, "build_model", built)
    (out / "work" / "checkpoint").mkdir()  # an empty checkpoint folder: still nothing to resume
    rc, err = train(out)  # --block_size 32
    assert rc == 0, err
    model = (out / "model.safetensors").read_bytes()
    assert_one_line(*train(out, "--seed", 1), "--output_dir", "--overwrite")  # a finished model: kept
    assert (out / "model.safetensors").read_bytes() == model

    (resumable / "work" / "checkpoint").mkdir()  # a stopped run with a checkpoint: other settings refused, it is kept
    (resumable / "work" / "checkpoint" / "latest.json").write_text("{}")
    assert_one_line(*train(resumable), "--output_dir", "--overwrite")
    assert (resumable / "work" / "checkpoint" / "latest.json").is_file()


@pytest.mark.parametrize("command", ["projection", "retomaton"])
def test_analyze_refuses_a_corpus_named_twice_before_any_work(command, tiny_gpt2_dir, files, tmp_path, capsys):
    """A --validation_file beside --dataset_name was ignored (the dataset was read)."""
    out = tmp_path / "out"
    argv = ["analyze", command, *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--dataset_name",
            tmp_path / "dataset", "--datastore", tmp_path / "nostore", "--output_dir", out]
    assert_one_line(*cli(argv, capsys), "--validation_file", "both name the corpus")
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    # before: accepted, exit 0, the setting not read
    (["lm", "train", "--early_stopping_min_delta", 0.5], "--early_stopping_min_delta: acts only with --early_stopping_patience"),
    (["hurdle", "run", "--macondo_seed", 3], "--macondo_seed: only Macondo mode reads it"),
    (["analyze", "retomaton", "--min_knns", "2,1,2"], "--min_knns: 2,1,2 repeats a value"),
    (["overspec", "run", "--mlp_memory", "false", "--mlp_at", "last"], "--mlp_at: a memory setting, which acts only with"),
    # before: "needs a vocabulary size >= 257"
    (["lm", "train", "--tokenizer", "bpe:abc"], "--tokenizer: 'bpe:abc': the vocabulary size after bpe: must be a whole"),
    # before: accepted, recorded in config.json, and the plain kNN-LM scored (per-example scores identical)
    (["macondo", "score", "--retomaton", "true"], "--retomaton: RetoMaton and random search skips follow a text in order"),
    (["macondo", "score", "--skip_search_prob", 0.5], "--skip_search_prob: RetoMaton and random search skips"),
    (["analyze", "projection", "--retomaton", "true"], "--retomaton: RetoMaton and random search skips"),
    (["macondo", "score", "--search_margin", 8], "--search_margin: acts only with --search_backend torch"),
    # before: pointers brought a position's own row back (ppl 4.97 against the kNN-LM's 25.4 on a store's own text)
    (["analyze", "projection", "--ignore_top", "true", "--retomaton", "true"], "--ignore_top: drops only searched"),
])
def test_settings_that_would_not_act_or_are_malformed_are_refused(argv, needle, tiny_gpt2_dir, files, tmp_path, capsys):
    out = tmp_path / "o"
    extra = {"lm": ["--train_file", files / "a.txt", "--validation_file", files / "b.txt", *LM_TRAIN],
             "hurdle": ["--size", "tiny", "--max_steps", 2, "--eval_every", 1, "--num_seeds", 1, "--device", "cpu",
                        "--block_size", 32, "--batch_size", 2, "--data", files / "a.txt", "--validation_file",
                        files / "b.txt"],
             "analyze": [*model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--datastore",
                         tmp_path / "ds"],
             "overspec": ["--model_name_or_path", "tiny", "--device", "cpu"],
             "macondo": [*model_args(tiny_gpt2_dir), "--data", tmp_path / "data", "--datastore", tmp_path / "ds"]}[argv[0]]
    assert_one_line(*cli([*argv, *extra, "--output_dir", out], capsys), needle)
    assert not out.exists()


def test_eval_under_a_launch_of_several_processes_says_it_runs_as_one(tiny_gpt2_dir, files, tmp_path, capsys,
                                                                     monkeypatch):
    """Before: the second process was refused by the output folder's lock ('in use by another knnlm process'),
    naming no reason, and the launcher stopped the first."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "ev"
    assert_one_line(*cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir",
                          out], capsys), "eval: runs as one process", "without torchrun")
    assert not out.exists()
