"""Dataclass configs as data: JSON round trips, ``key=value`` overrides, type coercion.

Used by :class:`fogzo.train.config.TrainConfig` and :class:`fogzo.reproduce.mnist_config.MnistConfig`.

* :func:`config_to_dict`, :func:`config_from_dict`: nested frozen dataclasses, tuples and
  unions survive a JSON round trip.
* :func:`apply_overrides`: ``key=value`` strings such as ``fogzo.beta_min=0.99`` or
  ``lrs=1e-3,3e-3``, parsed by the field's type.
* :func:`format_config`: one ``name = value`` line per field.
* :class:`ConfigError`: a config, option, file or output folder is wrong.

The one command-line syntax of ``fogzo train`` and ``fogzo reproduce`` (and of
``python -m fogzo.train.compare``) is parsed here by :func:`parse_command_line`: a key is
its TOML path, dotted (``--optim.lr=3e-3``, ``--fogzo.beta-min=0.99``), or its last part
alone where no other key ends the same way (``--lr=3e-3``, ``--beta-min=0.99``); ``--key=value``
or ``--key value``; ``--flag`` / ``--no-flag`` for booleans; ``-`` and ``_`` are
interchangeable. Config files (TOML or JSON) are read by :func:`read_table`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "apply_overrides",
    "apply_table",
    "config_from_dict",
    "config_keys",
    "config_to_dict",
    "format_config",
    "key_aliases",
    "normalise_key",
    "parse_command_line",
    "read_table",
    "toml_parser",
    "type_name",
]


class ConfigError(ValueError):
    """A config, option, file, data source or output folder is wrong (found before any work).

    The command line prints it as one line (``fogzo train: error: ...``) and exits with 2.
    """


# ----------------------------------------------------------------------------- configs


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready ``dict`` of a (nested) dataclass; tuples become lists."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild dataclass ``cls`` from :func:`config_to_dict`'s output (or a partial dict).

    Missing keys keep their defaults; unknown keys raise ``ValueError``.
    """
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    values = {name: _coerce(value, hints[name], name) for name, value in data.items()}
    return cls(**values)


def apply_overrides(config: Any, overrides: Iterable[str]) -> Any:
    """A copy of ``config`` with ``key=value`` overrides applied (a later one wins).

    ``key`` is a field name, dotted for nested dataclasses (``fogzo.beta_min``). ``value``
    is parsed by the field's type: numbers, ``true``/``false``, ``none``/``null`` for an
    optional field, and comma-separated lists for tuple fields (``seeds=0,1,2``; an empty
    value is an empty tuple). All overrides are applied together, so fields that are
    validated against each other (``spsa_n`` and ``spsa_iterations``) can change at once.
    """
    changes: dict[str, Any] = {}
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"an override must look like key=value, got {override!r}")
        node, path = changes, key.split(".")
        owner = config
        for depth, name in enumerate(path):
            if not dataclasses.is_dataclass(owner):
                raise ValueError(f"{key}: {'.'.join(path[:depth])} has no fields")
            names = [field.name for field in dataclasses.fields(owner)]
            if name not in names:
                raise ValueError(f"unknown field {name!r} in {key!r}; {type(owner).__name__} has: {', '.join(names)}")
            if depth == len(path) - 1:
                node[name] = _coerce(text.strip(), typing.get_type_hints(type(owner))[name], key)
            else:
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ValueError(f"{key}: {name} is not a nested config")
                owner = getattr(owner, name)
    return _apply_changes(config, changes)


def _apply_changes(config: Any, changes: Mapping[str, Any]) -> Any:
    values = {
        name: _apply_changes(getattr(config, name), value) if isinstance(value, dict) else value
        for name, value in changes.items()
    }
    return dataclasses.replace(config, **values) if values else config


