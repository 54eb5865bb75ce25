"""`train_step(loss_fn, metrics=...)`: epoch-level training metrics (torchmetrics).

The metrics' states live in the state's slot `SLOT` as plain tensors (`{name: {state
attribute: tensor or list of tensors, "__updates__": count}}`; a `MetricCollection` one
level deeper, by member), so a checkpoint holds them and a run resumed mid-epoch
continues the epoch's metrics exactly. Per step the core step loads a copy of each entry
into a worker object (a reset deepcopy of the user's metric, cached per step; it holds
nothing between calls), calls `update` with what the loss function returned under the
metric's name, and stores the new states: a pure call leaves its input's slot untouched,
and a loop's step that fails before its update leaves the slot as it was. At the epoch
end the states are computed once (synced across ranks under `with_ddp`) and reported as
`<name>_epoch`; an epoch cut short (max_steps, a stop) keeps them for the resumed run.

Cost when used: a few small tensor clones and one `update` per metric per step; none
when `metrics=` is not given.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ftrain.core import epoch_metrics as _em
from ftrain.core.state import LOOP_SLOT, TrainState
from ftrain.errors import ConfigError, described

SLOT = "train_metrics"
_UPDATES = "__updates__"
_WORLD = "__world__"  # the processes whose batches the entry counts (rank 0's own under DDP)
_PARTIAL = "__partial__"  # 1: this epoch's states miss batches, so its values are refused

log = logging.getLogger("ftrain")


def _is_collection(metric: Any) -> bool:
    from torchmetrics import MetricCollection
    return isinstance(metric, MetricCollection)


def _worker(step: Any, name: str, device: torch.device) -> Any:
    """A reset copy of the step's metric `name` on `device` (cached on the step)."""
    cache = step.__dict__.get("_metric_workers")
    if cache is None:
        cache = {}
        object.__setattr__(step, "_metric_workers", cache)
    key = (name, str(device))
    worker = cache.get(key)
    if worker is None:
        worker = _em.fresh(step.metrics[name], device, 1)
        if _is_collection(worker):  # each member keeps its own states (no shared refs)
            worker._enable_compute_groups = False
            worker._groups_checked = False
            worker._groups = {i: [str(k)] for i, k in enumerate(worker.keys(keep_base=True))}
        cache[key] = worker
    return worker


def _copy(entry: Any) -> Any:
    """An entry whose tensors a worker may change in place (lists: new lists)."""
    if isinstance(entry, torch.Tensor):
        return entry.clone()
    if isinstance(entry, list):
        return list(entry)
    if isinstance(entry, dict):
        return {k: _copy(v) for k, v in entry.items()}
    return entry


def _dump(metric: Any) -> dict[str, Any]:
    if _is_collection(metric):
        return {str(k): _dump(m) for k, m in metric.items(keep_base=True, copy_state=False)}
    out: dict[str, Any] = {a: getattr(metric, a) for a in metric._defaults}
    out[_UPDATES] = int(metric._update_count)
    return out


def _load(metric: Any, entry: dict[str, Any]) -> None:
    if _is_collection(metric):
        for k, m in metric.items(keep_base=True, copy_state=False):
            _load(m, entry[str(k)])
        return
    for attr in metric._defaults:
        setattr(metric, attr, entry[attr])
    metric._update_count = entry[_UPDATES]
    metric._computed = None


