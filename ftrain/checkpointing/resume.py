"""`fit(resume=...)`: which checkpoint a run continues from, and that it is this run's."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ftrain import storage as _storage
from ftrain.checkpointing.file import load, read
from ftrain.checkpointing.index import latest_valid
from ftrain.core.layer import core, layers
from ftrain.core.state import TrainState, donate
from ftrain.errors import ConfigError

log = logging.getLogger("ftrain")


def resume_from(step: Any, state: TrainState, resume: Any, root_dir: str | None,
                donate_input: bool, hparams: Any, check: bool
                ) -> tuple[TrainState, str | None]:
    """The state to continue from, and (for "auto") the run folder it came from."""
    folder = None
    if resume == "auto":
        path, folder = _find_own(step, state, root_dir, hparams, check)
        if path is None:
            return state, None
    else:
        path = _storage.local_path(resume)  # a URL stays one (fsspec)
    _join_for_shards(step, state)
    loaded = load(path, like=state)
    log.warning("resuming from %s at step %d", path, loaded.step)
    if donate_input:
        donate(state, "ft.fit (resumed from a checkpoint)")
    return loaded, folder


def _join_for_shards(step: Any, state: TrainState) -> None:
    """A meta-device model's state under with_fsdp joins the process group before
    reading, so each rank reads only its shards of a sharded checkpoint."""
    first = next(iter(pytree.tree_leaves(state.params)), None)
    fsdp = getattr(getattr(core(step), "phases", None), "fsdp", None)
    if isinstance(first, torch.Tensor) and first.is_meta and fsdp is not None:
        from ftrain.parallel import dist as _dist
        _dist.setup(fsdp.backend, fsdp.timeout)


def _find_own(step: Any, state: TrainState, root_dir: str | None, hparams: Any,
              check: bool) -> tuple[str | None, str | None]:
    """resume="auto": the newest readable checkpoint of this run, and its folder.

    In `fit`'s folder of runs, other runs' folders (other hparams or seed: another
    experiment sharing the root) are skipped, and none left means a fresh start in a new
    folder. A folder the user named is one run's: another run's checkpoint there is an
    error, as continuing would overwrite it.
    """
    layer = next((la for la in layers(step) if hasattr(la, "resume_folders")), None)
    if layer is None:
        raise ConfigError("resume='auto' looks in the checkpoint folder of a "
                          "checkpointing layer, and this step has none (checkpoint="
                          "False?); pass resume=<path> instead")
    expected = layer.hparams if layer.hparams is not None else hparams
    skipped = []
    for folder in layer.resume_folders(root_dir):
        path = latest_valid(folder)  # raises if files are there but none loads
        if path is None:
            continue
        why = _other_run(path, expected, state.seed) if check else None
        if why is None:
            return path, folder
        if layer.dirpath_arg is not None:
            raise ConfigError(f"resume='auto' found {path!r}, a checkpoint of another run "
                              f"({why}). Pass resume=<path> or resume_hparams='ignore' to "
                              "continue it anyway, or give this run its own folder")
        log.warning("resume='auto': skipping %s, another run's (%s)", path, why)
        skipped.append(folder)
    where = layer.dirpath_arg or _storage.join(root_dir or os.getcwd(), "checkpoints")
    log.warning("resume='auto': no checkpoint of this run in %s%s; starting fresh", where,
                f" ({len(skipped)} other run(s) skipped)" if skipped else "")
    return None, None


def _other_run(path: str, expected: Any, seed: int) -> str | None:
    """Why the checkpoint at `path` is not this run's (other hparams or seed), or None."""
    import json

    data = read(path, map_location="cpu", mmap=True)  # tensors are not read

    def plain(value: Any) -> Any:  # as stored: tuples are lists, no hparams is {}
        return json.loads(json.dumps(dict(value or {}), default=str))

    ours, theirs = plain(expected), plain(data["hparams"])
    if ours != theirs:
        keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        return "hparams " + ", ".join(f"{k}: {theirs.get(k, '<absent>')!r} in the "
                                      f"checkpoint, {ours.get(k, '<absent>')!r} now"
                                      for k in keys[:8])
    if data["seed"] != seed:
        return f"seed {data['seed']} in the checkpoint, {seed} now"
    return None
