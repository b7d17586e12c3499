"""Bad flag values and damaged inputs of the study commands, the cluster / index / model loaders and argparse: each
case was an internal error, named a flag the command does not have, or was accepted and ignored."""
import pytest
import test_faults  # noqa: F401  (its fixtures)
from test_faults import assert_one_line, cli, files  # noqa: F401

HURDLE_TEXT = ["hurdle", "run", "--size", "tiny", "--max_steps", 2, "--eval_every", 1, "--num_seeds", 1, "--device",
               "cpu", "--block_size", 32, "--batch_size", 2]


@pytest.mark.parametrize("flag,value,needle", [
    # before: internal error (ValueError: cannot convert float NaN to integer / OverflowError), exit 1
    ("--warmup", "nan", "--warmup: must be a finite number >= 0"),
    ("--warmup", "inf", "--warmup: must be a finite number >= 0"),
    # before: internal error (RuntimeError: set_num_threads expects a positive integer), exit 1
    ("--num_threads", -1, "--num_threads: must be >= 0"),
])
def test_hurdle_non_finite_warmup_and_negative_threads_name_the_flag(flag, value, needle, files, tmp_path, capsys):
    out = tmp_path / "h"
    argv = [*HURDLE_TEXT, "--data", files / "a.txt", "--validation_file", files / "b.txt", "--output_dir", out]
    assert_one_line(*cli([*argv, flag, value], capsys), needle)
    assert not out.exists()


@pytest.mark.parametrize("flag,value,needle", [
    # before: "--num_villagers: 1 is too few", "--num_parents: must be >= 1", "--min_children/--max_children: ...",
    # "--examples_per_child: must be >= 1": the village's own flags, which `hurdle run` does not have
    ("--macondo_num_villagers", 1, "--macondo_num_villagers: 1 is too few"),
    ("--macondo_num_parents", 0, "--macondo_num_parents: must be >= 1"),
    ("--macondo_max_children", 0, "--macondo_max_children: must be >= 1"),
    ("--macondo_examples_per_child", 0, "--macondo_examples_per_child: must be >= 1"),
    ("--macondo_num_parents", 600, "--macondo_num_parents: 600 parents cannot come from 500 villagers"),
])
def test_hurdle_village_sizes_name_hurdles_own_flags(flag, value, needle, tmp_path, capsys):
    out = tmp_path / "h"
    argv = [*HURDLE_TEXT, "--data", "macondo", "--output_dir", out]
    line = assert_one_line(*cli([*argv, flag, value], capsys), needle)
    assert "--num_" not in line.replace("--macondo_num_", "") and "--examples_per_child" not in line.replace(
        "--macondo_examples_per_child", "")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--macondo_num_villagers", "--macondo_num_parents", "--macondo_max_children",
                                  "--macondo_examples_per_child"])
def test_hurdle_text_mode_refuses_every_village_setting(flag, files, tmp_path, capsys):
    """Before: only --macondo_seed was refused in text mode; the village's sizes were accepted and ignored (exit 0)."""
    out = tmp_path / "h"
    argv = [*HURDLE_TEXT, "--data", files / "a.txt", "--validation_file", files / "b.txt", "--output_dir", out]
    assert_one_line(*cli([*argv, flag, 3], capsys), f"{flag}: only Macondo mode reads it")
    assert not out.exists()


def test_cluster_niter_beyond_a_c_int_names_the_flag(tmp_path, capsys):
    """Before: internal error (OverflowError: in method 'ClusteringParameters_niter_set'), exit 1."""
    assert_one_line(*cli(["datastore", "cluster", tmp_path / "nostore", "--niter", 2 ** 40], capsys),
                    "--niter: must be in [1, 2**31)")


