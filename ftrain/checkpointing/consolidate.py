"""`ft.consolidate`: a sharded checkpoint folder turned into an ordinary checkpoint file."""

from __future__ import annotations

import os

import torch

from ftrain import storage as _storage
from ftrain.checkpointing import sharded
from ftrain.checkpointing.atomic import atomic_write
from ftrain.checkpointing.file import read
from ftrain.checkpointing.payload import check_payload
from ftrain.errors import CheckpointError

__all__ = ["consolidate"]


def consolidate(checkpoint: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """Write the sharded checkpoint folder `checkpoint` as one ordinary ftrain checkpoint
    file at `path` (for `ft.load`, `ft.bind`, export), on one process; return `path`.

    Every tensor is read whole (DCP reassembles the shards of every rank), so this process
    needs memory for the whole state once. No model is needed: the shapes come from the
    checkpoint.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> from ftrain.checkpointing.sharded import save_dir
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.adam(1e-3))
        >>> d = tempfile.mkdtemp()
        >>> folder = save_dir(os.path.join(d, "run.ckpt"), state)
        >>> one = ft.consolidate(folder, os.path.join(d, "one.ckpt"))
        >>> torch.equal(ft.load(one, like=state).params["weight"], state.params["weight"])
        True
    """
    where, path = _storage.local_path(checkpoint), _storage.local_path(path)
    if _storage.is_url(where):
        sharded.refuse_url(where)
    if not os.path.isdir(where):
        raise CheckpointError(f"ft.consolidate expects a sharded checkpoint folder, and "
                              f"{where!r} is " + ("a file (already one checkpoint)"
                                                  if os.path.isfile(where) else "missing"))
    if os.path.isdir(path):
        raise CheckpointError(f"ft.consolidate writes a file, and {path!r} is a folder")
    data = sharded.read_meta(where, read)
    data = sharded.fill(where, data, None, "cpu")  # no `like`: every tensor whole, CPU
    check_payload(data, path)
    atomic_write(path, lambda f: torch.save(data, f))
    return path
