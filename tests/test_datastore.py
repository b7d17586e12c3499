"""Datastore: values are the next tokens, keys the hidden states; resume and 2-process builds are byte-identical."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import knnlm.datastore as datastore_mod
from knnlm.corpus import CorpusArgs
from knnlm.datastore import Datastore, build_datastore
from knnlm.errors import KnnlmError

TEXT = ("The quick brown fox jumps over the lazy dog.\n" * 3 + "A second line, with numbers 1 2 3.\n") * 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(TEXT)
    return p


def _build(lm, corpus_file, out, **kw):
    args = CorpusArgs(train_file=str(corpus_file), block_size=16, stride=8)
    return build_datastore(lm, args, out, batch_size=2, **kw)


def test_values_are_next_tokens_and_keys_are_states(tiny_lm, corpus_file, tmp_path):
    ds = _build(tiny_lm, corpus_file, tmp_path / "ds")
    ids = tiny_lm.encode(TEXT)
    assert ds.N == len(ids) - 1 and ds.d == tiny_lm.hidden_size
    np.testing.assert_array_equal(ds.vals, np.asarray(ids[1:], dtype=np.int32))
    # key of target t (row t-1) = ffn_input at position t-1 with the window's context; the first window starts at 0
    with torch.no_grad():
        states = tiny_lm.hidden_states(torch.tensor([ids[:16]]), torch.ones(1, 16, dtype=torch.long), ("ffn_input",))
    np.testing.assert_array_equal(ds.keys[:15], states["ffn_input"][0, :15].to(torch.float16).numpy())
    assert ds.meta["key_point"] == "ffn_input" and ds.meta["weights_hash"] == tiny_lm.weights_hash()
    assert not (tmp_path / "ds" / "done.u8").exists()


def _die_after_three_batches(monkeypatch):
    """The build's process "dies" after three encoded batches; -> the real encode_batches."""
    real = datastore_mod.encode_batches

    def dying(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(datastore_mod, "encode_batches", dying)
    return real


def test_resume_is_byte_identical(tiny_lm, corpus_file, tmp_path, monkeypatch):
    ref = _build(tiny_lm, corpus_file, tmp_path / "ref")
    real = _die_after_three_batches(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(tiny_lm, CorpusArgs(train_file=str(corpus_file), block_size=16, stride=8),
                        tmp_path / "resumed", batch_size=2, flush_every=1)
    assert not (tmp_path / "resumed" / "meta.json").exists()
    with pytest.raises(KnnlmError, match="not a finished datastore"):
        Datastore.open(tmp_path / "resumed")
    monkeypatch.setattr(datastore_mod, "encode_batches", real)
    done = np.fromfile(tmp_path / "resumed" / "done.u8", dtype=np.uint8)
    assert 0 < done.sum() < len(done)
    resumed = _build(tiny_lm, corpus_file, tmp_path / "resumed")
    for name in ("keys.f16", "vals.i32"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    assert resumed.N == ref.N


def test_two_process_build_equals_single(tiny_gpt2_dir, corpus_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["datastore", "build", "--model_name_or_path", str(tiny_gpt2_dir), "--train_file", str(corpus_file),
              "--block_size", "16", "--stride", "8", "--batch_size", "2"]
    single = subprocess.run([sys.executable, "-m", "knnlm", *common, "--output_dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    dist = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
                           "-m", "knnlm", *common, "--output_dir", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    for name in ("keys.f16", "vals.i32"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_refuses_a_different_store_unless_overwrite(tiny_lm, corpus_file, tmp_path):
    _build(tiny_lm, corpus_file, tmp_path / "ds")
    with pytest.raises(KnnlmError, match="--overwrite"):
        _build(tiny_lm, corpus_file, tmp_path / "ds", key_point="block_output")
    ds = _build(tiny_lm, corpus_file, tmp_path / "ds", key_point="block_output", overwrite=True)
    assert ds.key_point == "block_output"


def test_truncated_files_are_reported(tiny_lm, corpus_file, tmp_path):
    _build(tiny_lm, corpus_file, tmp_path / "ds")
    keys = tmp_path / "ds" / "keys.f16"
    keys.write_bytes(keys.read_bytes()[:-10])
    with pytest.raises(KnnlmError, match="truncated"):
        Datastore.open(tmp_path / "ds")


def test_hash_mismatch_is_refused(tiny_lm, tiny_llama_dir, corpus_file, tmp_path):
    from knnlm.models import ModelArgs, load_model

    ds = _build(tiny_lm, corpus_file, tmp_path / "ds")
    other = load_model(ModelArgs(model_name_or_path=str(tiny_llama_dir)))
    with pytest.raises(KnnlmError, match="different model weights"):
        ds.check_compatible(other)
    with pytest.raises(KnnlmError, match="--key_point"):
        ds.check_compatible(tiny_lm, "block_output")


def test_empty_corpus(tiny_lm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(KnnlmError, match="empty"):
        build_datastore(tiny_lm, CorpusArgs(train_file=str(empty)), tmp_path / "ds")
    assert not (tmp_path / "ds" / "meta.json").exists()


def test_jsonl_documents_windowed_separately(tiny_lm, tmp_path):
    rows = ["Sal Gougis is the parent of Montgomery", "Bethanne Renneisen is the parent of Bryant"]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    ds = build_datastore(tiny_lm, CorpusArgs(train_file=str(f), concat_documents=False, block_size=32), tmp_path / "ds")
    expected = np.concatenate([np.asarray(tiny_lm.encode(r)[1:]) for r in rows])
    np.testing.assert_array_equal(ds.vals, expected)


def test_a_killed_build_whose_tokens_are_made_anew_starts_its_rows_again(tiny_lm, tmp_path, monkeypatch):
    """A build killed by a version whose reader gave other tokens (here: a .csv read with pandas' NA rules, which
    dropped the 'NA' rows under --skip_bad_rows) was resumed over the new tokens with its done flags kept: the rows of
    those batches stayed zero and verify accepted the store (the review's repro: 2,591 of 18,441 rows). A resume whose
    tokens are made anew starts the rows again, and equals a clean build."""
    import knnlm.corpus as corpus_mod

    texts = ["The quick brown fox jumps over the lazy dog ." if i != 5 else "NA" for i in range(24)]  # (batches alike)
    path = tmp_path / "c.csv"
    path.write_text("text\n" + "".join(t + "\n" for t in texts))
    args = CorpusArgs(train_file=str(path), block_size=16, stride=8, skip_bad_rows=True)
    ref = build_datastore(tiny_lm, args, tmp_path / "ref", batch_size=2)
    old_options = {**corpus_mod.TABLE_SUFFIXES, ".csv": ("csv", {})}  # the earlier reader, and its token key
    monkeypatch.setattr(corpus_mod, "TABLE_SUFFIXES", old_options)
    monkeypatch.setattr(corpus_mod, "_reader_version", lambda source: {})
    _die_after_three_batches(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(tiny_lm, args, tmp_path / "ds", batch_size=2, flush_every=1)
    monkeypatch.undo()
    ds = build_datastore(tiny_lm, args, tmp_path / "ds", batch_size=2)
    assert ds.N == ref.N
    for name in ("keys.f16", "vals.i32"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "ds" / name).read_bytes(), name
