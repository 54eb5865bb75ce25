"""ft.reduce_lr_on_plateau: torch's ReduceLROnPlateau numbers, state in a slot, any optimizer."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tensors_equal
from torch import nn
from torch.nn import functional as F

import ftrain as ft
from ftrain.core.layer import Combinator
from ftrain.optim import schedules
from ftrain.optim.rates import Scaled

OFF = {"logger": False, "checkpoint": False, "progress": False}


class Scores(Combinator):
    """A layer inside that adds `score` at each epoch end, from a list (as validation
    adds val_loss); its position lives in its slot, so it resumes."""

    writes = ("score",)

    def __init__(self, inner, values):
        super().__init__(inner, "scores")
        self.values = values

    def at_epoch_end(self, state, metrics):
        i = state.slots.get("scores", 0)
        state = state.replace(slots={**state.slots, "scores": i + 1})
        return state, {**metrics, "score": torch.tensor(self.values[i], dtype=torch.float64)}


class Record(Combinator):
    """A layer outside that records the learning rates after each epoch end."""

    def __init__(self, inner):
        super().__init__(inner, None)
        self.seen = []

    def at_epoch_end(self, state, metrics):
        self.seen.append(ft.optim.learning_rates(state))
        return state, metrics


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def make_data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def make_model():
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def noisy(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    # a downward trend with noise: improvements, plateaus and reductions
    return [float(1.0 / (1 + 0.1 * i) + 0.05 * r) for i, r in
            enumerate(torch.rand(n, generator=g, dtype=torch.float64).tolist())]


def torch_lrs(values, model, kwargs, lrs=(0.1, 0.05), cls=torch.optim.SGD):
    opt = cls([{"params": [model.weight], "lr": lrs[0]},
               {"params": [model.bias], "lr": lrs[1]}])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    out = []
    for v in values:
        sched.step(v)
        out.append([g["lr"] for g in opt.param_groups])
    return out


CONFIGS = [
    {"mode": "min", "patience": 2},
    {"mode": "min", "patience": 1, "threshold_mode": "abs", "threshold": 0.01, "cooldown": 2},
    {"mode": "max", "patience": 0, "factor": 0.5},
    {"mode": "max", "patience": 1, "threshold_mode": "abs", "threshold": 0.02, "cooldown": 1,
     "factor": 0.3},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_lr_sequence_equals_torch_with_groups_and_min_lr_per_group(cfg) -> None:
    values = noisy()
    if cfg["mode"] == "max":
        values = [-v for v in values]
    expected = torch_lrs(values, make_model(), {**cfg, "min_lr": [1e-3, 1e-2]})
    stack = Record(ft.reduce_lr_on_plateau(
        Scores(ft.train_step(mse), values), "score",
        min_lr={"sgd": 1e-3, "sgd/*bias": 1e-2}, **cfg))
    state = ft.TrainState.create(make_model(), ft.optim.sgd(0.1, groups={"*bias": {"lr": 0.05}}))
    ft.fit(stack, state, make_data(1), epochs=len(values), **OFF)
    got = [[r["sgd"], r["sgd/*bias"]] for r in stack.seen]
    assert got == expected
    assert got[-1] != [0.1, 0.05]  # it did reduce
    assert min(lr for pair in got for lr in pair) >= 1e-3  # and the floors held


def test_from_torch_optimizer_with_plateau_is_bitwise_a_hand_loop() -> None:
    values = [1.0, 1.1, 1.2, 0.9, 1.0, 1.1, 1.2, 1.3]  # three reductions
    data = make_data(3)
    kwargs = {"patience": 1, "factor": 0.5}
    reference = make_model()
    opt = torch.optim.RMSprop([{"params": [reference.weight], "lr": 0.01},
                               {"params": [reference.bias], "lr": 0.02}], momentum=0.5)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    for v in values:
        for batch in data:
            opt.zero_grad()
            mse(reference, batch).backward()
            opt.step()
        sched.step(v)

    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), values), "score", **kwargs)
    state = ft.TrainState.create(make_model(), ft.optim.from_torch(
        torch.optim.RMSprop, lr=0.01, momentum=0.5, groups={"bias": {"lr": 0.02}}))
    state = ft.fit(stack, state, data, epochs=len(values), **OFF)
    assert tensors_equal(state.params, {n: p.detach() for n, p in reference.named_parameters()})
    assert list(ft.optim.learning_rates(state).values()) == [g["lr"] for g in opt.param_groups]
    assert ft.optim.learning_rates(state)["rmsprop"] < 0.01


def run(values, epochs, state, data):
    stack = Record(ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), values), "score",
                                           patience=1, cooldown=1, factor=0.5))
    return ft.fit(stack, state, data, epochs=epochs, **OFF), stack.seen


def test_resume_mid_run_is_exact(tmp_path) -> None:
    values, data = [1.0, 1.1, 1.2, 0.9, 1.0, 1.1, 1.2, 1.3, 0.5, 0.6, 0.7, 0.8], make_data(2)

    def fresh():
        return ft.TrainState.create(make_model(), ft.optim.adam(0.01))

    whole, lrs = run(values, 12, fresh(), data)
    half, first = run(values, 6, fresh(), data)
    path = ft.save(os.path.join(tmp_path, "half.ckpt"), half)
    resumed, second = run(values, 12, ft.load(path, like=fresh()), data)
    assert first + second == lrs
    assert lrs[5] != lrs[-1]  # a reduction after the resume point
    assert tensors_equal(resumed.params, whole.params)
    assert resumed.slots["plateau"] == whole.slots["plateau"]


def test_untouched_optimizer_is_kept_and_reduced_one_is_new() -> None:
    opt = ft.optim.sgd(0.1)
    values = [1.0, 0.5, 0.4, 0.3]  # always better: no reduction
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), values), "score", patience=0)
    state = ft.fit(stack, ft.TrainState.create(make_model(), opt), make_data(1), epochs=4, **OFF)
    assert state.optimizer is opt  # no new optimizer: the loop's prepared update stays
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), [1.0, 2.0]), "score", patience=0)
    state = ft.fit(stack, ft.TrainState.create(make_model(), opt), make_data(1), epochs=2, **OFF)
    assert state.optimizer is not opt and ft.optim.learning_rates(state) == {"sgd": 0.1 * 0.1}


def test_scheduled_group_follows_its_schedule_times_the_factor() -> None:
    sched = schedules.linear(0.1, 0.2, steps=100)
    values = [1.0, 2.0, 2.0]  # two checks without improvement (patience 0): two reductions
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), values), "score", patience=0,
                                    factor=0.5, min_lr=0.04)
    state = ft.TrainState.create(make_model(), ft.optim.adam(sched))
    state = ft.fit(stack, state, make_data(2), epochs=3, **OFF)
    lr = state.optimizer.transforms[0].groups.base["lr"]
    assert isinstance(lr, Scaled) and lr.schedule is sched and lr.scale == 0.25
    assert ft.optim.learning_rates(state)["adam"] == pytest.approx(max(sched(6) * 0.25, 0.04))
    assert ft.optim.learning_rates(state)["adam"] == 0.04  # the floor


def test_with_validation_val_loss_is_checked_per_validation_run() -> None:
    data = make_data(4)
    step = ft.with_validation(ft.train_step(mse), ft.eval_step(mse), data[:2])
    step = ft.reduce_lr_on_plateau(step, "val_loss", patience=0, threshold=1e9,
                                   threshold_mode="abs")
    state = ft.TrainState.create(make_model(), ft.optim.sgd(0.1))
    state = ft.fit(step, state, data, epochs=3, **OFF)
    assert state.slots["plateau"]["seen"] == 3
    # first check sets the best; the next two never beat it by 1e9: two reductions
    assert ft.optim.learning_rates(state)["sgd"] == pytest.approx(1e-3)


def test_a_new_lr_set_by_the_user_counts_from_there() -> None:
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), [1.0, 2.0, 3.0, 4.0]), "score",
                                    patience=0)
    state = ft.fit(stack, ft.TrainState.create(make_model(), ft.optim.sgd(0.1)),
                   make_data(1), epochs=2, **OFF)
    assert ft.optim.learning_rates(state) == pytest.approx({"sgd": 1e-2})
    state = state.replace(optimizer=ft.optim.sgd(0.5))  # e.g. a fine-tuning swap
    state = ft.fit(stack, state, make_data(1), epochs=3, **OFF)
    assert ft.optim.learning_rates(state) == pytest.approx({"sgd": 0.05})


def test_several_models_have_their_own_groups() -> None:
    models = {"G": make_model(), "D": make_model()}
    opts = {"G": ft.optim.adam(0.01), "D": ft.optim.from_torch(torch.optim.Adagrad, lr=0.1)}

    def loss(m, batch):
        return mse(m["G"], batch) + mse(m["D"], batch)

    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(loss), [1.0, 2.0]), "score",
                                    patience=0, min_lr={"D/adagrad": 0.05})
    state = ft.fit(stack, ft.TrainState.create(models, opts), make_data(1), epochs=2, **OFF)
    assert ft.optim.learning_rates(state) == pytest.approx({"G/adam": 1e-3, "D/adagrad": 0.05})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"factor": 1.0}, "factor must be a float in"),
    ({"mode": "up"}, "mode must be 'min' or 'max'"),
    ({"threshold_mode": "pct"}, "threshold_mode must be"),
    ({"patience": -1}, "patience must be an int >= 0"),
    ({"cooldown": 1.5}, "cooldown must be an int >= 0"),
    ({"min_lr": -1.0}, "min_lr must be"),
    ({"monitor": ""}, "needs the name of a metric"),
])
def test_bad_arguments_are_config_errors(kwargs, match) -> None:
    with pytest.raises(ft.ConfigError, match=match):
        ft.reduce_lr_on_plateau(ft.train_step(mse), **{"monitor": "score", **kwargs})


def test_min_lr_naming_an_unknown_group_is_refused() -> None:
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), [1.0]), "score",
                                    min_lr={"adam/*bias": 0.1})
    with pytest.raises(ft.ConfigError, match=r"min_lr names parameter group.*\['sgd'\]"):
        ft.fit(stack, ft.TrainState.create(make_model(), ft.optim.sgd(0.1)), make_data(1),
               epochs=1, **OFF)


def test_missing_monitor_lists_the_metrics() -> None:
    stack = ft.reduce_lr_on_plateau(ft.train_step(mse), "val_acc")
    with pytest.raises(ft.MonitorError, match=r"'val_acc'.*\['loss'\]"):
        ft.fit(stack, ft.TrainState.create(make_model(), ft.optim.sgd(0.1)), make_data(1),
               epochs=1, **OFF)


def test_slot_of_another_monitor_or_malformed_is_refused() -> None:
    values = [1.0, 2.0]
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), values), "score")
    state = ft.fit(stack, ft.TrainState.create(make_model(), ft.optim.sgd(0.1)), make_data(1),
                   epochs=1, **OFF)
    other = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), values), "score", mode="max")
    with pytest.raises(ft.ConfigError, match="tracks monitor='score', mode='min'"):
        other.init(state)
    bad = state.replace(slots={**state.slots, "plateau": {**state.slots["plateau"],
                                                          "bad": -3}})
    with pytest.raises(ft.CheckpointError, match="bad must be an int >= 0"):
        stack.init(bad)


def test_placed_inside_the_layer_that_adds_the_monitor_fails_at_build() -> None:
    inner = ft.reduce_lr_on_plateau(ft.train_step(mse), "val_loss")
    with pytest.raises(ft.ConfigError, match="reads 'val_loss'"):
        ft.with_validation(inner, ft.eval_step(mse), make_data(1))


def test_the_user_setting_the_first_lr_again_is_kept() -> None:
    # a float equal to the group's first lr looks like a resume's rebuilt optimizer; a
    # set_hparams (the "finetune" log grew) says the user set it: it counts from there
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), [1.0, 2.0]), "score",
                                    patience=0)
    state = ft.fit(stack, ft.TrainState.create(make_model(), ft.optim.sgd(0.1)),
                   make_data(1), epochs=2, **OFF)
    assert ft.optim.learning_rates(state) == pytest.approx({"sgd": 1e-2})
    again, _ = stack(state.set_hparams(lr=0.1), make_data(1)[0])
    assert ft.optim.learning_rates(again) == {"sgd": 0.1}
    assert again.slots["plateau"]["groups"]["sgd"]["lr"] == 0.1


def test_a_reduction_smaller_than_eps_is_skipped_as_torch_does() -> None:
    # torch's _reduce_lr: new = max(lr * factor, min_lr), applied only if lr - new > eps
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), [1.0, 2.0]), "score",
                                    patience=0, min_lr=0.1 - 1e-9)
    state = ft.fit(stack, ft.TrainState.create(make_model(), ft.optim.sgd(0.1)),
                   make_data(1), epochs=2, **OFF)
    assert ft.optim.learning_rates(state) == {"sgd": 0.1}
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, min_lr=0.1 - 1e-9)
    for value in (1.0, 2.0):
        sched.step(value)
    assert opt.param_groups[0]["lr"] == 0.1


def test_groups_gone_with_an_optimizer_swap_are_forgotten() -> None:
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), [1.0, 2.0]), "score",
                                    patience=0)
    state = ft.fit(stack, ft.TrainState.create(make_model(), ft.optim.sgd(0.1)),
                   make_data(1), epochs=2, **OFF)
    swapped, _ = stack(state.with_optimizer(ft.optim.adam(1e-3)), make_data(1)[0])
    assert set(swapped.slots["plateau"]["groups"]) == {"adam"}
    back, _ = stack(swapped.with_optimizer(ft.optim.sgd(0.1)), make_data(1)[0])
    assert ft.optim.learning_rates(back) == {"sgd": 0.1}  # not the old reduced 0.01


def test_direct_call_on_a_loaded_state_uses_the_reduced_lr(tmp_path) -> None:
    values = [1.0, 2.0]
    stack = ft.reduce_lr_on_plateau(Scores(ft.train_step(mse), values), "score", patience=0)
    state = ft.fit(stack, ft.TrainState.create(make_model(), ft.optim.sgd(0.1)), make_data(1),
                   epochs=2, **OFF)
    path = ft.save(os.path.join(tmp_path, "s.ckpt"), state)
    loaded = ft.load(path, like=ft.TrainState.create(make_model(), ft.optim.sgd(0.1)))
    batch = make_data(1, seed=5)[0]
    new, _ = stack(loaded, batch)  # no init: the layer follows its slot before the update
    expected, _ = ft.train_step(mse)(state, batch)
    assert ft.optim.learning_rates(new) == {"sgd": 0.1 * 0.1}
    assert tensors_equal(new.params, expected.params)
