"""Ranks agree at step boundaries: when to stop on a signal, and that all have a batch.

A SIGTERM (preemption) or Ctrl-C reaches the ranks at slightly different moments; each
acting on its own would leave one rank saving and waiting while another is already in the
next step's gradient all-reduce (a deadlock until torchrun kills the job). So the loop
exchanges the signals it has seen at every step boundary, on a gloo group of its own
(host tensors: no device sync, whatever the training backend):

- data with a length (checked equal on every rank at the start) exchanges every k steps,
  asynchronously: what is sent at one exchange is read at the next, so the collective's
  latency overlaps training and every rank stops after the same step. k adapts so that
  exchanges are about CHECK_PERIOD_S apart (the slowest rank's step time, agreed in the
  same all-reduce, so every rank computes the same k): a signal takes effect within about
  twice that, and a tiny model's fast steps do not pay a round-trip each (one gloo
  round-trip cost ~2 ms on this 2-core machine, as much as such a step);
- data without a length also needs to know, before each step, that every rank has a batch
  (a rank whose data ended early would otherwise go to its epoch end while the others
  start a step: a collective mismatch). That exchange is synchronous, once per step.

`benchmarks/ddp.py` measures what this costs, from `COST` (summed over this process's
loops, updated on exchange steps only: a boundary between exchanges stays a counter).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist

from ftrain.errors import DataError
from ftrain.parallel import dist as _dist

_KINDS = ("SIGTERM", "SIGINT")
CHECK_PERIOD_S = 0.25
_MAX_INTERVAL = 1000


class Cost:
    """What the boundary exchanges of this process's loops have cost so far.

    Examples:
        >>> from ftrain.parallel.lockstep import COST
        >>> COST.boundaries >= COST.exchanges >= 0 and COST.seconds >= 0.0
        True
    """

    def __init__(self) -> None:
        self.boundaries = 0  # step boundaries passed under a Lockstep
        self.exchanges = 0  # collectives started
        self.seconds = 0.0  # main-thread time in exchange steps and in closes' last waits

    def add(self, boundaries: int, exchanges: int, seconds: float) -> None:
        """Count one exchange step's (or a close's) boundaries, collectives and time."""
        self.boundaries += boundaries
        self.exchanges += exchanges
        self.seconds += seconds


COST = Cost()


class Lockstep:
    """The boundary exchange of one loop under `with_ddp` (world > 1)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        # every rank creates it at the same point of the loop (a collective); its waits
        # are bounded as with_ddp's own collectives are
        self.group = dist.new_group(backend="gloo",
                                    timeout=_dist._timeout or _dist.DEFAULT_TIMEOUT)
        self._sent = torch.zeros(len(_KINDS) + 2, dtype=torch.int64)
        self._work: Any = None
        self._steps = 0  # boundaries since the last exchange (the same on every rank)
        self._interval = 1
        self._since = time.perf_counter()

    def check_epoch_length(self, batches: int | None, epoch: int) -> None:
        """All ranks must run the same number of steps in an epoch (one gather)."""
        lengths: list[Any] = [None] * self.world
        dist.all_gather_object(lengths, batches, group=self.group)
        if any(n != lengths[0] for n in lengths):
            shown = ", ".join(f"rank {r}: {'no length' if n is None else n}"
                              for r, n in enumerate(lengths))
            raise DataError(f"ranks have different numbers of batches in epoch {epoch} "
                            f"({shown}); every rank must run the same number of steps, or "
                            "the ranks' gradient all-reduces stop matching. Shard with "
                            "with_ddp's own sharding (a DataLoader over a map-style "
                            "dataset, or one list of batches given to every rank)")

    def exchange(self, signals: list[str], has_next: bool, sized: bool, epoch: int,
                 batches: int) -> str | None:
        """The signal all ranks act on after this step (None: go on). With `sized`
        False, also check that every rank has a next batch, or none has."""
        if sized:
            self._steps += 1
            if self._steps < self._interval:
                return None  # not an exchange step: a counter, nothing else
            start = time.perf_counter()
            agreed = self._finish_previous()  # what every rank sent at the last exchange
            # steps since the last exchange began: the exchange's own cost included
            step_us = int((start - self._since) / self._steps * 1e6)
            steps, self._steps, self._since = self._steps, 0, start
            flags = [int(kind in signals) for kind in _KINDS]
            self._sent = torch.tensor([*flags, step_us, 0], dtype=torch.int64)
            self._work = dist.all_reduce(self._sent, op=dist.ReduceOp.MAX, group=self.group,
                                         async_op=True)
            COST.add(steps, 1, time.perf_counter() - start)
            return agreed
        start = time.perf_counter()
        flags = [int(kind in signals) for kind in _KINDS]
        self._finish_previous()
        sent = torch.tensor([*flags, int(has_next), int(not has_next)], dtype=torch.int64)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=self.group)  # host round-trip
        if sent[-2] and sent[-1]:  # some ranks have a next batch, some do not
            self._mismatch(has_next, epoch, batches)
        COST.add(1, 1, time.perf_counter() - start)
        return _first(sent.tolist())

    def _finish_previous(self) -> str | None:
        if self._work is None:
            return None
        self._work.wait()
        self._work = None
        values = self._sent.tolist()
        slowest_us = max(values[len(_KINDS)], 1)  # the same on every rank: a MAX
        self._interval = max(1, min(_MAX_INTERVAL, int(CHECK_PERIOD_S * 1e6 / slowest_us)))
        return _first(values)

    def _mismatch(self, has_next: bool, epoch: int, batches: int) -> None:
        seen: list[Any] = [None] * self.world
        dist.all_gather_object(seen, (batches, has_next), group=self.group)
        ended = [f"rank {r} after {n}" for r, (n, more) in enumerate(seen) if not more]
        going = [f"rank {r}" for r, (_, more) in enumerate(seen) if more]
        raise DataError(f"ranks ran out of batches at different steps in epoch {epoch}: "
                        f"{', '.join(ended)} batches, while {', '.join(going)} had more. "
                        "Every rank must run the same number of steps (an iterable dataset "
                        "must yield as many batches on every rank)")

    def close(self, failed: bool) -> None:
        """Finish the last exchange (all ranks, so the next collective matches); after a
        failure the group is going down and nothing is waited for."""
        try:
            if not failed:
                start = time.perf_counter()
                self._finish_previous()
                COST.add(self._steps, 0, time.perf_counter() - start)
                self._steps = 0
        finally:
            self._work = None
            with contextlib.suppress(Exception):  # local: frees its sockets and threads
                dist.destroy_process_group(self.group)


def agree(signals: list[str], lock: Lockstep | None, has_next: bool, sized: bool,
          epoch: int, batches: int) -> str | None:
    """The signal every rank acts on after this step (None: go on); one list read on a
    single process. The agreed one goes first in `signals`, so fit exits as it asks."""
    got = signals[0] if signals else None
    if lock is not None:  # with_ddp: every rank acts on the same step
        got = lock.exchange(signals, has_next, sized, epoch, batches)
        if got is not None:
            signals[:] = [got, *(s for s in signals if s != got)]
    return got


def _first(flags: list[int]) -> str | None:
    for kind, flag in zip(_KINDS, flags):
        if flag:
            return kind
    return None
