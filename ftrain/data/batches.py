"""Batches for the loops: shuffling ordered by (seed, epoch), skipping, moving to a device.

`data` is a `DataLoader` or any re-iterable collection of batches (a list, a tuple, an
object whose `__iter__` starts over). A `DataLoader`'s random sampler (also the one
`shuffle=True` makes) is given a generator seeded from `(seed, epoch)` at the start of each
epoch, and the loader one for its worker seeds, so the order is a function of the state
and a resumed run sees the same batches. A `DistributedSampler` gets `set_epoch(epoch)`.
A loader that keeps its own position (`state_dict`/`load_state_dict`, e.g. torchdata's
`StatefulDataLoader`) is used as it is: never re-seeded, rebuilt or skipped by index (its
samplers still get `set_epoch`); its order and position are its own state
(`ftrain.data.stateful`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from ftrain.core import rng as _rng
from ftrain.data.stateful import has_state
from ftrain.errors import DataError

log = logging.getLogger("ftrain")


def _generator(*key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_rng.mix(*key))
    return g


# The main process's per-epoch base for sample_seed (workers derive theirs from the
# worker seed, which the loader draws from its (seed, epoch) generator).
_epoch_base: int = 0


def sample_seed(index: int) -> int:
    """A seed for randomly augmenting sample `index` in the current epoch of a loop.

    Call it in a Dataset's `__getitem__` and draw the augmentation from a generator seeded
    with it: the value depends only on (the run's seed, the epoch, `index`) — not on which
    worker loads the sample or in which order — so a resumed run augments every sample
    exactly as the uninterrupted run did (with the same `num_workers`). Randomness drawn
    from the worker's global generator is not exact across a mid-epoch resume.

    Examples:
        >>> import torch, ftrain as ft
        >>> g = torch.Generator().manual_seed(ft.sample_seed(7))
        >>> noise = torch.randn(3, generator=g)
    """
    info = torch.utils.data.get_worker_info()
    base = (info.seed - info.id) if info is not None else _epoch_base
    return _rng.mix(base, int(index), _rng.SAMPLE)


_warned_persistent = False


def _warn_persistent() -> None:
    global _warned_persistent
    _warned_persistent = True
    logging.getLogger("ftrain").warning(
        "DataLoader(persistent_workers=True) seeds its workers once, not per epoch: worker "
        "randomness (and ft.sample_seed) then repeats across epochs and a mid-epoch resume "
        "is exact only for augmentation-free data")


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make `loader`'s order for `epoch` a function of (seed, epoch)."""
    batch_sampler: Any = loader.batch_sampler
    # a custom batch sampler without .sampler keeps its own order (no (seed, epoch) shuffle)
    sampler: Any = getattr(batch_sampler, "sampler", None) if batch_sampler is not None \
        else loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # DistributedSampler: ordered by (its seed, epoch)
    if sampler is not None and hasattr(sampler, "generator"):
        sampler.generator = _generator(seed, epoch, _rng.SHUFFLE)
    # worker base seeds (and nothing else) draw from the loader's generator; per rank, so
    # ranks' workers draw independent streams
    loader.generator = _generator(seed, epoch, _rng.rank(), _rng.WORKERS)
    if loader.persistent_workers and loader.num_workers > 0 and not _warned_persistent:
        _warn_persistent()


class _SkipBatches:
    """A batch sampler without its first `skip` batches: index lists only, no data read."""

    def __init__(self, batch_sampler: Iterable[Any], skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)  # type: ignore[arg-type]


def _loader_kwargs(loader: DataLoader) -> dict[str, Any]:
    """A loader's settings other than dataset and sampling, to build a sibling loader."""
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator, pin_memory_device=loader.pin_memory_device)
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return kwargs


