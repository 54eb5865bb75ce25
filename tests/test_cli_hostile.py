"""ft.cli with hostile config files: every one raises ft.ConfigError, naming the file, in
bounded time and memory and with a message of a readable length."""

from __future__ import annotations

import json
import pathlib
import tracemalloc

import attrs
import pytest

import ftrain as ft

MAX_MESSAGE = 1000  # characters: an error message a person can read


@attrs.frozen
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@attrs.frozen
class Config:
    epochs: int = 10
    lr: float = 1e-3
    name: str = "run"
    tags: list[str] = attrs.Factory(list)
    optim: Optim = Optim()


def refused(path: pathlib.Path, match: str, cls: type = Config) -> str:
    """Parse `--config path`, expecting a ConfigError that names the file and matches
    `match`; return its message, checked to be of a readable length."""
    with pytest.raises(ft.ConfigError, match=match) as info:
        ft.cli.parse(cls, ["--config", str(path)])
    message = str(info.value)
    assert str(path) in message
    assert len(message) <= MAX_MESSAGE, message[:2000]
    return message


def billion_laughs() -> str:
    """The classic: 9 levels of 9 aliases each, 9**9 (387 million) strings when expanded."""
    lines = ['epochs: [&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"],']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"  &{name} [" + ", ".join([f"*{prev}"] * 9) + "],")
    lines.append("  *i]")
    return "\n".join(lines) + "\n"


# -- YAML aliases --------------------------------------------------------------------------

def test_billion_laughs_is_refused_quickly_in_little_memory(tmp_path):
    path = tmp_path / "lol.yaml"
    path.write_text(billion_laughs())
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        message = refused(path, r"lol.yaml: expected at most 10000 values.*aliases")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert "found more" in message


def test_recursive_yaml_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("optim: &a {lr: 0.1, inner: *a}\n")
    refused(path, r"loop.yaml: expected a tree of values, found the alias \*a inside the "
                  r"value it names \(line 1\)")


def test_small_yaml_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: &x 0.5, betas: [*x, *x]}\ntags: &t [a, b]\n")
    config = ft.cli.parse(Config, ["--config", str(path)])
    assert config.optim == Optim(lr=0.5, betas=(0.5, 0.5)) and config.tags == ["a", "b"]
    path.write_text("optim:\n  <<: &defaults {lr: 0.2}\n  betas: [0.1, 0.2]\n")
    assert ft.cli.parse(Config, ["--config", str(path)]).optim == Optim(0.2, (0.1, 0.2))


@pytest.mark.parametrize(("text", "found"), [
    ("epochs: 2020-13-45\n", r'"2020-13-45" as tag:yaml.org,2002:timestamp: month must be'),
    ('epochs: !!int ""\n', r'"" as tag:yaml.org,2002:int: string index out of range'),
    ("epochs: !!float abc\n", r'"abc" as tag:yaml.org,2002:float: could not convert')],
    ids=["timestamp", "empty-int", "float"])
def test_unreadable_yaml_scalars_are_config_errors(tmp_path, text, found):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    message = refused(path, r"run.yaml: not valid YAML: cannot read " + found)
    assert "line 1, column 9" in message


# -- encodings -----------------------------------------------------------------------------

def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    refused(path, r"run.json: expected UTF-8 text, found the byte 0x89 at line 1")
    path.write_bytes(b'{"epochs": 3}\x00\x00\x00')  # valid UTF-8, but binary
    refused(path, r"run.json: expected UTF-8 text, found binary data \(a NUL byte at "
                  r"line 1\)")


def test_latin1_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("epochs: 3\nname: café\n".encode("latin-1"))
    message = refused(path, r"run.yaml: expected UTF-8 text, found the byte 0xe9 at line 2")
    assert "Latin-1" in message and "save it as UTF-8" in message


def test_utf16_file_is_refused_by_name(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes('{"epochs": 3}'.encode("utf-16"))
    refused(path, r"run.json: expected UTF-8 text, found UTF-16 \(save it as UTF-8\)")


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"name": "caf\xc3\xa9"}')
    assert ft.cli.parse(Config, ["--config", str(path)]).name == "café"


# -- nesting and size ----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("depth", [33, 10_000])
def test_deep_nesting_is_refused(tmp_path, suffix, depth):
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"tags": ' + "[" * depth + "]" * depth + "}")
    refused(path, rf"deep{suffix}: expected at most 32 levels of nesting, found more")


