"""Steps and states are values: building, wrapping or compiling never changes what it was
given; stacks in an order that cannot work fail when they are built (issue 13)."""

import copy

import pytest
import torch

import ftrain as ft
from ftrain.core.layer import core as core_of
from ftrain.core.layer import map_core

torch.set_num_threads(1)


def loss_fn(model, batch):
    x, y = batch
    out = model(x)
    return torch.nn.functional.mse_loss(out.float(), y), {"out_dtype": torch.tensor(
        float(out.dtype == torch.bfloat16))}


def _state():
    torch.manual_seed(0)
    return ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))


BATCH = (torch.randn(8, 3), torch.randn(8, 1))


def test_wrapping_never_changes_the_core():
    core = ft.train_step(loss_fn)
    before = copy.copy(core.phases)
    amp = ft.with_amp(core, torch.bfloat16)
    acc = ft.with_accumulation(core, 2)
    assert core.phases == before and core.phases.amp is None
    # calling the core afterwards does not run under autocast
    _, metrics = core(_state(), BATCH)
    assert float(metrics["out_dtype"]) == 0.0
    _, metrics = amp(_state(), BATCH)
    assert float(metrics["out_dtype"]) == 1.0
    # two stacks on one core are independent
    assert core_of(amp).phases.accumulation is None
    assert core_of(acc).phases.amp is None and core_of(acc).phases.accumulation is not None
    _, metrics = acc(_state(), BATCH)
    assert float(metrics["out_dtype"]) == 0.0


def test_wrapping_a_stack_copies_its_layers():
    core = ft.train_step(loss_fn)
    stack = ft.with_logging(core, [], every_n_steps=None, progress=False)
    amp = ft.with_amp(stack, torch.bfloat16)
    assert amp is not stack and stack.inner is core and core.phases.amp is None
    assert core_of(amp).phases.amp is not None and core_of(amp) is not core
    assert type(amp) is type(stack)


def test_options_of_a_core_cannot_be_assigned():
    core = ft.train_step(loss_fn)
    with pytest.raises(ft.ConfigError, match="is a value"):
        core.phases = core.phases
    with pytest.raises(ft.ConfigError, match="is a value"):
        core.loss_fn = loss_fn


def test_an_option_is_set_once_per_stack():
    amp = ft.with_amp(ft.train_step(loss_fn), torch.bfloat16)
    with pytest.raises(ft.ConfigError, match="already set"):
        ft.with_amp(amp, torch.float16)


def test_compile_returns_a_new_stack():
    core = ft.train_step(loss_fn)
    stack = ft.with_logging(ft.with_amp(core, torch.bfloat16), [], progress=False)
    compiled = ft.compile(stack)
    assert compiled is not stack
    assert type(core_of(stack)).__name__ == "TrainStep"
    assert type(core_of(compiled)).__name__ == "CompiledStep"
    assert core_of(compiled).phases.amp == core_of(stack).phases.amp
    assert stack.inner is not compiled.inner


def test_map_core_leaves_the_stack_and_reports_slot_clashes():
    core = ft.train_step(loss_fn)
    stack = ft.with_logging(core, [], name="amp", progress=False)
    # float16 gives the core a loss-scaler slot named "amp": the stack would own it twice
    with pytest.raises(ft.ConfigError, match="two combinators claim the slot 'amp'"):
        ft.with_amp(stack, torch.float16)
    same = map_core(stack, lambda c: c)
    assert same is not stack and same.inner is core


def test_replace_shares_no_slots():
    s0 = _state()
    s1 = s0.replace()
    s1.slots["mine"] = 1
    assert "mine" not in s0.slots
    s2 = s0.replace(step=3)
    assert s2.slots is not s0.slots


def test_a_state_carries_no_run_object():
    step = ft.train_step(loss_fn)
    seen = []
    for state, _ in ft.iterate(step, _state(), [BATCH] * 2, epochs=1):
        seen.append((ft.run_info(state) is not None, sorted(vars(state))))
    assert seen[0][0] is True
    assert all("_binding" not in names for _, names in seen)


def test_the_grad_norm_request_changes_no_step():
    core = ft.train_step(loss_fn)
    stack = ft.with_logging(core, [], every_n_steps=1, log_grad_norm=True, progress=False)
    state, metrics = stack(_state(), BATCH)
    assert "grad_norm" in metrics
    _, metrics = core(state, BATCH)
    assert "grad_norm" not in metrics


VAL = [BATCH]
EVAL = ft.eval_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))


def test_early_stop_inside_validation_fails_when_built():
    step = ft.early_stop(ft.train_step(loss_fn), "val_loss")
    with pytest.raises(ft.ConfigError, match="sits outside"):
        ft.with_validation(step, EVAL, VAL)
    # the working order builds
    ft.early_stop(ft.with_validation(ft.train_step(loss_fn), EVAL, VAL), "val_loss")


def test_epoch_monitor_inside_logging_fails_when_built():
    step = ft.early_stop(ft.train_step(loss_fn), "loss_epoch")
    with pytest.raises(ft.ConfigError, match="sits outside"):
        ft.with_logging(step, [])


def test_monitored_checkpoints_inside_validation_fail_when_built(tmp_path):
    step = ft.with_checkpointing(ft.train_step(loss_fn), str(tmp_path), monitor="val_loss")
    with pytest.raises(ft.ConfigError, match="sits outside"):
        ft.with_validation(step, EVAL, VAL)


def test_early_stop_reads_results_not_another_layers_slot():
    """early_stop checks when validation's results arrive, wherever they come from: here
    from a hook that adds them every 2 steps, with no validation layer at all."""
    calls = []

    def score(state, metrics):
        calls.append(state.step)
        return state, {"val_loss": torch.tensor(1.0)}  # never improves

    hooked = ft.every(ft.train_step(loss_fn), score, every_n_steps=2)
    hooked.writes = ("val_*",)  # declares what it adds, as a layer of one's own would
    step = ft.early_stop(hooked, "val_loss", patience=2)
    state = ft.fit(step, _state(), [BATCH] * 10, epochs=1, logger=False, checkpoint=False,
                   progress=False)
    assert ft.stop_reason(state).startswith("early_stop")
    assert state.step == 6 and calls == [2, 4, 6]  # best at 2, no better at 4 and 6
