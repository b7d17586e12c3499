"""The study runners' shared helpers (knnlm.experiments.study): run-folder names, the resume check, seed aggregation."""
import json
import math

import pytest

from knnlm.errors import KnnlmError
from knnlm.experiments.hurdle.settings import HurdleArgs
from knnlm.experiments.study import check_resumable, mean_std, seed_path


def test_seed_path_is_seed_dash_n_and_keeps_an_earlier_seedn_folder(tmp_path):
    assert seed_path(tmp_path, 3) == tmp_path / "seed-3"
    assert seed_path(tmp_path, 0, "-with_last_mlp.json") == tmp_path / "seed-0-with_last_mlp.json"
    (tmp_path / "seed1").mkdir()  # a folder of the API study from before issue 12
    (tmp_path / "seed0-with_last_mlp.json").write_text("{}")  # a finished hurdle run from before issue 12
    assert seed_path(tmp_path, 1) == tmp_path / "seed1"
    assert seed_path(tmp_path, 0, "-with_last_mlp.json") == tmp_path / "seed0-with_last_mlp.json"
    assert seed_path(tmp_path, 0, "-without_last_mlp.json") == tmp_path / "seed-0-without_last_mlp.json"
    (tmp_path / "seed-1").mkdir()  # both exist: the current name wins
    assert seed_path(tmp_path, 1) == tmp_path / "seed-1"


def test_mean_std_hand_values_and_the_single_seed_rule():
    mu, sd = mean_std([1.0, 2.0, None, 4.0])  # None (a seed without that score) is left out
    assert mu == pytest.approx(7 / 3) and sd == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                                      + (4 - 7 / 3) ** 2) / 2))
    assert mean_std([0.25]) == (0.25, None)  # one seed: no spread measured (null in results.json, not 0.0)
    assert mean_std([None, None]) == (None, None) and mean_std([]) == (None, None)
    assert mean_std(iter([3.0, 3.0])) == (3.0, 0.0)  # two equal seeds: a measured spread of 0


def test_check_resumable_compares_settings_under_their_current_names(tmp_path):
    args = HurdleArgs(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=100, num_seeds=2)
    check_resumable(tmp_path, args, ("output_dir", "num_seeds"))  # no config.json: a fresh folder
    old = {"output_dir": "elsewhere", "lr": 1e-3, "steps": 100, "seeds": 5, "size": "gpt2-small"}  # before issue 12
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_resumable(tmp_path, args, ("output_dir", "num_seeds"))  # same settings under old names; seeds may grow
    with pytest.raises(KnnlmError, match=r"max_steps: 100 -> 200"):
        check_resumable(tmp_path, HurdleArgs(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=200),
                        ("output_dir", "num_seeds"))
    with pytest.raises(KnnlmError, match=r"num_seeds: 5 -> 2"):
        check_resumable(tmp_path, args, ("output_dir",))
