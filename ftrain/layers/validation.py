"""`with_validation`: evaluate at epoch ends, every N steps or at fractions of an epoch,
merge `val_*` metrics.

Several validation sets (a dict name -> data, or a list of DataLoaders as Lightning's
`val_dataloader` returns) each get their own names: `val_<name>_<metric>`, `val_<i>_<metric>`.
Before the first training step it runs `sanity_steps` batches of each validation set (as
Lightning's sanity check) so a bug in evaluation shows in seconds, not after an epoch;
those are neither logged nor counted. Each real validation counts as one check in the
layer's slot (early stopping's patience counts these checks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from ftrain.core import health
from ftrain.core import slots as _slots
from ftrain.core.layer import Combinator, Metrics
from ftrain.core.run import run_info
from ftrain.core.state import LOOP_SLOT, TrainState
from ftrain.core.trigger import Trigger, ended_epoch
from ftrain.data.module import Data, resolve
from ftrain.errors import ConfigError, DataError, check_int
from ftrain.loops.evaluate import evaluate

SLOT_FIELDS = {"checks": (_slots.count, "an int >= 0"),
               "last": (_slots.dict_of(_slots.number), "a dict of numbers"),
               "step": (_slots.optional(_slots.count), "an int >= 0")}


def validation_sets(val_data: Any) -> dict[str | None, Any]:
    """The validation sets in `val_data`, by the name their metrics carry (None: one set,
    plain `val_<metric>` names).

    A dict maps names to data; a list or tuple of DataLoaders (Lightning's
    `val_dataloader` returning several) names them "0", "1", ... (one DataLoader in a
    list is one set, as in Lightning); anything else (a DataLoader, a list of batches) is
    one set.

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from ftrain.layers.validation import validation_sets
        >>> a, b = DataLoader(torch.randn(4, 3)), DataLoader(torch.randn(2, 3))
        >>> sorted(validation_sets([a, b])), list(validation_sets({"easy": a}))
        (['0', '1'], ['easy'])
    """
    if isinstance(val_data, Mapping):
        if not val_data:
            raise ConfigError("the validation data is an empty dict; give at least one "
                              "name -> data")
        for key, value in val_data.items():
            if not isinstance(key, str) or not key or not key.replace("_", "").isalnum():
                raise ConfigError(f"validation set names must be non-empty strings of "
                                  f"letters, digits and '_' (they go into metric names), "
                                  f"got {key!r}")
            if value is None or isinstance(value, (Mapping, torch.Tensor)):
                raise DataError(f"validation set {key!r} must be a DataLoader or a list of "
                                f"batches, got {type(value).__name__}")
        return dict(val_data)
    if isinstance(val_data, (list, tuple)) and val_data:
        loaders = [isinstance(item, DataLoader) for item in val_data]
        if all(loaders):
            if len(val_data) == 1:
                return {None: val_data[0]}
            return {str(i): item for i, item in enumerate(val_data)}
        if any(loaders):
            kinds = sorted({type(item).__name__ for item in val_data})
            raise DataError(f"the validation data is a list mixing DataLoaders with other "
                            f"items ({kinds}): give a list of DataLoaders (several sets), a "
                            "dict name -> data, or one list of batches")
    return {None: val_data}


def _fraction(every_n_epochs: Any) -> float | None:
    """The epoch fraction of a fractional `every_n_epochs` (0 < f < 1), else None."""
    if isinstance(every_n_epochs, float):
        if not 0.0 < every_n_epochs < 1.0 and not (every_n_epochs >= 1 and
                                                  every_n_epochs.is_integer()):
            raise ConfigError(f"every_n_epochs must be an int >= 1 or a fraction of an "
                              f"epoch in (0, 1) (e.g. 0.25: four times an epoch), got "
                              f"{every_n_epochs}")
        return every_n_epochs if every_n_epochs < 1.0 else None
    return None



class WithValidation(Combinator):
    """The combinator built by `with_validation`."""

    def __init__(self, inner: Any, evaluator: Callable[[TrainState, Any], Metrics],
                 val_data: Any, *, every_n_epochs: int | float | None = 1,
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
        self.fraction = _fraction(every_n_epochs)
        # a fraction validates at its multiples within the epoch and at every epoch end;
        # a whole float (2.0) is that many epochs
        epochs = 1 if self.fraction else (int(every_n_epochs) if isinstance(
            every_n_epochs, float) else every_n_epochs)
        self.trigger = Trigger(every_n_steps, epochs, on_last=True).require("with_validation")
        self.evaluator = evaluator
        # an ft.Data is split (and its val split expanded into sets) when first evaluated
        self.val_data = val_data
        self.sets = None if isinstance(val_data, Data) else validation_sets(val_data)
        self._due: tuple[int, frozenset[int]] | None = None  # (epoch length, batches due)
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

    def _sets(self) -> dict[str | None, Any]:
        if self.sets is not None:
            return self.sets
        return validation_sets(resolve(self.val_data, "val"))  # Data caches its split

    def _fraction_due(self, state: TrainState) -> bool:
        """True after a batch at a multiple of the epoch fraction (not the epoch's last:
        the epoch end validates). Host ints only."""
        run = run_info(state)
        if run is None:
            return False  # a direct call: no epoch to divide
        n = run.epoch_length
        if n is None:
            raise ConfigError("with_validation(every_n_epochs=<fraction>) needs training "
                              "data with a length (an epoch to divide); this data has none "
                              "(an iterable dataset?): use every_n_steps= instead")
        if self._due is None or self._due[0] != n:
            k = math.floor(1.0 / self.fraction + 1e-9)  # type: ignore[operator]
            due = {math.floor(i * self.fraction * n + 1e-9)  # type: ignore[operator]
                   for i in range(1, k + 1)}
            self._due = (n, frozenset(b for b in due if 0 < b < n))
        batch = state.slots.get(LOOP_SLOT, {}).get("batch", 0)
        return batch in self._due[1]

    def _limit(self, state: TrainState, limit: int | None) -> int | None:
        run = run_info(state)
        if run is not None and run.fast_dev_run:
            return run.fast_dev_run if limit is None else min(limit, run.fast_dev_run)
        return limit

    def _evaluate(self, state: TrainState, limit: int | None) -> dict[str, float]:
        run = run_info(state)
        show = bool(run is not None and run.progress)
        out: dict[str, float] = {}
        for set_name, data in self._sets().items():
            # an ft.Data as a set: its val split (evaluate alone would prefer test)
            values = evaluate(self.evaluator, state, resolve(data, "val"), limit_batches=limit,
                              numbers_only=True, progress=show,
                              desc="validation" if set_name is None
                              else f"validation {set_name}")
            head = self.prefix if set_name is None else f"{self.prefix}{set_name}_"
            for key, value in values.items():
                if head + key in out:  # e.g. sets "a" and "a_b", metrics "b_loss", "loss"
                    raise ConfigError(f"validation sets give two metrics named "
                                      f"{head + key!r} (set {set_name!r}'s {key!r} and "
                                      f"another set's): rename a set or a metric")
                out[head + key] = value
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
        if self.trigger.step_due(state.step) or (self.fraction and
                                                 self._fraction_due(state)):
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
                    *, every_n_epochs: int | float | None = 1,
                    every_n_steps: int | None = None,
                    sanity_steps: int = 2, limit_val_batches: int | None = None,
                    prefix: str = "val_", name: str = "validation") -> WithValidation:
    """Run `ft.evaluate(evaluator, state, val_data)` at epoch ends and/or every N steps.

    Results join that step's (or epoch end's) metrics with `val_` before their names.
    Several validation sets: a dict name -> data gives `val_<name>_<metric>`, a list of
    DataLoaders (Lightning's `val_dataloader`) `val_0_<metric>`, `val_1_<metric>`, ...;
    an `ft.Data` whose `val` is such a dict or list works the same. `limit_val_batches`
    caps each run of each set; `sanity_steps` batches of each set run before training
    starts (not logged, not counted). Validation also runs after the last epoch when
    `every_n_epochs` does not divide it. A fraction `every_n_epochs=0.25` (Lightning's
    `val_check_interval=0.25`) validates after the batches at each quarter of the epoch
    (as `limit_train_batches` and `with_ddp` make it) and at its end; it needs training
    data with a length.

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
