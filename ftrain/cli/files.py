"""Reading a config file, which may come from anyone, through one bounded path.

JSON, or YAML if the name ends in .yaml or .yml: at most `MAX_BYTES` of UTF-8 text, parsed by
a parser that refuses what is too deep or too large as it goes, then checked as a whole by
`check_bounds`. Anything out of bounds (a binary or Latin-1 file, a YAML "billion laughs")
raises `ft.ConfigError` naming the file, after bounded work.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ftrain.cli.bounds import (
    MAX_BYTES,
    MAX_DEPTH,
    MAX_INT_DIGITS,
    MAX_VALUES,
    Refused,
    check_bounds,
    quote,
)
from ftrain.errors import ConfigError


def read_file(path: str) -> Any:
    """The data of a config file: JSON, or YAML if the name ends in .yaml or .yml. Every
    format takes this one path: the bytes (at most `MAX_BYTES`), decoded as UTF-8, parsed
    by a parser that refuses what is too deep or too large as it goes (so it cannot recurse
    or expand without bound), then checked as a whole by `check_bounds`."""
    source = f"--config {path}"
    text = _read_text(path, source)
    try:
        if path.lower().endswith((".yaml", ".yml")):
            data = _load_yaml(text, source)
        else:
            data = _load_json(text, source)
        check_bounds(data)
    except Refused as err:
        raise ConfigError(f"{source}: {err}") from None
    except RecursionError:  # a parser's own guard (the bounds stop nesting long before)
        raise ConfigError(f"{source}: expected at most {MAX_DEPTH} levels of nesting, "
                          "found more") from None
    return data


def _read_text(path: str, source: str) -> str:
    """The file as text: at most `MAX_BYTES` bytes of UTF-8 (a byte-order mark is skipped)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
            if len(raw) > MAX_BYTES:
                size = os.fstat(f.fileno()).st_size
                found = (f"one of {size / 2**20:.1f} MiB" if size > MAX_BYTES
                         else "a larger stream")
                raise ConfigError(f"{source}: expected a config file of at most "
                                  f"{MAX_BYTES // 2**20} MiB, found {found}")
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
        raise ConfigError(f"{source}: not valid JSON ({quote(str(err), style='text')}); "
                          "YAML files must end in .yaml or .yml") from None


def _parse_int(text: str) -> int:
    """An int of JSON, refused before Python parses it when it has too many digits."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise Refused(f"expected an int of at most {MAX_INT_DIGITS} digits, found one of "
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
        raise ConfigError(f"{source}: not valid YAML: {quote(str(err), 500, style='text')}"
                          ) from None
    return {} if data is None else data


def _yaml_loader(yaml: Any) -> Any:
    """PyYAML's SafeLoader, also reading YAML 1.2 floats such as 1e-3 (1.1 reads a str), and
    bounded while it composes, before anything is built: nesting (`MAX_DEPTH`), values
    counted as the tree they stand for (`MAX_VALUES`: an alias counts as the whole value
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
            if self.values > MAX_VALUES:
                raise Refused(f"expected at most {MAX_VALUES} values, found more by line "
                              f"{event.start_mark.line + 1} (YAML aliases count as the "
                              "value they name, each time they are used)")

        def fetch_flow_collection_start(self, token_class: Any) -> None:
            # the scanner looks ahead (a flow collection may be a key) at a cost that grows
            # with the open `[` and `{`: refuse them at the bound, before the composer would
            if self.flow_level > MAX_DEPTH:
                raise Refused(f"expected at most {MAX_DEPTH} levels of nesting, found more "
                              f"(line {self.get_mark().line + 1})")
            super().fetch_flow_collection_start(token_class)

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                if event.anchor in self.anchors and event.anchor not in self.sizes:
                    raise Refused(f"expected a tree of values, found the alias "
                                  f"*{quote(event.anchor, 50, style='text')} inside the "
                                  f"value it names (line {event.start_mark.line + 1})")
                node = super().compose_node(parent, index)  # an undefined alias: an error
                self.count(self.sizes[event.anchor], event)
                return node
            if self.depth > MAX_DEPTH:
                raise Refused(f"expected at most {MAX_DEPTH} levels of nesting, found more "
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
                value = quote(node.value, 50) if isinstance(node.value, str) else "it"
                raise yaml.constructor.ConstructorError(
                    None, None, f"cannot read {value} as {node.tag}: {err}", node.start_mark
                ) from None

        def construct_bounded_int(self, node: Any) -> int:
            text = str(node.value)
            digits = text.lstrip("+-").replace("_", "")
            if digits.isascii() and digits.isdigit() and not digits.startswith("0"):
                if len(digits) > MAX_INT_DIGITS:
                    raise Refused(f"expected an int of at most {MAX_INT_DIGITS} digits, "
                                  f"found one of {len(digits)} digits ({text[:20]}...) at "
                                  f"line {node.start_mark.line + 1}")
            elif len(text) > MAX_INT_DIGITS:
                raise Refused(f"expected an int of at most {MAX_INT_DIGITS} digits, found "
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
