"""Config resolution: flag > file > default, unknown keys, type errors, bare boolean flags, presets."""
import argparse
from dataclasses import dataclass, field
from typing import Optional

import pytest

from knnlm.config import add_arguments, load_config_file, presets, resolve
from knnlm.errors import KnnlmError


@dataclass
class Demo:
    k: int = field(default=3, metadata={"help": "neighbours"})
    lmbda: list[float] = field(default_factory=lambda: [0.25], metadata={"help": "weights"})
    name: Optional[str] = field(default=None, metadata={"help": "a name"})
    flag: bool = field(default=False, metadata={"help": "a switch"})


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p, Demo)
    return p.parse_args(argv)


def test_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("k: 7\nlmbda: [0.1, 0.5]\n")
    got = resolve(Demo, _parse(["--k", "9"]), cfg)
    assert (got.k, got.lmbda, got.name, got.flag) == (9, [0.1, 0.5], None, False)
    assert resolve(Demo, _parse(["--lmbda", "0,0.25", "--flag"])).lmbda == [0.0, 0.25]
    assert resolve(Demo, _parse(["--flag"])).flag is True
    assert resolve(Demo, _parse(["--flag", "false"])).flag is False


def test_an_empty_list_flag_is_the_empty_list():
    """Before: `--lmbda ""` was one empty item ("'' is not a valid float"; retomaton's `--skip_probs ""`, whose help
    says "empty: none", and reproduce's `--stages ""`, "unknown stage(s) ;")."""
    assert resolve(Demo, _parse(["--lmbda", ""])).lmbda == []
    assert resolve(Demo, _parse(["--lmbda", " "])).lmbda == []
    with pytest.raises(KnnlmError, match="not a valid float"):
        resolve(Demo, _parse(["--lmbda", "0.1,"]))  # an empty item in a list is still an error


def test_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kk: 7\n")
    with pytest.raises(KnnlmError, match="unknown key.*kk"):
        resolve(Demo, _parse([]), cfg)
    with pytest.raises(KnnlmError, match="--k: 'x' is not a valid int"):
        resolve(Demo, _parse(["--k", "x"]))
    with pytest.raises(KnnlmError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    with pytest.raises(KnnlmError, match=r"^--config: .* is a folder; pass a YAML or JSON file"):
        load_config_file(tmp_path)  # e.g. a model folder given to --config by mistake


def test_presets_resolve_by_name():
    from pathlib import Path

    import yaml

    import knnlm

    folder = Path(knnlm.__file__).resolve().parent / "configs"
    names = presets()
    assert names, "knnlm ships its presets inside the package"
    assert names == sorted(p.stem for p in folder.glob("*.yaml"))
    for name in names:  # each name is its own file, read as YAML
        want = yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
        assert isinstance(want, dict) and want, name
        assert load_config_file(name) == want, name


def test_help_with_a_percent_sign_prints():
    """argparse %-formats help strings: a field's help such as "95% intervals" must not crash --help."""
    import argparse
    from dataclasses import dataclass, field

    from knnlm.config import add_arguments

    @dataclass
    class Args:
        n_boot: int = field(default=1000, metadata={"help": "resamples for the 95% intervals"})

    parser = argparse.ArgumentParser()
    add_arguments(parser, Args)
    assert "95% intervals (default: 1000)" in parser.format_help()


@pytest.mark.parametrize("text, needle", [
    ("name: {a: 1}\n", "--name (from {cfg}): expected a string, got a mapping ({{'a': 1}})"),
    ("name: [x, y]\n", "--name (from {cfg}): expected a string, got a list (['x', 'y'])"),
    ("name: no\n", "--name (from {cfg}): expected a string, got a boolean (false)"),
    ("k: true\n", "--k (from {cfg}): expected a whole number, got a boolean (true)"),
    ("lmbda: true\n", "--lmbda (from {cfg}): expected a number, got a boolean (true)"),
    ("lmbda: [0.1, false]\n", "--lmbda (from {cfg}): expected a number, got a boolean (false)"),
    ("k: eight\n", "--k (from {cfg}): 'eight' is not a valid int"),
])
def test_config_values_of_another_kind_are_refused_naming_file_and_key(tmp_path, text, needle):
    """A mapping for a string field became a folder named "{'a': 1}", and `k: true` ran with k=1."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(KnnlmError) as e:
        resolve(Demo, _parse([]), cfg)
    assert str(e.value) == needle.format(cfg=cfg)
    cfg.write_text("name: out\nk: 8.0\nlmbda: 1\n")  # numbers and strings of the right kind still pass
    got = resolve(Demo, _parse([]), cfg)
    assert (got.name, got.k, got.lmbda) == ("out", 8, [1.0])


@pytest.mark.parametrize("name, text, where", [
    ("dup.yaml", "k: 8\nname: a\nk: 16\n", " (lines 1 and 3)"),
    ("dup.yml", "outer:\n  k: 8\n  k: 9\n", " (lines 2 and 3)"),
    ("dup.json", '{"k": 8, "k": 16}', ""),
])
def test_a_key_set_twice_in_a_config_is_refused(tmp_path, name, text, where):
    cfg = tmp_path / name
    cfg.write_text(text)
    with pytest.raises(KnnlmError) as e:
        load_config_file(cfg)
    assert str(e.value) == f"--config: {cfg} sets k twice{where}; keep one"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("base: &b {k: 1, name: a}\nrun:\n  <<: *b\n  k: 2\n")
    assert load_config_file(cfg)["run"] == {"k": 2, "name": "a"}


def test_a_config_of_another_suffix_is_read_as_json_and_the_error_says_to_rename(tmp_path):
    cfg = tmp_path / "cfg.txt"
    cfg.write_text("k: 8\n")
    with pytest.raises(KnnlmError, match=r"^--config: .*cfg.txt was read as JSON and is not valid JSON \(.*\); a config "
                                         r"is read by its name: \.yaml/\.yml as YAML, \.json as JSON; rename it"):
        load_config_file(cfg)
    cfg.write_text('{"k": 8}')  # JSON under another name still works
    assert load_config_file(cfg) == {"k": 8}
    (tmp_path / "cfg.yaml").write_text("k: 8\n")
    assert load_config_file(tmp_path / "cfg.yaml") == {"k": 8}


def test_load_config_file_errors_name_the_flag_given(tmp_path):
    with pytest.raises(KnnlmError, match=r"^--recipe: .*nothere.yaml does not exist"):
        load_config_file(tmp_path / "nothere.yaml", flag="--recipe")


def test_cli_refuses_a_mapping_for_output_dir_and_makes_no_folder(tmp_path, monkeypatch, capsys):
    from knnlm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("output_dir: {a: 1}\n")
    assert main(["eval", "--config", "c.yaml", "--model_name_or_path", "m", "--validation_file", "v.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["knnlm: error: --output_dir (from c.yaml): expected a string, got a mapping ({'a': 1})"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
