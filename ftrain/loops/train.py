"""`iterate`: the training loop as a generator.

A loop owns the state it is given: it *donates* it (the tensors are installed in a real
module once and updated in place, so speed and memory equal a hand-written loop) and the
input record may not be read afterwards. The data position lives in `state.slots["loop"]`
(`{"epoch": epochs completed, "batch": batches consumed in the current epoch}`), so
`epochs` and `max_steps` are totals, as Lightning's `max_epochs` and `max_steps` are: a
state that stopped mid-epoch continues at its next batch when given to a loop again.

Per step the loop does: fetch the next batch (before yielding, so it knows the epoch's
last batch), move it to the state's device, call the step; no host sync of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Generator
from typing import Any

import torch

from ftrain.core import bind as _bind
from ftrain.core import context, health
from ftrain.core import layer as _layer
from ftrain.core import step as _step
from ftrain.core.layer import request
from ftrain.core.run import RunInfo
from ftrain.core.state import (
    LOOP_SLOT,
    STOP_SLOT,
    TrainState,
    check_real,
    donate,
    is_donated,
)
from ftrain.data import batches as _data
from ftrain.data.module import Data
from ftrain.data.prefetch import DevicePrefetcher
from ftrain.errors import ConfigError, DataError, FTrainError, StepError, check_int
from ftrain.loops import data_start as _start
from ftrain.loops import position as _pos
from ftrain.loops.evaluate import _check_state
from ftrain.parallel.lockstep import Lockstep, agree

log = logging.getLogger("ftrain")
_END = object()
Metrics = dict[str, torch.Tensor]


def _limit(limit: int | float | None, per_epoch: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, float) and not isinstance(limit, bool):
        if not 0.0 < limit <= 1.0:
            raise ConfigError(f"limit_train_batches as a fraction must be in (0, 1], got {limit}")
        if per_epoch is None:
            raise ConfigError("limit_train_batches as a fraction needs data with a length; "
                              "give a number of batches instead")
        return max(1, math.floor(per_epoch * limit))
    check_int("limit_train_batches", limit, 1)
    return limit


def _check_not_tensor(data: Any, what: str) -> None:
    if isinstance(data, torch.Tensor):
        raise DataError(f"{what} is a single tensor; pass a DataLoader or a list of batches "
                        "(e.g. [(inputs, targets), ...]), not the dataset itself")


def _adopt(state: TrainState, pos: dict[str, Any], run: RunInfo, owner: object,
           prev: _bind.Binding | None = None, track: _start.Track | None = None
           ) -> tuple[TrainState, _bind.Binding]:
    """Make `state` one this loop runs: bound, owned by this loop, holding its position;
    return it with its binding (one run-context lookup). A state with a new params dict
    (a hook froze or unfroze parameters) gets a new binding, which takes over `prev`'s
    run context (pending losses, deferred actions; DDP is wrapped again).

    Then run what layers asked to do once the whole stack has returned (checkpoint
    saves), so a checkpoint holds every layer's slot as it is after this step (and the
    state of data that keeps its own position, read before the next fetch). A binding
    another loop owned passes to this one (that loop then neither closes the step nor
    releases the binding when it ends).
    """
    while True:
        binding = _bind.binding_of(state)
        if binding is None:
            binding = _bind.Binding(state, training=True)
            if prev is not None and prev.live and prev.owner is owner:
                binding.take_over(prev)
        binding.run = run
        binding.owner = owner
        if state.slots.get(LOOP_SLOT) is not pos:
            state = state.replace(slots={**state.slots, LOOP_SLOT: pos})
        if not binding.deferred:
            return state, binding
        if track is not None:  # a save is due: the data's state goes with it (collective)
            track.publish(pos)
        state = binding.deferred.pop(0)(state)


def _run(step: Any, state: TrainState, data: Any, *, epochs: int | None,
         max_steps: int | None, donate_input: bool, limit_train_batches: int | float | None,
         fast_dev_run: bool | int, caller: str, progress: bool | str = False,
         root_dir: str | None = None, hparams: Any = None, signals: list[str] | None = None,
         checkpoint_dir: str | None = None, capture: tuple[str, int | None] | None = None
         ) -> Generator[tuple[TrainState, Metrics], TrainState | None, TrainState]:
    _check_state(state, caller)
    if not callable(step):
        raise ConfigError(f"{caller} needs a step (state, batch) -> (state, metrics), got "
                          f"{type(step).__name__}")
    _check_not_tensor(data, "data")
    check_int("epochs", epochs, 0)
    check_int("max_steps", max_steps, 0)
    bundle = data if isinstance(data, Data) else None
    if bundle is not None:  # an ft.Data: its train split, built after init (with_ddp first)
        if not bundle.has("train"):
            raise DataError("this ft.Data has no 'train' split to train on")
        data = []
    per_epoch = _data.num_batches(data) if bundle is None else None
    limit = _limit(limit_train_batches, per_epoch) if bundle is None else None
    dev_run = int(fast_dev_run)
    if dev_run < 0:
        raise ConfigError(f"fast_dev_run must be a bool or a number of batches, got "
                          f"{fast_dev_run!r}")
    pos = _pos.position(state.slots.get(LOOP_SLOT))  # the loop's own slots, checked
    health.check_slot(state.slots.get(health.SLOT))
    if dev_run:  # a quick check: that many batches of one epoch, whatever was asked
        epochs, max_steps, limit = pos["epoch"] + 1, None, dev_run
    if epochs is None and max_steps is None:
        raise ConfigError(f"{caller} needs epochs= or max_steps= (totals, counted from a "
                          "fresh state, as Lightning's max_epochs and max_steps)")
    run = RunInfo(epochs, max_steps, limit, dev_run, per_epoch, progress=progress,
                  root_dir=root_dir, hparams=hparams, signals=signals,
                  checkpoint_dir=checkpoint_dir)
    run.capture = capture
    owner = object()
    lock: Lockstep | None = None
    track: _start.Track | None = None  # data that cannot skip by index
    resumable = True
    source = state
    state = state.copy() if not donate_input else state
    state, binding = _adopt(state, pos, run, owner)
    failed = False
    try:
        if STOP_SLOT in state.slots:
            log.info("clearing an earlier stop request (%s)", state.slots[STOP_SLOT])
            state.slots.pop(STOP_SLOT)
        state, binding = _adopt(_layer.init(step, state), pos, run, owner, binding)
        check_real(state, caller)  # a meta-device model that no with_fsdp made real
        if donate_input:  # only now: a failing init leaves the caller's state intact
            donate(source, caller)
        if bundle is not None:
            data = bundle.split("train")
            _check_not_tensor(data, "the ft.Data train split")
        unsharded = data
        if run.world > 1:  # with_ddp: this rank's share of every epoch
            data = _data.shard(data, run.rank, run.world, state.seed)
        track = _start.Track(unsharded, pos, run)
        _pos.relayout(pos, run, unsharded, limit_train_batches)
        if bundle is not None or run.world > 1:
            per_epoch = run.batches_per_epoch = _data.num_batches(data)
            if not dev_run:
                limit = run.limit_train_batches = _limit(limit_train_batches, per_epoch)
        if run.world > 1:
            lock = Lockstep(run.rank, run.world)
            lock.check_epoch_length(per_epoch, pos["epoch"])
            track.ddp(lock.group, unsized=per_epoch is None)
        finished = False
        got: str | None = None
        first = True  # the loop's first epoch: where a resume begins
        while not finished:
            epoch = pos["epoch"]
            if (epochs is not None and epoch >= epochs) or (
                    max_steps is not None and state.step >= max_steps):
                break
            run.epoch = epoch
            skip = pos["batch"]
            epoch_length = per_epoch
            if pos.get("start"):  # the rest of an epoch begun under another world size
                rest, epoch_length = _data.remainder(
                    unsharded, seed=state.seed, epoch=epoch, start=pos["start"],
                    origin=pos["origin"], rank=run.rank, world=run.world)
                batches = iter(_data.skipped(rest, skip))
            else:
                batches = _start.epoch_start(data, unsharded, track.kept, pos,
                                             seed=state.seed, step=state.step, first=first)
            first = False
            nxt = next(batches, _END) if limit is None or skip < limit else _END
            if nxt is _END:
                if skip == 0 and not pos.get("start"):
                    raise DataError(f"the training data produced no batches in epoch {epoch}; "
                                    "an empty dataset, a batch size larger than a dataset with "
                                    "drop_last=True, or a one-shot iterator already consumed")
                if dev_run:
                    break
                # stopped right after the epoch's last batch (its end already ran): move on
                if limit is None or skip < limit:  # it was read: the data's state is its end
                    track.fetched(nxt, _END)
                _pos.next_epoch(pos, epoch)
                continue
            device = state.device
            mover = DevicePrefetcher(device)  # CUDA: next batch copied during the step
            track.batches, track.mover = batches, mover
            nxt = track.fetched(mover.put(nxt), _END)
            index = skip
            metrics: Metrics = {}
            while nxt is not _END:
                prof = binding.profiler
                if prof is None:
                    batch = mover.get(nxt)
                else:
                    t0 = time.perf_counter()
                    batch = mover.get(nxt)
                    prof.add("data", time.perf_counter() - t0)
                before = state
                step_no = before.step
                binding.changed = False
                try:
                    # The batch counts as consumed inside the step already, so a
                    # checkpoint written during this step resumes at the next batch.
                    pos["batch"] = index + 1
                    track.taken(pos)
                    binding.in_step = True  # steps run bound only when the loop calls them
                    if binding.buffer_slots:
                        binding.save_buffers()  # a failing step puts them back
                    context.at_step = step_no
                    state, metrics = step(before, batch)
                except BaseException as err:
                    # Any failure, Ctrl-C included: err.state must continue exactly.
                    resumable = _pos.roll_back(binding, pos, index, step_no)
                    track.untaken(pos, index, batch)
                    repro = _bundle(capture, binding, before, batch, err, epoch, index,
                                    run, step_no) \
                        if resumable and isinstance(err, Exception) else None
                    if isinstance(err, FTrainError) or not isinstance(err, Exception):
                        if repro is not None:
                            err.repro = repro  # type: ignore[attr-defined]
                        raise
                    wrapped = StepError(f"step {step_no} (epoch {epoch}, batch {index}) "
                                        f"failed: {type(err).__name__}: {err}"
                                        + (f" (repro bundle: {repro})" if repro else ""))
                    wrapped.repro = repro  # type: ignore[attr-defined]
                    raise wrapped from err
                finally:
                    binding.in_step = False
                if type(state) is not TrainState or not isinstance(metrics, dict):
                    raise ConfigError(f"a step must return (TrainState, dict of metrics), got "
                                      f"({type(state).__name__}, {type(metrics).__name__})")
                if state is not before:
                    donate(before, caller)
                if binding.deferred or not binding.live or state.params is not binding.params \
                        or state.slots.get(LOOP_SLOT) is not pos:
                    state, binding = _adopt(state, pos, run, owner, binding, track)
                else:  # the usual step: same binding, position in place, nothing deferred
                    binding.run, binding.owner = run, owner
                index += 1
                stopping = STOP_SLOT in state.slots or (
                    max_steps is not None and state.step >= max_steps)
                at_limit = limit is not None and index >= limit
                early = False  # the signal was agreed before the fetch
                if stopping or at_limit:
                    nxt = _END
                    complete = (at_limit or (
                        epoch_length is not None and index >= epoch_length)) and not dev_run
                    track.ended(complete and not at_limit, _END)
                else:
                    early, got = track.before_fetch(pos, run.signals, lock,
                                                    per_epoch is not None, epoch, index)
                    prof = binding.profiler
                    if prof is None:
                        nxt = mover.put(next(batches, _END))  # _END passes through
                    else:  # profiling: time the fetch and the start of its copy
                        t0 = time.perf_counter()
                        nxt = mover.put(next(batches, _END))
                        prof.add("data", time.perf_counter() - t0)
                    complete = track.fetched(nxt, _END) is _END
                    if lock is not None and epoch_length is not None and limit is None and \
                            complete != (index >= epoch_length):
                        # ranks count on len(data): data that ends elsewhere would leave
                        # them out of step (this rank raises; the others follow)
                        raise DataError(f"the training data said {epoch_length} batches for "
                                        f"this rank in epoch {epoch}, but produced "
                                        f"{index if complete else 'more than ' + str(index)}")
                if not early:
                    got = agree(run.signals, lock, nxt is not _END, per_epoch is not None,
                                epoch, index)
                if got is not None and not complete:
                    nxt = None  # mid-epoch signal: no epoch-end work, save and stop
                if nxt is _END:  # the epoch's last batch: epoch-end work before yielding
                    if complete:
                        _pos.next_epoch(pos, epoch)
                        run.epoch = pos["epoch"]  # reads from here on see the next epoch
                    state, end_metrics = _layer.epoch_end(step, state)
                    state, binding = _adopt(state, pos, run, owner, binding, track)
                    if end_metrics:
                        metrics = {**metrics, **end_metrics}
                    finished = bool(dev_run) or STOP_SLOT in state.slots or (
                        max_steps is not None and state.step >= max_steps)
                if got is not None:  # e.g. SIGTERM: save at this step boundary, then stop
                    track.publish(pos)  # read before the fetch (collective)
                    if got == "SIGINT":  # Ctrl-C, held until this boundary
                        interrupt = KeyboardInterrupt(
                            f"interrupted (Ctrl-C) after step {state.step}; err.state "
                            "continues exactly")
                        interrupt._ftrain_agreed = True  # type: ignore[attr-defined]
                        raise interrupt
                    state, binding = _adopt(_on_signal(step, state, metrics, run.signals),
                                            pos, run, owner, binding)
                    finished = True
                    yield state, metrics
                    break
                sent = yield state, metrics
                if sent is not None:  # the caller handed back a changed state
                    _check_state(sent, caller)
                    old = binding
                    state, binding = _adopt(sent, pos, run, owner, binding, track)
                    if binding is not old:  # losses still pending belong to this run
                        old.hand_over(state)
                    finished = finished or STOP_SLOT in state.slots
            if finished and got is not None:
                break
            if STOP_SLOT in state.slots:
                log.warning("stopping at step %d: %s", state.step, state.slots[STOP_SLOT])
        track.finish(pos, state.step, failed=False)  # where the loop ends (collective)
    except BaseException as err:
        failed = True
        # an update cut off half-way leaves no exact state (roll_back logged it)
        latest = _latest_state(state) if resumable else None
        if track is not None and latest is not None:  # the next loop goes on here
            track.finish(pos, latest.step, failed=True)
        if latest is not None and not isinstance(err, GeneratorExit):
            with contextlib.suppress(Exception):
                err.state = latest  # type: ignore[attr-defined]  # the work done so far
        if run.on_error is not None and not isinstance(err, GeneratorExit) and not getattr(
                err, "_ftrain_agreed", False):
            # with_ddp: show this rank's error, take the group down so peers stop too
            replacement = run.on_error(err, latest.step if latest is not None else -1)
            if replacement is not None:
                if latest is not None:
                    replacement.state = latest  # type: ignore[attr-defined]
                raise replacement from err
        raise
    finally:
        try:
            if lock is not None:
                lock.close(failed)
        except BaseException as err:  # a peer went down meanwhile: it says why
            failed = True
            if run.on_error is not None:
                run.on_error(err, -1)
            log.error("ending the ranks' step agreement failed: %s", err)
        try:
            state = _finish(step, state, owner, failed)
        except BaseException as err:  # e.g. a logger's finalize: peers must not wait
            if run.on_error is not None and not failed:
                run.on_error(err, -1)
            raise
        if run.world > 1 and not failed:
            # leave together: rank 0's last files are complete when any rank reads them
            from ftrain.parallel.dist import barrier
            barrier()
    return state


def _capture_folder(setting: Any) -> tuple[str, int | None] | None:
    """`iterate(capture_failures=)`: a folder, or None / False for none."""
    if setting is None or setting is False:
        return None
    if not isinstance(setting, (str, os.PathLike)):
        raise ConfigError(f"ft.iterate: capture_failures must be a folder or None, got "
                          f"{setting!r}")
    return os.fspath(setting), None


def _bundle(capture: tuple[str, int | None] | None, binding: Any, before: TrainState,
            batch: Any, err: BaseException, epoch: int, index: int, run: RunInfo,
            step_no: int) -> str | None:
    """The repro bundle of a step that raised before its update began (`ftrain.repro`):
    `before` is then intact. Writing it must not hide the step's own error."""
    latest = binding.latest
    if capture is None or is_donated(before) or (
            latest is not None and latest.step > step_no):
        return None  # off, or the core step finished and an outer layer failed
    if run.world > 1:
        from ftrain.parallel.dist import _collective_error
        if _collective_error(err) is not None:
            return None  # a peer went down: nothing this step could replay alone
    from ftrain.repro import capture as write
    try:
        return write(capture[0], before, batch, err, epoch=epoch, index=index,
                     rank=run.rank, world=run.world, limit=capture[1])
    except Exception as failed:
        log.error("step %d failed; writing its repro bundle failed too: %s", before.step,
                  failed)
        return None


