"""Dataclass configs, mirrored as CLI flags and settable from a YAML/JSON file.

Every field carries ``metadata={"help": ...}``. Precedence: CLI flag > config file > dataclass default.

One name per concept across commands (transformers' where it has one: ``learning_rate``, ``max_steps``; ``seeds`` is
always a list of seeds, ``num_seeds`` a count). A renamed field lists its old names in ``metadata={"deprecated":
(...)}``: for one release the old flag and the old config key still work, with a one-line warning naming the new one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import KnnlmError
from .fileio import atomic_write_json

log = logging.getLogger(__name__)


def _unwrap_optional(tp):
    """Optional[X] -> X (and whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_KINDS = {bool: "a boolean", dict: "a mapping", list: "a list", tuple: "a list"}
_WANT = {int: "a whole number", float: "a number", str: "a string"}


def _coerce(name: str, tp, value, source: str | Path | None = None):
    """Converts a CLI string or a YAML value to the field's type, or raises KnnlmError naming the flag (and ``source``,
    the config file the value came from)."""
    where = f"--{name}" + (f" (from {source})" if source else "")
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise KnnlmError(f"{where}: a value is required")
    origin = typing.get_origin(tp)
    try:
        if origin in (list, tuple):
            (item_tp,) = typing.get_args(tp)[:1]
            # a YAML scalar for a list flag (`tol: 0.001`) is a one-item list; an empty string the empty list (the
            # helps' "empty: none"), not one empty item
            items = (value.split(",") if value.strip() else []) if isinstance(value, str) else (
                list(value) if isinstance(value, (list, tuple)) else [value])
            return [_coerce(name, item_tp, v.strip() if isinstance(v, str) else v, source) for v in items]
        if origin is typing.Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise KnnlmError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in TRUE_WORDS:
                return True
            if low in FALSE_WORDS:
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            # str() of a mapping would become a folder named "{'a': 1}", and int(True) a k of 1: a YAML value of
            # another kind is a mistake in the file, not something to convert
            kind = _KINDS.get(type(value))
            if kind:
                shown = str(value).lower() if isinstance(value, bool) else repr(value)
                raise KnnlmError(f"{where}: expected {_WANT[tp]}, got {kind} ({shown})")
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
    except (TypeError, ValueError):
        raise KnnlmError(f"{where}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # a boolean flag's values


def bool_flag(name: str, value) -> bool:
    """A boolean flag declared without a dataclass field (``--flag``, ``--flag true|false``, yes/no, on/off, 1/0), read
    as every field's is; a KnnlmError naming ``--name`` otherwise."""
    return _coerce(name, bool, value)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def deprecated_names(classes) -> dict[str, str]:
    """``{old name: new name}`` over the fields of one dataclass or several (their ``metadata["deprecated"]``)."""
    classes = classes if isinstance(classes, (list, tuple)) else [classes]
    live = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {old: f.name for cls in classes for f in dataclasses.fields(cls)
            for old in f.metadata.get("deprecated", ()) if old not in live}


def _both_set(source: str, old: str, new: str) -> str:
    return f"{source}: both {old} (deprecated) and {new} are set; keep {new} only"


def rename_deprecated(values: dict, classes, warn: bool = True, source: str = "--config") -> dict:
    """``values`` (config keys or CLI values) with deprecated names replaced by their new ones, warning once per name
    (``source`` says where: a config file or the flags). Both names set is an error."""
    table = deprecated_names(classes)
    out = dict(values)
    for old, new in table.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is None:
            continue
        if out.get(new) is not None:
            raise KnnlmError(_both_set(source, old, new))
        if warn:
            log.warning("%s: %s is deprecated, use %s (the old name is accepted until the next release)", source, old,
                        new)
        out[new] = value
    return out


_GIVEN = "_knnlm_renamed_flags"  # namespace attribute: {dest of a renamed field: the option strings given for it}


def _note_given(namespace, dest: str, option_string: str) -> None:
    given = getattr(namespace, _GIVEN, None) or {}
    setattr(namespace, _GIVEN, {**given, dest: [*given.get(dest, ()), option_string]})


class _DeprecatedFlag(argparse.Action):
    """An old flag name: sets the new field and warns (hidden from --help). Given together with its new flag, in either
    order, :func:`resolve` refuses it (argparse alone would let the last one win silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        log.warning("%s is deprecated, use --%s (the old flag is accepted until the next release)", option_string,
                    self.dest)
        _note_given(namespace, self.dest, option_string)
        setattr(namespace, self.dest, values)


class _RenamedFlag(argparse._StoreAction):
    """The current name of a renamed field: stores as usual and notes that it was given (see :class:`_DeprecatedFlag`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        _note_given(namespace, self.dest, option_string)
        super().__call__(parser, namespace, values, option_string)


def field_default(f: dataclasses.Field):
    """A dataclass field's default (its factory's value for a list); None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def changed_fields(obj, names) -> list[str]:
    """The fields of dataclass instance ``obj`` among ``names`` whose value is not their default: the settings a run
    was given, for refusing those it would not read."""
    names = set(names)
    return [f.name for f in dataclasses.fields(obj) if f.name in names and getattr(obj, f.name) != field_default(f)]


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Adds one flag per dataclass field (and hidden ones for its deprecated names); unset flags stay None so a config
    file can fill them."""
    group = parser.add_argument_group(cls.__name__)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        default = field_default(f)
        help_text = f.metadata.get("help", "")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        tp, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) is typing.Literal:
            help_text += f" One of: {', '.join(map(str, typing.get_args(tp)))}."
        extra = {"nargs": "?", "const": "true"} if tp is bool else {}  # `--flag` alone means true
        renamed = {"action": _RenamedFlag} if f.metadata.get("deprecated") else {}
        group.add_argument(f"--{f.name}", default=None, metavar=f.name.upper(), dest=f.name, **renamed,
                           help=f"{help_text} (default: {shown})".replace("%", "%%"), **extra)  # argparse %-formats help
        for old in f.metadata.get("deprecated", ()):
            group.add_argument(f"--{old}", dest=f.name, action=_DeprecatedFlag, help=argparse.SUPPRESS, **extra)


def add_config_flag(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--config FILE|PRESET``, the file that :func:`resolve` merges under the command's flags (one spelling for all)."""
    parser.add_argument("--config", default=default, metavar="FILE|PRESET",
                        help="YAML/JSON file, or a shipped preset name, setting this command's options (flags win)"
                             + (f" (default: {default})" if default else ""))


def add_command(sub, name: str, classes, func, **parser_kwargs) -> argparse.ArgumentParser:
    """A subcommand of ``sub`` (an argparse subparsers action): ``--config`` (:func:`add_config_flag`), one flag per
    field of each dataclass in ``classes`` (:func:`add_arguments`), and ``func`` as its handler; ``parser_kwargs`` go
    to ``add_parser`` (help, description). Every command of the CLI is made here."""
    parser = sub.add_parser(name, **parser_kwargs)
    add_config_flag(parser)
    for cls in classes if isinstance(classes, (list, tuple)) else [classes]:
        add_arguments(parser, cls)
    parser.set_defaults(func=func)
    return parser


PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def presets() -> list[str]:
    """Names of the config files shipped with knnlm (usable as ``--config NAME``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


class _DuplicateKey(Exception):
    def __init__(self, key, where: str = ""):
        super().__init__(key)
        self.key, self.where = key, where


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, f" (lines {seen[key]} and {key_node.start_mark.line + 1})")
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: the base class says so
                    pass
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs):
    """``object_pairs_hook`` for json: a key given twice in one object is an error (json keeps the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


YAML_SUFFIXES = (".yaml", ".yml")
CONFIG_SUFFIXES = (*YAML_SUFFIXES, ".json")


def load_config_file(path: str | Path, flag: str = "--config") -> dict:
    """A YAML/JSON config file, or a shipped preset by name (``--config cpu-tiny``); errors name ``flag``.

    A .yaml/.yml file is read as YAML, any other as JSON. A key given twice is refused: the YAML and JSON parsers both
    keep the last one without a word."""
    path = Path(path)
    if not path.is_file() and (PRESETS_DIR / f"{path.name}.yaml").is_file() and path.suffix == "":
        path = PRESETS_DIR / f"{path.name}.yaml"
    if path.is_dir():
        raise KnnlmError(f"{flag}: {path} is a folder; pass a YAML or JSON file or a preset name "
                         f"({', '.join(presets())})")
    if not path.is_file():
        raise KnnlmError(f"{flag}: {path} does not exist; pass a YAML or JSON file or a preset name "
                         f"({', '.join(presets())})")
    as_yaml = path.suffix in YAML_SUFFIXES
    try:
        text = path.read_bytes().decode("utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader) if as_yaml else json.loads(text,
                                                                                     object_pairs_hook=_unique_pairs)
    except UnicodeDecodeError as e:
        raise KnnlmError(f"{flag}: {path} is not UTF-8 at byte {e.start}; re-encode it as UTF-8") from None
    except _DuplicateKey as e:
        raise KnnlmError(f"{flag}: {path} sets {e.key} twice{e.where}; keep one") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0]
        if path.suffix not in CONFIG_SUFFIXES:
            raise KnnlmError(f"{flag}: {path} was read as JSON and is not valid JSON ({first}); a config is read by "
                             f"its name: .yaml/.yml as YAML, .json as JSON; rename it to one of those") from None
        raise KnnlmError(f"{flag}: {path} is not valid {'YAML' if as_yaml else 'JSON'} ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KnnlmError(f"{flag}: {path} must hold a mapping of option names to values")
    return data


def resolve(classes, namespace: argparse.Namespace | dict | None = None, config_file: str | Path | None = None):
    """Builds one instance per dataclass in ``classes`` from defaults, a config file and CLI overrides.

    Unknown config keys are errors (a typo must not silently fall back to a default). Returns a tuple in the order given,
    or the single instance when one class is given.
    """
    single = not isinstance(classes, (list, tuple))
    classes = [classes] if single else list(classes)
    cli = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace or {})
    for dest, given in (cli.get(_GIVEN) or {}).items():  # a renamed field's old and new flag on one command line
        old = [flag for flag in given if flag != f"--{dest}"]
        if old and f"--{dest}" in given:
            raise KnnlmError(_both_set("flags", old[0], f"--{dest}"))
    cli = rename_deprecated(cli, classes, source="flags")
    from_file = rename_deprecated(load_config_file(config_file), classes, source=f"--config {config_file}") \
        if config_file else {}
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise KnnlmError(f"--config: {config_file} has unknown key(s) {', '.join(unknown)}; "
                         f"valid keys: {', '.join(sorted(known))}")
    out = []
    for cls in classes:
        hints = _hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if cli.get(f.name) is not None:
                kwargs[f.name] = _coerce(f.name, hints[f.name], cli[f.name])
            elif f.name in from_file:
                kwargs[f.name] = _coerce(f.name, hints[f.name], from_file[f.name], config_file)
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
        out.append(obj)
    return out[0] if single else tuple(out)


def to_dict(*objs) -> dict:
    """Merges several config dataclasses into one flat dict (field names are unique across a command's configs)."""
    merged: dict = {}
    for obj in objs:
        merged.update(dataclasses.asdict(obj))
    return merged


def save_config(out_dir: str | Path, *objs) -> Path:
    """Writes the resolved config of a run as ``config.json`` in its output folder."""
    return atomic_write_json(Path(out_dir) / "config.json", to_dict(*objs))
