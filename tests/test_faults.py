"""Fault injection through the real CLI: bad input, foreign folders, stale caches, full disks, corrupt files.

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
from knnlm.knn import KNNArgs
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
def test_cut_off_weights_and_missing_tokenizer_name_the_model_folder(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: a cut-off model.safetensors was an internal error (SafetensorError); a model folder without tokenizer
    files loaded an empty-vocabulary tokenizer, and eval said "--validation_file: the corpus is empty"."""
    ev = ["eval", "--device", "cpu", "--validation_file", files / "b.txt", "--block_size", 32]
    weights = (tiny_gpt2_dir / "model.safetensors").read_bytes()
    for i, cut in enumerate((weights[:1000], weights[:-1000])):  # the header cut, then the tensors
        model = shutil.copytree(tiny_gpt2_dir, tmp_path / f"cut{i}")
        (model / "model.safetensors").write_bytes(cut)
        assert_one_line(*cli([*ev, "--model_name_or_path", model, "--output_dir", tmp_path / "out"], capsys),
                        "--model_name_or_path", str(model / "model.safetensors"), "is damaged")
        assert not (tmp_path / "out").exists()
    bare = shutil.copytree(tiny_gpt2_dir, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    assert_one_line(*cli([*ev, "--model_name_or_path", bare, "--output_dir", tmp_path / "out"], capsys),
                    "--model_name_or_path", str(bare), "has no tokenizer", "--tokenizer_name_or_path")
    assert not (tmp_path / "out").exists()
    rc, err = cli([*ev, "--model_name_or_path", bare, "--tokenizer_name_or_path", "gpt2", "--output_dir",
                   tmp_path / "out"], capsys)
    assert rc == 0, err


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
    # λ without a datastore or memory cannot act: refused (it was ignored), the folder's results kept
    kept = (out / "results.json").read_bytes()
    rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", out,
                   "--block_size", 32, "--lmbda", "0.5"], capsys)
    assert_one_line(rc, err, "--lmbda: a kNN setting, which acts only with --datastore")
    assert (out / "results.json").read_bytes() == kept
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
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_gpt2_dir)((files / "latin1.txt").read_bytes().decode("utf-8", "replace"))
    assert [int(v) for v in ds.vals] == ids["input_ids"][1:]  # the text with U+FFFD for the bad byte, every target


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
def test_a_replace_killed_before_its_marker_leaves_no_earlier_files_under_the_new_inputs(tmp_path, monkeypatch):
    """With --overwrite the new marker was written before the earlier run's files were removed: a kill in between left
    them under a marker naming the new inputs, and the rerun took them for its own (the review's repro: the old
    corpus's neighbour cache beside the new run's results). They now go first, the staged caches' pattern included."""
    from knnlm import fileio
    from knnlm.fileio import RUN_MARKER, claim_output_dir

    own = ("results.json", "neighbors", "neighbors.*-tmp", "keep")
    out = tmp_path / "run"
    claim_output_dir(out, "eval", {"corpus": "a"}, own_files=own)
    for name in ("results.json", "neighbors/k.txt", "neighbors.rebuild-tmp/k.txt", "keep/k.txt"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("a's")
    real = fileio.atomic_write_json

    def killed(path, *a, **kw):
        if Path(path).name == RUN_MARKER:
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(fileio, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        claim_output_dir(out, "eval", {"corpus": "b"}, True, own_files=own, remove_on_replace=True, keep=[out / "keep"])
    fileio.release_output_dirs()
    assert sorted(p.name for p in out.iterdir() if p.name != fileio.LOCK_FILE) == ["keep", RUN_MARKER]
    assert json.loads((out / RUN_MARKER).read_text())["inputs"] == {"corpus": "a"}  # the old marker, no old files


def test_a_users_file_named_like_a_temp_is_content_not_a_temp(tmp_path):
    """A folder holding only a user's `draft.tex.tmp-20241231` (or a folder `notes.tmp-4000000`) counted as empty, was
    claimed, and the claim deleted them as a killed run's temp files (the review's repro). Only temps of the command's
    own files are; a killed run's own temp still goes."""
    from knnlm.fileio import claim_output_dir

    out = tmp_path / "run"
    (out / "notes.tmp-4000000").mkdir(parents=True)
    (out / "draft.tex.tmp-20241231").write_text("mine")
    with pytest.raises(KnnlmError, match="other file"):
        claim_output_dir(out, "eval", {"corpus": "a"}, own_files=("results.json",))
    assert (out / "draft.tex.tmp-20241231").read_text() == "mine" and (out / "notes.tmp-4000000").is_dir()
    own = tmp_path / "own"
    own.mkdir()
    (own / "results.json.tmp-4000000").write_text("{")  # a killed run's (no live process 4000000)
    assert claim_output_dir(own, "eval", {"corpus": "a"}, own_files=("results.json",)) == "new"
    assert not (own / "results.json.tmp-4000000").exists()
    # reproduce's folder owns every name ("*"): a user's temp-like file there is still not a temp to delete
    repro = tmp_path / "repro"
    repro.mkdir()
    (repro / "notes.tmp-2024").write_text("mine")
    claim_output_dir(repro, "reproduce", {}, own_files=("*",))
    assert (repro / "notes.tmp-2024").read_text() == "mine"


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
    from knnlm.experiments.overspec.settings import OWN_FILES

    study = tmp_path / "study"
    (study / "seed-0").mkdir(parents=True)
    (study / "config.json").write_text("{}")
    (study / "overspec_control.png").write_bytes(b"")
    (study / "thesis.tex").write_text("x")
    with pytest.raises(KnnlmError, match="4 other file"):
        claim_output_dir(study, "overspec run", {}, own_files=OWN_FILES)
    (study / "thesis.tex").unlink()
    assert claim_output_dir(study, "overspec run", {}, own_files=OWN_FILES) == "same"


@pytest.mark.parametrize("text, shown", [("{not json", "not valid JSON"), ("[1, 2]", "not a knnlm run record: [1, 2]"),
                                         ('{"kind": 5}', 'not a knnlm run record: {"kind": 5}')])
def test_a_damaged_run_marker_is_corrupt_whatever_its_shape(tmp_path, text, shown):
    """A marker of valid JSON that is not a run record (a list) says no more about its folder than broken JSON: both
    are corrupt, with the same fix."""
    from knnlm.fileio import RUN_MARKER, claim_output_dir, describe_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / RUN_MARKER).write_text(text)
    with pytest.raises(KnnlmError) as e:
        claim_output_dir(out, "eval", {"corpus": "a"})
    marker = out / RUN_MARKER
    assert str(e.value).startswith(f"{marker} is corrupt ({shown}"), str(e.value)
    assert str(e.value).endswith(f"; delete {marker} if the folder is yours, or choose another --output_dir")
    assert (out / RUN_MARKER).read_text() == text  # left as it was
    assert describe_folder(out) == "a knnlm output folder"


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    from knnlm.fileio import atomic_write_text, remove_stale_temps

    (tmp_path / "a.json.tmp-999999999").write_text("x")  # no such process
    (tmp_path / f"a.json.tmp-{os.getppid()}").write_text("x")  # a live process (pytest's parent): kept
    atomic_write_text(tmp_path / "a.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", f"a.json.tmp-{os.getppid()}"]
    assert remove_stale_temps(tmp_path) == 0


# ---------------------------------------------------------------------- output folders, stores, caches, held-out checks
BAD_VALUES = {"null": "null", "a number": "3", "a float": "2.5", "a boolean": "true", "a list": "[1, 2]",
              "an object": '{"a": 1}'}


def test_non_string_text_fields_are_errors_or_skipped_and_counted(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: ``{"text": null}`` was tokenized as the word "None" (a number as its digits, a list as its repr)."""
    good = '{"text": "The river was seen by the people of Macondo ."}\n'
    clean = tmp_path / "clean.jsonl"
    clean.write_text(good * 3)
    ref = build_ds(tiny_gpt2_dir, clean, tmp_path / "ds-clean", capsys)
    for i, (what, value) in enumerate(BAD_VALUES.items()):
        corpus = tmp_path / f"bad{i}.jsonl"
        corpus.write_text(good + f'{{"text": {value}}}\n' + good * 2)
        rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", corpus, "--output_dir",
                       tmp_path / f"ds{i}", "--block_size", 32], capsys)
        assert_one_line(rc, err, f"bad{i}.jsonl:2", what.replace("a float", "a number"), "--skip_bad_rows")
        ds = build_ds(tiny_gpt2_dir, corpus, tmp_path / f"skip{i}", capsys, "--skip_bad_rows", "true")
        assert ds.meta["skipped_rows"] == 1 and ds.N == ref.N  # the clean rows only
        assert (ds.dir / "keys.f16").read_bytes() == (ref.dir / "keys.f16").read_bytes()
    data = tmp_path / "dataset"  # a local `datasets` folder: rows are checked the same way
    data.mkdir()
    (data / "train.jsonl").write_text(good + '{"text": null}\n' + good * 2)
    build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--dataset_name", data, "--block_size", 32]
    assert_one_line(*cli([*build, "--output_dir", tmp_path / "dsd"], capsys), "--dataset_name", "row 1", "null")
    assert_one_line(*cli([*build, "--train_file", clean, "--output_dir", tmp_path / "dsd"], capsys), "--train_file",
                    "both name the corpus")  # the file was ignored and the dataset read
    assert cli([*build, "--output_dir", tmp_path / "dsd2", "--skip_bad_rows", "true"], capsys)[0] == 0
    assert Datastore.open(tmp_path / "dsd2").meta["skipped_rows"] == 1
    (data / "train.jsonl").write_text('{"text": null}\n' * 3)  # before: "the corpus is empty ...; pass a file"
    assert_one_line(*cli([*build, "--output_dir", tmp_path / "dsd3", "--skip_bad_rows", "true"], capsys),
                    "--dataset_name: the corpus is empty (fewer than 2 tokens after --skip_bad_rows skipped 3 row(s) "
                    "without text); pass a dataset with text in it")
    corpus = tmp_path / "bad0.jsonl"
    rc, err = cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", corpus, "--output_dir", tmp_path / "ev"],
                  capsys)
    assert_one_line(rc, err, "bad0.jsonl:2", "null")
    m = eval_metrics(tiny_gpt2_dir, corpus, tmp_path / "ev", capsys, "--skip_bad_rows", "true", "--overwrite")
    assert m["skipped_rows"] == 1 and m["ppl_lm"] == eval_metrics(tiny_gpt2_dir, clean, tmp_path / "ev-c", capsys)["ppl_lm"]
    lm = ["lm", "train", "--size", "tiny", "--train_file", corpus, "--validation_file", files / "b.txt",
          "--max_steps", 1, "--block_size", 8, "--batch_size", 1, "--output_dir", tmp_path / "lm"]
    assert_one_line(*cli(lm, capsys), "bad0.jsonl:2", "null")
    assert cli([*lm, "--skip_bad_rows", "true", "--overwrite", "true"], capsys)[0] == 0
    assert json.loads((tmp_path / "lm" / "training.json").read_text())["skipped_rows"] == {"train": 1, "validation": 0}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The river"}\n{"prompt": 7}\n')
    gen = ["generate", *model_args(tiny_gpt2_dir), "--prompt_file", prompts, "--compare", "true", "--max_new_tokens", 2]
    assert_one_line(*cli(gen, capsys), "prompts.jsonl:2", "a number")
    assert cli([*gen, "--skip_bad_rows", "true", "--output_dir", tmp_path / "gen"], capsys)[0] == 0
    metrics = json.loads((tmp_path / "gen" / "results.json").read_text())["metrics"]
    assert metrics["skipped_prompt_rows"] == 1 and [s["prompt"] for s in metrics["samples"]] == ["The river"]


def test_table_corpora_are_read_by_their_text_column(tiny_gpt2_dir, tmp_path, capsys):
    """Before: a .csv/.tsv/.parquet corpus was read as plain text, its header and separators (or its bytes) tokenized."""
    import pandas as pd

    texts = ["The river was seen by the people of Macondo .", "Aureliano, who had a \"gold\" fish ,\ttalked .", "x"]
    rows = pd.DataFrame({"id": [1, 2, 3], "text": texts})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rows.to_csv(tmp_path / "c.csv", index=False)
    rows.to_csv(tmp_path / "c.tsv", index=False, sep="\t")
    rows.to_parquet(tmp_path / "c.parquet")
    ref = build_ds(tiny_gpt2_dir, tmp_path / "c.jsonl", tmp_path / "ds-jsonl", capsys)
    for suffix in ("csv", "tsv", "parquet"):
        ds = build_ds(tiny_gpt2_dir, tmp_path / f"c.{suffix}", tmp_path / f"ds-{suffix}", capsys)
        assert ds.N == ref.N and (ds.dir / "vals.i32").read_bytes() == (ref.dir / "vals.i32").read_bytes(), suffix
    build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", tmp_path / "c.csv"]
    assert_one_line(*cli([*build, "--text_field", "body", "--output_dir", tmp_path / "o1"], capsys), "--text_field",
                    "c.csv has no column 'body'", "['id', 'text']")
    # a row's text as written: 'NA', 'null', 'None', 'nan' and an empty cell are texts, as in JSONL (pandas read them
    # as missing values, so the build was refused, or with --skip_bad_rows dropped them)
    odd = ["NA", "null", "", "None", "nan", "x"]
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in odd))
    pd.DataFrame({"text": odd}).to_csv(tmp_path / "odd.csv", index=False)
    pd.DataFrame({"id": range(6), "text": odd}).to_csv(tmp_path / "odd.tsv", index=False, sep="\t")
    ref = build_ds(tiny_gpt2_dir, tmp_path / "odd.jsonl", tmp_path / "odd-jsonl", capsys)
    for suffix in ("csv", "tsv"):
        ds = build_ds(tiny_gpt2_dir, tmp_path / f"odd.{suffix}", tmp_path / f"odd-{suffix}", capsys)
        assert (ds.dir / "vals.i32").read_bytes() == (ref.dir / "vals.i32").read_bytes(), suffix
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not a parquet file")
    assert_one_line(*cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", tmp_path / "broken.parquet",
                          "--output_dir", tmp_path / "o3"], capsys), "--train_file", "cannot load", "broken.parquet")
    assert not any((tmp_path / o).exists() for o in ("o1", "o3"))


def test_corpus_flags_a_command_would_ignore_are_refused(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: each ran with exit 0, the flag silently ignored (a JSONL file named .txt read as plain text)."""
    build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt", "--output_dir",
             tmp_path / "ds"]
    assert_one_line(*cli([*build, "--validation_file", files / "b.txt"], capsys), "--validation_file",
                    "reads only --train_file")
    assert_one_line(*cli([*build, "--text_field", "body"], capsys), "--text_field", "a.txt is read as plain text")
    ev = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", tmp_path / "ev"]
    assert_one_line(*cli([*ev, "--train_file", files / "a.txt"], capsys), "--train_file", "reads only --validation_file")
    assert_one_line(*cli(["analyze", "projection", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt",
                          "--train_file", files / "a.txt", "--datastore", tmp_path / "ds", "--output_dir",
                          tmp_path / "pr"], capsys), "--train_file", "reads only --validation_file")
    assert_one_line(*cli(["hurdle", "run", "--validation_file", files / "b.txt", "--output_dir", tmp_path / "h"], capsys),
                    "--validation_file", "Macondo mode")
    assert_one_line(*cli(["reproduce", "--scale", "cpu", "--report_only", "true", "--output_dir", tmp_path / "r"], capsys),
                    "--report_only", "holds no reproduce run")
    assert not any((tmp_path / o).exists() for o in ("ds", "ev", "pr", "h", "r"))


def test_out_of_range_values_and_non_finite_keys_are_refused(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: values beyond the vocabulary gave a perplexity (and an internal error in generate); NaN keys passed
    eval, a Flat index, `mlp train` (a NaN memory, then `ppl_mlplm nan` with exit 0) and an IVF build said "use a
    smaller index"."""
    import numpy as np

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    assert ds.meta["vocab_size"] == 50257 and ds.meta["dtype"] == "float32"
    ev = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", tmp_path / "ev",
          "--block_size", 32, "--k", 8]
    bad = shutil.copytree(ds.dir, tmp_path / "oor")
    vals = np.fromfile(bad / "vals.i32", dtype=np.int32)
    vals[5] = 999999
    vals.tofile(bad / "vals.i32")
    for cmd in (ev, ["generate", *model_args(tiny_gpt2_dir), "--prompt", "The", "--max_new_tokens", 2],
                ["index", "build"], ["datastore", "verify"]):
        args = [bad] if cmd[0] in ("index", "datastore") else ["--datastore", bad]
        assert_one_line(*cli([*cmd, *args], capsys), "vals.i32", "outside [0, 50257)", "max 999999")
    meta = json.loads((bad / "meta.json").read_text())  # a store from before vocab_size was recorded: checked
    del meta["vocab_size"]  # against the model's vocabulary instead
    (bad / "meta.json").write_text(json.dumps(meta))
    assert_one_line(*cli([*ev, "--datastore", bad], capsys), "token id 999999", "vocabulary of 50257")

    nan = shutil.copytree(ds.dir, tmp_path / "nan")
    keys = np.fromfile(nan / "keys.f16", dtype=np.float16).reshape(ds.N, ds.d)
    keys[::10, 3] = np.nan  # 10% of the keys
    keys[7, 0] = np.inf
    keys.tofile(nan / "keys.f16")
    n_bad = len(range(0, ds.N, 10)) + 1
    assert_one_line(*cli([*ev, "--datastore", nan], capsys), "non-finite keys", "row 0", "datastore verify")
    assert not (tmp_path / "ev" / "results.json").exists()
    for factory in ("Flat", "IVF4,Flat"):
        assert_one_line(*cli(["index", "build", nan, "--factory", factory], capsys), "non-finite keys")
    rc, err = cli(["mlp", "train", *model_args(tiny_gpt2_dir), "--datastore", nan, "--output_dir", tmp_path / "mem",
                   "--max_steps", 2], capsys)
    assert_one_line(rc, err, "non-finite keys")
    assert_one_line(*cli(["datastore", "verify", nan], capsys), f"{n_bad} of {ds.N} keys are not finite",
                    "keys.f16 differs")


def test_pure_knn_lambda_one_is_not_blamed_on_the_store(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: --lmbda 1 (inside the documented [0, 1]) ran the whole eval, then said the store was corrupt; the
    infinite perplexity comes from p_knn(gold) = 0 where no neighbour holds the gold token. NaN still means corrupt."""
    from knnlm.cli.core import _refuse_non_finite

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    ev = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", tmp_path / "ev",
          "--block_size", 32, "--datastore", ds.dir, "--k", 2]
    for lmbdas in ("1", "0.25,1"):
        line = assert_one_line(*cli([*ev, "--lmbda", lmbdas], capsys), "--lmbda", "λ = 1", "below 1")
        assert "corrupt" not in line and "--datastore" not in line
        assert not (tmp_path / "ev" / "results.json").exists()
    assert cli([*ev, "--lmbda", "0.25", "--save_neighbors", "true"], capsys)[0] == 0  # the corrected rerun, same folder
    cached = ["eval", "--from_neighbors", tmp_path / "ev" / "neighbors", "--lmbda", "0.25,1", "--output_dir",
              tmp_path / "ev-cache"]  # the same refusal from a neighbour cache (it wrote a null perplexity, exit 0)
    line = assert_one_line(*cli(cached, capsys), "--lmbda", "λ = 1", "below 1")
    assert "corrupt" not in line and not (tmp_path / "ev-cache" / "results.json").exists()
    with pytest.raises(KnnlmError, match="--datastore: .* store is corrupt"):
        _refuse_non_finite({"ppl_lm": 5.0, "ppl_knnlm": float("nan"), "lmbda": 1.0, "k": 2,
                            "sweep_knn": {"1.0": float("nan")}})


def test_non_finite_keys_from_the_model_stop_the_build(tiny_gpt2_dir, files, tmp_path, capsys, monkeypatch):
    import numpy as np

    import knnlm.datastore as datastore_module

    real = datastore_module.encode_batches

    def overflowing(*args, **kwargs):  # float16 keys beyond ±65504 become inf
        for b, keys, vals in real(*args, **kwargs):
            yield b, np.full_like(keys, np.inf) if b == 1 else keys, vals

    monkeypatch.setattr(datastore_module, "encode_batches", overflowing)
    rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt", "--output_dir",
                   tmp_path / "ds", "--block_size", 32, "--batch_size", 1], capsys)
    assert_one_line(rc, err, "non-finite 'ffn_input' keys", "--dtype float32")
    assert not (tmp_path / "ds" / "meta.json").exists()


def test_datastore_verify_intact_padded_and_bit_flipped(tiny_gpt2_dir, files, tmp_path, capsys, monkeypatch):
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    assert set(ds.meta["sha256"]) == {"keys.f16", "vals.i32", "tokens.i32", "tokens.i32.docs"}
    assert cli(["index", "build", ds.dir, "--factory", "Flat"], capsys)[0] == 0
    originals = {p.name: p.read_bytes() for p in ds.dir.iterdir() if p.is_file()}
    rc = main(["datastore", "verify", str(ds.dir)])
    out = capsys.readouterr().out
    assert rc == 0 and "intact" in out and "keys.f16, vals.i32, tokens.i32" in out and "shard0.faiss" in out
    keys = ds.dir / "keys.f16"
    good = keys.read_bytes()
    keys.write_bytes(good[:-100] + b"\0" * 100)  # truncated, then padded back to its size
    assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), "keys.f16 differs", "--overwrite")
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # one bit
    keys.write_bytes(bytes(flipped))
    line = assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), "keys.f16 differs")
    assert "vals.i32" not in line and "tokens.i32" not in line
    tokens = ds.dir / "tokens.i32"
    tokens.write_bytes(tokens.read_bytes()[:-4] + b"\1\0\0\0")
    assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), "keys.f16 differs", "tokens.i32 differs")
    tokens.write_bytes(originals["tokens.i32"])
    keys.write_bytes(good)
    shard = ds.dir / "index" / "shard0.faiss"
    shard_bytes = shard.read_bytes()
    shard.write_bytes(shard_bytes[:-8] + bytes(8))
    line = assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), "shard0.faiss", "index build")
    # before: the index's fix and the whole store's, both (the store is intact: only the index needs rebuilding)
    assert line.count("rebuild") == 1 and "datastore build" not in line, line
    keys.write_bytes(good[:-4] + bytes(4))  # the store too: its rebuild first, then the index's
    line = assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), "keys.f16 differs", "its index too",
                           "datastore build", "index build")
    keys.write_bytes(good)
    shard.write_bytes(shard_bytes)
    info = ds.dir / "index" / "index.json"
    info_text = info.read_text()
    info.write_text("garbage")  # before: "... (char 0)); rebuild ...; rebuild ...", a stray ')' and two fixes
    line = assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), f"datastore: {info} is corrupt",
                           "(not valid JSON: Expecting value: line 1 column 1 (char 0)); rebuild the index")
    assert line.count("rebuild") == 1, line
    info.write_text(info_text)
    assert cli(["datastore", "verify", ds.dir], capsys)[0] == 0
    # clusters (RetoMaton's) are checked too: a cut clusters.i32 passed as "intact", a broken record was "no clusters"
    assert cli(["datastore", "cluster", ds.dir, "--num_clusters", 4, "--sample_size", 200], capsys)[0] == 0
    assert main(["datastore", "verify", str(ds.dir)]) == 0 and "4 clusters built from it" in capsys.readouterr().out
    clusters = ds.dir / "clusters.i32"
    clusters_bytes = clusters.read_bytes()
    clusters.write_bytes(clusters_bytes[:100])
    assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), "clusters.i32 was not built from this datastore",
                    "datastore cluster")
    clusters.write_bytes(clusters_bytes)
    record = ds.dir / "clusters.json"
    record_text = record.read_text()
    record.write_text("garbage")
    assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), "clusters.json is damaged", "datastore cluster")
    record.write_text(record_text)
    assert cli(["datastore", "verify", ds.dir], capsys)[0] == 0
    (ds.dir / "clusters.i32").unlink()
    record.unlink()
    # a truncated store: its own error says --overwrite, and --overwrite (same inputs) rebuilds it
    keys.write_bytes(good[:-64])
    assert_one_line(*cli(["datastore", "verify", ds.dir], capsys), "truncated", "--overwrite")
    again = build_ds(tiny_gpt2_dir, files / "a.txt", ds.dir, capsys, "--overwrite")
    assert keys.read_bytes() == good and again.meta["sha256"] == ds.meta["sha256"]
    keys.write_bytes(bytes(flipped))  # a bit flip is found by --overwrite's check too
    build_ds(tiny_gpt2_dir, files / "a.txt", ds.dir, capsys, "--overwrite")
    assert keys.read_bytes() == good
    # an intact one is kept as it is: nothing encoded, none of the store's files rewritten or replaced (config.json,
    # the command's record of its arguments, is written anew by every command)
    def stamps():
        return {str(p.relative_to(ds.dir)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
                for p in sorted(ds.dir.rglob("*")) if p.is_file() and p.name not in (".knnlm.lock", "config.json")}

    import knnlm.datastore as datastore_module

    before = stamps()
    assert "keys.f16" in before and "meta.json" in before
    monkeypatch.setattr(datastore_module, "encode_batches",
                        lambda *a, **k: pytest.fail("--overwrite re-encoded an intact store of the same inputs"))
    build_ds(tiny_gpt2_dir, files / "a.txt", ds.dir, capsys, "--overwrite")
    assert stamps() == before


_HOLDER = """
import sys
from knnlm.fileio import claim_output_dir
claim_output_dir(sys.argv[1], "datastore build", {"held": True}, own_files=("*",))
print("held", flush=True)
sys.stdin.read()
"""


def _knnlm_env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tiny_gpt2_dir, files,
                                                                                         tmp_path, capsys):
    """Before: the second build failed with "cannot write dsc/done.u8 (No such file or directory)"."""
    import signal
    import socket
    import sys

    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=_knnlm_env(), text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt", "--output_dir",
                 out, "--block_size", 32]
        assert_one_line(*cli(build, capsys), "in use", f"another knnlm process, pid {holder.pid} on "
                        f"{socket.gethostname()}", "building this store")
        assert_one_line(*cli(["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "a.txt",
                              "--output_dir", out], capsys), f"pid {holder.pid}", "building this store")
        assert_one_line(*cli(["macondo", "generate", "--output_dir", out], capsys), f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / ".knnlm.lock").read_text())["pid"] == holder.pid  # left behind by the killed process
    (out / "knnlm-run.json").unlink()  # (the holder's claim of other inputs)
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", out, capsys)  # the dead process's lock is taken over
    assert ds.N > 0 and not (out / ".knnlm.lock").exists()  # released at the end of the command


_LOCK_HOLDER = """
import sys
from knnlm.fileio import lock_output_dir
lock_output_dir(sys.argv[1], "datastore build")
print("held", flush=True)
sys.stdin.read()
"""


def _snapshot(folder: Path) -> dict:
    """relative path -> bytes of every file below ``folder`` (None for a folder: a new empty one shows too)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_two_concurrent_builds_into_one_folder(tiny_gpt2_dir, files, tmp_path, capsys):
    """A build into a folder whose lock a live process holds is refused, naming it, and writes nothing; two real
    processes building one store leave it equal to a clean build (whether the second meets the first's lock there
    depends on timing, hence the held folder)."""
    import socket
    import sys

    clean = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "clean", capsys)
    stores = ("keys.f16", "vals.i32", "tokens.i32")
    held = tmp_path / "held"  # locked, empty otherwise, by a process that is not the command's
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(held)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=_knnlm_env(), text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(held)
        assert list(before) == [".knnlm.lock"] and json.loads(before[".knnlm.lock"])["pid"] == holder.pid
        build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt", "--output_dir",
                 held, "--block_size", 32]
        assert_one_line(*cli(build, capsys), f"{held} is in use", f"another knnlm process, pid {holder.pid} on "
                        f"{socket.gethostname()}", "building this store")
        assert _snapshot(held) == before  # nothing written; the lock record still names the holder
    finally:
        holder.stdin.close()  # the holder exits, releasing its lock
        holder.wait(timeout=60)
    assert holder.returncode == 0 and not (held / ".knnlm.lock").exists()
    rerun = build_ds(tiny_gpt2_dir, files / "a.txt", held, capsys)
    for name in stores:
        assert (rerun.dir / name).read_bytes() == (clean.dir / name).read_bytes()

    out = tmp_path / "ds"
    argv = [sys.executable, "-m", "knnlm", "datastore", "build", *model_args(tiny_gpt2_dir), "--train_file",
            str(files / "a.txt"), "--output_dir", str(out), "--block_size", "32", "--batch_size", "1"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_knnlm_env(), text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0, results
    for rc, err in results:
        if rc != 0:  # started while the other was building: refused, naming it
            assert rc == 2 and "another knnlm process, pid" in err and "Traceback" not in err, err
    for name in stores:
        assert (out / name).read_bytes() == (clean.dir / name).read_bytes()


def test_overwrite_never_deletes_what_is_not_the_commands(tiny_gpt2_dir, files, tmp_path, capsys, monkeypatch):
    """Before: `macondo generate --overwrite` rmtree'd its folder whatever it held, `--output_dir .` failed with
    "ValueError: empty name", `lm train --overwrite` deleted a user's file and a store in its folder, `datastore build
    --overwrite` dropped unknown files, and `generate --output_dir` replaced an earlier run's results silently."""
    small = ["--num_villagers", 40, "--num_parents", 4, "--max_children", 2]
    model = shutil.copytree(tiny_gpt2_dir, tmp_path / "model")
    before = _snapshot(model)
    assert_one_line(*cli(["macondo", "generate", "--output_dir", model, "--overwrite", *small], capsys), "a model")
    assert _snapshot(model) == before
    data = tmp_path / "data"
    assert cli(["macondo", "generate", "--output_dir", data, *small], capsys)[0] == 0
    (data / "notes.txt").write_text("mine")
    assert_one_line(*cli(["macondo", "generate", "--output_dir", data, "--seed", 1, "--overwrite", *small], capsys),
                    "notes.txt", "never deletes")
    assert (data / "notes.txt").read_text() == "mine"
    (data / "notes.txt").unlink()
    assert_one_line(*cli(["macondo", "generate", "--output_dir", data, "--seed", 1, *small], capsys), "--overwrite")
    assert cli(["macondo", "generate", "--output_dir", data, "--seed", 1, "--overwrite", *small], capsys)[0] == 0
    assert json.loads((data / "meta.json").read_text())["seed"] == 1
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert cli(["macondo", "generate", "--output_dir", ".", *small], capsys)[0] == 0
    assert (here / "train.jsonl").is_file() and not list(here.glob("*tmp*"))
    monkeypatch.chdir(tmp_path)

    lm_dir = tmp_path / "lm"
    lm = ["lm", "train", "--size", "tiny", "--train_file", files / "a.txt", "--validation_file", files / "b.txt",
          "--max_steps", 1, "--block_size", 16, "--batch_size", 2, "--output_dir", lm_dir]
    assert cli(lm, capsys)[0] == 0
    (lm_dir / "notes.txt").write_text("mine")
    build_ds(lm_dir, files / "a.txt", lm_dir / "ds", capsys, "--block_size", 16)
    kept = _snapshot(lm_dir)
    for extra in ([], ["--learning_rate", 0.01]):
        assert_one_line(*cli([*lm, *extra, "--overwrite", "true"], capsys), "2 file(s)", "e.g. ds", "never deletes")
        assert _snapshot(lm_dir) == kept
    (lm_dir / "notes.txt").unlink()
    shutil.rmtree(lm_dir / "ds")
    assert cli([*lm, "--learning_rate", 0.01, "--overwrite", "true"], capsys)[0] == 0
    assert json.loads((lm_dir / "training.json").read_text())["train_args"]["learning_rate"] == 0.01

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    (ds.dir / "README.txt").write_text("how I built it")
    (ds.dir / "experiments").mkdir()
    (ds.dir / "experiments" / "run1.json").write_text("{}")
    kept = _snapshot(ds.dir)
    rc, err = cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "b.txt", "--output_dir",
                   ds.dir, "--block_size", 32, "--overwrite"], capsys)
    assert_one_line(rc, err, "README.txt", "never deletes")
    assert _snapshot(ds.dir) == kept and not (tmp_path / "ds.rebuild-tmp").exists()

    gen = ["generate", *model_args(tiny_gpt2_dir), "--prompt", "The", "--compare", "true", "--max_new_tokens", 2,
           "--output_dir", tmp_path / "gen"]
    assert cli(gen, capsys)[0] == 0
    first = (tmp_path / "gen" / "results.json").read_text()
    assert_one_line(*cli([*gen, "--max_new_tokens", 3], capsys), "--overwrite", "max_new_tokens")
    assert (tmp_path / "gen" / "results.json").read_text() == first
    assert cli([*gen[:-2], "--max_new_tokens", 3, "--output_dir", tmp_path / "gen", "--overwrite"], capsys)[0] == 0
    assert json.loads((tmp_path / "gen" / "results.json").read_text())["config"]["max_new_tokens"] == 3


