"""Configuration from the command line: an argparse parser built from an attrs class.

Lightning's `ArgumentParser` integration (`add_argparse_args`, `from_argparse_args`), in
ftrain's shape: the configuration is a frozen attrs record you declare once, with typed
fields, defaults and help text; `ft.cli.parse` fills it from defaults, then config files
(`--config run.json` or `.yaml`), then command-line flags, and checks every value against
its type. `ft.cli.to_dict(config)` is what you give `ft.fit(..., hparams=)`, so every
checkpoint records how it was trained; `ft.cli.from_dict(Config, ft.load_hparams(path))`
rebuilds the record (with overrides), as Lightning's `load_from_checkpoint(path, **kw)`.

Field types: `int`, `float`, `str`, `pathlib.Path`, `bool` (`--flag` / `--no-flag`),
`enum.Enum` and `typing.Literal[...]` (choices), `tuple[int, ...]`, `tuple[float, float]`,
`list[str]` (several values after one flag), `X | None` (a value or the word `none`), and
nested attrs classes (flags and keys with dotted names: `--optim.lr 0.01`).

Errors on the command line (an unknown flag, a value of the wrong type) print the usage
and a message and exit with status 2, as argparse does; errors in a config file, a value
rejected by one of the class's attrs validators, and every error of `from_dict` raise
`ft.ConfigError`, naming the key, what was expected and what was found.

A config file may come from anyone, so every format is read through one bounded path: at
most 1 MiB of UTF-8 text, nested at most 32 levels deep (a dotted key counts a level per
dot), at most 10000 values (a YAML alias counts as the whole value it names, each time it
is used; an alias inside the value it names is refused), and ints of at most 100 digits.
Anything else (a binary or Latin-1 file, a YAML "billion laughs") raises `ft.ConfigError`
after bounded work, and an error message quotes at most 200 characters of any value.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import enum
import inspect
import itertools
import json
import os
import pathlib
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import attrs

from ftrain.errors import ConfigError

T = TypeVar("T")

__all__ = ["from_dict", "parse", "parser", "to_dict"]

_RESERVED = ("config", "print_config", "help")  # the options every parser has

_MAX_BYTES = 2**20        # a config file's size
_MAX_DEPTH = 32           # levels of nesting in a config (a dotted key: one per dot)
_MAX_VALUES = 10_000      # values in a config, as a tree (a YAML alias: its whole value)
_MAX_INT_DIGITS = 100     # digits of an int (Python parses at most 4300 from a string)
_QUOTE_CHARS = 200        # characters of a value quoted in an error message


# -- field types ---------------------------------------------------------------------------

@attrs.frozen
class _Spec:
    """What a field accepts. kind: bool, int, float, str, path, enum, literal, seq, nested."""

    kind: str
    py: Any = None                      # the Path class, the Enum class, the nested class
    optional: bool = False              # None is allowed too
    choices: tuple[Any, ...] = ()       # literal: the allowed values
    items: tuple[_Spec, ...] = ()       # seq: one spec (variadic) or one per position
    variadic: bool = False              # seq: tuple[X, ...], list[X]
    container: type = tuple             # seq: what the values become

    def describe(self) -> str:
        """What is expected, in words ("an int", "one of 'a', 'b'", ...)."""
        text = {
            "bool": "true or false", "int": "an int", "float": "a float",
            "str": "a string", "path": "a path (a string)",
        }.get(self.kind)
        if self.kind in ("enum", "literal"):
            text = "one of " + ", ".join(repr(_plain(c, "")) for c in self.options())
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
            return "{" + ",".join(str(_plain(c, "")) for c in self.options()) + "}"
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
_SUPPORTED = ("int, float, str, bool, pathlib.Path, an Enum, Literal[...], tuple[X, ...], "
              "tuple[X, Y], list[X] (X one of those scalars), X | None, or an attrs class")


def _spec(tp: Any, where: str, *, element: bool = False) -> _Spec:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2 and not element:
            inner = _spec(rest[0], where)
            if inner.kind == "nested":
                raise ConfigError(f"field {where!r}: an optional nested config "
                                  f"({_name(tp)}) is not supported; give it a default")
            return attrs.evolve(inner, optional=True)
        raise ConfigError(f"field {where!r} has type {_name(tp)}, which the command line "
                          f"cannot express; supported: {_SUPPORTED}")
    if tp in _SCALARS:
        return _Spec(_SCALARS[tp], tp)
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        return _Spec("path", tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _Spec("enum", tp)
    if origin is Literal:
        return _Spec("literal", choices=tuple(args))
    if origin in (tuple, list, Sequence) and not element:
        items: tuple[_Spec, ...]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items, variadic = (_spec(args[0], where, element=True),), True
        elif origin is tuple and args and Ellipsis not in args:
            items, variadic = tuple(_spec(a, where, element=True) for a in args), False
        elif origin is not tuple and len(args) == 1:
            items, variadic = (_spec(args[0], where, element=True),), True
        else:
            raise ConfigError(f"field {where!r} has type {_name(tp)}; give the element type "
                              "(tuple[int, ...], tuple[float, float], list[str])")
        return _Spec("seq", items=items, variadic=variadic,
                     container=list if origin is list else tuple)
    if isinstance(tp, type) and attrs.has(tp) and not element:
        return _Spec("nested", tp)
    raise ConfigError(f"field {where!r} has type {_name(tp)}, which the command line cannot "
                      f"express; supported: {_SUPPORTED}")


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _check_class(cls: Any, caller: str) -> None:
    if not (isinstance(cls, type) and attrs.has(cls)):
        what = (f"an instance of {type(cls).__name__}" if attrs.has(type(cls))
                else repr(cls) if not isinstance(cls, type) else cls.__name__)
        raise ConfigError(f"{caller} needs an attrs class (decorated with @attrs.define or "
                          f"@attrs.frozen), got {what}")


def _hints(cls: type) -> tuple[dict[str, Any], Exception | None]:
    """The class's annotations, evaluated. String annotations (`from __future__ import
    annotations`) are looked up in the class's module, else in the namespace of a caller
    that holds the class or its module (a module loaded without `sys.modules`, a class
    defined in a function)."""
    try:
        return typing.get_type_hints(cls), None
    except Exception as err:
        first = err
    frame = sys._getframe(1)
    while frame is not None:
        scopes: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
            (frame.f_globals, dict(frame.f_locals))]
        scopes += [(vars(v), None) for v in (*frame.f_locals.values(), *frame.f_globals.values())
                   if isinstance(v, types.ModuleType) and v.__name__ == cls.__module__]
        for globalns, localns in scopes:
            if cls in (globalns.get(cls.__name__), (localns or {}).get(cls.__name__)):
                with contextlib.suppress(Exception):  # not resolvable here: look further up
                    return typing.get_type_hints(cls, globalns, localns), None
        frame = frame.f_back  # type: ignore[assignment]
    return {}, first


def _fields(cls: type) -> list[tuple[str, attrs.Attribute, _Spec]]:
    """(key, field, spec) of each field `__init__` takes; key is the init name."""
    hints, unresolved = _hints(cls)
    out = []
    for field in attrs.fields(cls):
        if not field.init:
            continue
        key = _key(field)
        where = f"{cls.__name__}.{key}"
        tp = hints.get(field.name, field.type)
        if isinstance(tp, str):
            raise ConfigError(f"cannot resolve the annotation {tp!r} of field {where!r} "
                              f"({unresolved}); define the classes it names at module level")
        if tp is None:  # no annotation: the default's type, if it is a plain one
            default = field.default
            if isinstance(default, (bool, int, float, str, pathlib.PurePath)):
                tp = type(default)
            else:
                raise ConfigError(f"field {where!r} has no type annotation; annotate it "
                                  f"({_SUPPORTED})")
        out.append((key, field, _spec(tp, where)))
    return out


_MISSING = object()  # no default
_COMPUTED = object()  # a default computed from the other fields (Factory(takes_self=True))


def _default(field: attrs.Attribute) -> Any:
    default: Any = field.default
    if default is attrs.NOTHING:
        return _MISSING
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return _COMPUTED if default.takes_self else default.factory()
    return default


def _help_texts(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string right after a field) as help, where the source is
    readable; `metadata={"help": ...}` takes precedence."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except Exception:  # no source (an interactive session, exec): metadata only
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for prev, node in itertools.pairwise(body):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            target = prev.target if isinstance(prev, ast.AnnAssign) else None
            if isinstance(target, ast.Name):
                docs[target.id] = inspect.cleandoc(node.value.value)
    return docs


# -- values --------------------------------------------------------------------------------

class _Invalid(ValueError):
    """A value does not fit its field's type (the message says how)."""


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _from_text(text: Any, spec: _Spec) -> Any:
    """A command-line string (a list of them for a sequence) as the field's value."""
    if spec.optional and (text == "none" or text == ["none"]):
        return None
    if spec.kind == "seq":
        values = list(text)
        if not spec.variadic and len(values) != len(spec.items):
            raise _Invalid(f"expected {spec.describe()}, got {len(values)} value"
                           f"{'' if len(values) == 1 else 's'}: {' '.join(values)}")
        items = spec.items * len(values) if spec.variadic else spec.items
        return spec.container(_from_text(v, s) for v, s in zip(values, items))
    kind = spec.kind
    invalid = _Invalid(f"expected {spec.describe()}, got {_short(text, style='repr')}")
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
        if text in (str(_plain(option, "")), _shown(option)) or (
                isinstance(option, enum.Enum) and text == option.name):
            return option
    raise invalid


def _from_value(value: Any, spec: _Spec, where: str) -> Any:
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
            raise _Invalid(f"{where}: expected {spec.describe()}, got {_short(value)} (int), "
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
            raise _Invalid(f"{where}: expected {spec.describe()}, got {len(value)} "
                           f"value{'' if len(value) == 1 else 's'}: {_short(value)}")
        items = spec.items * len(value) if spec.variadic else spec.items
        return spec.container(_from_value(v, s, f"{where}[{i}]")
                              for i, (v, s) in enumerate(zip(value, items)))
    if kind == "nested" and isinstance(value, spec.py):
        return value
    hint = ""
    if kind == "literal" and any(isinstance(c, str) and c == _short(value)
                                 for c in spec.choices):
        hint = " (a string: quote it)"
    raise _Invalid(f"{where}: expected {spec.describe()}, got {_short(value)} "
                   f"({type(value).__name__}){hint}")


def _short(value: Any, limit: int = _QUOTE_CHARS, *,
           style: Literal["json", "repr", "text"] = "json") -> str:
    """`value` as an error message quotes it: as JSON (a tuple as a list; the repr of what
    JSON cannot write), cut to `limit` characters and "...", in work that grows with `limit`,
    not with `value` (a huge string, a deep or shared YAML tree, an int of a million digits).
    `style` says how a string is written: JSON (`"a"`), its repr (`'a'`) or as it is.

    Examples:
        >>> from ftrain.cli import _short
        >>> print(_short({"lr": [0.1, None, True], "name": "run"}))
        {"lr": [0.1, null, true], "name": "run"}
        >>> print(_short("x" * 1000, limit=10), _short("key", style="repr"))
        "xxxxxxxxx... 'key'
        >>> print(_short(10**5000))
        an int of 5001 digits
    """
    out: list[str] = []
    room = limit + 1  # one more than shown: to know whether anything was cut

    def put(text: str) -> None:
        nonlocal room
        if room > 0:
            out.append(text[:room])
            room -= len(text)

    def walk(v: Any, depth: int) -> None:
        if room <= 0:
            return
        if isinstance(v, (Mapping, list, tuple)):
            is_map = isinstance(v, Mapping)
            if depth >= 8:
                put("{...}" if is_map else "[...]")
                return
            put("{" if is_map else "[")
            items: Iterable[Any] = v.items() if isinstance(v, Mapping) else v
            for i, item in enumerate(items):
                if room <= 0:
                    return
                put(", " if i else "")
                if is_map:
                    walk(item[0], depth + 1)
                    put(": ")
                walk(item[1] if is_map else item, depth + 1)
            put("}" if is_map else "]")
        elif isinstance(v, str):
            text = v[:room]
            put(json.dumps(text) if style == "json" else repr(text) if style == "repr"
                else text)
        elif isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 1000:
            put(f"an int of {_digits(v)} digits")
        elif v is None or isinstance(v, (bool, int, float)):
            put(repr(v) if style == "repr" else json.dumps(v))
        else:
            try:
                put(repr(v))
            except Exception:  # a repr that fails says nothing either
                put(f"<{type(v).__name__}>")

    walk(value, 0)
    text = "".join(out)
    return text[:limit] + "..." if room <= 0 else text


def _digits(value: int) -> str:
    """How many decimal digits `abs(value)` has, without `str` (which stops at 4300 digits):
    exact up to 30000 digits, else "about" so many."""
    value = abs(value)
    digits = max(1, int(value.bit_length() * 0.30102999566398120))  # log10(2): low by <= 1
    if digits > 30_000:
        return f"about {digits}"
    return str(digits + (value >= 10**digits))


def _plain(value: Any, where: str) -> Any:
    """`value` as JSON-compatible data: enums by value, paths as strings, tuples as lists."""
    if attrs.has(type(value)):
        return {_key(f): _plain(getattr(value, f.name), f"{where}.{_key(f)}" if where
                                else _key(f))
                for f in attrs.fields(type(value)) if f.init}
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"config field {where!r} holds a {type(value).__name__} "
                      f"({_short(value, style='repr')}), "
                      "which has no JSON form; use int, float, str, bool, a path, an enum, a "
                      "list or a nested attrs class")


def _key(field: attrs.Attribute) -> str:
    """The name `__init__` takes for `field` (attrs drops a leading underscore)."""
    return str(field.alias)


def _flag(dotted: str) -> str:
    """The command-line flag of a (dotted) field name: `--model.hidden-size`."""
    return "--" + dotted.replace("_", "-")


def _shown(value: Any) -> str:
    """A value as typed on the command line (help text)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _shown(value.value)
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value) if value else "empty"
    return str(value)


# -- merging: defaults < files < flags -----------------------------------------------------

def _expand(data: Mapping[Any, Any], source: str, prefix: str) -> dict[str, Any]:
    """Dotted keys ("optim.lr") as nested dicts, dashes in keys as underscores; where two
    keys set one value (`{**hparams, "optim.lr": 0.1}`), the later one wins."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: keys must be strings, got "
                              f"{_short(key, style='repr')} "
                              f"{'in ' + prefix.rstrip('.') if prefix else 'at the top level'}")
        head, dot, rest = key.partition(".")
        head = head.replace("-", "_")
        if dot:
            value = {rest: value}
        if isinstance(out.get(head), Mapping) and isinstance(value, Mapping):
            out[head] = _merge_raw(out[head], value, source, f"{prefix}{head}.")
        else:
            out[head] = value
    return out


def _merge_raw(a: Mapping[str, Any], b: Mapping[str, Any], source: str, prefix: str
               ) -> dict[str, Any]:
    out = _expand(a, source, prefix)
    for key, value in _expand(b, source, prefix).items():
        if isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = _merge_raw(out[key], value, source, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def _typed(cls: type, data: Any, source: str, prefix: str = "") -> dict[str, Any]:
    """Check a (nested, possibly partial) mapping against `cls`; values come back typed."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping "
                          f"of {cls.__name__}'s fields, got {_short(data)} "
                          f"({type(data).__name__})")
    fields = {key: spec for key, _, spec in _fields(cls)}
    out: dict[str, Any] = {}
    for key, value in _expand(data, source, prefix).items():
        where = prefix + key
        if key not in fields:
            valid = [prefix + k for k in fields]
            close = difflib.get_close_matches(where, valid, n=1) if len(where) < 100 else []
            raise ConfigError(f"{source}: unknown key {_short(where, style='repr')} for "
                              f"{cls.__name__}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; valid keys: {', '.join(valid)}")
        spec = fields[key]
        if spec.kind == "nested" and isinstance(value, Mapping):
            out[key] = _typed(spec.py, value, source, where + ".")
            continue
        try:
            out[key] = _from_value(value, spec, where)
        except _Invalid as err:
            raise ConfigError(f"{source}: {err}") from None
    return out


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Missing(ConfigError):
    """Fields without a default were given no value."""

    def __init__(self, cls: type, keys: list[str]) -> None:
        self.keys = keys
        super().__init__(f"{cls.__name__}: no value for {', '.join(map(repr, keys))}, which "
                         f"{'has' if len(keys) == 1 else 'have'} no default")


def _instantiate(cls: type[T], tree: Mapping[str, Any], base: Any = None, prefix: str = ""
                 ) -> T:
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    for key, field, spec in _fields(cls):
        given = key in tree
        if spec.kind == "nested" and (not given or isinstance(tree[key], dict)):
            # a partial mapping (or nothing) over the default instance's values
            if base is not None:
                inner_base = getattr(base, field.name)
            else:
                default = _default(field)
                if not given and default is _COMPUTED:
                    continue  # attrs computes it
                inner_base = None if default is _MISSING else default
            if not given and inner_base is not None:
                kwargs[key] = inner_base
                continue
            try:
                kwargs[key] = _instantiate(spec.py, tree.get(key, {}), inner_base,
                                           f"{prefix}{key}.")
            except _Missing as err:
                missing += err.keys
        elif given:
            kwargs[key] = tree[key]
        elif base is not None:
            kwargs[key] = getattr(base, field.name)
        elif field.default is attrs.NOTHING:
            missing.append(prefix + key)
    if missing:
        raise _Missing(cls, missing)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # attrs validators
        raise ConfigError(f"{cls.__name__}{' (' + prefix.rstrip('.') + ')' if prefix else ''}"
                          f" rejected the configuration: {_short(str(err), 500, style='text')}"
                          ) from err


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


# -- files ---------------------------------------------------------------------------------

class _Refused(Exception):
    """A config exceeds one of the bounds (the message says which, and what was found)."""


def _read_file(path: str) -> Any:
    """The data of a config file: JSON, or YAML if the name ends in .yaml or .yml. Every
    format takes this one path: the bytes (at most `_MAX_BYTES`), decoded as UTF-8, parsed
    by a parser that refuses what is too deep or too large as it goes (so it cannot recurse
    or expand without bound), then checked as a whole by `_check_bounds`."""
    source = f"--config {path}"
    text = _read_text(path, source)
    try:
        if path.lower().endswith((".yaml", ".yml")):
            data = _load_yaml(text, source)
        else:
            data = _load_json(text, source)
        _check_bounds(data)
    except _Refused as err:
        raise ConfigError(f"{source}: {err}") from None
    except RecursionError:  # a parser's own guard (the bounds stop nesting long before)
        raise ConfigError(f"{source}: expected at most {_MAX_DEPTH} levels of nesting, "
                          "found more") from None
    return data


def _read_text(path: str, source: str) -> str:
    """The file as text: at most `_MAX_BYTES` bytes of UTF-8 (a byte-order mark is skipped)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
            if len(raw) > _MAX_BYTES:
                size = os.fstat(f.fileno()).st_size
                found = (f"one of {size / 2**20:.1f} MiB" if size > _MAX_BYTES
                         else "a larger stream")
                raise ConfigError(f"{source}: expected a config file of at most "
                                  f"{_MAX_BYTES // 2**20} MiB, found {found}")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{source}: cannot read it ({err})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{source}: expected UTF-8 text, found UTF-16 (save it as UTF-8)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{source}: expected UTF-8 text, found the byte "
                          f"0x{raw[err.start]:02x} at line {line}, which is not UTF-8: a binary "
                          "file, or text in another encoding (Latin-1?): save it as UTF-8"
                          ) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(f"{source}: expected UTF-8 text, found binary data (a NUL byte at "
                          f"line {line})")
    return text


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: not valid JSON ({_short(str(err), style='text')}); "
                          "YAML files must end in .yaml or .yml") from None


def _parse_int(text: str) -> int:
    """An int of JSON, refused before Python parses it when it has too many digits."""
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise _Refused(f"expected an int of at most {_MAX_INT_DIGITS} digits, found one of "
                       f"{digits} digits ({text[:20]}...)")
    return int(text)


def _load_yaml(text: str, source: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{source}: reading YAML needs pyyaml "
                          "(pip install pyyaml); or write the config as JSON") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader(yaml))  # a bounded SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_short(str(err), 500, style='text')}"
                          ) from None
    return {} if data is None else data


def _yaml_loader(yaml: Any) -> Any:
    """PyYAML's SafeLoader, also reading YAML 1.2 floats such as 1e-3 (1.1 reads a str), and
    bounded while it composes, before anything is built: nesting (`_MAX_DEPTH`), values
    counted as the tree they stand for (`_MAX_VALUES`: an alias counts as the whole value
    it names, each time, so aliases cannot multiply a small file into a huge tree), an alias
    inside the value it names (a cycle) is refused, and so are ints of too many characters
    (hex and base-60 ints are computed, not parsed: the digit limit of `int` misses them).
    A scalar its constructor cannot read (a 13th month) is a YAML error, with its line."""

    class Loader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
        """A private copy, so adding a resolver leaves PyYAML's SafeLoader alone."""

        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self.depth = 0
            self.values = 0                 # composed so far, aliases expanded
            self.sizes: dict[str, int] = {}  # anchor -> values in the value it names

        def count(self, values: int, event: Any) -> None:
            self.values += values
            if self.values > _MAX_VALUES:
                raise _Refused(f"expected at most {_MAX_VALUES} values, found more by line "
                               f"{event.start_mark.line + 1} (YAML aliases count as the "
                               "value they name, each time they are used)")

        def fetch_flow_collection_start(self, token_class: Any) -> None:
            # the scanner looks ahead (a flow collection may be a key) at a cost that grows
            # with the open `[` and `{`: refuse them at the bound, before the composer would
            if self.flow_level > _MAX_DEPTH:
                raise _Refused(f"expected at most {_MAX_DEPTH} levels of nesting, found more "
                               f"(line {self.get_mark().line + 1})")
            super().fetch_flow_collection_start(token_class)

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                if event.anchor in self.anchors and event.anchor not in self.sizes:
                    raise _Refused(f"expected a tree of values, found the alias "
                                   f"*{_short(event.anchor, 50, style='text')} inside the "
                                   f"value it names (line {event.start_mark.line + 1})")
                node = super().compose_node(parent, index)  # an undefined alias: an error
                self.count(self.sizes[event.anchor], event)
                return node
            if self.depth > _MAX_DEPTH:
                raise _Refused(f"expected at most {_MAX_DEPTH} levels of nesting, found more "
                               f"(line {event.start_mark.line + 1})")
            before = self.values
            self.count(1, event)
            self.depth += 1
            node = super().compose_node(parent, index)
            self.depth -= 1
            if event.anchor is not None:
                self.sizes[event.anchor] = self.values - before
            return node

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, TypeError, LookupError, ArithmeticError) as err:
                # a scalar its constructor cannot read (a 13th month, !!int "")
                value = _short(node.value, 50) if isinstance(node.value, str) else "it"
                raise yaml.constructor.ConstructorError(
                    None, None, f"cannot read {value} as {node.tag}: {err}", node.start_mark
                ) from None

        def construct_bounded_int(self, node: Any) -> int:
            text = str(node.value)
            digits = text.lstrip("+-").replace("_", "")
            if digits.isascii() and digits.isdigit() and not digits.startswith("0"):
                if len(digits) > _MAX_INT_DIGITS:
                    raise _Refused(f"expected an int of at most {_MAX_INT_DIGITS} digits, "
                                   f"found one of {len(digits)} digits ({text[:20]}...) at "
                                   f"line {node.start_mark.line + 1}")
            elif len(text) > _MAX_INT_DIGITS:
                raise _Refused(f"expected an int of at most {_MAX_INT_DIGITS} digits, found "
                               f"one written with {len(text)} characters ({text[:20]}...) at "
                               f"line {node.start_mark.line + 1}")
            return int(self.construct_yaml_int(node))

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_bounded_int)
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return Loader


def _check_bounds(data: Any) -> None:
    """Raise `_Refused` where `data`, walked as a tree (a value reached twice counts twice),
    is nested more than `_MAX_DEPTH` levels (a dotted key counts a level per dot), holds more
    than `_MAX_VALUES` values, or an int of more than `_MAX_INT_DIGITS` digits. The same
    check for every format and for `from_dict`; its work is bounded by `_MAX_VALUES`,
    whatever `data` is (shared values, a cycle).

    Examples:
        >>> from ftrain.cli import _check_bounds
        >>> _check_bounds({"optim": {"lr": 0.1}, "sizes": [64, 32]})
        >>> deep: list = []
        >>> for _ in range(40):
        ...     deep = [deep]
        >>> _check_bounds({"sizes": deep})
        Traceback (most recent call last):
        ...
        ftrain.cli._Refused: expected at most 32 levels of nesting, found more
    """
    values = 1
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (Mapping, list, tuple)):
            values += len(value) * (2 if isinstance(value, Mapping) else 1)  # keys count
            if values > _MAX_VALUES:
                raise _Refused(f"expected at most {_MAX_VALUES} values, found more")
            if depth + 1 > _MAX_DEPTH and len(value):
                raise _Refused(f"expected at most {_MAX_DEPTH} levels of nesting, found more")
            if not isinstance(value, Mapping):
                stack.extend((item, depth + 1) for item in value)
                continue
            for key, item in value.items():
                dots = key.count(".") if isinstance(key, str) else 0
                if depth + 1 + dots > _MAX_DEPTH:
                    raise _Refused(f"expected at most {_MAX_DEPTH} levels of nesting, found "
                                   "more (a dotted key counts a level per dot)")
                stack.append((item, depth + 1 + dots))
        elif (isinstance(value, int) and not isinstance(value, bool)
              and value.bit_length() > 3 * _MAX_INT_DIGITS
              and abs(value) >= 10**_MAX_INT_DIGITS):
            raise _Refused(f"expected an int of at most {_MAX_INT_DIGITS} digits, found one "
                           f"of {_digits(value)} digits ({_short(value, 20)})")


# -- the parser ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with unknown flags answered by the valid ones (and the closest match)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # `--lr -1e-3`: argparse before 3.13 takes "-1e-3" for an option, not a number
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = []
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], flags, n=1)
                if arg.startswith("-") and close:
                    hints.append(f"{arg}: did you mean {close[0]}?")
            message += ("; " + "; ".join(hints) if hints else "") + \
                "\nvalid flags: " + ", ".join(flags)
        super().error(message)


class _Value(argparse.Action):
    """Store one field's value, converted and checked (errors name the flag)."""

    def __init__(self, option_strings: Sequence[str], dest: str, spec: _Spec,
                 **kwargs: Any) -> None:
        self.spec = spec
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            value = _from_text(values, self.spec)
        except _Invalid as err:
            raise argparse.ArgumentError(self, str(err)) from None
        setattr(namespace, self.dest, value)


class _Switch(argparse.BooleanOptionalAction):
    """`--flag` / `--no-flag`, with the help text as written (no default appended)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        help_text = kwargs.get("help")
        super().__init__(option_strings, dest, **kwargs)
        self.help = help_text


def _add_fields(cls: type, parser: argparse.ArgumentParser, group: Any, prefix: str,
                base: Any, suppress: bool) -> None:
    docs = _help_texts(cls)
    nested = []
    for key, field, spec in _fields(cls):
        dotted = prefix + key
        flag = _flag(dotted)
        if not prefix and key in _RESERVED:
            raise ConfigError(f"field {cls.__name__}.{key} clashes with the {flag} option "
                              "every ft.cli parser has; rename the field")
        default = getattr(base, field.name) if base is not None else _default(field)
        if spec.kind == "nested":
            nested.append((key, field, spec, default))
            continue
        text = str(field.metadata.get("help") or docs.get(field.name) or "")
        if default is _MISSING:
            shown = "required"
        elif default is _COMPUTED:
            shown = "default: computed"
        else:
            shown = f"default: {_shown(default)}"
        text = f"{text} ({shown})" if text else f"({shown})"
        unknown = default is _MISSING or default is _COMPUTED
        value = argparse.SUPPRESS if suppress or unknown else default
        common = {"dest": dotted, "default": value, "help": text.replace("%", "%%")}
        if spec.kind == "bool" and not spec.optional:
            group.add_argument(flag, action=_Switch, **common)
        else:
            nargs: Any = None
            if spec.kind == "seq":
                nargs = "*" if spec.variadic else (
                    "+" if spec.optional else len(spec.items))
            group.add_argument(flag, action=_Value, spec=spec, nargs=nargs,
                               metavar=spec.metavar(), **common)
    for key, field, spec, default in nested:
        text = str(field.metadata.get("help") or docs.get(field.name)
                   or inspect.cleandoc(spec.py.__doc__ or "").split("\n\n")[0]
                   .replace("\n", " "))
        sub = parser.add_argument_group(f"{prefix}{key} ({spec.py.__name__})", text or None)
        inner_base = None if default is _MISSING or default is _COMPUTED else default
        _add_fields(spec.py, parser, sub, f"{prefix}{key}.", inner_base, suppress)


def _build(cls: type, description: str | None, suppress: bool) -> _Parser:
    _check_class(cls, "ft.cli.parser")
    p = _Parser(description=description, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", metavar="PATH", dest="config",
                   default=argparse.SUPPRESS if suppress else None,
                   help="read values from a JSON file (YAML if it ends in .yaml or .yml); "
                        "flags override it, a later file overrides an earlier one")
    p.add_argument("--print-config", action="store_true", dest="print_config",
                   default=argparse.SUPPRESS if suppress else False,
                   help="print the resolved configuration as JSON and exit")
    _add_fields(cls, p, p, "", None, suppress)
    return p


def parser(cls: type, *, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the attrs class `cls`.

    Field `batch_size` becomes `--batch-size`; a nested config's fields take dotted names
    (`--optim.lr`); a `bool` field gets `--flag` / `--no-flag`. The help shows each field's
    `metadata={"help": ...}` (or the string written right after the field) and its default.
    Every parser also has `--config PATH`, `--print-config` and argparse's `-h`/`--help`, so a
    top-level field named `config`, `print_config` or `help` would take an option that is
    already there: building the parser raises `ft.ConfigError` naming the field (rename it;
    a nested config's field may have these names, `--model.help`, and `ft.cli.from_dict`
    reads any name). Silently renaming the flag would surprise more. `ft.cli.parse` uses it;
    call this one for the help text or to embed the flags elsewhere (its `parse_args`
    gives the converted values under the dotted names, defaults included, without
    reading `--config`).

    Examples:
        >>> import attrs, ftrain as ft
        >>> @attrs.frozen
        ... class Config:
        ...     epochs: int = attrs.field(default=10, metadata={"help": "passes over the data"})
        ...     batch_size: int = 32
        >>> text = ft.cli.parser(Config).format_help()
        >>> "--epochs INT" in text and "passes over the data (default: 10)" in text
        True
        >>> vars(ft.cli.parser(Config).parse_args(["--epochs", "3"]))["epochs"]
        3
    """
    return _build(cls, description, suppress=False)


def parse(cls: type[T], argv: Sequence[str] | None = None, *,
          description: str | None = None) -> T:
    """Build a `cls` from its defaults, `--config` files, then flags (`sys.argv` if None).

    A config file is a mapping of field names (nested mappings or dotted keys for nested
    configs); unknown keys and values of the wrong type raise `ft.ConfigError`, and so does
    a file out of bounds: over 1 MiB, not UTF-8, nested over 32 levels, over 10000 values
    (YAML aliases expanded) or an int of over 100 digits. Bad flags
    exit with status 2 (argparse's way), naming the valid ones. The class's attrs
    validators run on the result. `--print-config` prints the result as JSON and exits 0.

    Examples:
        >>> import attrs, ftrain as ft
        >>> from typing import Literal
        >>> @attrs.frozen
        ... class Config:
        ...     lr: float = 1e-3
        ...     precision: Literal["32", "bf16"] = "32"
        ...     progress: bool = True
        >>> ft.cli.parse(Config, ["--lr", "0.1", "--precision", "bf16", "--no-progress"])
        Config(lr=0.1, precision='bf16', progress=False)
    """
    p = _build(cls, description, suppress=True)
    args = vars(p.parse_args(sys.argv[1:] if argv is None else list(argv)))
    tree: dict[str, Any] = {}
    for path in args.pop("config", []):
        tree = _merge(tree, _typed(cls, _read_file(path), path))
    print_config = args.pop("print_config", False)
    for dotted, value in args.items():
        _set_dotted(tree, dotted, value)
    try:
        config = _instantiate(cls, tree)
    except _Missing as err:
        flags = [_flag(k) for k in err.keys]
        p.error(f"no value for {', '.join(flags)} (no default): give "
                f"{'it' if len(flags) == 1 else 'them'} as a flag or in a --config file")
    if print_config:
        print(json.dumps(to_dict(config), indent=2))
        raise SystemExit(0)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The config as JSON-compatible data (nested dicts; enums by value, paths as strings,
    tuples as lists): what `ft.fit(..., hparams=)` records in every checkpoint.

    Examples:
        >>> import attrs, pathlib, ftrain as ft
        >>> @attrs.frozen
        ... class Config:
        ...     root_dir: pathlib.Path = pathlib.Path("runs")
        ...     sizes: tuple[int, ...] = (64, 32)
        >>> ft.cli.to_dict(Config())
        {'root_dir': 'runs', 'sizes': [64, 32]}
    """
    if isinstance(config, type) or not attrs.has(type(config)):
        raise ConfigError(f"ft.cli.to_dict needs an instance of an attrs class, got "
                          f"{config.__name__ if isinstance(config, type) else repr(config)}")
    return typing.cast(dict[str, Any], _plain(config, ""))


def from_dict(cls: type[T], data: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> T:
    """Rebuild a `cls` from `to_dict`'s output (or a part of it: missing keys keep their
    defaults), strictly: unknown keys and wrong types raise `ft.ConfigError`. Keys in
    `ignore` are skipped (e.g. extra hyperparameters stored next to the config).

    With `ft.load_hparams` this is Lightning's `load_from_checkpoint(path, **overrides)`:
    `ft.cli.from_dict(Config, {**ft.load_hparams(path), "lr": 0.1})`.

    Examples:
        >>> import attrs, ftrain as ft
        >>> @attrs.frozen
        ... class Config:
        ...     lr: float = 1e-3
        ...     sizes: tuple[int, ...] = (64, 32)
        >>> ft.cli.from_dict(Config, {"lr": 0.1, "sizes": [8], "model": "mlp"}, ignore=["model"])
        Config(lr=0.1, sizes=(8,))
    """
    _check_class(cls, "ft.cli.from_dict")
    if not isinstance(data, Mapping):
        raise ConfigError(f"ft.cli.from_dict needs a mapping of {cls.__name__}'s fields, got "
                          f"{type(data).__name__}")
    skip = set(ignore)
    kept = {k: v for k, v in data.items() if k not in skip}
    try:
        _check_bounds(kept)  # the bounds of a config file: the data may come from one
    except _Refused as err:
        raise ConfigError(f"ft.cli.from_dict: {err}") from None
    return _instantiate(cls, _typed(cls, kept, "ft.cli.from_dict"))
