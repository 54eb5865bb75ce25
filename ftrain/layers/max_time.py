"""`with_max_time`: stop training after a wall-clock budget, with a checkpoint.

Lightning's `Trainer(max_time=...)`: the layer reads the host clock after each step (no
device sync) and, once the budget is spent, asks the loop to stop (`ft.request_stop`); at
the epoch end the loop then runs, it asks the checkpointing layers inside it to save
(`last.ckpt`, as on SIGTERM), so the checkpoint holds that epoch end's work too. The time
spent so far lives in its slot, so a resumed run counts on from it, as Lightning's
`Timer` does. Under `with_ddp` ranks see the clock at slightly different moments, so
they agree: each sends "time is up" in an asynchronous all-reduce (a gloo group of the
layer's own, host tensors) every few steps and all act on the result at the same later
step, so every rank stops after the same step.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import torch

from ftrain.core import slots as _slots
from ftrain.core.layer import Combinator, Metrics, request
from ftrain.core.run import run_info
from ftrain.core.state import TrainState
from ftrain.core.step import request_stop
from ftrain.errors import ConfigError

log = logging.getLogger("ftrain")
_FIELDS = {"elapsed": (_slots.number, "a number of seconds >= 0")}
_WRITE_EVERY_S = 1.0  # the slot's elapsed time is refreshed at most this often
CHECK_PERIOD_S = 0.25  # under with_ddp: about this long between agreements
_MAX_INTERVAL = 1000
_DHMS = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})$")


def seconds(max_time: Any) -> float:
    """`max_time` in seconds: a number of seconds, a `datetime.timedelta`, a dict of
    timedelta's arguments (`{"hours": 2}`) or a "DD:HH:MM:SS" string, as Lightning.

    Examples:
        >>> import datetime
        >>> from ftrain.layers.max_time import seconds
        >>> seconds("00:01:30:00"), seconds(datetime.timedelta(minutes=2)), seconds(5)
        (5400.0, 120.0, 5.0)
    """
    if isinstance(max_time, bool):
        value = None
    elif isinstance(max_time, (int, float)):
        value = float(max_time)
    elif isinstance(max_time, datetime.timedelta):
        value = max_time.total_seconds()
    elif isinstance(max_time, Mapping):
        try:
            value = datetime.timedelta(**max_time).total_seconds()
        except TypeError as err:
            raise ConfigError(f"max_time as a dict takes datetime.timedelta's arguments "
                              f"(days, hours, minutes, seconds), got {dict(max_time)}: "
                              f"{err}") from err
    elif isinstance(max_time, str):
        match = _DHMS.match(max_time.strip())
        if match is None:
            raise ConfigError(f"max_time as a string must be 'DD:HH:MM:SS' (e.g. "
                              f"'00:12:00:00' for 12 hours), got {max_time!r}")
        d, h, m, s = (int(g) for g in match.groups())
        value = float(((d * 24 + h) * 60 + m) * 60 + s)
    else:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise ConfigError(f"max_time must be a positive number of seconds, a timedelta, a "
                          f"dict such as {{'hours': 2}} or 'DD:HH:MM:SS', got {max_time!r}")
    return value


class _Agreement:
    """Ranks agree on a flag at the same step: an asynchronous MAX all-reduce every
    `interval` calls, read at the next exchange (its latency overlaps training). The
    interval adapts to the slowest rank's step time, agreed in the same all-reduce."""

    def __init__(self) -> None:
        import torch.distributed as dist

        from ftrain.parallel import dist as _dist
        self.group = dist.new_group(backend="gloo",
                                    timeout=_dist._timeout or _dist.DEFAULT_TIMEOUT)
        self._sent = torch.zeros(2, dtype=torch.int64)
        self._work: Any = None
        self._count = 0
        self._interval = 1
        self._since = time.perf_counter()

    def exchange(self, flag: bool) -> bool:
        """Whether some rank's flag was set at an earlier exchange (the same answer, at the
        same call, on every rank)."""
        self._count += 1
        if self._count < self._interval:
            return False
        import torch.distributed as dist
        now = time.perf_counter()
        agreed = False
        if self._work is not None:
            self._work.wait()  # started an interval ago: normally done already
            agreed, slowest_us = bool(self._sent[0]), max(int(self._sent[1]), 1)
            self._interval = max(1, min(_MAX_INTERVAL, int(CHECK_PERIOD_S * 1e6 / slowest_us)))
        step_us = int((now - self._since) / self._count * 1e6)
        self._count, self._since = 0, now
        self._sent = torch.tensor([int(flag), step_us], dtype=torch.int64)
        self._work = dist.all_reduce(self._sent, op=dist.ReduceOp.MAX, group=self.group,
                                     async_op=True)
        return agreed

    def close(self) -> None:
        import torch.distributed as dist
        work, self._work = self._work, None
        with contextlib.suppress(Exception):
            if work is not None:
                work.wait()  # every rank started it: it completes
        with contextlib.suppress(Exception):
            dist.destroy_process_group(self.group)