def _latest_state(state: Any) -> TrainState | None:
    """The newest readable state: `state`, or what the core produced if an outer layer
    failed after the core had donated its input."""
    if not is_donated(state):
        return state  # type: ignore[no-any-return]
    binding = _latest_binding(state)
    return binding.latest if binding is not None else None


def _finish(step: Any, state: Any, owner: object, failed: bool) -> Any:
    """Close the step and release the binding, if this loop still owns them."""
    binding = _latest_binding(state)
    if binding is not None and binding.owner is not owner:
        return state  # another loop took this state over: it closes and releases
    latest = _latest_state(state)
    if latest is not None:
        state = latest
    try:
        _layer.close(step, state)
    except Exception:
        if not failed:
            raise
        log.exception("a step's close() failed while handling an earlier error")
    finally:
        if binding is not None and binding.live and not is_donated(state):
            state = binding.release(state)
        elif binding is not None:
            binding.end()
    return state


def _on_signal(step: Any, state: TrainState, metrics: Metrics, signals: list[str]
               ) -> TrainState:
    state, saved = request(step, state, "save")  # layers that can save, save now
    if saved:
        log.warning("%s received: saved %s at step %d", signals[0], ", ".join(saved),
                    state.step)
    else:
        log.warning("%s received at step %d; no checkpointing layer to save with",
                    signals[0], state.step)
    return _step.request_stop(state, f"{signals[0]} received")


