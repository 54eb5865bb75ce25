"""ft.cli: an argparse parser from an attrs config; defaults < config files < flags."""

import enum
import json
import pathlib
import sys
import types
from typing import Literal, Optional

import attrs
import pytest
import torch

import ftrain as ft


class Activation(enum.Enum):
    relu = "relu"
    gelu = "gelu"


@attrs.frozen
class Optim:
    """The optimizer's settings."""

    lr: float = attrs.field(default=1e-3, metadata={"help": "peak learning rate"})
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "cosine"


@attrs.frozen
class Model:
    hidden: int = 64
    """width of the hidden layer"""
    activation: Activation = Activation.relu
    sizes: tuple[int, ...] = (32, 16)


@attrs.frozen
class Config:
    epochs: int = attrs.field(default=10, validator=attrs.validators.ge(1),
                              metadata={"help": "passes over the data"})
    batch_size: int = attrs.field(default=32, metadata={"help": "samples per step"})
    root_dir: pathlib.Path = pathlib.Path("runs")
    precision: Literal["32", "bf16", "16"] = attrs.field(default="32", metadata={
        "help": "training precision"})
    progress: bool = True
    tags: list[str] = attrs.Factory(list)
    limit: Optional[int] = None  # noqa: UP045 (typing.Optional is supported too)
    max_steps: int | None = None
    name: str = "run"
    optim: Optim = Optim(lr=3e-3)
    model: Model = attrs.Factory(Model)