def _skipping_loader(loader: DataLoader, skip: int) -> Iterable[Any]:
    if isinstance(loader.dataset, IterableDataset) or (
            loader.batch_sampler is None and loader.sampler is None):
        return itertools.islice(loader, skip, None)  # must read and drop (documented)
    index_sampler = loader.batch_sampler if loader.batch_sampler is not None else \
        loader.sampler
    kwargs = _loader_kwargs(loader)
    skipped = _SkipBatches(index_sampler, skip)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=skipped, **kwargs)
    return DataLoader(loader.dataset, sampler=skipped, batch_size=None, **kwargs)


# -- sharding across ranks (with_ddp) ----------------------------------------------------

class Interleaved:
    """Batch `rank`, `rank + world`, ... of `data`: each rank takes whole batches in turn.

    For training (`complete=True`) a last round with fewer than `world` batches is dropped,
    so every rank runs the same number of steps (a rank with one step more would wait
    forever in its gradient all-reduce). For evaluation every batch is kept.
    """

    def __init__(self, data: Any, rank: int, world: int, complete: bool) -> None:
        self.data, self.rank, self.world, self.complete = data, rank, world, complete

    def batches(self, source: Iterable[Any]) -> Iterator[Any]:
        group: list[Any] = []
        for batch in source:
            group.append(batch)
            if len(group) == self.world:
                yield group[self.rank]
                group = []
        if group and not self.complete and self.rank < len(group):
            yield group[self.rank]

    def __iter__(self) -> Iterator[Any]:
        return self.batches(self.data)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.world if self.complete else len(range(self.rank, n, self.world))


def _plain_batching(loader: DataLoader) -> Any:
    """The loader's sampler when it batches a map-style dataset with torch's BatchSampler
    over a sequential or random sampler (what `batch_size=`/`shuffle=` build), else None."""
    from torch.utils.data import RandomSampler, SequentialSampler
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None or \
            has_state(loader):  # a loader with its own position is never rebuilt
        return None
    if type(loader.batch_sampler) is not BatchSampler:
        return None
    sampler = loader.batch_sampler.sampler
    if type(sampler) is RandomSampler and not sampler.replacement and \
            sampler._num_samples is None:
        return sampler
    return sampler if type(sampler) is SequentialSampler else None


def _has_own_distributed_sampler(loader: DataLoader) -> bool:
    """Whether the user already sharded this loader with a DistributedSampler."""
    from torch.utils.data.distributed import DistributedSampler
    return isinstance(getattr(loader.batch_sampler, "sampler", loader.sampler),
                      DistributedSampler)


def _distributed_seed(seed: int) -> int:
    """The seed `shard` gives DistributedSampler (which draws with seed + epoch)."""
    return _rng.mix(seed, _rng.SHUFFLE) & 0x7FFFFFFF


def shard(data: Any, rank: int, world: int, seed: int) -> Any:
    """This rank's share of training data, every rank with the same number of batches.

    A DataLoader over a map-style dataset gets a `DistributedSampler` (samples interleaved
    by rank, shuffled by (seed, epoch) if the loader shuffled, padded to equal length as
    torch does); a loader that already has one is kept. Other data (lists of batches,
    iterable datasets, custom batch samplers) is shared out in whole batches.
    """
    if world <= 1:
        return data
    from torch.utils.data.distributed import DistributedSampler
    if isinstance(data, DataLoader):
        if _has_own_distributed_sampler(data):
            return data
        sampler = _plain_batching(data)
        if sampler is not None:
            from torch.utils.data import RandomSampler
            dist_sampler: DistributedSampler[Any] = DistributedSampler(
                data.dataset, num_replicas=world, rank=rank,
                shuffle=type(sampler) is RandomSampler, seed=_distributed_seed(seed),
                drop_last=data.drop_last)
            return DataLoader(data.dataset, batch_size=data.batch_size, sampler=dist_sampler,
                              drop_last=data.drop_last, **_loader_kwargs(data))
    if isinstance(data, Iterator):
        raise DataError("with_ddp cannot share a one-shot iterator between ranks; pass a "
                        "DataLoader or a list of batches")
    return Interleaved(data, rank, world, complete=True)


