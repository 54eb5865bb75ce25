"""Repro bundles and ft.replay (issue 17, part 1): a failing step written down by the
loop, run again alone in a fresh process with the same outcome, its culprit named."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers import tensors_equal
from torch import nn
from torch.nn import functional as F

import ftrain as ft
from ftrain.repro import capture

SCRIPT = Path(__file__).parent / "scripts" / "nan_run.py"


def _script():
    spec = importlib.util.spec_from_file_location("nan_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _python(*args: str) -> subprocess.CompletedProcess:
    root = str(Path(ft.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_a_nan_from_the_data_is_captured_and_replayed_in_a_fresh_process(tmp_path) -> None:
    """A zero in step 37's batch: log gives -inf, the gradient nan. fit's defaults write
    the bundle; a fresh process replays it: the same error, word for word, the culprit
    named with its line; the bundle's state is bitwise the run's state before step 37."""
    done = _python(str(tmp_path))
    assert done.returncode != 0 and "repro bundle written to" in done.stderr
    bundle = tmp_path / "repro" / "step-37-rank0"
    assert sorted(p.name for p in bundle.iterdir()) == ["batch.pt", "info.json", "state.ckpt"]
    info = json.loads((bundle / "info.json").read_text())
    assert info["error_message"] == "the gradient of '0.weight' was not finite at step 37"
    assert (info["step"], info["batch_index"], info["seed"]) == (37, 37, 7)
    done = _python(str(tmp_path), str(bundle))
    assert done.returncode == 0, done.stderr[-3000:]
    found = torch.load(tmp_path / "replay.pt", weights_only=False)
    assert found["reproduced"] and found["error"] == \
        "NonFiniteLossError: the gradient of '0.weight' was not finite at step 37"
    assert found["culprit"].startswith("torch.log at ") and "nan_run.py:22" in \
        found["culprit"], found["culprit"]
    script = _script()
    data = script.data()
    assert all(torch.equal(a, b) for a, b in zip(found["batch"], data[37], strict=True))
    before = ft.fit(script.step, script.fresh(), data, max_steps=37, logger=False,
                    checkpoint=False, progress=False)
    assert found["step"] == before.step == 37
    assert tensors_equal(found["params"], before.params)  # bitwise


def test_an_exception_is_captured_by_iterate_and_replayed(tmp_path) -> None:
    def loss_fn(m, b):
        if b[0].shape[1] != 3:
            raise ValueError(f"expected 3 features, got {b[0].shape[1]}")
        return F.mse_loss(m(b[0]), b[1])

    torch.manual_seed(0)
    state = ft.TrainState.create(nn.Linear(3, 1), ft.optim.sgd(0.1), seed=2)
    like = state.copy()
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(2)]
    data.append((torch.randn(4, 5), torch.randn(4, 1)))
    step = ft.train_step(loss_fn)
    with pytest.raises(ft.StepError, match="repro bundle") as caught:
        for _ in ft.iterate(step, state, data, epochs=1, capture_failures=tmp_path):
            pass
    folder = caught.value.repro
    assert folder == str(tmp_path / "step-2-rank0")
    found = ft.replay(folder, step, like=like)
    assert found.reproduced and isinstance(found.error, ValueError)
    assert str(found.error) == "expected 3 features, got 5" and found.new_state is None
    assert found.state.step == 2
    assert all(torch.equal(a, b) for a, b in zip(found.batch, data[2], strict=True))
    assert tensors_equal(found.state.params, caught.value.state.params)  # err.state too
    healthy = ft.replay(folder, ft.train_step(lambda m, b: m(b[0][:, :3]).sum()), like=like)
    assert not healthy.reproduced and healthy.error is None and healthy.new_state.step == 3


def test_what_is_not_captured(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    bad = ft.train_step(lambda m, b: m(b[0]).sum() / 0 * 0, check_finite_every_step=True)
    state = ft.TrainState.create(nn.Linear(3, 1), ft.optim.sgd(0.1))
    batch = (torch.ones(2, 3),)
    with pytest.raises(ft.NonFiniteLossError):  # iterate: nothing unless asked
        for _ in ft.iterate(bad, state.copy(), [batch], epochs=1):
            pass
    with pytest.raises(ft.NonFiniteLossError):  # auto, but a run that writes no files
        ft.fit(bad, state.copy(), [batch], epochs=1, logger=False, checkpoint=False,
               progress=False)
    assert not (tmp_path / "repro").exists()
    Batch = namedtuple("Batch", "x")
    with caplog.at_level(logging.WARNING, "ftrain"), pytest.raises(ft.NonFiniteLossError) \
            as caught:
        for _ in ft.iterate(bad, state.copy(), [Batch(torch.ones(2, 3))], epochs=1,
                            capture_failures=tmp_path / "r"):
            pass
    assert "Batch) is not plain data" in caplog.text and not hasattr(caught.value, "repro")
    err = ValueError("x")
    assert capture(str(tmp_path), state, batch, err, epoch=0, index=0, rank=0, world=1,
                   limit=10) is None and "over the 10 of capture_failures" in caplog.text
    with pytest.raises(ft.ConfigError, match="capture_failures must be"):
        ft.fit(bad, state.copy(), [batch], epochs=1, capture_failures=3, progress=False)


def test_bad_bundles_are_refused(tmp_path) -> None:
    state = ft.TrainState.create(nn.Linear(3, 1), ft.optim.sgd(0.1))
    folder = capture(str(tmp_path), state, (torch.ones(2, 3),), ValueError("x"), epoch=0,
                     index=0, rank=0, world=1, limit=None)
    again = capture(str(tmp_path), state, (torch.ones(2, 3),), ValueError("y"), epoch=0,
                    index=0, rank=0, world=1, limit=None)
    assert again == folder + "-1" and Path(folder, "info.json").is_file()  # both kept
    step = ft.train_step(lambda m, b: m(b[0]).sum())
    info_path = Path(folder) / "info.json"
    info = json.loads(info_path.read_text())
    for key, value, message in [("step", "3", "'step' must be a int"),
                                ("format", "other/9", "format 'other/9'"),
                                ("seed", 5, "info.json says step 0, seed 5")]:
        info_path.write_text(json.dumps({**info, key: value}))
        with pytest.raises(ft.CheckpointError, match=message):
            ft.replay(folder, step, like=state)
    info_path.write_text("[1, 2]")
    with pytest.raises(ft.CheckpointError, match="expected a JSON object"):
        ft.replay(folder, step, like=state)
    with pytest.raises(ft.CheckpointError, match="is not a repro bundle"):
        ft.replay(tmp_path / "nothing", step, like=state)


def test_iterate_capture_failures_takes_a_folder_or_nothing(tmp_path) -> None:
    state = ft.TrainState.create(nn.Linear(3, 1), ft.optim.sgd(0.1))
    step = ft.train_step(lambda m, b: F.mse_loss(m(b[0]), b[1]))
    batches = [(torch.randn(4, 3), torch.randn(4, 1))]
    for _ in ft.iterate(step, state, batches, epochs=1,
                        capture_failures=False):
        pass
    with pytest.raises(ft.ConfigError, match="capture_failures must be a folder or None"):
        for _ in ft.iterate(step, state, batches, epochs=2,
                            capture_failures=3):
            pass
