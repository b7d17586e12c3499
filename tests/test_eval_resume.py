"""A killed `knnlm eval` resumes from its progress record: the rerun runs the model on the batches the record did not
count only and gives the uninterrupted run's numbers exactly (and, with --save_neighbors, the same cache bytes); a
record of other settings, or one --overwrite discards, is not resumed."""
import json

import pytest

import knnlm.evaluate as E
import knnlm.scoring as S
from knnlm.cli import main

TRAIN = "the cat sat on the mat. the dog sat on the log. a cat and a dog sat together on a mat.\n" * 3
VALID = "the dog sat on the mat. a cat sat on the log.\n" * 6  # windows of 16 tokens: several batches of 2
ENCODE = S.encode_windows  # the LM's forward pass over a batch of windows
PROGRESS = "eval-progress.json"  # where a killed eval resumes


@pytest.fixture(autouse=True)
def every_batch(monkeypatch):
    """A progress record after every batch (the product writes one every PROGRESS_EVERY_S seconds)."""
    monkeypatch.setattr(E, "PROGRESS_EVERY_S", 0.0, raising=False)


@pytest.fixture(scope="module")
def stores(tiny_gpt2_dir, tmp_path_factory):
    """A datastore of TRAIN and an MLP memory trained on it (2 steps), built through the CLI."""
    tmp = tmp_path_factory.mktemp("stores")
    (tmp / "train.txt").write_text(TRAIN)
    model = ["--model_name_or_path", str(tiny_gpt2_dir)]
    assert main(["datastore", "build", *model, "--train_file", str(tmp / "train.txt"), "--output_dir",
                 str(tmp / "ds")]) == 0
    assert main(["mlp", "train", *model, "--datastore", str(tmp / "ds"), "--output_dir", str(tmp / "mem"),
                 "--max_steps", "2", "--hidden_size", "16"]) == 0
    return tmp / "ds", tmp / "mem"


def _eval_argv(model_dir, tmp_path, *common):
    """argv(out, *extra): `knnlm eval` of VALID into tmp_path / out, in windows of 16 tokens, 2 per batch."""
    (tmp_path / "valid.txt").write_text(VALID)

    def argv(out, *extra):
        return ["eval", "--model_name_or_path", str(model_dir), "--validation_file", str(tmp_path / "valid.txt"),
                "--block_size", "16", "--batch_size", "2", "--output_dir", str(tmp_path / out),
                *map(str, common + extra)]
    return argv


def _killed_after(monkeypatch, n: int, records_until: int | None = None) -> None:
    """The next eval is "killed" (KeyboardInterrupt) when scoring hands over its batch n + 1; with ``records_until``
    its progress is recorded after that many batches only (as when PROGRESS_EVERY_S passes between two batches)."""
    def dying(*a, **kw):
        for i, scores in enumerate(S.score_windows(*a, **kw)):
            if i == n:
                raise KeyboardInterrupt
            yield scores  # evaluate adds batch i + 1 and records its progress before asking for the next
            if i + 1 == records_until:
                monkeypatch.setattr(E, "PROGRESS_EVERY_S", float("inf"), raising=False)

    monkeypatch.setattr(E, "score_windows", dying)
    monkeypatch.setattr(S, "encode_windows", ENCODE)  # (uncounted)


def _forwards(monkeypatch) -> list:
    """The number of windows of each forward pass of the LM from now on (the real scoring, no kill)."""
    monkeypatch.setattr(E, "score_windows", S.score_windows)
    calls = []

    def counting(lm, tokens, batch, *a, **kw):
        calls.append(len(batch))
        return ENCODE(lm, tokens, batch, *a, **kw)

    monkeypatch.setattr(S, "encode_windows", counting)
    return calls


def _metrics(out) -> dict:
    return json.loads((out / "results.json").read_text())["metrics"]


def _scores(m: dict) -> dict:
    """Every perplexity of a run's metrics (ppl_*, the λ sweeps) and its token count."""
    return {k: v for k, v in m.items() if k.startswith(("ppl", "sweep")) or k == "n_tokens"}


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_lm_eval_resumes_where_it_was_killed(tiny_gpt2_dir, tmp_path, monkeypatch):
    argv = _eval_argv(tiny_gpt2_dir, tmp_path)
    whole_forwards = _forwards(monkeypatch)
    assert main(argv("whole")) == 0
    whole = _metrics(tmp_path / "whole")
    assert whole["resumed_from_token"] == 0 and len(whole_forwards) >= 5
    assert not (tmp_path / "whole" / PROGRESS).exists()

    _killed_after(monkeypatch, 2)
    assert main(argv("out")) == 130
    record = json.loads((tmp_path / "out" / PROGRESS).read_text())
    assert record["batches"] == 2 and not (tmp_path / "out" / "results.json").exists()
    forwards = _forwards(monkeypatch)
    assert main(argv("out")) == 0
    m = _metrics(tmp_path / "out")
    assert forwards == whole_forwards[2:]  # the model ran on the batches after the record only
    assert _scores(m) == _scores(whole)  # exactly
    assert m["resumed_from_token"] == record["sums"]["lm"][1] > 0
    assert m["timing"]["resumed_wall_s"] == record["wall_s"]  # the resumed run counts its own tokens and time
    assert m["timing"]["tokens_per_s"] == pytest.approx((m["n_tokens"] - m["resumed_from_token"]) / m["timing"]["wall_s"])
    assert not (tmp_path / "out" / PROGRESS).exists()

    # killed after evaluate returned, before results.json: the rerun scores nothing and writes the same numbers
    import knnlm.report as R

    real_write = R.write_results

    def dying_write(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "write_results", dying_write)
    assert main(argv("late")) == 130 and (tmp_path / "late" / PROGRESS).exists()
    monkeypatch.setattr(R, "write_results", real_write)
    forwards = _forwards(monkeypatch)
    assert main(argv("late")) == 0
    assert forwards == [] and _scores(_metrics(tmp_path / "late")) == _scores(whole)
    assert _metrics(tmp_path / "late")["resumed_from_token"] == whole["n_tokens"]


