"""One dataclass schema per command (:class:`Schema`): its command line, files and ``--help-keys`` derive from it."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


class ConfigError(ValueError):
    """A config, option, file, data source or output folder is wrong: one line, exit status 2, no work done."""


def option(
    default: Any, help: str = "", choices: tuple | None = None, low: int | None = None, section: str | None = None
) -> Any:
    """A config field: default, help text, allowed values, least value, file section (flat fields)."""
    how = {"default_factory": dict} if isinstance(default, dict) else {"default": default}
    return dataclasses.field(**how, metadata={"help": help, "choices": choices, "low": low, "section": section})


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def type_name(tp: Any) -> str:
    return " | ".join(
        "None" if m is type(None) else "comma-separated list" if typing.get_origin(m) is tuple else m.__name__
        for m in _members(tp)
    )


def _parse(text: str, tp: Any) -> Any:
    if tp is bool or tp is dict:
        return _WORDS[text.lower()] if tp is bool else json.loads(text)
    return int(text) if text.strip().lstrip("+-").isdigit() else float(text)  # int("2e3") is 2000


def coerce(value: Any, tp: Any, where: str = "value") -> Any:
    """``value`` (a command-line string or a file's value) as type ``tp``, else a :class:`ConfigError` on ``where``."""
    if type(None) in _members(tp) and (value is None or str(value).lower() in ("none", "null")):
        return None
    for member in sorted(_members(tp), key=lambda m: m is str):  # "2" is 2 for int | str
        parsed = value
        if typing.get_origin(member) is tuple:  # a comma-separated string, a list, or one value
            items = [i.strip() for i in value.split(",") if i.strip()] if isinstance(value, str) else value
            items = items if isinstance(items, list | tuple) else [items]
            with contextlib.suppress(ValueError):
                return tuple(coerce(i, typing.get_args(member)[0]) for i in items)
        elif isinstance(value, str) and member is not str:
            with contextlib.suppress(KeyError, ValueError):
                parsed = _parse(value, member)
        if member is float and type(parsed) is int or member is int and type(parsed) is float and parsed.is_integer():
            parsed = member(parsed)
        if type(parsed) is member:
            return parsed
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")


class Schema:
    """A config dataclass: its keys (``fogzo.beta_min`` in a nested dataclass, a table) → (type, field), and each
    spelling → its key: the key, ``section.key`` (:func:`option`), or its last part where unique; ``-`` is ``_``."""

    def __init__(self, cls: type) -> None:
        self.cls, hints = cls, typing.get_type_hints(cls)
        self.keys: dict[str, tuple[Any, dataclasses.Field]] = {}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                self.keys.update({f"{f.name}.{k}": v for k, v in Schema(hints[f.name]).keys.items()})
            else:
                self.keys[f.name] = (hints[f.name], f)
        sections = {f"{f.metadata['section']}.{k}": k for k, (_, f) in self.keys.items() if f.metadata.get("section")}
        known, lasts = {key: key for key in self.keys} | sections, [key.rpartition(".")[2] for key in self.keys]
        self.spellings = known | {n: k for k, n in zip(self.keys, lasts) if lasts.count(n) == 1 and n not in known}

    def values(self, config: Any) -> dict[str, Any]:
        return {key: functools.reduce(getattr, key.split("."), config) for key in self.keys}

    def check(self, config: Any) -> None:
        """Each value against its field's ``choices`` and ``low`` (least value; of each item of a tuple)."""
        for key, value in self.values(config).items():
            meta = self.keys[key][1].metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{key}={value!r} is not one of {list(meta['choices'])}")
            items = value if isinstance(value, tuple) else () if value is None else (value,)
            if meta.get("low") is not None and any(item < meta["low"] for item in items):
                raise ConfigError(f"{key} must be >= {meta['low']}, got {value!r}")

    def unknown(self, key: str, where: str) -> ConfigError:
        head, _, last = key.rpartition(".")  # near spellings in the same table; for a bare key, near keys too
        names = [*(() if head else self.keys), *(s for s in self.spellings if s.rpartition(".")[0] == head)]
        close = difflib.get_close_matches(last, {n.rpartition(".")[2] for n in names})
        hint = " or ".join(dict.fromkeys(n for m in close for n in names if n.rpartition(".")[2] == m))
        return ConfigError(
            f"unknown config key {key!r} in {where}{f' (did you mean {hint}?)' if hint else ''}; valid keys: {', '.join(self.keys)} (--help-keys lists them with their defaults)"
        )

    def read(self, table: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
        """A (nested) table of a file, dict or command line → ``{key: value read by its type}``."""
        found: dict[str, Any] = {}
        for spelled, value in table.items():
            if spelled.startswith("_"):  # a comment
                continue
            path = prefix + spelled.replace("-", "_")
            key = self.spellings.get(path)
            if isinstance(value, Mapping) and (key is None or self.keys[key][0] is not dict):
                inner = self.read(value, where, path + ".")
            elif key is None and any(s.startswith(path + ".") for s in self.spellings):
                raise ConfigError(f"{path} in {where}: expected a table, got {value!r}")
            elif key is None:
                raise self.unknown(path, where)
            else:
                inner = {key: coerce(value, self.keys[key][0], f"{key} in {where}")}
            if twice := found.keys() & inner.keys():
                raise ConfigError(f"key {min(twice)!r} is given twice in {where}")
            found.update(inner)
        return found

    def build(self, values: Mapping[str, Any], where: str, cls: type | None = None, prefix: str = "") -> Any:
        """The config from ``{key: value}`` (other keys keep their defaults); the dataclass checks itself."""
        fields, hints = {}, typing.get_type_hints(cls := cls or self.cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                fields[f.name] = self.build(values, where, hints[f.name], f"{prefix}{f.name}.")
            elif prefix + f.name in values:
                fields[f.name] = values[prefix + f.name]
        try:
            return cls(**fields)
        except (TypeError, ValueError) as error:
            raise error if isinstance(error, ConfigError) else ConfigError(f"{where}: {error}") from None

    def parse_command_line(self, tokens: Iterable[str]) -> dict[str, Any]:
        """``--key=value``, ``--key value``, ``--flag``, ``--no-flag`` → ``{key: value}`` (a later one wins)."""
        texts, tokens = {}, list(tokens)
        while tokens:
            token = tokens.pop(0)
            body, equals, text = token[2:].partition("=")
            name = body.replace("-", "_")
            head, _, last = name.rpartition(".")  # --no-fogzo.one-sided and --fogzo.no-one-sided negate a flag
            plain = name[3:] if name[:3] == "no_" else f"{head}.{last[3:]}" if last[:3] == "no_" else ""
            negated = name not in self.spellings
            if not token.startswith("--") or token == "--":
                raise ConfigError(f"expected --key=value, got {token!r}; valid keys: {', '.join(self.keys)}")
            if negated and (equals or plain not in self.spellings):
                raise self.unknown(name, "the command line")
            key = self.spellings[plain if negated else name]
            tp = self.keys[key][0]
            if not equals and (negated or not tokens or tokens[0].startswith("--")):
                if negated and bool not in _members(tp):
                    raise ConfigError(f"--{body}: {key} is not a boolean")
                if bool not in _members(tp):
                    raise ConfigError(f"--{body} needs a value (expected {type_name(tp)})")
                text = str(not negated)
            elif not equals:
                text = tokens.pop(0)
            texts[key] = text
        return self.read(texts, "the command line")

    def help(self, config: Any) -> str:
        """One line per key: ``--fogzo.beta-min (or --beta-min)  float, default 0.999: help (one of: ...)``."""
        lines = []
        for key, value in self.values(config).items():
            (tp, f), spelled = self.keys[key], f"--{key.replace('_', '-')}"
            others = [f"--{s.replace('_', '-')}" for s, k in self.spellings.items() if k == key and s != key]
            spelled += f" (or {', '.join(others)})" if others else ""
            text = f": {f.metadata['help']}" if f.metadata.get("help") else ""
            choices = f" (one of: {', '.join(map(str, f.metadata['choices']))})" if f.metadata.get("choices") else ""
            lines.append(f"  {spelled:<44} {type_name(tp)}, default {value!r}{text}{choices}")
        return "\n".join(lines)


def config_from_dict(cls: type, table: Mapping[str, Any], where: str = "a dict") -> Any:
    """Dataclass ``cls`` from a (nested) table: :func:`config_to_dict`'s output, a file's, or part of one."""
    return (schema := Schema(cls)).build(schema.read(table, where), where)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready ``dict`` of a (nested) dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def format_config(config: Any) -> str:
    values = Schema(type(config)).values(config)
    return "\n".join([f"{type(config).__name__}:"] + [f"  {key} = {value!r}" for key, value in values.items()])


def read_table(path: str | Path) -> dict[str, Any]:
    """The table of a ``.toml`` or ``.json`` file; an unreadable file is a one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            table = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser from tomli (a dependency there)
                import tomli as tomllib
            table = tomllib.loads(text)
        problem = "" if isinstance(table, dict) else f"must hold a table of keys, got a JSON {type(table).__name__}"
    except ModuleNotFoundError:
        problem = "needs the tomli package on Python < 3.11: pip install 'tomli>=1.1' (or use a JSON config)"
    except UnicodeDecodeError as error:
        problem = f"is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
    except json.JSONDecodeError as error:
        problem = f"is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
    except ValueError as error:  # tomllib.TOMLDecodeError
        problem = f"is not valid TOML: {error}"
    except IsADirectoryError:
        problem = "is a folder; pass a .toml or .json file"
    except FileNotFoundError:
        problem = "does not exist"
    except OSError as error:
        problem = f"cannot be read: {error.strerror or error}"
    if problem:
        raise ConfigError(f"config file {path} {problem}")
    return table
