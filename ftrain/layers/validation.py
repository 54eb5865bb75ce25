"""`with_validation`: evaluate at epoch ends or every N steps, merge `val_*` metrics.

Before the first training step it runs `sanity_steps` batches of each validation set (as
Lightning's sanity check) so a bug in evaluation shows in seconds, not after an epoch;
those are neither logged nor counted. Each real validation counts as one check in the
layer's slot (early stopping's patience counts these checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ftrain.core import health
from ftrain.core import slots as _slots
from ftrain.core.layer import Combinator, Metrics
from ftrain.core.run import run_info
from ftrain.core.state import TrainState
from ftrain.core.trigger import Trigger, ended_epoch
from ftrain.data.module import resolve
from ftrain.errors import ConfigError, check_int
from ftrain.loops.evaluate import evaluate

SLOT_FIELDS = {"checks": (_slots.count, "an int >= 0"),
               "last": (_slots.dict_of(_slots.number), "a dict of numbers"),
               "step": (_slots.optional(_slots.count), "an int >= 0")}



class WithValidation(Combinator):
    """The combinator built by `with_validation`."""

    def __init__(self, inner: Any, evaluator: Callable[[TrainState, Any], Metrics],
                 val_data: Any, *, every_n_epochs: int | None = 1,
                 every_n_steps: int | None = None, sanity_steps: int = 2,
                 limit_val_batches: int | None = None, prefix: str = "val_",
                 name: str = "validation") -> None:
        super().__init__(inner, name)
        self.name = name
        if not callable(evaluator):
            raise ConfigError(f"with_validation needs an evaluator (ft.eval_step(fn)), got "
                              f"{type(evaluator).__name__}")
        for label, value, low in (("sanity_steps", sanity_steps, 0),
                                  ("limit_val_batches", limit_val_batches, 1)):
            check_int(label, value, low)
        self.trigger = Trigger(every_n_steps, every_n_epochs, on_last=True).require(
            "with_validation")
        self.evaluator = evaluator
        self.sets = dict(val_data) if isinstance(val_data, Mapping) else {None: val_data}
        if not self.sets:
            raise ConfigError("with_validation got an empty dict of validation sets")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.sanity_steps = sanity_steps
        self.limit = limit_val_batches
        self.prefix = prefix
        self.writes = (prefix + "*",)  # its results; logging and monitors find them so
        self._checked()

    def __repr__(self) -> str:
        return (f"with_validation(every_n_epochs={self.every_n_epochs}, "
                f"every_n_steps={self.every_n_steps})")

    def _limit(self, state: TrainState, limit: int | None) -> int | None:
        run = run_info(state)
        if run is not None and run.fast_dev_run:
            return run.fast_dev_run if limit is None else min(limit, run.fast_dev_run)
        return limit

    def _evaluate(self, state: TrainState, limit: int | None) -> dict[str, float]:
        run = run_info(state)
        show = bool(run is not None and run.progress)
        out: dict[str, float] = {}
        for set_name, data in self.sets.items():
            data = resolve(data, "val")  # an ft.Data: its val split
            values = evaluate(self.evaluator, state, data, limit_batches=limit,
                              progress=show, desc="validation" if set_name is None
                              else f"validation {set_name}")
            head = self.prefix if set_name is None else f"{self.prefix}{set_name}_"
            out.update({head + k: v for k, v in values.items()})
        return out

    def after_init(self, state: TrainState) -> TrainState:
        if self.sanity_steps:
            limit = self._limit(state, self.sanity_steps)
            self._evaluate(state, limit)  # not logged, not counted
        if self.name not in state.slots:
            state = state.replace(slots={**state.slots, self.name: {"checks": 0, "last": {}}})
        else:
            _slots.check(state.slots[self.name], self.name, SLOT_FIELDS, may_lack=("step",))
        return state

    def _validate(self, state: TrainState) -> tuple[TrainState, Metrics]:
        values = self._evaluate(state, self._limit(state, self.limit))
        health.check_finite(state)  # the host just read values anyway
        slot = dict(state.slots.get(self.name) or {"checks": 0, "last": {}})
        slot = {"checks": int(slot["checks"]) + 1, "last": values, "step": state.step}
        state = state.replace(slots={**state.slots, self.name: slot})
        return state, {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        state, metrics = self.inner(state, batch)
        if self.trigger.step_due(state.step):
            state, results = self._validate(state)
            metrics = {**metrics, **results}
        return state, metrics

    def at_epoch_end(self, state: TrainState, metrics: Metrics
                     ) -> tuple[TrainState, Metrics]:
        run = run_info(state)
        # fast_dev_run leaves the epoch open (the state stays a valid start) but validates
        completed = ended_epoch(state) or bool(run is not None and run.fast_dev_run)
        due = self.trigger.epoch_due(state, completed=completed)
        slot = state.slots.get(self.name) or {}
        if due and slot.get("step") == state.step:
            # validated at this very step already (every_n_steps): report, don't rerun
            return state, {**metrics, **{k: torch.tensor(v, dtype=torch.float64)
                                         for k, v in slot.get("last", {}).items()}}
        if due:
            state, results = self._validate(state)
            metrics = {**metrics, **results}
        return state, metrics


def with_validation(step: Any, evaluator: Callable[[TrainState, Any], Metrics], val_data: Any,
                    *, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                    sanity_steps: int = 2, limit_val_batches: int | None = None,
                    prefix: str = "val_", name: str = "validation") -> WithValidation:
    """Run `ft.evaluate(evaluator, state, val_data)` at epoch ends and/or every N steps.

    Results join that step's (or epoch end's) metrics with `val_` before their names;
    a dict of validation sets gives `val_<set>_<metric>`. `limit_val_batches` caps each
    run; `sanity_steps` batches run before training starts (not logged, not counted).
    Validation also runs after the last epoch when `every_n_epochs` does not divide it.

    Examples:
        >>> import torch, ftrain as ft
        >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> step = ft.with_validation(ft.train_step(loss), ft.eval_step(loss), data[:2])
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> for state, metrics in ft.iterate(step, state, data, epochs=1):
        ...     pass
        >>> sorted(metrics), state.slots["validation"]["checks"]
        (['loss', 'val_loss'], 1)
    """
    return WithValidation(step, evaluator, val_data, every_n_epochs=every_n_epochs,
                          every_n_steps=every_n_steps, sanity_steps=sanity_steps,
                          limit_val_batches=limit_val_batches, prefix=prefix, name=name)
