"""`ft.loggers.MLflow`: metrics, hyperparameters and the final checkpoint in an MLflow run.

Built on MLflow's own client (`mlflow.tracking.MlflowClient`, imported on first use: it
takes about a second). By default the runs go to a SQLite database `<save_dir>/mlflow.db`
with artifacts under `<save_dir>/mlartifacts` (no server; `mlflow ui --backend-store-uri
sqlite:///mlflow.db` shows them); any tracking URI works (`tracking_uri=`, or the
`MLFLOW_TRACKING_URI` variable).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from ftrain.errors import ConfigError
from ftrain.layers.logging.loggers import flatten_hparams
from ftrain.layers.logging.tracked import Resumed, check_saved, log, safe_name
from ftrain.storage import is_url

PARAM_LIMIT = 6000  # MLflow's longest parameter value
BATCH_LIMIT = 1000  # MLflow's most metrics per log_batch


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient  # lazy: about a second
    except ImportError as err:
        raise ConfigError("ft.loggers.MLflow needs mlflow: pip install 'ftrain[mlflow]' "
                          "(mlflow-skinny with SQLite support)") from err
    return MlflowClient(tracking_uri=uri)


class MLflow(Resumed):
    """Log to an MLflow run; `resume="auto"` continues the same run.

    `experiment`: the experiment's name (created when missing). `tracking_uri`: where runs
    go (None: `MLFLOW_TRACKING_URI`, else `sqlite:///<save_dir>/mlflow.db`). `run_name`,
    `tags`: of a new run; `run_id`: continue this existing run instead. Metrics are logged
    at ftrain's step, written in batches: every `flush_secs` seconds, before each
    checkpoint, at epoch ends and at the end; a resumed run skips the steps the run
    already holds (MLflow cannot delete points, and they hold the values this run
    recomputes). Hyperparameters become
    the run's parameters. The path of the run's final checkpoint is set as the tag
    `ftrain.checkpoint`, and with `log_checkpoint=True` the file (or sharded folder) is
    copied into the run's artifacts under `checkpoints/`.

    Examples:
        >>> import tempfile, ftrain as ft
        >>> logger = ft.loggers.MLflow("demo", save_dir=tempfile.mkdtemp())
        >>> record = logger.attach(None, step=0)
        >>> logger.log_metrics({"loss": 0.5}, step=1); logger.finalize()
        >>> [(m.step, m.value) for m in logger.client.get_metric_history(logger.run_id, "loss")]
        [(1, 0.5)]
    """

    def __init__(self, experiment: str = "ftrain", *, tracking_uri: str | None = None,
                 save_dir: str | os.PathLike[str] = ".", run_name: str | None = None,
                 run_id: str | None = None, tags: Mapping[str, str] | None = None,
                 log_checkpoint: bool = False, flush_secs: float = 10.0) -> None:
        if not isinstance(experiment, str) or not experiment:
            raise ConfigError(f"MLflow(experiment=) must be a non-empty name, got "
                              f"{experiment!r}")
        self.experiment = experiment
        self.save_dir = os.path.abspath(os.fspath(save_dir))
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            "sqlite:///" + os.path.join(self.save_dir, "mlflow.db")
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.log_checkpoint_files = log_checkpoint
        self._run_id = run_id
        self._client: Any = None
        self._params_logged = False
        self.flush_secs = flush_secs
        self._buffer: list[Any] = []  # metrics not yet written
        self._written = time.monotonic()

    @property
    def client(self) -> Any:
        """MLflow's `MlflowClient` for this logger's tracking URI (created on first use)."""
        if self._client is None:
            if self.tracking_uri.startswith("sqlite:///"):
                os.makedirs(os.path.dirname(self.tracking_uri[len("sqlite:///"):]) or ".",
                            exist_ok=True)
            self._client = _client(self.tracking_uri)
        return self._client

    @property
    def run_id(self) -> str:
        """The MLflow run's id (a new run is created on first use)."""
        if self._run_id is None:
            self._run_id = self._new_run()
        return self._run_id

    def _new_run(self) -> str:
        client = self.client
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            where = None  # a tracking server decides; a local database: beside it
            if self.tracking_uri.startswith("sqlite:///"):
                where = "file://" + os.path.join(self.save_dir, "mlartifacts")
            exp_id = client.create_experiment(self.experiment, artifact_location=where)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
        return str(run.info.run_id)

    # -- the tracker protocol (ftrain.layers.logging.tracked) ---------------------------------

    def attach(self, saved: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
        """Continue the run named by `saved` (a resume) or open one; returns its record."""
        saved = check_saved(saved, "MLflow")
        if saved is not None and self._run_id is None:
            run_id = saved.get("run_id")
            if not isinstance(run_id, str):
                raise ConfigError(f"the MLflow record in the checkpoint lacks a run id: "
                                  f"{saved}")
            if self._exists(run_id):
                self._run_id = run_id
                self.client.update_run(run_id, status="RUNNING")
                self.resume_at(step, self._last_step(run_id), "MLflow")
            else:
                log.warning("MLflow: the checkpoint's run %s is not in %s; logging to a new "
                            "run", run_id, self.tracking_uri)
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def _last_step(self, run_id: str) -> int:
        """The highest step of any metric the run holds (-1: none)."""
        client = self.client
        keys = client.get_run(run_id).data.metrics
        steps = [m.step for key in keys for m in client.get_metric_history(run_id, key)]
        return max(steps, default=-1)

    # -- the logger protocol ---------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.fresh(step):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(safe_name(k), float(v), now, step) for k, v in metrics.items()]
        # one write per many logging steps: a SQLite write costs ~6 ms of CPU, as much as
        # 30 steps of a small model
        if len(self._buffer) >= BATCH_LIMIT or \
                time.monotonic() - self._written > self.flush_secs:
            self.flush()

    def flush(self) -> None:
        """Write the metrics logged so far (with_logging calls it before each checkpoint
        and at epoch ends, so a resume finds at least the checkpoint's steps)."""
        buffered, self._buffer = self._buffer, []
        for i in range(0, len(buffered), BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=buffered[i:i + BATCH_LIMIT])
        self._written = time.monotonic()

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The hyperparameters as the run's parameters, once (final metrics are already
        logged at their steps)."""
        if self._params_logged:
            return
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        params = []
        for key, value in flatten_hparams(hparams).items():
            text = str(value)
            if len(text) > PARAM_LIMIT:
                log.warning("MLflow: hyperparameter %r is %d characters; MLflow keeps %d",
                            key, len(text), PARAM_LIMIT)
                text = text[:PARAM_LIMIT]
            params.append(Param(safe_name(key), text))
        try:
            for i in range(0, len(params), 100):  # MLflow takes 100 parameters per call
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        except MlflowException as err:
            raise ConfigError(f"MLflow refused this run's hyperparameters for run "
                              f"{self.run_id} (a resumed run must keep its values): "
                              f"{err}") from err
        self._params_logged = True

    def log_checkpoint(self, path: str) -> None:
        """Tag the run with the final checkpoint's path; copy it in with log_checkpoint."""
        self.client.set_tag(self.run_id, "ftrain.checkpoint", path)
        if self.log_checkpoint_files and is_url(path):
            log.warning("MLflow: the checkpoint %s is not a local file; its path is "
                        "tagged, not copied into the artifacts", path)
        elif self.log_checkpoint_files:
            if os.path.isdir(path):
                self.client.log_artifacts(self.run_id, path, f"checkpoints/"
                                          f"{os.path.basename(path)}")
            else:
                self.client.log_artifact(self.run_id, path, "checkpoints")

    def finalize(self) -> None:
        self.flush()
        if self._run_id is not None:
            self.client.set_terminated(self._run_id, status="FINISHED")

    def __repr__(self) -> str:
        return f"MLflow({self.experiment!r}, tracking_uri={self.tracking_uri!r})"