def test_eval_from_neighbors_honours_or_refuses_k_and_temperature(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: --k, --knn_temp, --model_name_or_path and --datastore were ignored but recorded (a k = 64 cache run
    with --k 16 was labelled k = 16)."""
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "full", capsys, "--datastore", ds.dir, "--k", 16,
                 "--save_neighbors", "true")
    cache = tmp_path / "full" / "neighbors"
    for k, temp in ((8, 1.0), (16, 2.0), (8, 0.5)):
        real = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / f"real{k}-{temp}", capsys, "--datastore", ds.dir,
                            "--k", k, "--knn_temp", temp)
        rc, err = cli(["eval", "--from_neighbors", cache, "--k", k, "--knn_temp", temp, "--output_dir",
                       tmp_path / f"c{k}-{temp}"], capsys)
        assert rc == 0, err
        res = json.loads((tmp_path / f"c{k}-{temp}" / "results.json").read_text())
        assert res["metrics"]["sweep_knn_cached"][f"lmbda=0.25,T={temp}"] == pytest.approx(real["ppl_knnlm"], rel=1e-5)
        assert (res["config"]["k"], res["config"]["knn_temp"], res["metrics"]["k_cached"]) == (k, temp, 16)
        assert res["config"]["datastore"] == str(ds.dir) and res["config"]["model_name_or_path"] == str(tiny_gpt2_dir)
    assert_one_line(*cli(["eval", "--from_neighbors", cache, "--k", 32, "--output_dir", tmp_path / "c32"], capsys),
                    "--k", "16 neighbours", "--save_neighbors")
    other = build_ds(tiny_gpt2_dir, files / "b.txt", tmp_path / "other", capsys)
    assert_one_line(*cli(["eval", "--from_neighbors", cache, "--datastore", other.dir, "--output_dir",
                          tmp_path / "c-other"], capsys), "--datastore", "cannot change it")
    # a later eval into the cache's folder with another search setting and no cache replaces config.json but keeps
    # neighbors/: the cache names its own settings (it was read from config.json, so --ignore_top true was accepted
    # and the sweep of a cache made without it recorded as an --ignore_top run)
    eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "full", capsys, "--datastore", ds.dir, "--k", 16,
                 "--ignore_top", "true")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["ignore_top"] is True
    assert_one_line(*cli(["eval", "--from_neighbors", cache, "--ignore_top", "true", "--output_dir",
                          tmp_path / "c-top"], capsys), "--ignore_top", "made with ignore_top False")


def test_a_damaged_neighbour_cache_is_a_one_line_error_naming_its_file(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: a cut-off dists.f32 or a k.txt of garbage or of another k was an internal error (a reshape or int()
    ValueError), a cache without gold.i32 "No such file ...; check the path", and a NaN distance exit 0 with a
    perplexity of null."""
    import numpy as np

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "full", capsys, "--datastore", ds.dir, "--k", 16,
                 "--save_neighbors", "true")
    good = tmp_path / "full" / "neighbors"
    dists = (good / "dists.f32").read_bytes()
    nan = np.frombuffer(dists, dtype=np.float32).copy()
    nan[37] = np.nan
    for i, (name, damaged, needle) in enumerate([
            ("dists.f32", dists[:100], "dists.f32 holds 100 bytes"),  # not whole rows
            ("dists.f32", dists[:6400], "dists.f32 holds 6400 bytes"),  # whole rows, too few tokens
            ("k.txt", b"garbage\n", "k.txt holds 'garbage'"),
            ("k.txt", b"32", "k = 32"),  # the files hold k = 16
            ("gold.i32", None, "incomplete neighbour cache (no gold.i32)"),
            ("dists.f32", nan.tobytes(), "dists.f32 holds nan")]):
        cache = tmp_path / f"bad{i}"
        shutil.copytree(good, cache)
        (cache / name).unlink() if damaged is None else (cache / name).write_bytes(damaged)
        out = tmp_path / f"out{i}"
        assert_one_line(*cli(["eval", "--from_neighbors", cache, "--k", 8, "--output_dir", out], capsys),
                        "--from_neighbors", str(cache), needle, "--save_neighbors true")
        assert not out.exists()


