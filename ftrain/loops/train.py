"""The loops: `iterate` (a generator), `fit` (runs it), `evaluate`, `predict`.

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
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any

import torch

from ftrain.checkpoints.manager import with_checkpointing
from ftrain.checkpoints.resume import resume_from
from ftrain.core import bind as _bind
from ftrain.core import health
from ftrain.core import step as _step
from ftrain.core.layer import provides, request
from ftrain.core.run import RunInfo, run_info
from ftrain.core.state import LOOP_SLOT, STOP_SLOT, TrainState, donate, is_donated
from ftrain.data import batches as _data
from ftrain.data.module import Data, resolve
from ftrain.errors import ConfigError, DataError, FTrainError, StepError, check_int
from ftrain.layers.logging import with_logging
from ftrain.layers.logging.loggers import check_logger
from ftrain.loops import position as _pos
from ftrain.parallel import dist as _dist
from ftrain.parallel.lockstep import Lockstep

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


def _check_state(state: Any, where: str) -> None:
    if is_donated(state):
        _ = state.params  # raises DonatedStateError naming the loop that took it
    if not isinstance(state, TrainState):
        raise ConfigError(f"{where} expects a TrainState, got {type(state).__name__}")


def _adopt(state: TrainState, pos: dict[str, Any], run: RunInfo, owner: object
           ) -> TrainState:
    """Make `state` one this loop runs: bound, owned by this loop, holding its position.

    A binding another loop owned passes to this one (that loop then neither closes the
    step nor releases the binding when it ends).
    """
    if _bind.binding_of(state) is None:
        state = _bind.bound(state, training=True)
    binding = _bind.binding_of(state)
    binding.run = run
    binding.owner = owner
    if state.slots.get(LOOP_SLOT) is not pos:
        state = state.replace(slots={**state.slots, LOOP_SLOT: pos})
    return state


def _deferred(state: TrainState, pos: dict[str, Any], run: RunInfo, owner: object
              ) -> TrainState:
    """Run what layers asked to do once the whole stack has returned (checkpoint saves),
    so a checkpoint holds every layer's slot as it is after this step."""
    binding = _bind.binding_of(state)
    while binding is not None and binding.deferred:
        state = binding.deferred.pop(0)(state)
        state = _adopt(state, pos, run, owner)
        binding = _bind.binding_of(state)
    return state


