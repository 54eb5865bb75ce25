"""A population's optimizer record: the members' shared optimizer and the hyperparameters
each member has of its own (validated, inferred from states, stored as device tensors)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch

from ftrain.core.state import TrainState
from ftrain.errors import ConfigError
from ftrain.optim import Optimizer

HPARAMS = "hparams"
# Hyperparameters a member may have of its own.
_KNOWN = ("lr", "weight_decay", "momentum", "eps", "betas")


def _member_settings(transform: Any) -> set[str]:
    """The settings of a transform that members may have of their own (its base ones)."""
    return set(getattr(transform, "settings", {}))


@attrs.frozen(eq=False)
class PopulationOptimizer:
    """A population's optimizer: the members' shared `base` optimizer plus the names of
    the hyperparameters each member has of its own (their values are device tensors in
    `pop.opt_state["hparams"]`; per-member learning-rate schedules are kept here).

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import population
        >>> pop = population(ft.TrainState.create(torch.nn.Linear(3, 2), ft.optim.adam(1e-3)),
        ...                  hparams={"lr": [1e-3, 1e-2]})
        >>> hparams = pop.opt_state["hparams"]
        >>> pop.optimizer.names, hparams["lr"].tolist()
        (('lr',), [0.001, 0.01])
    """

    base: Optimizer
    n: int
    names: tuple[str, ...]
    lr_schedules: tuple[Any, ...] | None = None
    # every member's every parameter is at the update count (see Optimizer.apply_gradients)
    lockstep: bool = True

    def values(self, opt_state: Mapping[str, Any], i: int) -> dict[str, Any]:
        """Member `i`'s own hyperparameters as Python values (a host read)."""
        out: dict[str, Any] = {}
        for name, t in opt_state.get(HPARAMS, {}).items():
            row = t[i].tolist()
            out[name] = tuple(row) if name == "betas" else row
        if self.lr_schedules is not None:
            out["lr"] = self.lr_schedules[i]
        return out

    def member(self, opt_state: Mapping[str, Any], i: int) -> Optimizer:
        """Member `i`'s own optimizer: the base one with its hyperparameters put in."""
        return self.base.with_settings(self.values(opt_state, i))

    def init(self, params: Any) -> Any:
        raise ConfigError("a population's optimizer state is made by ft.population; "
                          "build a state with TrainState.create and pass it to ft.population")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("a population trains with ft.vmap(ft.train_step(loss_fn)) (or "
                          "ft.population_step), not with ft.train_step")

    def learning_rates(self, opt_state: Mapping[str, Any]) -> dict[str, Any]:
        """Each member's current learning rate per transform (`"adamw/m3"`), for logging."""
        count = opt_state["count"]
        hps = opt_state.get(HPARAMS, {})
        out: dict[str, Any] = {}
        for key, t in zip(self.base.keys, self.base.transforms):
            if "lr" not in _member_settings(t):
                continue
            lr = _lr_value(self, t.settings["lr"], hps, count)
            lr = torch.as_tensor(lr, device=count.device).expand(count.shape)
            for i, v in enumerate(lr.unbind(0)):
                out[f"{key}/m{i}"] = v
        return out


def _lr_value(opt: PopulationOptimizer, base_lr: Any, hps: Mapping[str, torch.Tensor],
              count: torch.Tensor) -> Any:
    """The learning rate of every member now: a float or a float64 tensor [N]."""
    if "lr" in hps:
        return hps["lr"]
    if opt.lr_schedules is not None:
        return torch.stack([torch.as_tensor(s(c), dtype=torch.float64, device=count.device)
                            for s, c in zip(opt.lr_schedules, count.unbind(0))])
    if callable(base_lr):
        return torch.as_tensor(base_lr(count), dtype=torch.float64, device=count.device)
    return base_lr


