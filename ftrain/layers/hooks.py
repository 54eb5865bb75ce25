"""`ft.every`: run a function of yours every n steps or epochs (Lightning's callbacks).

Anything a callback would do (print, adjust, save something of your own, look at the
metrics) is a function `fn(state, metrics)`; `every` calls it after every n-th step with
that step's metrics, or at every n-th completed epoch with the epoch-end metrics. It
returns None (nothing changes), a state (replaces the loop's state, e.g. with a changed
slot) or `(state, {name: value})`: metrics added to that step's or epoch end's, so outer
layers (logging, `early_stop`, `with_checkpointing(monitor=...)`) see them.

A returned state may change the run itself: `state.freeze(...)`, `state.unfreeze(...,
lr=...)`, `state.set_hparams(...)`, `state.with_optimizer(...)` (Lightning's
`BaseFinetuning`). The loop then installs the new trainable set (a new module, a new
DistributedDataParallel wrapper under `with_ddp`, its update prepared again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftrain.core.bind import follow
from ftrain.core.layer import Combinator, Metrics
from ftrain.core.state import LOOP_SLOT, TrainState
from ftrain.core.trigger import Trigger
from ftrain.errors import ConfigError

Hook = Callable[[TrainState, dict[str, Any]], Any]


class Every(Combinator):
    """The combinator built by `every`."""

    def __init__(self, inner: Any, fn: Hook, every_n_steps: int | None,
                 every_n_epochs: int | None) -> None:
        super().__init__(inner)
        if not callable(fn):
            raise ConfigError(f"every needs a function fn(state, metrics), got "
                              f"{type(fn).__name__}")
        self.trigger = Trigger(every_n_steps, every_n_epochs).require("every")
        self.fn = fn
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self._checked()

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return (f"every({name}, every_n_steps={self.every_n_steps}, "
                f"every_n_epochs={self.every_n_epochs})")

    def _call(self, state: TrainState, metrics: dict[str, Any]
              ) -> tuple[TrainState, dict[str, Any]]:
        out = self.fn(state, metrics)
        if out is None:
            return state, metrics
        if isinstance(out, TrainState):
            follow(state, out)  # a new trainable set: the loop's run continues with it
            return out, metrics
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], TrainState) \
                and isinstance(out[1], dict):
            follow(state, out[0])
            return out[0], {**metrics, **out[1]}  # e.g. an epoch score for early_stop
        raise ConfigError(f"{self!r}: fn must return None, a TrainState or (TrainState, "
                          f"dict of metrics), got {type(out).__name__}")

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        state, metrics = self.inner(state, batch)
        if self.trigger.step_due(state.step):
            state, metrics = self._call(state, metrics)
        return state, metrics

    def at_epoch_end(self, state: TrainState, metrics: Metrics) -> tuple[TrainState, Any]:
        if LOOP_SLOT in state.slots and self.trigger.epoch_due(state):
            state, metrics = self._call(state, metrics)
        return state, metrics


def every(step: Any, fn: Hook, *, every_n_steps: int | None = None,
          every_n_epochs: int | None = None) -> Every:
    """Call `fn(state, metrics)` after every n-th step and/or every n-th completed epoch.

    `state.step` (after the step) and `state.epoch` (completed epochs) say where the loop
    is. `fn` returns None, a new state (kept: e.g. `state.unfreeze("backbone.*",
    lr=1e-4)` to fine-tune), or `(state, metrics)` to add metrics that outer layers see
    (e.g. an epoch score to monitor).

    Examples:
        >>> import torch, ftrain as ft
        >>> seen = []
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> step = ft.every(step, lambda s, m: seen.append(s.step), every_n_steps=2)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> state = ft.fit(step, state, data, epochs=1, logger=False, checkpoint=False,
        ...                progress=False)
        >>> seen
        [2, 4]
    """
    return Every(step, fn, every_n_steps, every_n_epochs)
