"""`fit(resume=...)`: which checkpoint a run continues from, and that it is this run's."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ftrain.checkpoint import load, load_hparams
from ftrain.checkpointing import WithCheckpointing, latest_valid
from ftrain.combinators import find
from ftrain.errors import ConfigError
from ftrain.state import TrainState, donate

log = logging.getLogger("ftrain")


def resume_from(step: Any, state: TrainState, resume: Any, root_dir: str | None,
                donate_input: bool, hparams: Any, check: bool
                ) -> tuple[TrainState, str | None]:
    """The state to continue from, and (for "auto") the run folder it came from."""
    folder = None
    if resume == "auto":
        layer = find(step, WithCheckpointing)
        if layer is None:
            raise ConfigError("resume='auto' looks in the checkpoint folder of a "
                              "checkpointing layer, and this step has none (checkpoint="
                              "False?); pass resume=<path> instead")
        path = None
        for folder in layer.resume_folders(root_dir):
            path = latest_valid(folder)  # raises if files are there but none loads
            if path is not None:
                break
        if path is None:
            log.warning("resume='auto': no checkpoint in %s; starting fresh",
                        layer.dirpath_arg or os.path.join(root_dir or os.getcwd(),
                                                          "checkpoints"))
            return state, None
        if check:
            expected = layer.hparams if layer.hparams is not None else hparams
            check_same_run(path, load_hparams(path), expected, state.seed)
    else:
        path = os.fspath(resume)
    loaded = load(path, like=state)
    if resume == "auto" and check and loaded.seed != state.seed:
        raise ConfigError(f"resume='auto' found {path!r}, a checkpoint of a run with seed "
                          f"{loaded.seed}; this run has seed {state.seed}. Pass "
                          "resume=<path> or resume_hparams='ignore' to continue it anyway")
    log.warning("resuming from %s at step %d", path, loaded.step)
    if donate_input:
        donate(state, "ft.fit (resumed from a checkpoint)")
    return loaded, folder


def check_same_run(path: str, saved: Mapping[str, Any], expected: Any, seed: int) -> None:
    """resume='auto' continues this run only: the checkpoint's hparams must be this run's."""
    import json

    def plain(value: Any) -> Any:  # as stored: tuples are lists, no hparams is {}
        return json.loads(json.dumps(dict(value or {}), default=str))

    ours, theirs = plain(expected), plain(saved)
    if ours == theirs:
        return
    keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    shown = ", ".join(f"{k}: {theirs.get(k, '<absent>')!r} in the checkpoint, "
                      f"{ours.get(k, '<absent>')!r} now" for k in keys[:8])
    raise ConfigError(f"resume='auto' found {path!r}, a checkpoint of a run with other "
                      f"hparams ({shown}); it is not this run's. Pass resume=<path> or "
                      "resume_hparams='ignore' to continue it anyway, or another root_dir "
                      "to start a new run")
