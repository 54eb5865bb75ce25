"""`reduce_lr_on_plateau`: lower the learning rate when a monitored metric stops improving.

torch's `ReduceLROnPlateau`, as a layer: the same decisions and the same lr sequence fed
the same values (`is_better`, patience, cooldown, `min_lr` per group, the `eps` below
which a change is skipped). Its state (best value, bad checks, cooldown, every group's
current lr) lives in a slot, so a resume is exact. Checks happen where `early_stop`'s
do: each time a layer inside adds the monitored metric (validation results), else at
each epoch end.

The optimizer is a value, so a reduction returns a state with a new optimizer whose
groups have the new lr (a float group gets torch's float; a group that follows a
schedule gets the schedule times the accumulated factor, floored at its `min_lr`). A loop
prepares its update again only then, so the steps in between cost what they did without
this layer: no host sync, no device op. `ft.compile` compiles once more per reduction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from ftrain.core import slots as _slots
from ftrain.core.health import log
from ftrain.core.host import to_host
from ftrain.core.state import TrainState
from ftrain.core.trainable import SLOT as FINETUNE_SLOT
from ftrain.errors import ConfigError, MonitorError
from ftrain.layers.monitored import Monitored
from ftrain.optim.rates import Scaled, group_lrs, with_group_lrs
from ftrain.parallel.dist import across_ranks

_GROUP = _slots.dict_of(lambda g: isinstance(g, Mapping) and all(
    _slots.number(g.get(k)) for k in ("base", "lr", "scale"))
    and isinstance(g.get("schedule"), bool))
_FIELDS = {"best": (_slots.number, "a number"), "bad": (_slots.count, "an int >= 0"),
           "cooldown": (_slots.count, "an int >= 0"), "seen": (_slots.count, "an int >= 0"),
           "at": (_slots.optional(_slots.count), "an int >= 0 or None"),
           "groups": (_GROUP, "a dict of group name -> {base, lr, scale, schedule}"),
           "monitor": (_slots.text, "a string"), "mode": (_slots.text, "a string"),
           "edits": (_slots.count, "an int >= 0")}


def _edits(state: TrainState) -> int:
    """How many optimizer changes (`set_hparams`, `unfreeze`, ...) the state has had."""
    return len((state.slots.get(FINETUNE_SLOT) or {}).get("log", []))


class ReduceLROnPlateau(Monitored):
    """The combinator built by `reduce_lr_on_plateau`."""

    def __init__(self, inner: Any, monitor: str = "val_loss", *,
                 mode: Literal["min", "max"] = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: Literal["rel", "abs"] = "rel",
                 cooldown: int = 0, min_lr: float | Mapping[str, float] = 0.0,
                 eps: float = 1e-8, name: str = "plateau") -> None:
        super().__init__(inner, name)
        self.name = name
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"reduce_lr_on_plateau needs the name of a metric to monitor, "
                              f"got {monitor!r}")
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ConfigError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        if not isinstance(factor, (int, float)) or not 0.0 < factor < 1.0:
            raise ConfigError(f"factor must be a float in (0, 1) (the lr is multiplied by "
                              f"it), got {factor!r}")
        for what, n in (("patience", patience), ("cooldown", cooldown)):
            if not _slots.count(n):
                raise ConfigError(f"{what} must be an int >= 0, got {n!r}")
        for what, x in (("threshold", threshold), ("eps", eps)):
            if not _slots.number(x) or x < 0:
                raise ConfigError(f"{what} must be a number >= 0, got {x!r}")
        floors: list[Any] = list(min_lr.values()) if isinstance(min_lr, Mapping) else [min_lr]
        for value in floors:
            if not _slots.number(value) or value < 0:
                raise ConfigError(f"min_lr must be a number >= 0 or a dict of parameter "
                                  f"group name -> number >= 0, got {min_lr!r}")
        self.monitor, self.mode, self.factor = monitor, mode, float(factor)
        self.patience, self.cooldown = patience, cooldown
        self.threshold, self.threshold_mode, self.eps = threshold, threshold_mode, eps
        self.min_lr = min_lr
        self.reads = (monitor,)
        self._watch(inner, monitor)  # when it checks: ftrain.layers.monitored
        self._synced: Any = None  # the state optimizer last made to follow the slot
        self._checked()

    def __repr__(self) -> str:
        return f"reduce_lr_on_plateau({self.monitor!r}, patience={self.patience})"

    # -- the slot and the optimizer that follows it -----------------------------------

    def _ensure(self, state: TrainState) -> TrainState:
        slot = state.slots.get(self.name)
        if slot is None:
            worse = math.inf if self.mode == "min" else -math.inf
            slot = {"best": worse, "bad": 0, "cooldown": 0, "seen": 0, "at": None,
                    "groups": {}, "monitor": self.monitor, "mode": self.mode,
                    "edits": _edits(state)}
            state = state.replace(slots={**state.slots, self.name: slot})
        else:
            _slots.check(slot, self.name, _FIELDS)
            if (slot["monitor"], slot["mode"]) != (self.monitor, self.mode):
                raise ConfigError(
                    f"the {self.name!r} slot of this state tracks monitor={slot['monitor']!r}, "
                    f"mode={slot['mode']!r}; this reduce_lr_on_plateau uses "
                    f"monitor={self.monitor!r}, mode={self.mode!r}. Keep them, or give it "
                    "another name= to start afresh")
        return self._sync(state)

    def _min_lr(self, group: str) -> float:
        if isinstance(self.min_lr, Mapping):
            return float(self.min_lr.get(group, 0.0))
        return float(self.min_lr)

    def _parts(self, state: TrainState) -> list[tuple[str | None, Any]]:
        if state.multi:
            return [(p, o) for p, o in state.optimizer.items() if o is not None]
        return [(None, state.optimizer)] if state.optimizer is not None else []

    def _sync(self, state: TrainState, reduced: bool = False) -> TrainState:
        """Make the state's optimizer use the slot's learning rates (a new optimizer only
        where one differs); note groups the slot has not seen yet. A float lr that is
        neither the group's first lr nor the slot's (the user set it: a new optimizer)
        counts from there, except right after a reduction (`reduced`). Equal to the first
        lr, it is the optimizer rebuilt from code at a resume, unless the `"finetune"` log
        grew since the last sync (`set_hparams`, `with_optimizer`: the user set it)."""
        slot = dict(state.slots[self.name])
        groups = {k: dict(v) for k, v in slot["groups"].items()}
        edited = _edits(state) != slot["edits"]
        changed: dict[str | None, Any] = {}
        known: set[str] = set()
        for part, opt in self._parts(state):
            wanted: dict[str, Any] = {}
            for key, setting in group_lrs(opt).items():
                full = key if part is None else f"{part}/{key}"
                known.add(full)
                base = setting.schedule if isinstance(setting, Scaled) else setting
                entry = groups.get(full)
                if callable(base):  # a schedule: followed, times the factors so far
                    if entry is None or not entry["schedule"]:
                        entry = groups[full] = {"base": 0.0, "lr": 0.0, "scale": 1.0,
                                                "schedule": True}
                    want = base if entry["scale"] == 1.0 else Scaled(
                        base, entry["scale"], self._min_lr(full))
                    if want != setting:
                        wanted[key] = want
                    continue
                if entry is None or entry["schedule"] or (not reduced and (
                        setting != entry["lr"] and (edited or setting != entry["base"]))):
                    # a group first seen, or an lr the user set since: it counts from here
                    entry = groups[full] = {"base": float(setting), "lr": float(setting),
                                            "scale": 1.0, "schedule": False}
                if setting != entry["lr"]:
                    wanted[key] = entry["lr"]
            if wanted:
                changed[part] = with_group_lrs(opt, wanted)
        if isinstance(self.min_lr, Mapping):
            unknown = sorted(set(self.min_lr) - known)
            if unknown:
                raise ConfigError(f"reduce_lr_on_plateau: min_lr names parameter group(s) "
                                  f"{unknown}; the groups are {sorted(known)}")
        groups = {k: v for k, v in groups.items() if k in known}  # gone with a swap
        if groups != slot["groups"] or edited:
            slot["groups"], slot["edits"] = groups, _edits(state)
            state = state.replace(slots={**state.slots, self.name: slot})
        if changed:
            optimizer = {**state.optimizer, **changed} if state.multi else changed[None]
            state = state.replace(optimizer=optimizer)
        self._synced = state.optimizer
        return state

    # -- the protocol ---------------------------------------------------------------------

    def after_init(self, state: TrainState) -> TrainState:
        return self._ensure(state)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        if state.optimizer is not self._synced or self.name not in state.slots:
            state = self._ensure(state)  # a new state (a resume, a swap): follow the slot
        state, metrics = self.inner(state, batch)
        return self._after_step(state, metrics), metrics

    def _better(self, value: float, best: float) -> bool:
        if self.mode == "min":
            return value < (best * (1.0 - self.threshold) if self.threshold_mode == "rel"
                            else best - self.threshold)
        return value > (best * (self.threshold + 1.0) if self.threshold_mode == "rel"
                        else best + self.threshold)

    def _check(self, state: TrainState, metrics: dict[str, Any]) -> TrainState:
        if self.monitor not in metrics:
            raise MonitorError(f"reduce_lr_on_plateau monitors {self.monitor!r}, which is not "
                               f"among the metrics at this check: {sorted(metrics)} (epoch "
                               "reductions like 'loss_epoch' come from a with_logging layer "
                               "inside it)")
        state = self._ensure(state)
        # every rank decides on the same value; host sync: a check decides here
        value = to_host(across_ranks(state, [metrics[self.monitor]]))[0]
        slot = dict(state.slots[self.name])
        slot["seen"], slot["at"] = int(slot["seen"]) + 1, state.step
        if self._better(value, slot["best"]):
            slot["best"], slot["bad"] = value, 0
        else:
            slot["bad"] = int(slot["bad"]) + 1
        if slot["cooldown"] > 0:
            slot["cooldown"] = int(slot["cooldown"]) - 1
            slot["bad"] = 0  # bad checks in cooldown do not count
        if slot["bad"] > self.patience:
            slot["groups"] = self._reduced(slot["groups"], state.step)
            slot["cooldown"], slot["bad"] = self.cooldown, 0
        state = state.replace(slots={**state.slots, self.name: slot})
        return self._sync(state, reduced=True)

    def _reduced(self, groups: Mapping[str, Any], step: int) -> dict[str, Any]:
        """torch's `_reduce_lr`, per group; a scheduled group's factor shrinks instead."""
        out = {}
        for name, entry in groups.items():
            entry = dict(entry)
            if entry["schedule"]:
                entry["scale"] = entry["scale"] * self.factor
                log.info("reduce_lr_on_plateau at step %d: lr of %s is its schedule x %.6g",
                         step, name, entry["scale"])
            else:
                old = float(entry["lr"])
                new = max(old * self.factor, self._min_lr(name))
                if old - new > self.eps:
                    entry["lr"] = new
                    log.info("reduce_lr_on_plateau at step %d: lr of %s %.6g -> %.6g",
                             step, name, old, new)
            out[name] = entry
        return out


def reduce_lr_on_plateau(step: Any, monitor: str = "val_loss",
                         mode: Literal["min", "max"] = "min", factor: float = 0.1,
                         patience: int = 10, threshold: float = 1e-4,
                         threshold_mode: Literal["rel", "abs"] = "rel", cooldown: int = 0,
                         min_lr: float | Mapping[str, float] = 0.0, *, eps: float = 1e-8,
                         name: str = "plateau") -> ReduceLROnPlateau:
    """Multiply the learning rate by `factor` when `monitor` has not improved for more than
    `patience` checks: torch's `ReduceLROnPlateau`, with its arguments and its numbers.

    A check is each time the monitored value arrives (each validation run for a `val_*`
    metric a `with_validation` inside adds; each epoch end otherwise). `min_lr` is a floor
    for every group, or a dict of group name (as `ft.optim.learning_rates` names them) ->
    floor. Works with any ftrain optimizer, `ft.optim.from_torch` ones included, and with
    parameter groups; a group whose lr is a schedule follows the schedule times the
    factors so far. The state lives in the slot `name`.

    Examples:
        >>> import torch, ftrain as ft
        >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(2)]
        >>> step = ft.with_validation(ft.train_step(loss), ft.eval_step(loss), data)
        >>> # an improvement must be 1e9 here: after the first check none is, and the
        >>> # third check is the second without one (> patience)
        >>> step = ft.reduce_lr_on_plateau(step, "val_loss", patience=1,
        ...                                threshold=1e9, threshold_mode="abs")
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state = ft.fit(step, state, data, epochs=3, logger=False, checkpoint=False,
        ...                progress=False)
        >>> round(ft.optim.learning_rates(state)["sgd"], 6)
        0.01
    """
    return ReduceLROnPlateau(step, monitor, mode=mode, factor=factor, patience=patience,
                             threshold=threshold, threshold_mode=threshold_mode,
                             cooldown=cooldown, min_lr=min_lr, eps=eps, name=name)
