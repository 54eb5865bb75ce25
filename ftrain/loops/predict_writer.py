"""Predictions written as they come (`ft.predict(..., write_to=folder)`) and read back in
order (`ft.read_predictions`): Lightning's `BasePredictionWriter`.

Each process writes its batches' outputs, moved to the CPU, into files of
`batches_per_file` batches: `predictions-r<rank>-<part>.pt`, plain data (tensors, numbers,
strings, and lists, tuples and dicts of them) saved with `torch.save` and read with
`torch.load(weights_only=True)`, each file written atomically. Every output carries the
index of its batch in the whole (unsharded) data, so the folder can be read back in the
order one process would have produced. When a process is done it writes
`done-r<rank>.json` (its world size and counts); `read_predictions` refuses a folder
where a rank is missing, unfinished, or a batch is missing or repeated.

Under several processes (`distributed=True` under torchrun, or a loop under `with_ddp`)
the data is dealt out by whole batches, batch `i` to rank `i % world`: a map-style
DataLoader gets a loader of only its batches (in the dataset's order), other data is read
by every rank and each keeps its own batches. Every batch is predicted once, with rank 0's
buffers (`ftrain.parallel.gather.rank0_buffers`), and written by the rank that predicted
it, tagged with its index; nothing is gathered. Without a folder, `ft.predict` gathers the
same shares in memory instead (`ftrain.parallel.gather.gather_outputs`): both give the
one-process outputs in the data's order.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from ftrain.checkpointing.atomic import atomic_write
from ftrain.data import batches as _data
from ftrain.errors import CheckpointError, ConfigError

FORMAT = "ftrain.predictions"
VERSION = 1
_PART = re.compile(r"^predictions-r(\d{3,})-(\d{6,})\.pt$")
_DONE = re.compile(r"^done-r(\d{3,})\.json$")
_LEAVES = (torch.Tensor, int, float, bool, str, type(None))


_count = itertools.count


def _part_name(rank: int, part: int) -> str:
    return f"predictions-r{rank:03d}-{part:06d}.pt"


def _done_name(rank: int) -> str:
    return f"done-r{rank:03d}.json"


def shard_batches(data: Any, rank: int, world: int, limit: int | None = None
                  ) -> Iterator[tuple[int, Any]]:
    """`(index in the whole data, batch)` of this rank's batches among the first `limit`
    (all: None): batch i goes to rank `i % world`.

    Examples:
        >>> from ftrain.loops.predict_writer import shard_batches
        >>> [i for i, _ in shard_batches(["a", "b", "c", "d", "e"], 1, 2)]
        [1, 3]
    """
    if world <= 1:
        yield from zip(range(limit) if limit is not None else _count(), data)
        return
    if isinstance(data, DataLoader):
        if _data._has_own_distributed_sampler(data):
            raise ConfigError("ft.predict(distributed) deals out the data itself; give it "
                              "the loader without a DistributedSampler (that sampler pads "
                              "with repeated samples, which would be predicted twice)")
        if _data._plain_batching(data) is not None:  # only this rank's batches are loaded
            order = BatchSampler(SequentialSampler(range(len(data.dataset))),  # type: ignore[arg-type]
                                 data.batch_size, data.drop_last)  # type: ignore[arg-type]
            every = list(order)[:limit]
            loader = DataLoader(data.dataset, batch_sampler=every[rank::world],
                                **_data._loader_kwargs(data))
            yield from zip(range(rank, len(every), world), loader)
            return
    for i, batch in enumerate(data):  # every rank reads it all and keeps its own
        if limit is not None and i >= limit:
            return
        if i % world == rank:
            yield i, batch


def _plain(value: Any, where: str) -> Any:
    """`value` with tensors detached on the CPU; anything torch.load(weights_only) could
    not read back is refused here, before it is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()  # a device-to-host copy: the output is written anyway
    if isinstance(value, _LEAVES):
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise ConfigError(f"{where}: a dict of predictions needs str or int keys, got "
                              f"{sorted(type(k).__name__ for k in value)}")
        return {k: _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, where) for v in value]
        return tuple(items) if isinstance(value, tuple) else items  # namedtuple: plain
    raise ConfigError(f"{where}: predictions written to a folder must be plain data "
                      f"(tensors, numbers, strings, lists, tuples, dicts), got "
                      f"{type(value).__name__}; return such values from fn=")


class PredictionWriter:
    """Writes one process's predictions into `folder`, `batches_per_file` at a time."""

    def __init__(self, folder: str | os.PathLike[str], rank: int, world: int,
                 batches_per_file: int = 1) -> None:
        if isinstance(batches_per_file, bool) or not isinstance(batches_per_file, int) or \
                batches_per_file < 1:
            raise ConfigError(f"batches_per_file must be an int >= 1, got "
                              f"{batches_per_file!r}")
        self.folder = os.fspath(folder)
        self.rank, self.world, self.per_file = rank, world, batches_per_file
        os.makedirs(self.folder, exist_ok=True)
        mine = [n for n in os.listdir(self.folder)
                if n == _done_name(rank) or n.startswith(f"predictions-r{rank:03d}-")]
        if mine:
            raise ConfigError(f"{self.folder!r} already holds predictions of rank {rank} "
                              f"({sorted(mine)[0]}, ...): write to a new folder, or remove "
                              "the old files first")
        self.part = 0
        self.written = 0
        self._indices: list[int] = []
        self._outputs: list[Any] = []

    def add(self, index: int, output: Any) -> None:
        """Keep the output of batch `index`; write a file when `batches_per_file` are in."""
        self._outputs.append(_plain(output, f"prediction batch {index}"))
        self._indices.append(index)
        if len(self._indices) >= self.per_file:
            self.flush()

    def flush(self) -> None:
        if not self._indices:
            return
        data = {"format": FORMAT, "version": VERSION, "rank": self.rank,
                "indices": list(self._indices), "outputs": list(self._outputs)}
        atomic_write(os.path.join(self.folder, _part_name(self.rank, self.part)),
                     lambda f: torch.save(data, f))
        self.part += 1
        self.written += len(self._indices)
        self._indices, self._outputs = [], []

    def finish(self) -> None:
        """Write what is left and this rank's `done` marker."""
        self.flush()
        done = {"format": FORMAT, "version": VERSION, "rank": self.rank,
                "world": self.world, "files": self.part, "batches": self.written}
        text = json.dumps(done).encode()
        atomic_write(os.path.join(self.folder, _done_name(self.rank)),
                     lambda f: f.write(text))


