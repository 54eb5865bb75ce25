"""An argparse parser built from an attrs class: one flag per field (`parser`)."""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import typing
from collections.abc import Sequence
from typing import Any

from ftrain.cli.fields import COMPUTED, MISSING, check_class, default_of, fields_of, help_texts
from ftrain.cli.spec import Invalid, Spec, from_text, to_text
from ftrain.errors import ConfigError

RESERVED = ("config", "print_config", "help")  # the options every parser has


def flag_of(dotted: str) -> str:
    """The command-line flag of a (dotted) field name: `--model.hidden-size`."""
    return "--" + dotted.replace("_", "-")


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

    def __init__(self, option_strings: Sequence[str], dest: str, spec: Spec,
                 **kwargs: Any) -> None:
        self.spec = spec
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            value = from_text(values, self.spec)
        except Invalid as err:
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
    docs = help_texts(cls)
    nested = []
    for key, field, spec in fields_of(cls):
        dotted = prefix + key
        flag = flag_of(dotted)
        if not prefix and key in RESERVED:
            raise ConfigError(f"field {cls.__name__}.{key} clashes with the {flag} option "
                              "every ft.cli parser has; rename the field")
        default = getattr(base, field.name) if base is not None else default_of(field)
        if spec.kind == "nested":
            nested.append((key, field, spec, default))
            continue
        text = str(field.metadata.get("help") or docs.get(field.name) or "")
        if default is MISSING:
            shown = "required"
        elif default is COMPUTED:
            shown = "default: computed"
        else:
            shown = f"default: {to_text(default)}"
        text = f"{text} ({shown})" if text else f"({shown})"
        unknown = default is MISSING or default is COMPUTED
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
        inner_base = None if default is MISSING or default is COMPUTED else default
        _add_fields(spec.py, parser, sub, f"{prefix}{key}.", inner_base, suppress)


def build(cls: type, description: str | None, suppress: bool) -> _Parser:
    check_class(cls, "ft.cli.parser")
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
    return build(cls, description, suppress=False)
