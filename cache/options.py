"""Config dataclasses that declare every option once and generate their CLI flags.

An option is a dataclass field made with :func:`opt`: its default, help text, range check and help
group live in one place. :func:`add_arguments` turns the fields into argparse flags, grouped in
``--help`` by :data:`GROUPS` with each default and range appended to the help text, :func:`from_args` builds the
dataclass back (flags override values from a ``--config`` file), and ``__post_init__`` of every
config calls :func:`check` so a bad value fails the same way from the CLI, a file or Python.

Every selkd CLI parses with :class:`OptionParser`, so every usage problem (an unknown or abbreviated
flag, a bad value, a broken ``--config`` file) is one :class:`ConfigError` line naming the flag or
file, which the CLIs print and exit 2 on.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from selkd.cache.errors import ConfigError

_MISSING = dataclasses.MISSING
# argparse takes only "-1" and "-1.5" for negative numbers; "-1e-4" would read as an unknown option.
_NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
_TOML_PLACE = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$")

# The sections of every CLI's --help, in this order (an option declares its own with opt(group=...)).
# "other" only collects an option declared without a group (tests refuse that).
GROUPS = ("model", "data", "classes", "selection", "optimisation", "output", "distributed", "other")


def opt(
    default: Any = _MISSING,
    help: str = "",
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    choices: Sequence[Any] | None = None,
    required: bool = False,
    positional: bool = False,
    cli: bool = True,
    metavar: str | None = None,
    validate: Callable[[Any], str | None] | None = None,
    group: str = "other",
) -> Any:
    """Declare one option. ``lo``/``hi`` bound numbers (``lo_open`` makes the low bound exclusive);
    ``validate`` returns an error message or None; ``cli=False`` keeps it out of the flags; ``group``
    is its section of ``--help`` (one of :data:`GROUPS`)."""
    if group not in GROUPS:
        raise ValueError(f"opt(group={group!r}): not one of {', '.join(GROUPS)}")
    meta = {
        "help": help,
        "lo": lo,
        "hi": hi,
        "lo_open": lo_open,
        "choices": tuple(choices) if choices is not None else None,
        "required": required,
        "positional": positional,
        "cli": cli,
        "metavar": metavar,
        "validate": validate,
        "group": group,
    }
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if default is _MISSING:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_list, is_optional) for a field annotation."""
    origin = typing.get_origin(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        return typing.get_args(tp)[0], True, optional
    if origin is dict:
        return dict, False, optional
    return tp, False, optional


def _coerce_one(name: str, value: Any, tp: Any) -> Any:
    """One value to the field's type. Lenient where files are ambiguous (PyYAML reads ``1e-4`` as a
    string, TOML has no None), strict where a silent conversion would hide a mistake (``3.5`` steps)."""
    if value is None:
        return None  # "not given": check() decides whether that is allowed
    flag = flag_name(name)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{flag}: expected a list, got {value!r}")
        return [_coerce_one(name, v, typing.get_args(tp)[0]) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{flag}: expected a mapping of KEY=VALUE, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{flag}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{flag}: expected a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{flag}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{flag}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{flag}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{flag}: expected a string, got {value!r}")
    return value


def coerce(cfg: Any) -> None:
    """Coerce every field to its declared type in place (ConfigError naming the flag if impossible), so
    values from Python, a YAML/TOML file or JSON (a saved config) behave like parsed flags."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _coerce_one(f.name, getattr(cfg, f.name), hints[f.name]))


# --------------------------------------------------------------------------- resume checks


def _check_given(cfg: Any, hints: Mapping[str, Any]) -> None:
    """Refuse missing values: required options not given (all named at once), and ``null`` (a YAML
    ``key:`` without a value) for an option that has no "unset" state."""
    fields = [f for f in dataclasses.fields(cfg) if f.metadata and getattr(cfg, f.name) is None]
    missing = [flag_name(f.name) for f in fields if f.metadata["required"]]
    if len(missing) == 1:
        raise ConfigError(f"{missing[0]} is required")
    if missing:
        raise ConfigError(f"{', '.join(missing[:-1])} and {missing[-1]} are required")
    for f in fields:
        if not _base_type(hints[f.name])[2]:
            raise ConfigError(f"{flag_name(f.name)}: needs a value, got none (null)")


def check(cfg: Any) -> None:
    """Coerce every field to its declared type (values from YAML/TOML/JSON behave like parsed flags),
    then range- and choice-check it; raise ConfigError naming the flag."""
    coerce(cfg)
    hints = typing.get_type_hints(type(cfg))
    _check_given(cfg, hints)
    for f in dataclasses.fields(cfg):
        meta = f.metadata
        value = getattr(cfg, f.name)
        if not meta or value is None:
            continue
        name = flag_name(f.name)
        base, is_list, _ = _base_type(hints[f.name])
        values = value if is_list else [value]
        for v in values:
            if meta["choices"] is not None and v not in meta["choices"]:
                valid = ", ".join(str(c) for c in meta["choices"])
                raise ConfigError(f"{name}: {v!r} is not one of: {valid}")
            if base in (int, float) and not isinstance(v, bool):
                lo, hi = meta["lo"], meta["hi"]
                if lo is not None and (v <= lo if meta["lo_open"] else v < lo):
                    rel = ">" if meta["lo_open"] else ">="
                    raise ConfigError(f"{name} must be {rel} {lo}, got {v}")
                if hi is not None and v > hi:
                    raise ConfigError(f"{name} must be <= {hi}, got {v}")
        if meta["validate"] is not None:
            problem = meta["validate"](value)
            if problem:
                raise ConfigError(f"{name}: {problem}")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_kv(text: str) -> tuple[str, Any]:
    """One ``--storage-option KEY=VALUE``: the value as JSON when it parses (true, 3, [..]), else text."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


class OptionParser(argparse.ArgumentParser):
    """The parser of the selkd CLIs (its subparsers are of this class too). It refuses abbreviations
    (``--class`` for ``--classes``: a later option sharing the prefix would change their meaning),
    answers an unknown flag with the nearest known ones, reads ``-1e-4`` as a number, and raises
    :class:`ConfigError` (one line) instead of printing usage and exiting; ``--help`` still prints and
    exits 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            raise ConfigError(self._unrecognized(extra, parsed))
        return parsed

    def _unrecognized(self, extra: list[str], parsed: argparse.Namespace) -> str:
        flags = [a for a in extra if a.startswith("--")]
        if not flags:
            return f"unexpected argument(s): {' '.join(extra)}"
        given = flags[0].split("=", 1)[0]
        known = sorted(self._flags(parsed))
        near = [f for f in known if f.startswith(given)][:3] or difflib.get_close_matches(given, known, n=1)
        hint = f"did you mean {' or '.join(near)}?" if near else f"see {self.prog} --help"
        return f"{given}: unknown option; {hint}"

    def _flags(self, parsed: argparse.Namespace) -> list[str]:
        """The long flags of this parser and of the subcommand that was chosen."""
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None))
                if isinstance(chosen, OptionParser):
                    flags += chosen._flags(parsed)
        return flags


def negated_flag(name: str) -> str:
    """``--no-x``: the flag that turns boolean option ``x`` off."""
    return "--no-" + name.replace("_", "-")


def _show(value: Any) -> str:
    """A default or bound as a user would type it: ``true``, ``0.0001``, ``1``, ``sample:50``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def range_text(meta: Mapping[str, Any]) -> str | None:
    """An option's numeric range as ``x >= 1``, ``0 < x <= 1`` or ``x <= 0.5`` (None: unbounded)."""
    lo, hi = meta["lo"], meta["hi"]
    low = "<" if meta["lo_open"] else "<="
    if lo is None:
        return None if hi is None else f"x <= {_show(hi)}"
    if hi is None:
        return f"x {'>' if meta['lo_open'] else '>='} {_show(lo)}"
    return f"{_show(lo)} {low} x <= {_show(hi)}"


def _help(meta: Mapping[str, Any], default: Any, is_bool: bool, name: str) -> str:
    """The help text, then what the declaration says: required, the ``--no-x`` form, the default
    (unless there is none: None or empty) and the range."""
    notes = ["required"] if meta["required"] else []
    if is_bool:
        notes.append(f"{negated_flag(name)}: false")
    if default not in (None, [], {}):
        notes.append(f"default: {_show(default)}")
    limits = range_text(meta)
    if limits is not None:
        notes.append(f"range: {limits}")
    return meta["help"] + (f" ({'; '.join(notes)})" if notes else "")


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG X.Y.Z`` (the package version) and exit 0, before any other check."""
    from selkd.cache import __version__

    parser.add_argument("--version", action="version", version=f"{parser.prog} {__version__}")


def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one flag per field of ``config_cls``. Defaults are left as None (SUPPRESS) so that
    :func:`from_args` can tell a flag the user gave from one they did not. A boolean option ``x``
    takes ``--x``, ``--x BOOL`` (true/false/yes/no/1/0, as in config files) and ``--no-x``. Each flag
    goes into its option's section of ``--help`` (sections in :data:`GROUPS` order; an empty one is
    not shown)."""
    hints = typing.get_type_hints(config_cls)
    groups = {name: parser.add_argument_group(f"{name} options") for name in GROUPS}
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if not meta or not meta["cli"]:
            continue
        base, is_list, _ = _base_type(hints[f.name])
        group = groups[meta["group"]]
        default = f.default if f.default is not _MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"help": _help(meta, default, base is bool, f.name), "default": argparse.SUPPRESS}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if base is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
            off = {"action": "store_const", "const": False, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
            group.add_argument(negated_flag(f.name), dest=f.name, **off)
        elif base is dict:
            kwargs.update(type=parse_kv, action="append", metavar=meta["metavar"] or "KEY=VALUE")
        else:
            kwargs["type"] = base
            if is_list:
                kwargs["nargs"] = "+"
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["positional"]:
            kwargs.pop("default")
            group.add_argument(f.name, **kwargs)
        else:
            group.add_argument(flag_name(f.name), dest=f.name, **kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml/.json) or TOML (.toml) file, keys as field names or flag names.
    A file that does not parse is one ConfigError naming it and the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path}: expected a .yaml, .yml, .json or .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    data = _parse_toml(text, path) if path.suffix == ".toml" else _parse_yaml(text, path)
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _parse_toml(text: str, path: Path) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        found = _TOML_PLACE.match(str(err))  # tomllib puts the place at the end of its message
        if found is None:
            raise ConfigError(f"--config {path}: invalid TOML: {err}") from None
        problem, line, column = found.groups()
        raise ConfigError(f"--config {path}: invalid TOML at line {line}, column {column}: {problem}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        kind = "JSON" if path.suffix == ".json" else "YAML"  # JSON is read as the YAML it is
        raise ConfigError(f"--config {path}: invalid {kind}{where}: {problem}") from None


def build(config_cls: type, values: Mapping[str, Any], source: str = "options") -> Any:
    """Make a config from a mapping, refusing unknown keys by name."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)}")
    return config_cls(**values)


def from_args(config_cls: type, args: argparse.Namespace, file_values: Mapping[str, Any] | None = None) -> Any:
    """Config from a config file's values overridden by the flags that were given."""
    values: dict[str, Any] = dict(file_values or {})
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if isinstance(value, list) and value and isinstance(value[0], tuple):
                value = dict(value)  # key=value pairs
            values[f.name] = value
    return build(config_cls, values)
