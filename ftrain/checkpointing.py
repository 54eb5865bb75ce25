"""`with_checkpointing`: keep the best and the latest weights, with an index file.

Each save writes the whole state (its own bookkeeping slot included) atomically, then
`last.ckpt` (a hard link to the new file when it is kept, so no second write), then the
index `checkpoints.json` naming best and last, and only then deletes checkpoints that fell
out of the top k. A kill at any moment leaves loadable checkpoints and an index that names
only files that exist. `ft.checkpoints(dirpath)` reads the index.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import string
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch

from ftrain import _rng, health
from ftrain import step as _step
from ftrain._run import run_info
from ftrain._sync import to_host
from ftrain.checkpoint import TMP_PREFIX, atomic_write, fsync_dir, payload, read
from ftrain.combinators import Combinator
from ftrain.errors import CheckpointError, ConfigError, MonitorError
from ftrain.state import LOOP_SLOT, TrainState

INDEX = "checkpoints.json"
LAST = "last.ckpt"
SUFFIX = ".ckpt"
Mode = Literal["min", "max"]


@attrs.frozen
class CheckpointIndex:
    """What `checkpoints.json` says: the best and last checkpoint, and all kept ones."""

    dirpath: str
    best: str | None
    last: str | None
    monitor: str | None
    mode: str
    best_score: float | None
    saved: list[dict[str, Any]]


def checkpoints(dirpath: str | os.PathLike[str]) -> CheckpointIndex:
    """Read the index of a checkpoint folder written by `with_checkpointing`.

    Examples:
        >>> import tempfile, torch, ftrain as ft
        >>> d = tempfile.mkdtemp()
        >>> step = ft.with_checkpointing(
        ...     ft.train_step(lambda m, b: m(b).pow(2).mean()), d, filename="{epoch}")
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> _ = ft.fit(step, state, [torch.randn(4, 2)], epochs=2, logger=False, progress=False)
        >>> index = ft.checkpoints(d)
        >>> os.path.basename(index.best), os.path.basename(index.last)
        ('1.ckpt', 'last.ckpt')
    """
    dirpath = os.fspath(dirpath)
    path = os.path.join(dirpath, INDEX)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint index {INDEX} in {dirpath!r}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path!r} is not a valid index: {err}") from err

    def full(name: str | None) -> str | None:
        return os.path.join(dirpath, name) if name else None

    return CheckpointIndex(
        dirpath=dirpath, best=full(data.get("best")), last=full(data.get("last")),
        monitor=data.get("monitor"), mode=data.get("mode", "min"),
        best_score=data.get("best_score"),
        saved=[{**s, "path": full(s["file"])} for s in data.get("saved", [])])


def latest_valid(dirpath: str) -> str | None:
    """The newest checkpoint in `dirpath` that loads (for `resume="auto"`), or None.

    The index's `last` (the newest save of the run that wrote it) comes first; without a
    usable index, the most recently written `*.ckpt`. Temporary files of an interrupted
    save never match; each candidate is opened (memory-mapped, tensors not read) and
    skipped if it is truncated or not a checkpoint.
    """
    if not os.path.isdir(dirpath):
        return None

    def loads(path: str) -> bool:
        try:
            read(path, map_location="cpu", mmap=True)
            return True
        except CheckpointError:
            return False

    with contextlib.suppress(CheckpointError):
        last = checkpoints(dirpath).last
        if last is not None and os.path.isfile(last) and loads(last):
            return last
    candidates = sorted(
        (os.path.getmtime(os.path.join(dirpath, e)), os.path.join(dirpath, e))
        for e in os.listdir(dirpath) if e.endswith(SUFFIX) and not e.startswith(TMP_PREFIX))
    for _, path in reversed(candidates):
        if loads(path):
            return path
    return None


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _safe_name(name: str) -> str:
    """A rendered filename never creates folders: separators become underscores."""
    for sep in {"/", "\\", os.sep}:
        name = name.replace(sep, "_")
    return name


def _better(a: float, b: float, mode: str) -> bool:
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a < b if mode == "min" else a > b


class WithCheckpointing(Combinator):
    """The combinator built by `with_checkpointing`."""

    def __init__(self, inner: Any, dirpath: str | None = None, *,
                 every_n_steps: int | None = None, every_n_epochs: int | None = 1,
                 monitor: str | None = None, mode: Mode = "min", save_top_k: int = 1,
                 save_last: bool = True, filename: str = "{epoch}-{step}",
                 hparams: Mapping[str, Any] | None = None, name: str = "checkpointing"
                 ) -> None:
        super().__init__(inner, name)
        self.name = name
        for label, value in (("every_n_steps", every_n_steps),
                             ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{label} must be a positive int or None, got {value!r}")
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigError(f"save_top_k must be an int >= -1 (-1 keeps all), got "
                              f"{save_top_k!r}")
        if not isinstance(filename, str) or not filename:
            raise ConfigError(f"filename must be a format string, got {filename!r}")
        try:
            self.template_fields = _fields(filename)
        except ValueError as err:
            raise ConfigError(f"filename {filename!r} is not a valid format string: "
                              f"{err}") from err
        self.dirpath_arg = os.fspath(dirpath) if dirpath is not None else None
        self.dirpath = self.dirpath_arg
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.filename = filename
        self.hparams = dict(hparams) if hparams is not None else None

    def __repr__(self) -> str:
        return f"with_checkpointing({self.dirpath!r}, monitor={self.monitor!r})"

    def resolve_dir(self, root_dir: str | None) -> str:
        if self.dirpath_arg is not None:
            return self.dirpath_arg
        return os.path.join(root_dir or os.getcwd(), "checkpoints")

    def _empty_slot(self) -> dict[str, Any]:
        return {"saved": [], "best": None, "best_score": None, "last": None,
                "last_step": None, "monitor": self.monitor, "mode": self.mode}

    def init(self, state: TrainState) -> TrainState:
        state = _step.init(self.inner, state)
        run = run_info(state)
        self.dirpath = self.resolve_dir(run.root_dir if run is not None else None)
        if _rng.rank() == 0:
            _remove_stale_temporaries(self.dirpath)
        self.run_hparams = self.hparams if self.hparams is not None else (
            dict(run.hparams) if run is not None and run.hparams is not None else None)
        slot = state.slots.get(self.name)
        if slot is None:
            state = state.replace(slots={**state.slots, self.name: self._empty_slot()})
        elif (slot.get("monitor"), slot.get("mode")) != (self.monitor, self.mode):
            raise ConfigError(
                f"the {self.name!r} slot of this state ranks checkpoints by monitor="
                f"{slot.get('monitor')!r}, mode={slot.get('mode')!r}; this layer uses "
                f"monitor={self.monitor!r}, mode={self.mode!r}. Keep them, or give the "
                "layer another name= (and dirpath) to start a new ranking")
        return state

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        state, metrics = self.inner(state, batch)
        if self.every_n_steps is not None and state.step % self.every_n_steps == 0:
            state = self._request(state, metrics)
        return state, metrics

    def epoch_end(self, state: TrainState) -> tuple[TrainState, Any]:
        state, metrics = _step.epoch_end(self.inner, state)
        pos = state.slots.get(LOOP_SLOT, {"epoch": 0, "batch": 0})
        run = run_info(state)
        last_epoch = run is not None and run.epochs is not None and pos["epoch"] >= run.epochs
        completed = pos["batch"] == 0
        due = self.every_n_epochs is not None and completed and (
            pos["epoch"] % self.every_n_epochs == 0 or last_epoch)
        # an epoch end mid-epoch means training ends here (max_steps, a stop): save too
        if due or not completed:
            state = self._request(state, metrics, final=not completed)
        return state, metrics

    # -- saving --------------------------------------------------------------------------

    def _values(self, names: list[str], metrics: Mapping[str, Any]) -> dict[str, float]:
        missing = [n for n in names if n not in metrics]
        if missing:
            raise MonitorError(f"with_checkpointing needs {missing} (monitor or filename), "
                               f"which this step did not produce here; available: "
                               f"{sorted(metrics)}")
        tensors = [metrics[n] for n in names]
        return dict(zip(names, to_host(tensors))) if tensors else {}  # host sync here

    def _request(self, state: TrainState, metrics: Mapping[str, Any], final: bool = False
                 ) -> TrainState:
        """Plan a save now (read the metrics it needs); write it once the whole stack has
        returned, so the checkpoint holds every layer's slot as of this step."""
        run = run_info(state)
        if run is not None and run.fast_dev_run:
            return state  # a quick check writes nothing
        slot = state.slots.get(self.name) or self._empty_slot()
        if slot.get("last_step") == state.step:
            return state  # saved at this step already (e.g. every_n_steps and epoch end)
        if final and any(n not in metrics for n in self._wanted()):
            return self._defer(state, lambda s: self.save_last_now(s))
        name, score, epoch = self._plan(state, metrics)
        return self._defer(state, lambda s: self._commit(s, name, score, epoch))

    def _wanted(self) -> list[str]:
        """The metrics a save reads: the filename's fields and the monitor."""
        wanted = [f for f in self.template_fields if f not in ("epoch", "step")]
        if self.monitor is not None and self.monitor not in wanted:
            wanted.append(self.monitor)
        return wanted

    def _plan(self, state: TrainState, metrics: Mapping[str, Any]
              ) -> tuple[str, float | None, int]:
        """(file name, score, epoch) of a save of `state` now; reads metrics on the host."""
        pos = state.slots.get(LOOP_SLOT, {"epoch": 0, "batch": 0})
        epoch = pos["epoch"] - 1 if pos["batch"] == 0 and pos["epoch"] > 0 else pos["epoch"]
        values = self._values(self._wanted(), metrics)
        score = values.get(self.monitor) if self.monitor is not None else None
        return self._render(epoch, state.step, values), score, epoch

    def _defer(self, state: TrainState, action: Any) -> TrainState:
        binding = state.__dict__.get("_binding")
        if binding is not None and binding.live and binding.owner is not None:
            binding.deferred.append(action)  # the loop runs it after the whole stack
            return state
        return action(state)  # called directly: save now

    def save_now(self, state: TrainState, metrics: Mapping[str, Any] | None = None
                 ) -> TrainState:
        """Write a checkpoint of `state` now, ranked by `metrics`; return the new state."""
        if self.dirpath is None:
            self.dirpath = self.resolve_dir(None)
        name, score, epoch = self._plan(state, dict(metrics or {}))
        return self._commit(state, name, score, epoch)

    def save_last_now(self, state: TrainState) -> TrainState:
        """Write only `last.ckpt` (outside the top k; no metric needed), e.g. on SIGTERM."""
        if self.dirpath is None:
            self.dirpath = self.resolve_dir(None)
        health.check_finite(state)
        slot = dict(state.slots.get(self.name) or self._empty_slot())
        slot.update(last=LAST, last_step=state.step)
        state = state.replace(slots={**state.slots, self.name: slot})
        if _rng.rank() == 0:
            os.makedirs(self.dirpath, exist_ok=True)
            data = payload(state, getattr(self, "run_hparams", self.hparams))
            atomic_write(os.path.join(self.dirpath, LAST), lambda f: torch.save(data, f))
            self._write_index(slot)
        return state

    def _commit(self, state: TrainState, name: str, score: float | None, epoch: int
                ) -> TrainState:
        health.check_finite(state)  # never write a checkpoint of a NaN run silently
        slot = state.slots.get(self.name) or self._empty_slot()
        name = self._unique(name, slot)
        entry = {"file": name, "score": score, "step": state.step, "epoch": epoch}
        kept, dropped = self._top_k([dict(e) for e in slot["saved"]], entry)
        best = self._best(kept)
        new_slot = {**slot, "saved": kept, "best": best["file"] if best else None,
                    "best_score": best["score"] if best else None,
                    "last": LAST if self.save_last else None, "last_step": state.step}
        state = state.replace(slots={**state.slots, self.name: new_slot})
        if _rng.rank() == 0:  # files from rank 0 only; no collective in here
            binding = state.__dict__.get("_binding")
            prof = binding.profiler if binding is not None else None
            t0 = time.perf_counter()
            self._write(state, name, entry in kept, new_slot, dropped)
            if prof is not None:
                prof.add("checkpointing", time.perf_counter() - t0)
        return state

    def _write_index(self, slot: Mapping[str, Any]) -> None:
        assert self.dirpath is not None
        data = _index_json(slot, self.monitor, self.mode)
        atomic_write(os.path.join(self.dirpath, INDEX), lambda f: f.write(data))

    def _render(self, epoch: int, step: int, values: Mapping[str, float]) -> str:
        try:
            return _safe_name(self.filename.format(epoch=epoch, step=step, **values))
        except (KeyError, ValueError, IndexError) as err:
            raise ConfigError(f"cannot render filename {self.filename!r}: {err}") from err

    def _unique(self, name: str, slot: Mapping[str, Any]) -> str:
        taken = {e["file"] for e in slot["saved"]} | {LAST}
        assert self.dirpath is not None
        candidate, n = name + SUFFIX, 0
        while candidate in taken or os.path.exists(os.path.join(self.dirpath, candidate)):
            n += 1
            candidate = f"{name}-v{n}{SUFFIX}"
        return candidate

    def _top_k(self, saved: list[dict[str, Any]], entry: dict[str, Any]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        k = self.save_top_k
        candidates = [*saved, entry]
        if k == -1:
            return candidates, []
        if self.monitor is None:  # newest first
            order = sorted(candidates, key=lambda e: e["step"], reverse=True)
        else:
            import functools

            def cmp(a: dict[str, Any], b: dict[str, Any]) -> int:
                sa, sb = float(a["score"]), float(b["score"])
                if _better(sa, sb, self.mode):
                    return -1
                if _better(sb, sa, self.mode):
                    return 1
                return -1 if a["step"] > b["step"] else 1  # ties: the newer first
            order = sorted(candidates, key=functools.cmp_to_key(cmp))
        kept, dropped = order[:k], order[k:]
        kept.sort(key=lambda e: e["step"])
        return kept, [e for e in dropped if e is not entry]

    def _best(self, kept: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not kept:
            return None
        if self.monitor is None:
            return max(kept, key=lambda e: e["step"])
        best = kept[0]
        for e in kept[1:]:
            if _better(float(e["score"]), float(best["score"]), self.mode):
                best = e
        return best

    def _write(self, state: TrainState, name: str, keep: bool, slot: Mapping[str, Any],
               dropped: list[dict[str, Any]]) -> None:
        assert self.dirpath is not None
        os.makedirs(self.dirpath, exist_ok=True)
        data = payload(state, getattr(self, "run_hparams", self.hparams))
        target = os.path.join(self.dirpath, name)
        last = os.path.join(self.dirpath, LAST)
        if keep:
            atomic_write(target, lambda f: torch.save(data, f))
            if self.save_last:
                _link_or_copy(target, last)
        elif self.save_last:
            atomic_write(last, lambda f: torch.save(data, f))
        self._write_index(slot)
        for entry in dropped:  # only now: the new checkpoint and index are safely written
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dirpath, entry["file"]))


