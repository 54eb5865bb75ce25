"""`early_stop`: stop when a monitored metric stops improving.

Patience counts *validation checks* (as Lightning's EarlyStopping does), the sanity check
excluded; without a validation layer in the stack it counts epoch ends. The best value
and the wait count live in a slot, so they survive a resume. It stops the loop with
`ft.request_stop` (a value in the state), never by raising, and says why.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from ftrain.core import slots as _slots
from ftrain.core.health import log
from ftrain.core.host import to_host
from ftrain.core.state import TrainState
from ftrain.core.step import request_stop
from ftrain.errors import ConfigError, MonitorError
from ftrain.layers.monitored import Monitored
from ftrain.parallel.dist import across_ranks

_FIELDS = {"best": (_slots.optional(_slots.number), "a number or None"),
           "wait": (_slots.count, "an int >= 0"), "seen": (_slots.count, "an int >= 0"),
           "at": (_slots.optional(_slots.count), "an int >= 0 or None"),
           "reason": (_slots.optional(_slots.text), "a string or None"),
           "monitor": (_slots.optional(_slots.text), "a string or None"),
           "mode": (_slots.optional(_slots.text), "a string or None")}


class EarlyStop(Monitored):
    """The combinator built by `early_stop`."""

    def __init__(self, inner: Any, monitor: str, *, patience: int = 3,
                 mode: Literal["min", "max"] = "min", min_delta: float = 0.0,
                 check_finite: bool = True, stopping_threshold: float | None = None,
                 divergence_threshold: float | None = None, name: str = "early_stop") -> None:
        super().__init__(inner, name)
        self.name = name
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"early_stop needs the name of a metric to monitor, got "
                              f"{monitor!r}")
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"patience must be an int >= 1, got {patience!r}")
        if min_delta < 0:
            raise ConfigError(f"min_delta must be >= 0, got {min_delta}")
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.min_delta = float(min_delta)
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.reads = (monitor,)
        self._watch(inner, monitor)  # when it checks: ftrain.layers.monitored
        self._checked()

    def __repr__(self) -> str:
        return f"early_stop({self.monitor!r}, patience={self.patience})"

    def _ensure(self, state: TrainState) -> TrainState:
        slot = state.slots.get(self.name)
        if slot is None:
            return state.replace(slots={**state.slots, self.name: {
                "best": None, "wait": 0, "seen": 0, "at": None, "reason": None,
                "monitor": self.monitor, "mode": self.mode}})
        _slots.check(slot, self.name, _FIELDS, may_lack=("at",))
        if (slot.get("monitor"), slot.get("mode")) != (self.monitor, self.mode):
            raise ConfigError(
                f"the {self.name!r} slot of this state tracks monitor={slot.get('monitor')!r}, "
                f"mode={slot.get('mode')!r}; this early_stop uses monitor={self.monitor!r}, "
                f"mode={self.mode!r}. Keep them, or give it another name= to start afresh")
        return state

    def after_init(self, state: TrainState) -> TrainState:
        return self._ensure(state)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        state, metrics = self.inner(state, batch)
        if self.name not in state.slots:
            state = self._ensure(state)
        return self._after_step(state, metrics), metrics

    def _improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def _check(self, state: TrainState, metrics: dict[str, Any]) -> TrainState:
        if self.monitor not in metrics:
            raise MonitorError(f"early_stop monitors {self.monitor!r}, which is not among the "
                               f"metrics at this check: {sorted(metrics)} (epoch reductions "
                               "like 'loss_epoch' come from a with_logging layer inside "
                               "early_stop)")
        # every rank decides on the same value (a per-step metric differs by rank);
        # host sync: a check decides here
        value = to_host(across_ranks(state, [metrics[self.monitor]]))[0]
        slot = dict(state.slots[self.name])
        slot["seen"] = int(slot["seen"]) + 1
        slot["at"] = state.step
        reason = None
        if self.check_finite and not math.isfinite(value):
            reason = f"{self.monitor} = {value} is not finite"
        elif self.stopping_threshold is not None and (
                value <= self.stopping_threshold if self.mode == "min"
                else value >= self.stopping_threshold):
            reason = (f"{self.monitor} = {value:.6g} reached the stopping threshold "
                      f"{self.stopping_threshold}")
        elif self.divergence_threshold is not None and (
                value >= self.divergence_threshold if self.mode == "min"
                else value <= self.divergence_threshold):
            reason = (f"{self.monitor} = {value:.6g} is past the divergence threshold "
                      f"{self.divergence_threshold}")
        elif self._improved(value, slot["best"]):
            slot["best"], slot["wait"] = value, 0
        else:
            slot["wait"] = int(slot["wait"]) + 1
            if slot["wait"] >= self.patience:
                reason = (f"{self.monitor} did not improve for {slot['wait']} checks "
                          f"(best {slot['best']:.6g})")
        slot["reason"] = reason
        state = state.replace(slots={**state.slots, self.name: slot})
        if reason is not None:
            log.warning("early stopping at step %d: %s", state.step, reason)
            state = request_stop(state, f"early_stop: {reason}")
        return state


def early_stop(step: Any, monitor: str, patience: int = 3, mode: Literal["min", "max"] = "min",
               min_delta: float = 0.0, *, check_finite: bool = True,
               stopping_threshold: float | None = None,
               divergence_threshold: float | None = None, name: str = "early_stop"
               ) -> EarlyStop:
    """Stop the loop when `monitor` has not improved by `min_delta` for `patience` checks.

    Checks are the moments the monitored value arrives: each validation run, for a metric
    a `with_validation` layer inside it adds; each epoch end otherwise. Placing it
    inside the layer that adds its metric is an error when the stack is built. Also stops
    on a non-finite value (`check_finite`), on reaching `stopping_threshold`, or on
    passing `divergence_threshold`. `ft.stop_reason(state)`
    says why. A monitored key never produced is an error at the first check, listing
    the keys that exist.

    Examples:
        >>> import torch, ftrain as ft
        >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(2)]
        >>> step = ft.with_validation(ft.train_step(loss), ft.eval_step(loss), data)
        >>> step = ft.early_stop(step, "val_loss", patience=2)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(10.0))
        >>> state = ft.fit(step, state, data, epochs=50, logger=False, checkpoint=False,
        ...                progress=False)
        >>> ft.stop_reason(state).startswith("early_stop")
        True
    """
    return EarlyStop(step, monitor, patience=patience, mode=mode, min_delta=min_delta,
                     check_finite=check_finite, stopping_threshold=stopping_threshold,
                     divergence_threshold=divergence_threshold, name=name)