def _check_hparams(hparams: Any, optimizer: Any) -> dict[str, list[Any]]:
    """Per-member hyperparameters, validated against the members' optimizer."""
    if hparams is None or (isinstance(hparams, Mapping) and not hparams):
        return {}
    if not isinstance(hparams, Mapping):
        raise ConfigError(f"hparams must map a hyperparameter name to one value per member, "
                          f"got {type(hparams).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise ConfigError("per-member hparams need the state's optimizer to be an ftrain "
                          f"optimizer (ft.optim.adam/adamw/sgd), got {optimizer!r}")
    settings = set().union(*(_member_settings(t) for t in optimizer.transforms))
    out: dict[str, list[Any]] = {}
    for name, values in hparams.items():
        if name not in _KNOWN:
            raise ConfigError(f"unknown per-member hyperparameter {name!r}; a member may have "
                              f"its own {list(_KNOWN)}")
        if name not in settings:
            kinds = [t.name for t in optimizer.transforms]
            raise ConfigError(f"per-member hyperparameter {name!r} does not apply to this "
                              f"optimizer ({' -> '.join(kinds)})")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ConfigError(f"hparams[{name!r}] must be a list with one value per member, "
                              f"got {values!r}")
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        for v in values:
            _check_value(name, v)
        out[name] = values
    for i in range(min((len(v) for v in out.values()), default=0)):
        try:  # the optimizer validates each member's settings as its constructor does
            optimizer.with_settings({name: values[i] for name, values in out.items()})
        except ConfigError as err:
            raise ConfigError(f"hparams of member {i}: {err}") from None
    if "lr" in out and len({callable(v) for v in out["lr"]}) > 1:
        raise ConfigError("hparams['lr'] mixes numbers and schedules; give all members "
                          "numbers or all members schedules")
    return out


def _check_value(name: str, v: Any) -> None:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if name == "lr" and callable(v):
        return
    if name == "betas":
        if not (isinstance(v, (tuple, list)) and len(v) == 2
                and all(number(b) and 0.0 <= b < 1.0 for b in v)):
            raise ConfigError(f"hparams['betas'] values must be two floats in [0, 1), got {v!r}")
        return
    if not number(v) or v < 0:
        what = "a non-negative float or a schedule" if name == "lr" else "a non-negative float"
        raise ConfigError(f"hparams[{name!r}] values must be {what}, got {v!r}")


def _hparam_tensors(hparams: Mapping[str, list[Any]], device: torch.device
                    ) -> dict[str, torch.Tensor]:
    """Numeric per-member hyperparameters as float64 device tensors ([N], betas [N, 2])."""
    return {name: torch.tensor([list(v) if name == "betas" else float(v) for v in values],
                               dtype=torch.float64, device=device)
            for name, values in hparams.items() if not (name == "lr" and callable(values[0]))}


def _structural(optimizer: Optimizer, hparams: Mapping[str, list[Any]]) -> Optimizer:
    """An optimizer whose state has every entry some member needs (momentum buffers)."""
    if "momentum" in hparams:
        return optimizer.with_settings({"momentum": max(hparams["momentum"])})
    return optimizer


def _inferred_hparams(states: Sequence[TrainState]) -> dict[str, list[Any]]:
    """Settings in which the states' optimizers differ become per-member hparams."""
    base = states[0].optimizer
    if base is None or not all(s.optimizer is not None for s in states):
        if any(s.optimizer is not None for s in states):
            raise ConfigError("some states have an optimizer and some do not")
        return {}
    if not isinstance(base, Optimizer):
        raise ConfigError(f"a population needs ftrain optimizers, got {base!r}")
    out: dict[str, list[Any]] = {}
    for i, s in enumerate(states):
        opt = s.optimizer
        if not base.same_kind(opt):
            raise ConfigError(f"member {i}'s optimizer is not member 0's up to per-member "
                              f"hyperparameters {list(_KNOWN)}")
    for ti, t in enumerate(base.transforms):
        for key in sorted(_member_settings(t)):
            values = [s.optimizer.transforms[ti].settings[key] for s in states]
            if all(v == values[0] for v in values):
                continue
            if key not in _KNOWN:
                raise ConfigError(f"the states' optimizers differ in {key!r}, which members "
                                  f"cannot have of their own (only {list(_KNOWN)})")
            if key in out and out[key] != values:
                raise ConfigError(f"the states' optimizers differ in {key!r} in two transforms")
            out[key] = values
    return out