def _run(step: Any, state: TrainState, data: Any, *, epochs: int | None,
         max_steps: int | None, donate_input: bool, limit_train_batches: int | float | None,
         fast_dev_run: bool | int, caller: str, progress: bool | str = False,
         root_dir: str | None = None, hparams: Any = None, signals: list[str] | None = None,
         checkpoint_dir: str | None = None
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
    owner = object()
    lock: Lockstep | None = None
    resumable = True
    source = state
    state = state.copy() if not donate_input else state
    state = _adopt(state, pos, run, owner)
    failed = False
    try:
        if STOP_SLOT in state.slots:
            log.info("clearing an earlier stop request (%s)", state.slots[STOP_SLOT])
            state.slots.pop(STOP_SLOT)
        state = _adopt(_step.init(step, state), pos, run, owner)
        if donate_input:  # only now: a failing init leaves the caller's state intact
            donate(source, caller)
        if bundle is not None:
            data = bundle.split("train")
            _check_not_tensor(data, "the ft.Data train split")
        unsharded = data
        if run.world > 1:  # with_ddp: this rank's share of every epoch
            data = _data.shard(data, run.rank, run.world, state.seed)
        _pos.relayout(pos, run, unsharded, limit_train_batches)
        if bundle is not None or run.world > 1:
            per_epoch = run.batches_per_epoch = _data.num_batches(data)
            if not dev_run:
                limit = run.limit_train_batches = _limit(limit_train_batches, per_epoch)
        if run.world > 1:
            lock = Lockstep(run.rank, run.world)
            lock.check_epoch_length(per_epoch, pos["epoch"])
        finished = False
        got: str | None = None
        while not finished:
            epoch = pos["epoch"]
            if (epochs is not None and epoch >= epochs) or (
                    max_steps is not None and state.step >= max_steps):
                break
            skip = pos["batch"]
            epoch_length = per_epoch
            if pos.get("start"):  # the rest of an epoch begun under another world size
                rest, epoch_length = _data.remainder(
                    unsharded, seed=state.seed, epoch=epoch, start=pos["start"],
                    origin=pos["origin"], rank=run.rank, world=run.world)
                batches = iter(_data.skipped(rest, skip))
            else:
                batches = iter(_data.epoch_batches(data, seed=state.seed, epoch=epoch,
                                                   skip=skip))
            nxt = next(batches, _END) if limit is None or skip < limit else _END
            if nxt is _END:
                if skip == 0 and not pos.get("start"):
                    raise DataError(f"the training data produced no batches in epoch {epoch}; "
                                    "an empty dataset, a batch size larger than a dataset with "
                                    "drop_last=True, or a one-shot iterator already consumed")
                if dev_run:
                    break
                # stopped right after the epoch's last batch (its end already ran): move on
                _pos.next_epoch(pos, epoch)
                continue
            device = state.device
            index = skip
            metrics: Metrics = {}
            while nxt is not _END:
                prof = _bind.binding_of(state).profiler
                if prof is None:
                    batch = _data.to_device(nxt, device)
                else:
                    t0 = time.perf_counter()
                    batch = _data.to_device(nxt, device)
                    prof.add("data", time.perf_counter() - t0)
                before = state
                step_no = before.step
                binding = _bind.binding_of(before)
                binding.changed = False
                try:
                    # The batch counts as consumed inside the step already, so a
                    # checkpoint written during this step resumes at the next batch.
                    pos["batch"] = index + 1
                    binding.in_step = True  # steps run bound only when the loop calls them
                    if binding.buffer_slots:
                        binding.save_buffers()  # a failing step puts them back
                    _dist.at_step = step_no  # for a peer's stuck-rank report (a plain int)
                    state, metrics = step(before, batch)
                except BaseException as err:
                    # Any failure, Ctrl-C included: err.state must continue exactly.
                    resumable = _pos.roll_back(binding, pos, index, step_no)
                    if isinstance(err, FTrainError) or not isinstance(err, Exception):
                        raise
                    raise StepError(f"step {step_no} (epoch {epoch}, batch {index}) "
                                    f"failed: {type(err).__name__}: {err}") from err
                finally:
                    binding.in_step = False
                if type(state) is not TrainState or not isinstance(metrics, dict):
                    raise ConfigError(f"a step must return (TrainState, dict of metrics), got "
                                      f"({type(state).__name__}, {type(metrics).__name__})")
                if state is not before:
                    donate(before, caller)
                state = _adopt(state, pos, run, owner)
                state = _deferred(state, pos, run, owner)
                index += 1
                stopping = STOP_SLOT in state.slots or (
                    max_steps is not None and state.step >= max_steps)
                at_limit = limit is not None and index >= limit
                if stopping or at_limit:
                    nxt = _END
                    complete = (at_limit or (
                        epoch_length is not None and index >= epoch_length)) and not dev_run
                else:
                    prof = _bind.binding_of(state).profiler
                    if prof is None:
                        nxt = next(batches, _END)
                    else:  # profiling: time the fetch (the move is timed above)
                        t0 = time.perf_counter()
                        nxt = next(batches, _END)
                        prof.add("data", time.perf_counter() - t0)
                    complete = nxt is _END
                    if lock is not None and epoch_length is not None and limit is None and \
                            complete != (index >= epoch_length):
                        # ranks count on len(data): data that ends elsewhere would leave
                        # them out of step (this rank raises; the others follow)
                        raise DataError(f"the training data said {epoch_length} batches for "
                                        f"this rank in epoch {epoch}, but produced "
                                        f"{index if complete else 'more than ' + str(index)}")
                got = run.signals[0] if run.signals else None  # one list read
                if lock is not None:  # with_ddp: every rank acts on the same step
                    got = lock.exchange(run.signals, nxt is not _END, per_epoch is not None,
                                        epoch, index)
                    if got is not None:  # first, so fit exits as that signal asks
                        run.signals[:] = [got, *(s for s in run.signals if s != got)]
                if got is not None and not complete:
                    nxt = None  # mid-epoch signal: no epoch-end work, save and stop
                if nxt is _END:  # the epoch's last batch: epoch-end work before yielding
                    if complete:
                        _pos.next_epoch(pos, epoch)
                    state, end_metrics = _step.epoch_end(step, state)
                    state = _deferred(_adopt(state, pos, run, owner), pos, run, owner)
                    if end_metrics:
                        metrics = {**metrics, **end_metrics}
                    finished = bool(dev_run) or STOP_SLOT in state.slots or (
                        max_steps is not None and state.step >= max_steps)
                if got is not None:  # e.g. SIGTERM: save at this step boundary, then stop
                    if got == "SIGINT":  # Ctrl-C, held until this boundary
                        interrupt = KeyboardInterrupt(
                            f"interrupted (Ctrl-C) after step {state.step}; err.state "
                            "continues exactly")
                        interrupt._ftrain_agreed = True  # type: ignore[attr-defined]
                        raise interrupt
                    state = _adopt(_on_signal(step, state, metrics, run.signals), pos, run,
                                   owner)
                    finished = True
                    yield state, metrics
                    break
                sent = yield state, metrics
                if sent is not None:  # the caller handed back a changed state
                    _check_state(sent, caller)
                    old = _bind.binding_of(state)
                    state = _adopt(sent, pos, run, owner)
                    new = _bind.binding_of(state)
                    if new is not old:  # losses still pending belong to this run
                        old.hand_over(state)
                    finished = finished or STOP_SLOT in state.slots
            if finished and got is not None:
                break
            if STOP_SLOT in state.slots:
                log.warning("stopping at step %d: %s", state.step, state.slots[STOP_SLOT])
    except BaseException as err:
        failed = True
        # an update cut off half-way leaves no exact state (roll_back logged it)
        latest = _latest_state(state) if resumable else None
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
        _step.close(step, state)
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
            fast_dev_run: bool | int = False
            ) -> Generator[tuple[TrainState, Metrics], TrainState | None, TrainState]:
    """Train, yielding `(state, metrics)` after every step; nothing else is added.

    The yielded state is valid until the generator advances (its tensors are then updated
    in place); keep one with `state.copy()`. Break out at any time: the state knows its
    data position, so giving it to `iterate` or `fit` again continues at the next batch.
    `gen.send(changed_state)` continues the loop from a changed state. On the last batch of
    an epoch the metrics include what the step's `epoch_end` returned (e.g. validation).

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
                caller="ft.iterate")


def fit(step: Any, state: TrainState, data: Any, *, epochs: int | None = None,
        max_steps: int | None = None, logger: Any = True, checkpoint: Any = True,
        progress: bool = True, root_dir: str | None = None, hparams: Any = None,
        donate: bool = True, limit_train_batches: int | float | None = None,
        fast_dev_run: bool | int = False, resume: str | os.PathLike[str] | None = None,
        resume_hparams: str = "match", handle_sigterm: bool = True) -> TrainState:
    """Train for `epochs` (or until `max_steps`) and return the final state.

    `epochs` and `max_steps` are totals counted from a fresh state (as Lightning's), so a
    resumed or interrupted state continues where it stopped. The input state is donated
    (updated in place; reading it afterwards raises) unless `donate=False`.
    `fast_dev_run=True` runs one batch (or `n`) as a quick check and writes nothing.

    Out of the box, as Lightning: TensorBoard logging under `<root_dir>/ftrain_logs/
    version_N` (`logger`: True, a logger, a list, or False), a progress bar on a terminal
    (`progress`: True, False or "always"), and a checkpoint per epoch in
    `<root_dir>/checkpoints` (`checkpoint`: True, a folder, or False); a step that has its
    own logging or checkpointing layer keeps it. `root_dir` defaults to the working
    directory; `hparams` (JSON-compatible) go into checkpoints and TensorBoard's HPARAMS.
    `resume`: a checkpoint path, or "auto" for the newest valid checkpoint of the newest
    run in the checkpoint folder (starting fresh, and saying so, when there is none;
    refusing, when checkpoint files are there but none can be read); the run then
    continues exactly, mid-epoch included, in that run's folder. Each run gets its own
    checkpoint folder `<root_dir>/checkpoints/version_N`. With `resume_hparams="match"`
    (the default), `resume="auto"` continues this run only: other hparams or another seed
    mark another run's checkpoint, whose folder is skipped (in a folder you named it is
    an error); `"ignore"` continues it anyway. On SIGTERM (preemption)
    fit saves a checkpoint at the next step boundary and exits with status 143 (a second
    SIGTERM acts at once, for a loop stuck outside a step); the handler exists only while
    fit runs (`handle_sigterm=False` leaves signals alone). Ctrl-C likewise takes effect
    at the next step boundary (a second Ctrl-C at once), as a KeyboardInterrupt. If
    training fails or is interrupted, the exception carries the state reached so far as
    `err.state`, from which `fit` continues exactly (a failed step is rolled back: its
    batch is not consumed, buffers its forward changed are restored; only a failure inside
    the optimizer update itself leaves no state to continue from, and says so).

    Examples:
        >>> import torch, ftrain as ft
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state = ft.fit(step, state, data, epochs=3, logger=False, checkpoint=False,
        ...                progress=False)
        >>> state.step, state.epoch
        (12, 3)
    """
    if progress not in (True, False, "always"):
        raise ConfigError(f"progress must be True, False or 'always', got {progress!r}")
    if hparams is not None and not isinstance(hparams, Mapping):
        raise ConfigError(f"hparams must be a dict of JSON-compatible values, got "
                          f"{type(hparams).__name__}")
    if fast_dev_run:  # a quick check writes nothing (as Lightning's fast_dev_run)
        logger, checkpoint = False, False
    if resume_hparams not in ("match", "ignore"):
        raise ConfigError(f"resume_hparams must be 'match' or 'ignore', got "
                          f"{resume_hparams!r}")
    root = os.fspath(root_dir) if root_dir is not None else None
    step = default_stack(step, logger=logger, checkpoint=checkpoint, progress=progress)
    folder = None
    if resume is not None:
        _check_state(state, "ft.fit")
        state, folder = resume_from(step, state, resume, root, donate, hparams,
                                check=resume_hparams == "match")
    signals: list[str] = []
    gen = _run(step, state, data, epochs=epochs, max_steps=max_steps, donate_input=donate,
               limit_train_batches=limit_train_batches, fast_dev_run=fast_dev_run,
               caller="ft.fit", progress=progress, root_dir=root,
               hparams=dict(hparams) if hparams is not None else None, signals=signals,
               checkpoint_dir=folder)
    previous = _install_handlers(signals) if handle_sigterm else {}
    try:
        while True:
            next(gen)
    except StopIteration as done:
        final: TrainState = done.value
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signals and signals[0] == "SIGTERM":
        log.warning("exiting after %s at step %d", signals[0], final.step)
        raise SystemExit(143)
    return final


def _install_handlers(signals: list[str]) -> dict[int, Any]:
    """Record SIGTERM and Ctrl-C (SIGINT) for the loop to act on at the next step
    boundary, where the state is whole; main thread only. Returns the handlers replaced.

    Ctrl-C is held only while Python's default handler is in place (a program's own
    handler is left alone); a second Ctrl-C before the boundary interrupts at once (the
    loop then rolls the failed step back)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_sigterm(signum: int, frame: Any) -> None:
        if signals:  # a second SIGTERM: the loop is stuck outside a step; exit at once
            log.error("second SIGTERM before the next step boundary: exiting now, unsaved")
            os._exit(143)
        signals.append("SIGTERM")

    def on_sigint(signum: int, frame: Any) -> None:
        if signals:  # pressed again: stop now
            raise KeyboardInterrupt
        log.warning("Ctrl-C: stopping after this step (press again to stop at once)")
        signals.append("SIGINT")

    previous: dict[int, Any] = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
    return previous


