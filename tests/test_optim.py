"""Tests of `ft.optim`: parity with torch.optim, the update count, skipped updates,
schedules, chains, parameter groups, error paths and frozen parameters."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import ftrain as ft
from ftrain.optim import schedules

STEPS = 50
RTOL, ATOL = 1e-5, 1e-6

Tensors = dict[str, torch.Tensor]


# -- helpers -----------------------------------------------------------------------------

def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def initial_params(seed: int = 0) -> Tensors:
    return {n: p.detach().clone() for n, p in make_model(seed).named_parameters()}


def random_grads(params: Tensors, steps: int = STEPS, seed: int = 1,
                 scale: float = 1.0) -> list[Tensors]:
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=gen) * scale for n, p in params.items()}
            for _ in range(steps)]


def leaves(init: Tensors) -> Tensors:
    return {n: t.clone().requires_grad_(True) for n, t in init.items()}


def run_ft(opt: ft.optim.Optimizer, init: Tensors, grads: list[Tensors],
           found_inf: torch.Tensor | None = None) -> tuple[Tensors, dict]:
    params = leaves(init)
    state = opt.init({n: p.detach() for n, p in params.items()})
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone()
        with torch.no_grad():
            opt.update(params, state, found_inf)
    return {n: p.detach() for n, p in params.items()}, state


def run_torch(make_opt: Callable[[Tensors], torch.optim.Optimizer], init: Tensors,
              grads: list[Tensors], make_sched: Callable | None = None,
              clip: float | None = None) -> Tensors:
    params = leaves(init)
    opt = make_opt(params)
    sched = make_sched(opt) if make_sched is not None else None
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        opt.step()
        if sched is not None:
            sched.step()
    return {n: p.detach() for n, p in params.items()}


def assert_equal(a: Tensors, b: Tensors) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), (n, (a[n] - b[n]).abs().max().item())


def assert_close(a: Tensors, b: Tensors, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=n)


def assert_moved(before: Tensors, after: Tensors) -> None:
    for n in before:
        assert not torch.equal(before[n], after[n]), f"{n} did not change"


def params_list(params: Tensors) -> list[torch.Tensor]:
    return list(params.values())


# (ftrain optimizer, torch optimizer) pairs with the same settings; `impl` picks the kernel
SGD_CONFIGS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight_decay": {"weight_decay": 1e-2},
    "momentum_wd": {"momentum": 0.8, "weight_decay": 5e-2},
    "nesterov_wd": {"momentum": 0.5, "nesterov": True, "weight_decay": 1e-2},
}
ADAM_CONFIGS = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.1},
    "amsgrad": {"amsgrad": True},
    "amsgrad_wd": {"amsgrad": True, "weight_decay": 0.05},
    "betas_eps": {"betas": (0.8, 0.95), "eps": 1e-6},
}
# ftrain kwargs -> torch kwargs for the same kernel
IMPLS = {
    "fused": ({"fused": True}, {"fused": True}),
    "foreach": ({"foreach": True}, {"foreach": True}),
    "single": ({"fused": False, "foreach": False}, {"foreach": False}),
}


# -- numerical parity with torch.optim ------------------------------------------------------

@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("cfg", sorted(SGD_CONFIGS))
def test_sgd_bitwise_parity_same_kernel(cfg: str, impl: str) -> None:
    kw = SGD_CONFIGS[cfg]
    ft_impl, torch_impl = IMPLS[impl]
    init = initial_params()
    grads = random_grads(init)
    got, _ = run_ft(ft.optim.sgd(0.05, **kw, **ft_impl), init, grads)
    want = run_torch(lambda p: torch.optim.SGD(params_list(p), lr=0.05, **kw, **torch_impl),
                     init, grads)
    assert_moved(init, got)
    assert_equal(got, want)


@pytest.mark.parametrize("cfg", sorted(SGD_CONFIGS))
def test_sgd_default_matches_torch_default(cfg: str) -> None:
    kw = SGD_CONFIGS[cfg]
    init = initial_params()
    grads = random_grads(init)
    got, _ = run_ft(ft.optim.sgd(0.05, **kw), init, grads)
    want = run_torch(lambda p: torch.optim.SGD(params_list(p), lr=0.05, **kw), init, grads)
    assert_moved(init, got)
    assert_close(got, want)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("cfg", sorted(ADAM_CONFIGS))
def test_adam_bitwise_parity_same_kernel(cfg: str, impl: str) -> None:
    kw = ADAM_CONFIGS[cfg]
    ft_impl, torch_impl = IMPLS[impl]
    init = initial_params()
    grads = random_grads(init)
    got, state = run_ft(ft.optim.adam(1e-2, **kw, **ft_impl), init, grads)
    want = run_torch(lambda p: torch.optim.Adam(params_list(p), lr=1e-2, **kw, **torch_impl),
                     init, grads)
    assert_moved(init, got)
    assert_equal(got, want)
    for n in init:
        assert float(state["adam"]["step"][n]) == STEPS


@pytest.mark.parametrize("cfg", sorted(ADAM_CONFIGS))
def test_adam_default_matches_torch_default(cfg: str) -> None:
    kw = ADAM_CONFIGS[cfg]
    init = initial_params()
    grads = random_grads(init)
    got, _ = run_ft(ft.optim.adam(1e-2, **kw), init, grads)
    want = run_torch(lambda p: torch.optim.Adam(params_list(p), lr=1e-2, **kw), init, grads)
    assert_moved(init, got)
    assert_close(got, want)


ADAMW_CONFIGS = {
    "default_wd": {},
    "wd": {"weight_decay": 0.1},
    "amsgrad": {"amsgrad": True, "weight_decay": 0.05},
    "no_wd": {"weight_decay": 0.0},
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("cfg", sorted(ADAMW_CONFIGS))
def test_adamw_bitwise_parity_same_kernel(cfg: str, impl: str) -> None:
    kw = ADAMW_CONFIGS[cfg]
    ft_impl, torch_impl = IMPLS[impl]
    init = initial_params()
    grads = random_grads(init)
    got, _ = run_ft(ft.optim.adamw(1e-2, **kw, **ft_impl), init, grads)
    want = run_torch(lambda p: torch.optim.AdamW(params_list(p), lr=1e-2, **kw, **torch_impl),
                     init, grads)
    assert_moved(init, got)
    assert_equal(got, want)


@pytest.mark.parametrize("cfg", sorted(ADAMW_CONFIGS))
def test_adamw_default_matches_torch_default(cfg: str) -> None:
    kw = ADAMW_CONFIGS[cfg]
    init = initial_params()
    grads = random_grads(init)
    got, _ = run_ft(ft.optim.adamw(1e-2, **kw), init, grads)
    want = run_torch(lambda p: torch.optim.AdamW(params_list(p), lr=1e-2, **kw), init, grads)
    assert_close(got, want)


@pytest.mark.parametrize("which", ["adam", "adamw"])
def test_default_kernel_on_cpu_is_fused(which: str) -> None:
    # documented: the fused kernel where the device has one (CPU does in torch >= 2.4)
    make_ft = getattr(ft.optim, which)
    cls = torch.optim.Adam if which == "adam" else torch.optim.AdamW
    init = initial_params()
    grads = random_grads(init)
    got, state = run_ft(make_ft(1e-2, weight_decay=0.05), init, grads)
    fused = run_torch(lambda p: cls(params_list(p), lr=1e-2, weight_decay=0.05, fused=True),
                      init, grads)
    foreach = run_torch(lambda p: cls(params_list(p), lr=1e-2, weight_decay=0.05,
                                      foreach=True), init, grads)
    assert any(not torch.equal(fused[n], foreach[n]) for n in init)  # kernels differ here
    assert_equal(got, fused)
    assert state[which]["step"]["0.weight"].device == init["0.weight"].device


def test_adamw_default_weight_decay_is_torchs() -> None:
    # adamw's default weight_decay (1e-2) is torch.optim.AdamW's: same result without it
    init = initial_params()
    grads = random_grads(init, steps=20)
    got, _ = run_ft(ft.optim.adamw(1e-1, fused=True), init, grads)
    want = run_torch(lambda p: torch.optim.AdamW(params_list(p), lr=1e-1, fused=True),
                     init, grads)
    assert_equal(got, want)
    no_wd, _ = run_ft(ft.optim.adamw(1e-1, weight_decay=0.0, fused=True), init, grads)
    assert not torch.equal(got["0.weight"], no_wd["0.weight"])


def test_adam_and_adamw_differ_with_weight_decay() -> None:
    # L2 (adam) and decoupled (adamw) weight decay are different updates
    init = initial_params()
    grads = random_grads(init, steps=10)
    a, _ = run_ft(ft.optim.adam(1e-2, weight_decay=0.1), init, grads)
    w, _ = run_ft(ft.optim.adamw(1e-2, weight_decay=0.1), init, grads)
    assert not torch.allclose(a["0.weight"], w["0.weight"])


def test_state_layout_matches_torch_state() -> None:
    init = initial_params()
    grads = random_grads(init, steps=7)
    _, state = run_ft(ft.optim.adam(1e-2, amsgrad=True, fused=True), init, grads)
    params = leaves(init)
    topt = torch.optim.Adam(params_list(params), lr=1e-2, amsgrad=True, fused=True)
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone()
        topt.step()
    for n, p in params.items():
        tstate = topt.state[p]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(state["adam"][key][n], tstate[key]), (n, key)
        assert state["adam"]["step"][n].dtype == tstate["step"].dtype
        assert torch.equal(state["adam"]["step"][n], tstate["step"])


def test_param_without_grad_is_left_alone() -> None:
    init = initial_params()
    opt = ft.optim.adam(1e-2)
    params = leaves(init)
    state = opt.init({n: p.detach() for n, p in params.items()})
    for g in random_grads(init, steps=5):
        for n, p in params.items():
            p.grad = None if n == "2.bias" else g[n].clone()
        with torch.no_grad():
            opt.update(params, state)
    assert torch.equal(params["2.bias"].detach(), init["2.bias"])
    assert float(state["adam"]["step"]["2.bias"]) == 0.0
    assert not state["adam"]["exp_avg"]["2.bias"].any()
    assert float(state["adam"]["step"]["0.weight"]) == 5.0
    assert int(state["count"]) == 5


# -- the full stack: train_step + TrainState vs a hand-written torch loop -------------------

def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_batches(n: int = 10, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen))
            for _ in range(n)]


FULL_STACK = {
    "sgd_nesterov_wd": (
        lambda: ft.optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=True),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                  weight_decay=1e-3, fused=True), None),
    "adam_amsgrad": (
        lambda: ft.optim.adam(1e-2, amsgrad=True, weight_decay=1e-3, fused=True),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True, weight_decay=1e-3,
                                   fused=True), None),
    "adamw_foreach": (
        lambda: ft.optim.adamw(1e-2, weight_decay=0.1, foreach=True),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=True),
        None),
    "clip_adamw": (
        lambda: ft.optim.chain(ft.optim.clip_grad_norm(0.1), ft.optim.adamw(1e-2, fused=True)),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), 0.1),
}


@pytest.mark.parametrize("name", sorted(FULL_STACK))
def test_train_step_matches_hand_written_loop(name: str) -> None:
    make_ft, make_torch, clip = FULL_STACK[name]
    model = make_model()
    ref = copy.deepcopy(model)
    state = ft.TrainState.create(model, make_ft())
    step = ft.train_step(mse_loss)
    topt = make_torch(ref)
    batches = make_batches() * 4
    for batch in batches:
        state, metrics = step(state, batch)
        topt.zero_grad()
        loss = mse_loss(ref, batch)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        topt.step()
        assert torch.equal(metrics["loss"], loss.detach())
    assert state.step == len(batches)
    assert int(state.opt_state["count"]) == len(batches)
    assert_equal(dict(state.params), {n: p.detach() for n, p in ref.named_parameters()})


def test_train_step_default_adam_matches_torch_default() -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    state = ft.TrainState.create(model, ft.optim.adam(1e-2))
    step = ft.train_step(mse_loss)
    topt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for batch in make_batches() * 3:
        state, _ = step(state, batch)
        topt.zero_grad()
        mse_loss(ref, batch).backward()
        topt.step()
    assert_close(dict(state.params), {n: p.detach() for n, p in ref.named_parameters()})


def test_fit_bound_loop_matches_hand_written_loop() -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    state = ft.TrainState.create(model, ft.optim.adamw(1e-2, weight_decay=0.1, fused=True))
    step = ft.train_step(mse_loss)
    batches = make_batches()
    state = ft.fit(step, state, batches, epochs=3, logger=False, checkpoint=False,
                   progress=False)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for batch in batches * 3:
        topt.zero_grad()
        mse_loss(ref, batch).backward()
        topt.step()
    assert state.step == 30
    assert int(state.opt_state["count"]) == 30
    assert_equal({n: t.detach() for n, t in state.params.items()},
                 {n: p.detach() for n, p in ref.named_parameters()})


def test_pure_step_leaves_input_optimizer_state_untouched() -> None:
    state = ft.TrainState.create(make_model(), ft.optim.adam(1e-2))
    before = state.copy()
    new, _ = ft.train_step(mse_loss)(state, make_batches(1)[0])
    assert int(state.opt_state["count"]) == 0
    assert int(new.opt_state["count"]) == 1
    for n in state.params:
        assert torch.equal(state.opt_state["adam"]["exp_avg"][n],
                           before.opt_state["adam"]["exp_avg"][n])
        assert float(state.opt_state["adam"]["step"][n]) == 0.0
        assert float(new.opt_state["adam"]["step"][n]) == 1.0
    assert_moved(state.params, new.params)


# -- the update count and skipped updates --------------------------------------------------

@pytest.mark.parametrize("make_opt", [
    lambda: ft.optim.adam(1e-2),
    lambda: ft.optim.sgd(0.1, momentum=0.9),
    lambda: ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.adamw(1e-3)),
], ids=["adam", "sgd", "chain"])
def test_count_is_0d_int64_and_advances_once_per_update(make_opt: Callable) -> None:
    opt = make_opt()
    init = initial_params()
    params = leaves(init)
    state = opt.init({n: p.detach() for n, p in params.items()})
    count = state["count"]
    assert count.shape == () and count.dtype == torch.int64 and int(count) == 0
    for i, g in enumerate(random_grads(init, steps=6)):
        for n, p in params.items():
            p.grad = g[n].clone()
        with torch.no_grad():
            opt.update(params, state)
        assert state["count"].shape == () and state["count"].dtype == torch.int64
        assert int(state["count"]) == i + 1
    assert state["count"] is count  # updated in place


def test_count_on_params_device_and_one_per_chain() -> None:
    opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.sgd(0.1), ft.optim.sgd(0.1))
    assert opt.keys == ("clip_grad_norm", "sgd", "sgd_1")
    state = opt.init(initial_params())
    assert sorted(state) == ["clip_grad_norm", "count", "sgd", "sgd_1"]
    assert state["count"].device == next(iter(initial_params().values())).device


def _snapshot(state: dict) -> dict:
    return torch.utils._pytree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)


def _assert_tree_equal(a: dict, b: dict) -> None:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


SKIP_OPTS = {
    "adam_fused": lambda: ft.optim.adam(1e-2, fused=True),
    "adam_default": lambda: ft.optim.adam(1e-2, weight_decay=0.1),
    "adamw_amsgrad_fused": lambda: ft.optim.adamw(1e-2, amsgrad=True, fused=True),
    "sgd_momentum_fused": lambda: ft.optim.sgd(0.1, momentum=0.9, fused=True),
    "adam_foreach": lambda: ft.optim.adam(1e-2, foreach=True),
    "sgd_single": lambda: ft.optim.sgd(0.1, momentum=0.9, fused=False, foreach=False),
    "clip_adam_fused": lambda: ft.optim.chain(ft.optim.clip_grad_norm(1.0),
                                              ft.optim.adam(1e-2, fused=True)),
}


@pytest.mark.parametrize("name", sorted(SKIP_OPTS))
def test_found_inf_skips_update_entirely(name: str) -> None:
    opt = SKIP_OPTS[name]()
    init = initial_params()
    grads = random_grads(init, steps=4)
    params = leaves(init)
    state = opt.init({n: p.detach() for n, p in params.items()})

    def update(g: Tensors, found_inf: torch.Tensor | None) -> None:
        for n, p in params.items():
            p.grad = g[n].clone()
        with torch.no_grad():
            opt.update(params, state, found_inf)

    for g in grads[:3]:  # some history, so the state is not all zeros
        update(g, None)
    params_before = {n: p.detach().clone() for n, p in params.items()}
    state_before = _snapshot(state)
    assert int(state["count"]) == 3

    update(grads[3], torch.tensor(1.0))
    assert_equal({n: p.detach() for n, p in params.items()}, params_before)
    _assert_tree_equal(state, state_before)  # moments, per-param step and count
    assert int(state["count"]) == 3

    # found_inf=0 applies normally: same as an update without found_inf
    update(grads[3], torch.tensor(0.0))
    assert int(state["count"]) == 4
    reference, ref_state = run_ft(SKIP_OPTS[name](), init, grads)
    assert_equal({n: p.detach() for n, p in params.items()}, reference)
    _assert_tree_equal(state, ref_state)


def test_found_inf_skip_keeps_schedule_position() -> None:
    # the schedule reads the update count: a skipped update does not advance it
    sched = schedules.step_decay(1.0, step_size=1, gamma=0.5)
    opt = ft.optim.sgd(sched, fused=True)
    w = torch.zeros(3, requires_grad=True)
    state = opt.init({"w": w.detach()})
    for found_inf in (0.0, 1.0, 1.0, 0.0):
        w.grad = torch.ones(3)
        with torch.no_grad():
            opt.update({"w": w}, state, torch.tensor(found_inf))
    # applied lrs: 1.0 (count 0), then 0.5 (count 1); the skipped ones used nothing
    assert int(state["count"]) == 2
    torch.testing.assert_close(w.detach(), torch.full((3,), -1.5))
    torch.testing.assert_close(float(opt.learning_rates(state)["sgd"]), 0.25)


@pytest.mark.parametrize("make_opt", [lambda: ft.optim.adam(1e-2),
                                      lambda: ft.optim.adam(1e-2, foreach=True)],
                         ids=["fused_default", "foreach"])
def test_train_step_skip_nonfinite_loss(make_opt: Callable) -> None:
    state = ft.TrainState.create(make_model(), make_opt())
    step = ft.train_step(mse_loss, on_nonfinite="skip")
    good = make_batches(2)
    state, _ = step(state, good[0])
    snap = state.copy()
    x, y = good[1]
    bad = (x, torch.full_like(y, float("nan")))
    state, metrics = step(state, bad)
    assert torch.isnan(metrics["loss"])
    assert state.step == 2
    assert int(state.opt_state["count"]) == 1
    assert_equal(dict(state.params), dict(snap.params))
    _assert_tree_equal(state.opt_state, snap.opt_state)
    state, _ = step(state, good[1])
    assert int(state.opt_state["count"]) == 2
    assert_moved(snap.params, state.params)
    for t in state.params.values():
        assert torch.isfinite(t).all()


# -- schedules -----------------------------------------------------------------------------

COUNTS = [0, 1, 2, 5, 9, 10, 11, 17, 50, 99, 100, 101, 250]


def _closed_forms() -> list[tuple[str, Callable, Callable[[int], float]]]:
    def cos(init: float, d: int, alpha: float, k: int) -> float:
        frac = min(k / d, 1.0)
        return init * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + alpha)

    return [
        ("constant", schedules.constant(0.3), lambda k: 0.3),
        ("linear_up", schedules.linear(0.0, 2.0, steps=10), lambda k: 2.0 * min(k / 10, 1.0)),
        ("linear_down", schedules.linear(1.0, 0.2, steps=100),
         lambda k: 1.0 + (0.2 - 1.0) * min(k / 100, 1.0)),
        ("cosine", schedules.cosine_decay(0.5, 100), lambda k: cos(0.5, 100, 0.0, k)),
        ("cosine_alpha", schedules.cosine_decay(2.0, 17, alpha=0.1),
         lambda k: cos(2.0, 17, 0.1, k)),
        ("step_decay", schedules.step_decay(0.8, step_size=10, gamma=0.3),
         lambda k: 0.8 * 0.3 ** (k // 10)),
        ("step_decay_default_gamma", schedules.step_decay(1.0, step_size=5),
         lambda k: 0.1 ** (k // 5)),
        ("warmup_cosine", schedules.warmup_cosine(1e-3, 10, 100),
         lambda k: 1e-3 * k / 10 if k < 10 else cos(1e-3, 90, 0.0, k - 10)),
        ("warmup_cosine_init_end", schedules.warmup_cosine(1.0, 10, 100, init=0.1, end=0.05),
         lambda k: 0.1 + 0.9 * k / 10 if k < 10 else cos(1.0, 90, 0.05, k - 10)),
        ("join", schedules.join([schedules.constant(1.0), schedules.linear(1.0, 0.0, 40),
                                 schedules.step_decay(0.5, 10, 0.5)], [10, 50]),
         lambda k: 1.0 if k < 10 else (1.0 - min((k - 10) / 40, 1.0) if k < 50
                                       else 0.5 * 0.5 ** ((k - 50) // 10))),
    ]


@pytest.mark.parametrize("name,sched,formula", _closed_forms(),
                         ids=[c[0] for c in _closed_forms()])
def test_schedule_closed_form_at_ints(name: str, sched: Callable,
                                      formula: Callable[[int], float]) -> None:
    for k in COUNTS:
        value = sched(k)
        assert isinstance(value, float), (name, k, type(value))
        assert value == pytest.approx(formula(k), rel=1e-12, abs=1e-15), (name, k)


@pytest.mark.parametrize("name,sched,formula", _closed_forms(),
                         ids=[c[0] for c in _closed_forms()])
def test_schedule_at_0d_int64_tensor(name: str, sched: Callable,
                                     formula: Callable[[int], float]) -> None:
    for k in COUNTS:
        value = sched(torch.tensor(k, dtype=torch.int64))
        assert isinstance(value, torch.Tensor), (name, k)
        assert value.shape == () and value.is_floating_point()
        assert float(value) == pytest.approx(sched(k), rel=1e-12, abs=1e-15), (name, k)
        assert float(value) == pytest.approx(formula(k), rel=1e-12, abs=1e-15), (name, k)


def test_warmup_cosine_endpoints() -> None:
    s = schedules.warmup_cosine(1e-3, warmup_steps=10, total_steps=110)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(5e-4)
    assert s(110) == pytest.approx(0.0, abs=1e-18)
    assert s(1000) == pytest.approx(0.0, abs=1e-18)
    assert max(s(k) for k in range(200)) == pytest.approx(1e-3)
    s2 = schedules.warmup_cosine(2.0, 4, 20, init=0.5, end=0.25)
    assert s2(0) == pytest.approx(0.5)
    assert s2(4) == pytest.approx(2.0)
    assert s2(20) == pytest.approx(0.25)
    assert s2(500) == pytest.approx(0.25)
    for k in (0, 4, 20, 500):
        assert float(s2(torch.tensor(k))) == pytest.approx(s2(k))


def test_warmup_is_increasing_and_decay_decreasing() -> None:
    s = schedules.warmup_cosine(1.0, 20, 80)
    values = [s(k) for k in range(81)]
    assert all(a < b for a, b in itertools.pairwise(values[:21]))
    assert all(a > b for a, b in itertools.pairwise(values[20:]))


def test_join_boundaries() -> None:
    a, b, c = schedules.constant(1.0), schedules.linear(10.0, 20.0, 10), schedules.constant(3.0)
    s = schedules.join([a, b, c], [5, 15])
    # each piece sees the count since its own start
    assert s(0) == 1.0 and s(4) == 1.0
    assert s(5) == 10.0 and s(6) == 11.0 and s(14) == 19.0
    assert s(15) == 3.0 and s(1000) == 3.0
    for k in (0, 4, 5, 6, 14, 15, 1000):
        got = s(torch.tensor(k))
        assert isinstance(got, torch.Tensor) and float(got) == pytest.approx(s(k))
    # a schedule with no boundaries is the schedule itself
    single = schedules.join([b], [])
    assert single(3) == b(3)
    assert float(single(torch.tensor(3))) == pytest.approx(b(3))


def test_schedule_tensor_result_stays_on_count_device_and_differentiates_counts() -> None:
    s = schedules.cosine_decay(1.0, 10)
    values = torch.stack([s(torch.tensor(k)) for k in range(12)])
    assert values.device == torch.tensor(0).device
    assert torch.all(values[:-2] > values[1:-1])
    assert float(values[10]) == pytest.approx(0.0, abs=1e-15)
    assert float(values[11]) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("make", [
    lambda: schedules.linear(0.0, 1.0, steps=0),
    lambda: schedules.linear(0.0, 1.0, steps=-3),
    lambda: schedules.linear(0.0, 1.0, steps=2.5),
    lambda: schedules.cosine_decay(1.0, 0),
    lambda: schedules.cosine_decay(1.0, -10),
    lambda: schedules.step_decay(1.0, step_size=0),
    lambda: schedules.step_decay(1.0, step_size=1.5),
    lambda: schedules.warmup_cosine(1.0, 0, 100),
    lambda: schedules.warmup_cosine(1.0, 10, 10),
    lambda: schedules.warmup_cosine(1.0, 10, 5),
    lambda: schedules.join([schedules.constant(1.0), schedules.constant(2.0)], []),
    lambda: schedules.join([schedules.constant(1.0)], [10]),
    lambda: schedules.join([schedules.constant(1.0)] * 3, [20, 10]),
], ids=["linear_0", "linear_neg", "linear_float", "cosine_0", "cosine_neg", "step_0",
        "step_float", "warmup_0", "total_eq_warmup", "total_lt_warmup", "join_too_few",
        "join_too_many", "join_decreasing"])
def test_schedule_bad_arguments_raise_config_error(make: Callable) -> None:
    with pytest.raises(ft.ConfigError):
        make()


@pytest.mark.parametrize("impl", ["default", "foreach"])
def test_step_decay_lr_matches_torch_steplr(impl: str) -> None:
    ft_kw = {} if impl == "default" else {"foreach": True}
    torch_kw = {} if impl == "default" else {"foreach": True}
    init = initial_params()
    grads = random_grads(init, steps=30)
    sched = schedules.step_decay(0.1, step_size=7, gamma=0.5)
    got, state = run_ft(ft.optim.adam(sched, **ft_kw), init, grads)
    want = run_torch(lambda p: torch.optim.Adam(params_list(p), lr=0.1, **torch_kw), init,
                     grads, make_sched=lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5))
    assert_close(got, want)
    # a constant lr gives something else: the schedule really was followed
    const, _ = run_ft(ft.optim.adam(0.1, **ft_kw), init, grads)
    assert not torch.allclose(const["0.weight"], want["0.weight"], rtol=1e-3)
    torch.testing.assert_close(float(ft.optim.adam(sched).learning_rates(state)["adam"]),
                               0.1 * 0.5 ** (30 // 7))


def test_warmup_cosine_lr_matches_torch_lambdalr() -> None:
    init = initial_params()
    grads = random_grads(init, steps=40)
    sched = schedules.warmup_cosine(0.05, 5, 40, end=0.005)
    got, _ = run_ft(ft.optim.sgd(sched, momentum=0.9), init, grads)
    want = run_torch(
        lambda p: torch.optim.SGD(params_list(p), lr=0.05, momentum=0.9), init, grads,
        make_sched=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: sched(k) / 0.05))
    assert_close(got, want)


def test_learning_rates_reads_count_per_group() -> None:
    sched = schedules.linear(0.0, 1.0, steps=4)
    opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0),
                         ft.optim.sgd(sched, groups={"*.bias": {"lr": 0.01}}))
    init = initial_params()
    _, state = run_ft(opt, init, random_grads(init, steps=3))
    lrs = opt.learning_rates(state)
    assert set(lrs) == {"sgd", "sgd/*.bias"}
    assert float(lrs["sgd"]) == pytest.approx(0.75)
    assert float(lrs["sgd/*.bias"]) == pytest.approx(0.01)


# -- chain and clipping --------------------------------------------------------------------

@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_clip_then_sgd_matches_torch(impl: str) -> None:
    ft_impl, torch_impl = IMPLS[impl]
    init = initial_params()
    # scale 3: most steps are clipped, a few small ones are not
    grads = random_grads(init, scale=3.0)
    for g in grads[::5]:
        for n in g:
            g[n] = g[n] * 0.01
    max_norm = 2.0
    opt = ft.optim.chain(ft.optim.clip_grad_norm(max_norm),
                         ft.optim.sgd(0.05, momentum=0.9, **ft_impl))
    got, _ = run_ft(opt, init, grads)
    want = run_torch(lambda p: torch.optim.SGD(params_list(p), lr=0.05, momentum=0.9,
                                               **torch_impl), init, grads, clip=max_norm)
    assert_equal(got, want)
    unclipped, _ = run_ft(ft.optim.sgd(0.05, momentum=0.9, **ft_impl), init, grads)
    assert not torch.allclose(unclipped["0.weight"], got["0.weight"])


def test_clip_grad_norm_scales_grads_in_place() -> None:
    clip = ft.optim.clip_grad_norm(1.0)
    opt = ft.optim.chain(clip)
    w = torch.zeros(4, requires_grad=True)
    v = torch.zeros(3, requires_grad=True)
    state = opt.init({"w": w.detach(), "v": v.detach()})
    w.grad = torch.full((4,), 3.0)
    v.grad = None  # no gradient: ignored
    with torch.no_grad():
        opt.update({"w": w, "v": v}, state)
    torch.testing.assert_close(w.grad.norm(), torch.tensor(1.0))
    assert v.grad is None
    w.grad = torch.full((4,), 0.1)  # under the limit: unchanged
    with torch.no_grad():
        opt.update({"w": w, "v": v}, state)
    assert torch.equal(w.grad, torch.full((4,), 0.1))
    assert int(state["count"]) == 2


def test_chain_flattens_optimizers_and_rejects_other_things() -> None:
    inner = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.adamw(1e-3))
    outer = ft.optim.chain(inner)
    assert outer.keys == ("clip_grad_norm", "adamw")
    with pytest.raises(ft.ConfigError):
        ft.optim.chain(ft.optim.sgd(0.1), "not a transform")
    with pytest.raises(ft.ConfigError):
        ft.optim.chain(torch.optim.SGD)


# -- parameter groups ----------------------------------------------------------------------

def _split_bias(params: Tensors) -> list[dict]:
    weights = [p for n, p in params.items() if not n.endswith(".bias")]
    biases = [p for n, p in params.items() if n.endswith(".bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def _is_bias(name: str) -> bool:
    return name.endswith(".bias")


@pytest.mark.parametrize("pattern", ["*.bias", _is_bias], ids=["glob", "callable"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_groups_match_torch_param_groups(pattern: object, impl: str) -> None:
    ft_impl, torch_impl = IMPLS[impl]
    init = initial_params()
    grads = random_grads(init)
    opt = ft.optim.adamw(1e-2, weight_decay=0.1, groups={pattern: {"weight_decay": 0.0}},
                         **ft_impl)
    got, _ = run_ft(opt, init, grads)
    want = run_torch(lambda p: torch.optim.AdamW(_split_bias(p), lr=1e-2, weight_decay=0.1,
                                                 **torch_impl), init, grads)
    assert_equal(got, want)
    # the group mattered: decaying the biases too gives something else
    all_wd, _ = run_ft(ft.optim.adamw(1e-2, weight_decay=0.1, **ft_impl), init, grads)
    assert torch.equal(all_wd["0.weight"], got["0.weight"])
    assert not torch.equal(all_wd["0.bias"], got["0.bias"])


def test_adamw_groups_default_impl_matches_torch_default() -> None:
    init = initial_params()
    grads = random_grads(init)
    got, _ = run_ft(ft.optim.adamw(1e-2, weight_decay=0.1,
                                   groups={"*.bias": {"weight_decay": 0.0}}), init, grads)
    want = run_torch(lambda p: torch.optim.AdamW(_split_bias(p), lr=1e-2, weight_decay=0.1),
                     init, grads)
    assert_close(got, want)


def test_sgd_group_lr_and_momentum_match_torch() -> None:
    init = initial_params()
    grads = random_grads(init)
    opt = ft.optim.sgd(0.05, momentum=0.9, groups={"2.*": {"lr": 0.01, "momentum": 0.0}},
                       fused=True)
    got, _ = run_ft(opt, init, grads)

    def make(p: Tensors) -> torch.optim.Optimizer:
        first = [t for n, t in p.items() if n.startswith("0.")]
        last = [t for n, t in p.items() if n.startswith("2.")]
        return torch.optim.SGD([{"params": first},
                                {"params": last, "lr": 0.01, "momentum": 0.0}],
                               lr=0.05, momentum=0.9, fused=True)

    want = run_torch(make, init, grads)
    assert_equal(got, want)


def test_sgd_group_enables_momentum_and_nesterov_over_plain_base() -> None:
    init = initial_params()
    grads = random_grads(init)
    opt = ft.optim.sgd(0.05, groups={"0.*": {"momentum": 0.9, "nesterov": True}},
                       foreach=True)
    got, state = run_ft(opt, init, grads)
    assert set(state["sgd"]["momentum_buffer"]) == set(init)

    def make(p: Tensors) -> torch.optim.Optimizer:
        first = [t for n, t in p.items() if n.startswith("0.")]
        last = [t for n, t in p.items() if n.startswith("2.")]
        return torch.optim.SGD([{"params": first, "momentum": 0.9, "nesterov": True},
                                {"params": last}], lr=0.05, foreach=True)

    assert_equal(got, run_torch(make, init, grads))


def test_first_matching_group_wins() -> None:
    init = initial_params()
    grads = random_grads(init, steps=10)
    opt = ft.optim.sgd(0.1, groups={"0.bias": {"lr": 0.0}, "*.bias": {"lr": 0.05}})
    got, _ = run_ft(opt, init, grads)
    assert torch.equal(got["0.bias"], init["0.bias"])  # lr 0 from the first pattern
    assert not torch.equal(got["2.bias"], init["2.bias"])
    assert_close({"2.bias": got["2.bias"]},
                 {"2.bias": init["2.bias"] - 0.05 * sum(g["2.bias"] for g in grads)})
    assert_close({"0.weight": got["0.weight"]},
                 {"0.weight": init["0.weight"] - 0.1 * sum(g["0.weight"] for g in grads)})


@pytest.mark.parametrize("make", [
    lambda pat: ft.optim.adamw(1e-3, weight_decay=0.1, groups={pat: {"weight_decay": 0.0}}),
    lambda pat: ft.optim.adam(1e-3, groups={pat: {"lr": 1e-4}}),
    lambda pat: ft.optim.sgd(0.1, groups={pat: {"lr": 0.01}}),
], ids=["adamw", "adam", "sgd"])
def test_group_pattern_matching_nothing_names_pattern_and_params(make: Callable) -> None:
    opt = make("*.gamma")
    with pytest.raises(ft.ConfigError) as info:
        opt.init(initial_params())
    msg = str(info.value)
    assert "*.gamma" in msg
    for name in initial_params():
        assert name in msg


def test_group_callable_matching_nothing_is_named() -> None:
    def is_embedding(name: str) -> bool:
        return name.startswith("embed")

    opt = ft.optim.adamw(1e-3, groups={is_embedding: {"weight_decay": 0.0}})
    with pytest.raises(ft.ConfigError, match="is_embedding") as info:
        opt.init(initial_params())
    assert "0.weight" in str(info.value)


def test_group_pattern_shadowed_by_earlier_pattern_raises() -> None:
    opt = ft.optim.sgd(0.1, groups={"*.bias": {"lr": 0.0}, "0.bias": {"lr": 0.5}})
    with pytest.raises(ft.ConfigError, match=r"0\.bias"):
        opt.init(initial_params())


def test_group_pattern_matching_only_frozen_params_raises() -> None:
    model = make_model()
    model[0].bias.requires_grad_(False)
    opt = ft.optim.adamw(1e-3, groups={"0.bias": {"weight_decay": 0.0}})
    with pytest.raises(ft.ConfigError, match=r"0\.bias"):
        ft.TrainState.create(model, opt)


@pytest.mark.parametrize("make", [
    lambda: ft.optim.adamw(1e-3, groups={"*.bias": {"weight_decai": 0.0}}),
    lambda: ft.optim.adam(1e-3, groups={"*.bias": {"momentum": 0.9}}),
    lambda: ft.optim.sgd(0.1, groups={"*.bias": {"betas": (0.9, 0.99)}}),
], ids=["adamw_typo", "adam_momentum", "sgd_betas"])
def test_group_unknown_setting_raises(make: Callable) -> None:
    with pytest.raises(ft.ConfigError) as info:
        make()
    msg = str(info.value)
    assert "*.bias" in msg
    assert any(k in msg for k in ("weight_decai", "momentum", "betas"))


def test_group_bad_pattern_type_and_bad_group_lr_raise() -> None:
    with pytest.raises(ft.ConfigError):
        ft.optim.sgd(0.1, groups={3: {"lr": 0.1}})
    with pytest.raises(ft.ConfigError):
        ft.optim.adamw(1e-3, groups={"*.bias": {"lr": -1.0}})


# A group's settings are checked like the optimizer's own: a bad value in a group must be
# a ConfigError when the optimizer is built, not a silently wrong (or diverging) update.
@pytest.mark.parametrize("make", [
    lambda: ft.optim.sgd(0.1, groups={"*.bias": {"lr": -0.5}}),
    lambda: ft.optim.sgd(0.1, groups={"*.bias": {"nesterov": True}}),
    lambda: ft.optim.sgd(0.1, momentum=0.9, groups={"*.bias": {"momentum": -0.5}}),
    lambda: ft.optim.sgd(0.1, groups={"*.bias": {"weight_decay": -1.0}}),
    lambda: ft.optim.adam(1e-3, groups={"*.bias": {"betas": (1.5, 0.9)}}),
    lambda: ft.optim.adam(1e-3, groups={"*.bias": {"eps": -1.0}}),
    lambda: ft.optim.adamw(1e-3, groups={"*.bias": {"weight_decay": -1.0}}),
], ids=["sgd_group_neg_lr", "sgd_group_nesterov_no_momentum", "sgd_group_neg_momentum",
        "sgd_group_neg_wd", "adam_group_bad_betas", "adam_group_neg_eps",
        "adamw_group_neg_wd"])
def test_group_setting_values_are_validated_like_base(make: Callable) -> None:
    with pytest.raises(ft.ConfigError):
        make()


# -- error paths ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: ft.optim.sgd(-0.1),
    lambda: ft.optim.adam(-1e-3),
    lambda: ft.optim.adamw(-1e-3),
    lambda: ft.optim.sgd("0.1"),
    lambda: ft.optim.adam(True),
    lambda: ft.optim.adam(1e-3, betas=(0.9,)),
    lambda: ft.optim.adam(1e-3, betas=(1.0, 0.999)),
    lambda: ft.optim.adamw(1e-3, betas=(0.9, 1.5)),
    lambda: ft.optim.adamw(1e-3, betas=(-0.1, 0.999)),
    lambda: ft.optim.adam(1e-3, betas=0.9),
    lambda: ft.optim.adam(1e-3, eps=-1e-8),
    lambda: ft.optim.adam(1e-3, weight_decay=-0.1),
    lambda: ft.optim.adamw(1e-3, weight_decay=-0.1),
    lambda: ft.optim.sgd(0.1, nesterov=True),
    lambda: ft.optim.sgd(0.1, momentum=0.0, nesterov=True),
    lambda: ft.optim.sgd(0.1, momentum=-0.5),
    lambda: ft.optim.sgd(0.1, weight_decay=-1.0),
    lambda: ft.optim.clip_grad_norm(0.0),
    lambda: ft.optim.clip_grad_norm(-1.0),
    lambda: ft.optim.clip_grad_norm(float("nan")),
], ids=["sgd_neg_lr", "adam_neg_lr", "adamw_neg_lr", "sgd_str_lr", "adam_bool_lr",
        "betas_len1", "beta1_eq_1", "beta2_gt_1", "beta1_neg", "betas_scalar", "eps_neg",
        "adam_wd_neg", "adamw_wd_neg", "nesterov_no_momentum", "nesterov_zero_momentum",
        "momentum_neg", "sgd_wd_neg", "clip_zero", "clip_neg", "clip_nan"])
def test_bad_optimizer_arguments_raise_config_error(make: Callable) -> None:
    with pytest.raises(ft.ConfigError):
        make()


def test_config_error_is_an_ftrain_value_error() -> None:
    with pytest.raises(ValueError, match="lr"):
        ft.optim.sgd(-1.0)
    with pytest.raises(ft.FTrainError, match="nesterov"):
        ft.optim.sgd(0.1, nesterov=True)
    with pytest.raises(ft.ConfigError, match="max_norm"):
        ft.optim.clip_grad_norm(0)


def test_zero_lr_and_schedule_lr_are_accepted() -> None:
    init = initial_params()
    got, state = run_ft(ft.optim.sgd(0), init, random_grads(init, steps=3))
    assert_equal(got, init)
    assert int(state["count"]) == 3
    ft.optim.adamw(schedules.constant(1e-3))
    ft.optim.sgd(lambda count: 0.1)


# -- frozen parameters ---------------------------------------------------------------------

@pytest.mark.parametrize("make_opt", [
    lambda: ft.optim.adam(1e-2, amsgrad=True),
    lambda: ft.optim.sgd(0.1, momentum=0.9),
    lambda: ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.adamw(1e-2)),
], ids=["adam", "sgd", "clip_adamw"])
def test_frozen_params_have_no_state_and_do_not_change(make_opt: Callable) -> None:
    model = make_model()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    frozen = {"0.weight", "0.bias"}
    trainable = {"2.weight", "2.bias"}
    ref = copy.deepcopy(model)
    opt = make_opt()
    state = ft.TrainState.create(model, opt)
    key = opt.keys[-1]
    sub = state.opt_state[key]
    per_param = [v for v in sub.values() if isinstance(v, dict)]
    assert per_param, sub
    for d in per_param:
        assert set(d) == trainable, (key, sorted(d))
    if "names" in sub:
        assert set(sub["names"]) == trainable
    assert set(state.params) == frozen | trainable  # still part of the state

    before = state.copy()
    step = ft.train_step(mse_loss)
    for batch in make_batches(5):
        state, _ = step(state, batch)
    for n in frozen:
        assert torch.equal(state.params[n], before.params[n]), n
    for n in trainable:
        assert not torch.equal(state.params[n], before.params[n]), n
    assert int(state.opt_state["count"]) == 5
    assert model[0].weight.requires_grad is False  # the user's module is untouched
    assert torch.equal(model[2].weight.detach(), ref[2].weight.detach())


def test_frozen_params_train_like_torch_on_trainable_only() -> None:
    model = make_model()
    model[2].bias.requires_grad_(False)
    ref = copy.deepcopy(model)
    state = ft.TrainState.create(model, ft.optim.adamw(1e-2, fused=True))
    step = ft.train_step(mse_loss)
    topt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2,
                             fused=True)
    for batch in make_batches() * 2:
        state, _ = step(state, batch)
        topt.zero_grad()
        mse_loss(ref, batch).backward()
        topt.step()
    assert_equal(dict(state.params), {n: p.detach() for n, p in ref.named_parameters()})


# -- on a GPU (skipped on CPU-only machines) -----------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["adam", "sgd"])
def test_schedule_lr_with_default_fused_kernel_on_cuda(which: str) -> None:
    # schedules return float64 tensors; CUDA's fused kernels read a tensor lr as float32
    init = {n: t.cuda() for n, t in initial_params().items()}
    grads = [{n: t.cuda() for n, t in g.items()} for g in random_grads(init, steps=20)]
    sched = schedules.step_decay(0.1, step_size=7, gamma=0.5)
    if which == "adam":
        opt, cls, kw = ft.optim.adam(sched), torch.optim.Adam, {}
    else:
        opt, cls, kw = ft.optim.sgd(sched, momentum=0.9), torch.optim.SGD, {"momentum": 0.9}
    got, state = run_ft(opt, init, grads)
    want = run_torch(lambda p: cls(params_list(p), lr=0.1, fused=True, **kw), init, grads,
                     make_sched=lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5))
    assert state["count"].device.type == "cuda"
    assert_close(got, want)


# -- defects found against torch's own optimizer tests (issue 13) -----------------------------

def test_adamw_schedule_single_tensor_keeps_0d_float32_params_in_float32() -> None:
    init = {"scale": torch.tensor(0.75), **initial_params()}
    grads = random_grads(init, steps=10)
    sched = schedules.warmup_cosine(1e-2, 3, 10)
    got, _ = run_ft(ft.optim.adamw(sched, weight_decay=0.1, fused=False, foreach=False),
                    init, grads)
    want = run_torch(lambda p: torch.optim.AdamW(params_list(p), lr=1.0, weight_decay=0.1,
                                                 foreach=False), init, grads,
                     make_sched=lambda o: torch.optim.lr_scheduler.LambdaLR(
                         o, lambda k: float(sched(k))))
    assert got["scale"].dtype == torch.float32
    assert_equal(got, want)


@pytest.mark.parametrize("make", [ft.optim.adam, ft.optim.adamw, ft.optim.sgd])
def test_fused_and_foreach_together_is_a_config_error_naming_both(make: Callable) -> None:
    with pytest.raises(ft.ConfigError, match=r"fused=True and foreach=True"):
        make(0.1, fused=True, foreach=True)


@pytest.mark.parametrize("make_opt", [
    lambda: ft.optim.adamw(1e-2, weight_decay=0.1),
    lambda: ft.optim.adam(1e-2, weight_decay=0.05, amsgrad=True),
    lambda: ft.optim.chain(ft.optim.clip_grad_norm(0.5),
                           ft.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
], ids=["adamw", "adam_amsgrad", "clip_sgd"])
def test_population_update_of_one_member_equals_the_eager_update(make_opt: Callable) -> None:
    """The population path (stacked tensors, `members=True`) runs the same update function
    as the eager one: with shared settings, one member's numbers are the eager ones."""
    init = initial_params()
    grads = random_grads(init, steps=10)
    want, want_state = run_ft(make_opt(), init, grads)
    opt = make_opt()
    params = {n: t.clone().unsqueeze(0) for n, t in init.items()}
    state = opt.init({n: t[0] for n, t in params.items()})
    state = {k: ({kk: {n: t.unsqueeze(0) for n, t in vv.items()} if isinstance(vv, dict)
                  else vv for kk, vv in v.items()} if isinstance(v, dict)
                 else v.unsqueeze(0)) for k, v in state.items()}
    for g in grads:
        opt.apply_gradients(params, {n: t.clone().unsqueeze(0) for n, t in g.items()}, state,
                            members=True, lockstep=True)
    assert_equal({n: t[0] for n, t in params.items()}, want)
    assert int(state["count"][0]) == int(want_state["count"]) == 10