@pytest.mark.parametrize("flag,value,needle", [
    ("--ray_shard_cpus", "nan", "--ray_shard_cpus: acts only with --search_backend ray"),
    ("--ray_address", "127.0.0.1:1", "--ray_address: acts only with --search_backend ray"),
    ("--search_margin", 8, "--search_margin: acts only with --search_backend torch"),
    ("--search_nlist", 4, "--search_nlist: acts only with --search_backend torch"),
])
def test_analyze_retomaton_refuses_another_backends_settings(flag, value, needle, tiny_gpt2_dir, files, tmp_path,
                                                            capsys):
    """Before: accepted and ignored (exit 0, results.json written), as eval, generate and macondo score refuse them."""
    out = tmp_path / "o"
    argv = ["analyze", "retomaton", "--model_name_or_path", tiny_gpt2_dir, "--device", "cpu", "--validation_file",
            files / "b.txt", "--datastore", tmp_path / "ds", "--output_dir", out]
    assert_one_line(*cli([*argv, flag, value], capsys), needle)
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    # before: accepted with --lora false (exit 0): every weight trained, config.json recording the LoRA rank
    (["--lora_r", 16], "--lora_r: a LoRA setting, which acts only with --lora true"),
    (["--lora_targets", "c_attn"], "--lora_targets: a LoRA setting, which acts only with --lora true"),
    # before: accepted (alpha > 0 holds for inf): adapters scaled by inf
    (["--lora", "true", "--lora_alpha", "inf"], "--lora_r/--lora_alpha/--lora_dropout: need r >= 1, alpha > 0"),
])
def test_overspec_lora_settings_without_lora_or_infinite_are_refused(argv, needle, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["overspec", "run", "--model_name_or_path", "tiny", "--device", "cpu", "--output_dir", out]
    assert_one_line(*cli([*base, *argv], capsys), needle)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--train_file", "--validation_file"])
@pytest.mark.parametrize("what", ["folder", "missing"])
def test_lm_train_corpus_that_is_a_folder_or_missing_names_the_flag(flag, what, files, tmp_path, capsys):
    """Before: 'Is a directory: PATH; check the path' / 'No such file or directory: PATH' (an OSError from hashing the
    corpus), naming neither the flag nor what to pass; datastore build and eval name the flag."""
    out = tmp_path / "lm"
    bad = tmp_path / "corpus"
    if what == "folder":
        bad.mkdir()
    given = {"--train_file": files / "a.txt", "--validation_file": files / "b.txt", flag: bad}
    argv = ["lm", "train", "--size", "tiny", "--max_steps", 1, "--block_size", 32, "--batch_size", 2,
            "--output_dir", out, *[a for kv in given.items() for a in kv]]
    assert_one_line(*cli(argv, capsys), f"{flag}: {bad} does not exist or is not a file")
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_overspec_api_poll_interval_must_be_finite(value, tmp_path, capsys):
    """Before: accepted (`poll_s <= 0` is false for NaN and inf); with --submit the job was started and then
    time.sleep(nan) raised an internal ValueError (inf: OverflowError)."""
    out = tmp_path / "o"
    argv = ["overspec", "api", "--submit", "true", "--model", "base-model", "--base_url", "http://127.0.0.1:9/v1",
            "--api_key", "k", "--output_dir", out, "--poll_s", value]
    assert_one_line(*cli(argv, capsys), "--poll_s: must be a finite number > 0")
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "datastore"])
@pytest.mark.parametrize("flag,value", [("--split", "test"), ("--dataset_config_name", "wikitext-2-raw-v1")])
def test_dataset_coordinates_beside_a_corpus_file_are_refused(command, flag, value, tiny_gpt2_dir, files, tmp_path,
                                                              capsys):
    """Before: accepted and ignored (exit 0): `eval --validation_file valid.txt --split test` scored valid.txt."""
    out = tmp_path / "o"
    corpus = ["--validation_file", files / "b.txt"] if command == "eval" else ["--train_file", files / "a.txt"]
    argv = [*(["eval"] if command == "eval" else ["datastore", "build"]), "--model_name_or_path", tiny_gpt2_dir,
            "--device", "cpu", *corpus, "--output_dir", out, flag, value]
    assert_one_line(*cli(argv, capsys), f"{flag}: acts only with --dataset_name")
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--bogus_flag", "1"], "knnlm: error: unrecognized arguments: --bogus_flag 1"),
    (["eval", "--k"], "knnlm eval: error: argument --k: expected one argument"),
    (["demo", "--output_dir"], "knnlm demo: error: argument --output_dir: expected one argument"),
    (["datastore", "verify"], "knnlm datastore verify: error: the following arguments are required: datastore"),
    (["index", "frobnicate"], "knnlm index: error: argument action: invalid choice: 'frobnicate'"),
])
def test_argparse_errors_are_one_line(argv, needle, capsys):
    """Before: argparse's usage block (one to six lines) above the error line."""
    from knnlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(needle) and "usage:" not in err, err


