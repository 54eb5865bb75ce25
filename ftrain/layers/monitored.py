"""When a layer that watches one metric (`early_stop`, `reduce_lr_on_plateau`) checks it.

A monitor some layer inside adds (validation's "val_*") is checked whenever such results
arrive, once per step (an epoch end may repeat the results of a check made at its last
step); any other (a train metric, "loss_epoch") at each completed epoch's end, with the
epoch's last step's metrics included. A subclass keeps `at` (the step of its last check)
in its slot and writes `_ensure` (create or check its slot) and `_check` (decide).
"""

from __future__ import annotations

from typing import Any

from ftrain.core.layer import Combinator, Metrics, matcher, written_inside
from ftrain.core.state import TrainState


class Monitored(Combinator):
    """A layer that checks the metric `monitor` (see the module doc for when)."""

    name: str  # its slot's name (set by the subclass)

    def _watch(self, inner: Any, monitor: str) -> None:
        written = written_inside(inner, monitor)
        self.results = matcher(written)
        self.on_results = bool(written)
        self._last_metrics: dict[str, Any] = {}  # the epoch's last step's, for epoch checks

    def _ensure(self, state: TrainState) -> TrainState:
        raise TypeError(f"{type(self).__name__} must define _ensure")

    def _check(self, state: TrainState, metrics: dict[str, Any]) -> TrainState:
        raise TypeError(f"{type(self).__name__} must define _check")

    def _arrived(self, state: TrainState, metrics: Metrics) -> bool:
        """Results the monitor is among arrived, and were not checked at this step."""
        match = self.results
        return any(match(k) for k in metrics) and \
            state.slots[self.name].get("at") != state.step

    def _after_step(self, state: TrainState, metrics: Metrics) -> TrainState:
        self._last_metrics = metrics
        if self.on_results and self._arrived(state, metrics):
            state = self._check(state, metrics)
        return state

    def at_epoch_end(self, state: TrainState, metrics: Metrics) -> tuple[TrainState, Any]:
        state = self._ensure(state)
        if not self.on_results:
            if state.slots.get("loop", {}).get("batch", 0) == 0:  # a completed epoch
                state = self._check(state, {**self._last_metrics, **metrics})
        elif self._arrived(state, metrics):
            state = self._check(state, metrics)
        return state, metrics
