"""Fault injection through the real CLI (issue 13): bad input, foreign folders, stale caches, full disks, corrupt files.

Every case asserts exit code 2, one ``knnlm: error:`` line and no traceback, that what was there still loads, and that a
rerun after the fault gives the same numbers as a clean run. Full disks and read-only folders use a tiny tmpfs (root
only: skipped elsewhere).
"""
import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from knnlm.cli import main
from knnlm.corpus import windows
from knnlm.datastore import Datastore
from knnlm.errors import KnnlmError
from knnlm.models import ModelArgs, load_model

TEXT_A = " ".join(f"The {w} of the river {i % 7} was seen by the people of Macondo ." for i, w in
                  enumerate(["colour", "name", "sound", "end", "source"] * 12)) + "\n"
TEXT_B = " ".join(f"Aureliano {i} wrote a letter about the {w} ." for i, w in
                  enumerate(["war", "ice", "rain", "gold"] * 10)) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    (d / "a.txt").write_text(TEXT_A)
    (d / "b.txt").write_text(TEXT_B)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    (d / "blank.txt").write_text("   \n\n  \n\t\n")
    return d


def model_args(model_dir) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--device", "cpu"]


def cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, *needles: str) -> str:
    """Exit 2, no traceback, exactly one error line (the last line of stderr), naming what it should."""
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("knnlm: error: "), err
    assert err.rstrip().splitlines()[-1] == lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def build_ds(model_dir, corpus: Path, out: Path, capsys, *extra) -> Datastore:
    rc, err = cli(["datastore", "build", *model_args(model_dir), "--train_file", corpus, "--output_dir", out,
                   "--block_size", 32, *extra], capsys)
    assert rc == 0, err
    return Datastore.open(out)