@pytest.mark.parametrize("corpus,needle", [
    ("latin1.txt", "--data: {path} is not UTF-8 at byte 3"),
    ("blank.txt", "--data: the corpus holds only whitespace"),
])
def test_hurdle_text_corpus_errors_name_data_and_no_missing_flag(corpus, needle, files, tmp_path, capsys):
    """Before: '--train_file: ... is not UTF-8 ... or pass --encoding_errors replace (or ignore)' and '--train_file: the
    corpus holds only whitespace': hurdle run has neither --train_file nor --encoding_errors."""
    out = tmp_path / "h"
    argv = [*HURDLE_TEXT, "--data", files / corpus, "--validation_file", files / "b.txt", "--output_dir", out]
    line = assert_one_line(*cli(argv, capsys), needle.format(path=files / corpus))
    assert "--train_file" not in line and "--encoding_errors" not in line


@pytest.mark.parametrize("flag", ["--train_file", "--validation_file"])
def test_lm_train_non_utf8_corpus_does_not_suggest_a_flag_it_lacks(flag, files, tmp_path, capsys):
    """Before: '... re-encode it (e.g. `iconv ...`) or pass --encoding_errors replace (or ignore)': lm train has no
    --encoding_errors (the advice gave 'unrecognized arguments')."""
    given = {"--train_file": files / "a.txt", "--validation_file": files / "b.txt", flag: files / "latin1.txt"}
    argv = ["lm", "train", "--size", "tiny", "--max_steps", 1, "--block_size", 32, "--batch_size", 2,
            "--output_dir", tmp_path / "lm", *[a for kv in given.items() for a in kv]]
    line = assert_one_line(*cli(argv, capsys), f"{flag}: {files / 'latin1.txt'} is not UTF-8 at byte 3", "iconv")
    assert "--encoding_errors" not in line


