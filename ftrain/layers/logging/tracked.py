"""What the experiment-tracker loggers share: the run they write to is kept in the state.

A tracker logger (MLflow, W&B, DVCLive) has, beside `log_metrics`, `log_hparams` and
`finalize`, an `attach(saved, step) -> dict` method: `with_logging` calls it on rank 0 at
init with what the same logger returned in the run being resumed (None for a fresh run)
and the state's step, and keeps the returned dict (the tracker's run id: plain strings and
numbers) in its slot. So a checkpoint names the tracker run, and `resume="auto"`
continues that run instead of opening a new one.

A resumed run recomputes, bitwise, the steps the killed process ran after its last
checkpoint, and some of them may already be in the tracker. Where the tracker says which
step it holds last, the logger skips steps up to that one (`Resumed`): each step appears
once, with the value an uninterrupted run would have logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from ftrain.errors import CheckpointError

log = logging.getLogger("ftrain")

# A run record read back from a checkpoint is untrusted: flat, small, plain values.
_PLAIN = (str, int, float, bool, type(None))


def check_saved(saved: Any, key: str) -> dict[str, Any] | None:
    """A tracker's saved run record as read from a state (None: none saved), checked."""
    if saved is None:
        return None
    if not isinstance(saved, Mapping) or not all(
            isinstance(k, str) and isinstance(v, _PLAIN) for k, v in saved.items()):
        raise CheckpointError(f"the logging slot's tracker record {key!r} must be a flat dict "
                              f"of strings and numbers, found {str(saved)[:120]}")
    return dict(saved)


def tracker_keys(loggers: list[Any]) -> list[tuple[str, Any]]:
    """(key, logger) for each logger with `attach`: its class name and its index among
    loggers of that class, so two MLflow loggers of one run keep their own runs."""
    seen: dict[str, int] = {}
    out = []
    for logger in loggers:
        if not callable(getattr(logger, "attach", None)):
            continue
        name = type(logger).__name__
        out.append((f"{name}:{seen.get(name, 0)}", logger))
        seen[name] = seen.get(name, 0) + 1
    return out


class Resumed:
    """Skips the steps a resumed run recomputes that the tracker already holds.

    `resume_at(step, last)`: the run continues after `step`; the tracker holds steps up to
    `last` (None: unknown). Steps up to `last` are then skipped (they were logged by the
    killed process, with the same values).
    """

    skip_through: int = -1

    def resume_at(self, step: int, last: int | None, tracker: str) -> None:
        if last is None:
            log.warning("%s: resumed at step %d; the tracker cannot say which steps it "
                        "holds, so steps after %d logged by the interrupted run appear "
                        "twice", tracker, step, step)
            return
        self.skip_through = last
        if last > step:
            log.info("%s: resumed at step %d; steps up to %d are already logged and are "
                     "not logged again", tracker, step, last)
        elif last < step:
            log.warning("%s: resumed at step %d but the tracker's last step is %d: what the "
                        "interrupted run logged in between was lost with it", tracker, step,
                        last)

    def fresh(self, step: int) -> bool:
        """Whether `step` is still to be logged (not already in the tracker)."""
        return step > self.skip_through


_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def safe_name(name: str) -> str:
    """A metric name MLflow accepts: characters other than letters, digits and `_-./ `
    become `_`."""
    return _BAD_CHARS.sub("_", name)
