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

The modules: `args` (the argparse parser: `parser`), `main` (the entry point: `parse`),
`records` (dicts and back: `to_dict`, `from_dict`), `files` (the bounded config-file
reader), `bounds` (the bounds and bounded quoting), `fields` (an attrs class read as
fields) and `spec` (field types and their values).
"""

from ftrain.cli.args import parser
from ftrain.cli.main import parse
from ftrain.cli.records import from_dict, to_dict

__all__ = ["from_dict", "parse", "parser", "to_dict"]