def usage_error(capsys, argv, cls=Config) -> str:
    """Parse `argv`, expecting argparse's exit with status 2; return its message."""
    with pytest.raises(SystemExit) as info:
        ft.cli.parse(cls, argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def write(path: pathlib.Path, data) -> str:
    """Write `data` as JSON to a .json path, or the text `data` to any other."""
    path.write_text(json.dumps(data) if path.suffix == ".json" else data)
    return str(path)


# -- values from flags ---------------------------------------------------------------------

def test_defaults_with_no_arguments():
    config = ft.cli.parse(Config, [])
    assert config == Config()
    assert config.optim == Optim(lr=3e-3)  # a nested default instance is the base


def test_flags_of_every_type():
    config = ft.cli.parse(Config, [
        "--epochs", "3", "--batch-size", "8", "--root-dir", "/tmp/r", "--precision", "bf16",
        "--no-progress", "--tags", "a", "b", "--limit", "5", "--name", "x",
        "--optim.lr", "0.5", "--optim.betas", "0.8", "0.9", "--optim.schedule", "constant",
        "--model.hidden", "128", "--model.activation", "gelu", "--model.sizes", "4", "2", "1"])
    assert config == Config(
        epochs=3, batch_size=8, root_dir=pathlib.Path("/tmp/r"), precision="bf16",
        progress=False, tags=["a", "b"], limit=5, name="x",
        optim=Optim(lr=0.5, betas=(0.8, 0.9), schedule="constant"),
        model=Model(hidden=128, activation=Activation.gelu, sizes=(4, 2, 1)))
    assert isinstance(config.optim.lr, float) and isinstance(config.model.sizes, tuple)


def test_negative_numbers_are_values():
    config = ft.cli.parse(Config, ["--optim.lr", "-1e-3", "--optim.betas", "-.5", "-2",
                                   "--model.sizes", "-1", "--max-steps=-3"])
    assert (config.optim.lr, config.optim.betas) == (-1e-3, (-0.5, -2.0))
    assert config.model.sizes == (-1,) and config.max_steps == -3


def test_booleans_take_flag_and_no_flag():
    assert ft.cli.parse(Config, ["--no-progress"]).progress is False
    assert ft.cli.parse(Config, ["--no-progress", "--progress"]).progress is True


def test_optional_values_take_none():
    assert ft.cli.parse(Config, ["--limit", "none"]).limit is None
    assert ft.cli.parse(Config, ["--max-steps", "7"]).max_steps == 7
    assert ft.cli.parse(Config, ["--max-steps", "7", "--max-steps", "none"]).max_steps is None


def test_sequences():
    assert ft.cli.parse(Config, ["--tags"]).tags == []  # an empty list
    assert ft.cli.parse(Config, ["--model.sizes", "9"]).model.sizes == (9,)


def test_enum_by_value_or_name():
    class Mode(enum.Enum):
        fast = 1
        slow = 2

    @attrs.define
    class WithEnum:
        mode: Mode = Mode.fast

    assert ft.cli.parse(WithEnum, ["--mode", "2"]).mode is Mode.slow
    assert ft.cli.parse(WithEnum, ["--mode", "slow"]).mode is Mode.slow
    assert ft.cli.to_dict(WithEnum(Mode.slow)) == {"mode": 2}
    assert ft.cli.from_dict(WithEnum, {"mode": 2}).mode is Mode.slow


def test_literal_of_ints():
    @attrs.define
    class Devices:
        devices: Literal[1, 2, 4] = 1

    assert ft.cli.parse(Devices, ["--devices", "4"]).devices == 4


def test_help_shows_help_texts_defaults_and_choices(capsys):
    text = ft.cli.parser(Config, description="Train a model.").format_help()
    assert "Train a model." in text
    for expected in ("--epochs INT", "passes over the data (default: 10)",
                     "samples per step (default: 32)", "--root-dir PATH", "(default: runs)",
                     "--precision {32,bf16,16}", "training precision (default: 32)",
                     "--progress, --no-progress", "(default: true)", "--limit INT|none",
                     "(default: none)", "--tags [STR ...]", "--optim.lr FLOAT",
                     "peak learning rate (default: 0.003)", "--optim.betas FLOAT FLOAT",
                     "(default: 0.9 0.999)", "--model.activation {relu,gelu}",
                     "width of the hidden layer (default: 64)",  # a field's docstring
                     "optim (Optim)", "The optimizer's settings.", "--config PATH",
                     "--print-config"):
        assert expected in text, expected
    with pytest.raises(SystemExit) as info:
        ft.cli.parse(Config, ["--help"])
    assert info.value.code == 0
    assert "passes over the data (default: 10)" in capsys.readouterr().out


def test_parser_alone_gives_converted_values_with_defaults():
    args = vars(ft.cli.parser(Config).parse_args(["--optim.lr", "0.1"]))
    assert args["optim.lr"] == 0.1 and args["epochs"] == 10 and args["config"] is None
    assert args["model.activation"] is Activation.relu


# -- config files --------------------------------------------------------------------------

def test_json_config_file(tmp_path):
    path = write(tmp_path / "run.json", {"epochs": 4, "root_dir": "out", "progress": False,
                                         "optim": {"lr": 0.01}, "model.sizes": [8],
                                         "model": {"activation": "gelu"}})
    config = ft.cli.parse(Config, ["--config", path])
    assert config == Config(epochs=4, root_dir=pathlib.Path("out"), progress=False,
                            optim=Optim(lr=0.01),
                            model=Model(activation=Activation.gelu, sizes=(8,)))


def test_yaml_config_file(tmp_path):
    path = write(tmp_path / "run.yaml", "epochs: 5\nprecision: bf16\noptim:\n  lr: 1e-4\n"
                 "  betas: [0.5, 0.6]\nmodel.hidden: 16\ntags: [a]\nlimit: null\n")
    config = ft.cli.parse(Config, ["--config", path])
    assert config == Config(epochs=5, precision="bf16", tags=["a"],
                            optim=Optim(lr=1e-4, betas=(0.5, 0.6)), model=Model(hidden=16))
    assert isinstance(config.optim.lr, float)  # YAML 1.2 floats: 1e-4 is not a string
    empty = write(tmp_path / "empty.yml", "")
    assert ft.cli.parse(Config, ["--config", empty]) == Config()


def test_precedence_defaults_then_files_then_flags(tmp_path):
    first = write(tmp_path / "a.json", {"epochs": 4, "batch_size": 16, "optim.lr": 0.1})
    second = write(tmp_path / "b.json", {"batch_size": 64, "optim": {"schedule": "constant"}})
    config = ft.cli.parse(Config, ["--optim.lr", "0.5", "--config", first, "--config", second])
    assert config.epochs == 4                       # the first file over the default
    assert config.batch_size == 64                  # a later file over an earlier one
    assert config.optim == Optim(lr=0.5, schedule="constant")  # the flag over the file
    assert config.name == "run"                     # untouched: the default


def test_print_config_prints_the_resolved_config_as_json(tmp_path, capsys):
    path = write(tmp_path / "run.json", {"epochs": 4})
    with pytest.raises(SystemExit) as info:
        ft.cli.parse(Config, ["--config", path, "--model.hidden", "8", "--print-config"])
    assert info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == ft.cli.to_dict(Config(epochs=4, model=Model(hidden=8)))
    assert printed["epochs"] == 4 and printed["model"]["hidden"] == 8
    assert printed["root_dir"] == "runs" and printed["model"]["sizes"] == [32, 16]


# -- to_dict / from_dict -------------------------------------------------------------------

def test_to_dict_is_json_compatible_and_from_dict_inverts_it():
    config = Config(root_dir=pathlib.Path("/data"), tags=["x"], limit=3,
                    model=Model(activation=Activation.gelu, sizes=(1, 2)))
    plain = ft.cli.to_dict(config)
    assert plain == {
        "epochs": 10, "batch_size": 32, "root_dir": "/data", "precision": "32",
        "progress": True, "tags": ["x"], "limit": 3, "max_steps": None, "name": "run",
        "optim": {"lr": 3e-3, "betas": [0.9, 0.999], "schedule": "cosine"},
        "model": {"hidden": 64, "activation": "gelu", "sizes": [1, 2]}}
    assert json.loads(json.dumps(plain)) == plain
    assert ft.cli.from_dict(Config, plain) == config
    assert ft.cli.from_dict(Config, json.loads(json.dumps(plain))) == config


def test_from_dict_overrides_partial_dicts_and_ignored_keys():
    plain = ft.cli.to_dict(Config())
    assert ft.cli.from_dict(Config, {**plain, "epochs": 2}).epochs == 2
    assert ft.cli.from_dict(Config, {**plain, "optim.lr": 0.1}).optim.lr == 0.1  # later wins
    assert ft.cli.from_dict(Config, {"model": {"hidden": 3}}) == Config(model=Model(hidden=3))
    assert ft.cli.from_dict(Config, {**plain, "model_kind": "mlp"},
                            ignore=["model_kind"]) == Config()


def test_hparams_saved_by_fit_rebuild_the_config(tmp_path):
    config = ft.cli.parse(Config, ["--epochs", "2", "--optim.lr", "0.05", "--tags", "a",
                                   "--model.activation", "gelu"])
    torch.manual_seed(0)
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(2)]
    step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(config.optim.lr))
    ft.fit(step, state, data, epochs=config.epochs, logger=False, progress=False,
           root_dir=str(tmp_path), hparams=ft.cli.to_dict(config))
    path = ft.checkpoints(tmp_path / "checkpoints").last
    hparams = ft.load_hparams(path)
    assert hparams == ft.cli.to_dict(config)
    assert ft.cli.from_dict(Config, hparams) == config
    rebuilt = ft.cli.from_dict(Config, {**hparams, "epochs": 5})  # load_from_checkpoint(**kw)
    assert rebuilt == attrs.evolve(config, epochs=5)