def test_population_update_with_per_member_lr_follows_each_members_eager_update() -> None:
    init = initial_params()
    grads = random_grads(init, steps=10)
    lrs = [1e-3, 3e-2]
    opt = ft.optim.adamw(1e-3, weight_decay=0.1)
    params = {n: torch.stack([t, t]) for n, t in init.items()}
    one = opt.init(init)
    state = {"count": torch.zeros(2, dtype=torch.int64),
             "adamw": {k: {n: torch.stack([t, t]) for n, t in v.items()}
                       for k, v in one["adamw"].items()}}
    for g in grads:
        opt.apply_gradients(params, {n: torch.stack([t, t]) for n, t in g.items()}, state,
                            settings={"lr": torch.tensor(lrs, dtype=torch.float64)},
                            members=True, lockstep=True)
    for i, lr in enumerate(lrs):
        want, _ = run_ft(ft.optim.adamw(lr, weight_decay=0.1), init, grads)
        assert_close({n: t[i] for n, t in params.items()}, want)


# -- maximize, dampening and clip_grad_value (issue 15) ---------------------------------------

@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("cfg", [{"maximize": True}, {"momentum": 0.9, "dampening": 0.3},
                                 {"momentum": 0.8, "dampening": 0.5, "maximize": True,
                                  "weight_decay": 1e-2}])
