"""`ft.unroll` and `ft.apply` (issue 17, part 4): k training steps kept in one autograd
graph; meta-gradients with respect to the initial parameters and to learning rates."""

from __future__ import annotations

import pytest
import torch
from helpers import tensors_equal
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import ftrain as ft


def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1])


def net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def data(dtype: torch.dtype = torch.float32, n: int = 4) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=g, dtype=dtype),
             torch.randn(6, 1, generator=g, dtype=dtype)) for _ in range(n)]


def assert_unroll_is_the_loop(state: ft.TrainState, n: int, rtol: float) -> None:
    """n unrolled steps give the params of n plain (torch-kernel) steps."""
    new = ft.unroll(ft.train_step(loss_fn), state, data(n=n))
    plain = state
    for batch in data(n=n):
        plain, _ = ft.train_step(loss_fn)(plain, batch)
    torch.testing.assert_close({k: v.detach() for k, v in new.params.items()}, plain.params,
                               rtol=rtol, atol=1e-6)


def leaves(state: ft.TrainState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in state.params.items()}


def hand_sgd(model, w0, batches, lr, momentum, wd):
    """The textbook unrolled SGD (torch.func; momentum buffers start at the gradient)."""
    w, bufs = dict(w0), {}
    for x, y in batches:
        loss = F.mse_loss(functional_call(model, w, (x,)), y)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        for (k, p), g in zip(list(w.items()), grads):
            g = g + wd * p
            bufs[k] = g if k not in bufs else momentum * bufs[k] + g
            w[k] = p - lr * bufs[k]
    return w


