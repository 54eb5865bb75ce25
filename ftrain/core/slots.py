"""Checks for a layer's slot read back from a state (maybe from a file: untrusted).

A layer describes its slot's fields with the predicates here and calls `check` before it
first uses a slot it did not create; a field of the wrong kind is a CheckpointError that
names the slot, the field, what was expected and what was found.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from ftrain.errors import CheckpointError

Field = tuple[Callable[[Any], bool], str]


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr; tensors as dtype and shape (never their values)."""

    def repr1(self, x: Any, level: int) -> str:
        if isinstance(x, torch.Tensor):
            return f"tensor({str(x.dtype).removeprefix('torch.')}, {list(x.shape)})"
        return super().repr1(x, level)


_REPR = _ShortRepr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 80


def short(value: Any, limit: int = 200) -> str:
    """A repr of a value read from a file, for an error message: bounded work and length.

    Examples:
        >>> short("x" * 1000, limit=20)
        "'xxxxxxxxxxxxxxxx..."
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. an int too long to print
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def positive(value: Any) -> bool:
    return count(value) and value >= 1


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    """A finite int or float (a huge int from a file does not overflow the check)."""
    if not number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 4096


def scalar_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() <= 1


def dict_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, Mapping) and all(
        isinstance(k, str) and test(v) for k, v in value.items())


def list_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(test(v) for v in value)


def check(slot: Any, name: str, fields: Mapping[str, Field], may_lack: Collection[str] = ()
          ) -> None:
    """`slot` has every field of `fields` (but those in `may_lack`), each well-formed.

    Examples:
        >>> check({"checks": -1}, "val", {"checks": (count, "an int >= 0")})
        Traceback (most recent call last):
        ...
        ftrain.errors.CheckpointError: the state's 'val' slot: checks must be an int >= 0, found -1
    """
    if not isinstance(slot, Mapping):
        raise CheckpointError(f"the state's {name!r} slot must be a dict, found "
                              f"{type(slot).__name__}")
    missing = [k for k in fields if k not in slot and k not in may_lack]
    if missing:
        raise CheckpointError(f"the state's {name!r} slot lacks {missing} (it has "
                              f"{sorted(map(str, slot))[:10]}): not this layer's slot")
    for key, (test, expected) in fields.items():
        if key in slot and not test(slot[key]):
            raise CheckpointError(f"the state's {name!r} slot: {key} must be {expected}, "
                                  f"found {short(slot[key], 100)}")