def eval_metrics(model_dir, corpus: Path, out: Path, capsys, *extra) -> dict:
    rc, err = cli(["eval", *model_args(model_dir), "--validation_file", corpus, "--output_dir", out,
                   "--block_size", 32, *extra], capsys)
    assert rc == 0, err
    return json.loads((out / "results.json").read_text())["metrics"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *opts: str):
    """A tiny tmpfs at ``path`` (root only); skips the test where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(path)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, *opts: str) -> None:
    subprocess.run(["mount", "-o", ",".join(["remount", *opts]), str(path)], check=True, capture_output=True)


# ---------------------------------------------------------------------------------------------------------------- windows
def test_block_size_one_is_refused_not_an_endless_loop(tiny_gpt2_dir, files, tmp_path, capsys):
    for cmd in (["datastore", "build", "--train_file", files / "a.txt"],
                ["eval", "--validation_file", files / "a.txt"]):
        rc, err = cli([*cmd, *model_args(tiny_gpt2_dir), "--output_dir", tmp_path / "o", "--block_size", 1], capsys)
        assert_one_line(rc, err, "--block_size")
    rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "a.txt", "--output_dir",
                   tmp_path / "o", "--block_size", 4, "--stride", 5], capsys)
    assert_one_line(rc, err, "--stride")
    rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "a.txt", "--output_dir",
                   tmp_path / "o", "--block_size", 129], capsys)  # the tiny model has 128 positions
    assert_one_line(rc, err, "--block_size", "128")
    with pytest.raises(KnnlmError, match="block_size"):
        windows([0, 10], 1, 1)
    # the smallest window that advances: block 2, stride 2 scores every token once
    wins = windows([0, 10], 2, 2)
    assert [t for w in wins for t in range(w.first_target, w.end)] == list(range(1, 10))


# ---------------------------------------------------------------------------------------------------------------- foreign folders
def test_model_and_datastore_folders_are_never_written_into(tiny_gpt2_dir, files, tmp_path, capsys):
    model = shutil.copytree(tiny_gpt2_dir, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    ds_before = {p.name: p.read_bytes() for p in ds.dir.iterdir() if p.is_file()}
    for overwrite in ([], ["--overwrite"]):
        rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "a.txt", "--output_dir", model,
                       *overwrite], capsys)
        assert_one_line(rc, err, str(model), "a model")
        rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt",
                       "--output_dir", model, *overwrite], capsys)
        assert_one_line(rc, err, str(model), "a model")
        rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir",
                       ds.dir, *overwrite], capsys)
        assert_one_line(rc, err, str(ds.dir), "datastore build")
        rc, err = cli(["mlp", "train", *model_args(tiny_gpt2_dir), "--datastore", ds.dir, "--output_dir", model,
                       "--max_steps", 1, *overwrite], capsys)
        assert_one_line(rc, err, str(model))
        rc, err = cli(["lm", "train", "--size", "tiny", "--train_file", files / "a.txt", "--validation_file",
                       files / "b.txt", "--output_dir", ds.dir, "--max_steps", 1, *overwrite], capsys)
        assert_one_line(rc, err, str(ds.dir))
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # not a byte changed
    assert {p.name: p.read_bytes() for p in ds.dir.iterdir() if p.is_file()} == ds_before
    load_model(ModelArgs(model_name_or_path=str(model), device="cpu"))  # still loads
    assert Datastore.open(ds.dir).N == ds.N
    # a folder of unknown files, and a file
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("x")
    rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "a.txt", "--output_dir",
                   tmp_path / "notes"], capsys)
    assert_one_line(rc, err, "thesis.tex")
    (tmp_path / "afile").write_text("x")
    for cmd in (["eval", "--validation_file", files / "a.txt"], ["datastore", "build", "--train_file", files / "a.txt"]):
        rc, err = cli([*cmd, *model_args(tiny_gpt2_dir), "--output_dir", tmp_path / "afile"], capsys)
        assert_one_line(rc, err, "is a file")
    rc, err = cli(["index", "build", tmp_path / "afile"], capsys)
    assert_one_line(rc, err, "is a file")


RUNNERS = {  # the cheapest invocation of each study runner; MODEL is the folder it is pointed at
    "overspec run": ["overspec", "run", "--output_dir", "MODEL"],
    "demo": ["demo", "--output_dir", "MODEL"],
    "hurdle run": ["hurdle", "run", "--output_dir", "MODEL"],
    "analyze projection": ["analyze", "projection", "--model_name_or_path", "MODEL", "--validation_file", "CORPUS",
                           "--datastore", "MODEL/no-store", "--output_dir", "MODEL"],
    "reproduce": ["reproduce", "--scale", "cpu", "--smoke", "true", "--output_dir", "MODEL"],
    "macondo score": ["macondo", "score", "--model_name_or_path", "MODEL", "--data", "MODEL/no-data", "--output_dir",
                      "MODEL"],
    "generate": ["generate", "--model_name_or_path", "MODEL", "--prompt", "The", "--compare", "true", "--output_dir",
                 "MODEL"],
}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_study_runners_never_write_into_a_model_folder(runner, tiny_gpt2_dir, files, tmp_path, capsys):
    model = shutil.copytree(tiny_gpt2_dir, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    argv = [str(a).replace("MODEL", str(model)).replace("CORPUS", str(files / "a.txt")) for a in RUNNERS[runner]]
    assert_one_line(*cli(argv, capsys), str(model), "a model", "never writes into it")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # not a byte changed, nothing added
    load_model(ModelArgs(model_name_or_path=str(model), device="cpu"))  # still loads


# ---------------------------------------------------------------------------------------------------------------- stale caches
def test_eval_never_reuses_tokens_of_another_corpus(tiny_gpt2_dir, files, tmp_path, capsys):
    clean_b = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "clean_b", capsys)
    out = tmp_path / "out"
    a = eval_metrics(tiny_gpt2_dir, files / "a.txt", out, capsys)
    assert a["n_tokens"] != clean_b["n_tokens"]
    rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", out,
                   "--block_size", 32], capsys)
    assert_one_line(rc, err, "--overwrite", "other inputs", "source")
    b = eval_metrics(tiny_gpt2_dir, files / "b.txt", out, capsys, "--overwrite")
    assert (b["n_tokens"], b["ppl_lm"]) == (clean_b["n_tokens"], clean_b["ppl_lm"])
    # λ is a setting, not an input: a rerun may change it
    eval_metrics(tiny_gpt2_dir, files / "b.txt", out, capsys, "--lmbda", "0.5")
    # a 0-byte / short token file (a full disk, an older knnlm) is rebuilt, never scored
    for damage in (lambda p: p.write_bytes(b""), lambda p: p.write_bytes(p.read_bytes()[:-4])):
        damage(out / "tokens.i32")
        again = eval_metrics(tiny_gpt2_dir, files / "b.txt", out, capsys)
        assert (again["n_tokens"], again["ppl_lm"]) == (clean_b["n_tokens"], clean_b["ppl_lm"])
    # a folder from before the marker: the eval's own files only, tokens of corpus A with no key file
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "out", legacy)
    (legacy / "knnlm-run.json").unlink()
    (legacy / "tokens.i32.json").unlink()
    shutil.copy(tmp_path / "clean_b" / "tokens.i32", legacy / "tokens.i32")
    (legacy / "tokens.i32").write_bytes(b"")
    again = eval_metrics(tiny_gpt2_dir, files / "b.txt", legacy, capsys)
    assert again["ppl_lm"] == clean_b["ppl_lm"]


def test_eval_into_a_datastore_does_not_score_its_training_tokens(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: the eval reused the store's tokens.i32 (the training corpus) and reported its perplexity."""
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", ds.dir,
                   "--block_size", 32], capsys)
    assert_one_line(rc, err, "datastore build")
    assert not (ds.dir / "results.json").exists()