def _empty(step: Any, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in step.metrics:
        worker = _worker(step, name, device)
        worker.reset()
        out[name] = _copy(_dump(worker))
    out[_WORLD] = step.phases.world
    out[_PARTIAL] = 0
    return out


def _count(entry: dict[str, Any]) -> int:
    """Updates recorded in a slot entry (any metric's, any member's)."""
    if _UPDATES in entry:
        return int(entry[_UPDATES])
    return max((_count(v) for v in entry.values() if isinstance(v, dict)), default=0)


def _check(found: Any, expected: Any, where: str) -> None:
    """A slot entry read back from a state (a checkpoint) against a fresh one."""
    def fail(want: str, got: str) -> ConfigError:
        field = f"slot {SLOT!r}" + (f" field {where[1:]}" if where else "")
        return ConfigError(f"{field}: expected {want}, found {got} (a checkpoint of a step "
                           f"with other metrics=?)")
    if isinstance(expected, dict):
        if not isinstance(found, dict) or set(found) != set(expected):
            raise fail(f"a dict with keys {sorted(expected)}",
                       f"keys {sorted(found)}" if isinstance(found, dict)
                       else f"a {type(found).__name__}")
        for k in expected:
            _check(found[k], expected[k], f"{where}.{k}")
        return
    got = (f"a tensor of shape {tuple(found.shape)} and dtype {found.dtype}"
           if isinstance(found, torch.Tensor) else f"a {type(found).__name__}")
    if isinstance(expected, torch.Tensor):
        if not (isinstance(found, torch.Tensor) and found.shape == expected.shape
                and found.dtype == expected.dtype):
            raise fail(f"a tensor of shape {tuple(expected.shape)} and dtype "
                       f"{expected.dtype}", got)
    elif isinstance(expected, list):
        if not (isinstance(found, list) and all(isinstance(t, torch.Tensor) for t in found)):
            raise fail("a list of tensors", got)
    elif not (isinstance(found, int) and not isinstance(found, bool) and found >= 0):
        raise fail("a count (int >= 0)", got)


def init(step: Any, state: TrainState) -> TrainState:
    """Create the slot, or check the one a resumed state carries."""
    expected = _empty(step, state.device)
    if SLOT not in state.slots:
        return state.replace(slots={**state.slots, SLOT: expected})
    _check(state.slots[SLOT], expected, "")
    entry = state.slots[SLOT]
    if not entry[_PARTIAL] and _count(entry) and (entry[_WORLD] > 1 or expected[_WORLD] > 1):
        # a checkpoint holds rank 0's metric states only: the other ranks' share of the
        # epoch so far is not in it, so this epoch's values would be silently partial
        log.warning("training metrics %s: resumed mid-epoch in a data-parallel run, whose "
                    "checkpoint holds one rank's metric states; %s are not reported for "
                    "this epoch (they would miss the batches before the resume)",
                    sorted(step.metrics), ", ".join(f"{n}_epoch" for n in step.metrics))
        return state.replace(slots={**state.slots, SLOT: {**expected, _PARTIAL: 1}})
    return state


def feeding(metrics: Any, call: Any, where: str) -> tuple[Any, list[_em.Inputs]]:
    """`call` (the loss function on a micro-batch) with the metrics' update arguments
    taken out of its result into `feed` (one entry per micro-batch)."""
    feed: list[_em.Inputs] = []

    def fed(mb: Any) -> Any:
        out, inputs = _em.split(call(mb), metrics, where)
        feed.append(inputs)
        return out
    return fed, feed


def updated(step: Any, state: TrainState, feed: list[_em.Inputs]) -> dict[str, Any]:
    """The slot after this step's updates (a new entry; the state's is not changed)."""
    entry = state.slots.get(SLOT)
    if entry is None:  # a direct call on a state no loop initialized
        entry = _empty(step, state.device)
    new: dict[str, Any] = {_WORLD: entry[_WORLD], _PARTIAL: entry.get(_PARTIAL, 0)}
    with torch.no_grad():
        for name in step.metrics:
            worker = _worker(step, name, state.device)
            _load(worker, _copy(entry[name]))
            for inputs in feed:
                args, kwargs = inputs[name]
                worker.update(*args, **kwargs)
            new[name] = _dump(worker)
    return new


def epoch_end(step: Any, state: TrainState) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """The epoch's values as `<name>_epoch` (0-d device tensors); reset after a complete
    epoch. Under `with_ddp` every rank takes part (torchmetrics syncs the states); an epoch
    resumed mid-way under `with_ddp` reports none (its states miss the other ranks' batches
    before the resume)."""
    entry = state.slots.get(SLOT)
    if entry is None:
        return state, {}
    world = step.phases.world
    out: dict[str, torch.Tensor] = {}
    # refused: a data-parallel epoch resumed mid-way, whose states miss batches (see init)
    for name in () if entry.get(_PARTIAL) else step.metrics:
        worker = _worker(step, name, state.device)
        _load(worker, _copy(entry[name]))
        if not _em.updated(worker):
            continue
        _em.configure_sync(worker, world)
        try:
            values = _em.compute(name, worker)
        finally:
            _em.configure_sync(worker, 1)
        for key, value in values.items():
            if not (isinstance(value, torch.Tensor) and value.dim() == 0):
                raise ConfigError(f"train_step metric {key!r} computed {described(value)} at "
                                  f"the epoch end; an epoch metric must be one number (evaluate "
                                  f"non-scalar metrics such as a confusion matrix with "
                                  f"ft.evaluate, which returns them as tensors)")
            out[f"{key}_epoch"] = value.detach() if value.is_floating_point() else \
                value.detach().double()
    pos = state.slots.get(LOOP_SLOT)
    if pos is None or pos["batch"] == 0:  # a complete epoch: the next starts afresh
        state = state.replace(slots={**state.slots, SLOT: _empty(step, state.device)})
    return state, out