def _exact_share(loader: DataLoader, rank: int, world: int) -> bool:
    """Whether the loader's own DistributedSampler gives this rank its share of every
    sample exactly once across `world` ranks (no padding, no dropped tail)."""
    sampler: Any = getattr(loader.batch_sampler, "sampler", loader.sampler)
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return True  # no length: nothing to compare (kept as it is)
    return bool(sampler.num_replicas == world and sampler.rank == rank
                and sampler.total_size == n)


def shard_eval(data: Any, rank: int, world: int) -> Any:
    """This rank's share of evaluation data: every sample on exactly one rank.

    A plain map-style DataLoader is split by sample (rank, rank + world, ...); one with
    its own DistributedSampler is kept when that gives every sample once, else (its
    padding repeats samples, or drop_last drops some) split the same way; other data is
    dealt out in whole batches."""
    if world <= 1:
        return data
    if isinstance(data, DataLoader):
        own = _has_own_distributed_sampler(data)
        if own and _exact_share(data, rank, world):
            return data  # already this rank's share, every sample once
        if own or _plain_batching(data) is not None:  # order does not matter here
            if own:  # padding would count repeated samples twice (dropping: never)
                log.info("evaluation: the loader's DistributedSampler pads or drops "
                         "samples; evaluating on an exact split instead")
            mine = range(rank, len(data.dataset), world)  # type: ignore[arg-type]
            if data.batch_size is not None:
                return DataLoader(data.dataset, batch_size=data.batch_size, sampler=mine,
                                  drop_last=data.drop_last, **_loader_kwargs(data))
            batcher = data.batch_sampler  # batch_sampler= given: rebuilt over `mine`
            if type(batcher) is not BatchSampler:  # a custom one: its batching is unknown
                raise DataError(
                    f"evaluation under with_ddp: the loader's DistributedSampler pads or "
                    f"drops samples (a metric would count some twice or not at all), and its "
                    f"batch sampler {type(batcher).__name__} cannot be rebuilt over an exact "
                    f"split; use a DistributedSampler whose dataset size divides by the "
                    f"{world} ranks, or a plain DataLoader (ftrain splits it exactly)")
            return DataLoader(data.dataset, batch_sampler=BatchSampler(
                mine, batcher.batch_size, batcher.drop_last), **_loader_kwargs(data))
    return Interleaved(data, rank, world, complete=False)


# -- a mid-epoch resume under another world size ------------------------------------------

def units_per_batch(source: Any) -> int | None:
    """How a rank's batch counts in the epoch's global order: its samples for a plain
    map-style DataLoader (sharded by sample), 1 for data shared out in whole batches, None
    for a loader with its own DistributedSampler (its order cannot be re-dealt)."""
    if isinstance(source, DataLoader):
        if _has_own_distributed_sampler(source):
            return None
        if _plain_batching(source) is not None:
            return int(source.batch_size)  # type: ignore[arg-type]
    return 1


