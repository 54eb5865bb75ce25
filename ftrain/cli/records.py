"""Configs as dicts and back: `to_dict`, and the strict way in (`from_dict`, config files).

A mapping (nested, or with dotted keys; possibly partial) is checked key by key against the
class (`typed`) and built over the defaults (`instantiate`), the class's attrs validators
included; every error is an `ft.ConfigError` naming the key.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import attrs

from ftrain.cli.bounds import Refused, check_bounds, quote
from ftrain.cli.fields import COMPUTED, MISSING, check_class, default_of, fields_of
from ftrain.cli.spec import Invalid, from_value, plain
from ftrain.errors import ConfigError

T = TypeVar("T")


def expand(data: Mapping[Any, Any], source: str, prefix: str) -> dict[str, Any]:
    """Dotted keys ("optim.lr") as nested dicts, dashes in keys as underscores; where two
    keys set one value (`{**hparams, "optim.lr": 0.1}`), the later one wins."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: keys must be strings, got "
                              f"{quote(key, style='repr')} "
                              f"{'in ' + prefix.rstrip('.') if prefix else 'at the top level'}")
        head, dot, rest = key.partition(".")
        head = head.replace("-", "_")
        if dot:
            value = {rest: value}
        if isinstance(out.get(head), Mapping) and isinstance(value, Mapping):
            out[head] = merge(out[head], value, source, f"{prefix}{head}.")
        else:
            out[head] = value
    return out


def merge(a: Mapping[str, Any], b: Mapping[str, Any], source: str, prefix: str
          ) -> dict[str, Any]:
    """`b` over `a`, both expanded: nested mappings merge, any other value of `b` wins."""
    out = expand(a, source, prefix)
    for key, value in expand(b, source, prefix).items():
        if isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = merge(out[key], value, source, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def typed(cls: type, data: Any, source: str, prefix: str = "") -> dict[str, Any]:
    """Check a (nested, possibly partial) mapping against `cls`; values come back typed."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping "
                          f"of {cls.__name__}'s fields, got {quote(data)} "
                          f"({type(data).__name__})")
    fields = {key: spec for key, _, spec in fields_of(cls)}
    out: dict[str, Any] = {}
    for key, value in expand(data, source, prefix).items():
        where = prefix + key
        if key not in fields:
            valid = [prefix + k for k in fields]
            close = difflib.get_close_matches(where, valid, n=1) if len(where) < 100 else []
            raise ConfigError(f"{source}: unknown key {quote(where, style='repr')} for "
                              f"{cls.__name__}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; valid keys: {', '.join(valid)}")
        spec = fields[key]
        if spec.kind == "nested" and isinstance(value, Mapping):
            out[key] = typed(spec.py, value, source, where + ".")
            continue
        try:
            out[key] = from_value(value, spec, where)
        except Invalid as err:
            raise ConfigError(f"{source}: {err}") from None
    return out


class Missing(ConfigError):
    """Fields without a default were given no value."""

    def __init__(self, cls: type, keys: list[str]) -> None:
        self.keys = keys
        super().__init__(f"{cls.__name__}: no value for {', '.join(map(repr, keys))}, which "
                         f"{'has' if len(keys) == 1 else 'have'} no default")


def instantiate(cls: type[T], tree: Mapping[str, Any], base: Any = None, prefix: str = ""
                ) -> T:
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    for key, field, spec in fields_of(cls):
        given = key in tree
        if spec.kind == "nested" and (not given or isinstance(tree[key], dict)):
            # a partial mapping (or nothing) over the default instance's values
            if base is not None:
                inner_base = getattr(base, field.name)
            else:
                default = default_of(field)
                if not given and default is COMPUTED:
                    continue  # attrs computes it
                inner_base = None if default is MISSING else default
            if not given and inner_base is not None:
                kwargs[key] = inner_base
                continue
            try:
                kwargs[key] = instantiate(spec.py, tree.get(key, {}), inner_base,
                                          f"{prefix}{key}.")
            except Missing as err:
                missing += err.keys
        elif given:
            kwargs[key] = tree[key]
        elif base is not None:
            kwargs[key] = getattr(base, field.name)
        elif field.default is attrs.NOTHING:
            missing.append(prefix + key)
    if missing:
        raise Missing(cls, missing)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # attrs validators
        raise ConfigError(f"{cls.__name__}{' (' + prefix.rstrip('.') + ')' if prefix else ''}"
                          f" rejected the configuration: {quote(str(err), 500, style='text')}"
                          ) from err


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
    return typing.cast(dict[str, Any], plain(config, ""))


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
    check_class(cls, "ft.cli.from_dict")
    if not isinstance(data, Mapping):
        raise ConfigError(f"ft.cli.from_dict needs a mapping of {cls.__name__}'s fields, got "
                          f"{type(data).__name__}")
    skip = set(ignore)
    kept = {k: v for k, v in data.items() if k not in skip}
    try:
        check_bounds(kept)  # the bounds of a config file: the data may come from one
    except Refused as err:
        raise ConfigError(f"ft.cli.from_dict: {err}") from None
    return instantiate(cls, typed(cls, kept, "ft.cli.from_dict"))