def test_model_config_with_a_mistyped_field_names_the_folder(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: internal error (StrictDataclassFieldValidationError: Validation error for field 'n_embd':), exit 1."""
    import json
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_gpt2_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "n_embd": "sixty"}))
    out = tmp_path / "ev"
    line = assert_one_line(*cli(["eval", "--model_name_or_path", model, "--device", "cpu", "--validation_file",
                                 files / "b.txt", "--output_dir", out], capsys),
                           f"--model_name_or_path: {model}: its config.json is invalid", "n_embd")
    assert "internal error" not in line
    assert not out.exists()


@pytest.mark.parametrize("meta,needle", [("{garbage", "meta.json is corrupt (not valid JSON"),
                                         ("[]", "meta.json is not a Macondo meta.json (it holds no mapping)")])
def test_overspec_api_village_with_a_damaged_meta_json_names_it(meta, needle, tmp_path, capsys):
    """Before: internal error (JSONDecodeError: Expecting property name... / AttributeError: 'list' object has no
    attribute 'get'), exit 1."""
    from knnlm.macondo.generate import MacondoArgs, generate_macondo

    village = tmp_path / "village"
    generate_macondo(MacondoArgs(output_dir=str(village), num_villagers=20, num_parents=2, max_children=2,
                                 examples_per_child=1, format="conv"))
    (village / "meta.json").write_text(meta)
    out = tmp_path / "o"
    argv = ["overspec", "api", "--model", "m", "--base_url", "http://127.0.0.1:9/v1", "--api_key", "k", "--data",
            village, "--output_dir", out]
    assert_one_line(*cli(argv, capsys), f"--data: {village / 'meta.json'}", needle.split("meta.json ", 1)[1])


def test_lm_train_that_diverges_is_not_saved_as_a_finished_model(files, tmp_path, capsys):
    """Before: exit 0, model.safetensors of NaN weights and results.json (val_ppl null) written as a finished run, which
    a rerun then reported as 'already holds this model'."""
    out = tmp_path / "lm"
    argv = ["lm", "train", "--size", "tiny", "--max_steps", 2, "--block_size", 32, "--batch_size", 2,
            "--train_file", files / "a.txt", "--validation_file", files / "b.txt", "--output_dir", out,
            "--learning_rate", "1e10"]
    assert_one_line(*cli(argv, capsys), "--learning_rate: training diverged (validation loss nan")
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()


def test_torch_failing_to_allocate_is_out_of_memory_not_an_internal_error(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: 'internal error (RuntimeError: [enforce fail at alloc_cpu.cpp:127] ... DefaultCPUAllocator: can't
    allocate memory ...); rerun with --debug ... and report it', exit 1: torch's failed allocation is a RuntimeError
    (torch.OutOfMemoryError on a GPU), not the MemoryError the CLI reported as such. Then its advice named --batch_size
    and --max_tokens, which mlp train does not have: it names the command's own memory flags."""
    from test_faults import build_ds

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    argv = ["mlp", "train", "--model_name_or_path", tiny_gpt2_dir, "--device", "cpu", "--datastore", ds.dir,
            "--output_dir", tmp_path / "mem", "--max_steps", 1, "--hidden_size", 10 ** 12]
    line = assert_one_line(*cli(argv, capsys), "out of memory; use a smaller --micro_batch_tokens or --chunk_keys")
    assert "internal error" not in line and "--batch_size" not in line  # mlp train has no --batch_size


def test_nprobe_beyond_the_lists_of_an_ivf_index_visits_them_all(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: `index build --nprobe 99999999999999` over an IVF factory (its recall check) and `eval --nprobe ...` were
    internal errors (RuntimeError: Error in ... faiss::IndexIVF::search_preassigned), exit 1."""
    import json

    from test_faults import build_ds

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    huge = 99999999999999
    rc, err = cli(["index", "build", ds.dir, "--factory", "IVF4,Flat", "--nprobe", huge], capsys)
    assert rc == 0 and "Traceback" not in err, err
    rc, err = cli(["eval", "--model_name_or_path", tiny_gpt2_dir, "--device", "cpu", "--validation_file",
                   files / "b.txt", "--datastore", ds.dir, "--block_size", 32, "--output_dir", tmp_path / "ev",
                   "--nprobe", huge], capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]["ppl_knnlm"] > 0


def test_lm_train_bpe_vocabulary_beyond_the_limit_is_refused_before_the_trainer(files, tmp_path, capsys):
    """Before: the Rust BPE trainer aborted the process ('memory allocation of 72567767433232 bytes failed', a Rust
    backtrace, exit -6/SIGABRT): nothing Python could catch. Run in a subprocess so that the old code's abort does not
    take pytest down."""
    import os
    import subprocess
    import sys

    out = tmp_path / "lm"
    argv = ["lm", "train", "--size", "tiny", "--max_steps", "1", "--block_size", "32", "--batch_size", "2",
            "--train_file", str(files / "a.txt"), "--validation_file", str(files / "b.txt"), "--output_dir", str(out),
            "--tokenizer", "bpe:999999999999"]
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-m", "knnlm", *argv], capture_output=True, text=True, env=env, timeout=300)
    assert_one_line(p.returncode, p.stderr, "--tokenizer: 'bpe:999999999999': the vocabulary size must be at most")
    assert not out.exists()


def test_mlp_train_into_its_memory_whose_record_is_not_an_object(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: internal error (AttributeError: 'list' object has no attribute 'get'), exit 1, with or without
    --overwrite."""
    from test_faults import build_ds

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    mem = tmp_path / "mem"
    argv = ["mlp", "train", "--model_name_or_path", tiny_gpt2_dir, "--device", "cpu", "--datastore", ds.dir,
            "--output_dir", mem, "--max_steps", 1, "--hidden_size", 8]
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    (mem / "memory.json").write_text("[]")
    assert_one_line(*cli(argv, capsys), f"--output_dir: {mem / 'memory.json'} is damaged (not a JSON object)",
                    "--overwrite")
    rc, err = cli([*argv, "--overwrite", "true"], capsys)
    assert rc == 0, err
    assert (mem / "results.json").is_file()


@pytest.mark.parametrize("flag,value,needle", [
    # before: accepted; the server then started 10**14 threads at launch and hung there
    ("--workers", 10 ** 14, "--workers: must be <= 1024"),
    # before: accepted; the first connection's socket.settimeout(inf) raised OverflowError in a worker thread
    ("--request_timeout_s", "inf", "--request_timeout_s: must be a finite number in (0, 86400]"),
    ("--request_timeout_s", "1e300", "--request_timeout_s: must be a finite number in (0, 86400]"),
    ("--request_timeout_s", "nan", "--request_timeout_s: must be a finite number in (0, 86400]"),
])
def test_serve_workers_and_timeout_beyond_what_the_server_can_take_are_refused(flag, value, needle, tmp_path, capsys):
    """Refused before the model loads (the model path here does not exist: without the check, that was the error)."""
    argv = ["serve", "--model_name_or_path", tmp_path / "no-model", "--device", "cpu", "--port", 0]
    assert_one_line(*cli([*argv, flag, value], capsys), needle)


@pytest.mark.parametrize("command,flag", [("hurdle", "--bootstrap"), ("projection", "--n_boot"),
                                          ("retomaton", "--n_boot")])
def test_bootstrap_resamples_beyond_the_limit_are_refused_before_any_work(command, flag, files, tmp_path, capsys):
    """Before: accepted; `hurdle run --bootstrap 10**14` trained every model and then ended 'out of memory; use a
    smaller --batch_size' (numpy allocating a float per resample), naming a flag that was not the cause. The analyze
    commands (their datastore does not exist here) named that missing store instead."""
    out = tmp_path / "o"
    if command == "hurdle":
        argv = [*HURDLE_TEXT, "--data", files / "a.txt", "--validation_file", files / "b.txt"]
    else:
        argv = ["analyze", command, "--model_name_or_path", tmp_path / "no-model", "--device", "cpu",
                "--validation_file", files / "b.txt", "--datastore", tmp_path / "no-store"]
    assert_one_line(*cli([*argv, "--output_dir", out, flag, 10 ** 14], capsys), f"{flag}: must be <= 1000000")
    assert not out.exists()


@pytest.mark.parametrize("command", ["hurdle", "overspec"])
def test_num_threads_beyond_the_limit_names_the_flag(command, files, tmp_path, capsys):
    """Before: internal error (ValueError: Overflow when unpacking long, from torch.set_num_threads), exit 1, after the
    output folder was claimed; only -1 was checked."""
    out = tmp_path / "o"
    if command == "hurdle":
        argv = [*HURDLE_TEXT, "--data", files / "a.txt", "--validation_file", files / "b.txt"]
    else:
        argv = ["overspec", "run", "--model_name_or_path", "tiny", "--device", "cpu"]
    assert_one_line(*cli([*argv, "--output_dir", out, "--num_threads", 10 ** 14], capsys),
                    "--num_threads: must be <= 1024 (0 = torch's default)")
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--n_epochs", 3), ("--poll_s", 5), ("--training_file", "test"),
                                        ("--validation_split", "train"), ("--validation_split", "")])
