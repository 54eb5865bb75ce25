"""ft.optim.from_torch: any torch.optim.Optimizer, bitwise torch's, with ftrain's state."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tensors_equal
from torch import nn
from torch.nn import functional as F

import ftrain as ft
from ftrain.optim import schedules

OFF = {"logger": False, "checkpoint": False, "progress": False}


class ThirdParty(torch.optim.Optimizer):
    """A "third-party" optimizer: a Python int step and state re-assigned every step."""

    def __init__(self, params, lr=0.01, beta=0.9):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["avg"] = torch.zeros_like(p)
                st["step"] += 1
                st["avg"] = group["beta"] * st["avg"] + (1 - group["beta"]) * p.grad
                p.add_(st["avg"], alpha=-group["lr"] / st["step"] ** 0.5)


# (class, kwargs, default lr): torch 2.13's optimizers that take dense gradients
CASES = [
    (torch.optim.Adagrad, {"lr_decay": 0.01, "weight_decay": 0.01}, 0.01),
    (torch.optim.Adadelta, {"rho": 0.8}, 1.0),
    (torch.optim.Adamax, {}, 0.002),
    (torch.optim.NAdam, {"weight_decay": 0.01}, 0.002),
    (torch.optim.RAdam, {"decoupled_weight_decay": True, "weight_decay": 0.01}, 0.001),
    (torch.optim.RMSprop, {"momentum": 0.9, "centered": True}, 0.01),
    (torch.optim.Rprop, {}, 0.01),
    (torch.optim.ASGD, {"t0": 5.0}, 0.01),
    (torch.optim.Adafactor, {}, 0.01),
    (torch.optim.Muon, {}, 0.02),
    (torch.optim.Adam, {"amsgrad": True, "foreach": False}, 0.001),
    (ThirdParty, {"beta": 0.8}, 0.01),
]
IDS = [c[0].__name__ for c in CASES]


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def make_model(cls: type) -> nn.Module:
    torch.manual_seed(0)
    bias = cls is not torch.optim.Muon  # Muon takes 2-D parameters only
    return nn.Sequential(nn.Linear(4, 8, bias=bias), nn.Tanh(), nn.Linear(8, 2, bias=bias))


def make_data(n: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
            for _ in range(n)]


def hand_loop(model: nn.Module, cls: type, kwargs: dict, data, sched=None, groups=None,
              clip: float | None = None) -> dict[str, torch.Tensor]:
    params = groups(model) if groups is not None else model.parameters()
    opt = cls(params, **kwargs)
    for k, batch in enumerate(data):
        if sched is not None:
            for group in opt.param_groups:
                group["lr"] = sched(k)
        opt.zero_grad()
        mse(model, batch).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def no_loop(state: ft.TrainState) -> ft.TrainState:
    """The state without its data position, to run it over another data list."""
    return state.replace(slots={k: v for k, v in state.slots.items() if k != "loop"})


@pytest.mark.parametrize(("cls", "kwargs", "lr"), CASES, ids=IDS)
def test_bitwise_vs_hand_loop_with_schedule_and_resume(cls, kwargs, lr, tmp_path) -> None:
    data = make_data()
    sched = schedules.step_decay(lr, step_size=7, gamma=0.5)
    reference = hand_loop(make_model(cls), cls, kwargs, data, sched)

    opt = ft.optim.from_torch(cls, lr=sched, **kwargs)
    step = ft.train_step(mse)
    state = ft.TrainState.create(make_model(cls), opt)
    state = ft.fit(step, state, data[:12], epochs=1, **OFF)          # a loop: prepared
    path = ft.save(os.path.join(tmp_path, "mid.ckpt"), state)
    raw = torch.load(path, weights_only=True)                      # plain data only
    assert set(raw["opt_state"]) == {"count", cls.__name__.lower()}
    like = ft.TrainState.create(make_model(cls), opt)
    state = no_loop(ft.load(path, like=like))
    for batch in data[12:18]:                                      # direct calls: pure
        state, _ = step(state, batch)
    state = ft.fit(step, state, data[18:], epochs=1, **OFF)
    assert int(state.opt_state["count"]) == 30
    assert tensors_equal(state.params, reference)


@pytest.mark.parametrize(("cls", "kwargs", "lr"), CASES[:3] + CASES[-1:],
                         ids=IDS[:3] + IDS[-1:])
def test_direct_call_is_pure(cls, kwargs, lr) -> None:
    state = ft.TrainState.create(make_model(cls), ft.optim.from_torch(cls, lr=lr, **kwargs))
    step = ft.train_step(mse)
    data = make_data(3)
    state, _ = step(state, data[0])
    before = state.copy()
    new, _ = step(state, data[1])
    assert tensors_equal(state.params, before.params)
    key = cls.__name__.lower()
    assert torch.equal(state.opt_state["count"], before.opt_state["count"])
    assert tensors_equal(state.opt_state[key]["state"], before.opt_state[key]["state"])
    assert not tensors_equal(new.opt_state[key]["state"], before.opt_state[key]["state"])


def test_state_is_torchs_state_by_parameter_name() -> None:
    model = make_model(torch.optim.RMSprop)
    state = ft.TrainState.create(model, ft.optim.from_torch(torch.optim.RMSprop, lr=0.01,
                                                             momentum=0.9))
    st = state.opt_state["rmsprop"]["state"]
    assert sorted(st) == ["momentum_buffer", "square_avg", "step"]
    assert sorted(st["square_avg"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert st["step"]["0.weight"].dtype == torch.float32 and float(st["step"]["0.weight"]) == 0
    assert st["square_avg"]["0.weight"].shape == (8, 4)
    # the throw-away first step at init leaves the model's own weights alone
    assert tensors_equal(state.params, {n: p.detach() for n, p in model.named_parameters()})


def test_third_party_python_numbers_are_tensors_and_resume() -> None:
    state = ft.TrainState.create(make_model(ThirdParty), ft.optim.from_torch(ThirdParty, lr=0.1))
    st = state.opt_state["thirdparty"]
    assert st["numbers"] == {"step": "int"}
    assert st["state"]["step"]["0.weight"].dtype == torch.int64
    state = ft.fit(ft.train_step(mse), state, make_data(4), epochs=1, **OFF)
    assert int(state.opt_state["thirdparty"]["state"]["step"]["0.weight"]) == 4


def test_parameter_groups_match_torch_param_groups() -> None:
    data = make_data(12)
    kwargs = {"momentum": 0.9, "weight_decay": 0.01}

    def torch_groups(model):
        named = dict(model.named_parameters())
        return [{"params": [named["0.weight"]]},
                {"params": [named["0.bias"], named["2.bias"]], "weight_decay": 0.0},
                {"params": [named["2.weight"]], "lr": 0.003, "alpha": 0.9}]

    reference = hand_loop(make_model(torch.optim.RMSprop), torch.optim.RMSprop,
                          {"lr": 0.01, **kwargs}, data, groups=torch_groups)
    opt = ft.optim.from_torch(torch.optim.RMSprop, lr=0.01,
                              groups={"*bias": {"weight_decay": 0.0},
                                      "2.weight": {"lr": 0.003, "alpha": 0.9}}, **kwargs)
    state = ft.TrainState.create(make_model(torch.optim.RMSprop), opt)
    assert state.optimizer.learning_rates(state.opt_state) == {
        "rmsprop": 0.01, "rmsprop/*bias": 0.01, "rmsprop/2.weight": 0.003}
    state = ft.fit(ft.train_step(mse), state, data, epochs=1, **OFF)
    assert tensors_equal(state.params, reference)


def test_group_with_unknown_setting_is_refused() -> None:
    with pytest.raises(ft.ConfigError, match=r"sets \['betas'\]"):
        ft.optim.from_torch(torch.optim.RMSprop, lr=0.01, groups={"*bias": {"betas": 1}})


def test_clip_chain_matches_torch_clip_then_step() -> None:
    data = make_data(10)
    reference = hand_loop(make_model(torch.optim.Adagrad), torch.optim.Adagrad,
                          {"lr": 0.5}, data, clip=0.1)
    opt = ft.optim.chain(ft.optim.clip_grad_norm(0.1),
                         ft.optim.from_torch(torch.optim.Adagrad, lr=0.5))
    state = ft.TrainState.create(make_model(torch.optim.Adagrad), opt)
    step = ft.train_step(mse)
    state = ft.fit(step, state, data[:5], epochs=1, **OFF)
    for batch in data[5:]:
        state, _ = step(state, batch)
    assert tensors_equal(state.params, reference)


@pytest.mark.parametrize("cls", [torch.optim.LBFGS, torch.optim.SparseAdam])
def test_lbfgs_and_sparse_adam_are_refused_with_the_reason(cls) -> None:
    with pytest.raises(ft.ConfigError, match="closure" if cls is torch.optim.LBFGS
                       else "sparse gradients"):
        ft.optim.from_torch(cls, lr=0.1)


def test_state_made_from_the_first_gradient_is_refused_unless_it_matches() -> None:
    # SGD starts its momentum buffer at the first gradient; with dampening a buffer made
    # before the first step gives (1 - dampening) times it: refused, not silently off
    with pytest.raises(ft.ConfigError, match=r"from_torch\(SGD.*first gradient.*ft\.optim\.sgd"):
        ft.optim.from_torch(torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.5)
    with pytest.raises(ft.ConfigError, match="first gradient"):  # a group's settings too
        ft.optim.from_torch(torch.optim.SGD, lr=0.1, momentum=0.9,
                            groups={"*bias": {"dampening": 0.5}})
    # without dampening a zero buffer is exact: accepted, and bitwise torch's
    data = make_data(8)
    kwargs = {"lr": 0.1, "momentum": 0.9, "nesterov": True}
    reference = hand_loop(make_model(torch.optim.SGD), torch.optim.SGD, kwargs, data)
    state = ft.TrainState.create(make_model(torch.optim.SGD),
                                 ft.optim.from_torch(torch.optim.SGD, **kwargs))
    for batch in data:
        state, _ = ft.train_step(mse)(state, batch)
    assert all(torch.equal(state.params[n], p) for n, p in reference.items())


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ft.ConfigError, match="torch.optim.Optimizer subclass"):
        ft.optim.from_torch(nn.Linear, lr=0.1)
    with pytest.raises(ft.ConfigError, match="torch refused the arguments.*momentum"):
        ft.optim.from_torch(torch.optim.RMSprop, lr=0.1, momentum=-1.0)
    with pytest.raises(ft.ConfigError, match="non-negative float or a schedule"):
        ft.optim.from_torch(torch.optim.RMSprop, lr="fast")
    with pytest.raises(ft.ConfigError, match="params="):
        ft.optim.from_torch(torch.optim.RMSprop, lr=0.1, params=[])


def test_muon_on_a_bias_says_which_optimizer_refused() -> None:
    opt = ft.optim.from_torch(torch.optim.Muon, lr=0.02)
    with pytest.raises(ft.ConfigError, match=r"from_torch\(Muon\).*2D"):
        ft.TrainState.create(nn.Linear(4, 2), opt)


def test_skipped_update_changes_nothing() -> None:
    opt = ft.optim.from_torch(torch.optim.Adamax, lr=0.1)
    w = torch.ones(3, requires_grad=True)
    state = opt.init({"w": w.detach()})
    w.grad = torch.ones(3)
    with torch.no_grad():
        opt.update({"w": w}, state, found_inf=torch.ones(()))
    assert torch.equal(w.detach(), torch.ones(3)) and int(state["count"]) == 0
    with torch.no_grad():
        opt.update({"w": w}, state, found_inf=torch.zeros(()))
    assert w.lt(1).all() and int(state["count"]) == 1


def test_compile_falls_back_to_eager_with_a_warning(caplog) -> None:
    data = make_data(4)
    opt = ft.optim.from_torch(torch.optim.Adamax, lr=0.01)
    eager = ft.fit(ft.train_step(mse), ft.TrainState.create(make_model(None), opt), data,
                   epochs=1, **OFF)
    compiled = ft.compile(ft.train_step(mse))
    with caplog.at_level("WARNING", logger="ftrain"):
        state = ft.fit(compiled, ft.TrainState.create(make_model(None), opt), data, epochs=1,
                       **OFF)
    assert "running the training step" in caplog.text and "capturable" in caplog.text
    assert tensors_equal(state.params, eager.params)
    with pytest.raises(ft.ConfigError, match="capturable"):
        ft.fit(ft.compile(ft.train_step(mse), fallback=False),
               ft.TrainState.create(make_model(None), opt), data, epochs=1, **OFF)


def test_a_fully_frozen_model_has_empty_state_and_trains_nothing() -> None:
    model = make_model(None).requires_grad_(False)
    model[2].weight.requires_grad_(True)
    state = ft.TrainState.create(model, ft.optim.from_torch(torch.optim.Adamax, lr=0.1))
    assert sorted(state.opt_state["adamax"]["state"]["exp_avg"]) == ["2.weight"]
    frozen = ft.TrainState.create(make_model(None).requires_grad_(False),
                                  ft.optim.from_torch(torch.optim.Adamax, lr=0.1))
    assert frozen.opt_state["adamax"] == {"state": {}, "numbers": {}}


def test_loop_builds_the_torch_optimizer_once() -> None:
    built = []

    class Counted(torch.optim.Adamax):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    opt = ft.optim.from_torch(Counted, lr=0.01)
    state = ft.TrainState.create(make_model(None), opt)
    before = len(built)
    ft.fit(ft.train_step(mse), state, make_data(10), epochs=2, **OFF)
    assert len(built) - before == 1  # prepared once for 20 updates


def test_unused_parameter_and_schedule_in_a_loop_match_torch() -> None:
    """A step where a parameter gets no gradient runs the general update (torch skips the
    parameter); the schedule position stays right when the loop's prepared one resumes."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x, use_b):
            return self.a(x) + (self.b(x) if use_b else 0)

    data = [(x, y, k % 3 != 1) for k, (x, y) in enumerate(make_data(12))]

    def loss(model, batch):
        x, y, use_b = batch
        return F.mse_loss(model(x, use_b), y)

    sched = schedules.step_decay(0.01, step_size=4, gamma=0.5)
    reference = TwoHeads()
    opt = torch.optim.RMSprop(reference.parameters(), lr=0.01)
    for k, batch in enumerate(data):
        opt.param_groups[0]["lr"] = sched(k)
        opt.zero_grad(set_to_none=True)
        loss(reference, batch).backward()
        opt.step()
    state = ft.TrainState.create(TwoHeads(), ft.optim.from_torch(torch.optim.RMSprop, lr=sched))
    state = ft.fit(ft.train_step(loss), state, data, epochs=1, **OFF)
    assert tensors_equal(state.params, {n: p.detach() for n, p in reference.named_parameters()})
