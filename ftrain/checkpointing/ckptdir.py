"""Checkpoint directories on disk: what one is, how it replaces another, how it goes away.

A sharded checkpoint is a folder `<name>.ckpt/` holding `ftrain.pt` (everything but the
tensors, written by rank 0), DCP's `.metadata` and one `*.distcp` file per writing rank.
Removal is never recursive: a folder is deleted only if it holds exactly such plain files
(so a user's folder that happens to sit under a checkpoint's name is never touched), and it
is first renamed to a temporary name, so a half-deleted folder never looks like a
checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from typing import Any

from ftrain import storage as _storage

log = logging.getLogger("ftrain")
META = "ftrain.pt"  # the non-tensor part of the state, written by rank 0
DCP_META = ".metadata"  # DCP's index of the shards, written last by its coordinator
_MEMBER = re.compile(r"ftrain\.pt|\.metadata(\.tmp)?|__\d{1,9}_\d{1,9}\.distcp"
                     r"|\.tmp-.{1,120}\.tmp")


def holds_dtensor(state: Any) -> bool:
    """Whether any tensor of a TrainState is a DTensor (sharded across ranks); DTensor's
    module is not imported for this (a process that made none has not loaded it).

    Examples:
        >>> import torch, ftrain as ft
        >>> holds_dtensor(ft.TrainState.create(torch.nn.Linear(2, 1)))
        False
    """
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_leaves

    trees = (state.params, state.buffers, state.opt_state, state.slots)
    return any(isinstance(leaf, DTensor) for tree in trees for leaf in tree_leaves(tree))


def make_way(path: str) -> None:
    """Remove a checkpoint folder at `path` (a sharded run's `last.ckpt`) so that a file
    can take its place; anything else there is left for the writer to replace or refuse."""
    if _is_dir(path) and is_checkpoint_dir(path):
        remove(path)


def _is_dir(path: str) -> bool:
    if _storage.is_url(path):  # sharded checkpoints are never written to a URL
        return False
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # a link to a folder is not one
    except OSError:
        return False


def is_checkpoint_dir(path: str) -> bool:
    """Whether `path` is a real folder (not a link) holding an `ftrain.pt`.

    Examples:
        >>> import tempfile
        >>> is_checkpoint_dir(tempfile.mkdtemp())
        False
    """
    return _is_dir(path) and os.path.isfile(os.path.join(path, META)) and \
        not os.path.islink(os.path.join(path, META))


def own_dir(folder: str, name: str) -> str | None:
    """The path of `name` in `folder` if it is a checkpoint folder there (not a link)."""
    path = os.path.join(folder, name)
    if not is_checkpoint_dir(path) or os.path.realpath(os.path.dirname(path)) != \
            os.path.realpath(folder):
        return None
    return path


def _members(path: str) -> list[str] | None:
    """The entries of a checkpoint folder if all are plain files of the kinds it holds."""
    try:
        entries = os.listdir(path)
    except OSError:
        return None
    for entry in entries:
        full = os.path.join(path, entry)
        if not _MEMBER.fullmatch(entry) or not stat.S_ISREG(os.lstat(full).st_mode):
            return None
    return entries


def remove(path: str) -> bool:
    """Delete a checkpoint folder (or the temporary folder of an unfinished save): only if
    it holds nothing but the plain files a save writes; never recursive, never through a
    link. Returns whether it was removed.

    Examples:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> open(os.path.join(d, "notes.txt"), "w").close()
        >>> remove(d), os.path.exists(d)   # not a checkpoint's file: left alone
        (False, True)
    """
    if not _is_dir(path) or _members(path) is None:
        return False
    parent = os.path.dirname(os.path.abspath(path))
    doomed = path
    if not os.path.basename(path).startswith(".tmp-"):  # hide it first: never half a ckpt
        doomed = tempfile.mkdtemp(prefix=_prefix(), suffix=".tmp", dir=parent)
        os.rmdir(doomed)
        os.rename(path, doomed)
    for entry in _members(doomed) or []:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(doomed, entry))
    try:
        os.rmdir(doomed)
    except OSError as err:  # something appeared meanwhile: leave it
        log.warning("could not remove %s: %s", doomed, err)
        return False
    fsync_dir(parent)
    return True


def _prefix() -> str:
    """Like `folders.tmp_prefix()` (kept apart: folders imports this module)."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
    return f".tmp-{host}-{os.getpid()}-"


def fsync_dir(folder: str) -> None:
    """Make a folder's entries durable; best effort (as `atomic.fsync_dir`)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def make_temporary(parent: str) -> str:
    """A new empty folder beside the target, named like ftrain's temporaries."""
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=_prefix(), suffix=".tmp", dir=parent)


def replace(tmp: str, path: str) -> None:
    """Put the finished folder (or file) `tmp` at `path`. A file or checkpoint folder
    already there is moved aside first and removed after; anything else is refused.

    Two renames: a kill between them leaves no entry at `path` (the old one survives under
    a temporary name, the new one under its own), never a partial checkpoint at `path`.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(path):
        os.rename(tmp, path)
        fsync_dir(parent)
        return
    old_is_dir = _is_dir(path)
    if old_is_dir and _members(path) is None:
        from ftrain.errors import CheckpointError

        raise CheckpointError(f"{path!r} exists and is a folder that is not an ftrain "
                              "checkpoint: it is not replaced (move it away)")
    aside = tempfile.mkdtemp(prefix=_prefix(), suffix=".tmp", dir=parent)
    os.rmdir(aside)
    os.rename(path, aside)
    os.rename(tmp, path)
    fsync_dir(parent)
    if old_is_dir:
        remove(aside)
    else:
        with contextlib.suppress(OSError):
            os.unlink(aside)


def link_copy(src: str, dst: str) -> None:
    """Make `dst` a checkpoint folder holding the same files as `src`: hard links (no data
    copied), else copies; put in place by `replace`."""
    tmp = make_temporary(os.path.dirname(os.path.abspath(dst)))
    for entry in _members(src) or []:
        if entry.startswith(".tmp-"):
            continue
        try:
            os.link(os.path.join(src, entry), os.path.join(tmp, entry))
        except OSError:
            shutil.copyfile(os.path.join(src, entry), os.path.join(tmp, entry))
    fsync_dir(tmp)
    replace(tmp, dst)