_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a CLI string or a JSON value) to type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS and type(None) in args):
            if type(None) not in args:
                raise ValueError(f"{key}: None is not allowed")
            return None
        errors = []
        # Prefer the non-string alternatives so "2" becomes 2 for ``int | str``.
        for alternative in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(value, alternative, key)
            except (TypeError, ValueError) as error:
                errors.append(str(error))
        raise ValueError(f"{key}: cannot read {value!r} as {tp}: {'; '.join(errors)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value)
    if origin is tuple:
        if isinstance(value, str):
            items: list[Any] = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], key) for item in items)
        if len(items) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(items)}")
        return tuple(_coerce(item, arg, key) for item, arg in zip(items, args))
    if origin is typing.Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise ValueError(f"{key}: {value!r} is not one of {args}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)  # accepts "2e3"
                except ValueError:
                    number = math.nan
                if number.is_integer():
                    return int(number)
        raise ValueError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def format_config(config: Any, indent: str = "  ") -> str:
    """One ``name = value`` line per field; nested dataclasses are indented."""
    lines = [f"{type(config).__name__}:"]

    def walk(obj: Any, prefix: str) -> None:
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{prefix}{field.name}: ({type(value).__name__})")
                walk(value, prefix + indent)
            else:
                lines.append(f"{prefix}{field.name} = {value!r}")

    walk(config, indent)
    return "\n".join(lines)



# ------------------------------------------------------------ the command-line syntax


def config_keys(cls: type) -> dict[str, Any]:
    """Every settable key of dataclass ``cls`` → its type; nested dataclasses give dotted keys."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys.update({f"{field.name}.{inner}": tp for inner, tp in config_keys(hint).items()})
        else:
            keys[field.name] = hint
    return keys


def key_aliases(keys: Iterable[str], sections: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every spelling of a key → the key: the key itself, ``section.key`` where ``sections``
    gives a flat key a section, and a dotted key's last part where no other key ends so."""
    keys = list(keys)
    aliases = {key: key for key in keys}
    for key, section in (sections or {}).items():
        aliases[f"{section}.{key}"] = key
    last_parts: dict[str, list[str]] = {}
    for key in keys:
        last_parts.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for last, owners in last_parts.items():
        if len(owners) == 1 and last not in aliases:
            aliases[last] = owners[0]
    return aliases


def normalise_key(text: str) -> str:
    """``--fogzo.beta-min`` → ``fogzo.beta_min`` (``-`` and ``_`` are interchangeable)."""
    return text.strip().lstrip("-").replace("-", "_")


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def type_name(hint: Any) -> str:
    """``int | None`` → ``"int | None"``; tuples read as a comma-separated list."""
    names = []
    for member in _members(hint):
        if member is type(None):
            names.append("None")
        elif typing.get_origin(member) is tuple:
            names.append("comma-separated list")
        else:
            names.append(getattr(member, "__name__", str(member)))
    return " | ".join(names)


def unknown_key_error(key: str, where: str, aliases: Iterable[str], valid: str) -> ConfigError:
    """The one-line error for a key that is not a config key, with a did-you-mean."""
    # A dotted key is compared with the dotted spellings; a bare one with every key's last
    # part (its bare spelling where there is one: lr for lr_rate, a.eps or b.eps for eps).
    pool: dict[str, list[str]] = {}
    for alias in aliases:
        if "." in key:
            if "." in alias:
                pool[alias] = [alias]
            continue
        last = alias.rsplit(".", 1)[-1]
        if last == alias:
            pool[last] = [alias]
        elif last not in pool or "." in pool[last][0]:
            pool.setdefault(last, []).append(alias)
    close = [alias for match in difflib.get_close_matches(key, list(pool), n=3) for alias in pool[match]]
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; {valid}")


def parse_command_line(
    tokens: Iterable[str], keys: Mapping[str, Any], aliases: Mapping[str, str], valid: str
) -> dict[str, str]:
    """Command-line overrides → ``{key: text}`` (a later one wins); the texts are not parsed yet.

    ``tokens`` are ``--key=value``, ``--key value``, ``--flag`` or ``--no-flag`` (booleans:
    the text becomes ``"true"`` / ``"false"``); a key is any spelling in ``aliases`` (see
    :func:`key_aliases`), with ``-`` and ``_`` interchangeable. ``keys`` maps each key to its
    type. An unknown key, a missing value or a stray word is a :class:`ConfigError` whose
    message ends with ``valid`` (the list of keys).
    """
    tokens = list(tokens)
    texts: dict[str, str] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"expected --key=value, got {token!r}; {valid}")
        body = token[2:]
        if "=" in body:
            spelled, text = body.split("=", 1)
            name = normalise_key(spelled)
            if name not in aliases:
                raise unknown_key_error(name, "the command line", aliases, valid)
            texts[aliases[name]] = text
            index += 1
            continue
        name = normalise_key(body)
        head, _, last = name.rpartition(".")
        negated = [spelling for spelling in (  # --no-fogzo.one-sided and --fogzo.no-one-sided
            name[3:] if name.startswith("no_") else None,
            f"{head}.{last[3:]}" if head and last.startswith("no_") else None,
        ) if spelling in aliases]
        if name not in aliases and negated:
            key = aliases[negated[0]]
            if bool not in _members(keys[key]):
                raise ConfigError(f"--{body}: {key} is not a boolean")
            texts[key] = "false"
            index += 1
            continue
        if name not in aliases:
            raise unknown_key_error(name, "the command line", aliases, valid)
        key = aliases[name]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if following is None or following.startswith("--"):
            if bool not in _members(keys[key]):
                raise ConfigError(f"--{body} needs a value (expected {type_name(keys[key])})")
            texts[key] = "true"
            index += 1
            continue
        texts[key] = following
        index += 2
    return texts


