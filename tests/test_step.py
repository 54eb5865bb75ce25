"""train_step / eval_step: purity, bound == pure, randomness, metrics, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import Net, classify, make_batches, tensors_equal

import ftrain as ft
from ftrain import testing

OFF = {"logger": False, "checkpoint": False, "progress": False}


def fresh(seed: int = 0, optimizer=None) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), optimizer or ft.optim.adamw(1e-2), seed=seed)


def test_direct_call_is_pure_and_returns_loss_and_metrics():
    state = fresh()
    step = ft.train_step(classify)
    batch = make_batches(1)[0]
    testing.assert_pure(step, state, batch)
    new, metrics = step(state, batch)
    assert new.step == 1 and state.step == 0
    assert sorted(metrics) == ["acc", "loss"]
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert not tensors_equal(new.params, state.params)
    # BatchNorm statistics end up in the new state's buffers
    assert not torch.equal(new.buffers["bn.running_mean"], state.buffers["bn.running_mean"])
    assert int(new.buffers["bn.num_batches_tracked"]) == 1
    assert int(new.opt_state["count"]) == 1 and int(state.opt_state["count"]) == 0


def test_bound_loop_equals_pure_calls_bitwise():
    data = make_batches(10)
    step = ft.train_step(classify)
    pure = fresh(seed=3)
    pure_losses = []
    for batch in data:
        pure, m = step(pure, batch)
        pure_losses.append(m["loss"].clone())
    bound_losses = []
    state = fresh(seed=3)
    for state, m in ft.iterate(step, state, data, epochs=1):
        bound_losses.append(m["loss"].clone())
    assert torch.equal(torch.stack(pure_losses), torch.stack(bound_losses))
    assert tensors_equal(pure.params, state.params)
    assert tensors_equal(pure.buffers, state.buffers)
    assert tensors_equal(pure.opt_state["adamw"]["exp_avg"],
                         state.opt_state["adamw"]["exp_avg"])


def test_dropout_draws_from_seed_and_step_only():
    step = ft.train_step(classify)
    batch = make_batches(1)[0]
    a, _ = step(fresh(seed=1), batch)
    torch.rand(100)  # the global generator's position must not matter
    b, _ = step(fresh(seed=1), batch)
    c, _ = step(fresh(seed=2), batch)
    d, _ = step(fresh(seed=1).replace(step=5), batch)
    assert tensors_equal(a.params, b.params)
    assert not tensors_equal(a.params, c.params)
    assert not tensors_equal(a.params, d.params)


def test_step_restores_the_global_generator():
    step = ft.train_step(classify)
    state = fresh()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    step(state, make_batches(1)[0])
    assert torch.equal(torch.rand(3), expected)


def test_loss_fn_sees_train_mode_and_eval_fn_sees_eval_mode():
    modes = []

    def loss_fn(model, batch):
        modes.append(("train", model.training, torch.is_grad_enabled()))
        return model(batch).sum()

    def metric_fn(model, batch):
        modes.append(("eval", model.training, torch.is_grad_enabled()))
        return model(batch).sum()

    state = fresh()
    state, _ = ft.train_step(loss_fn)(state, torch.randn(4, 6))
    ft.eval_step(metric_fn)(state, torch.randn(4, 6))
    ft.fit(ft.train_step(loss_fn), state, [torch.randn(4, 6)], epochs=1, **OFF)
    assert modes == [("train", True, True), ("eval", False, False), ("train", True, True)]


def test_eval_step_does_not_change_the_state_and_accepts_three_shapes():
    state = fresh()
    batch = make_batches(1)[0]
    testing.assert_pure(lambda s, b: (s, ft.eval_step(classify)(s, b)), state, batch)
    assert sorted(ft.eval_step(classify)(state, batch)) == ["acc", "loss"]
    assert sorted(ft.eval_step(lambda m, b: m(b[0]).mean())(state, batch)) == ["loss"]
    out = ft.eval_step(lambda m, b: {"mean": m(b[0]).mean(), "n": 3})(state, batch)
    assert float(out["n"]) == 3.0


@pytest.mark.parametrize("bad, message", [
    (lambda m, b: m(b[0]), "0-d floating-point tensor, got a torch.float32 tensor of shape"),
    (lambda m, b: [m(b[0]).mean()], "must return a loss tensor or"),
    (lambda m, b: (m(b[0]).mean(), m(b[0]).mean()), "must return a loss tensor or"),
    (lambda m, b: (b[1].sum(), {}), "0-d floating-point tensor, got a torch.int64"),
    (lambda m, b: (m(b[0]).mean(), {"acc": m(b[0])}), "metric 'acc' must be a 0-d tensor"),
    (lambda m, b: (m(b[0]).mean(), {"acc": "high"}), "metric 'acc' must be a 0-d tensor or a"),
    (lambda m, b: (m(b[0]).mean(), {3: 1.0}), "metric names must be strings"),
    (lambda m, b: (m(b[0]).mean(), {"loss": 1.0}), "'loss' is taken"),
    (lambda m, b: torch.tensor(1.0), "does not require grad"),
])
def test_bad_loss_functions_get_clear_errors(bad, message):
    state = fresh()
    batch = make_batches(1)[0]
    with pytest.raises(ft.LossError, match=message):
        ft.train_step(bad)(state, batch)
    with pytest.raises(ft.LossError, match=message):  # the same error inside a loop
        ft.fit(ft.train_step(bad), fresh(), [batch], epochs=1, **OFF)


def test_numbers_are_accepted_as_metrics():
    state = fresh()
    _, m = ft.train_step(lambda mod, b: (mod(b[0]).mean(), {"lr": 0.5, "k": 2}))(
        state, make_batches(1)[0])
    assert float(m["lr"]) == 0.5 and m["k"].dim() == 0


def test_state_without_optimizer_cannot_train():
    state = ft.TrainState.create(Net())
    with pytest.raises(ft.ConfigError, match="no optimizer"):
        ft.train_step(classify)(state, make_batches(1)[0])


def test_step_rejects_non_states_and_bad_options():
    with pytest.raises(ft.ConfigError, match="expects a TrainState"):
        ft.train_step(classify)({"params": {}}, None)  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match="callable loss_fn"):
        ft.train_step(3)  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match="on_nonfinite"):
        ft.train_step(classify, on_nonfinite="warn")  # type: ignore[arg-type]


def nan_at(step_index: int):
    def loss_fn(model, batch):
        loss, metrics = classify(model, batch)
        counter["calls"] += 1
        return (loss * float("nan") if counter["calls"] == step_index + 1 else loss), metrics
    counter = {"calls": 0}
    return loss_fn


def test_nan_loss_raises_at_epoch_end_naming_the_step():
    step = ft.train_step(nan_at(3))
    with pytest.raises(ft.NonFiniteLossError, match="at step 3 "):
        ft.fit(step, fresh(), make_batches(6), epochs=1, **OFF)


def test_nan_loss_in_a_pure_call_is_recorded_and_checked():
    state = fresh()
    step = ft.train_step(nan_at(1))
    state, _ = step(state, make_batches(1)[0])
    assert ft.check_finite(state) is None
    state, _ = step(state, make_batches(1)[0])
    with pytest.raises(ft.NonFiniteLossError, match="at step 1 "):
        ft.check_finite(state)


def test_nan_check_every_step_raises_at_the_bad_step_before_updating():
    step = ft.train_step(nan_at(2), check_finite_every_step=True)
    seen = []
    with pytest.raises(ft.NonFiniteLossError, match="at step 2"):
        for state, _ in ft.iterate(step, fresh(), make_batches(6), epochs=1):
            seen.append(state.step)
    assert seen == [1, 2]


def test_nan_loss_skip_leaves_params_and_count_unchanged():
    step = ft.train_step(nan_at(2), on_nonfinite="skip")
    states = []
    for state, _ in ft.iterate(step, fresh(), make_batches(4), epochs=1):
        states.append((state.step, int(state.opt_state["count"]),
                       state.params["fc1.weight"].clone()))
    assert [s[:2] for s in states] == [(1, 1), (2, 2), (3, 2), (4, 3)]
    assert torch.equal(states[1][2], states[2][2])  # the NaN step changed nothing
    assert not torch.isnan(states[-1][2]).any()


def test_nan_loss_ignore_does_not_raise():
    step = ft.train_step(nan_at(1), on_nonfinite="ignore")
    final = ft.fit(step, fresh(), make_batches(3), epochs=1, **OFF)
    assert torch.isnan(final.params["fc1.weight"]).all()


def test_request_stop_ends_the_loop_after_that_step():
    inner = ft.train_step(classify)

    def step(state, batch):
        state, metrics = inner(state, batch)
        if state.step == 3:
            state = ft.request_stop(state, "enough")
        return state, metrics

    final = ft.fit(step, fresh(), make_batches(8), epochs=5, **OFF)
    assert final.step == 3 and ft.stop_reason(final) == "enough"
    # given to a loop again, an old stop request is cleared and training continues
    again = ft.fit(inner, final, make_batches(8), epochs=1, **OFF)
    assert again.step == 8 and ft.stop_reason(again) is None
