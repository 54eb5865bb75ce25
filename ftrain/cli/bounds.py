"""The bounds on a config that may come from anyone, and quoting its values in bounded work.

Every format of config file, and every mapping given to `ft.cli.from_dict`, is held to the
same bounds: at most `MAX_BYTES` of text, `MAX_DEPTH` levels of nesting (a dotted key counts
a level per dot), `MAX_VALUES` values (a YAML alias counts as the whole value it names, each
time it is used) and ints of at most `MAX_INT_DIGITS` digits. `quote` writes a value into an
error message in work that grows with the length quoted, not with the value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

MAX_BYTES = 2**20        # a config file's size
MAX_DEPTH = 32           # levels of nesting in a config (a dotted key: one per dot)
MAX_VALUES = 10_000      # values in a config, as a tree (a YAML alias: its whole value)
MAX_INT_DIGITS = 100     # digits of an int (Python parses at most 4300 from a string)
QUOTE_CHARS = 200        # characters of a value quoted in an error message


class Refused(Exception):
    """A config exceeds one of the bounds (the message says which, and what was found)."""


def check_bounds(data: Any) -> None:
    """Raise `Refused` where `data`, walked as a tree (a value reached twice counts twice),
    is nested more than `MAX_DEPTH` levels (a dotted key counts a level per dot), holds more
    than `MAX_VALUES` values, or an int of more than `MAX_INT_DIGITS` digits. The same
    check for every format and for `from_dict`; its work is bounded by `MAX_VALUES`,
    whatever `data` is (shared values, a cycle).

    Examples:
        >>> from ftrain.cli.bounds import check_bounds
        >>> check_bounds({"optim": {"lr": 0.1}, "sizes": [64, 32]})
        >>> deep: list = []
        >>> for _ in range(40):
        ...     deep = [deep]
        >>> check_bounds({"sizes": deep})
        Traceback (most recent call last):
        ...
        ftrain.cli.bounds.Refused: expected at most 32 levels of nesting, found more
    """
    values = 1
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (Mapping, list, tuple)):
            values += len(value) * (2 if isinstance(value, Mapping) else 1)  # keys count
            if values > MAX_VALUES:
                raise Refused(f"expected at most {MAX_VALUES} values, found more")
            if depth + 1 > MAX_DEPTH and len(value):
                raise Refused(f"expected at most {MAX_DEPTH} levels of nesting, found more")
            if not isinstance(value, Mapping):
                stack.extend((item, depth + 1) for item in value)
                continue
            for key, item in value.items():
                dots = key.count(".") if isinstance(key, str) else 0
                if depth + 1 + dots > MAX_DEPTH:
                    raise Refused(f"expected at most {MAX_DEPTH} levels of nesting, found "
                                  "more (a dotted key counts a level per dot)")
                stack.append((item, depth + 1 + dots))
        elif (isinstance(value, int) and not isinstance(value, bool)
              and value.bit_length() > 3 * MAX_INT_DIGITS
              and abs(value) >= 10**MAX_INT_DIGITS):
            raise Refused(f"expected an int of at most {MAX_INT_DIGITS} digits, found one "
                          f"of {_digits(value)} digits ({quote(value, 20)})")


def quote(value: Any, limit: int = QUOTE_CHARS, *,
          style: Literal["json", "repr", "text"] = "json") -> str:
    """`value` as an error message quotes it: as JSON (a tuple as a list; the repr of what
    JSON cannot write), cut to `limit` characters and "...", in work that grows with `limit`,
    not with `value` (a huge string, a deep or shared YAML tree, an int of a million digits).
    `style` says how a string is written: JSON (`"a"`), its repr (`'a'`) or as it is.

    Examples:
        >>> from ftrain.cli.bounds import quote
        >>> print(quote({"lr": [0.1, None, True], "name": "run"}))
        {"lr": [0.1, null, true], "name": "run"}
        >>> print(quote("x" * 1000, limit=10), quote("key", style="repr"))
        "xxxxxxxxx... 'key'
        >>> print(quote(10**5000))
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
