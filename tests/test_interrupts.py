"""Any exception out of a step, Ctrl-C included, leaves `err.state` exactly resumable:
continuing from it gives bitwise the run that was never interrupted."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from helpers import Net, classify, make_dataset, tensors_equal
from torch.utils.data import DataLoader

import ftrain as ft

OFF = {"logger": False, "checkpoint": False, "progress": False}


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    schedule = ft.optim.schedules.warmup_cosine(1e-2, warmup_steps=3, total_steps=24)
    return ft.TrainState.create(Net(), ft.optim.adamw(schedule), seed=4)


def data() -> DataLoader:  # shuffled, 12 batches an epoch; Net has BatchNorm and dropout
    return DataLoader(make_dataset(96), batch_size=8, shuffle=True)


def recording(fail_at=None, how=None):
    """A step that records its losses and, once, fails at step `fail_at` (after the
    forward: BatchNorm statistics have already moved)."""
    losses: dict[int, float] = {}
    fired = []

    def loss_fn(model, batch):
        loss, metrics = classify(model, batch)
        if fail_at is not None and not fired and stepno[0] == fail_at:
            fired.append(True)
            how()
        return loss, metrics

    stepno = [0]
    core = ft.train_step(loss_fn)

    def step(state, batch):
        stepno[0] = state.step
        state, metrics = core(state, batch)
        losses[state.step] = float(metrics["loss"])
        return state, metrics

    step.inner = core  # type: ignore[attr-defined]
    return step, losses


def reference():
    step, losses = recording()
    final = ft.fit(step, fresh(), data(), epochs=2, **OFF)
    return final, losses


def raise_(exc):
    def how():
        raise exc
    return how


@pytest.mark.parametrize("exc, caught", [(KeyboardInterrupt(), KeyboardInterrupt),
                                         (RuntimeError("flaky"), ft.StepError)])
def test_continuing_from_err_state_after_a_failed_step_is_bitwise_exact(exc, caught):
    expected, expected_losses = reference()
    step, losses = recording(fail_at=5, how=raise_(exc))
    with pytest.raises(caught) as info:
        ft.fit(step, fresh(), data(), epochs=2, **OFF)
    state = info.value.state
    assert state.step == 5 and state.slots["loop"] == {"epoch": 0, "batch": 5, "world": 1,
                                                  "batch_size": 8, "samples": 96}
    final = ft.fit(step, state, data(), epochs=2, **OFF)
    assert losses == expected_losses  # all 24 steps, each once, the same values
    assert tensors_equal(final.params, expected.params)
    assert tensors_equal(final.buffers, expected.buffers)  # BatchNorm statistics too


def test_a_real_ctrl_c_stops_at_the_step_boundary_and_continues_exactly(tmp_path):
    _, expected_losses = reference()
    step, losses = recording(fail_at=5, how=lambda: os.kill(os.getpid(), signal.SIGINT))
    logged = ft.with_logging(step, [ft.loggers.CSV(str(tmp_path))], every_n_steps=1)
    saving = ft.with_checkpointing(logged, tmp_path / "ckpt", every_n_steps=4)
    with pytest.raises(KeyboardInterrupt, match="after step 6") as info:
        ft.fit(saving, fresh(), data(), epochs=2, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    state = info.value.state
    assert state.step == 6 and state.slots["loop"] == {"epoch": 0, "batch": 6, "world": 1,
                                                  "batch_size": 8, "samples": 96}
    csv = (tmp_path / "ftrain_logs" / "version_0" / "metrics.csv").read_text()
    assert csv.endswith("\n") and len(csv.splitlines()) == 7  # header + 6 steps, flushed
    ft.fit(saving, state, data(), epochs=2, progress=False)  # the folder's lock was freed
    assert losses == expected_losses


def test_iterate_continues_exactly_after_an_interrupt():
    expected, expected_losses = reference()
    step, losses = recording(fail_at=13, how=raise_(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt) as info:
        for _state, _metrics in ft.iterate(step, fresh(), data(), epochs=2):
            pass
    state = info.value.state
    assert state.step == 13 and state.slots["loop"] == {"epoch": 1, "batch": 1, "world": 1,
                                                  "batch_size": 8, "samples": 96}
    for state, _metrics in ft.iterate(step, state, data(), epochs=2):
        pass
    assert losses == expected_losses
    assert tensors_equal(state.params, expected.params)


def test_an_outer_layer_failing_after_the_update_keeps_the_trained_batch():
    expected, expected_losses = reference()
    step, losses = recording()
    calls = []

    def outer(state, batch):
        state, metrics = step(state, batch)
        if state.step == 7 and not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return state, metrics

    outer.inner = step  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt) as info:
        ft.fit(outer, fresh(), data(), epochs=2, **OFF)
    state = info.value.state
    assert state.step == 7 and state.slots["loop"] == {"epoch": 0, "batch": 7, "world": 1,
                                                  "batch_size": 8, "samples": 96}
    final = ft.fit(outer, state, data(), epochs=2, **OFF)
    assert losses == expected_losses
    assert tensors_equal(final.params, expected.params)


def test_a_failure_inside_the_update_attaches_no_state(caplog):
    def schedule(count):
        if int(count) == 3:
            raise RuntimeError("schedule failed")
        return 1e-2

    torch.manual_seed(0)
    state = ft.TrainState.create(Net(), ft.optim.sgd(schedule), seed=4)
    with caplog.at_level("ERROR", logger="ftrain"), pytest.raises(ft.StepError) as info:
        ft.fit(ft.train_step(classify), state, data(), epochs=1, **OFF)
    assert getattr(info.value, "state", None) is None
    assert "inside its optimizer update" in caplog.text
