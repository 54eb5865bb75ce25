"""The entry point: a config from its defaults, then `--config` files, then flags (`parse`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from ftrain.cli.args import build, flag_of
from ftrain.cli.files import read_file
from ftrain.cli.records import Missing, instantiate, merge, to_dict, typed

T = TypeVar("T")


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
    p = build(cls, description, suppress=True)
    args = vars(p.parse_args(sys.argv[1:] if argv is None else list(argv)))
    tree: dict[str, Any] = {}
    for path in args.pop("config", []):
        tree = merge(tree, typed(cls, read_file(path), path), path, "")
    print_config = args.pop("print_config", False)
    for dotted, value in args.items():
        _set_dotted(tree, dotted, value)
    try:
        config = instantiate(cls, tree)
    except Missing as err:
        flags = [flag_of(k) for k in err.keys]
        p.error(f"no value for {', '.join(flags)} (no default): give "
                f"{'it' if len(flags) == 1 else 'them'} as a flag or in a --config file")
    if print_config:
        print(json.dumps(to_dict(config), indent=2))
        raise SystemExit(0)
    return config


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value