def test_sgd_maximize_and_dampening_bitwise(cfg: dict, impl: str) -> None:
    init, grads = initial_params(), random_grads(initial_params(), steps=20)
    ft_kw, torch_kw = IMPLS[impl]
    got, _ = run_ft(ft.optim.sgd(0.05, **cfg, **ft_kw), init, grads)
    want = run_torch(lambda ps: torch.optim.SGD(params_list(ps), lr=0.05, **cfg, **torch_kw),
                     init, grads)
    assert_equal(got, want)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_maximize_bitwise(name: str, impl: str) -> None:
    init, grads = initial_params(), random_grads(initial_params(), steps=20)
    ft_kw, torch_kw = IMPLS[impl]
    got, _ = run_ft(getattr(ft.optim, name)(1e-2, weight_decay=0.05, maximize=True, **ft_kw),
                    init, grads)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    want = run_torch(lambda ps: cls(params_list(ps), lr=1e-2, weight_decay=0.05, maximize=True,
                                    **torch_kw), init, grads)
    assert_equal(got, want)
    assert_moved(init, got)


def _fit_vs_torch(ft_opt, torch_opt, steps: int = 12, clip_value: float | None = None):
    """A bound loop (prepared update) and direct calls, against a torch hand loop."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 5, generator=gen), torch.randn(6, 3, generator=gen))
            for _ in range(steps)]

    def loss(model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    reference = make_model()
    opt = torch_opt(reference.parameters())
    for batch in data:
        opt.zero_grad()
        loss(reference, batch).backward()
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(reference.parameters(), clip_value)
        opt.step()
    step = ft.train_step(loss)
    state = ft.TrainState.create(make_model(), ft_opt)
    state = ft.fit(step, state, data[: steps // 2], epochs=1, logger=False, checkpoint=False,
                   progress=False)
    for batch in data[steps // 2:]:
        state, _ = step(state, batch)
    assert_equal(state.params, {n: p.detach() for n, p in reference.named_parameters()})


def test_dampening_and_maximize_in_a_loop_match_torch() -> None:
    # ftrain's default kernel on CPU is the fused one (torch's default is the for-loop)
    _fit_vs_torch(ft.optim.sgd(0.05, momentum=0.9, dampening=0.5, maximize=True),
                  lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.5,
                                             maximize=True, fused=True))
    _fit_vs_torch(ft.optim.sgd(0.05, momentum=0.9, maximize=True),
                  lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, maximize=True,
                                             fused=True))
    _fit_vs_torch(ft.optim.adamw(1e-2, maximize=True),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, maximize=True, fused=True))


@pytest.mark.parametrize("value", [0.01, 0.3])
def test_clip_grad_value_chain_matches_torch_clip_grad_value(value: float) -> None:
    _fit_vs_torch(ft.optim.chain(ft.optim.clip_grad_value(value), ft.optim.adam(1e-2)),
                  lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), clip_value=value)


def test_clip_grad_value_clamps_in_place_like_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen) * 3 for _ in range(2)]
    ours = [g.clone() for g in grads]
    ft.optim.updates.clip_grad_value_update(ours, 1.5)
    params = [torch.zeros(4, 3, requires_grad=True) for _ in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(params, 1.5)
    assert all(torch.equal(a, p.grad) for a, p in zip(ours, params))
    assert max(float(g.abs().max()) for g in ours) == 1.5


def test_clip_grad_value_in_a_compiled_step_is_captured() -> None:
    opt = ft.optim.chain(ft.optim.clip_grad_value(0.1), ft.optim.sgd(0.1))
    w = torch.ones(3)
    state = opt.init({"w": w})
    opt.update_capturable({"w": w}, {"w": torch.tensor([5.0, -0.05, -2.0])}, state)
    assert torch.allclose(w, torch.tensor([0.99, 1.005, 1.01]))


def test_maximize_dampening_clip_value_bad_arguments() -> None:
    with pytest.raises(ft.ConfigError, match="clip_value must be a number > 0"):
        ft.optim.clip_grad_value(0)
    with pytest.raises(ft.ConfigError, match="maximize must be True or False"):
        ft.optim.adam(1e-3, maximize="yes")
    with pytest.raises(ft.ConfigError, match="dampening must be a number >= 0"):
        ft.optim.sgd(0.1, momentum=0.9, dampening=-0.1)
    with pytest.raises(ft.ConfigError, match="nesterov=True needs dampening=0"):
        ft.optim.sgd(0.1, momentum=0.9, nesterov=True, dampening=0.1)


def test_sgd_dampening_state_and_compile_fallback() -> None:
    opt = ft.optim.sgd(0.1, momentum=0.9, dampening=0.2)
    state = ft.TrainState.create(make_model(), opt)
    started = state.opt_state["sgd"]["started"]
    assert sorted(started) == sorted(state.params) and not any(bool(v) for v in started.values())
    assert not hasattr(opt.transforms[0], "apply_capturable")  # ft.compile runs it eagerly
    assert hasattr(ft.optim.sgd(0.1, momentum=0.9).transforms[0], "apply_capturable")


# -- ft.optim.learning_rates (issue 15) -------------------------------------------------------

class ListLogger:
    """A logger (the protocol's three methods) keeping what it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, hparams: dict, metrics: dict) -> None:
        pass

    def finalize(self) -> None:
        pass


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _data(n: int = 6):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen))
            for _ in range(n)]