def sample_count(loader: Any) -> int | None:
    """The number of samples of a map-style DataLoader's dataset, else None."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _sample_order(loader: DataLoader, seed: int, epoch: int, origin: int) -> list[int]:
    """The epoch's samples in the order a run of `origin` processes deals them out: the
    loader's own (seed, epoch) order on one process, DistributedSampler's permutation
    (unpadded; the same for any number of ranks) on several."""
    from torch.utils.data import RandomSampler
    sampler = _plain_batching(loader)
    n = len(loader.dataset)  # type: ignore[arg-type]
    if type(sampler) is not RandomSampler:
        return list(range(n))
    if origin <= 1:
        return list(RandomSampler(loader.dataset,  # type: ignore[arg-type]
                                  generator=_generator(seed, epoch, _rng.SHUFFLE)))
    g = torch.Generator()  # what shard's DistributedSampler draws in this epoch
    g.manual_seed(_distributed_seed(seed) + epoch)
    return torch.randperm(n, generator=g).tolist()


def remainder(source: Any, *, seed: int, epoch: int, start: int, origin: int, rank: int,
              world: int) -> tuple[Iterable[Any], int | None]:
    """This rank's batches of the rest of an epoch whose first `start` units (samples or
    whole batches, see `units_per_batch`) were trained by a run of another world size, and
    how many there are (None: unknown). The rest keeps the epoch's order and is dealt out
    as DistributedSampler deals (interleaved by rank, padded to equal shares, or trimmed
    with drop_last); whole batches as `Interleaved` (an incomplete last round dropped)."""
    units = units_per_batch(source)
    if units is None:
        raise DataError("this DataLoader has its own DistributedSampler: its order cannot "
                        "be dealt out again over another number of processes")
    if isinstance(source, DataLoader) and _plain_batching(source) is not None:
        rest = _sample_order(source, seed, epoch, origin)[start:]
        if source.drop_last:
            rest = rest[:len(rest) - len(rest) % world]
        elif rest and len(rest) % world:
            pad = world - len(rest) % world
            rest = rest + (rest * (pad // len(rest) + 1))[:pad]
        mine = rest[rank::world]
        loader = DataLoader(source.dataset, batch_size=source.batch_size, sampler=mine,
                            drop_last=source.drop_last, **_loader_kwargs(source))
        seed_epoch(loader, seed, epoch)  # worker seeds as the epoch's own
        return loader, len(loader)
    whole = epoch_batches(source, seed=seed, epoch=epoch)
    rest_batches = itertools.islice(iter(whole), start, None)
    total = num_batches(source)
    left = None if total is None else max(total - start, 0) // world
    if world == 1:
        return rest_batches, left
    return Interleaved(None, rank, world, complete=True).batches(rest_batches), left


def skipped(batches: Iterable[Any], skip: int) -> Iterable[Any]:
    """`batches` without the first `skip` (a DataLoader skips by index, reading nothing)."""
    if not skip:
        return batches
    if isinstance(batches, DataLoader):
        return _skipping_loader(batches, skip)
    return itertools.islice(batches, skip, None)


def epoch_batches(data: Any, *, seed: int, epoch: int, skip: int = 0) -> Iterable[Any]:
    """The batches of `epoch`, without the first `skip` (for a resumed, mid-epoch run)."""
    global _epoch_base
    _epoch_base = _rng.mix(seed, epoch, _rng.SAMPLE)
    if isinstance(data, Interleaved):  # skipping whole rounds keeps the ranks' turns
        return data.batches(epoch_batches(data.data, seed=seed, epoch=epoch,
                                          skip=skip * data.world))
    if isinstance(data, DataLoader):
        if has_state(data):  # its own order: only its samplers learn the epoch
            samplers: list[Any] = [data.sampler, getattr(data.batch_sampler, "sampler", None)]
            for sampler in samplers:
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
            return itertools.islice(data, skip, None) if skip else data
        seed_epoch(data, seed, epoch)
        return skipped(data, skip)
    if isinstance(data, Iterator):
        if epoch > 0 or skip:
            raise DataError("data is a one-shot iterator (e.g. a generator), which cannot "
                            "be read again for another epoch or a resumed run; pass a list "
                            "of batches or a DataLoader")
        return data
    if not isinstance(data, Iterable):
        raise DataError(f"data must be a DataLoader or an iterable of batches, got "
                        f"{type(data).__name__}")
    return skipped(data, skip)


def num_batches(data: Any) -> int | None:
    """Batches per epoch, or None when the data has no length (iterable datasets)."""
    if isinstance(data, Iterator) or not isinstance(data, Sized):
        return None
    try:
        return len(data)
    except TypeError:
        return None


def map_tensors(batch: Any, leaf: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`batch` with `leaf` applied to every tensor in it: tensors in lists, tuples,
    namedtuples and dicts (nested); anything else is kept as it is.

    Examples:
        >>> import torch
        >>> from ftrain.data.batches import map_tensors
        >>> map_tensors({"x": (torch.ones(1), "id")}, lambda t: t * 2)
        {'x': (tensor([2.]), 'id')}
    """
    if isinstance(batch, torch.Tensor):
        return leaf(batch)
    if isinstance(batch, (list, tuple)):
        moved = [map_tensors(b, leaf) for b in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*moved)
        return type(batch)(moved) if not isinstance(batch, list) else moved
    if isinstance(batch, dict):
        return {k: map_tensors(v, leaf) for k, v in batch.items()}
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`; non-blocking from pinned memory."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t if t.device == device else t.to(device, non_blocking=t.is_pinned())
    return map_tensors(batch, move)


def _leading(batch: Any, path: str, out: list[tuple[str, int]]) -> bool:
    """Collect (path, leading dim) of the tensors in `batch`; False if it holds a leaf
    that is neither a tensor nor a container (a custom object)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() > 0:
            out.append((path or "the batch", int(batch.shape[0])))
        return True
    if isinstance(batch, (list, tuple)):
        fields = getattr(batch, "_fields", None)
        names = fields if fields is not None else range(len(batch))
        return all([_leading(b, f"{path}[{n!r}]" if fields is None else f"{path}.{n}", out)
                    for n, b in zip(names, batch)])
    if isinstance(batch, Mapping):
        return all([_leading(v, f"{path}[{k!r}]", out) for k, v in batch.items()])
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return all([_leading(getattr(batch, f.name), f"{path}.{f.name}", out)
                    for f in dataclasses.fields(batch)])
    return isinstance(batch, (str, bytes, int, float, bool, type(None)))


def _flat_size(batch: Any) -> int | None:
    """The common cases, fast (logging sizes every step): a tensor, or a tuple, list or
    dict of tensors with one leading dimension; None for anything else."""
    if type(batch) is torch.Tensor:
        return int(batch.shape[0]) if batch.dim() else None
    kind = type(batch)
    items = batch.values() if kind is dict else batch if kind is tuple or kind is list \
        else None
    if not items:
        return None
    n = -1
    for t in items:
        if type(t) is not torch.Tensor or not t.dim():
            return None
        m = t.shape[0]
        if n < 0:
            n = m
        elif m != n:
            return None
    return int(n)


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the leading dimension of its tensors.

    Tensors are found in tuples, lists, namedtuples, dicts (any Mapping), dataclasses
    and nested ones; 0-d tensors and other values (strings, numbers, objects) do not
    count. The leading dimensions must agree. A list or tuple of plain values counts its items.
    Anything else raises `DataError`, naming what it found, rather than guessing: pass
    `batch_size=` (a function batch -> int) where the loop or layer takes one.

    Examples:
        >>> import torch
        >>> from ftrain.data.batches import batch_size
        >>> batch_size({"x": torch.zeros(8, 3), "y": (torch.zeros(8), "ids")})
        8
    """
    fast = _flat_size(batch)
    if fast is not None:
        return fast
    found: list[tuple[str, int]] = []
    plain = _leading(batch, "", found)  # other objects beside tensors are not sized
    if found:
        sizes = {n for _, n in found}
        if len(sizes) == 1:
            return found[0][1]
        shown = ", ".join(f"{p}: {n}" for p, n in found[:6])
        raise DataError(f"cannot tell the batch size: the tensors' leading dimensions "
                        f"differ ({shown}); give batch_size= (a function batch -> int) "
                        f"to what averages over batches: ft.evaluate, ft.eval_step, "
                        f"ft.with_logging")
    if plain and isinstance(batch, (list, tuple)) and batch:
        return len(batch)  # e.g. a list of strings
    what = type(batch).__name__
    raise DataError(f"cannot tell the batch size of a {what}: "
                    + ("it holds no tensor with a leading dimension" if plain else
                       "it holds objects that are not tensors, tuples, lists, dicts or "
                       "dataclasses")
                    + "; give batch_size= (a function batch -> int) to what averages over "
                    "batches: ft.evaluate, ft.eval_step, ft.with_logging")