def _latest_binding(state: Any) -> Any:
    return _bind.binding_of(state)


def iterate(step: Any, state: TrainState, data: Any, *, epochs: int | None = None,
            max_steps: int | None = None, donate: bool = True,
            limit_train_batches: int | float | None = None,
            fast_dev_run: bool | int = False,
            capture_failures: str | os.PathLike[str] | bool | None = None
            ) -> Generator[tuple[TrainState, Metrics], TrainState | None, TrainState]:
    """Train, yielding `(state, metrics)` after every step; nothing else is added.

    The yielded state is valid until the generator advances (its tensors are then updated
    in place); keep one with `state.copy()`. Break out at any time: the state knows its
    data position, so giving it to `iterate` or `fit` again continues at the next batch.
    `gen.send(changed_state)` continues the loop from a changed state. On the last batch of
    an epoch the metrics include what the step's `epoch_end` returned (e.g. validation).
    `capture_failures=<folder>` writes a repro bundle there when a step fails before its
    update (`ftrain.repro`; `ft.replay` runs it again); `iterate` writes nothing else.

    Examples:
        >>> import torch, ftrain as ft
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> for state, metrics in ft.iterate(step, state, data, epochs=2):
        ...     if state.step == 6:
        ...         break
        >>> state.step, state.epoch
        (6, 1)
    """
    return _run(step, state, data, epochs=epochs, max_steps=max_steps, donate_input=donate,
                limit_train_batches=limit_train_batches, fast_dev_run=fast_dev_run,
                caller="ft.iterate", capture=_capture_folder(capture_failures))


