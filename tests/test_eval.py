"""kNN-LM perplexity from the CLI against a brute-force numpy reference on a tiny random GPT-2."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import brute_knn_gold_prob
from knnlm.cli import main

TRAIN = "the cat sat on the mat. the dog sat on the log. a cat and a dog sat together on a mat.\n" * 3
VALID = "the dog sat on the mat. a cat sat on the log.\n"


def _reference(model_dir, train_ids, valid_ids, k, lmbda, temp):
    """Brute force: final_hidden keys from HF directly (one window each), numpy top-k, p_knn, interpolation."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        tr = model(torch.tensor([train_ids]), output_hidden_states=True)
        va = model(torch.tensor([valid_ids]), output_hidden_states=True)
    keys = tr.hidden_states[-1][0, :-1].to(torch.float16).float().numpy()  # [N, d], rounded as stored
    vals = np.asarray(train_ids[1:])
    q = va.hidden_states[-1][0, :-1].float().numpy()  # [n, d]
    gold = np.asarray(valid_ids[1:])
    lm_logp = torch.log_softmax(va.logits[0, :-1].double(), -1).numpy()[np.arange(len(gold)), gold]
    p_knn = brute_knn_gold_prob(q, keys, vals, gold, k, temp)
    ppl_lm = math.exp(-lm_logp.mean())
    mixed = np.log((1 - lmbda) * np.exp(lm_logp) + lmbda * p_knn)
    return ppl_lm, math.exp(-mixed.mean())


