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