# ---------------------------------------------------------------------------------------------------------------- index identity
def test_an_index_of_another_datastore_is_refused(tiny_gpt2_dir, files, tmp_path, capsys):
    ds_a = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "a", capsys)
    ds_b = build_ds(tiny_gpt2_dir, files / "b.txt", tmp_path / "b", capsys)
    ds_a2 = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "a2", capsys, "--key_point", "final_hidden")
    assert ds_a2.N == ds_a.N and ds_b.N != ds_a.N
    for d in (ds_a, ds_b, ds_a2):
        rc, err = cli(["index", "build", d.dir, "--factory", "Flat"], capsys)
        assert rc == 0, err
    assert json.loads((ds_a.dir / "index" / "index.json").read_text())["datastore"]["N"] == ds_a.N
    clean = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "ev", capsys, "--datastore", ds_a.dir, "--k", 8)
    for other in (ds_b, ds_a2):  # another N, and the same N from other keys
        shutil.rmtree(ds_a.dir / "index")
        shutil.copytree(other.dir / "index", ds_a.dir / "index")
        rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir",
                       tmp_path / "ev", "--block_size", 32, "--datastore", ds_a.dir, "--k", 8], capsys)
        assert_one_line(rc, err, "another datastore", "--overwrite")
        rc, err = cli(["index", "build", ds_a.dir, "--factory", "Flat"], capsys)
        assert_one_line(rc, err, "another datastore")
    rc, err = cli(["index", "build", ds_a.dir, "--factory", "Flat", "--overwrite"], capsys)
    assert rc == 0, err
    again = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "ev", capsys, "--datastore", ds_a.dir, "--k", 8)
    assert again["ppl_knnlm"] == clean["ppl_knnlm"]


