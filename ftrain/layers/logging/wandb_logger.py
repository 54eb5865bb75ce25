"""`ft.loggers.WandB`: metrics, config and the final checkpoint in a Weights & Biases run.

Built on `wandb` itself (imported on first use). W&B's step is ftrain's step. Online, a
resumed run continues the same run (`resume="allow"` with the saved id) and W&B reports
the step it holds last, so the steps the killed process already logged are not logged
again. Offline (`mode="offline"`, no account), W&B cannot say what an earlier offline
segment holds: a resumed offline run writes a new segment of the same run id, starting
after the checkpoint's step, and `wandb sync` of both shows the steps between that
checkpoint and the kill twice (with equal values: the resume is bitwise).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from ftrain.errors import ConfigError
from ftrain.layers.logging.tracked import Resumed, check_saved
from ftrain.storage import is_url

IN_USE_WAIT = 60.0  # seconds a resumed run waits for a killed process's W&B service


def _wandb() -> Any:
    try:
        import wandb  # lazy: a slow import
    except ImportError as err:
        raise ConfigError("ft.loggers.WandB needs wandb: pip install 'ftrain[wandb]'") \
            from err
    return wandb


class WandB(Resumed):
    """Log to a W&B run; `resume="auto"` continues the same run.

    `project`, `name`, `entity`, `group`, `tags`: as `wandb.init`'s; `mode`: "online",
    "offline" (no account needed; `wandb sync` uploads later) or "disabled" (None: W&B's
    default, from `WANDB_MODE`); `save_dir`: where W&B writes its files (`<save_dir>/
    wandb`); `id`: continue this run; `**init`: any other `wandb.init` argument.
    Hyperparameters go to the run's config; the final metrics to its summary; the final
    checkpoint's path to the summary as `ftrain.checkpoint`, and with
    `log_checkpoint=True` the file (or sharded folder) as a `model` artifact.

    Examples:
        >>> import tempfile, ftrain as ft
        >>> logger = ft.loggers.WandB("demo", mode="offline", save_dir=tempfile.mkdtemp())
        >>> record = logger.attach(None, step=0)
        >>> logger.log_metrics({"loss": 0.5}, step=1); logger.finalize()
        >>> record["id"] == logger.id
        True
    """

    def __init__(self, project: str = "ftrain", *, name: str | None = None,
                 mode: str | None = None, save_dir: str | os.PathLike[str] = ".",
                 id: str | None = None, entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, log_checkpoint: bool = False,
                 **init: Any) -> None:
        if mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"WandB(mode=) must be 'online', 'offline', 'disabled' or "
                              f"None, got {mode!r}")
        self.project = project
        self.name = name
        self.mode = mode
        self.save_dir = os.fspath(save_dir)
        self.entity, self.group, self.tags = entity, group, tags
        self.log_checkpoint_files = log_checkpoint
        self.init_kwargs = init
        self.id = id
        self._run: Any = None

    @property
    def experiment(self) -> Any:
        """The `wandb` Run (started on first use)."""
        if self._run is None:
            self._start()
        return self._run

    def _start(self) -> None:
        os.makedirs(self.save_dir, exist_ok=True)
        wandb = _wandb()
        deadline = time.monotonic() + IN_USE_WAIT
        while True:
            try:
                self._run = wandb.init(
                    project=self.project, name=self.name, mode=self.mode,
                    dir=self.save_dir, id=self.id, resume="allow", entity=self.entity,
                    group=self.group, tags=self.tags, reinit="create_new",
                    **self.init_kwargs)
                break
            except Exception as err:  # W&B raises its own ServerResponseError
                # a killed process's W&B service holds its run for a few seconds after
                # (a restart on the same machine): wait for it to let go
                if "in use" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.id = self._run.id  # W&B's own when none was given

    # -- the tracker protocol (ftrain.layers.logging.tracked) ---------------------------------

    def attach(self, saved: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
        """Continue the run named by `saved` (a resume) or start one; returns its record."""
        saved = check_saved(saved, "WandB")
        resuming = saved is not None and self._run is None
        if resuming:
            assert saved is not None
            run_id = saved.get("id")
            if not isinstance(run_id, str):
                raise ConfigError(f"the W&B record in the checkpoint lacks a run id: {saved}")
            self.id = run_id
        if self._run is None:
            self._start()
        run = self._run
        if resuming:
            # online: the step W&B holds last; offline: unknown (see the module's note)
            known = run.resumed and not run.offline
            self.resume_at(step, run.starting_step - 1 if known else None, "W&B")
        return {"id": self.id, "project": self.project}

    # -- the logger protocol ---------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.fresh(step):
            self.experiment.log(dict(metrics), step=step)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        run = self.experiment
        run.config.update(dict(hparams), allow_val_change=True)
        if metrics:
            run.summary.update(dict(metrics))

    def log_checkpoint(self, path: str) -> None:
        """Record the final checkpoint's path; add it as an artifact with log_checkpoint."""
        run = self.experiment
        run.summary["ftrain.checkpoint"] = path
        if self.log_checkpoint_files and not is_url(path):  # a local file or folder
            artifact = _wandb().Artifact(f"model-{self.id}", type="model")
            if os.path.isdir(path):
                artifact.add_dir(path)
            else:
                artifact.add_file(path)
            run.log_artifact(artifact)

    def finalize(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __repr__(self) -> str:
        return f"WandB({self.project!r}, mode={self.mode!r})"
