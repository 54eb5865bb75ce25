"""What every combinator shares: it wraps `inner`, owns at most one named slot, and passes
the step protocol (`init`, `epoch_end`, `close`) through to the step it wraps.

A user's own combinator needs none of this (any object with `__call__` and, optionally,
the protocol methods works); ftrain's own combinators use it to stay small.
"""

from __future__ import annotations

from typing import Any

from ftrain.core import step as _step
from ftrain.core.state import TrainState
from ftrain.errors import ConfigError

Metrics = dict[str, Any]


def layers(step: Any) -> list[Any]:
    """The combinator stack from the outermost step to the core, following `.inner`."""
    out = []
    seen = set()
    while step is not None:
        if id(step) in seen:
            raise ConfigError("a step's .inner chain loops back on itself")
        seen.add(id(step))
        out.append(step)
        step = getattr(step, "inner", None)
    return out


def find(step: Any, kind: type) -> Any:
    """The outermost layer of `step` that is a `kind`, or None."""
    for layer in layers(step):
        if isinstance(layer, kind):
            return layer
    return None


class Combinator:
    """Base of ftrain's combinators: protocol pass-through and slot ownership."""

    slot_name: str | None = None

    def __init__(self, inner: Any, slot_name: str | None = None) -> None:
        if not callable(inner):
            raise ConfigError(f"{type(self).__name__} wraps a step (state, batch) -> "
                              f"(state, metrics), got {type(inner).__name__}")
        self.inner = inner
        self.slot_name = slot_name
        if slot_name is not None:
            if not isinstance(slot_name, str) or not slot_name:
                raise ConfigError(f"name= must be a non-empty string, got {slot_name!r}")
            for layer in layers(inner):
                if getattr(layer, "slot_name", None) == slot_name:
                    raise ConfigError(
                        f"two combinators claim the slot {slot_name!r}: "
                        f"{type(self).__name__} and {layer!r}; give one of them another "
                        f"name=")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(slot={self.slot_name!r})"

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        return self.inner(state, batch)  # type: ignore[no-any-return]

    def init(self, state: TrainState) -> TrainState:
        return _step.init(self.inner, state)

    def epoch_end(self, state: TrainState) -> tuple[TrainState, Metrics]:
        return _step.epoch_end(self.inner, state)

    def close(self, state: TrainState) -> None:
        _step.close(self.inner, state)