def test_corrupt_meta_index_and_faiss_files_are_one_line_errors(tiny_gpt2_dir, files, tmp_path, capsys):
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    rc, err = cli(["index", "build", ds.dir, "--factory", "Flat"], capsys)
    assert rc == 0, err
    ev = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", tmp_path / "ev",
          "--block_size", 32, "--datastore", ds.dir, "--k", 8]
    shard = ds.dir / "index" / "shard0.faiss"
    good_shard = shard.read_bytes()
    shard.write_bytes(good_shard[:100])
    assert_one_line(*cli(ev, capsys), "shard0.faiss", "--overwrite")
    shard.write_bytes(good_shard)
    info = ds.dir / "index" / "index.json"
    good_info = info.read_text()
    for bad in ("{garbage", "[]", '\xff'):
        info.write_text(bad, encoding="latin-1")
        assert_one_line(*cli(ev, capsys), "index.json")
    rc, err = cli(["index", "build", ds.dir, "--factory", "Flat", "--overwrite"], capsys)  # replaces even a corrupt one
    assert rc == 0, err
    def record(text):  # the index.json of a rebuild equals the first but for its wall times
        return {k: v for k, v in json.loads(text).items() if k != "build_timing"}
    assert record(info.read_text()) == record(good_info)
    meta = ds.dir / "meta.json"
    good_meta = meta.read_text()
    for bad in ('{"N": 3', "[]", '{"N": "x", "d": 64}'):
        meta.write_text(bad)
        assert_one_line(*cli(ev, capsys), "meta.json")
        assert_one_line(*cli(["index", "build", ds.dir], capsys), "meta.json")
    meta.write_text(good_meta)
    assert cli(ev, capsys)[0] == 0  # restored: it all loads again
    meta.write_text("{")
    rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt", "--output_dir",
                   ds.dir, "--block_size", 32], capsys)
    assert_one_line(rc, err, "meta.json", "--overwrite")
    assert build_ds(tiny_gpt2_dir, files / "a.txt", ds.dir, capsys, "--overwrite").N == ds.N
    assert json.loads(meta.read_text())["build"] == json.loads(good_meta)["build"]


def test_a_failed_datastore_rebuild_leaves_the_old_store_usable(tiny_gpt2_dir, files, tmp_path, capsys, monkeypatch):
    """``datastore build --overwrite`` over another store builds beside it (``<out>.rebuild-tmp``) and swaps it in only
    when complete; a rerun resumes the staged build and gives the bytes of a clean build."""
    import errno

    import knnlm.datastore as datastore_module

    clean_b = build_ds(tiny_gpt2_dir, files / "b.txt", tmp_path / "clean_b", capsys, "--batch_size", 1)
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    assert cli(["index", "build", ds.dir, "--factory", "Flat"], capsys)[0] == 0
    ev = ["--datastore", ds.dir, "--k", 8]
    before = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "ev", capsys, *ev)
    old = {p.name: p.read_bytes() for p in ds.dir.iterdir() if p.is_file()}
    real_encode = datastore_module.encode_batches

    def full_disk_after_one_batch(*args, **kwargs):
        for i, batch in enumerate(real_encode(*args, **kwargs)):
            if i == 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "ds.rebuild-tmp" / "keys.f16"))
            yield batch

    monkeypatch.setattr(datastore_module, "encode_batches", full_disk_after_one_batch)
    rebuild = ["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "b.txt", "--output_dir",
               ds.dir, "--block_size", 32, "--batch_size", 1, "--overwrite"]
    assert_one_line(*cli(rebuild, capsys), "keys.f16", "No space left")
    monkeypatch.setattr(datastore_module, "encode_batches", real_encode)
    assert {p.name: p.read_bytes() for p in ds.dir.iterdir() if p.is_file()} == old  # untouched, index included
    assert (tmp_path / "ds.rebuild-tmp" / "done.u8").exists()  # the staged build a rerun resumes
    after = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "ev", capsys, *ev)
    assert after["ppl_knnlm"] == before["ppl_knnlm"]
    rc, err = cli(rebuild, capsys)  # the rerun
    assert rc == 0, err
    assert not (tmp_path / "ds.rebuild-tmp").exists() and not (ds.dir / "index").exists()  # the old index went too
    for name in ("keys.f16", "vals.i32", "tokens.i32"):
        assert (ds.dir / name).read_bytes() == (clean_b.dir / name).read_bytes()
    assert json.loads((ds.dir / "meta.json").read_text())["build"] == json.loads(
        (clean_b.dir / "meta.json").read_text())["build"]


