"""Bad inputs to the loops get ftrain errors that say what was expected and found; a
number that would be silently wrong (a nan mean of nothing) is refused."""

from __future__ import annotations

import pytest
import torch

import ftrain as ft


def state() -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(torch.nn.Linear(3, 1))


@pytest.mark.parametrize("value, found", [("high", "got a str"),
                                          (torch.ones(3), r"shape \(3,\)"),
                                          ([1.0], "got a list")])
def test_evaluate_checks_metrics_as_training_does(value, found):
    def plain(state, batch):  # a hand-written evaluator: no eval_step in between
        return {"m": value}

    for evaluator in (plain, ft.eval_step(lambda m, b: {"m": value})):
        with pytest.raises(ft.LossError, match=rf"metric 'm' must be a 0-d tensor.*{found}"):
            ft.evaluate(evaluator, state(), [torch.randn(4, 3)])
    step = ft.train_step(lambda m, b: (m(b).mean(), {"m": value}))  # the same words in fit
    with pytest.raises(ft.LossError, match=rf"metric 'm' must be a 0-d tensor.*{found}"):
        ft.fit(step, ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1)),
               [torch.randn(4, 3)], epochs=1, logger=False, checkpoint=False, progress=False)


def test_evaluate_of_no_samples_is_an_error_not_nan():
    evaluator = ft.eval_step(lambda m, b: m(b).mean())
    with pytest.raises(ft.DataError, match="no samples"):
        ft.evaluate(evaluator, state(), [torch.randn(0, 3)])
    with pytest.raises(ft.DataError, match="no samples"):
        ft.evaluate(evaluator, state(), [])
    # an empty batch among others weighs nothing
    full = torch.randn(5, 3)
    mixed = ft.evaluate(evaluator, state(), [torch.randn(0, 3), full])
    assert mixed == ft.evaluate(evaluator, state(), [full])


def test_evaluate_refuses_a_batch_size_that_is_not_a_count():
    evaluator = ft.eval_step(lambda m, b: m(b).mean())
    for bad in (-1, 2.5, "4"):
        with pytest.raises(ft.ConfigError, match="batch_size must give an int >= 0"):
            ft.evaluate(evaluator, state(), [torch.randn(2, 3)], batch_size=lambda b, bad=bad: bad)


@pytest.mark.parametrize("slot, found", [
    ({"loop": {"epoch": "2", "batch": 0}}, r"'loop' slot: epoch must be an int >= 0, found '2'"),
    ({"loop": {"epoch": 1, "batch": -3}}, r"'loop' slot: batch must be an int >= 0"),
    ({"loop": [1, 2]}, r"'loop' slot \(the data position\) must be a dict"),
    ({"nonfinite": {"step": 1, "loss": 2.0}}, r"'nonfinite' slot: step must be a 0-d int64"),
])
def test_the_loops_own_slots_read_back_from_a_file_are_checked(tmp_path, slot, found):
    state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
    path = ft.save(tmp_path / "crafted.ckpt", state.replace(slots=slot))
    with pytest.raises(ft.CheckpointError, match=found):
        ft.fit(ft.train_step(lambda m, b: m(b).mean()), state, [torch.randn(2, 3)],
               epochs=1, resume=str(path), logger=False, checkpoint=False, progress=False)


def _layers(name):
    loss = lambda m, b: m(b).mean()  # noqa: E731
    data = [torch.randn(4, 3) for _ in range(2)]
    core = ft.train_step(loss)
    validated = ft.with_validation(core, ft.eval_step(loss), data, sanity_steps=0)
    return {"validation": validated,
            "early_stop": ft.early_stop(validated, "val_loss", patience=2),
            "logging": ft.with_logging(core, [], every_n_steps=1)}[name], data


@pytest.mark.parametrize("name, slot, found", [
    ("validation", {"checks": "z", "last": {}}, r"'validation' slot: checks must be an int"),
    ("validation", {"checks": 1}, r"'validation' slot lacks \['last'\]"),
    ("early_stop", {"best": "x", "wait": 0, "seen": 0, "reason": None, "monitor": "val_loss",
                    "mode": "min"}, r"'early_stop' slot: best must be a number or None"),
    ("logging", {"sums": 3}, r"'logging' slot lacks \['pending', 'sizes', 'partial'"),
    ("logging", {"pending": {"loss": [1.0]}, "sizes": [4], "partial": {}, "steps": 1},
     r"'logging' slot: pending must be a dict of lists of metric tensors"),
])
def test_each_layers_slot_read_back_from_a_file_is_checked(tmp_path, name, slot, found):
    step, data = _layers(name)
    state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
    path = ft.save(tmp_path / "crafted.ckpt", state.replace(slots={name: slot}))
    with pytest.raises(ft.CheckpointError, match=found):
        ft.fit(step, state, data, epochs=2, resume=str(path), logger=False,
               checkpoint=False, progress=False)