def test_validation_datastore_of_training_text_is_refused(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: a held-out store built from the first part of the training text was accepted as held out."""
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    (tmp_path / "prefix.txt").write_text(TEXT_A[: len(TEXT_A) // 3])
    prefix = build_ds(tiny_gpt2_dir, tmp_path / "prefix.txt", tmp_path / "prefix", capsys)
    assert prefix.meta["corpus_hash"] != ds.meta["corpus_hash"]
    mlp = ["mlp", "train", *model_args(tiny_gpt2_dir), "--datastore", ds.dir, "--max_steps", 1]
    assert_one_line(*cli([*mlp, "--validation_datastore", prefix.dir, "--output_dir", tmp_path / "m1"], capsys),
                    "--validation_datastore", "occur verbatim in the training corpus")
    held = build_ds(tiny_gpt2_dir, files / "b.txt", tmp_path / "held", capsys)
    rc, err = cli([*mlp, "--validation_datastore", held.dir, "--output_dir", tmp_path / "m2"], capsys)
    assert rc == 0, err


def test_smaller_issue_30_cases(tiny_gpt2_dir, files, tmp_path, capsys):
    import math

    from knnlm.report import write_results

    assert_one_line(*cli(["macondo", "generate", "--output_dir", tmp_path / "m", "--seed", -1], capsys), "--seed",
                    "[0, 2**32)")
    assert not (tmp_path / "m").exists()
    assert_one_line(*cli(["generate", *model_args(tiny_gpt2_dir), "--prompt", "The", "--compare", "true",
                          "--num_beams", 60000], capsys), "--num_beams", "[1, 64]")
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    for cmd in (["eval", "--validation_file", files / "a.txt", "--output_dir", tmp_path / "ev"],
                ["generate", "--prompt", "The"], ["mlp", "train", "--output_dir", tmp_path / "mem"]):
        assert_one_line(*cli([*cmd, *model_args(tiny_gpt2_dir), "--datastore", loop], capsys), str(loop), "symlink")
    assert_one_line(*cli(["datastore", "build", *model_args(tiny_gpt2_dir), "--train_file", files / "a.txt",
                          "--output_dir", loop], capsys), "symlink")
    write_results(tmp_path / "r", {"lmbda": 0.0}, {"ratio": math.nan, "gain": -math.inf, "ok": [1.0, math.nan]})
    assert json.loads((tmp_path / "r" / "results.json").read_text())["metrics"] == {"ratio": None, "gain": None,
                                                                                    "ok": [1.0, None]}
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    assert_one_line(*cli(["eval", *model_args(tiny_gpt2_dir), "--dtype", "bfloat16", "--validation_file",
                          files / "b.txt", "--datastore", ds.dir, "--output_dir", tmp_path / "ev16"], capsys),
                    "different model weights", "in float32", "--dtype float32")


def test_backward_through_an_augmented_model_is_a_clear_error(tiny_lm, files, tmp_path, capsys):
    import torch

    import knnlm

    ds = build_ds(Path(tiny_lm.name), files / "a.txt", tmp_path / "ds", capsys)
    model = knnlm.augment(tiny_lm, datastore=ds.dir, k=4)
    try:  # tiny_lm is the session's: no hook may outlive this test, even a failed one
        ids = torch.tensor([tiny_lm.encode("The river of Macondo was seen")])
        out = model(input_ids=ids, labels=ids)
        with pytest.raises(KnnlmError, match="inference-only.*detach"):
            out.loss.backward()
        with torch.no_grad():  # inference is unchanged: no wrapper, same numbers
            again = model(input_ids=ids, labels=ids)
        assert torch.equal(again.logits, out.logits.detach()) and not again.logits.requires_grad
    finally:
        knnlm.detach(model)
    assert not hasattr(model, "knnlm")


def test_a_swap_killed_between_its_renames_restores_the_old_store(tiny_gpt2_dir, files, tmp_path, capsys):
    """A rebuild killed after moving the old store aside: the rerun puts it back (the folder lock must not hide it)."""
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    assert cli(["index", "build", ds.dir, "--factory", "Flat"], capsys)[0] == 0  # (a fresh build would have none)
    before = {p.name: p.read_bytes() for p in (ds.dir / "index").iterdir()}
    os.replace(ds.dir, tmp_path / "ds.replaced-tmp")  # the state between the two renames of swap_into_place
    again = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)  # the old store's own inputs
    assert {p.name: p.read_bytes() for p in (again.dir / "index").iterdir()} == before
    assert not (tmp_path / "ds.replaced-tmp").exists()


def test_ctrl_c_while_the_cli_starts_is_one_line(monkeypatch, capsys):
    """Before: a Ctrl-C in the first seconds (the parser imports every command, then transformers) was a traceback."""
    import knnlm.cli as cli_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "build_parser", interrupted)
    assert cli_module.main(["eval", "--help"]) == 130
    assert capsys.readouterr().err == "knnlm: interrupted\n"


def test_knn_settings_without_a_datastore_or_memory_are_refused(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: an LM-only eval, generate --compare or serve ran with --k, --retomaton, a search backend silently
    ignored (the run looked like the kNN-LM asked for)."""
    ev = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", tmp_path / "ev"]
    for flag, value in (("--k", 5), ("--retomaton", "true"), ("--search_backend", "torch"), ("--knn_temp", 2)):
        assert_one_line(*cli([*ev, flag, value], capsys), f"{flag}: a kNN setting, which acts only with --datastore")
    assert_one_line(*cli(["generate", *model_args(tiny_gpt2_dir), "--prompt", "The", "--compare", "true",
                          "--max_new_tokens", 2, "--k", 5], capsys), "--k: a kNN setting")
    assert_one_line(*cli(["serve", *model_args(tiny_gpt2_dir), "--port", 0, "--lmbda", 0.5], capsys),
                    "--lmbda: a kNN setting")
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("settings, datastore, memory, refused", [
    ({"search_nlist": 4}, True, False, "--search_nlist: acts only with --search_backend torch"),
    ({"search_dtype": "float32", "search_backend": "faiss"}, True, False, "--search_dtype: acts only with --search_backend torch"),
    ({"ray_shard_cpus": 4.0}, True, False, "--ray_shard_cpus: acts only with --search_backend ray"),
    ({"ray_address": "auto", "search_backend": "torch"}, True, False, "--ray_address: acts only with --search_backend ray"),
    ({"min_knns": 2}, True, False, "--min_knns: acts only with --retomaton true"),
    ({"no_clusters": False}, True, False, "--no_clusters: acts only with --retomaton true"),
    ({"k": 5}, False, True, "--k: a kNN setting, which acts only with --datastore (or, for --lmbda, --mlp_memory); an MLP memory reads --lmbda alone; drop --k"),
    ({"retomaton": True}, False, True, "--retomaton: a kNN setting"),
    ({"lmbda": [0.5]}, False, False, "--lmbda: a kNN setting"),
    ({"lmbda": [0.5]}, False, True, None),
    ({"search_nlist": 4, "search_dtype": "float32", "search_backend": "torch"}, True, False, None),
    ({"ray_shard_cpus": 4.0, "search_backend": "ray"}, True, False, None),
    ({"min_knns": 2, "no_clusters": False, "retomaton": True}, True, False, None),
    ({"k": 5, "knn_temp": 2.0, "nprobe": 4}, True, True, None),
])
def test_knn_settings_this_run_would_not_read_are_refused(settings, datastore, memory, refused):
    """Before: with a datastore, another backend's settings and RetoMaton's without --retomaton were ignored, and so was
    every kNN setting but λ beside an MLP memory (the run looked like the one asked for)."""
    args = KNNArgs(**settings)
    if refused is None:
        args.refuse_inactive(datastore, memory)
    else:
        with pytest.raises(KnnlmError) as err:
            args.refuse_inactive(datastore, memory)
        assert str(err.value).startswith(refused), str(err.value)


def test_another_backends_settings_are_refused_by_eval_before_any_work(tiny_gpt2_dir, files, tmp_path, capsys):
    build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    ev = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--datastore", tmp_path / "ds",
          "--output_dir", tmp_path / "ev"]
    assert_one_line(*cli([*ev, "--search_nlist", 4], capsys), "--search_nlist: acts only with --search_backend torch")
    assert_one_line(*cli([*ev, "--min_knns", 2], capsys), "--min_knns: acts only with --retomaton true")
    assert not (tmp_path / "ev").exists()


