"""`fit`: `iterate` run to the end, with Lightning's defaults (logging, a progress bar,
checkpoints), resuming, and signals held to a step boundary."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import torch

from ftrain.core.layer import provides
from ftrain.core.state import TrainState
from ftrain.errors import ConfigError
from ftrain.layers.logging import with_logging
from ftrain.layers.logging.loggers import check_logger
from ftrain.loops.evaluate import _check_state, _stderr_is_terminal
from ftrain.loops.train import _run
from ftrain.storage import is_url, local_path

log = logging.getLogger("ftrain")
Metrics = dict[str, torch.Tensor]


def _capture(setting: Any, root: str | None, writes: bool) -> tuple[str, int | None] | None:
    """Where `capture_failures` puts repro bundles, and their size limit (or None: off).
    "auto": `<root_dir>/repro`, bundles up to 256 MiB, when the run writes files there
    anyway; a folder: there, any size; True: `<root_dir>/repro`, any size; False: never."""
    if setting is False or setting is None:
        return None
    if setting == "auto" and is_url(root):  # bundles are local files: none for a URL run
        return None
    if (setting is True and is_url(root)) or is_url(setting):
        raise ConfigError(f"capture_failures writes repro bundles to a local folder, got "
                          f"the URL {setting if is_url(setting) else root!r}: pass "
                          "capture_failures=<a local folder> (or False)")
    if setting == "auto":
        from ftrain.repro import AUTO_LIMIT
        return (os.path.join(root or os.getcwd(), "repro"), AUTO_LIMIT) if writes else None
    if setting is True:
        return os.path.join(root or os.getcwd(), "repro"), None
    if isinstance(setting, (str, os.PathLike)):
        return os.fspath(setting), None
    raise ConfigError(f"capture_failures must be 'auto', a folder, True or False, got "
                      f"{setting!r}")


def fit(step: Any, state: TrainState, data: Any, *, epochs: int | None = None,
        max_steps: int | None = None, logger: Any = True, checkpoint: Any = True,
        progress: bool = True, root_dir: str | None = None, hparams: Any = None,
        donate: bool = True, limit_train_batches: int | float | None = None,
        fast_dev_run: bool | int = False, resume: str | os.PathLike[str] | None = None,
        resume_hparams: str = "match", handle_sigterm: bool = True, max_time: Any = None,
        summary: bool = True,
        capture_failures: str | os.PathLike[str] | bool = "auto") -> TrainState:
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
    directory; it, a checkpoint folder and `resume` may be URLs (`s3://bucket/run`,
    `memory://...`: docs "Remote storage"); `hparams` (JSON-compatible) go into
    checkpoints and TensorBoard's HPARAMS.
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
    `capture_failures`: a step that fails before its update also leaves a repro bundle
    (the state before it, the batch, the seed, step and rank: `ftrain.repro`), which
    `ft.replay` runs again alone; the error's `repro` attribute names it. "auto" writes
    bundles of up to 256 MiB to `<root_dir>/repro` when fit writes there anyway (a
    `root_dir` given, or its default logs or checkpoints); a folder writes there, any
    size; False never.

    `max_time` (seconds, a `datetime.timedelta`, `{"hours": 2}` or "DD:HH:MM:SS", as
    Lightning's) stops training once that much wall-clock time is spent, saving
    `last.ckpt` as it stops (`ft.with_max_time`); a resumed run counts on from the time
    spent.
    `summary` prints the model's parameters per top-level module at the start
    (`ft.summary(state)`: to the "ftrain" logger at INFO when logging is configured, else
    to the terminal when the progress bar would show); `summary=False` switches it off.

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
    root = local_path(root_dir) if root_dir is not None else None  # or a URL (fsspec)
    # capture_failures="auto" writes where fit itself writes: a root_dir given, or the
    # TensorBoard logs / checkpoints it adds under the working directory
    writes = root is not None or (logger is True and not provides(step, "logging")) or (
        checkpoint is True and not provides(step, "checkpointing"))
    step = default_stack(step, logger=logger, checkpoint=checkpoint, progress=progress)
    if max_time is not None:  # outermost: its save request reaches every layer
        from ftrain.layers.max_time import with_max_time

        step = with_max_time(step, max_time)
    if summary:
        from ftrain.loops.summary import show_summary

        _check_state(state, "ft.fit")
        show_summary(state, console=progress == "always" or (
            bool(progress) and _stderr_is_terminal()))
    folder = None
    if resume is not None:
        from ftrain.checkpointing.resume import resume_from

        _check_state(state, "ft.fit")
        state, folder = resume_from(step, state, resume, root, donate, hparams,
                                check=resume_hparams == "match")
    signals: list[str] = []
    gen = _run(step, state, data, epochs=epochs, max_steps=max_steps, donate_input=donate,
               limit_train_batches=limit_train_batches, fast_dev_run=fast_dev_run,
               caller="ft.fit", progress=progress, root_dir=root,
               hparams=dict(hparams) if hparams is not None else None, signals=signals,
               checkpoint_dir=folder,
               capture=_capture(capture_failures, root, writes=writes and not fast_dev_run))
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
        # imported here: checkpointing's modules are a fifth of `import ftrain`
        from ftrain.checkpointing.manager import with_checkpointing

        if checkpoint is True:
            step = with_checkpointing(step)
        elif isinstance(checkpoint, (str, os.PathLike)):
            step = with_checkpointing(step, os.fspath(checkpoint))
        else:
            raise ConfigError(f"checkpoint must be True, False or a folder, got "
                              f"{checkpoint!r}")
    return step


