"""Where a loop's epoch begins in data it cannot skip by index, and what a loop leaves for
the next loop on the same data object.

Map-style data (a DataLoader over a map-style dataset, a list) continues by skipping the
consumed batches by index: exact, nothing read twice. Other data continues, in this order:

1. where a loop in this process left the same data object at this position (`ft.iterate`
   after a `break`, `err.state` after an exception, `fit` called again): its live
   iterator and the batch it had already read ahead are picked up. Exact, nothing read
   twice; this costs the loop nothing per step (only its exit records it).
2. data that keeps its own position (`ftrain.data.stateful`): the saved state in the
   loop slot is given back by `load_state_dict`. Exact.
3. otherwise (a new process without a saved state), with a warning each time: an
   iterable-style DataLoader or a stateful loader without its state is read again and the
   consumed batches dropped (exact only if it yields the same batches every time; a
   stream would be read twice); a one-shot iterator is read on from where it is (ftrain
   cannot know its position). A re-iterable collection whose `__iter__` starts over is
   re-read as documented, without a warning.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from ftrain.core.run import RunInfo
from ftrain.data import batches as _data
from ftrain.data.stateful import DATA, Keeper, check_saved, source_of, unreachable_state
from ftrain.parallel.lockstep import Lockstep, agree

log = logging.getLogger("ftrain")
NONE = object()  # no batch was read ahead


class _Left:
    """What a loop left on a data object: its position, the batch it had read ahead and
    not trained (or NONE), and the live iterator (None at an epoch boundary)."""

    def __init__(self, data: Any, where: tuple[int, int, int], batch: Any,
                 rest: Iterator[Any] | None) -> None:
        self.data, self.where, self.batch, self.rest = data, where, batch, rest


# The last few loops' leftovers. Bounded: a live iterator (a DataLoader's keeps its worker
# processes) is held only until a later loop takes it or pushes it out.
_LEFT: collections.deque[_Left] = collections.deque(maxlen=4)


def reads_once(data: Any) -> bool:
    """Whether the loop cannot restore `data`'s position by index (see the module)."""
    if isinstance(data, (list, tuple)):
        return False
    if isinstance(data, DataLoader):
        return source_of(data) is not None or isinstance(data.dataset, IterableDataset)
    return True


def leave(data: Any, where: tuple[int, int, int], batch: Any, rest: Iterator[Any] | None
          ) -> None:
    """Record where a loop stopped on `data` (step, epoch, batch), for the next loop."""
    _take(data, None)
    _LEFT.append(_Left(data, where, batch, rest))


def _take(data: Any, where: tuple[int, int, int] | None) -> _Left | None:
    """The leftover of a loop on `data` (dropped either way), if it stopped at `where`."""
    for left in list(_LEFT):
        if left.data is data:
            _LEFT.remove(left)
            return left if left.where == where else None
    return None


def keeper(data: Any, pos: dict[str, Any], run: RunInfo) -> Keeper | None:
    """The Keeper of `data` if it keeps its own position; a saved state that this data
    cannot take is dropped with a warning, one from another world size refused."""
    source = source_of(data)
    kept = Keeper(source, run.rank, run.world) if source is not None else None
    states = pos.get(DATA)
    if states is not None and kept is None:
        log.warning("this state holds a saved position of its data, but this data (%s) "
                    "has no state_dict/load_state_dict to take it: ignored",
                    type(data).__name__)
        pos.pop(DATA)
    check_saved(states, kept, run.world)
    return kept


def epoch_start(data: Any, given: Any, kept: Keeper | None, pos: dict[str, Any], *,
                seed: int, step: int, first: bool) -> Iterator[Any]:
    """This epoch's batches from the position in `pos`. `data` is what the loop iterates
    (this rank's share), `given` the data object the caller passed; `first`: the loop's
    first epoch (a later one just starts the data over)."""
    epoch, skip = pos["epoch"], pos["batch"]
    if kept is not None:
        kept.ahead = kept.exhausted = False
    if not first or not reads_once(given):
        return iter(_data.epoch_batches(data, seed=seed, epoch=epoch, skip=skip))
    left = _take(given, (step, epoch, skip))
    if left is not None and left.batch is not NONE:
        assert left.rest is not None
        return itertools.chain([left.batch], left.rest)
    if left is not None and left.rest is not None:
        return left.rest
    states = pos.get(DATA)
    if left is not None or (skip == 0 and (epoch == 0 or kept is None)):
        pass  # the start of an epoch: the data starts over as in a run never stopped
    elif kept is not None and states is not None:
        return kept.restore(states, lambda: iter(_data.epoch_batches(data, seed=seed,
                                                                      epoch=epoch)))
    else:
        return _unrestorable(data, given, kept, epoch, skip, seed)
    return iter(_data.epoch_batches(data, seed=seed, epoch=epoch, skip=skip))


