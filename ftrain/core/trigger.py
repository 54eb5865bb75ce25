"""When a layer acts: every n steps, every n completed epochs, and at the run's last epoch.

One record for what validation, checkpointing, hooks and logging each used to spell out:
a step is due when `state.step` (after the step) is a multiple of `every_n_steps`; an
epoch end is due when the epoch was completed (not cut short by `max_steps` or a stop)
and the number of completed epochs is a multiple of `every_n_epochs`, or, with
`on_last`, it is the run's last epoch. All host ints: no sync.
"""

from __future__ import annotations

from typing import Any

import attrs

from ftrain.core.run import run_info
from ftrain.core.state import LOOP_SLOT
from ftrain.errors import ConfigError, check_int


@attrs.frozen
class Trigger:
    """Every `every_n_steps` steps and/or every `every_n_epochs` completed epochs.

    Examples:
        >>> from ftrain.core.trigger import Trigger
        >>> t = Trigger(every_n_steps=10)
        >>> t.step_due(20), t.step_due(25)
        (True, False)
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    on_last: bool = False  # the run's last epoch is due whatever every_n_epochs says

    def __attrs_post_init__(self) -> None:
        check_int("every_n_steps", self.every_n_steps, 1)
        check_int("every_n_epochs", self.every_n_epochs, 1)

    def require(self, who: str) -> Trigger:
        """This trigger, or an error naming `who` when it would never fire."""
        if self.every_n_steps is None and self.every_n_epochs is None:
            raise ConfigError(f"{who} needs every_n_steps= or every_n_epochs=")
        return self

    def step_due(self, step: int) -> bool:
        """True when the step that just made `state.step == step` is due."""
        n = self.every_n_steps
        return n is not None and step % n == 0

    def epoch_due(self, state: Any, *, completed: bool | None = None) -> bool:
        """True at an epoch end that is due. `completed` overrides whether the epoch ran
        to its end (validation counts a fast_dev_run's epoch)."""
        n = self.every_n_epochs
        if n is None:
            return False
        pos = state.slots.get(LOOP_SLOT) or {"epoch": 0, "batch": 0}
        if completed is None:
            completed = ended_epoch(state)
        if not completed:
            return False
        if pos["epoch"] % n == 0:
            return True
        return self.on_last and last_epoch(state)


def ended_epoch(state: Any) -> bool:
    """True at the end of a completed epoch (the loop's position is at a batch 0)."""
    pos = state.slots.get(LOOP_SLOT) or {"epoch": 0, "batch": 0}
    return bool(pos["batch"] == 0)


def last_epoch(state: Any) -> bool:
    """True when the loop running `state` has completed the epochs it was asked for."""
    run = run_info(state)
    pos = state.slots.get(LOOP_SLOT) or {"epoch": 0, "batch": 0}
    return bool(run is not None and run.epochs is not None and pos["epoch"] >= run.epochs)
