"""Learning rates by parameter group: read them (`learning_rates`) and set them
(`with_group_lrs`, for layers that control the lr, e.g. `ft.reduce_lr_on_plateau`).

A group's name is its optimizer transform's key, plus `/<pattern>` for a `groups=`
override (`"adamw"`, `"adamw/*bias"`), plus `<model>/` in front for a state of several
models (`"G/adam"`): the keys of `Optimizer.learning_rates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import torch

from ftrain.errors import ConfigError
from ftrain.optim._core import Groups, Optimizer, Pattern

if TYPE_CHECKING:
    from ftrain.core.state import TrainState


def _optimizers(state: Any) -> list[tuple[str | None, Any, Any]]:
    """(model name or None, optimizer, optimizer state) for each trained model."""
    if getattr(state, "multi", False):
        return [(part, state.optimizer[part], state.opt_state[part])
                for part in state.optimizer if state.optimizer[part] is not None]
    return [(None, state.optimizer, state.opt_state)] if state.optimizer is not None else []


def lr_values(state: TrainState) -> dict[str, Any]:
    """Each group's next learning rate, as the optimizer gives it: a float, or a 0-d device
    tensor for a schedule (no host read: `learning_rates` reads them).

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.optim.rates import lr_values
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> lr_values(state)
        {'sgd': 0.1}
    """
    out: dict[str, Any] = {}
    for part, opt, opt_state in _optimizers(state):
        reader = getattr(opt, "learning_rates", None)
        if reader is None:
            continue
        for key, lr in reader(opt_state).items():
            out[key if part is None else f"{part}/{key}"] = lr
    return out


def learning_rates(state: TrainState) -> dict[str, float]:
    """The learning rate each parameter group will use at its next update, by group name
    (a host read: one transfer for all groups; call it where the host looks anyway).

    Examples:
        >>> import torch, ftrain as ft
        >>> opt = ft.optim.adamw(ft.optim.schedules.linear(0.0, 1e-3, steps=10),
        ...                      groups={"bias": {"lr": 1e-4}})
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), opt)
        >>> ft.optim.learning_rates(state)
        {'adamw': 0.0, 'adamw/bias': 0.0001}
    """
    values = lr_values(state)
    tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return {k: float(v) for k, v in values.items()}
    host = torch.stack([v.detach().to(torch.float64).reshape(()).cpu()
                        if isinstance(v, torch.Tensor) else torch.tensor(float(v),
                                                                         dtype=torch.float64)
                        for v in values.values()]).tolist()  # host sync here
    return dict(zip(values, host))


def _grouped(optimizer: Any) -> list[tuple[int, str, Groups]]:
    """(position, key, groups) of each transform with parameter groups."""
    if not isinstance(optimizer, Optimizer):
        return []
    return [(i, key, t.groups) for i, (key, t) in enumerate(zip(optimizer.keys,
                                                                optimizer.transforms))
            if isinstance(getattr(t, "groups", None), Groups)]


def group_lrs(optimizer: Any) -> dict[str, Any]:
    """Each group's `lr` setting (a float or a schedule), by group name (no model prefix).

    Examples:
        >>> import ftrain as ft
        >>> from ftrain.optim.rates import group_lrs
        >>> group_lrs(ft.optim.sgd(0.1, groups={"*bias": {"momentum": 0.9}}))
        {'sgd': 0.1, 'sgd/*bias': 0.1}
    """
    out: dict[str, Any] = {}
    for _, key, groups in _grouped(optimizer):
        for i in range(len(groups.overrides) + 1):
            label = groups.label(i)
            out[key if label is None else f"{key}/{label}"] = groups.settings(i)["lr"]
    return out


def with_group_lrs(optimizer: Any, lrs: Mapping[str, Any]) -> Optimizer:
    """A new optimizer with the `lr` setting of the named groups replaced (floats or
    schedules); the others keep theirs. Unknown names are a ConfigError.

    Examples:
        >>> import ftrain as ft
        >>> from ftrain.optim.rates import group_lrs, with_group_lrs
        >>> opt = ft.optim.sgd(0.1, groups={"*bias": {"momentum": 0.9}})
        >>> group_lrs(with_group_lrs(opt, {"sgd/*bias": 0.01}))
        {'sgd': 0.1, 'sgd/*bias': 0.01}
    """
    known = group_lrs(optimizer)
    unknown = sorted(set(lrs) - set(known))
    if unknown:
        raise ConfigError(f"no parameter group {unknown} in this optimizer; its groups are "
                          f"{sorted(known)}")
    transforms = list(optimizer.transforms)
    for i, key, groups in _grouped(optimizer):
        mine: dict[str | None, Any] = {}
        for j in range(len(groups.overrides) + 1):
            label = groups.label(j)
            name = key if label is None else f"{key}/{label}"
            if name in lrs:
                mine[label] = lrs[name]
        if mine:
            transforms[i] = attrs.evolve(transforms[i], groups=_groups_with_lrs(groups, mine))
    return Optimizer(tuple(transforms))


def _groups_with_lrs(groups: Groups, lrs: Mapping[str | None, Any]) -> Groups:
    """`groups` with the lr of each labelled group set; an override group that inherited
    the base lr keeps the value it had."""
    base = dict(groups.base)
    if None in lrs:
        base["lr"] = lrs[None]
    overrides: dict[Pattern, dict[str, Any]] = {}
    for i, (pat, opts) in enumerate(groups.overrides):
        new = dict(opts)
        label = groups.label(i + 1)
        if label in lrs:
            new["lr"] = lrs[label]
        elif "lr" not in new and base["lr"] is not groups.base["lr"]:
            new["lr"] = groups.base["lr"]
        overrides[pat] = new
    return Groups.build(base, overrides)


@attrs.frozen
class Scaled:
    """A schedule times a factor, floored at `min_lr` (a scaled schedule stays a schedule:
    a device count gives a device value, no host read).

    Examples:
        >>> import torch
        >>> from ftrain.optim import schedules
        >>> from ftrain.optim.rates import Scaled
        >>> s = Scaled(schedules.constant(1.0), 0.1, 0.0)
        >>> s(3), float(s(torch.tensor(3)))
        (0.1, 0.1)
    """

    schedule: Any
    scale: float
    min_lr: float = 0.0

    def __call__(self, count: Any) -> Any:
        value = self.schedule(count) * self.scale
        if isinstance(value, torch.Tensor):
            return value.clamp(min=self.min_lr)
        return max(value, self.min_lr)
