"""Every shipped preset resolves against its own command, as its launch comment runs it.

A preset's header comment names its launch command (``knnlm overspec run --config configs/cpu-tiny.yaml ...``). Each
such command line is parsed by the real parser (``build_parser().parse_args``) and its config resolved against the
dataclasses whose flags that command has (``config.resolve``: unknown keys and bad values fail); the same preset
with one unknown key added must fail. A reproduce recipe (``reproduce-*.yaml``) is a list of stages: each stage's
argv, with {data} and {out} filled by the runner's own ``stage_argv``, parses and its config resolves the same way.
"""
import dataclasses
import importlib
import pkgutil
import re
import shlex
from pathlib import Path

import pytest
import yaml

import knnlm
from knnlm.cli import build_parser
from knnlm.config import PRESETS_DIR, load_config_file, presets, resolve
from knnlm.errors import KnnlmError

REPO = Path(__file__).resolve().parents[1]
LAUNCH = re.compile(r"(?:^|Launch[^:]*:\s+|-m\s+)knnlm\s+([a-z].*)$")  # not `knnlm demo` quoted in prose


def _dataclasses() -> dict:
    """Every dataclass in the package by name: an argument group titled with a name holds that class's flags."""
    found = {}
    for info in pkgutil.walk_packages(knnlm.__path__, "knnlm."):
        if info.name.endswith("__main__"):  # runs the CLI on import
            continue
        for obj in vars(importlib.import_module(info.name)).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj):
                found.setdefault(obj.__name__, obj)
    return found


CLASSES = _dataclasses()


def _leaf(parser, argv):
    """The subparser that parses ``argv`` (following the command words)."""
    for word in argv:
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def _resolve_command(argv: list[str], config: str | None = "from argv"):
    """Parses ``argv`` with the real parser; resolves its config against the command's dataclasses."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    classes = [CLASSES[g.title] for g in _leaf(parser, argv)._action_groups if g.title in CLASSES]
    assert classes, argv
    return resolve(classes, ns, ns.config if config == "from argv" else config)


def _launch_commands(path: Path) -> list[list[str]]:
    """The `knnlm ...` command lines of a preset's header comment (continuation lines joined)."""
    lines, buf = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            continue
        line = (buf + " " + line[1:].strip()).strip()
        buf = line[:-1] if line.endswith("\\") else ""
        if not buf:
            lines.append(line)
    cmds = []
    for line in lines:
        inner = re.search(r"\(=\s*knnlm\s+([^)]*)\)", line)  # "knnlm demo  (= knnlm overspec run ...)"
        m = inner or LAUNCH.search(line)
        if m:
            cmds.append(shlex.split(m.group(1).split("#")[0].rstrip().rstrip(")")))
    return cmds


def test_every_preset_is_covered():
    assert len(presets()) >= 14 and set(presets()) == {p.stem for p in PRESETS_DIR.glob("*.yaml")}
    for name in presets():
        assert _launch_commands(PRESETS_DIR / f"{name}.yaml"), f"{name}.yaml has no `knnlm ...` launch line"


def _deprecated_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


