"""`with_checkpointing`: keep the best and the latest weights, with an index file.

Each save writes the whole state (its own bookkeeping slot included) atomically, then
`last.ckpt` (a hard link to the new file when it is kept, so no second write), then the
index `checkpoints.json` naming best and last, and only then deletes checkpoints that fell
out of the top k. A kill at any moment leaves loadable checkpoints and an index that names
only files that exist. `ft.checkpoints(dirpath)` reads the index.

The index and checks of untrusted bookkeeping are in `index` (re-exported here), file names
in `naming`, the top-k choice in `ranking`; here: when to save, where, and what to trust.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist

from ftrain import storage as _storage
from ftrain.checkpointing import ckptdir as _ckptdir
from ftrain.checkpointing import folders as _folders
from ftrain.checkpointing import naming, ranking
from ftrain.checkpointing.file import atomic_write, fsync_dir, payload
from ftrain.checkpointing.index import (
    INDEX,
    LAST,
    CheckpointIndex,
    check_slot,
    checkpoints,
    continues,
    index_json,
    latest_valid,
)
from ftrain.core import bind as _bind
from ftrain.core import health
from ftrain.core import rng as _rng
from ftrain.core.host import to_host
from ftrain.core.layer import Combinator, Metrics, request
from ftrain.core.run import RunInfo, run_info
from ftrain.core.state import LOOP_SLOT, TrainState
from ftrain.core.trigger import Trigger, ended_epoch
from ftrain.errors import ConfigError, MonitorError

__all__ = ["INDEX", "LAST", "CheckpointIndex", "Mode", "WithCheckpointing", "check_slot",
           "checkpoints", "latest_valid", "with_checkpointing"]

log = logging.getLogger("ftrain")
Mode = Literal["min", "max"]


class WithCheckpointing(Combinator):
    """The combinator built by `with_checkpointing`."""

    role = "checkpointing"

    def __init__(self, inner: Any, dirpath: str | None = None, *,
                 every_n_steps: int | None = None, every_n_epochs: int | None = 1,
                 monitor: str | None = None, mode: Mode = "min", save_top_k: int = 1,
                 save_last: bool = True, filename: str = "{epoch}-{step}",
                 hparams: Mapping[str, Any] | None = None, name: str = "checkpointing",
                 save_async: bool = False) -> None:
        super().__init__(inner, name)
        self.name = name
        self.trigger = Trigger(every_n_steps, every_n_epochs, on_last=True)
        self.reads = (monitor,) if monitor is not None else ()
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigError(f"save_top_k must be an int >= -1 (-1 keeps all), got "
                              f"{save_top_k!r}")
        if not isinstance(filename, str) or not filename:
            raise ConfigError(f"filename must be a format string, got {filename!r}")
        try:
            self.template_fields = naming.template_fields(filename)
        except ValueError as err:
            raise ConfigError(f"filename {filename!r} is not a valid format string: "
                              f"{err}") from err
        self.dirpath_arg = _storage.local_path(dirpath) if dirpath is not None else None
        if _storage.is_url(self.dirpath_arg):  # a protocol without its package fails now
            _storage.filesystem(self.dirpath_arg)
        self.dirpath = self.dirpath_arg
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.filename = filename
        self.hparams = dict(hparams) if hparams is not None else None
        self.save_async = bool(save_async)  # sharded states only (DCP async_save)
        self._lock: _folders.FolderLock | None = None
        self._owned: set[str] = set()  # files this layer may delete: its own saves
        self._checked()

    def __repr__(self) -> str:
        return f"with_checkpointing({self.dirpath!r}, monitor={self.monitor!r})"

    def resume_folders(self, root_dir: str | None) -> list[str]:
        """Where `resume="auto"` looks, newest first: the given folder, or each run's
        `version_N` folder under `<root_dir>/checkpoints`."""
        if self.dirpath_arg is not None:
            return [self.dirpath_arg]
        root = _runs_root(root_dir)
        # last, the root itself: where runs of ftrain 0.1 wrote their checkpoints
        return [path for _, path in _folders.versions(root)] + [root]

    def _empty_slot(self) -> dict[str, Any]:
        return {"saved": [], "best": None, "best_score": None, "last": None,
                "last_step": None, "monitor": self.monitor, "mode": self.mode,
                "dir": None, "run": None}

    def after_init(self, state: TrainState) -> TrainState:
        run = run_info(state)
        self.run_hparams = self.hparams if self.hparams is not None else (
            dict(run.hparams) if run is not None and run.hparams is not None else None)
        raw = state.slots.get(self.name)
        slot = None if raw is None else check_slot(raw, f"the {self.name!r} slot")
        if run is not None and run.fast_dev_run:
            return state  # a quick check writes nothing: no folder either
        slot = self._open(run, slot)
        return state.replace(slots={**state.slots, self.name: slot})

    def _open(self, run: RunInfo | None, slot: dict[str, Any] | None) -> dict[str, Any]:
        """Choose this run's folder, lock it (rank 0) and decide how much of a restored
        slot to trust; return the slot to run with."""
        self.dirpath = self._choose_dir(run, slot)
        if _rng.rank() == 0:
            if self._lock is None or not _folders.same_folder(self._lock.folder,
                                                              self.dirpath):
                self._release()
                self._lock = _folders.FolderLock.acquire(self.dirpath)
            _folders.remove_stale_temporaries(self.dirpath)
        opened = self._trust(slot)
        if run is not None and run.world > 1:  # rank 0 read the folder: its word holds
            shared = [opened]
            dist.broadcast_object_list(shared, src=0)
            opened = shared[0]
            self._owned = {e["file"] for e in opened["saved"]}
        return opened

    def _trust(self, slot: dict[str, Any] | None) -> dict[str, Any]:
        """The slot to run with: a restored one if it is this folder's own bookkeeping,
        else a new ranking (the files the restored one lists are never deleted)."""
        assert self.dirpath is not None
        if slot is not None and continues(slot, self.dirpath):
            if (slot["monitor"], slot["mode"]) != (self.monitor, self.mode):
                raise ConfigError(
                    f"the {self.name!r} slot of this state ranks checkpoints by monitor="
                    f"{slot['monitor']!r}, mode={slot['mode']!r}; this layer uses "
                    f"monitor={self.monitor!r}, mode={self.mode!r}. Keep them, or give the "
                    "layer another name= (and dirpath) to start a new ranking")
            self._owned = {e["file"] for e in slot["saved"]}
            return {**slot, "dir": _storage.normalize(self.dirpath)}
        if slot is not None and (slot["saved"] or slot["last"]):
            log.warning("the %r slot was written by another run or in another folder "
                        "(%s): its top-k bookkeeping is not used in %s, and none of the "
                        "files it names will be deleted", self.name, slot["dir"],
                        self.dirpath)
        self._owned = set()
        return {**self._empty_slot(), "dir": _storage.normalize(self.dirpath),
                "run": uuid.uuid4().hex}

    def _choose_dir(self, run: RunInfo | None, slot: Mapping[str, Any] | None) -> str:
        if self.dirpath_arg is not None:
            return self.dirpath_arg
        if run is not None and run.checkpoint_dir is not None:
            return run.checkpoint_dir  # resume="auto" continues the run in its folder
        root = _runs_root(run.root_dir if run is not None else None)
        chosen: list[str | None] = [None]
        if _rng.rank() == 0:
            folder = slot["dir"] if slot is not None else None
            continuing = folder is not None and any(
                _folders.same_folder(folder, path) for _, path in _folders.versions(root))
            if continuing:  # a state this run left off: its own folder again
                assert folder is not None and slot is not None
                continuing = continues(slot, folder)
            chosen[0] = folder if continuing else _folders.claim_version(root)
        if run is not None and run.world > 1:  # every rank names rank 0's folder
            dist.broadcast_object_list(chosen, src=0)
        assert chosen[0] is not None
        return chosen[0]

    def _ready(self) -> str:
        """The folder to write to, for a layer called without a loop (no init)."""
        if self.dirpath is None:
            self.dirpath = self._choose_dir(None, None)
        if _rng.rank() == 0 and self._lock is None:
            self._lock = _folders.FolderLock.acquire(self.dirpath)
        return self.dirpath

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def at_close(self, state: TrainState) -> None:
        if "ftrain.checkpointing.sharded" in sys.modules:  # the last async save lands
            from ftrain.checkpointing.sharded import wait  # before the run ends

            wait()
        self._release()  # the folder is free for the next run that continues it

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        state, metrics = self.inner(state, batch)
        if self.trigger.step_due(state.step):
            state = self._request(state, metrics)
        return state, metrics

    def at_epoch_end(self, state: TrainState, metrics: Metrics) -> tuple[TrainState, Any]:
        completed = ended_epoch(state)
        due = self.trigger.epoch_due(state)
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
        state, rolled_back = request(self.inner, state, "verify")
        if rolled_back:  # a layer inside (with_rollback) found this state bad: no save now
            return state
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
        return naming.render(self.filename, epoch, state.step, values), score, epoch

    def _defer(self, state: TrainState, action: Any) -> TrainState:
        binding = _bind.binding_of(state)
        if binding is not None and binding.live and binding.owner is not None:
            binding.deferred.append(action)  # the loop runs it after the whole stack
            return state
        return action(state)  # called directly: save now

    def save_now(self, state: TrainState, metrics: Mapping[str, Any] | None = None
                 ) -> TrainState:
        """Write a checkpoint of `state` now, ranked by `metrics`; return the new state."""
        name, score, epoch = self._plan(state, dict(metrics or {}))
        return self._commit(state, name, score, epoch)

    def on_request(self, state: TrainState, what: str) -> tuple[TrainState, str | None]:
        """The loop's requests: "save" writes `last.ckpt` now (a signal stops the run)."""
        if what != "save":
            return state, None
        state, _ = request(self.inner, state, "verify")  # never save an unverified state
        state = self.save_last_now(state)
        return state, _storage.join(self.dirpath or "", LAST)

    def save_last_now(self, state: TrainState) -> TrainState:
        """Write only `last.ckpt` (outside the top k; no metric needed), e.g. on SIGTERM."""
        health.check_finite(state)
        slot = {**self._slot(state), "last": LAST, "last_step": state.step}
        state = state.replace(slots={**state.slots, self.name: slot})
        if _ckptdir.holds_dtensor(state):  # every rank writes its shards (collective)
            from ftrain.checkpointing.sharded import save_dir

            folder = self._ready() if _rng.rank() == 0 else self.dirpath or ""
            save_dir(_storage.join(folder, LAST), state, self._hparams_to_save(),
                              then=lambda: self._write_index(slot))
            return state
        if _rng.rank() == 0:
            folder = self._ready()
            data = payload(state, self._hparams_to_save())
            _ckptdir.make_way(_storage.join(folder, LAST))
            atomic_write(_storage.join(folder, LAST), lambda f: torch.save(data, f))
            self._write_index(slot)
        return state

    def _slot(self, state: TrainState) -> dict[str, Any]:
        """This layer's slot, opened first if the layer is called without a loop."""
        slot = state.slots.get(self.name)
        if slot is None or self.dirpath is None:
            checked = None if slot is None else check_slot(slot, f"the {self.name!r} slot")
            return self._open(run_info(state), checked)
        return slot  # type: ignore[no-any-return]

    def _hparams_to_save(self) -> dict[str, Any] | None:
        return getattr(self, "run_hparams", self.hparams)

    def _commit(self, state: TrainState, name: str, score: float | None, epoch: int
                ) -> TrainState:
        health.check_finite(state)  # never write a checkpoint of a NaN run silently
        slot = self._slot(state)
        assert self.dirpath is not None
        taken = {e["file"] for e in slot["saved"]} | {LAST}
        name = naming.unique_name(name, taken, self.dirpath, self.filename)
        sharded = _ckptdir.holds_dtensor(state)
        run = run_info(state)
        if sharded and run is not None and run.world > 1:  # one name: rank 0's
            agreed = [name]
            dist.broadcast_object_list(agreed, src=0)
            name = agreed[0]
        entry = {"file": name, "score": score, "step": state.step, "epoch": epoch}
        kept, dropped = ranking.top_k([dict(e) for e in slot["saved"]], entry,
                                      self.save_top_k, self.monitor, self.mode)
        best = ranking.best(kept, self.monitor, self.mode)
        new_slot = {**slot, "saved": kept, "best": best["file"] if best else None,
                    "best_score": best["score"] if best else None,
                    "last": LAST if self.save_last else None, "last_step": state.step}
        state = state.replace(slots={**state.slots, self.name: new_slot})
        if run is not None:  # what loggers name as the run's checkpoint (at close)
            run.checkpoint_path = _storage.join(self.dirpath, new_slot["best"] or name)
        if sharded:  # every rank writes its shards; rank 0 the rest, once they are in place
            self._write_sharded(state, name, entry in kept, new_slot, dropped)
        elif _rng.rank() == 0:  # files from rank 0 only; no collective in here
            binding = _bind.binding_of(state)
            prof = binding.profiler if binding is not None else None
            t0 = time.perf_counter()
            self._write(state, name, entry in kept, new_slot, dropped)
            if prof is not None:
                prof.add("checkpointing", time.perf_counter() - t0)
        return state

    def _write_index(self, slot: Mapping[str, Any]) -> None:
        data = index_json(slot, self.monitor, self.mode)
        atomic_write(_storage.join(self._ready(), INDEX), lambda f: f.write(data))

    def _write_sharded(self, state: TrainState, name: str, keep: bool,
                       slot: Mapping[str, Any], dropped: list[dict[str, Any]]) -> None:
        """A checkpoint folder by DCP (`ftrain.checkpointing.sharded`); `last.ckpt`, the
        index and the deletions follow on rank 0 once it is in place (for an async save,
        when it is waited for: at the next save or at the end)."""
        folder = self._ready() if _rng.rank() == 0 else self.dirpath
        assert folder is not None
        target = _storage.join(folder, name if keep else LAST)
        if keep:
            self._owned.add(name)

        def then() -> None:
            if keep and self.save_last:
                _ckptdir.link_copy(target, os.path.join(folder, LAST))
            self._write_index(slot)
            for entry in dropped:
                self._delete(entry["file"])

        if keep or self.save_last:
            from ftrain.checkpointing.sharded import save_dir

            save_dir(target, state, self._hparams_to_save(),
                              async_save=self.save_async, then=then)

    def _write(self, state: TrainState, name: str, keep: bool, slot: Mapping[str, Any],
               dropped: list[dict[str, Any]]) -> None:
        folder = self._ready()
        data = payload(state, self._hparams_to_save())
        target = _storage.join(folder, name)
        last = _storage.join(folder, LAST)
        if self.save_last:  # a checkpoint folder there from a sharded run goes first
            _ckptdir.make_way(last)
        if keep:
            atomic_write(target, lambda f: torch.save(data, f))
            self._owned.add(name)
            if self.save_last:
                _link_or_copy(target, last)
        elif self.save_last:
            atomic_write(last, lambda f: torch.save(data, f))
        self._write_index(slot)
        for entry in dropped:  # only now: the new checkpoint and index are safely written
            self._delete(entry["file"])

    def _delete(self, name: str) -> None:
        """Delete a checkpoint that left the top k: only a file this layer wrote (or its
        run wrote in this folder), by a bare name, and never through a link."""
        if name not in self._owned or name == LAST:
            return
        self._owned.discard(name)
        bare = _folders.bare_name(name, "a file", "top k")
        path = _folders.own_file(self._ready(), bare)
        if path is not None:
            _storage.remove(path)
        elif (folder := _ckptdir.own_dir(self._ready(), bare)) is not None:
            _ckptdir.remove(folder)  # only the plain files a sharded save writes


