"""The study runners' shared helpers (knnlm.experiments.study): run-folder names, the resume check, seed aggregation,
finished runs and reusable results, the settings declared from a library dataclass."""
import dataclasses
import json
import math

import pytest

from knnlm.errors import KnnlmError
from knnlm.experiments.hurdle.settings import HurdleArgs
from knnlm.experiments.study import check_resumable, curve_mean_std, finish_run, mean_std, mirror, seed_path
from knnlm.fileio import reusable


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


def test_check_resumable_lets_a_run_that_did_no_work_be_rerun_with_other_settings(tmp_path):
    """An earlier run that stopped at a bad flag after writing config.json (and empty seed folders) holds nothing to
    resume: a rerun with corrected settings is accepted; once a file of work exists, other settings are refused."""
    from knnlm.experiments.hurdle.settings import HurdleArgs

    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(HurdleArgs(output_dir=str(tmp_path)))))
    (tmp_path / "knnlm-run.json").write_text("{}")
    (tmp_path / "runs" / "seed-0").mkdir(parents=True)
    other = HurdleArgs(output_dir=str(tmp_path), learning_rate=1e-3)
    check_resumable(tmp_path, other, ("output_dir",))
    (tmp_path / "runs" / "seed-0" / "step-10.json").write_text("{}")
    with pytest.raises(KnnlmError, match="holds a run with other settings"):
        check_resumable(tmp_path, other, ("output_dir",))


def test_check_resumable_compares_settings_under_their_current_names(tmp_path):
    args = HurdleArgs(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=100, num_seeds=2)
    check_resumable(tmp_path, args, ("output_dir", "num_seeds"))  # no config.json: a fresh folder
    old = {"output_dir": "elsewhere", "lr": 1e-3, "steps": 100, "seeds": 5, "size": "gpt2-small"}  # before issue 12
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "seed-0-with_last_mlp.json").write_text("{}")  # the run did work: its settings bind
    check_resumable(tmp_path, args, ("output_dir", "num_seeds"))  # same settings under old names; seeds may grow
    with pytest.raises(KnnlmError, match=r"max_steps: 100 -> 200"):
        check_resumable(tmp_path, HurdleArgs(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=200),
                        ("output_dir", "num_seeds"))
    with pytest.raises(KnnlmError, match=r"num_seeds: 5 -> 2"):
        check_resumable(tmp_path, args, ("output_dir",))


def test_curve_mean_std_is_mean_std_per_point():
    # three seeds, three points; the middle point lacks seed 1's value, the last has one value only
    means, stds = curve_mean_std([[1.0, 2.0, None], [3.0, None, None], [5.0, 6.0, 7.0]])
    assert means == [3.0, 4.0, 7.0]
    assert stds[0] == pytest.approx(2.0) and stds[1] == pytest.approx(math.sqrt(8.0)) and stds[2] is None


def test_reusable_only_with_the_same_key_and_finish_run_marks_a_run_done(tmp_path):
    path = tmp_path / "point.json"
    assert reusable(path, "abc", "weights_hash") is None  # nothing saved
    path.write_text(json.dumps({"weights_hash": "abc", "loss": 1.5}))
    assert reusable(path, "abc", "weights_hash") == {"weights_hash": "abc", "loss": 1.5}
    assert reusable(path, "abd", "weights_hash") is None  # computed from other inputs
    path.write_text(json.dumps({"key": {"model": "m", "sha": 1}}))
    assert reusable(path, {"model": "m", "sha": 1}) is not None and reusable(path, {"model": "m", "sha": 2}) is None
    # a record (an evaluation's progress) made before hub datasets were known by their revision: resumed, as the
    # store built from it is (it was restarted); another dataset, config, split or revision is not
    hub = {"dataset": "someone/corpus", "config": None, "split": "validation"}
    path.write_text(json.dumps({"key": {"model": "m", "source": hub}}))
    assert reusable(path, {"model": "m", "source": {**hub, "fingerprint": "f1"}}) is not None
    assert reusable(path, {"model": "m", "source": {**hub, "split": "test", "fingerprint": "f1"}}) is None
    path.write_text(json.dumps({"key": {"model": "m", "source": {**hub, "fingerprint": "f0"}}}))
    assert reusable(path, {"model": "m", "source": {**hub, "fingerprint": "f1"}}) is None

    ckpt = tmp_path / "ckpt"
    (ckpt / "step-3").mkdir(parents=True)
    record = {"seed": 0, "steps": 3}
    assert finish_run(tmp_path / "history.json", record, ckpt, write=False) is record  # not the main process
    assert ckpt.exists() and not (tmp_path / "history.json").exists()
    finish_run(tmp_path / "history.json", record, ckpt)
    assert json.loads((tmp_path / "history.json").read_text()) == record and not ckpt.exists()


def test_mirror_takes_the_library_default_and_help_unless_given():
    import dataclasses

    from knnlm.train import TrainArgs

    fields = {f.name: f for f in dataclasses.fields(HurdleArgs)}
    lib = {f.name: f for f in dataclasses.fields(TrainArgs)}
    assert fields["weight_decay"].default == lib["weight_decay"].default == 0.0
    assert fields["weight_decay"].metadata["help"] == lib["weight_decay"].metadata["help"]
    assert fields["learning_rate"].default == 5e-4 and fields["learning_rate"].metadata["deprecated"] == ("lr",)
    f = mirror(TrainArgs, "max_steps", default=7, help="steps")
    assert f.default == 7 and dict(f.metadata) == {"help": "steps"}


def test_results_json_records_the_cpu_and_its_kernel_instructions(tmp_path):
    """Every results.json names the CPU and the instructions torch's kernels use (CPU training results differ between
    AVX2 and AVX-512 machines in their last bits, which grow over steps): read from cpuinfo's first model name."""
    import platform

    import torch

    from knnlm.fileio import cpu_name
    from knnlm.report import write_results

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
                    "processor\t: 1\nmodel name\t: Other\n")
    assert cpu_name(info) == "AMD EPYC 7B13 64-Core Processor"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # an ARM cpuinfo: no model name line
    assert cpu_name(info) == (platform.processor() or "cpu")
    assert cpu_name(tmp_path / "absent") == (platform.processor() or "cpu")
    run = json.loads(write_results(tmp_path, {}, {}).read_text())["run"]
    assert run["cpu"] == cpu_name() and run["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert run["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else run["cpu"])


def test_check_resumable_compares_a_field_the_old_config_lacks_as_its_default(tmp_path):
    """A config written before a field existed ran with its default: a rerun that sets it otherwise is refused (a 4x128
    rerun resumed a folder of 2x64 hurdle runs, averaging the two shapes), one that leaves it at its default resumes."""
    old = dataclasses.asdict(HurdleArgs(output_dir=str(tmp_path), size="tiny"))
    for k in ("n_layer", "n_embd", "n_head"):
        old.pop(k)
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "seed-0-with_last_mlp.json").write_text("{}")  # a finished run of the old shape
    check_resumable(tmp_path, HurdleArgs(output_dir=str(tmp_path), size="tiny"), ("output_dir",))
    default = HurdleArgs().n_layer
    with pytest.raises(KnnlmError, match=rf"^--output_dir: .* \(n_layer: {default} \(not recorded: its default\) -> "
                                         rf"{default + 2}"):
        check_resumable(tmp_path, HurdleArgs(output_dir=str(tmp_path), size="tiny", n_layer=default + 2),
                        ("output_dir",))
