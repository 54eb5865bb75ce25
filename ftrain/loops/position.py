"""The loop's data position: read back, carried across world sizes, rolled back.

`state.slots["loop"]` is `{"epoch": epochs completed, "batch": batches consumed in the
current epoch by each process, "world": the number of processes}`, plus `batch_size` and
`samples` for a DataLoader that ftrain deals out by sample (so that a resume on another
number of processes can count what was trained, and refuse other data). After such a
resume it also has `start` (units of the epoch's order trained before, see
`ftrain.data.batches.remainder`) and `origin` (the world size that order was dealt out for).
For data that keeps its own position (`ftrain.data.stateful`) it may hold `data`: every
process's `state_dict()` of that data, a list indexed by rank, valid for this (epoch, batch)
only. The loop mutates one such dict in place for the whole run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ftrain.core import slots as _slots
from ftrain.core.run import RunInfo
from ftrain.core.state import LOOP_SLOT
from ftrain.data import batches as _data
from ftrain.data.stateful import DATA
from ftrain.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger("ftrain")


_COUNT = (_slots.count, "an int >= 0")
_POSITIVE = (_slots.optional(_slots.positive), "an int >= 1")
_OPTIONAL = ("world", "start", "origin", "batch_size", "samples", DATA)
_FIELDS = {"epoch": _COUNT, "batch": _COUNT, "world": _POSITIVE,
           "start": (_slots.optional(_slots.count), "an int >= 0"), "origin": _POSITIVE,
           "batch_size": _POSITIVE, "samples": (_slots.optional(_slots.count), "an int >= 0"),
           DATA: (lambda v: v is None or (isinstance(v, list) and len(v) > 0 and all(
               isinstance(s, Mapping) for s in v)),
               "a non-empty list of per-process data states (dicts), indexed by rank")}


def position(saved: Any) -> dict[str, Any]:
    """The loop slot read back from a state (maybe from a file): checked, as a new dict.

    `epoch` epochs completed and `batch` batches consumed in the current one by each of
    `world` processes; after a resume under another world size, `start` units (samples or
    whole batches) of the epoch's order, dealt out by `origin` processes, came first.
    """
    if saved is None:
        return {"epoch": 0, "batch": 0}
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"the state's {LOOP_SLOT!r} slot (the data position) must be a "
                              f"dict, found {type(saved).__name__}")
    _slots.check(saved, LOOP_SLOT, _FIELDS, may_lack=_FIELDS)
    pos: dict[str, Any] = {"epoch": saved.get("epoch", 0), "batch": saved.get("batch", 0)}
    pos.update({k: saved[k] for k in _OPTIONAL if saved.get(k) is not None})
    if ("start" in pos) != ("origin" in pos):
        raise CheckpointError(f"the state's {LOOP_SLOT!r} slot has one of start/origin "
                              f"without the other: {saved!r}"[:300])
    return pos


def relayout(pos: dict[str, Any], run: RunInfo, data: Any, limit: Any) -> None:
    """A state stopped mid-epoch under another number of processes continues that epoch
    exactly: what was trained is counted in the epoch's global order (`start`), and the
    rest is dealt out to this run's ranks. Without a recorded world size (ftrain 0.1
    checkpoints), the position is taken as this run's, as that version did."""
    before = pos.get("world", run.world)
    units = _data.units_per_batch(data)
    samples = _data.sample_count(data) if units is not None and units > 1 else None
    if before != run.world and (pos["batch"] or pos.get("start")):
        _convert(pos, before, run, units, samples, limit)
    # how this run's batches count in the epoch's order, for a later resume elsewhere
    pos["world"] = run.world
    pos.pop("batch_size", None)
    pos.pop("samples", None)
    if samples is not None:
        pos["batch_size"], pos["samples"] = units, samples


def _convert(pos: dict[str, Any], before: int, run: RunInfo, units: int | None,
             samples: int | None, limit: Any) -> None:
    """Count what the `before`-process layout trained as `start`, in the epoch's order."""
    if units is None:
        raise DataError(f"this state stopped in the middle of epoch {pos['epoch']} under "
                        f"{before} process(es); this run has {run.world}, and its DataLoader "
                        "has its own DistributedSampler, whose order cannot be dealt out "
                        "again. Resume under the same number of processes, or let ftrain "
                        "shard a plain DataLoader")
    if limit is not None:
        raise ConfigError("limit_train_batches counts each process's batches: a mid-epoch "
                          "resume under another number of processes cannot honour it; "
                          "resume under the same number, or without the limit")
    old_units = pos.get("batch_size", 1)  # absent: the data was dealt out in whole batches
    if (old_units > 1) != (units > 1) or pos.get("samples") != samples:
        then = _layout(old_units, pos.get("samples"))
        now = _layout(units, samples)
        raise DataError(
            f"this state stopped in the middle of epoch {pos['epoch']} over other data "
            f"({then}; now {now}): what it trained cannot be found in this data's order. "
            "Resume with the same data and batch size per process")
    pos["start"] = pos.get("start", 0) + pos["batch"] * before * old_units
    pos.setdefault("origin", before)
    pos["batch"] = 0
    log.warning("continuing epoch %d, begun under %d process(es), on %d: %d %s of it are "
                "done", pos["epoch"], before, run.world, pos["start"],
                "samples" if units > 1 else "batches")


def _layout(units: int, samples: int | None) -> str:
    if units <= 1:
        return "dealt out in whole batches"
    return f"batches of {units} of {samples} samples"


def next_epoch(pos: dict[str, Any], epoch: int) -> None:
    pos["epoch"], pos["batch"] = epoch + 1, 0
    pos.pop("start", None)
    pos.pop("origin", None)
    pos.pop(DATA, None)  # it described the position just left


def roll_back(binding: Any, pos: dict[str, Any], index: int, step_no: int) -> bool:
    """Make the loop's position and buffers agree with the state `err.state` will carry;
    False when no state can be continued from exactly.

    If the core step finished (an outer layer failed after it), its new state is the one
    to continue from and the batch was consumed. Otherwise nothing was updated: the batch
    is not consumed and buffers a forward changed in place are put back. A failure inside
    the optimizer update itself cannot be undone; then no state is attached at all.
    """
    latest = binding.latest
    if latest is not None and latest.step > step_no:
        return True  # the batch was trained on; the position already says so
    pos["batch"] = index
    if binding.changed:
        log.error("step %d failed inside its optimizer update; the parameters are partly "
                  "updated, so no state is attached to the error: resume from the last "
                  "checkpoint", step_no)
        return False
    held = latest.slots.get("accumulation") if latest is not None else None
    if held is not None and held.get("batches"):
        # with_accumulation(over="batches") mid-group: the group's partial gradient is the
        # parameters' own .grad, which this step's backward may have added to
        log.error("step %d failed inside an accumulation group (%d batches in); its "
                  "partial gradient may include the failed batch, so no state is attached "
                  "to the error: resume from the last checkpoint", step_no,
                  held["batches"])
        return False
    binding.restore_buffers()
    for params in binding.trainable.values():  # a backward that ran adds nothing later
        for p in params.values():
            p.grad = None
    return True
