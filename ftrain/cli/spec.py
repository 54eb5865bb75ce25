"""Field types: what a field accepts (`Spec`), and a value in each of its forms.

A field's annotation becomes a `Spec` (`spec_of`); a value comes in as command-line text
(`from_text`) or as JSON-like data from a file or `ft.cli.from_dict` (`from_value`), checked
against the spec, and goes out as JSON-compatible data (`plain`, what `ft.cli.to_dict`
gives) or as it would be typed on the command line (`to_text`, for the help).
"""

from __future__ import annotations

import enum
import os
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from ftrain.cli.bounds import quote
from ftrain.errors import ConfigError


@attrs.frozen
class Spec:
    """What a field accepts. kind: bool, int, float, str, path, enum, literal, seq, nested."""

    kind: str
    py: Any = None                      # the Path class, the Enum class, the nested class
    optional: bool = False              # None is allowed too
    choices: tuple[Any, ...] = ()       # literal: the allowed values
    items: tuple[Spec, ...] = ()       # seq: one spec (variadic) or one per position
    variadic: bool = False              # seq: tuple[X, ...], list[X]
    container: type = tuple             # seq: what the values become

    def describe(self) -> str:
        """What is expected, in words ("an int", "one of 'a', 'b'", ...)."""
        text = {
            "bool": "true or false", "int": "an int", "float": "a float",
            "str": "a string", "path": "a path (a string)",
        }.get(self.kind)
        if self.kind in ("enum", "literal"):
            text = "one of " + ", ".join(repr(plain(c, "")) for c in self.options())
        elif self.kind == "seq":
            if self.variadic:
                text = f"a list of {self.items[0].noun()}s"
            elif len(set(self.items)) == 1:
                text = f"a list of {len(self.items)} {self.items[0].noun()}s"
            else:
                text = f"a list of {len(self.items)} values (" + ", ".join(
                    i.noun() for i in self.items) + ")"
        elif self.kind == "nested":
            text = f"a mapping of {self.py.__name__}'s fields"
        return f"{text} or none" if self.optional else str(text)

    def noun(self) -> str:
        if self.kind in ("enum", "literal"):
            return "{" + ",".join(str(plain(c, "")) for c in self.options()) + "}"
        return {"bool": "bool", "path": "path", "str": "string"}.get(self.kind, self.kind)

    def options(self) -> tuple[Any, ...]:
        return tuple(self.py) if self.kind == "enum" else self.choices

    def metavar(self) -> str:
        if self.kind in ("enum", "literal"):
            name = self.noun()
        elif self.kind == "seq":
            name = self.items[0].metavar()
        else:
            name = self.kind.upper()
        return f"{name}|none" if self.optional and self.kind != "seq" else name


_SCALARS: dict[Any, str] = {bool: "bool", int: "int", float: "float", str: "str"}
SUPPORTED = ("int, float, str, bool, pathlib.Path, an Enum, Literal[...], tuple[X, ...], "
             "tuple[X, Y], list[X] (X one of those scalars), X | None, or an attrs class")


