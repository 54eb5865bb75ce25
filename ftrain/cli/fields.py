"""An attrs class read as a config: its fields with their specs, defaults and help texts."""

from __future__ import annotations

import ast
import contextlib
import inspect
import itertools
import pathlib
import sys
import textwrap
import types
import typing
from typing import Any

import attrs

from ftrain.cli.spec import SUPPORTED, Spec, field_key, spec_of
from ftrain.errors import ConfigError


def check_class(cls: Any, caller: str) -> None:
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


def fields_of(cls: type) -> list[tuple[str, attrs.Attribute, Spec]]:
    """(key, field, spec) of each field `__init__` takes; key is the init name."""
    hints, unresolved = _hints(cls)
    out = []
    for field in attrs.fields(cls):
        if not field.init:
            continue
        key = field_key(field)
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
                                  f"({SUPPORTED})")
        out.append((key, field, spec_of(tp, where)))
    return out


MISSING = object()  # no default
COMPUTED = object()  # a default computed from the other fields (Factory(takes_self=True))


def default_of(field: attrs.Attribute) -> Any:
    default: Any = field.default
    if default is attrs.NOTHING:
        return MISSING
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return COMPUTED if default.takes_self else default.factory()
    return default


def help_texts(cls: type) -> dict[str, str]:
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