def _unrestorable(data: Any, given: Any, kept: Keeper | None, epoch: int, skip: int,
                  seed: int) -> Iterator[Any]:
    """No saved state and no live iterator: warn, then do the best that can be known."""
    what = type(given).__name__
    if kept is not None and skip == 0:
        log.warning("continuing at the start of epoch %d in %s, which keeps its own "
                    "position, without a saved state of it (the epoch before ended at "
                    "limit_train_batches, or the state was saved without one): it starts "
                    "over, and its order may differ from a run that was never stopped",
                    epoch, what)
        return iter(_data.epoch_batches(data, seed=seed, epoch=epoch))
    if isinstance(given, Iterator):
        log.warning("continuing at batch %d of epoch %d in a one-shot iterator (%s): ftrain "
                    "cannot restore or check its position, so it is read on from where it "
                    "is (one that starts from its beginning trains its first %d batches "
                    "again). Data with state_dict/load_state_dict (torchdata's "
                    "StatefulDataLoader) resumes exactly", skip, epoch, what, skip)
        return iter(data)
    if kept is not None:
        why = ("it holds no saved state of this data, which keeps its own position (a "
               "checkpoint from before ftrain saved it, or a state saved while the loader "
               "had read ahead, e.g. ft.save of a state ft.iterate yielded; save with "
               "with_checkpointing for an exact resume)")
    elif unreachable_state(given):
        why = ("the dataset's state_dict lives in the DataLoader's worker processes "
               "(num_workers > 0), out of reach; use torchdata's StatefulDataLoader")
    elif isinstance(given, DataLoader):
        why = ("its IterableDataset has no state_dict/load_state_dict; give it those, or "
               "use torchdata's StatefulDataLoader")
    else:
        return iter(_data.epoch_batches(data, seed=seed, epoch=epoch, skip=skip))
    log.warning("continuing at batch %d of epoch %d in %s: its position cannot be "
                "restored, as %s. The %d consumed batches are read again and dropped: "
                "exact only if it yields the same batches in the same order every time (a "
                "stream would be read twice)", skip, epoch, what, why, skip)
    return iter(_data.epoch_batches(data, seed=seed, epoch=epoch, skip=skip))


class Track:
    """The loop's bookkeeping for data it cannot skip by index, one call per event: the
    batch read ahead and not counted yet (`held`), the data's own state (`kept`, a Keeper,
    for data that keeps its own position) and the hand-over to the next loop."""

    def __init__(self, given: Any, pos: dict[str, Any], run: RunInfo) -> None:
        self.given = given
        self.kept = keeper(given, pos, run)
        self.reads_once = reads_once(given)
        self.held: Any = NONE  # the batch read from the data, not counted by the position
        self.batches: Iterator[Any] | None = None
        self.mover: Any = None
        self._saved: Any = None  # the position's data state while a step runs

    def ddp(self, group: Any, unsized: bool) -> None:
        """Under with_ddp: the gather's group; on data without a length the ranks agree on
        a signal only after the next fetch, so each reads its state before every fetch."""
        if self.kept is not None:
            self.kept.group, self.kept.every_step = group, unsized

    def epoch(self, batches: Iterator[Any], mover: Any) -> Iterator[Any]:
        self.batches, self.mover = batches, mover
        return batches

    def fetched(self, nxt: Any, end: Any) -> Any:
        """A fetch returned `nxt` (`end`: the data ended)."""
        self.held = NONE if nxt is end else nxt
        if self.kept is not None:
            self.kept.ahead, self.kept.exhausted = nxt is not end, nxt is end
        return nxt

    def taken(self, pos: dict[str, Any]) -> None:
        """A step starts on the held batch: the position counts it."""
        self.held = NONE
        if self.kept is not None:  # its saved state was the position's before this step
            self._saved, self.kept.ahead = pos.pop(DATA, None), False

    def untaken(self, pos: dict[str, Any], index: int, batch: Any) -> None:
        """The step failed and was rolled back: its batch is read ahead again."""
        if pos["batch"] != index:
            return  # the core step finished: the batch was consumed
        self.held = batch
        if self.kept is not None:
            self.kept.ahead = True
            if self._saved is not None:
                pos[DATA] = self._saved

    def ended(self, complete_by_count: bool, end: Any) -> None:
        """The loop stops at an epoch's last batch without fetching (max_steps): read the
        data's end, so its state is the end's (not a batch before it)."""
        if self.kept is not None and complete_by_count and self.batches is not None:
            nxt = next(self.batches, end)
            # data longer than its len(): the extra batch is read ahead, not dropped
            self.fetched(nxt if nxt is end else self.mover.put(nxt), end)

    def before_fetch(self, pos: dict[str, Any], signals: list[str], lock: Lockstep | None,
                     sized: bool, epoch: int, index: int) -> tuple[bool, str | None]:
        """Before the next fetch: (decided, signal). Data that keeps its own position has
        the signal agreed now, when it can be, so a save on it gets the data's state from
        before the fetch; else (with_ddp, data without a length) its state is read before
        every fetch."""
        kept = self.kept
        if kept is None:
            return False, None
        if not kept.every_step:
            got = agree(signals, lock, True, sized, epoch, index)
            if got is not None:
                kept.snap(pos)
            return True, got
        kept.snap(pos)  # a state_dict() per step: see ftrain.data.stateful
        return False, None

    def publish(self, pos: dict[str, Any]) -> None:
        """The position is about to be saved: put the data's state in it (collective)."""
        if self.kept is not None:
            self.kept.publish(pos)

    def finish(self, pos: dict[str, Any], step_no: int, *, failed: bool) -> None:
        """The loop ends: record the data's state (not after a failure: no collective),
        and leave the live iterator and the batch read ahead for the next loop."""
        if not failed:
            self.publish(pos)
        if not self.reads_once or self.batches is None:
            return
        where = (step_no, pos["epoch"], pos["batch"])
        if self.held is not NONE:
            leave(self.given, where, self.mover.get(self.held), self.batches)
        else:
            leave(self.given, where, NONE, self.batches if pos["batch"] else None)