def default_stack(step: Any, *, logger: Any = True, checkpoint: Any = True,
                  progress: bool | str = True) -> Any:
    """Add what `ft.fit` gives by default to `step`, never a second layer of a kind.

    `logger`: True (TensorBoard under `root_dir`), a logger, a list of loggers, or False.
    A step that already has a logging layer keeps it (and shows the bar if `progress`).
    """
    if not provides(step, "logging") and (logger is not False or progress):
        if logger is True:
            loggers = None
        elif logger is False:
            loggers = []
        else:
            loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
            for one in loggers:
                check_logger(one)
        step = with_logging(step, loggers)
    if not provides(step, "checkpointing") and checkpoint is not False:
        if checkpoint is True:
            step = with_checkpointing(step)
        elif isinstance(checkpoint, (str, os.PathLike)):
            step = with_checkpointing(step, os.fspath(checkpoint))
        else:
            raise ConfigError(f"checkpoint must be True, False or a folder, got "
                              f"{checkpoint!r}")
    return step


# -- evaluation and prediction -----------------------------------------------------------

def _eval_state(state: TrainState) -> tuple[TrainState, _bind.Binding | None]:
    """`state` bound for evaluation: the loop's binding, else a temporary read-only one."""
    _check_state(state, "evaluation")
    if _bind.binding_of(state) is not None:
        return state, None
    tmp = _bind.bound(state, training=False)
    return tmp, _bind.binding_of(tmp)