def test_overspec_api_fine_tune_settings_without_submit_are_refused(flag, value, tmp_path, capsys):
    """Before: accepted and ignored (no job is started without --submit): the run went on to score the named model."""
    out = tmp_path / "o"
    argv = ["overspec", "api", "--model", "m", "--base_url", "http://127.0.0.1:9/v1", "--api_key", "k",
            "--output_dir", out, flag, value]
    assert_one_line(*cli(argv, capsys), f"{flag}: a fine-tuning setting, which acts only with --submit true")
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_take_overwrite_true_as_every_command_does(command, tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: `eval --overwrite true` and `generate --overwrite true` were 'unrecognized arguments: true' (their
    --overwrite was a bare switch, every other command's takes true|false); a bare --overwrite still works."""
    out = tmp_path / "o"
    base = ["--model_name_or_path", tiny_gpt2_dir, "--device", "cpu", "--output_dir", out]
    if command == "eval":
        runs = [["eval", *base, "--block_size", 32, "--validation_file", files / name] for name in ("a.txt", "b.txt")]
    else:
        runs = [["generate", *base, "--compare", "true", "--max_new_tokens", 2, "--prompt", p] for p in ("A", "B")]
    assert cli(runs[0], capsys)[0] == 0
    assert_one_line(*cli(runs[1], capsys), "--overwrite")  # another run's folder: replaced only with --overwrite
    assert_one_line(*cli([*runs[1], "--overwrite", "false"], capsys), "--overwrite")
    rc, err = cli([*runs[1], "--overwrite", "true"], capsys)
    assert rc == 0, err
    rc, err = cli([*runs[0], "--overwrite"], capsys)
    assert rc == 0, err
    assert_one_line(*cli([*runs[0], "--overwrite", "maybe"], capsys), "--overwrite: 'maybe' is not a valid bool")


def test_demo_smoke_reads_a_boolean_as_every_boolean_flag_does(tmp_path, capsys):
    """Before: `demo --smoke` took only true|false (argparse choices): `--smoke yes` was 'invalid choice', where
    `reproduce --smoke yes` and every other boolean flag take it; `--smoke maybe` was argparse's error, not theirs."""
    taken = tmp_path / "a-file"
    taken.write_text("x")
    # accepted: the run goes on to overspec run, which refuses this output folder (a file) before any work
    assert_one_line(*cli(["demo", "--smoke", "yes", "--output_dir", taken], capsys), "--output_dir", str(taken))
    assert_one_line(*cli(["demo", "--smoke", "maybe", "--output_dir", taken], capsys),
                    "--smoke: 'maybe' is not a valid bool")


@pytest.mark.parametrize("removed", [("meta.json",), ("meta.json", "villagers.json", "train.jsonl")])
def test_macondo_score_refuses_a_generated_village_without_its_meta_json(removed, tmp_path, capsys):
    """Before: scored (exit 0) a folder `macondo generate` did not finish: it moves meta.json in last, so a kill while
    it moves the files leaves splits of two datasets, or part of one, and no meta.json to check them against. A
    hand-written split (no generate run there) is still read (test_bad_input.py)."""
    data = tmp_path / "village"
    assert cli(["macondo", "generate", "--output_dir", data, "--num_villagers", 20, "--num_parents", 2], capsys)[0] == 0
    for name in removed:
        (data / name).unlink()
    out = tmp_path / "score"
    argv = ["macondo", "score", "--model_name_or_path", tmp_path / "no-model", "--device", "cpu", "--data", data,
            "--output_dir", out]  # no model there: the refusal comes before loading one
    assert_one_line(*cli(argv, capsys), f"--data: {data} holds a `knnlm macondo generate` run that did not finish "
                                        "(no meta.json", f"knnlm macondo generate --output_dir {data}")
    assert not out.exists()


@pytest.mark.parametrize("corpus,byte", [("latin1.txt", 3), ("latin1.jsonl", 28)])
def test_lm_train_bpe_tokenizer_on_a_non_utf8_corpus_names_file_and_byte(corpus, byte, files, tmp_path, capsys):
    """Before, with --tokenizer bpe:N (the tokenizer is trained on --train_file first): a plain-text file was an
    internal error (Exception: stream did not contain valid UTF-8, from the Rust trainer), exit 1; a JSONL file's
    error advised --encoding_errors, which lm train does not have."""
    argv = ["lm", "train", "--size", "tiny", "--max_steps", 1, "--block_size", 32, "--batch_size", 2,
            "--train_file", files / corpus, "--validation_file", files / "b.txt", "--output_dir", tmp_path / "lm",
            "--tokenizer", "bpe:300"]
    line = assert_one_line(*cli(argv, capsys), f"--train_file: {files / corpus} is not UTF-8 at byte {byte}", "iconv")
    assert "--encoding_errors" not in line


@pytest.mark.parametrize("value", ["inf", "1e300", 2000])
def test_ray_shard_cpus_infinite_or_beyond_the_thread_limit_is_refused(value, files, tmp_path, capsys):
    """Before: accepted (only `> 0` was checked, which inf passes): each shard actor asked Ray for that many CPUs and
    set FAISS's threads to int(round(inf)), an OverflowError, once a store and a cluster were there (here the store
    does not exist: that was the error)."""
    out = tmp_path / "o"
    argv = ["eval", "--model_name_or_path", tmp_path / "no-model", "--device", "cpu", "--validation_file",
            files / "b.txt", "--datastore", tmp_path / "no-store", "--output_dir", out, "--search_backend", "ray",
            "--ray_shard_cpus", value]
    assert_one_line(*cli(argv, capsys), "--ray_shard_cpus: must be a finite number in (0, 1024]")
    assert not out.exists()


def test_out_of_memory_advice_names_only_flags_the_command_has():
    from argparse import Namespace

    from knnlm.cli import _out_of_memory_fix

    assert _out_of_memory_fix(Namespace(batch_size=8, max_tokens=0, k=16)) == \
        "use a smaller --batch_size or --max_tokens (or a smaller model or setting) and rerun the same command"
    assert _out_of_memory_fix(Namespace(host="127.0.0.1", workers=2)) == \
        "free memory (other jobs) or use a machine with more, and rerun the same command"


def test_boolean_flag_before_a_positional_argument_is_true(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: `index build --overwrite DS` took DS as --overwrite's value and said 'the following arguments are
    required: datastore'; a boolean flag followed by a command's positional argument is true, and a value given to it is
    still read as one."""
    from knnlm.cli import bool_values_given, build_parser
    from test_faults import build_ds

    parser = build_parser()
    assert bool_values_given(parser, ["index", "build", "--overwrite", "DS"]) == \
        ["index", "build", "--overwrite", "true", "DS"]
    assert bool_values_given(parser, ["-v", "index", "build", "--overwrite", "no", "DS"]) == \
        ["-v", "index", "build", "--overwrite", "no", "DS"]
    assert bool_values_given(parser, ["eval", "--overwrite", "maybe"]) == ["eval", "--overwrite", "maybe"]
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    assert cli(["index", "build", ds.dir, "--factory", "Flat"], capsys)[0] == 0
    index = ds.dir / "index" / "index.json"
    before = index.stat().st_mtime_ns
    rc, err = cli(["index", "build", "--overwrite", ds.dir, "--factory", "Flat"], capsys)
    assert rc == 0, err
    assert index.stat().st_mtime_ns != before  # built again: --overwrite was true
