"""One dataclass schema per command; its command line, config files and ``--help-keys`` derive from it.

A nested dataclass is a table of the file (``[fogzo]``); a flat field may name its section
(:func:`option`: ``[optim] lr``). A key is spelled, in files and on the command line, as its path
(``lr``, ``fogzo.beta_min``), its section path (``optim.lr``) or its last part where unique
(``beta_min``), ``-`` and ``_`` alike; its value is read by the field's type (:func:`coerce`). The
command line: ``--key=value``, ``--key value``, ``--flag``, ``--no-flag``. Every mistake is a
one-line :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config, option, file, data source or output folder is wrong: one line, exit status 2, no work done."""


def option(default: Any, help: str = "", choices: tuple | None = None, low: int | None = None,
           section: str | None = None) -> Any:
    """A config field: default, help text, allowed values, least value, file section (flat fields)."""
    metadata = {"help": help, "choices": choices, "low": low, "section": section}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@functools.cache
def keys(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every key of dataclass ``cls`` → (type, field); a nested dataclass's keys are dotted."""
    found, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = keys(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else {}
        found.update({f"{f.name}.{key}": value for key, value in nested.items()} or {f.name: (hints[f.name], f)})
    return found


@functools.cache
def spellings(cls: type) -> dict[str, str]:
    """Every spelling → its key: the key, ``section.key``, the last part where no other key ends so."""
    table = {key: key for key in keys(cls)}
    table.update({f"{f.metadata['section']}.{k}": k for k, (_, f) in keys(cls).items() if f.metadata.get("section")})
    lasts = [key.rsplit(".", 1)[-1] for key in keys(cls)]
    table.update({last: key for key, last in zip(keys(cls), lasts) if lasts.count(last) == 1 and last not in table})
    return table


def values_of(config: Any) -> dict[str, Any]:
    return {key: functools.reduce(getattr, key.split("."), config) for key in keys(type(config))}


def check(config: Any) -> None:
    """Each value against its field's ``choices`` and ``low`` (least value)."""
    for key, value in values_of(config).items():
        meta = keys(type(config))[key][1].metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r} is not one of {list(meta['choices'])}")
        if meta.get("low") is not None and value is not None and value < meta["low"]:
            raise ConfigError(f"{key} must be >= {meta['low']}, got {value!r}")


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def type_name(tp: Any) -> str:
    return " | ".join("None" if m is type(None) else "comma-separated list" if typing.get_origin(m) is tuple
                      else m.__name__ for m in _members(tp))


def _unknown(cls: type, key: str, where: str) -> ConfigError:
    head, pool = key.rpartition(".")[0], {}  # the last parts of the keys in the same table → their spellings
    for spelled, full in spellings(cls).items():
        if spelled.rpartition(".")[0] == head:
            pool.setdefault(spelled.rpartition(".")[2], []).append(spelled)
        if not head:  # a bare key: also any key's last part (lr for lr_rate, a.eps and b.eps for eps)
            pool.setdefault(full.rpartition(".")[2], []).append(full)
    close = dict.fromkeys(k for match in difflib.get_close_matches(key.rpartition(".")[2], list(pool)) for k in pool[match])
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(keys(cls))} "
                       "(--help-keys lists them with their defaults)")


_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def coerce(value: Any, tp: Any, key: str = "") -> Any:
    """``value`` (a command-line string or a file's value) as type ``tp``, else ``ValueError``."""
    members = _members(tp)
    if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in members or value is None:
        if type(None) in members:
            return None
    elif len(members) > 1:
        for member in sorted(members, key=lambda m: m is str):  # "2" is 2 for int | str
            try:
                return coerce(value, member)
            except ValueError:
                pass
    elif typing.get_origin(tp) is tuple:
        items = [item for item in value.split(",") if item.strip()] if isinstance(value, str) else value
        items = items if isinstance(items, (list, tuple)) else [items]
        return tuple(coerce(item.strip() if isinstance(item, str) else item, typing.get_args(tp)[0]) for item in items)
    else:
        parsed = value
        for parse in ((lambda t: _WORDS[t.lower()]) if tp is bool else json.loads if tp is dict else int, float):
            if isinstance(value, str) and tp is not str and parsed is value:
                try:
                    parsed = parse(value)
                except (KeyError, ValueError):
                    pass
        parsed = float(parsed) if tp is float and type(parsed) is int else parsed
        parsed = int(parsed) if tp is int and type(parsed) is float and parsed.is_integer() else parsed
        if type(parsed) is tp:
            return parsed
    raise ValueError(f"expected {type_name(tp)}, got {value!r}")