def test_deep_block_yaml_and_dotted_keys_are_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("".join("  " * i + "optim:\n" for i in range(500)) + "  " * 500 + "lr: 1\n")
    refused(path, r"deep.yaml: expected at most 32 levels of nesting, found more")
    path = tmp_path / "dotted.json"
    path.write_text(json.dumps({"optim" + ".x" * 5000: 1, "optim" + ".x" * 5001: 2}))
    refused(path, r"dotted.json: expected at most 32 levels of nesting, found more "
                  r"\(a dotted key counts a level per dot\)")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_nesting_up_to_the_bound_is_read(tmp_path, suffix):
    path = tmp_path / f"ok{suffix}"
    path.write_text(json.dumps({"optim": {"lr": 0.5}, "tags": []}))
    assert ft.cli.parse(Config, ["--config", str(path)]).optim.lr == 0.5
    path.write_text('{"tags": ' + "[" * 32 + "]" * 32 + "}")  # 32 levels: read, then checked
    refused(path, rf"ok{suffix}: tags\[0\]: expected a string, got \[{{9}}\.\.\.\]{{9}} \(list\)")


def test_too_many_values_are_refused(tmp_path):
    path = tmp_path / "many.json"
    path.write_text(json.dumps({"tags": ["a"] * 20_000}))
    refused(path, r"many.json: expected at most 10000 values, found more")


def test_large_file_is_refused(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"name": "x" * (2 * 2**20)}))
    refused(path, r"big.json: expected a config file of at most 1 MiB, found one of 2\.0 MiB")


# -- numbers and quoted values -------------------------------------------------------------

@pytest.mark.parametrize("text", ['{"epochs": 1%s}', "epochs: 1%s\n", "lr: 1%s\n",
                                  '{"lr": 1%s}'], ids=["json-int", "yaml-int", "yaml-float",
                                                       "json-float"])
@pytest.mark.parametrize("digits", [400, 5000])
def test_huge_integers_are_refused(tmp_path, text, digits):
    path = tmp_path / ("run.json" if text.startswith("{") else "run.yaml")
    path.write_text(text % ("0" * digits))
    message = refused(path, rf"expected an int of at most 100 digits, found one of "
                            rf"{digits + 1} digits")
    assert message.count("0") < 300


@pytest.mark.parametrize(("value", "found"), [
    ("0x" + "f" * 100_000, "one written with 100002 characters"),
    (":".join(["59"] * 20_000), "one written with 59999 characters"),
    ("1" + "_0" * 200, "one of 201 digits"),
    ("0x" + "f" * 98, "one of 119 digits")], ids=["hex", "sexagesimal", "underscores", "hex98"])
def test_huge_hex_sexagesimal_and_underscored_yaml_integers_are_refused(tmp_path, value, found):
    path = tmp_path / "run.yaml"
    path.write_text(f"epochs: {value}\n")
    refused(path, rf"run.yaml: expected an int of at most 100 digits, found {found}")


def test_huge_integer_given_to_from_dict(tmp_path):
    with pytest.raises(ft.ConfigError, match=r"ft.cli.from_dict: expected an int of at most "
                                             r"100 digits, found one of 401 digits"):
        ft.cli.from_dict(Config, {"lr": 10**400})


def test_long_values_are_quoted_short(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": "x" * 100_000}))
    message = refused(path, r'run.json: epochs: expected an int, got "xxx+\.\.\. \(str\)')
    assert message.count("x") < 300
    path.write_text(json.dumps({"k" * 100_000: 1}))
    refused(path, r"run.json: unknown key 'kkk+\.\.\. for Config; valid keys: epochs")
    path.write_text(json.dumps({"optim": {"betas": list(range(5000))}}))
    refused(path, r"optim.betas: expected a list of 2 floats, got 5000 values: "
                  r"\[0, 1, 2, .*\.\.\.$")
    path.write_text(json.dumps(["x" * 100_000]))
    refused(path, r"the config must be a mapping of Config's fields, got \[\"xxx+\.\.\. "
                  r"\(list\)")


# -- argparse's own options ----------------------------------------------------------------

def test_field_named_help_is_refused_when_the_parser_is_built():
    @attrs.frozen
    class WithHelp:
        help: str = "no"

    for build in (lambda: ft.cli.parser(WithHelp), lambda: ft.cli.parse(WithHelp, [])):
        with pytest.raises(ft.ConfigError, match=r"field WithHelp.help clashes with the --help "
                                                 r"option every ft.cli parser has; rename"):
            build()
    assert ft.cli.from_dict(WithHelp, {"help": "yes"}) == WithHelp("yes")  # no flags there

    @attrs.frozen
    class NestedHelp:
        inner: WithHelp = WithHelp()

    assert ft.cli.parse(NestedHelp, ["--inner.help", "yes"]) == NestedHelp(WithHelp("yes"))


# -- a normal config -----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_normal_config_files_still_work(tmp_path, suffix):
    data = {"epochs": 3, "lr": 0.25, "name": "é", "tags": ["a"], "optim.lr": 1e-4,
            "optim": {"betas": [0.8, 0.9]}}
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    config = ft.cli.parse(Config, ["--config", str(path), "--epochs", "4"])
    assert config == Config(epochs=4, lr=0.25, name="é", tags=["a"],
                            optim=Optim(lr=1e-4, betas=(0.8, 0.9)))
