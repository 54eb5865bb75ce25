"""The examples run end to end and reach their stated quality."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_classifies_well(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    results = load("digits").main([])
    out = capsys.readouterr().out
    assert results["test_accuracy"] > 0.9, out
    assert results["ae_mse"] < 0.06, out
    assert "classifier   test accuracy" in out
    # both runs logged to TensorBoard, validation included
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = sorted((tmp_path / "ftrain_logs").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    acc = EventAccumulator(str(runs[1]))
    acc.Reload()
    assert {"loss", "val_loss", "val_accuracy", "lr/adamw", "loss_epoch"} <= set(
        acc.Tags()["scalars"])
    # top-3 by validation loss, early stopping, the best checkpoint tested
    import ftrain as ft
    index = ft.checkpoints(tmp_path / "checkpoints")
    assert len(index.saved) == 3 and index.best_score == min(s["score"] for s in index.saved)
    assert "stopped at epoch" in out and "early_stop: val_loss did not improve" in out
    assert f"best checkpoint: {os.path.basename(index.best)}" in out


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README has a python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["state"].step == 160
    assert "acc" in capsys.readouterr().out