def test_knn_and_mlp_eval_with_neighbour_cache_resumes(tiny_gpt2_dir, stores, tmp_path, monkeypatch):
    ds, mem = stores
    argv = _eval_argv(tiny_gpt2_dir, tmp_path, "--datastore", ds, "--mlp_memory", mem, "--k", 8, "--lmbda", "0.25,0.5",
                      "--save_neighbors", "true")
    whole_forwards = _forwards(monkeypatch)
    assert main(argv("whole")) == 0
    whole = _metrics(tmp_path / "whole")
    assert {"ppl_lm", "ppl_knnlm", "ppl_mlplm"} <= set(whole)
    assert len(whole["sweep_knn"]) == len(whole["sweep_mlp"]) == 2

    # a record after batch 2 only, killed at batch 5: the cache files hold batches 3 and 4, which the record does not
    # count (a run records every PROGRESS_EVERY_S seconds): the rerun cuts them off and scores them again
    _killed_after(monkeypatch, 4, records_until=2)
    assert main(argv("out")) == 130
    record = json.loads((tmp_path / "out" / PROGRESS).read_text())
    staged = tmp_path / "out" / "neighbors.rebuild-tmp"
    assert record["batches"] == 2 and (staged / "gold.i32").stat().st_size > record["neighbors"]["gold.i32"]
    monkeypatch.setattr(E, "PROGRESS_EVERY_S", 0.0, raising=False)
    forwards = _forwards(monkeypatch)
    assert main(argv("out")) == 0
    assert forwards == whole_forwards[2:]
    assert _scores(_metrics(tmp_path / "out")) == _scores(whole)
    cache = _files(tmp_path / "out" / "neighbors")
    assert {"dists.f32", "vals.i32", "lm_gold.f32", "gold.i32", "mlp_gold.f32", "k.txt"} <= set(cache)
    assert cache == _files(tmp_path / "whole" / "neighbors")  # byte for byte
    assert not (tmp_path / "out" / "neighbors.rebuild-tmp").exists()


def test_a_record_of_other_settings_is_not_resumed(tiny_gpt2_dir, stores, tmp_path, monkeypatch):
    ds, _ = stores
    argv = _eval_argv(tiny_gpt2_dir, tmp_path, "--datastore", ds, "--k", 8)
    whole_forwards = _forwards(monkeypatch)
    assert main(argv("whole", "--lmbda", "0.5,0.75")) == 0
    whole = _metrics(tmp_path / "whole")
    _killed_after(monkeypatch, 2)
    assert main(argv("out", "--lmbda", "0.25")) == 130 and (tmp_path / "out" / PROGRESS).exists()
    forwards = _forwards(monkeypatch)  # other λ: a setting, so the folder is reused, but not the record
    assert main(argv("out", "--lmbda", "0.5,0.75")) == 0
    m = _metrics(tmp_path / "out")
    assert forwards == whole_forwards and m["resumed_from_token"] == 0
    assert _scores(m) == _scores(whole)


def test_overwrite_discards_the_record(tiny_gpt2_dir, tmp_path, monkeypatch):
    argv = _eval_argv(tiny_gpt2_dir, tmp_path)
    whole_forwards = _forwards(monkeypatch)
    assert main(argv("whole")) == 0
    _killed_after(monkeypatch, 2)
    assert main(argv("out")) == 130 and (tmp_path / "out" / PROGRESS).exists()
    forwards = _forwards(monkeypatch)
    assert main(argv("out", "--overwrite")) == 0
    m = _metrics(tmp_path / "out")
    assert forwards == whole_forwards and m["resumed_from_token"] == 0
    assert _scores(m) == _scores(_metrics(tmp_path / "whole"))


def test_random_skip_streams_restart_and_write_no_record(tiny_gpt2_dir, stores, tmp_path, monkeypatch):
    """The automaton's pointer state (and the skip draws' stream positions) is in no record: such a run restarts."""
    ds, _ = stores
    argv = _eval_argv(tiny_gpt2_dir, tmp_path, "--datastore", ds, "--k", 8, "--skip_search_prob", "0.5")
    whole_forwards = _forwards(monkeypatch)
    assert main(argv("whole")) == 0
    _killed_after(monkeypatch, 2)
    assert main(argv("out")) == 130
    assert not (tmp_path / "out" / PROGRESS).exists()
    forwards = _forwards(monkeypatch)
    assert main(argv("out")) == 0
    m = _metrics(tmp_path / "out")
    assert forwards == whole_forwards and m["resumed_from_token"] == 0
    assert _scores(m) == _scores(_metrics(tmp_path / "whole"))