def hand_adamw(model, w0, batches, lr, b1, b2, eps, wd):
    w = dict(w0)
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    v2 = {k: torch.zeros_like(v) for k, v in w.items()}
    for t, (x, y) in enumerate(batches, 1):
        loss = F.mse_loss(functional_call(model, w, (x,)), y)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        for (k, p), g in zip(list(w.items()), grads):
            p = p * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1 ** t), v2[k] / (1 - b2 ** t)
            w[k] = p - lr * mhat / (vhat.sqrt() + eps)
    return w


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_meta_gradient_equals_a_hand_written_torch_func_unroll(kind: str) -> None:
    """3 inner steps, then a loss on a query batch: d/d(initial params) as the textbook
    torch.func computation (allclose 1e-6); the inner steps' values as ftrain's own
    loop step (torch's kernels), so the differentiable forms are the same updates."""
    model = net()
    opt = ft.optim.sgd(0.1, momentum=0.9, weight_decay=0.01) if kind == "sgd" else \
        ft.optim.adamw(0.01, weight_decay=0.1)
    state = ft.TrainState.create(model, opt, seed=2)
    inner, (xq, yq) = data(n=3), data(n=4)[3]
    w0 = leaves(state)
    new = ft.unroll(ft.train_step(loss_fn), state.replace(params=w0), inner)
    assert new.step == 3 and all(v.requires_grad for v in new.params.values())
    got = torch.autograd.grad(F.mse_loss(ft.apply(new, xq), yq), list(w0.values()))
    h0 = leaves(state)
    hand = hand_sgd(model, h0, inner, 0.1, 0.9, 0.01) if kind == "sgd" else \
        hand_adamw(model, h0, inner, 0.01, 0.9, 0.999, 1e-8, 0.1)
    want = torch.autograd.grad(F.mse_loss(functional_call(model, hand, (xq,)), yq),
                               list(h0.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    plain = state
    for batch in inner:  # the loop's kernels: the same numbers, without the graph
        plain, _ = ft.train_step(loss_fn)(plain, batch)
    torch.testing.assert_close({k: v.detach() for k, v in new.params.items()},
                               plain.params, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new.opt_state["count"], plain.opt_state["count"])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_learning_rate_gradient_matches_finite_differences(kind: str) -> None:
    """d(outer loss)/d(lr) of 3 steps (one lr, and MetaSGD's per-parameter tensors)
    against central differences, in float64."""
    model = net(torch.float64)
    opt = ft.optim.sgd(0.0, momentum=0.5) if kind == "sgd" else ft.optim.adam(0.0)
    state = ft.TrainState.create(model, opt)
    inner, (xq, yq) = data(torch.float64, 3), data(torch.float64)[3]
    step = ft.train_step(loss_fn)

    def outer(lr):
        new = ft.unroll(step, state, inner, lr=lr)
        return F.mse_loss(ft.apply(new, xq), yq)

    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(outer(lr), [lr])
    h = 1e-6
    numeric = (outer(torch.tensor(0.05 + h, dtype=torch.float64))
               - outer(torch.tensor(0.05 - h, dtype=torch.float64))) / (2 * h)
    assert grad.item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)
    per = {k: torch.full_like(v, 0.05).requires_grad_() for k, v in state.params.items()}
    grads = torch.autograd.grad(outer(per), list(per.values()))
    assert sum(g.sum() for g in grads).item() == pytest.approx(grad.item(), rel=1e-9)


def test_unroll_leaves_the_state_and_the_rng_as_they_were_and_draws_as_the_loop() -> None:
    """Dropout inside: unroll's numbers equal the loop-step's (same seed, step, rank);
    the given state is not changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    state = ft.TrainState.create(model, ft.optim.sgd(0.1), seed=4)
    before = state.copy()
    assert_unroll_is_the_loop(state, 2, rtol=1e-6)
    assert tensors_equal(state.params, before.params) and state.step == 0


def test_apply_and_multi_model_states() -> None:
    torch.manual_seed(0)
    state = ft.TrainState.create({"enc": nn.Linear(3, 4), "head": nn.Linear(4, 1)},
                                 {"enc": ft.optim.sgd(0.1), "head": ft.optim.adam(0.01)})

    def two(m, b):
        return F.mse_loss(m["head"](torch.tanh(m["enc"](b[0]))), b[1])

    lr = {"enc.weight": torch.tensor(0.2, requires_grad=True)}
    new = ft.unroll(ft.train_step(two), state, data(n=2), lr=lr)
    x, y = data(n=3)[2]
    out = F.mse_loss(ft.apply(new, torch.tanh(ft.apply(new, x, model="enc")), model="head"), y)
    (g,) = torch.autograd.grad(out, [lr["enc.weight"]])
    assert torch.isfinite(g) and g != 0
    with pytest.raises(ft.ConfigError, match=r"needs model=<one of them>, got None"):
        ft.apply(new, x)
    with pytest.raises(ft.ConfigError, match="this state holds one"):
        ft.apply(ft.TrainState.create(nn.Linear(3, 1)), x, model="enc")


def test_refusals_name_what_is_wrong() -> None:
    step = ft.train_step(loss_fn)
    state = ft.TrainState.create(net(), ft.optim.sgd(0.1))
    with pytest.raises(ft.ConfigError, match="'rmsprop' transform has no differentiable"):
        ft.unroll(step, ft.TrainState.create(net(), ft.optim.from_torch(
            torch.optim.RMSprop, lr=0.1)), data())
    with pytest.raises(ft.ConfigError, match="dampening has no differentiable form"):
        ft.unroll(step, ft.TrainState.create(net(), ft.optim.sgd(0.1, 0.9, dampening=0.1)),
                  data())
    with pytest.raises(ft.ConfigError, match="no layers around it"):
        ft.unroll(ft.with_logging(step, [], every_n_steps=1), state, data())
    with pytest.raises(ft.ConfigError, match=r"plain ft.train_step; this one has \['amp'\]"):
        ft.unroll(ft.with_amp(step, torch.bfloat16), state, data())
    with pytest.raises(ft.ConfigError, match=r"lr= names \['nope'\]"):
        ft.unroll(step, state, data(), lr={"nope": torch.tensor(0.1)})
    with pytest.raises(ft.ConfigError, match="lr must be a tensor or a dict"):
        ft.unroll(step, state, data(), lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match="needs an optimizer|has no optimizer"):
        ft.unroll(step, ft.TrainState.create(net()), data())


@pytest.mark.parametrize("opt", [
    lambda: ft.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda: ft.optim.adam(0.01, weight_decay=0.1, amsgrad=True, maximize=True),
    lambda: ft.optim.adamw(ft.optim.schedules.cosine_decay(0.05, 4)),
    lambda: ft.optim.chain(ft.optim.clip_grad_norm(0.1), ft.optim.sgd(0.2, momentum=0.5)),
], ids=["sgd-nesterov", "adam-amsgrad-l2-maximize", "adamw-schedule", "clip-sgd"])
def test_unrolled_values_are_the_loop_steps(opt) -> None:
    """The differentiable forms give torch's kernels' numbers, option by option."""
    assert_unroll_is_the_loop(ft.TrainState.create(net(), opt(), seed=1), 4, rtol=1e-5)


def test_float16_adam_matches_torch() -> None:
    """The root's clamp is taken in float32 for float16 (its own smallest normal, 6e-5,
    would have a root far over eps and shrink small updates)."""
    from ftrain.optim.differentiable import update
    p = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float16)
    g = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float16)
    opt = ft.optim.adam(1e-3)
    new, _ = update(opt, {"p": p}, {"p": g}, opt.init({"p": p}))
    ref = p.clone().requires_grad_()
    ref.grad = g.clone()
    torch.optim.Adam([ref], lr=1e-3).step()
    torch.testing.assert_close(new["p"], ref.detach(), rtol=1e-3, atol=1e-4)

