"""`ft.loggers.DVCLive`: metrics and parameters in DVCLive's files (for DVC experiments).

Built on `dvclive.Live` (imported on first use). DVCLive writes `<dir>/metrics.json` (the
latest values and step), one `<dir>/plots/metrics/<name>.tsv` per metric and
`<dir>/params.yaml`. A resumed run reopens the folder with DVCLive's own `resume=True`,
which reads back the step it holds last; the steps up to it are not logged again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ftrain.errors import ConfigError
from ftrain.layers.logging.tracked import Resumed, check_saved, log
from ftrain.storage import is_url


def _live_class() -> Any:
    try:
        from dvclive import Live  # lazy
    except ImportError as err:
        raise ConfigError("ft.loggers.DVCLive needs dvclive: pip install 'ftrain[dvclive]'") \
            from err
    return Live


class DVCLive(Resumed):
    """Log to a DVCLive folder; `resume="auto"` continues the same folder.

    `dir`: DVCLive's folder. A fresh run refuses a folder that already holds another
    run's metrics (DVCLive would delete them): give each run its own folder, or resume.
    `**live`: any other `dvclive.Live` argument (`dvcyaml=`, `save_dvc_exp=`, `report=`).
    Hyperparameters go to `params.yaml`; the final checkpoint's path to the parameter
    `ftrain.checkpoint`, and with `log_checkpoint=True` the file is logged as a `model`
    artifact (DVCLive needs a DVC repository for that and says so otherwise).

    DVCLive itself, run inside a git repository, makes it a DVC repository (`dvc init`)
    and saves a DVC experiment at the end (`save_dvc_exp=False` to skip that).

    Examples:
        >>> import os, tempfile, ftrain as ft
        >>> logger = ft.loggers.DVCLive(os.path.join(tempfile.mkdtemp(), "dvclive"))
        >>> logger.dir.endswith("dvclive")
        True
    """

    def __init__(self, dir: str | os.PathLike[str] = "dvclive", *,
                 log_checkpoint: bool = False, **live: Any) -> None:
        self.dir = os.path.abspath(os.fspath(dir))
        self.log_checkpoint_files = log_checkpoint
        self.live_kwargs = live
        self._live: Any = None

    @property
    def experiment(self) -> Any:
        """The `dvclive.Live` (opened on first use)."""
        if self._live is None:
            self._open(resume=False)
        return self._live

    def _open(self, resume: bool) -> None:
        if not resume and os.path.exists(os.path.join(self.dir, "metrics.json")):
            raise ConfigError(f"DVCLive folder {self.dir!r} already holds a run's metrics, "
                              "which a fresh DVCLive run deletes: give this run another "
                              "folder, or resume the run that wrote them")
        self._live = _live_class()(self.dir, resume=resume, **self.live_kwargs)

    # -- the tracker protocol (ftrain.layers.logging.tracked) ---------------------------------

    def attach(self, saved: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
        """Reopen the folder named by `saved` (a resume) or start one; returns its record."""
        saved = check_saved(saved, "DVCLive")
        if saved is not None and self._live is None:
            if saved.get("dir") != self.dir:
                log.warning("DVCLive: the checkpoint's run wrote to %s; this run writes to "
                            "%s, from step %d", saved.get("dir"), self.dir, step)
                self._open(resume=False)
            else:
                self._open(resume=True)
                # DVCLive continues at the step after the one in metrics.json
                self.resume_at(step, self.experiment.step - 1, "DVCLive")
        self.experiment  # noqa: B018 (opens it)
        return {"dir": self.dir}

    # -- the logger protocol ---------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.fresh(step):
            return
        live = self.experiment
        live.step = step
        for name, value in metrics.items():
            live.log_metric(name, float(value))
        live.make_summary()  # metrics.json: the latest values and this step

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.experiment.log_params(dict(hparams))

    def log_checkpoint(self, path: str) -> None:
        """Record the final checkpoint's path; log it as an artifact with log_checkpoint."""
        live = self.experiment
        live.log_param("ftrain.checkpoint", path)
        if self.log_checkpoint_files and not is_url(path):  # a local file or folder
            live.log_artifact(path, type="model", cache=False)

    def finalize(self) -> None:
        if self._live is not None:
            self._live.end()
            self._live = None

    def __repr__(self) -> str:
        return f"DVCLive({self.dir!r})"