def flatten(cls: type, table: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """A file's (nested) table → ``{key: value read by its type}``; keys starting with ``_`` are comments."""
    found: dict[str, Any] = {}
    for spelled, value in table.items():
        path = prefix + spelled.replace("-", "_")
        key = spellings(cls).get(path)
        if spelled.startswith("_"):
            continue
        if isinstance(value, Mapping) and (key is None or keys(cls)[key][0] is not dict):
            inner = flatten(cls, value, where, path + ".")
        elif key is None and any(s.startswith(path + ".") for s in spellings(cls)):
            raise ConfigError(f"{path} in {where}: expected a table, got {value!r}")
        elif key is None:
            raise _unknown(cls, path, where)
        else:
            inner = {key: _read(value, key, keys(cls)[key][0], f"{key} in {where}")}
        if twice := found.keys() & inner.keys():
            raise ConfigError(f"key {min(twice)!r} is given twice in {where}")
        found.update(inner)
    return found


def _read(value: Any, key: str, tp: Any, where: str) -> Any:
    try:
        return coerce(value, tp, key)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def build(cls: type, values: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """Dataclass ``cls`` from ``{key: value}`` (other keys keep their defaults); the class checks itself."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: build(hints[f.name], values, where, f"{prefix}{f.name}.") if dataclasses.is_dataclass(
        hints[f.name]) else values[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in values
        or dataclasses.is_dataclass(hints[f.name])}
    try:
        return cls(**fields)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def config_from_dict(cls: type, table: Mapping[str, Any], where: str = "a dict") -> Any:
    """Dataclass ``cls`` from a (nested) table: :func:`config_to_dict`'s output, a file's, or part of one."""
    return build(cls, flatten(cls, table, where), where)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready ``dict`` of a (nested) dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def format_config(config: Any) -> str:
    return "\n".join([f"{type(config).__name__}:"] + [f"  {k} = {v!r}" for k, v in values_of(config).items()])


def keys_help(config: Any) -> str:
    """One line per key: ``--fogzo.beta-min (or --beta-min)  float, default 0.999: help (one of: ...)``."""
    lines = []
    for key, value in values_of(config).items():
        tp, meta = keys(type(config))[key][0], keys(type(config))[key][1].metadata
        others = [f"--{s.replace('_', '-')}" for s, k in spellings(type(config)).items() if k == key and s != key]
        spelled = f"--{key.replace('_', '-')}" + (f" (or {', '.join(others)})" if others else "")
        text = f": {meta['help']}" if meta.get("help") else ""
        choices = f" (one of: {', '.join(map(str, meta['choices']))})" if meta.get("choices") else ""
        lines.append(f"  {spelled:<44} {type_name(tp)}, default {value!r}{text}{choices}")
    return "\n".join(lines)


def parse_command_line(cls: type, tokens: Iterable[str]) -> dict[str, Any]:
    """``--key=value``, ``--key value``, ``--flag``, ``--no-flag`` → ``{key: value}`` (a later one wins)."""
    found, tokens, spelled = {}, [*tokens, "--"], spellings(cls)
    while len(tokens) > 1:
        token = tokens.pop(0)
        body, equals, text = token[2:].partition("=")
        name = body.replace("-", "_")
        head, _, last = name.rpartition(".")
        negated = [s for s in (name[3:], f"{head}.{last[3:]}") if s in spelled and "no_" in (name[:3], last[:3])]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"expected --key=value, got {token!r}; valid keys: {', '.join(keys(cls))}")
        if name not in spelled and (equals or not negated):
            raise _unknown(cls, name, "the command line")
        key = spelled.get(name) or spelled[negated[0]]
        tp = keys(cls)[key][0]
        if not equals and (name not in spelled or tokens[0].startswith("--")):
            if bool not in _members(tp):
                raise ConfigError(f"--{body} needs a value (expected {type_name(tp)})" if name in spelled
                                  else f"--{body}: {key} is not a boolean")
            text = str(name in spelled)
        elif not equals:
            text = tokens.pop(0)
        found[key] = _read(text, key, tp, f"--{body}")
    return found


def toml_parser() -> types.ModuleType:
    """``tomllib`` (Python >= 3.11), else ``tomli`` (the same parser; a dependency on 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading a TOML config on Python < 3.11 needs the tomli package: pip install "
                              "'tomli>=1.1' (or use a JSON config)") from None
    return tomllib


def read_table(path: str | Path) -> dict[str, Any]:
    """The table of a ``.toml`` or ``.json`` file; an unreadable file is a one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        table = json.loads(text) if path.suffix.lower() == ".json" else toml_parser().loads(text)
    except ConfigError:
        raise
    except UnicodeDecodeError as error:
        problem = f"is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
    except json.JSONDecodeError as error:
        problem = f"is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
    except ValueError as error:  # tomllib.TOMLDecodeError
        problem = f"is not valid TOML: {error}"
    except (IsADirectoryError, FileNotFoundError):
        problem = "is a folder; pass a .toml or .json file" if path.is_dir() else "does not exist"
    except OSError as error:
        problem = f"cannot be read: {error.strerror or error}"
    else:
        if isinstance(table, dict):
            return table
        problem = f"must hold a table of keys, got a JSON {type(table).__name__}"
    raise ConfigError(f"config file {path} {problem}")