class WithMaxTime(Combinator):
    """The combinator built by `with_max_time`."""

    def __init__(self, inner: Any, max_time: Any, *, name: str = "max_time") -> None:
        super().__init__(inner, name)
        self.name = name
        self.max_time = max_time
        self.limit_s = seconds(max_time)
        self._start: float | None = None  # monotonic clock minus the time already spent
        self._written = 0.0
        self._agree: _Agreement | None = None
        self._save_at: int | None = None  # the step the time ran out at
        self._checked()

    def __repr__(self) -> str:
        return f"with_max_time({self.limit_s:g} s)"

    def _elapsed_before(self, state: TrainState) -> float:
        slot = state.slots.get(self.name)
        if slot is None:
            return 0.0
        _slots.check(slot, self.name, _FIELDS)
        elapsed = float(slot["elapsed"])
        if elapsed < 0:
            raise ConfigError(f"the {self.name!r} slot says {elapsed} s elapsed; expected "
                              "a number >= 0")
        return elapsed

    def _record(self, state: TrainState, now: float) -> TrainState:
        self._written = now
        assert self._start is not None
        slot = {"elapsed": now - self._start}
        return state.replace(slots={**state.slots, self.name: slot})

    def after_init(self, state: TrainState) -> TrainState:
        now = time.monotonic()
        self._start = now - self._elapsed_before(state)
        self._save_at = None
        run = run_info(state)
        self._close_agreement()
        if run is not None and run.world > 1:  # every rank's init: a collective
            self._agree = _Agreement()
        return self._record(state, now)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        state, metrics = self.inner(state, batch)
        now = time.monotonic()  # a host clock read: no device sync
        if self._start is None:  # called without a loop's init
            self._start = now - self._elapsed_before(state)
        own = up = now - self._start >= self.limit_s
        if self._agree is not None:
            up = self._agree.exchange(own)
        if up:
            state = self._record(state, now)
            reason = (f"max_time: {now - self._start:.1f} s spent, the budget is "
                      f"{self.limit_s:g} s" + ("" if own else " (another rank's is spent)"))
            state = request_stop(state, reason)
            self._save_at = state.step  # at the epoch end the loop runs next
            log.info("time is up at step %d: %s", state.step, reason)
        elif now - self._written >= _WRITE_EVERY_S:
            state = self._record(state, now)  # what a checkpoint saved now will hold
        return state, metrics

    def at_epoch_end(self, state: TrainState, metrics: Metrics
                     ) -> tuple[TrainState, Metrics]:
        if self._start is not None:  # saves at the epoch end run after the whole stack
            state = self._record(state, time.monotonic())
        if self._save_at is not None and self._save_at == state.step:
            # After the stop request the loop ends the epoch here (its end-of-epoch work,
            # validation included, ran inside): save now, as on SIGTERM, so a resume
            # neither repeats nor skips any of it.
            self._save_at = None
            state, saved = request(self.inner, state, "save")
            if saved:
                log.info("max_time: saved %s at step %d", ", ".join(saved), state.step)
        return state, metrics

    def _close_agreement(self) -> None:
        if self._agree is not None:
            agree, self._agree = self._agree, None
            agree.close()

    def at_close(self, state: TrainState) -> None:
        self._close_agreement()


def with_max_time(step: Any, max_time: Any, *, name: str = "max_time") -> WithMaxTime:
    """Stop training once `max_time` of wall-clock time is spent, saving a checkpoint.

    `max_time`: seconds, a `datetime.timedelta`, a dict such as `{"hours": 2}` or a
    "DD:HH:MM:SS" string (Lightning's `Trainer(max_time=...)`). Checked after each step
    on the host clock; when the time is up, the checkpointing layers inside it save
    `last.ckpt` at the epoch end the loop then runs (validation inside it included) and the
    loop stops (`ft.stop_reason(state)` says why). The time spent is
    kept in the state (`slots[name]["elapsed"]`, refreshed about once a second and at
    every stop and epoch end), so a resumed run counts on from it. Under `with_ddp`
    every rank stops after the same step. `ft.fit(..., max_time=...)` adds it.

    Examples:
        >>> import torch, ftrain as ft
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state = ft.fit(ft.with_max_time(step, 1e-9), state, data, epochs=5,
        ...                logger=False, checkpoint=False, progress=False)
        >>> state.step, ft.stop_reason(state).startswith("max_time")
        (1, True)
    """
    return WithMaxTime(step, max_time, name=name)