def _index_json(slot: Mapping[str, Any], monitor: str | None, mode: str) -> bytes:
    index = {"best": slot["best"], "best_score": slot["best_score"], "last": slot["last"],
             "monitor": monitor, "mode": mode, "saved": slot["saved"]}
    return json.dumps(index, indent=2).encode()


def _remove_stale_temporaries(dirpath: str) -> None:
    """Delete temporary files a killed save left behind (never taken for checkpoints)."""
    if not os.path.isdir(dirpath):
        return
    for entry in os.listdir(dirpath):
        if entry.startswith(TMP_PREFIX) and entry.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(dirpath, entry))


def _link_or_copy(src: str, dst: str) -> None:
    """Make `dst` the same file as `src` atomically: a hard link, else a copy."""
    folder = os.path.dirname(dst)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(folder)


def with_checkpointing(step: Any, dirpath: str | os.PathLike[str] | None = None, *,
                       every_n_steps: int | None = None, every_n_epochs: int | None = 1,
                       monitor: str | None = None, mode: Mode = "min", save_top_k: int = 1,
                       save_last: bool = True, filename: str = "{epoch}-{step}",
                       hparams: Mapping[str, Any] | None = None,
                       name: str = "checkpointing") -> WithCheckpointing:
    """Save checkpoints every `every_n_epochs` epochs and/or `every_n_steps` steps.

    `dirpath` defaults to `<root_dir>/checkpoints`. `filename` is a format string over
    `epoch`, `step` and metric names (`"{epoch:02d}-{val_loss:.2f}"`; `.ckpt` is added; a
    `/` never makes folders). With `monitor`, the `save_top_k` best by `mode` are kept
    (-1: all); without, the newest. `last.ckpt` is always the most recent save. The index
    `checkpoints.json` names best and last (`ft.checkpoints(dirpath)`). Its bookkeeping
    lives in the `"checkpointing"` slot, so a resumed run keeps its top k.

    Examples:
        >>> import tempfile, torch, ftrain as ft
        >>> loss = lambda m, b: m(b).pow(2).mean()
        >>> step = ft.with_checkpointing(ft.train_step(loss), tempfile.mkdtemp(),
        ...                              monitor="loss_epoch", save_top_k=2)
    """
    return WithCheckpointing(step, None if dirpath is None else os.fspath(dirpath),
                             every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
                             monitor=monitor, mode=mode, save_top_k=save_top_k,
                             save_last=save_last, filename=filename, hparams=hparams,
                             name=name)
