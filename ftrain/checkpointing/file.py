"""Checkpoints are plain data: `ft.save`, `ft.load`, `ft.load_hparams`.

A checkpoint holds the whole state (params, buffers, optimizer state, step, seed, every
slot, and so the data position) plus hyperparameters and a format version: tensors and
JSON-compatible values only, written with `torch.save` and read with
`torch.load(weights_only=True)`, so nothing in the file is imported or called. Writes are
atomic: a temporary file in the target folder, flushed and fsynced, then renamed over the
target (and the folder fsynced), so a kill at any moment leaves either the old file or the
new one, never a partial file under the target name.

The parts live beside this module: `atomic` (temporary file, fsync, rename), `payload`
(what a checkpoint holds, and the check of what a file gave back) and `diagnostics` (what
went wrong with a file, in words). This module reads and restores: `save`, `read`, `load`,
`load_hparams`; the names other modules import from here stay importable from here.
"""

from __future__ import annotations

import fnmatch
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ftrain import storage as _storage
from ftrain.checkpointing import ckptdir as _ckptdir
from ftrain.checkpointing import folders as _folders
from ftrain.checkpointing.atomic import atomic_write, fsync_dir
from ftrain.checkpointing.diagnostics import (
    ZIP_MAGIC,
    asks_for_code,
    damaged,
    device_problem,
    first_line,
    looks_like,
)
from ftrain.checkpointing.payload import FORMAT, VERSION, check_payload, payload
from ftrain.core import trainable as _trainable
from ftrain.core.state import TrainState, parts
from ftrain.errors import CheckpointError, ConfigError

__all__ = ["FORMAT", "TMP_PREFIX", "VERSION", "atomic_write", "check_payload", "fsync_dir",
           "load", "load_hparams", "payload", "read", "save"]

TMP_PREFIX = _folders.TMP_PREFIX


def save(path: str | os.PathLike[str], state: TrainState,
         hparams: Mapping[str, Any] | None = None, *, save_async: bool = False) -> str:
    """Write the whole state (and `hparams`) to `path` atomically; return the path.

    A sharded state (DTensors, under `with_fsdp`) is written as a checkpoint folder with
    torch.distributed.checkpoint, every rank its own shards (all ranks call `save`);
    `save_async=True` then writes in the background (docs: "Sharded checkpoints").

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.adam(1e-3))
        >>> path = ft.save(os.path.join(tempfile.mkdtemp(), "a.ckpt"), state, {"lr": 1e-3})
        >>> ft.load(path, like=state).step, ft.load_hparams(path)
        (0, {'lr': 0.001})
    """
    if not isinstance(state, TrainState):
        raise ConfigError(f"ft.save expects a TrainState, got {type(state).__name__}")
    path = _storage.local_path(path)  # a URL stays one: atomic_write puts it in its store
    if _ckptdir.holds_dtensor(state):  # a folder, written by every rank (DCP)
        from ftrain.checkpointing.sharded import save_dir

        save_dir(path, state, hparams, async_save=save_async)
        return path
    data = payload(state, hparams)
    atomic_write(path, lambda f: torch.save(data, f))
    return path


def _sharded_dir(path: str) -> bool:
    """A checkpoint folder (`ftrain.checkpointing.sharded`) rather than a file."""
    if _storage.is_url(path):
        if _storage.isdir(path):
            if not _storage.exists(_storage.join(path, _ckptdir.META)):
                raise CheckpointError(f"{path!r} is a folder, not a checkpoint file (found "
                                      f"{sorted(_storage.listdir(path))[:8]})")
            from ftrain.checkpointing.sharded import refuse_url

            refuse_url(path)
        return False
    return os.path.isdir(path)


