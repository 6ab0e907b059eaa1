"""Config dataclasses that declare every option once and generate their CLI flags.

An option is a dataclass field made with :func:`opt`: its default, help text and range check live
in one place. :func:`add_arguments` turns the fields into argparse flags, :func:`from_args` builds the
dataclass back (flags override values from a ``--config`` file), and ``__post_init__`` of every
config calls :func:`check` so a bad value fails the same way from the CLI, a file or Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A user-facing configuration error: the message names the option and what to do."""


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
) -> Any:
    """Declare one option. ``lo``/``hi`` bound numbers (``lo_open`` makes the low bound exclusive);
    ``validate`` returns an error message or None; ``cli=False`` keeps it out of the flags."""
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
    flag = flag_name(name)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
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
    if value is None:
        return None
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


def check(cfg: Any) -> None:
    """Coerce every field to its declared type (values from YAML/TOML/JSON behave like parsed flags),
    then range- and choice-check it; raise ConfigError naming the flag."""
    coerce(cfg)
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        meta = f.metadata
        if not meta:
            continue
        value = getattr(cfg, f.name)
        name = flag_name(f.name)
        if value is None:
            if meta["required"]:
                raise ConfigError(f"{name} is required")
            continue
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


def _parse_kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one flag per field of ``config_cls``. Defaults are left as None (SUPPRESS) so that
    :func:`from_args` can tell a flag the user gave from one they did not."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if not meta or not meta["cli"]:
            continue
        base, is_list, _ = _base_type(hints[f.name])
        default = f.default if f.default is not _MISSING else f.default_factory()  # type: ignore[misc]
        help_text = meta["help"]
        if default not in (None, [], {}, False):
            help_text += f" (default: {default})"
        elif meta["required"]:
            help_text += " (required)"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if base is bool:
            kwargs["type"] = _parse_bool
            kwargs["nargs"] = "?"
            kwargs["const"] = True
            kwargs["metavar"] = "BOOL"
        elif base is dict:
            kwargs["type"] = _parse_kv
            kwargs["action"] = "append"
            kwargs["metavar"] = meta["metavar"] or "KEY=VALUE"
        else:
            kwargs["type"] = base
            if is_list:
                kwargs["nargs"] = "+"
        if meta["choices"] is not None and base is not bool:
            kwargs["choices"] = meta["choices"]
        if meta["positional"]:
            kwargs.pop("default")
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, **kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or TOML (.toml) file, keys as field names or flag names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml", ".json"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"--config {path}: expected a .yaml, .yml, .json or .toml file")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


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


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def diff(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Keys whose values differ between two config dicts, as 'key: saved -> current' lines."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