def test_learning_rates_by_group_are_the_next_updates_floats() -> None:
    sched = schedules.linear(0.0, 0.1, steps=4)
    opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0),
                         ft.optim.sgd(sched, groups={"*bias": {"lr": 0.01}}))
    state = ft.TrainState.create(make_model(), opt)
    assert ft.optim.learning_rates(state) == {"sgd": 0.0, "sgd/*bias": 0.01}
    seen = []
    for s, _ in ft.iterate(ft.train_step(_mse), state, _data(3), epochs=1):
        seen.append(ft.optim.learning_rates(s))
    assert [r["sgd"] for r in seen] == [sched(k) for k in (1, 2, 3)]
    assert all(type(v) is float for r in seen for v in r.values())


def test_learning_rates_of_several_models_are_prefixed() -> None:
    state = ft.TrainState.create(
        {"G": make_model(), "D": make_model(1), "frozen": make_model(2)},
        {"G": ft.optim.adam(1e-3), "D": ft.optim.from_torch(torch.optim.Adagrad, lr=0.1)})
    assert ft.optim.learning_rates(state) == {"G/adam": 1e-3, "D/adagrad": 0.1}
    assert ft.optim.learning_rates(ft.TrainState.create(make_model())) == {}


def test_log_lr_logs_the_numbers_learning_rates_gives() -> None:
    for opt, key in [(ft.optim.adamw(schedules.linear(0.0, 0.1, steps=5)), "lr"),
                     (ft.optim.from_torch(torch.optim.RMSprop,
                                          lr=schedules.step_decay(0.1, 2, 0.5),
                                          groups={"*bias": {"lr": 0.02}}), "lr/rmsprop")]:
        logger = ListLogger()
        step = ft.with_logging(ft.train_step(_mse), [logger], every_n_steps=1, log_lr=True)
        expected = []
        state = ft.TrainState.create(make_model(), opt)
        for s, _ in ft.iterate(step, state, _data(5), epochs=1):
            expected.append(ft.optim.learning_rates(s))
        logged = [m for _, m in logger.rows if key in m]
        assert len(logged) == 5
        # a step's row shows what learning_rates says of the state that step returned
        for row, want in zip(logged, expected):
            got = {k: v for k, v in row.items() if k.startswith("lr")}
            assert got == ({"lr": next(iter(want.values()))} if len(want) == 1
                           else {f"lr/{k}": v for k, v in want.items()})


