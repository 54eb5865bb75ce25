"""`batch_size`: the largest batch that fits (Lightning's `Tuner.scale_batch_size`).

Each trial trains a fresh copy of the state for a few steps on `data(size)`. "binsearch"
doubles the size until a trial runs out of memory, then bisects between the last size
that fitted and the first that did not; "power" stops at the last doubling that fitted.

Out of memory means: on CUDA, `torch.cuda.OutOfMemoryError` (the allocator's cache is
emptied between trials); on the CPU, a trial whose peak resident memory passes
`memory_limit` bytes. That is the process's peak resident set size (Linux `VmHWM`,
reset before each trial through `/proc/self/clear_refs`): what the kernel's OOM killer
counts, everything the process holds included. A CPU run without `memory_limit` is an
error: nothing would stop the doubling short of the machine's swap.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from typing import Any, Literal

import torch

from ftrain.core.state import TrainState
from ftrain.errors import ConfigError, check_int
from ftrain.loops.train import iterate
from ftrain.tune.lr_find import trial_state

log = logging.getLogger("ftrain")


class _OutOfMemory(Exception):
    """A trial did not fit (CUDA's error, or the CPU memory limit passed)."""


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise ConfigError(f"/proc/self/status has no {field}")


def _trim() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim), so resident
    memory counts what is live, not what earlier trials freed (kept or fragmented by
    malloc, it made a rerun of the same trial peak 12 MB higher)."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018  # glibc only: musl has none
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None


def reset_peak_rss() -> None:
    """Reset the process's peak resident memory to its current size (Linux), after
    returning freed heap memory to the OS.

    Examples:
        >>> from ftrain.tune.batch_size import peak_rss, reset_peak_rss
        >>> reset_peak_rss(); peak_rss() > 0
        True
    """
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """The process's peak resident memory in bytes since the last reset (Linux VmHWM).

    Examples:
        >>> import torch
        >>> from ftrain.tune.batch_size import peak_rss, reset_peak_rss
        >>> reset_peak_rss(); before = peak_rss()
        >>> x = torch.ones(64 * 2**20 // 4); peak_rss() - before >= 60 * 2**20
        True
    """
    return _status("VmHWM")


def _check_cpu_memory_probe() -> None:
    if not (os.path.exists("/proc/self/status") and os.access("/proc/self/clear_refs",
                                                              os.W_OK)):
        raise ConfigError("batch_size on the CPU measures peak resident memory through "
                          "/proc/self/status and /proc/self/clear_refs (Linux); they are "
                          "not available here")


def search(fits: Callable[[int], bool], init: int, max_trials: int, mode: str,
           max_size: int | None) -> int:
    """The largest size `fits` accepts (Lightning's power / binsearch scaling: after a
    failure, binsearch also tries sizes below `init`), or 0 when none did.

    Examples:
        >>> from ftrain.tune.batch_size import search
        >>> search(lambda b: b <= 100, 2, 25, "binsearch", None)
        100
        >>> search(lambda b: b <= 100, 2, 25, "power", None)
        64
    """
    low, high, size, best, trials = 0, None, init, 0, 0
    while trials < max_trials:
        trials += 1
        if fits(size):
            best = low = size
            if max_size is not None and size >= max_size:
                break
            if high is None:
                size = size * 2
            elif mode == "power" or high - low <= 1:
                break
            else:
                size = (low + high) // 2
            if max_size is not None:
                size = min(size, max_size)
        else:
            high = size
            if mode == "power" or high - low <= 1:
                break
            size = (low + high) // 2
            if size <= low:
                break
    return best


def batch_size(step: Any, state: TrainState, data: Callable[[int], Any], *, init: int = 2,
               mode: Literal["binsearch", "power"] = "binsearch", steps_per_trial: int = 3,
               max_trials: int = 25, max_size: int | None = None,
               memory_limit: int | None = None) -> int:
    """The largest batch size with which `step` trains, by doubling then bisecting.

    `data(size)` builds the training data for a batch size (e.g. `lambda b:
    DataLoader(dataset, batch_size=b, shuffle=True)`). Each trial trains a fresh copy of
    `state` for `steps_per_trial` steps; `state` is left untouched. On CUDA a trial fails
    on `torch.cuda.OutOfMemoryError`; on the CPU when the process's peak resident memory
    passes `memory_limit` bytes (see the module). `max_size` caps the search (e.g. the
    dataset's length). Raises a ConfigError when even `init` does not fit.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.tune.batch_size import peak_rss, reset_peak_rss
        >>> reset_peak_rss()
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(torch.nn.Linear(4, 1), ft.optim.sgd(0.1))
        >>> data = lambda b: [(torch.randn(b, 4), torch.randn(b, 1))] * 3
        >>> ft.tune.batch_size(step, state, data, max_size=64,
        ...                    memory_limit=peak_rss() + 2**30)
        64
    """
    if not callable(data):
        raise ConfigError(f"batch_size needs data= a function batch size -> training data "
                          f"(e.g. lambda b: DataLoader(dataset, batch_size=b)), got "
                          f"{type(data).__name__}")
    for label, value in (("init", init), ("steps_per_trial", steps_per_trial),
                         ("max_trials", max_trials)):
        check_int(f"batch_size: {label}", value, 1)
        if value is None:
            raise ConfigError(f"batch_size: {label} must be an int >= 1, got None")
    check_int("batch_size: max_size", max_size, 1)
    if mode not in ("binsearch", "power"):
        raise ConfigError(f"batch_size: mode must be 'binsearch' or 'power', got {mode!r}")
    if not isinstance(state, TrainState):
        raise ConfigError(f"batch_size needs a TrainState, got {type(state).__name__}")
    cuda = state.device.type == "cuda"
    if not cuda:
        if memory_limit is None:
            raise ConfigError("batch_size on the CPU needs memory_limit= (bytes of peak "
                              "resident memory a trial may reach); without it nothing "
                              "runs out of memory before the machine swaps")
        if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or \
                memory_limit <= 0:
            raise ConfigError(f"batch_size: memory_limit must be a positive int (bytes), "
                              f"got {memory_limit!r}")
        _check_cpu_memory_probe()

    limit = memory_limit if memory_limit is not None else 0

    def fits(size: int) -> bool:
        gc.collect()  # the last trial's tensors, freed before this one is measured
        if cuda:
            torch.cuda.empty_cache()
        else:
            reset_peak_rss()
        try:
            trial = trial_state(state)
            for _ in iterate(step, trial, data(size), max_steps=steps_per_trial):
                if not cuda and peak_rss() > limit:
                    raise _OutOfMemory
            if not cuda and peak_rss() > limit:
                raise _OutOfMemory
        except (_OutOfMemory, torch.cuda.OutOfMemoryError):
            log.info("batch size %d: out of memory", size)
            return False
        except Exception as err:
            if cuda and "out of memory" in str(err):  # wrapped by a layer (StepError)
                log.info("batch size %d: out of memory", size)
                return False
            raise
        finally:
            if cuda:
                torch.cuda.empty_cache()
        log.info("batch size %d: fits", size)
        return True

    best = search(fits, init, max_trials, mode, max_size)
    gc.collect()  # a failed trial's generator and tensors sit in a cycle with its exception
    if best == 0:
        raise ConfigError(f"batch_size: no batch size fits, from {init} down"
                        + ("" if cuda else f" (memory_limit={memory_limit} bytes of peak "
                                           f"resident memory; the process held "
                                           f"{_status('VmRSS')} bytes)"))
    return best