def _batches(data: Any, limit: int | None, what: str) -> Any:
    check_int(f"{what} limit_batches", limit, 1)
    if not isinstance(data, Iterable):
        raise DataError(f"{what} data must be a DataLoader or an iterable of batches, got "
                        f"{type(data).__name__}")
    it = iter(data)
    return it if limit is None else (b for _, b in zip(range(limit), it))


def evaluate(evaluator: Callable[[TrainState, Any], Metrics], state: TrainState, data: Any,
             *, limit_batches: int | None = None,
             batch_size: Callable[[Any], int] | None = None, progress: bool | str = False,
             desc: str = "evaluation", distributed: bool | None = None) -> dict[str, float]:
    """Run `evaluator` over `data` and return each metric's mean weighted by batch size.

    Batch size is the first dimension of the batch's first tensor unless `batch_size`
    says otherwise. One host sync, at the end. The state is not changed. `progress`
    shows a transient bar (True: when stderr is a terminal; "always").

    Under `with_ddp` (validation inside a data-parallel loop, or `distributed=True` on
    every rank) each rank evaluates its share (every sample on exactly one rank) and the
    weighted sums are all-reduced, so all ranks return the same numbers.

    Examples:
        >>> import torch, ftrain as ft
        >>> evaluator = ft.eval_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1))
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(3)]
        >>> sorted(ft.evaluate(evaluator, state, data))
        ['loss']
    """
    if not callable(evaluator):
        raise ConfigError(f"evaluate needs an evaluator (state, batch) -> metrics, got "
                          f"{type(evaluator).__name__}")
    data = resolve(data, "test", "val")
    from ftrain.populations.population import is_population
    if isinstance(evaluator, _step.EvalStep) and is_population(state):
        raise ConfigError("this state is a population: evaluate its members with "
                          "ft.vmap(ft.eval_step(fn)), or one member with ft.member(pop, i)")
    state, own = _eval_state(state)
    world = 1
    if distributed is None:
        run = run_info(state)
        rank, world = (run.rank, run.world) if run is not None else (0, 1)
    elif distributed:
        from ftrain.parallel.dist import rank_world
        rank, world = rank_world()
    if world > 1:
        data = _data.shard_eval(data, rank, world)
    device = state.device
    values: dict[str, list[torch.Tensor]] = {}
    weights: list[int] = []
    bar = None
    if progress:
        from ftrain.layers.logging.progress import eval_bar
        total = _data.num_batches(data)
        if limit_batches is not None:
            total = limit_batches if total is None else min(total, limit_batches)
        bar = eval_bar(total, desc, progress == "always" or _stderr_is_terminal())
    try:
        for index, batch in enumerate(_batches(data, limit_batches, "evaluate")):
            batch = _data.to_device(batch, device)
            n = batch_size(batch) if batch_size is not None else _data.batch_size(batch)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"evaluation batch {index}: batch_size must give an int "
                                  f">= 0, got {n!r}")
            if bar is not None:
                bar.update(1)
            if n == 0:
                continue  # no samples: nothing to weigh (its mean would be nan)
            try:
                out = evaluator(state, batch)
            except FTrainError:
                raise
            except Exception as err:
                raise StepError(f"evaluation batch {index} failed: {type(err).__name__}: "
                                f"{err}") from err
            if not isinstance(out, dict):
                raise ConfigError(f"an evaluator must return a dict of metrics, got "
                                  f"{type(out).__name__}")
            # the one check every metric goes through (training steps' too)
            metrics = _step.eval_metrics(out, f"evaluation batch {index}", device)
            if values and metrics.keys() != values.keys():
                raise ConfigError(f"evaluation batch {index} returned metrics "
                                  f"{sorted(metrics)}, earlier batches {sorted(values)}")
            for k, v in metrics.items():
                values.setdefault(k, []).append(v)
            weights.append(n)
    finally:
        if bar is not None:
            bar.close()
        if own is not None:
            own.end()
    if world > 1:
        return _reduce_across_ranks(values, weights, world)
    if not weights:
        raise DataError("the evaluation data produced no samples (no batches, or only "
                        "batches of size 0)")
    return reduce_weighted(values, weights)