def test_a_failed_index_rebuild_leaves_the_old_index_usable(tiny_gpt2_dir, files, tmp_path, capsys, monkeypatch):
    """``index build --overwrite`` builds beside the old index and swaps it in only when complete."""
    import faiss

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    clean_ds = shutil.copytree(ds.dir, tmp_path / "clean")
    assert cli(["index", "build", clean_ds, "--factory", "Flat", "--shards", 2], capsys)[0] == 0
    rc, err = cli(["index", "build", ds.dir, "--factory", "Flat"], capsys)
    assert rc == 0, err
    ev = ["--datastore", ds.dir, "--k", 8]
    before = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "ev", capsys, *ev)
    old = {p.name: p.read_bytes() for p in (ds.dir / "index").iterdir()}
    real_write = faiss.write_index

    def full_disk_at_shard1(index, path):  # the disk fills up while the second shard is written
        if "shard1" in path:
            raise RuntimeError("Error in faiss::FileIOWriter: fwrite failed: No space left on device")
        real_write(index, path)

    monkeypatch.setattr(faiss, "write_index", full_disk_at_shard1)
    rc, err = cli(["index", "build", ds.dir, "--factory", "Flat", "--shards", 2, "--overwrite"], capsys)
    assert_one_line(rc, err, "shard1.faiss", "No space left")
    monkeypatch.setattr(faiss, "write_index", real_write)
    assert {p.name: p.read_bytes() for p in (ds.dir / "index").iterdir()} == old  # untouched
    assert (ds.dir / "index.rebuild-tmp" / "shard0.faiss").exists()  # the staged part a rerun resumes from
    after = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "ev", capsys, *ev)
    assert after["ppl_knnlm"] == before["ppl_knnlm"]
    rc, err = cli(["index", "build", ds.dir, "--factory", "Flat", "--shards", 2, "--overwrite"], capsys)  # rerun
    assert rc == 0, err
    assert sorted(p.name for p in ds.dir.iterdir()) == sorted(p.name for p in clean_ds.iterdir())  # no staging left
    rebuilt = {p.name: p.read_bytes() for p in (ds.dir / "index").iterdir() if p.suffix == ".faiss"}
    assert rebuilt == {p.name: p.read_bytes() for p in (clean_ds / "index").iterdir() if p.suffix == ".faiss"}
    assert set(rebuilt) == {"trained.faiss", "shard0.faiss", "shard1.faiss"}
    def record(d):
        return {k: v for k, v in json.loads((d / "index" / "index.json").read_text()).items() if k != "build_timing"}
    assert record(ds.dir) == record(clean_ds)


def test_ivf_with_more_lists_than_keys_is_a_one_line_error(tiny_gpt2_dir, files, tmp_path, capsys):
    ds = build_ds(tiny_gpt2_dir, files / "b.txt", tmp_path / "ds", capsys)
    rc, err = cli(["index", "build", ds.dir, "--factory", "IVF1024,Flat"], capsys)
    assert_one_line(rc, err, "--factory", "1024", f"only {ds.N} keys")
    rc, err = cli(["index", "build", ds.dir, "--factory", "IVF4,Flat", "--recall_queries", 0], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------------- corpora
def test_non_utf8_corpora_name_the_file_and_byte(tiny_gpt2_dir, files, tmp_path, capsys):
    cases = [(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "latin1.txt"], "latin1.txt", 3),
             (["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "latin1.jsonl"],
              "latin1.jsonl", 15 + 13),
             (["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "latin1.txt"], "latin1.txt", 3),
             (["lm", "train", "--size", "tiny", "--train_file", files / "latin1.txt", "--validation_file",
               files / "a.txt", "--max_steps", 1], "latin1.txt", 3)]
    for i, (cmd, name, offset) in enumerate(cases):
        rc, err = cli([*cmd, "--output_dir", tmp_path / f"o{i}"], capsys)
        assert_one_line(rc, err, name, f"byte {offset}", "UTF-8")
    ds = build_ds(tiny_gpt2_dir, files / "latin1.txt", tmp_path / "replaced", capsys, "--encoding_errors", "replace")
    assert ds.N > 3


def test_whitespace_only_and_empty_corpora_are_refused(tiny_gpt2_dir, files, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    for corpus, why in ((files / "blank.txt", "only whitespace"), (tmp_path / "empty.txt", "empty")):
        rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", corpus, "--output_dir",
                       tmp_path / f"ds-{corpus.stem}"], capsys)
        assert_one_line(rc, err, "--train_file", why)
        assert not (tmp_path / f"ds-{corpus.stem}" / "meta.json").exists()
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text('{"text": "  "}\n{"text": "\\n"}\n')
    rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", jsonl, "--output_dir",
                   tmp_path / "j"], capsys)
    assert_one_line(rc, err, "whitespace")