@pytest.mark.parametrize("name", [p for p in presets() if not p.startswith("reproduce-")])
def test_preset_resolves_against_its_command(name, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(REPO)  # launch lines say configs/NAME.yaml, relative to the repository root
    path = PRESETS_DIR / f"{name}.yaml"
    for argv in _launch_commands(path):
        ns = build_parser().parse_args(argv)
        assert load_config_file(ns.config) == load_config_file(path), f"{argv} does not load {path.name}"
        objs = _resolve_command(argv)
        objs = objs if isinstance(objs, tuple) else (objs,)
        values = {k: v for o in objs for k, v in dataclasses.asdict(o).items()}
        for key, want in yaml.safe_load(path.read_text()).items():
            flag = f"--{key}"
            if flag not in argv:  # the file's value arrives unless the launch line overrides it
                got = values[key]
                assert got == want or got == [want] or str(got) == str(want), (name, key, got, want)
        assert not _deprecated_warnings(caplog), (name, _deprecated_warnings(caplog))  # shipped: current names only
        bad = tmp_path / f"{name}-bad.yaml"
        bad.write_text(path.read_text() + "\nno_such_option: 1\n")
        with pytest.raises(KnnlmError, match="no_such_option"):
            _resolve_command(argv, str(bad))


@pytest.mark.parametrize("scale", ["cpu", "gpu", "paper"])
def test_reproduce_recipe_stages_parse_and_resolve(scale, tmp_path, wikitext_dir, caplog):
    from knnlm.experiments.reproduce import ReproduceArgs, load_recipe, stage_argv

    args = ReproduceArgs(scale=scale, data_dir=str(wikitext_dir), output_dir=str(tmp_path / "out"))
    recipe = load_recipe(args)
    assert recipe == load_config_file(PRESETS_DIR / f"reproduce-{scale}.yaml") and len(recipe["stages"]) >= 5
    names = [s["name"] for s in recipe["stages"]]
    assert len(set(names)) == len(names)
    smoke = dataclasses.replace(args, smoke=True)
    for stage in recipe["stages"]:
        for run_args in (args, smoke):  # as the recipe runs, and with --smoke's overrides on top
            argv = stage_argv(stage, run_args)
            assert not any("{" in a for a in argv), (stage["name"], argv)  # every placeholder filled
            objs = _resolve_command(argv)
            assert objs is not None, stage["name"]
    assert not _deprecated_warnings(caplog), _deprecated_warnings(caplog)  # shipped: current flag names only
    # the recipe's own launch line (knnlm reproduce --scale ...) parses and resolves too
    (launch,) = _launch_commands(PRESETS_DIR / f"reproduce-{scale}.yaml")
    (rargs,) = _resolve_command(launch)
    assert rargs.scale == scale


def test_deprecated_names_resolve_to_the_new_ones(caplog):
    """Each renamed field (issue 12: one name per concept) accepts its old config key and old flag for one release,
    with one warning naming the new name; both names at once is an error."""
    from knnlm.config import deprecated_names, rename_deprecated

    renamed = {cls.__name__: deprecated_names(cls) for cls in CLASSES.values() if deprecated_names(cls)}
    assert renamed == {"HurdleArgs": {"steps": "max_steps", "seeds": "num_seeds", "lr": "learning_rate"},
                       "ProjectionArgs": {"lr": "learning_rate"}, "MemoryArgs": {"lr": "learning_rate"},
                       "OverspecArgs": {"mlp_lr": "mlp_learning_rate"}, "TrainArgs": {"steps": "max_steps"},
                       "LMTrainArgs": {"steps": "max_steps"}}
    for cls_name, table in renamed.items():
        for old, new in table.items():
            caplog.clear()
            assert rename_deprecated({old: "7", "other": 1}, CLASSES[cls_name]) == {new: "7", "other": 1}
            (msg,) = _deprecated_warnings(caplog)
            assert f"{old} is deprecated, use {new}" in msg
            with pytest.raises(KnnlmError, match=f"both {old} .deprecated. and {new}"):
                rename_deprecated({old: "7", new: "8"}, CLASSES[cls_name])
    caplog.clear()
    for argv, dest in ((["mlp", "train", "--lr", "0.5"], "learning_rate"),
                       (["analyze", "projection", "--lr", "0.5"], "learning_rate"),
                       (["overspec", "run", "--mlp_lr", "0.5"], "mlp_learning_rate"),
                       (["lm", "train", "--steps", "0.5"], "max_steps"),
                       (["hurdle", "run", "--seeds", "0.5"], "num_seeds")):
        assert getattr(build_parser().parse_args(argv), dest) == "0.5", argv
    assert len(_deprecated_warnings(caplog)) == 5


@pytest.mark.parametrize("argv", [["mlp", "train", "--lr", "0.1", "--learning_rate", "0.2"],
                                  ["mlp", "train", "--learning_rate", "0.2", "--lr", "0.1"],
                                  ["lm", "train", "--max_steps", "3", "--steps", "5"]])
def test_a_deprecated_flag_and_its_new_name_together_are_refused(argv, capsys):
    """argparse alone lets the last one win; either order is one error line naming both flags, before anything runs."""
    from knnlm.cli import main

    assert main(argv + ["--output_dir", "/nonexistent/never-made"]) == 2
    old, new = (argv[2], argv[4]) if argv[2] in ("--lr", "--steps") else (argv[4], argv[2])
    err = capsys.readouterr().err
    assert err == f"knnlm: error: flags: both {old} (deprecated) and {new} are set; keep {new} only\n"


def test_a_deprecated_flag_given_twice_keeps_the_last(caplog):
    assert build_parser().parse_args(["mlp", "train", "--lr", "0.1", "--lr", "0.3"]).learning_rate == "0.3"