def _reduce_across_ranks(values: dict[str, list[torch.Tensor]], weights: list[int],
                         world: int) -> dict[str, float]:
    """Weighted means over every rank's batches: sums and counts all-reduced (one sync)."""
    import torch.distributed as dist

    names = sorted(values)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, names)  # a rank without batches learns the names
    known: list[str] = next((g for g in gathered if g), [])
    if any(g and g != known for g in gathered):
        raise ConfigError(f"ranks' evaluators returned different metrics: {gathered}")
    if not known:
        raise DataError("the evaluation data produced no samples on any rank")
    from ftrain.parallel.dist import collective_device
    device = collective_device()
    w = torch.tensor(weights, dtype=torch.float64, device=device)
    sums = [(torch.stack([v.detach().to(device, torch.float64) for v in values[k]]) * w).sum()
            if k in values else torch.zeros((), dtype=torch.float64, device=device)
            for k in known]
    totals = torch.stack([*sums, w.sum()])
    dist.all_reduce(totals)
    host = totals.cpu().tolist()  # host sync here
    return {k: host[i] / host[-1] for i, k in enumerate(known)}


def _stderr_is_terminal() -> bool:
    import sys
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def reduce_weighted(values: dict[str, list[torch.Tensor]], weights: list[int]
                    ) -> dict[str, float]:
    """Weighted means of per-batch metrics, computed on the device; one host sync."""
    total = float(sum(weights))
    means = []
    for vals in values.values():
        stacked = torch.stack([v.detach().to(torch.float64) for v in vals])
        w = torch.tensor(weights, dtype=torch.float64, device=stacked.device)
        means.append(((stacked * w).sum() / total).cpu())
    return dict(zip(values, torch.stack(means).tolist()))