# -- errors --------------------------------------------------------------------------------

def test_unknown_flag_names_the_valid_ones(capsys):
    err = usage_error(capsys, ["--epohcs", "3"])
    assert "unrecognized arguments: --epohcs 3" in err
    assert "did you mean --epochs?" in err
    assert "valid flags:" in err and "--batch-size" in err and "--optim.lr" in err
    assert "--batch_size" in usage_error(capsys, ["--batch_size", "3"])  # dashes, not _
    assert "--ep" in usage_error(capsys, ["--ep", "3"])  # no abbreviations


def test_wrong_type_on_the_command_line(capsys):
    err = usage_error(capsys, ["--epochs", "abc"])
    assert "argument --epochs: expected an int, got 'abc'" in err
    err = usage_error(capsys, ["--optim.lr", "fast"])
    assert "argument --optim.lr: expected a float, got 'fast'" in err
    err = usage_error(capsys, ["--model.sizes", "1", "x"])
    assert "argument --model.sizes: expected an int, got 'x'" in err
    assert "expected 2 arguments" in usage_error(capsys, ["--optim.betas", "0.1"])


def test_bad_choice_on_the_command_line(capsys):
    err = usage_error(capsys, ["--precision", "64"])
    assert "argument --precision: expected one of '32', 'bf16', '16', got '64'" in err
    err = usage_error(capsys, ["--model.activation", "tanh"])
    assert "argument --model.activation: expected one of 'relu', 'gelu', got 'tanh'" in err


def test_unknown_key_in_a_config_file(tmp_path):
    path = write(tmp_path / "run.json", {"epoch": 3})
    with pytest.raises(ft.ConfigError, match=r"unknown key 'epoch' for Config \(did you mean "
                       r"'epochs'\?\); valid keys: epochs, batch_size, root_dir"):
        ft.cli.parse(Config, ["--config", path])
    path = write(tmp_path / "nested.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ft.ConfigError, match=r"nested.yaml: unknown key 'optim.learning_rate' "
                       r"for Optim; valid keys: optim.lr, optim.betas, optim.schedule"):
        ft.cli.parse(Config, ["--config", path])


def test_wrong_types_in_a_config_file(tmp_path):
    cases = [({"epochs": "x"}, r'epochs: expected an int, got "x" \(str\)'),
             ({"epochs": 2.5}, r"epochs: expected an int, got 2.5 \(float\)"),
             ({"progress": "yes"}, r'progress: expected true or false, got "yes" \(str\)'),
             ({"precision": "64"}, r"precision: expected one of '32', 'bf16', '16', got \"64\""),
             ({"precision": 16}, r"got 16 \(int\) \(a string: quote it\)"),
             ({"optim": 3}, r"optim: expected a mapping of Optim's fields, got 3 \(int\)"),
             ({"optim": {"betas": [1]}}, r"optim.betas: expected a list of 2 floats, got 1 "
                                         r"value: \[1\]"),
             ({"model": {"sizes": [1, "a"]}}, r'model.sizes\[1\]: expected an int, got "a"'),
             ({"limit": "none"}, r'limit: expected an int or none, got "none" \(str\)'),
             ([1, 2], r"the config must be a mapping of Config's fields, got \[1, 2\]")]
    path = tmp_path / "run.json"
    for data, message in cases:
        write(path, data)
        with pytest.raises(ft.ConfigError, match=message):
            ft.cli.parse(Config, ["--config", str(path)])


