"""Helpers for unit-testing your own steps: purity, overfitting one batch, gradients.

Examples:
    >>> import torch, ftrain as ft
    >>> from ftrain import testing
    >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.adam(0.05))
    >>> x = torch.randn(16, 3)
    >>> batch = (x, x.sum(1, keepdim=True))      # a target the model can fit
    >>> testing.assert_pure(step, state, batch)
    >>> final_loss = testing.assert_overfits(step, state, batch, below=1e-3, steps=500)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ftrain.core import bind as _bind
from ftrain.core.state import TrainState, parts
from ftrain.core.step import split_loss


def _snapshot(state: TrainState) -> dict[str, Any]:
    leaves, _ = pytree.tree_flatten_with_path(state)
    return {pytree.keystr(path): (leaf.detach().clone() if isinstance(leaf, torch.Tensor)
                                  else leaf) for path, leaf in leaves}


def assert_pure(step: Callable[[TrainState, Any], Any], state: TrainState, batch: Any) -> None:
    """Call `step(state, batch)` and check that no tensor or value of `state` changed.

    Compares every tensor bitwise (and every other leaf by equality) before and after, and
    also that the step counter and seed are unchanged. Raises `AssertionError` naming each
    changed field.
    """
    before = _snapshot(state)
    step_before, seed_before = state.step, state.seed
    step(state, batch)
    after = _snapshot(state)
    changed = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        else:
            same = a == b
        if not same:
            changed.append(key)
    if state.step != step_before or state.seed != seed_before:
        changed.append("step/seed")
    if changed:
        raise AssertionError(f"the step changed its input state: {changed}")


def assert_overfits(step: Callable[[TrainState, Any], Any], state: TrainState, batch: Any, *,
                    below: float, steps: int = 200) -> float:
    """Train on one batch until the loss falls below `below`; return the final loss.

    Raises `AssertionError` with the loss curve's start and end if it does not get there
    within `steps` steps: a model that cannot overfit one batch has a bug.
    """
    first = None
    loss = float("nan")
    for _ in range(steps):
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])  # host sync: a test helper
        first = loss if first is None else first
        if loss < below:
            return loss
    raise AssertionError(f"the loss did not fall below {below} within {steps} steps "
                         f"(first {first}, last {loss})")


def assert_gradients(loss_fn: Callable[[Any, Any], Any], state: TrainState, batch: Any, *,
                     eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3) -> None:
    """Check `loss_fn`'s autograd gradients against finite differences (in float64).

    Uses `torch.autograd.gradcheck` over the trainable parameters, with the model in eval
    mode (no dropout) and float64 copies of the state and of floating-point batch tensors.
    For small models: the cost grows with the number of parameters.
    """
    def to64(x: Any) -> Any:
        return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() \
            else x
    params = pytree.tree_map(to64, state.params)
    buffers = pytree.tree_map(to64, state.buffers)
    batch64 = pytree.tree_map(to64, batch)
    names: list[tuple[Any, str]] = []
    inputs: list[torch.Tensor] = []
    for part, template, _, p, _, _ in parts(state):
        for name in p:
            if template.get_parameter(name).requires_grad:
                names.append((part, name))
                source = params if part is None else params[part]
                inputs.append(source[name].clone().requires_grad_(True))
    if not inputs:
        raise AssertionError("the state has no trainable parameters to check")
    double_state = state.replace(params=params, buffers=buffers)

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        current = pytree.tree_map(lambda x: x, params)
        for (part, name), t in zip(names, tensors):
            (current if part is None else current[part])[name] = t
        out = _bind.pure_call(double_state, loss_fn, batch64, current, buffers, False)
        return split_loss(out, "gradient check")[0]

    try:
        torch.autograd.gradcheck(f, tuple(inputs), eps=eps, atol=atol, rtol=rtol,
                                 raise_exception=True)
    except RuntimeError as err:
        raise AssertionError(f"gradients disagree with finite differences: {err}") from err