def _default_predict(model: Any, batch: Any) -> Any:
    if isinstance(batch, (list, tuple)) and batch and not hasattr(batch, "_fields"):
        return model(batch[0])  # the inputs of an (inputs, targets) pair
    return model(batch)


def predict(state: TrainState, data: Any, fn: Callable[[Any, Any], Any] | None = None, *,
            model: str | None = None, limit_batches: int | None = None) -> list[Any]:
    """The model's outputs on each batch, in eval mode under `torch.no_grad`.

    By default `model(batch)`, or `model(batch[0])` for a tuple or list batch (the inputs of
    an (inputs, targets) pair); `fn(model, batch)` to choose. For a multi-model state
    name the model (`model="G"`) or give `fn`, which then receives the dict of models.

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> outs = ft.predict(state, [torch.randn(4, 3), torch.randn(2, 3)])
        >>> [tuple(o.shape) for o in outs]
        [(4, 2), (2, 2)]
    """
    data = resolve(data, "predict")
    state, own = _eval_state(state)
    binding = _bind.binding_of(state)
    binding.set_mode(False)
    target = binding.model_arg
    if isinstance(target, dict):
        if model is not None:
            if model not in target:
                raise ConfigError(f"model {model!r} is not in this state; models: "
                                  f"{sorted(target)}")
            target = target[model]
        elif fn is None:
            raise ConfigError(f"this state holds several models {sorted(target)}: pass "
                              "model='<name>' or fn=(models, batch) -> outputs")
    elif model is not None:
        raise ConfigError("model= selects one of several models; this state holds one")
    call = fn or _default_predict
    device = state.device
    outputs = []
    try:
        with torch.no_grad():
            for index, batch in enumerate(_batches(data, limit_batches, "predict")):
                try:
                    outputs.append(call(target, _data.to_device(batch, device)))
                except Exception as err:
                    raise StepError(f"prediction batch {index} failed: {type(err).__name__}: "
                                    f"{err}") from err
    finally:
        if own is not None:
            own.end()
    return outputs
