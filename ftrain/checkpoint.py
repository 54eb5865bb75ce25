"""Checkpoints are plain data: `ft.save`, `ft.load`, `ft.load_hparams`.

A checkpoint holds the whole state (params, buffers, optimizer state, step, seed, every
slot, and so the data position) plus hyperparameters and a format version: tensors and
JSON-compatible values only, written with `torch.save` and read with
`torch.load(weights_only=True)`, so nothing in the file is imported or called. Writes are
atomic: a temporary file in the target folder, flushed and fsynced, then renamed over the
target (and the folder fsynced), so a kill at any moment leaves either the old file or the
new one, never a partial file under the target name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ftrain import health
from ftrain.errors import CheckpointError, ConfigError
from ftrain.state import TrainState, parts

FORMAT = "ftrain.checkpoint"
VERSION = 1
TMP_PREFIX = ".tmp-"
_FIELDS = ("params", "buffers", "opt_state", "slots", "step", "seed")


def _check_plain(value: Any, where: str) -> None:
    """Only tensors and JSON-compatible values may go into a checkpoint."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(
            value, (bool, int, float, str)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: keys must be strings or ints, got {k!r}")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} is a {type(value).__name__}; a checkpoint holds tensors "
                          "and JSON-compatible values (dict, list, str, int, float, bool, "
                          "None) only")


def _plain_slots(slots: Mapping[str, Any]) -> dict[str, Any]:
    # tuples become lists (torch's safe loader reads both, JSON-style data has lists)
    out = {}
    for name, value in slots.items():
        _check_plain(value, f"slots.{name}")
        out[name] = value
    return out


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write `path` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would; mkstemp makes files 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: str) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def payload(state: TrainState, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dict `ft.save` writes (after checking everything in it is plain data)."""
    if hparams is not None:
        if not isinstance(hparams, Mapping):
            raise ConfigError(f"hparams must be a dict, got {type(hparams).__name__}")
        _check_plain(dict(hparams), "hparams")
    health.pending_record(state)  # fold in-flight non-finite records into the slot
    return {"format": FORMAT, "version": VERSION, "params": state.params,
            "buffers": state.buffers, "opt_state": state.opt_state, "step": int(state.step),
            "seed": int(state.seed), "slots": _plain_slots(state.slots),
            "hparams": dict(hparams) if hparams is not None else None,
            "models": sorted(state.model) if state.multi else None}


def save(path: str | os.PathLike[str], state: TrainState,
         hparams: Mapping[str, Any] | None = None) -> str:
    """Write the whole state (and `hparams`) to `path` atomically; return the path.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.adam(1e-3))
        >>> path = ft.save(os.path.join(tempfile.mkdtemp(), "a.ckpt"), state, {"lr": 1e-3})
        >>> ft.load(path, like=state).step, ft.load_hparams(path)
        (0, {'lr': 0.001})
    """
    if not isinstance(state, TrainState):
        raise ConfigError(f"ft.save expects a TrainState, got {type(state).__name__}")
    data = payload(state, hparams)
    path = os.fspath(path)
    atomic_write(path, lambda f: torch.save(data, f))
    return path


def read(path: str | os.PathLike[str], map_location: Any = None, *,
         mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint file safely (weights_only); errors say what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path!r}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path!r} is not a safe checkpoint: it asks to run or import something, which "
            f"ftrain never does (loaded with weights_only=True). Details: {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path!r} is truncated or not a checkpoint "
                              f"({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an ftrain checkpoint (no format marker)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format version "
                              f"{data.get('version')}; this ftrain reads version {VERSION}")
    return data


def load_hparams(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The hyperparameters stored in a checkpoint ({} if none); tensors are not read.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1))
        >>> path = ft.save(os.path.join(tempfile.mkdtemp(), "m.ckpt"), state, {"width": 2})
        >>> {**ft.load_hparams(path), "width": 4}   # overrides for a rebuilt model
        {'width': 4}
    """
    return dict(read(path, map_location="cpu", mmap=True).get("hparams") or {})


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
    exclude = list(exclude)
    whole = {p for p in exclude if p in ("opt_state", "slots", "step")}
    names = [p for p in exclude if p not in whole]
    data = read(path, map_location=map_location if map_location is not None else like.device)
    saved_models = data.get("models")
    like_models = sorted(like.model) if like.multi else None
    if saved_models != like_models:
        raise CheckpointError(f"{os.fspath(path)!r} holds models {saved_models}, this state "
                              f"{like_models}")
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
            return {k: (ref[k] if k in excluded else merge(s[k], ref[k])) for k in ref}
        if isinstance(ref, torch.Tensor):
            return s
        return ref

    return merge(saved, like)
