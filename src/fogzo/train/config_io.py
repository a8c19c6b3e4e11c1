"""Dataclass configs as data: JSON round trips, ``key=value`` overrides, type coercion.

Used by :class:`fogzo.train.config.TrainConfig` and :class:`fogzo.reproduce.mnist_config.MnistConfig`.

* :func:`config_to_dict`, :func:`config_from_dict`: nested frozen dataclasses, tuples and
  unions survive a JSON round trip.
* :func:`apply_overrides`: ``key=value`` strings such as ``fogzo.beta_min=0.99`` or
  ``lrs=1e-3,3e-3``, parsed by the field's type.
* :func:`format_config`: one ``name = value`` line per field.
* :class:`ConfigError`: a config, option, file or output folder is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "format_config",
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
                number = float(text)  # accepts "2e3"
                if number.is_integer():
                    return int(number)
        raise ValueError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
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