# -- schedules in epochs (issue 15) -----------------------------------------------------------

def test_per_epoch_schedule_uses_the_loops_epoch_length() -> None:
    sched = schedules.per_epoch(schedules.step_decay(0.1, step_size=1, gamma=0.5))
    for limit, per in ((None, 4), (3, 3)):
        state = ft.TrainState.create(make_model(), ft.optim.adam(sched))
        seen = [ft.optim.learning_rates(s)["adam"] for s, _ in ft.iterate(
            ft.train_step(_mse), state, _data(4), epochs=3, limit_train_batches=limit)]
        assert seen == [0.1 * 0.5 ** (k // per) for k in range(1, 3 * per + 1)]


def test_per_epoch_schedule_follows_the_loops_epoch_not_the_update_count() -> None:
    # a skipped update (non-finite loss) does not advance the update count; the epoch
    # boundaries must not move with it
    sched = schedules.per_epoch(schedules.step_decay(1.0, step_size=1, gamma=0.5))
    data = _data(4)
    data[1] = (torch.full_like(data[1][0], float("nan")), data[1][1])
    used: list[float] = []

    def loss_fn(model, batch):
        used.append(sched(0))  # in the step: what this update's lr reads (any count)
        return _mse(model, batch)
    state = ft.TrainState.create(make_model(), ft.optim.sgd(sched))
    for _ in ft.iterate(ft.train_step(loss_fn, on_nonfinite="skip"), state, data, epochs=3):
        pass
    assert used == [1.0] * 4 + [0.5] * 4 + [0.25] * 4


def test_compile_refuses_a_per_epoch_schedule() -> None:
    sched = schedules.per_epoch(schedules.step_decay(1.0, step_size=1, gamma=0.5))
    state = ft.TrainState.create(make_model(), ft.optim.sgd(sched))
    with pytest.raises(ft.ConfigError, match="does not support schedules.per_epoch"):
        for _ in ft.iterate(ft.compile(ft.train_step(_mse)), state, _data(2), epochs=1):
            pass


def test_per_epoch_schedule_outside_a_loop_needs_steps_per_epoch() -> None:
    opt = ft.optim.sgd(schedules.per_epoch(schedules.step_decay(0.1, 1, 0.5)))
    state = ft.TrainState.create(make_model(), opt)
    with pytest.raises(ft.ConfigError, match="steps_per_epoch="):
        ft.train_step(_mse)(state, _data(1)[0])
    given = schedules.per_epoch(schedules.step_decay(0.1, 1, 0.5), steps_per_epoch=2)
    assert [given(k) for k in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert float(given(torch.tensor(4))) == 0.025
    with pytest.raises(ft.ConfigError, match="steps_per_epoch must be a positive int"):
        schedules.per_epoch(schedules.constant(0.1), steps_per_epoch=0)


_DDP_EPOCH_SCRIPT = '''
import json, os, sys
import torch
import ftrain as ft
from ftrain.optim import schedules

g = torch.Generator().manual_seed(0)
data = [(torch.randn(2, 5, generator=g), torch.randn(2, 3, generator=g)) for _ in range(8)]
model = torch.nn.Linear(5, 3)
sched = schedules.per_epoch(schedules.step_decay(0.1, step_size=1, gamma=0.5))
state = ft.TrainState.create(model, ft.optim.sgd(sched))
step = ft.with_ddp(ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])))
seen = [ft.optim.learning_rates(s)["sgd"] for s, _ in ft.iterate(step, state, data, epochs=2)]
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
'''


@pytest.mark.slow
def test_per_epoch_schedule_under_ddp_counts_each_ranks_share(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "epoch_lr.py"
    script.write_text(_DDP_EPOCH_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # 8 batches, 4 per rank: the lr halves every 4 updates, not every 8
        assert seen == [0.1 * 0.5 ** (k // 4) for k in range(1, 9)]