def _runs_root(root_dir: str | None) -> str:
    """The folder that holds one `version_N` checkpoint folder per run."""
    return _storage.join(_storage.local_path(root_dir or os.getcwd()), "checkpoints")


def _link_or_copy(src: str, dst: str) -> None:
    """Make `dst` the same file as `src` atomically: a hard link, else a copy (on a
    URL: a copy in the store, to a temporary key first)."""
    if _storage.is_url(dst):
        _storage.copy_atomic(src, dst, _folders.tmp_prefix())
        return
    folder = os.path.dirname(dst)
    fd, tmp = tempfile.mkstemp(prefix=_folders.tmp_prefix(), suffix=".tmp", dir=folder)
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
                       name: str = "checkpointing", save_async: bool = False
                       ) -> WithCheckpointing:
    """Save checkpoints every `every_n_epochs` epochs and/or `every_n_steps` steps.

    `dirpath` defaults to `<root_dir>/checkpoints`; it may be a URL (`s3://bucket/run`,
    `memory://...`: docs "Remote storage"). `filename` is a format string over
    `epoch`, `step` and metric names (`"{epoch:02d}-{val_loss:.2f}"`; `.ckpt` is added; a
    `/` never makes folders). With `monitor`, the `save_top_k` best by `mode` are kept
    (-1: all); without, the newest. `last.ckpt` is always the most recent save. The index
    `checkpoints.json` names best and last (`ft.checkpoints(dirpath)`). Its bookkeeping
    lives in the `"checkpointing"` slot, so a resumed run keeps its top k. A sharded state
    (with_fsdp) is saved as checkpoint folders by every rank; `save_async=True` writes them
    in the background, one at a time (docs: "Sharded checkpoints").

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
                             name=name, save_async=save_async)