def spec_of(tp: Any, where: str, *, element: bool = False) -> Spec:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2 and not element:
            inner = spec_of(rest[0], where)
            if inner.kind == "nested":
                raise ConfigError(f"field {where!r}: an optional nested config "
                                  f"({_name(tp)}) is not supported; give it a default")
            return attrs.evolve(inner, optional=True)
        raise ConfigError(f"field {where!r} has type {_name(tp)}, which the command line "
                          f"cannot express; supported: {SUPPORTED}")
    if tp in _SCALARS:
        return Spec(_SCALARS[tp], tp)
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        return Spec("path", tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return Spec("enum", tp)
    if origin is Literal:
        return Spec("literal", choices=tuple(args))
    if origin in (tuple, list, Sequence) and not element:
        items: tuple[Spec, ...]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items, variadic = (spec_of(args[0], where, element=True),), True
        elif origin is tuple and args and Ellipsis not in args:
            items, variadic = tuple(spec_of(a, where, element=True) for a in args), False
        elif origin is not tuple and len(args) == 1:
            items, variadic = (spec_of(args[0], where, element=True),), True
        else:
            raise ConfigError(f"field {where!r} has type {_name(tp)}; give the element type "
                              "(tuple[int, ...], tuple[float, float], list[str])")
        return Spec("seq", items=items, variadic=variadic,
                    container=list if origin is list else tuple)
    if isinstance(tp, type) and attrs.has(tp) and not element:
        return Spec("nested", tp)
    raise ConfigError(f"field {where!r} has type {_name(tp)}, which the command line cannot "
                      f"express; supported: {SUPPORTED}")


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


class Invalid(ValueError):
    """A value does not fit its field's type (the message says how)."""


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def from_text(text: Any, spec: Spec) -> Any:
    """A command-line string (a list of them for a sequence) as the field's value."""
    if spec.optional and (text == "none" or text == ["none"]):
        return None
    if spec.kind == "seq":
        values = list(text)
        if not spec.variadic and len(values) != len(spec.items):
            raise Invalid(f"expected {spec.describe()}, got {len(values)} value"
                          f"{'' if len(values) == 1 else 's'}: {' '.join(values)}")
        items = spec.items * len(values) if spec.variadic else spec.items
        return spec.container(from_text(v, s) for v, s in zip(values, items))
    kind = spec.kind
    invalid = Invalid(f"expected {spec.describe()}, got {quote(text, style='repr')}")
    if kind in ("int", "float", "path"):
        try:
            return spec.py(text)
        except (ValueError, OverflowError):
            raise invalid from None
    if kind == "str":
        return text
    if kind == "bool" and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    for option in spec.options():
        if text in (str(plain(option, "")), to_text(option)) or (
                isinstance(option, enum.Enum) and text == option.name):
            return option
    raise invalid


def from_value(value: Any, spec: Spec, where: str) -> Any:
    """A value read from a file or given to `from_dict` (JSON-like), checked and typed."""
    if value is None and spec.optional:
        return None
    kind = spec.kind
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and is_number:
        try:
            return float(value)
        except OverflowError:
            raise Invalid(f"{where}: expected {spec.describe()}, got {quote(value)} (int), "
                          "too large for a float") from None
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "path" and isinstance(value, (str, os.PathLike)):
        return spec.py(value)
    if kind in ("enum", "literal"):
        for option in spec.options():
            raw = option.value if isinstance(option, enum.Enum) else option
            if value is option or (type(value) is type(raw) and value == raw) or (
                    isinstance(option, enum.Enum) and value == option.name):
                return option
    if kind == "seq" and isinstance(value, (list, tuple)):
        if not spec.variadic and len(value) != len(spec.items):
            raise Invalid(f"{where}: expected {spec.describe()}, got {len(value)} "
                          f"value{'' if len(value) == 1 else 's'}: {quote(value)}")
        items = spec.items * len(value) if spec.variadic else spec.items
        return spec.container(from_value(v, s, f"{where}[{i}]")
                              for i, (v, s) in enumerate(zip(value, items)))
    if kind == "nested" and isinstance(value, spec.py):
        return value
    hint = ""
    if kind == "literal" and any(isinstance(c, str) and c == quote(value)
                                 for c in spec.choices):
        hint = " (a string: quote it)"
    raise Invalid(f"{where}: expected {spec.describe()}, got {quote(value)} "
                  f"({type(value).__name__}){hint}")


def plain(value: Any, where: str) -> Any:
    """`value` as JSON-compatible data: enums by value, paths as strings, tuples as lists."""
    if attrs.has(type(value)):
        return {field_key(f): plain(getattr(value, f.name), f"{where}.{field_key(f)}" if where
                                    else field_key(f))
                for f in attrs.fields(type(value)) if f.init}
    if isinstance(value, enum.Enum):
        return plain(value.value, where)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"config field {where!r} holds a {type(value).__name__} "
                      f"({quote(value, style='repr')}), "
                      "which has no JSON form; use int, float, str, bool, a path, an enum, a "
                      "list or a nested attrs class")


def field_key(field: attrs.Attribute) -> str:
    """The name `__init__` takes for `field` (attrs drops a leading underscore)."""
    return str(field.alias)


def to_text(value: Any) -> str:
    """A value as typed on the command line (help text)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return to_text(value.value)
    if isinstance(value, (list, tuple)):
        return " ".join(to_text(v) for v in value) if value else "empty"
    return str(value)
