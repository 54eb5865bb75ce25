"""Repro bundles: a failing step written down, and `ft.replay` to run it again alone.

When a loop's step raises before its optimizer update began (an exception in the loss
function or backward, a non-finite loss caught by `check_finite_every_step=True`), the
state before the step is intact (the loop rolls buffers back), so the loop can write it
with everything else the step read: a folder `step-<N>-rank<R>` holding

- `state.ckpt`: the state before the step, an ordinary checkpoint (`ft.load`);
- `batch.pt`: the batch, plain data (tensors in tuples, lists and dicts; read back with
  `weights_only=True`);
- `info.json`: the step number, seed, rank and world size, the epoch and batch index,
  and the error's type and message.

`ft.replay(folder, step, like=state)` loads them and runs `step` once as a direct call
with the same seed, step and rank, so its randomness (dropout masks) and its numbers are
the failing step's: the same exception with the same message (the same non-finite value).
With `anomaly=True` it also names the first operation whose output was not finite while
its inputs were (forward and backward, with the line of your code that called it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import traceback
import warnings
from typing import Any

import attrs
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ftrain.core import rng as _rng
from ftrain.core.state import TrainState
from ftrain.errors import CheckpointError, ConfigError

log = logging.getLogger("ftrain")
FORMAT = "ftrain-repro/1"
AUTO_LIMIT = 256 * 2**20  # "auto": bundles of at most this many bytes of tensors
_INFO = {"format": str, "step": int, "seed": int, "rank": int, "world": int, "epoch": int,
         "batch_index": int, "error_type": str, "error_message": str}


def _plain(batch: Any) -> bool:
    """Tensors in tuples, lists and dicts (str keys) and scalars: what weights_only reads."""
    if isinstance(batch, torch.Tensor):
        return not hasattr(batch, "device_mesh")
    if type(batch) in (tuple, list):
        return all(_plain(b) for b in batch)
    if type(batch) is dict:
        return all(isinstance(k, str) and _plain(v) for k, v in batch.items())
    return batch is None or type(batch) in (int, float, bool, str)


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree)
               if isinstance(t, torch.Tensor))


def capture(folder: str, state: TrainState, batch: Any, err: BaseException, *, epoch: int,
            index: int, rank: int, world: int, limit: int | None) -> str | None:
    """Write the bundle of a step that failed on `state` and `batch`; its folder, or None
    (with a warning saying why) when it cannot or may not be written."""
    from ftrain.checkpointing.file import save
    from ftrain.parallel.fsdp import is_sharded

    why = None
    if is_sharded(state):
        why = "the state is sharded (with_fsdp)"
    elif not _plain(batch):
        why = (f"the batch ({type(batch).__name__}) is not plain data (tensors in tuples, "
               "lists and dicts)")
    else:
        size = _nbytes((state.params, state.buffers, state.opt_state, state.slots, batch))
        if limit is not None and size > limit:
            why = (f"it would hold {size} bytes, over the {limit} of capture_failures="
                   "'auto' (give a folder to write any size)")
    if why is not None:
        log.warning("step %d failed; no repro bundle written: %s", state.step, why)
        return None
    base = os.path.join(folder, f"step-{state.step}-rank{rank}")
    final, n = base, 1
    while os.path.lexists(final):  # an earlier bundle of this step (a rerun): kept
        final, n = f"{base}-{n}", n + 1
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".repro-", dir=folder)
    try:
        save(os.path.join(tmp, "state.ckpt"), state)
        torch.save(batch, os.path.join(tmp, "batch.pt"))
        info = {"format": FORMAT, "step": state.step, "seed": state.seed, "rank": rank,
                "world": world, "epoch": epoch, "batch_index": index,
                "error_type": type(err).__name__, "error_message": str(err)}
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump(info, f, indent=1)
        os.rename(tmp, final)  # whole or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.error("step %d failed; repro bundle written to %s (ft.replay(%r, step, "
              "like=state) runs it again)", state.step, final, final)
    return final


def read_info(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """A bundle's `info.json`, checked (untrusted input: a `CheckpointError` names what
    is missing or of the wrong type)."""
    path = os.path.join(os.fspath(bundle), "info.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{os.fspath(bundle)!r} is not a repro bundle: {err}") from err
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(info).__name__}")
    for key, kind in _INFO.items():
        value = info.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{path}: {key!r} must be a {kind.__name__}, found "
                                  f"{value!r}")
    if info["format"] != FORMAT:
        raise CheckpointError(f"{path}: format {info['format']!r}, expected {FORMAT!r}")
    return info


@attrs.frozen
class Replay:
    """What `ft.replay` found: the pieces (`state` before the step, `batch`), what the
    step did this time (`error`, or `new_state` and `metrics`), whether that is what the
    bundle recorded (`reproduced`), the recorded `info`, and with `anomaly=True` the first
    operation that made a non-finite value (`culprit`)."""

    state: TrainState
    batch: Any
    info: dict[str, Any]
    error: BaseException | None
    new_state: TrainState | None
    metrics: dict[str, Any] | None
    reproduced: bool
    culprit: str | None


def replay(bundle: str | os.PathLike[str], step: Any, like: TrainState, *,
           anomaly: bool = False) -> Replay:
    """Run the step a repro bundle recorded once more, alone: `step` (the failing run's
    step, or just its core) on the bundle's state (read into `like`'s model and
    optimizer) and batch, with the recorded seed, step and rank. `anomaly=True` also
    names the first operation that produced a non-finite value (forward, then backward
    under `torch.autograd.detect_anomaly`).

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> from ftrain.repro import capture
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> step = ft.train_step(lambda m, b: (m(b) - 10).log().sum(),  # log(< 0): nan
        ...                      check_finite_every_step=True)
        >>> batch = torch.zeros(3, 2)
        >>> try:
        ...     step(state, batch)
        ... except ft.NonFiniteLossError as err:
        ...     folder = capture(tempfile.mkdtemp(), state, batch, err, epoch=0, index=0,
        ...                      rank=0, world=1, limit=None)
        >>> found = ft.replay(folder, step, like=state, anomaly=True)
        >>> found.reproduced, found.culprit.split(" ")[0]
        (True, 'torch.Tensor.log')
    """
    info = read_info(bundle)
    root = os.fspath(bundle)
    if not callable(step):
        raise ConfigError(f"ft.replay needs the step to run, got {type(step).__name__}")
    from ftrain.checkpointing.file import load
    state = load(os.path.join(root, "state.ckpt"), like=like)
    if state.step != info["step"] or state.seed != info["seed"]:
        raise CheckpointError(f"{root!r}: info.json says step {info['step']}, seed "
                              f"{info['seed']}; state.ckpt holds step {state.step}, seed "
                              f"{state.seed}")
    try:
        batch = torch.load(os.path.join(root, "batch.pt"), weights_only=True,
                           map_location=state.device)
    except Exception as err:
        raise CheckpointError(f"{root!r}: batch.pt could not be read as plain data: "
                              f"{err}") from err
    error: BaseException | None = None
    new_state = metrics = None
    with _rng.as_rank(info["rank"]):
        try:
            new_state, metrics = step(state.copy(), batch)
        except Exception as err:
            error = err
    culprit = _culprit(step, state, batch, info["rank"]) if anomaly else None
    got = (type(error).__name__, str(error)) if error is not None else None
    reproduced = got == (info["error_type"], info["error_message"]) or (
        error is not None and info["error_type"] == "StepError"
        and info["error_message"].endswith(f"{got[0]}: {got[1]}"))  # type: ignore[index]
    return Replay(state, batch, info, error, new_state, metrics, reproduced, culprit)


def _culprit(step: Any, state: TrainState, batch: Any, rank: int) -> str | None:
    """The step once more, watched: the first op whose output is not finite while its
    inputs are (forward), else the backward function detect_anomaly names."""
    finder = _FirstNonFinite()
    with _rng.as_rank(rank), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anomaly mode warns that it is slow
        try:
            with finder, torch.autograd.detect_anomaly(check_nan=True):
                step(state.copy(), batch)
        except Exception as err:
            return finder.found or _from_anomaly(err)
    return finder.found


def _from_anomaly(error: BaseException) -> str | None:
    """detect_anomaly's "Function 'LogBackward0' returned nan values ..." message."""
    text = str(error)
    if "returned nan values" in text and "Function '" in text:
        return text.split("Function '")[1].split("'")[0] + " (backward)"
    return None


def _finite(x: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in pytree.tree_leaves(x)
               if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()))


def _where() -> str:
    """The innermost frame of the caller's code (not torch's, not ftrain's)."""
    skip = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(skip) and "contextlib" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "?"


class _FirstNonFinite(TorchFunctionMode):
    """Records the first torch function whose output has a non-finite value while its
    inputs had none (host reads after every op: replay only)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: str | None = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.found is None and not _finite(out) and _finite((args, kwargs)):
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            module = "torch.Tensor" if "Tensor" in repr(func) or name.startswith("_Tensor") \
                else getattr(func, "__module__", None) or "torch"
            self.found = f"{module}.{name.split('.')[-1]} at {_where()}"
        return out
