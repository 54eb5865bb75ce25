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


def test_gan_example_learns_digits_and_checkpoints_both_optimizers(tmp_path, capsys):
    pytest.importorskip("sklearn")
    gan = load("gan")
    results = gan.main(["--root-dir", str(tmp_path), "--epochs", "25"])
    out = capsys.readouterr().out
    before, after, real = results["untrained"], results["trained"], results["real"]
    # the judge classifies real held-out digits well, so its view of the samples means something
    assert real["confidence"] > 0.9 and real["classes"] == 10, out
    # trained samples look like digits to it; an untrained generator's do not
    assert after["confidence"] > before["confidence"] + 0.3, out
    assert after["confident"] > before["confident"] + 0.2, out
    assert after["classes"] >= 4, out  # not collapsed onto a digit or two
    # and their pixels are far closer to real ones
    assert after["nearest_real"] < before["nearest_real"] - 1.0, out
    assert after["mean_image_error"] < 0.6 * before["mean_image_error"], out
    assert abs(after["pixel_mean"] - real["pixel_mean"]) < 0.1, out
    assert abs(before["pixel_mean"] - real["pixel_mean"]) > 0.3, out
    assert "confidence" in out and "nearest_real" in out

    # the last checkpoint holds both models and both optimizers' states
    import torch

    import ftrain as ft
    steps = 25 * (1797 // 32)
    assert results["step"] == steps
    assert os.path.dirname(results["checkpoint"]) == str(tmp_path / "checkpoints-gan")
    template = gan.new_state()
    state = ft.load(results["checkpoint"], like=template)
    assert state.step == steps and sorted(state.params) == sorted(state.opt_state) == ["D", "G"]
    for name in ("G", "D"):
        opt = state.opt_state[name]
        assert int(opt["count"]) == steps  # one update of each model per step
        assert all(v.abs().sum() > 0 for v in opt["adam"]["exp_avg_sq"].values())
        assert not all(torch.equal(state.params[name][k], template.params[name][k])
                       for k in template.params[name])
    # logged to TensorBoard under the root dir
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "ftrain_logs" / "version_0"))
    acc.Reload()
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(acc.Tags()["scalars"])


def test_maml_example_adapts_in_one_step(capsys):
    """200 meta-iterations (the default is 500): one inner step from the meta-learned
    initialization fits a new sinusoid far better than from a random one."""
    results = load("maml").main(["--iterations", "200"])
    maml, rand = results["maml"], results["random init"]
    assert maml["after_1"] < 0.7 * rand["after_1"], results
    assert maml["after_5"] < 1.6 < rand["after_5"], results
    assert "after 1 step" in capsys.readouterr().out