# ---------------------------------------------------------------------------------------------------------------- resume
def test_rerun_after_a_wedged_tokenization_restarts_cleanly(tiny_gpt2_dir, files, tmp_path, capsys):
    """The state a full disk left before: build.json, a 0-byte tokens.i32 and a temp file of a killed run."""
    clean = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "clean", capsys)
    broken = tmp_path / "broken"
    shutil.copytree(clean.dir, broken)
    (broken / "meta.json").unlink()
    (broken / "keys.f16").unlink()
    shutil.copy(tmp_path / "clean" / "meta.json", tmp_path / "meta_clean.json")
    (broken / "build.json").write_text(json.dumps(json.loads((tmp_path / "meta_clean.json").read_text())["build"]))
    (broken / "tokens.i32").write_bytes(b"")
    (broken / "tokens.i32.tmp-999999999").write_bytes(b"\0" * 12)  # no such process
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", broken, capsys)
    assert (ds.dir / "keys.f16").read_bytes() == (clean.dir / "keys.f16").read_bytes()
    assert (ds.dir / "vals.i32").read_bytes() == (clean.dir / "vals.i32").read_bytes()
    assert not list(broken.glob("*.tmp-*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_during_tokenization_and_key_writing_then_resume(tiny_gpt2_dir, files, tmp_path, capsys):
    clean = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "clean", capsys)
    assert (clean.dir / "tokens.i32").stat().st_size <= 4096 < (clean.dir / "keys.f16").stat().st_size - 8192
    # tmpfs counts whole 4 KiB pages: 12k holds the lock, the marker and build.json, not the tokens
    with tmpfs(tmp_path / "disk", "12k") as disk:
        out = disk / "ds"
        rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt",
                       "--output_dir", out, "--block_size", 32], capsys)
        assert_one_line(rc, err, "tokens.i32", "space")
        assert not (out / "tokens.i32").exists() and not list(out.glob("*.tmp-*"))
        remount(disk, "size=28k")  # the tokens (3 files) fit, the keys do not
        rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt",
                       "--output_dir", out, "--block_size", 32], capsys)
        assert_one_line(rc, err, "keys.f16", "MiB")
        assert not (out / "meta.json").exists()
        remount(disk, "size=4m")
        ds = build_ds(tiny_gpt2_dir, files / "a.txt", out, capsys)
        assert (ds.dir / "keys.f16").read_bytes() == (clean.dir / "keys.f16").read_bytes()
        assert not list(out.glob("*.tmp-*"))
    # eval: 20k holds the lock, the marker and the token files, not the results; the rerun gives the clean numbers
    clean_ev = eval_metrics(tiny_gpt2_dir, files / "a.txt", tmp_path / "ev", capsys)
    with tmpfs(tmp_path / "disk2", "20k") as disk:
        rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "a.txt", "--output_dir",
                       disk / "ev", "--block_size", 32], capsys)
        assert_one_line(rc, err, str(disk / "ev"), "space")
        assert not (disk / "ev" / "results.json").exists() and not list((disk / "ev").glob("*.tmp-*"))
        remount(disk, "size=4m")
        assert eval_metrics(tiny_gpt2_dir, files / "a.txt", disk / "ev", capsys)["ppl_lm"] == clean_ev["ppl_lm"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_read_only_folder_is_a_one_line_error(tiny_gpt2_dir, files, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        for cmd in (["eval", "--validation_file", files / "a.txt"], ["datastore", "build", "--train_file", files / "a.txt"]):
            rc, err = cli([*cmd, *model_args(tiny_gpt2_dir), "--output_dir", ro / "out"], capsys)
            assert_one_line(rc, err, str(ro / "out"), "Read-only")


def test_debug_flag_shows_the_traceback(tiny_gpt2_dir, tmp_path, capsys):
    argv = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", tmp_path / "missing.txt", "--output_dir",
            tmp_path / "o"]
    rc, err = cli(argv, capsys)
    assert_one_line(rc, err, "missing.txt")
    rc, err = cli(["--debug", *argv], capsys)
    assert rc == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("knnlm: error:")


# ---------------------------------------------------------------------------------------------------------------- the helpers
def test_claim_output_dir_states(tmp_path):
    from knnlm.fileio import RUN_MARKER, claim_output_dir

    out = tmp_path / "run"
    assert claim_output_dir(out, "eval", {"corpus": "a"}) == "new"
    assert json.loads((out / RUN_MARKER).read_text()) == {"kind": "eval", "inputs": {"corpus": "a"}}
    (out / "results.json").write_text("{}")
    assert claim_output_dir(out, "eval", {"corpus": "a"}) == "same"
    assert claim_output_dir(out, "eval", None) == "same"  # a check only
    with pytest.raises(KnnlmError, match="corpus: a vs b.*--overwrite"):
        claim_output_dir(out, "eval", {"corpus": "b"})
    assert claim_output_dir(out, "eval", {"corpus": "b"}, overwrite=True) == "replace"
    assert json.loads((out / RUN_MARKER).read_text())["inputs"] == {"corpus": "b"}
    with pytest.raises(KnnlmError, match="`knnlm eval`, not of `knnlm mlp train`"):
        claim_output_dir(out, "mlp train", {"corpus": "b"}, overwrite=True)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "results.json").write_text("{}")
    assert claim_output_dir(legacy, "eval", {"x": 1}, own_files=("results.json",)) == "same"
    assert (legacy / "knnlm-run.json").is_file()  # adopted: marked as the eval's from now on
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text("{}")
    with pytest.raises(KnnlmError, match="the results of another run"):  # not the memory's files: refused
        claim_output_dir(other, "mlp train", {"x": 1}, own_files=("memory.json",))
    # a study run from before the marker: its names match the runner's patterns; one foreign file is refused
    from knnlm.experiments.overspec import OWN_FILES

    study = tmp_path / "study"
    (study / "seed-0").mkdir(parents=True)
    (study / "config.json").write_text("{}")
    (study / "overspec_control.png").write_bytes(b"")
    (study / "thesis.tex").write_text("x")
    with pytest.raises(KnnlmError, match="4 other file"):
        claim_output_dir(study, "overspec run", {}, own_files=OWN_FILES)
    (study / "thesis.tex").unlink()
    assert claim_output_dir(study, "overspec run", {}, own_files=OWN_FILES) == "same"


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    from knnlm.fileio import atomic_write_text, remove_stale_temps

    (tmp_path / "a.json.tmp-999999999").write_text("x")  # no such process
    (tmp_path / f"a.json.tmp-{os.getppid()}").write_text("x")  # a live process (pytest's parent): kept
    atomic_write_text(tmp_path / "a.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", f"a.json.tmp-{os.getppid()}"]
    assert remove_stale_temps(tmp_path) == 0