def test_file_errors(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ft.ConfigError, match=r"--config .*nope.json: no such file"):
        ft.cli.parse(Config, ["--config", missing])
    bad = tmp_path / "bad.json"
    bad.write_text("{epochs: 3}")
    with pytest.raises(ft.ConfigError, match=r"bad.json: not valid JSON .*line 1"):
        ft.cli.parse(Config, ["--config", str(bad)])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [3\n")
    with pytest.raises(ft.ConfigError, match=r"bad.yaml: not valid YAML"):
        ft.cli.parse(Config, ["--config", str(bad_yaml)])
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if pyyaml were not installed
    good = write(tmp_path / "good.yaml", "epochs: 3\n")
    with pytest.raises(ft.ConfigError, match=r"reading YAML needs pyyaml \(pip install pyyaml\)"):
        ft.cli.parse(Config, ["--config", good])


def test_validators_run():
    with pytest.raises(ft.ConfigError, match=r"Config rejected the configuration: 'epochs' "
                       r"must be >= 1: 0"):
        ft.cli.parse(Config, ["--epochs", "0"])
    with pytest.raises(ft.ConfigError, match="'epochs' must be >= 1"):
        ft.cli.from_dict(Config, {"epochs": 0})


def test_fields_without_defaults_are_required(capsys):
    @attrs.define
    class Needs:
        data: pathlib.Path
        epochs: int = 1

    assert ft.cli.parse(Needs, ["--data", "d"]) == Needs(pathlib.Path("d"))
    err = usage_error(capsys, ["--epochs", "2"], Needs)
    assert "no value for --data (no default)" in err
    assert "(required)" in ft.cli.parser(Needs).format_help()
    with pytest.raises(ft.ConfigError, match="Needs: no value for 'data', which has no default"):
        ft.cli.from_dict(Needs, {})


def test_not_an_attrs_class():
    class Plain:
        epochs: int = 1

    for bad in (Plain, dict, Config()):
        with pytest.raises(ft.ConfigError, match=r"ft.cli.parser needs an attrs class"):
            ft.cli.parser(bad)  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match=r"ft.cli.from_dict needs an attrs class"):
        ft.cli.from_dict(Plain, {})
    with pytest.raises(ft.ConfigError, match=r"ft.cli.to_dict needs an instance"):
        ft.cli.to_dict(Config)
    with pytest.raises(ft.ConfigError, match=r"from_dict needs a mapping of Config's fields"):
        ft.cli.from_dict(Config, [("epochs", 1)])  # type: ignore[arg-type]


def test_unsupported_fields_are_named():
    @attrs.define
    class Odd:
        weights: dict[str, float] = attrs.Factory(dict)

    with pytest.raises(ft.ConfigError, match=r"field 'Odd.weights' has type dict\[str, float\]"):
        ft.cli.parser(Odd)

    @attrs.define
    class Clash:
        config: str = "a"

    with pytest.raises(ft.ConfigError, match="clashes with the --config option"):
        ft.cli.parser(Clash)

    @attrs.define
    class Holder:
        device: object = attrs.field(factory=object)

    with pytest.raises(ft.ConfigError, match="Holder.device"):
        ft.cli.parser(Holder)
    with pytest.raises(ft.ConfigError, match="config field 'x' holds a object"):
        ft.cli.to_dict(attrs.make_class("X", {"x": attrs.field(default=object())})())


def test_string_annotations_resolve_where_the_class_lives():
    # a module loaded without sys.modules (as tests load examples) under postponed
    # annotations: the names are found in the caller's namespace
    source = ("from __future__ import annotations\n"
              "import attrs, ftrain as ft\n"
              "from typing import Literal\n"
              "@attrs.frozen\n"
              "class Inner:\n"
              "    mode: Literal['a', 'b'] = 'a'\n"
              "@attrs.frozen\n"
              "class Outer:\n"
              "    n: int | None = 1\n"
              "    inner: Inner = Inner()\n"
              "result = ft.cli.parse(Outer, ['--n', 'none', '--inner.mode', 'b'])\n")
    module = types.ModuleType("not_in_sys_modules")
    exec(compile(source, "<config>", "exec"), vars(module))
    assert module.result == module.Outer(None, module.Inner("b"))
    # used from outside: found through the module object the caller holds
    assert ft.cli.from_dict(module.Outer, {"inner.mode": "b"}) == module.result.__class__(
        1, module.Inner("b"))