def test_cli_matches_brute_force(tiny_gpt2_dir, tiny_lm, tmp_path):
    (tmp_path / "train.txt").write_text(TRAIN)
    (tmp_path / "valid.txt").write_text(VALID)
    model = ["--model_name_or_path", str(tiny_gpt2_dir)]
    win = ["--block_size", "128", "--stride", "64"]
    assert main(["datastore", "build", *model, "--train_file", str(tmp_path / "train.txt"), *win,
                 "--key_point", "final_hidden", "--output_dir", str(tmp_path / "ds")]) == 0
    assert main(["eval", *model, "--validation_file", str(tmp_path / "valid.txt"), *win, "--datastore",
                 str(tmp_path / "ds"), "--k", "8", "--lmbda", "0.25,0", "--knn_temp", "2", "--recompute_dists", "true",
                 "--output_dir", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    m = res["metrics"]
    ppl_lm, ppl_knnlm = _reference(str(tiny_gpt2_dir), tiny_lm.encode(TRAIN), tiny_lm.encode(VALID), 8, 0.25, 2.0)
    assert m["n_tokens"] == len(tiny_lm.encode(VALID)) - 1
    assert m["ppl_lm"] == pytest.approx(ppl_lm, rel=1e-5)
    assert m["ppl_knnlm"] == pytest.approx(ppl_knnlm, rel=1e-4)
    assert m["sweep_knn"]["0.0"] == m["ppl_lm"]  # λ = 0 is the LM exactly
    assert res["config"]["k"] == 8 and "versions" in res["run"] and (tmp_path / "out" / "results.md").exists()


def test_k_larger_than_store_and_neighbour_cache(tiny_gpt2_dir, tmp_path):
    (tmp_path / "train.txt").write_text(TRAIN)
    (tmp_path / "valid.txt").write_text(VALID)
    model = ["--model_name_or_path", str(tiny_gpt2_dir)]
    main(["datastore", "build", *model, "--train_file", str(tmp_path / "train.txt"), "--output_dir", str(tmp_path / "ds")])
    assert main(["eval", *model, "--validation_file", str(tmp_path / "valid.txt"), "--datastore", str(tmp_path / "ds"),
                 "--k", "100000", "--lmbda", "0.25,0.5", "--save_neighbors", "true",
                 "--output_dir", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    assert m["k"] == m["datastore_N"]  # clamped: all keys
    assert main(["eval", "--from_neighbors", str(tmp_path / "out" / "neighbors"), "--lmbda", "0.25,0.5",
                 "--sweep_temps", "1", "--output_dir", str(tmp_path / "sweep")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "results.json").read_text())["metrics"]["sweep_knn_cached"]
    assert sweep["lmbda=0.25,T=1.0"] == pytest.approx(m["sweep_knn"]["0.25"], rel=1e-6)
    assert sweep["lmbda=0.5,T=1.0"] == pytest.approx(m["sweep_knn"]["0.5"], rel=1e-6)


def test_killed_rerun_keeps_the_finished_neighbour_cache(tiny_gpt2_dir, tmp_path, monkeypatch):
    """A rerun into a finished eval folder (other λ) that dies mid-way leaves the earlier cache whole and marked
    finished, beside the results.json that describes it; the next rerun replaces both."""
    import hashlib

    import knnlm.evaluate as E

    (tmp_path / "train.txt").write_text(TRAIN)
    (tmp_path / "valid.txt").write_text(VALID * 6)  # several windows of 16 tokens: several batches
    model = ["--model_name_or_path", str(tiny_gpt2_dir)]
    main(["datastore", "build", *model, "--train_file", str(tmp_path / "train.txt"), "--output_dir", str(tmp_path / "ds")])
    argv = ["eval", *model, "--validation_file", str(tmp_path / "valid.txt"), "--datastore", str(tmp_path / "ds"),
            "--k", "8", "--save_neighbors", "true", "--batch_size", "1", "--block_size", "16",
            "--output_dir", str(tmp_path / "out")]
    assert main(argv + ["--lmbda", "0.25"]) == 0
    cache = tmp_path / "out" / "neighbors"
    digest = lambda: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(cache.iterdir())}  # noqa: E731
    before, results = digest(), (tmp_path / "out" / "results.json").read_text()
    real_add, calls = E._NeighbourCache.add, []

    def dying_add(self, *a):  # the process "dies" at the second batch
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_add(self, *a)

    monkeypatch.setattr(E._NeighbourCache, "add", dying_add)
    assert main(argv + ["--lmbda", "0.5"]) == 130
    assert digest() == before and (tmp_path / "out" / "results.json").read_text() == results
    monkeypatch.setattr(E._NeighbourCache, "add", real_add)
    assert main(argv + ["--lmbda", "0.5"]) == 0
    assert not (tmp_path / "out" / "neighbors.rebuild-tmp").exists() and (cache / "k.txt").read_text() == "8"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["lmbda"] == [0.5]
    # a swap killed after moving the earlier cache aside left it there: the next run is not stopped by it
    (tmp_path / "out" / "neighbors.replaced-tmp").mkdir()
    (tmp_path / "out" / "neighbors.replaced-tmp" / "k.txt").write_text("8")
    assert main(argv + ["--lmbda", "0.25"]) == 0 and not (tmp_path / "out" / "neighbors.replaced-tmp").exists()


def _run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("extra, needle", [
    (["--lmbda", "1.5"], "--lmbda"),
    (["--knn_temp", "0"], "--knn_temp"),
    (["--k", "0"], "--k"),
])
def test_bad_flags_one_line_error(tiny_gpt2_dir, tmp_path, capsys, extra, needle):
    (tmp_path / "valid.txt").write_text(VALID)
    code, err = _run_cli(["eval", "--model_name_or_path", str(tiny_gpt2_dir), "--validation_file",
                          str(tmp_path / "valid.txt"), "--output_dir", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and err.count("\n") == 0 and needle in err and err.startswith("knnlm: error:")


@pytest.mark.parametrize("args, needle", [
    (["eval", "--model_name_or_path", "{tmp}/nope", "--validation_file", "{tmp}/v.txt", "--output_dir", "{tmp}/o"], "nope"),
    (["eval", "--model_name_or_path", "{model}", "--validation_file", "{tmp}/missing.txt", "--output_dir", "{tmp}/o"], "missing.txt"),
    (["eval", "--model_name_or_path", "{model}", "--validation_file", "{tmp}/v.txt", "--datastore", "{tmp}/nods",
      "--output_dir", "{tmp}/o"], "nods"),
    (["datastore", "build", "--model_name_or_path", "{tmp}", "--train_file", "{tmp}/v.txt", "--output_dir", "{tmp}/ds"], "config"),
])
def test_bad_paths_one_line_error(tiny_gpt2_dir, tmp_path, capsys, args, needle):
    (tmp_path / "v.txt").write_text(VALID)
    code, err = _run_cli([a.format(tmp=tmp_path, model=tiny_gpt2_dir) for a in args], capsys)
    assert code == 2 and err.count("\n") == 0 and needle in err and err.startswith("knnlm: error:")


def test_error_exit_has_no_traceback(tmp_path):
    (tmp_path / "v.txt").write_text(VALID)
    r = subprocess.run([sys.executable, "-m", "knnlm", "eval", "--model_name_or_path", str(tmp_path / "nope"),
                        "--validation_file", str(tmp_path / "v.txt"), "--output_dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "nope" in r.stderr


_MALLINFO = """
import ctypes, torch
from knnlm.cli import keep_freed_memory
class Mallinfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
applied = keep_freed_memory()
t = torch.empty(16 << 20).fill_(1.0)  # 64 MiB (a batch's logits)
during = libc.mallinfo2().hblkhd  # bytes in mmapped blocks while it lives
del t
kept = libc.mallinfo2().fordblks  # free bytes the heap keeps once it is freed
print(applied, during, kept)
"""


def test_cli_allocator_setting_reuses_freed_memory():
    """The CLI's malloc setting: a 64 MiB allocation comes from the heap, not a fresh mmap, and once freed stays in the
    heap for the next one (KNNLM_MALLOPT=0: glibc's default, an mmap returned to the system at free). glibc's own
    counters (mallinfo2), so the check does not depend on the machine's load as a page-fault count does."""
    import os

    def mallinfo(setting):
        env = dict(os.environ, KNNLM_MALLOPT=setting)
        out = subprocess.run([sys.executable, "-c", _MALLINFO], capture_output=True, text=True, env=env, check=True)
        applied, during, kept = out.stdout.split()
        return applied == "True", int(during), int(kept)

    size = 64 << 20
    on, off = mallinfo("1"), mallinfo("0")
    assert on[0] and not off[0]
    assert off[1] >= size and off[2] < size  # glibc's default: mmapped, and unmapped at free
    assert on[1] < size and on[2] >= size  # the setting: from the heap, and kept there for reuse