# -------------------------------------------------------------------- config files


def toml_parser() -> types.ModuleType:
    """``tomllib`` (Python >= 3.11), else ``tomli`` (the same parser; a dependency on 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                "reading a TOML config on Python < 3.11 needs the tomli package: pip install 'tomli>=1.1' "
                "(or use a JSON config)"
            ) from None
    return tomllib


def read_table(path: str | Path) -> dict[str, Any]:
    """The table of keys in a ``.toml`` or ``.json`` config file.

    Every way a file can be unreadable (missing, a folder, not UTF-8, malformed JSON or
    TOML, not a table) is a :class:`ConfigError` naming the file and, for syntax errors,
    the line and column.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a .toml or .json file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    else:
        toml = toml_parser()
        try:
            table = toml.loads(text)
        except toml.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{path} must hold a table of keys, got a JSON {type(table).__name__}")
    return table


def apply_table(config: Any, table: Mapping[str, Any], where: str) -> Any:
    """A copy of dataclass ``config`` with a config file's ``table`` applied.

    Nested tables set nested dataclasses (``[fogzo]`` → ``config.fogzo``); keys starting with
    ``_`` are comments; ``-`` and ``_`` are interchangeable. Unknown keys and wrong types are
    a :class:`ConfigError` naming ``where``.
    """
    hints = typing.get_type_hints(type(config))
    names = [field.name for field in dataclasses.fields(config) if field.init]
    changes: dict[str, Any] = {}
    for spelled, value in table.items():
        if spelled.startswith("_"):
            continue
        name = normalise_key(spelled)
        if name not in names:
            valid = ", ".join(names)
            raise unknown_key_error(name, where, names, f"{type(config).__name__} has: {valid}")
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} in {where}: expected a table, got {value!r}")
            changes[name] = apply_table(getattr(config, name), value, f"{where} [{name}]")
            continue
        try:
            changes[name] = _coerce(value, hints[name], name)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: {error}") from None
    try:
        return dataclasses.replace(config, **changes) if changes else config
    except (TypeError, ValueError) as error:  # the dataclass's own checks
        raise ConfigError(f"{where}: {error}") from None