def read(path: str | os.PathLike[str], map_location: Any = None, *,
         mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint file safely (weights_only) and check its shape (`check_payload`).

    Every failure is a CheckpointError that names the file and says which of these it is:
    no such file; not a checkpoint at all (what its first bytes look like); truncated or
    damaged; unsafe (it asks to import or call something: never done); a `map_location`
    naming a device that is not available here; malformed contents.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> path = os.path.join(tempfile.mkdtemp(), "r.ckpt")
        >>> read(ft.save(path, ft.TrainState.create(torch.nn.Linear(2, 1))))["step"]
        0
        >>> with open(path, "w") as f:
        ...     _ = f.write("hello")
        >>> try:
        ...     read(path)
        ... except ft.CheckpointError as err:
        ...     print(str(err).split(" is ", 1)[1])
        not a checkpoint: text starting 'hello' (ft.save writes torch's zip format)
    """
    path = _storage.local_path(path)
    remote = _storage.is_url(path)
    if _sharded_dir(path):  # tensors stay markers: read_meta checks what the folder holds
        from ftrain.checkpointing.sharded import pending_path, read_meta, wait

        if pending_path() == os.path.abspath(path):  # this process's save in flight: every
            wait()                                   # rank reads it, so every rank waits
        return read_meta(path, read)
    if not (_storage.isfile(path) if remote else os.path.isfile(path)):
        raise CheckpointError(f"no checkpoint file at {path!r}")
    problem = device_problem(map_location)
    if problem is not None:
        raise CheckpointError(f"{path!r} cannot be loaded with map_location={map_location!r}: "
                              f"{problem}")
    try:
        with (_storage.open_read(path) if remote else open(path, "rb")) as f:
            head = f.read(64)
    except OSError as err:
        raise CheckpointError(f"{path!r} cannot be read: {err}") from err
    if not head.startswith(ZIP_MAGIC):  # ft.save writes zip archives; nothing else is unpickled
        raise CheckpointError(f"{path!r} is not a checkpoint: {looks_like(head)} (ft.save "
                              "writes torch's zip format)")
    try:
        if remote:  # from the store's file object; mmap: tensors left unread (meta)
            with _storage.open_read(path) as f:
                data = torch.load(f, map_location="meta" if mmap else map_location,
                                  weights_only=True)
        else:
            data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        asks = asks_for_code(path, str(err))
        if asks is not None:
            raise CheckpointError(
                f"{path!r} is not a safe checkpoint: it asks to run or import something "
                f"({asks}), which ftrain never does: nothing in it was imported or "
                "called") from err
        raise CheckpointError(damaged(path, err)) from err
    except RuntimeError as err:
        if re.search(r"device|data location", str(err), re.IGNORECASE):
            where = (f"map_location={map_location!r}" if map_location is not None
                     else "the devices it was saved from (pass map_location=)")
            raise CheckpointError(f"{path!r} cannot be loaded onto {where}: a device is not "
                                  f"available here ({first_line(err)})") from err
        raise CheckpointError(damaged(path, err)) from err
    except Exception as err:  # a damaged archive or pickle fails in many ways: OSError
        raise CheckpointError(damaged(path, err)) from err  # (EINVAL), KeyError, IndexError...
    return check_payload(data, path)


def load_hparams(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The hyperparameters stored in a checkpoint ({} if none); tensors are not read.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1))
        >>> path = ft.save(os.path.join(tempfile.mkdtemp(), "m.ckpt"), state, {"width": 2})
        >>> {**ft.load_hparams(path), "width": 4}   # overrides for a rebuilt model
        {'width': 4}
    """
    hparams = read(path, map_location="cpu", mmap=True).get("hparams") or {}
    if _storage.is_url(_storage.local_path(path)) and any(
            isinstance(t, torch.Tensor) for t in pytree.tree_leaves(hparams)):
        hparams = read(path, map_location="cpu").get("hparams") or {}  # tensors' values
    return dict(hparams)


def _flat(tree: Any, root: str) -> dict[str, Any]:
    leaves, _ = pytree.tree_flatten_with_path(tree)
    return {root + pytree.keystr(p): leaf for p, leaf in leaves}


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _compare(kind: str, saved: Any, like: Any, path: str) -> None:
    """Strict: the same tensors by name, shape and dtype; the error names the field."""
    a = {k: v for k, v in _flat(saved, kind).items() if isinstance(v, torch.Tensor)}
    b = {k: v for k, v in _flat(like, kind).items() if isinstance(v, torch.Tensor)}
    missing = [k for k in b if k not in a]
    unknown = [k for k in a if k not in b]
    if missing or unknown:
        raise CheckpointError(f"{path!r} does not fit this state ({kind}): missing "
                              f"{missing[:8]}, unknown {unknown[:8]}; a checkpoint from "
                              "another model or optimizer? (exclude= loads it partially)")
    for key, value in a.items():
        ref = b[key]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise CheckpointError(
                f"{path!r}: {key} is {value.dtype}{list(value.shape)} in the checkpoint, "
                f"{ref.dtype}{list(ref.shape)} in this state")


def _merge(saved: dict[str, Any], like: dict[str, Any], patterns: list[str]) -> dict[str, Any]:
    """Saved tensors, except names matching `patterns`, which keep `like`'s."""
    return {k: (like[k] if _excluded(k, patterns) or k not in saved else saved[k])
            for k in like}


def _patterns_for(patterns: list[str], part: str | None, parts_: list[str]) -> list[str]:
    """The patterns that apply to one model: `"G.fc.*"` to model G as `"fc.*"`; a pattern
    naming no model applies to every model."""
    if part is None:
        return patterns
    out = []
    for p in patterns:
        head = p.split(".", 1)[0]
        if head in parts_:
            if head == part and "." in p:
                out.append(p.split(".", 1)[1])
        else:
            out.append(p)
    return out


def load(path: str | os.PathLike[str], like: TrainState, *,
         exclude: Iterable[str] = (), map_location: Any = None) -> TrainState:
    """Restore a state saved by `ft.save`, strictly, into the shape of `like`.

    Params, buffers and optimizer state must match `like` in names, shapes and dtypes
    (errors name the field); slots come back as saved. `exclude` takes glob patterns of
    parameter/buffer names (`"head.*"`, `"G.fc.weight"` for a multi-model state) that
    keep `like`'s values, with their optimizer state, for fine-tuning, or the names
    `"opt_state"`, `"slots"`, `"step"` for whole fields. Tensors go to `map_location`
    (default: `like`'s device). `like`'s static fields (model, optimizer) are kept.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> path = ft.save(os.path.join(tempfile.mkdtemp(), "s.ckpt"), state.replace(step=7))
        >>> ft.load(path, like=state).step
        7
    """
    if not isinstance(like, TrainState):
        raise ConfigError(f"ft.load needs like=<a TrainState of the same model>, got "
                          f"{type(like).__name__}")
    path = _storage.local_path(path)
    exclude = list(exclude)
    whole = {p for p in exclude if p in ("opt_state", "slots", "step")}
    names = [p for p in exclude if p not in whole]
    onto = map_location if map_location is not None else like.device
    if isinstance(onto, torch.device) and onto.type == "meta":  # a meta-device model's
        from ftrain.parallel.dist import local_device  # state: this process's device
        onto = local_device()
    data = read(path, map_location=onto)
    saved_models = data.get("models")
    like_models = sorted(like.model) if like.multi else None
    if saved_models != like_models:
        raise CheckpointError(f"{os.fspath(path)!r} holds models {saved_models}, this state "
                              f"{like_models}")
    if "slots" not in whole:  # the run's freeze/unfreeze/optimizer changes, redone first
        like = _trainable.restore(like, data["slots"].get(_trainable.SLOT), os.fspath(path))
    if _sharded_dir(os.fspath(path)):  # the tensors, read into `like`'s layout (resharded)
        from ftrain.checkpointing.sharded import fill

        data = fill(os.fspath(path), data, like, map_location)
    params: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    opt_state: dict[str, Any] = {}
    used: set[str] = set()
    part_names = list(like.model) if like.multi else []
    where = os.fspath(path)
    for part, _, _optimizer, p_like, b_like, o_like in parts(like):
        p_saved = data["params"] if part is None else data["params"].get(part, {})
        b_saved = data["buffers"] if part is None else data["buffers"].get(part, {})
        o_saved = data["opt_state"] if part is None else data["opt_state"].get(part, {})
        label = "" if part is None else f" of model {part!r}"
        pats = _patterns_for(names, part, part_names)
        tensor_names = set(p_like) | set(p_saved) | set(b_like) | set(b_saved)
        for pat in pats:
            if any(_excluded(n, [pat]) for n in tensor_names):
                used.add(pat)
        keep_p = {k: v for k, v in p_saved.items() if not _excluded(k, pats)}
        keep_b = {k: v for k, v in b_saved.items() if not _excluded(k, pats)}
        _compare("params" + label, keep_p, {k: v for k, v in p_like.items()
                                            if not _excluded(k, pats)}, where)
        _compare("buffers" + label, keep_b, {k: v for k, v in b_like.items()
                                             if not _excluded(k, pats)}, where)
        new_p = _merge(p_saved, p_like, pats)
        new_b = _merge(b_saved, b_like, pats)
        if "opt_state" in whole:
            new_o = o_like
        else:
            excluded = {n for n in set(p_like) | set(p_saved) if _excluded(n, pats)}
            new_o = _restore_opt(o_saved, o_like, excluded, where, label)
        if part is None:
            params, buffers, opt_state = new_p, new_b, new_o
        else:
            params[part], buffers[part], opt_state[part] = new_p, new_b, new_o
    unmatched = [p for p in names
                 if p not in used and not any(p.endswith("." + u) or u == p for u in used)]
    if unmatched:
        raise ConfigError(f"exclude= pattern(s) {unmatched} matched no parameter or buffer "
                          f"name (use names like 'head.*'"
                          + (", or '<model>.head.*'" if like.multi else "") + ")")
    slots = like.slots if "slots" in whole else dict(data["slots"])
    step = like.step if "step" in whole else int(data["step"])
    return like.replace(params=params, buffers=buffers, opt_state=opt_state, slots=slots,
                        step=step, seed=int(data["seed"]))


def _restore_opt(saved: Any, like: Any, excluded: set[str], path: str, label: str) -> Any:
    """Optimizer state: strict, except the per-parameter entries of excluded parameters,
    which keep `like`'s; values that are not tensors (bookkeeping) come from `like`."""
    def drop(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: drop(v) for k, v in tree.items() if k not in excluded}
        return tree

    _compare("opt_state" + label, drop(saved), drop(like), path)

    def merge(s: Any, ref: Any) -> Any:
        if isinstance(ref, dict):
            # only tensors come from the file, and _compare matched them: a saved entry
            # missing or of another kind holds none, so `like`'s bookkeeping stays
            s = s if isinstance(s, dict) else {}
            return {k: (ref[k] if k in excluded or k not in s else merge(s[k], ref[k]))
                    for k in ref}
        if isinstance(ref, torch.Tensor):
            return s
        return ref

    return merge(saved, like)