def _read_done(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path!r}: {err}") from err
    ok = isinstance(done, dict) and done.get("format") == FORMAT and all(
        isinstance(done.get(k), int) and not isinstance(done.get(k), bool) and done[k] >= 0
        for k in ("rank", "world", "files", "batches"))
    if not ok:
        raise CheckpointError(f"{path!r} is not an ftrain predictions marker: {done!r:.200}")
    return done  # type: ignore[no-any-return]


def read_predictions(folder: str | os.PathLike[str]) -> list[Any]:
    """The predictions written by `ft.predict(..., write_to=folder)`, one entry per batch in
    the data's order, gathered from every rank's files (read with weights_only).

    A rank that has not finished, a file missing, or a batch missing or written twice is a
    CheckpointError that says which.

    Examples:
        >>> import tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> folder = ft.predict(state, [torch.randn(4, 3), torch.randn(2, 3)],
        ...                     write_to=tempfile.mkdtemp())
        >>> [tuple(o.shape) for o in ft.read_predictions(folder)]
        [(4, 2), (2, 2)]
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"no predictions folder at {folder!r}")
    names = os.listdir(folder)
    dones = {int(m.group(1)): n for n in names if (m := _DONE.match(n))}
    parts: dict[int, list[tuple[int, str]]] = {}
    for n in names:
        if (m := _PART.match(n)):
            parts.setdefault(int(m.group(1)), []).append((int(m.group(2)), n))
    if not dones:
        raise CheckpointError(f"{folder!r} holds no finished predictions (no done-r*.json: "
                              "the writing processes did not finish, or this is not a "
                              "predictions folder)")
    markers = {r: _read_done(os.path.join(folder, n)) for r, n in dones.items()}
    for r, mark in markers.items():
        if mark["rank"] != r:
            raise CheckpointError(f"{dones[r]!r} in {folder!r} says rank {mark['rank']}")
    world = markers[min(markers)]["world"]
    ranks = set(markers) | set(parts)
    # sizes read from the files are compared with what is listed before any is used
    if world != len(markers) or set(markers) != set(range(len(markers))) or any(
            m["world"] != world for m in markers.values()) or not ranks <= set(markers):
        raise CheckpointError(
            f"{folder!r} holds predictions of ranks {sorted(ranks)} with markers of "
            f"{sorted(markers)} (world sizes {sorted({m['world'] for m in markers.values()})}),"
            f" expected every rank of {world} to have finished: a run still writing, one "
            "that failed, or files of two runs mixed")
    expected = set(markers)
    by_index: dict[int, Any] = {}
    for rank in sorted(expected):
        files = sorted(parts.get(rank, []))
        if len(files) != markers[rank]["files"] or [p for p, _ in files] != list(
                range(len(files))):
            raise CheckpointError(f"rank {rank} wrote {markers[rank]['files']} files to "
                                  f"{folder!r}, found parts {[p for p, _ in files]}")
        count = 0
        for _, name in files:
            for index, output in _load_part(os.path.join(folder, name), rank):
                if index % world != rank:  # batch i is rank i % world's (shard_batches)
                    raise CheckpointError(f"{name!r} holds batch {index}, which rank "
                                          f"{rank} of {world} does not predict")
                if index in by_index:
                    raise CheckpointError(f"batch {index} was written twice (again in "
                                          f"{name!r})")
                by_index[index] = output
                count += 1
        if count != markers[rank]["batches"]:
            raise CheckpointError(f"rank {rank} wrote {markers[rank]['batches']} batches, "
                                  f"its files hold {count}")
    if sorted(by_index) != list(range(len(by_index))):  # bounded by the batches read
        missing = [i for i in range(len(by_index)) if i not in by_index][:10]
        raise CheckpointError(f"{folder!r} lacks batches {missing}")
    return [by_index[i] for i in range(len(by_index))]


def _load_part(path: str, rank: int) -> Iterable[tuple[int, Any]]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged, truncated, or asking to run code: never done
        raise CheckpointError(f"cannot read predictions file {path!r} safely: "
                              f"{type(err).__name__}: {err}") from err
    ok = isinstance(data, dict) and data.get("format") == FORMAT and \
        data.get("rank") == rank and isinstance(data.get("indices"), list) and \
        isinstance(data.get("outputs"), list) and \
        len(data["indices"]) == len(data["outputs"]) and \
        all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
            for i in data["indices"])
    if not ok:
        raise CheckpointError(f"{path!r} is not a predictions file of rank {rank}")
    return zip(data["indices"], data["outputs"])