def test_sigterm_stops_a_run_with_one_line_and_the_shells_exit_code(files, tmp_path):
    """Before: SIGTERM (a scheduler's stop, `kill`) ended `lm train` at once, exit 143 with nothing said and its
    lock file left behind; now it stops as on Ctrl-C, after the last checkpoint, and says how to resume."""
    import signal
    import sys
    import time

    out = tmp_path / "lm"
    argv = [sys.executable, "-m", "knnlm", "lm", "train", "--train_file", str(files / "a.txt"), "--validation_file",
            str(files / "b.txt"), "--output_dir", str(out), "--size", "tiny", "--block_size", "32", "--batch_size", "2",
            "--max_steps", "1000000", "--eval_every", "1000000", "--eval_tokens", "64", "--checkpoint_every", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_knnlm_env(), text=True)
    try:
        deadline = time.time() + 120
        latest = out / "work" / "checkpoint" / "latest.json"
        while not (latest.is_file() and json.loads(latest.read_text())["step"] >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "knnlm: stopped by SIGTERM; rerun the same command to resume", err
    assert not (out / ".knnlm.lock").exists()  # released as at the end of any command
    assert json.loads(latest.read_text())["step"] >= 2  # the checkpoints made are kept


def test_an_interrupt_inside_a_stage_is_reported_once_by_the_outer_command(monkeypatch, capsys):
    """`knnlm reproduce` runs each stage through main() inside its own main(): the interrupt reaches the outer one,
    which says it once (before: the stage's main printed "interrupted" and returned 130, then reproduce reported
    "stage a failed (exit 130); fix the cause"). The SIGTERM handler is the caller's again after main()."""
    import signal

    import knnlm.cli as cli_module

    seen = []

    def fake_main(argv):
        seen.append(argv)
        if argv == ["outer"]:
            seen.append(cli_module.main(["stage"]))  # not reached: the stage's interrupt goes through
        raise cli_module.Terminated()

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli_module, "_main", fake_main)
    assert cli_module.main(["outer"]) == 143
    assert seen == [["outer"], ["stage"]]
    assert capsys.readouterr().err == "knnlm: stopped by SIGTERM; rerun the same command to resume\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_local_dataset_folder_is_known_by_its_contents(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: a `--dataset_name` folder was recorded by its name only: after its rows changed, `datastore build`
    said "already complete" and kept the old store, and `eval` reused the old tokens and gave the old numbers."""
    data = tmp_path / "dataset"
    data.mkdir()
    lines = [f"{sentence.strip()} ." for sentence in TEXT_A.split(" .") if sentence.strip()]  # 60 rows
    (data / "train.jsonl").write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines))
    (data / "validation.jsonl").write_text((data / "train.jsonl").read_text())
    build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--dataset_name", data, "--block_size", 32,
             "--output_dir", tmp_path / "ds"]
    ev = ["eval", *model_args(tiny_gpt2_dir), "--dataset_name", data, "--block_size", 32, "--output_dir", tmp_path / "ev"]
    assert cli(build, capsys)[0] == 0 and cli(ev, capsys)[0] == 0
    n_before = Datastore.open(tmp_path / "ds").N
    tokens_before = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]["n_tokens"]
    assert cli(build, capsys)[0] == 0 and Datastore.open(tmp_path / "ds").N == n_before  # unchanged: reused
    half = "".join(json.dumps({"text": ln}) + "\n" for ln in lines[: len(lines) // 2])
    (data / "train.jsonl").write_text(half)
    (data / "validation.jsonl").write_text(half)
    assert_one_line(*cli(build, capsys), "already holds a different datastore", "--overwrite")
    assert_one_line(*cli(ev, capsys), "--overwrite")
    assert cli([*build, "--overwrite"], capsys)[0] == 0
    assert 0 < Datastore.open(tmp_path / "ds").N < n_before
    assert cli([*ev, "--overwrite"], capsys)[0] == 0
    assert 0 < json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]["n_tokens"] < tokens_before
    (data / "train.jsonl").write_text("")  # before: internal error (IndexError) from datasets' empty StopIteration
    assert_one_line(*cli([*build[:-1], tmp_path / "ds-empty"], capsys), "--dataset_name", "it holds no rows")
    assert not (tmp_path / "ds-empty").exists()


def test_a_hub_dataset_is_known_by_its_revision(tiny_gpt2_dir, tmp_path, capsys, monkeypatch, caplog):
    """Before: a hub dataset was recorded by its name, config and split only: after it was updated on the hub (another
    revision: other rows), `datastore build` said "already complete" and kept the old store. The hub is out of reach
    here: `datasets.load_dataset` hands back the rows of the revision the test sets, with `datasets`' fingerprint of
    each (as it does for a hub dataset, whose fingerprint follows its revision)."""
    import datasets

    sentences = [f"{s.strip()} ." for s in TEXT_A.split(" .") if s.strip()]
    revisions = {"a": datasets.Dataset.from_dict({"text": sentences}),
                 "b": datasets.Dataset.from_dict({"text": sentences[: len(sentences) // 2]})}
    assert revisions["a"]._fingerprint != revisions["b"]._fingerprint
    current = {"revision": "a"}
    loads = []

    def load_dataset(name, config=None, split=None, **kw):
        loads.append((name, config, split))
        return revisions[current["revision"]]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--dataset_name", "someone/corpus", "--block_size", 32,
             "--output_dir", tmp_path / "ds"]
    assert cli(build, capsys)[0] == 0
    n_a = Datastore.open(tmp_path / "ds").N
    assert cli(build, capsys)[0] == 0 and Datastore.open(tmp_path / "ds").N == n_a  # the same revision: reused
    current["revision"] = "b"
    assert_one_line(*cli(build, capsys), "already holds a different datastore", "--overwrite")
    assert Datastore.open(tmp_path / "ds").N == n_a  # kept until the user says --overwrite
    assert cli([*build, "--overwrite"], capsys)[0] == 0
    assert 0 < Datastore.open(tmp_path / "ds").N < n_a
    assert set(loads) == {("someone/corpus", None, "train")}
    # a store recorded before the revision was kept (no fingerprint in its records) is this revision's, with a warning:
    # refusing it would have every such store rebuilt to learn nothing
    for name in ("meta.json", "knnlm-run.json"):
        record = json.loads((tmp_path / "ds" / name).read_text())
        recorded = record["build"] if name == "meta.json" else record["inputs"]
        del recorded["source"]["fingerprint"]
        (tmp_path / "ds" / name).write_text(json.dumps(record))
    n_b = Datastore.open(tmp_path / "ds").N
    caplog.clear()
    assert cli(build, capsys)[0] == 0
    said = [r.getMessage() for r in caplog.records if "before hub datasets were known" in r.getMessage()]
    assert said == ["a record of someone/corpus made before hub datasets were known by their revision: taken "
                    "as this revision's (if the dataset changed on the hub since, pass --overwrite)"]  # once
    assert Datastore.open(tmp_path / "ds").N == n_b


def test_datasets_saved_to_disk_and_dataset_errors_name_their_flag(tiny_gpt2_dir, files, tmp_path, capsys):
    """Before: a Dataset.save_to_disk folder was refused with datasets' advice to "use load_from_disk"; an empty
    saved dataset was "no column 'text'" listing state.json's keys; a wrong split or config named --dataset_name;
    a file given as --dataset_name was looked up on the hub."""
    import datasets

    rows = {"text": [f"{s.strip()} ." for s in TEXT_A.split(" .") if s.strip()]}
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows["text"]))
    ref = build_ds(tiny_gpt2_dir, tmp_path / "rows.jsonl", tmp_path / "ref", capsys)
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": []})}).save_to_disk(str(tmp_path / "empty"))
    build = ["datastore", "build", *model_args(tiny_gpt2_dir), "--block_size", 32]
    for name in ("one", "dict"):
        assert cli([*build, "--dataset_name", tmp_path / name, "--output_dir", tmp_path / f"ds-{name}"], capsys)[0] == 0
        assert (tmp_path / f"ds-{name}" / "keys.f16").read_bytes() == (ref.dir / "keys.f16").read_bytes()
    cases = [(["--dataset_name", tmp_path / "dict", "--split", "test"], "--split", "has no split 'test' (it has train)"),
             (["--dataset_name", tmp_path / "dict", "--dataset_config_name", "x"], "--dataset_config_name",
              "no configurations"),
             (["--dataset_name", tmp_path / "empty"], "--dataset_name", "it holds no rows"),
             (["--dataset_name", files / "a.txt"], "--dataset_name", "is a file; pass it as --train_file")]
    for i, (argv, *needles) in enumerate(cases):
        assert_one_line(*cli([*build, *argv, "--output_dir", tmp_path / f"bad{i}"], capsys), *needles)
        assert not (tmp_path / f"bad{i}").exists()
    data = tmp_path / "jsonl"  # a folder of JSONL files read by datasets' builder: its error names --split
    data.mkdir()
    shutil.copy(tmp_path / "rows.jsonl", data / "train.jsonl")
    assert_one_line(*cli(["eval", *model_args(tiny_gpt2_dir), "--dataset_name", data, "--block_size", 32,
                          "--output_dir", tmp_path / "ev"], capsys), "--split", 'Unknown split "validation"')


def test_eval_from_neighbors_with_a_smaller_k_equals_that_search_on_an_ivf_pq_index(tiny_gpt2_dir, files, tmp_path,
                                                                                    capsys):
    """With --recompute_dists the cache holds exact distances in the index's order: re-sorting them kept neighbours
    better than a k-search of the index returns (before: the sweep's perplexity was lower than the real run's)."""
    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    rc, err = cli(["index", "build", ds.dir, "--factory", "IVF2,PQ4x4", "--nprobe", 1, "--recall_queries", 0], capsys)
    assert rc == 0, err
    knn = ["--datastore", ds.dir, "--recompute_dists", "true", "--nprobe", 1]
    eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "full", capsys, *knn, "--k", 32, "--save_neighbors", "true")
    real = eval_metrics(tiny_gpt2_dir, files / "b.txt", tmp_path / "real", capsys, *knn, "--k", 4)
    rc, err = cli(["eval", "--from_neighbors", tmp_path / "full" / "neighbors", "--k", 4, "--output_dir",
                   tmp_path / "c4"], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "c4" / "results.json").read_text())
    assert res["metrics"]["sweep_knn_cached"]["lmbda=0.25,T=1.0"] == pytest.approx(real["ppl_knnlm"], rel=1e-5)


def test_a_kill_while_the_outputs_are_written_leaves_no_results_of_another_run(tiny_gpt2_dir, files, tmp_path, capsys,
                                                                               monkeypatch):
    """results.json was written before results.md: a rerun with another λ killed in between left the new results.json
    beside the earlier run's table (the review's repro: λ 0.5 in results.json, λ 0.25 in results.md). The earlier
    results.json now goes first and the new one comes last, after the markdown and plots."""
    from knnlm import report

    ds = build_ds(tiny_gpt2_dir, files / "a.txt", tmp_path / "ds", capsys)
    out = tmp_path / "ev"
    eval_metrics(tiny_gpt2_dir, files / "b.txt", out, capsys, "--datastore", ds.dir, "--lmbda", 0.25)
    real = report.write_markdown

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_markdown", killed)
    argv = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "b.txt", "--output_dir", out,
            "--block_size", 32, "--datastore", ds.dir, "--lmbda", 0.5]
    assert cli(argv, capsys)[0] == 128 + 2
    assert not (out / "results.json").exists()  # no finished-looking folder of two runs
    monkeypatch.setattr(report, "write_markdown", real)
    assert cli(argv, capsys)[0] == 0
    assert json.loads((out / "results.json").read_text())["metrics"]["lmbda"] == 0.5
    assert "| kNN-LM | 0.5 |" in (out / "results.md").read_text()


def test_results_name_the_commit_the_run_started_with(tiny_gpt2_dir, files, tmp_path, capsys, monkeypatch):
    """results.json's git_hash was read when the results were written: commits made while a run went on were named
    as its code (a run started at one commit recorded the later HEAD). The CLI reads it when it starts."""
    import knnlm.evaluate as evaluate_module
    from knnlm import fileio

    head = {"rev": "a" * 40}

    def fake_run(cmd, **kw):
        out = head["rev"] + "\n" if "rev-parse" in cmd else ""
        return subprocess.CompletedProcess(cmd, 0, out, "")

    def score_windows_after_a_commit(*a, **kw):
        head["rev"] = "b" * 40  # a commit lands while the run scores
        yield from score_windows(*a, **kw)

    score_windows = evaluate_module.score_windows
    monkeypatch.setattr(fileio.subprocess, "run", fake_run)
    monkeypatch.setattr(evaluate_module, "score_windows", score_windows_after_a_commit)
    getattr(fileio.git_hash, "cache_clear", lambda: None)()  # (a plain function before: nothing to clear)
    try:
        argv = ["eval", *model_args(tiny_gpt2_dir), "--validation_file", files / "a.txt", "--block_size", 32,
                "--output_dir", tmp_path / "ev"]
        rc, err = cli(argv, capsys)
        assert rc == 0, err
        assert head["rev"] == "b" * 40
        assert json.loads((tmp_path / "ev" / "results.json").read_text())["run"]["git_hash"] == "a" * 40
    finally:
        getattr(fileio.git_hash, "cache_clear", lambda: None)()


def test_lm_train_killed_while_moving_its_files_leaves_no_results_beside_an_unloadable_model(files, tmp_path, capsys,
                                                                                             monkeypatch):
    """`lm train` moved results.json into the folder before config.json: a kill between them left a folder holding
    results.json (finished, by docs/reliability.md) whose model cannot be loaded. The rerun finishes it."""
    from knnlm.experiments.lm import report as lm_report

    real = lm_report.os.replace

    def dies_at_config(src, dst):
        if Path(dst).name == "config.json":
            raise KeyboardInterrupt
        return real(src, dst)

    lm = ["lm", "train", "--size", "tiny", "--train_file", files / "a.txt", "--validation_file", files / "b.txt",
          "--max_steps", 1, "--block_size", 8, "--batch_size", 1, "--output_dir", tmp_path / "lm"]
    monkeypatch.setattr(lm_report.os, "replace", dies_at_config)
    assert cli(lm, capsys)[0] == 130
    monkeypatch.setattr(lm_report.os, "replace", real)
    assert not (tmp_path / "lm" / "config.json").exists()
    assert not (tmp_path / "lm" / "results.json").exists()
    assert cli(lm, capsys)[0] == 0
    assert all((tmp_path / "lm" / n).exists() for n in ("config.json", "results.json", "training.json"))


@pytest.mark.parametrize("stop, code", [("int", 130), ("term", 143)])
def test_a_stop_signal_raised_in_a_finalizer_still_stops_the_command(monkeypatch, capsys, stop, code):
    """A signal's exception raised while a finalizer or weakref callback runs (the garbage collector's) is printed and
    dropped by Python ("Exception ignored in ..."): a Ctrl-C met during an `overspec run`'s GC was lost, the run went
    on to its end and exited 0. It now stops the command as any other Ctrl-C / SIGTERM does."""
    import gc
    import time

    import knnlm.cli as cli_module

    class Finalized:
        def __del__(self):  # the signal handler's exception, raised here as when the signal lands in a GC callback
            raise KeyboardInterrupt() if stop == "int" else cli_module.Terminated()

    ran_on = []

    def fake_main(argv):
        Finalized()
        gc.collect()
        for _ in range(50):  # the command's further work
            time.sleep(0.001)
        ran_on.append(1)
        return 0

    monkeypatch.setattr(cli_module, "_main", fake_main)
    assert cli_module.main(["x"]) == code
    assert ran_on == []
    assert "rerun the same command to resume" in capsys.readouterr().err
