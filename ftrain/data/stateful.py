"""Data that keeps its own position: its state saved in the loop slot, restored by
`load_state_dict` instead of skipping batches.

ftrain continues map-style data by skipping the consumed batches by index (nothing is read
twice). A loader or stream that keeps its own position cannot be skipped that way:
re-reading a stream to skip would read it twice. Such data is used as it is (never
re-seeded, rebuilt or skipped by ftrain; a sampler's `set_epoch` is still called) and its
own `state_dict()` is the position:

- the data itself when it has `state_dict()` and `load_state_dict()` (torchdata's
  `StatefulDataLoader`, a streaming loader);
- else the `IterableDataset` of a plain `DataLoader` with `num_workers=0`, if it has them
  (with workers the dataset's copies live in the worker processes, out of reach).

What is saved: `state.slots["loop"]["data"]`, a list of every process's state indexed by
rank (under with_ddp gathered from all ranks, so the checkpoint rank 0 writes holds each
rank's own), valid for the slot's (epoch, batch) only: the loop drops it whenever the
position moves.

When it is taken: a `StatefulDataLoader.state_dict()` took 35-270 us here (10x fetching a
small batch), so never per step in the usual case. The loop reads the state at a step
boundary *before* it fetches the next batch (after the fetch the loader is one batch
ahead of the position), and only when the position is about to be published: a checkpoint
save a layer requested during the step (saves are deferred to the step boundary), a
signal (read before the fetch), the end of the loop, an epoch end (the data exhausted).
One exception: under with_ddp with data without a length the ranks agree on a signal only
after the fetch (they must also agree that each has a next batch), so there each rank
reads its own state before every fetch (no collective; such a step already pays a
synchronous exchange, about 2 ms on this machine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, IterableDataset

from ftrain.errors import DataError

DATA = "data"  # the loop slot's field: per-rank states of data that keeps its own position


def has_state(obj: Any) -> bool:
    """Whether `obj` keeps its own position: it has `state_dict()` and `load_state_dict()`.

    Examples:
        >>> class Stream:
        ...     def __iter__(self): ...
        ...     def state_dict(self): return {"read": 0}
        ...     def load_state_dict(self, state): ...
        >>> has_state(Stream()), has_state([1, 2])
        (True, False)
    """
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None))


def source_of(data: Any) -> Any:
    """The object whose `state_dict()` is `data`'s position, or None (see the module)."""
    if has_state(data):
        return data
    if isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset) and \
            has_state(data.dataset) and data.num_workers == 0:
        return data.dataset
    return None


def unreachable_state(data: Any) -> bool:
    """A plain DataLoader with workers over a dataset that has a state: out of reach."""
    return isinstance(data, DataLoader) and data.num_workers > 0 and has_state(data.dataset)


class Keeper:
    """The position of one loop's data that keeps its own: read, gathered, restored.

    `ahead` (kept by the loop): a batch was fetched that the position does not count yet.
    `exhausted`: the current epoch's data ended (the loop fetched its end), so a state read
    at the next epoch's start describes that start. `every_step`: read this rank's state
    before every fetch (with_ddp on data without a length; see the module).
    """

    def __init__(self, source: Any, rank: int, world: int) -> None:
        self.source, self.rank, self.world = source, rank, world
        self.group: Any = None  # the loop's gloo group under with_ddp (for the gather)
        self.ahead = False
        self.exhausted = False
        self.every_step = False
        self._local: Any = None
        self._at: tuple[int, int] | None = None  # the (epoch, batch) `_local` belongs to

    def snap(self, pos: dict[str, Any]) -> None:
        """Read this rank's state now: call at a step boundary, before the next fetch."""
        where = (pos["epoch"], pos["batch"])
        if self._at != where:
            self._local, self._at = self._state(), where

    def publish(self, pos: dict[str, Any]) -> bool:
        """Put every rank's state for `pos`'s position in it (a collective under with_ddp:
        every rank calls it at the same boundary). False when that position's state cannot
        be read: the loader is a batch ahead, or an epoch ended before the data did
        (limit_train_batches)."""
        if DATA in pos:
            return True
        where = (pos["epoch"], pos["batch"])
        if self._at != where:
            if self.ahead or (where[1] == 0 and not self.exhausted):
                return False
            self._local, self._at = self._state(), where
        pos[DATA] = self._gather(self._local)
        return True

    def restore(self, states: list[Any], start: Callable[[], Iterator[Any]]
                ) -> Iterator[Any]:
        """Give the data this rank's saved state (the world size checked before), then
        `start()` iterating it; a state the data rejects is a DataError (a loader may
        read it only when iterated: torchdata's does)."""
        # a loader's state is host data (a sampler's generator state must be a CPU byte
        # tensor); loading a checkpoint onto a GPU state moved its tensors there
        mine = pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t,
                               states[self.rank])
        try:
            self.source.load_state_dict(mine)
            return start()
        except Exception as err:
            raise DataError(f"the saved position of the data ({type(self.source).__name__}"
                            f".load_state_dict) does not fit this data: "
                            f"{type(err).__name__}: {err}") from err

    def _state(self) -> Any:
        state = self.source.state_dict()  # the cost this module is about
        if not isinstance(state, dict):
            raise DataError(f"{type(self.source).__name__}.state_dict() must return a dict "
                            f"(saved in checkpoints), got {type(state).__name__}")
        return state

    def _gather(self, mine: Any) -> list[Any]:
        if self.world == 1:
            return [mine]
        import torch.distributed as dist
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, mine, group=self.group)  # host round-trip
        return states


def check_saved(states: Any, keeper: Keeper | None, world: int) -> None:
    """A saved data state against this run: per-rank states need the same world size."""
    if keeper is None or states is None:
        return
    if len(states) != world:
        raise DataError(
            f"this state holds the positions of {len(states)} per-process data loaders "
            f"(saved under {len(states)} process(es)); this run has {world}. A loader's own "
            f"state cannot be dealt out to another number of processes: resume with "
            f"{len(states)} process(es), or drop it (state.slots['loop'].pop('data')) to "
            f"start the loaders afresh, away from the saved position")
