"""Loggers: any object with `log_metrics(metrics, step)`, `log_hparams(hparams, metrics)`
and `finalize()`. ftrain ships TensorBoard (the default) and CSV; both write to
`<save_dir>/<name>/version_N`, N the next free number, as Lightning's loggers do.

Loggers receive plain Python floats: the host read happened once, before them.
TensorBoard's writer is imported lazily (it adds ~0.15 s to an import).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ftrain import storage as _storage
from ftrain.errors import ConfigError


@runtime_checkable
class Logger(Protocol):
    """What ftrain needs of a logger (no base class to inherit)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None: ...

    def finalize(self) -> None: ...


def check_logger(obj: Any) -> None:
    missing = [m for m in ("log_metrics", "log_hparams", "finalize")
               if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(f"a logger needs log_metrics(metrics, step), log_hparams(hparams, "
                          f"metrics) and finalize(); {type(obj).__name__} lacks {missing}")


def next_version(root: str) -> int:
    """The next free N among `root/version_N` folders (0 when there are none); `root`
    may be a URL (`ftrain.storage`)."""
    taken = []
    if _storage.is_url(root):
        taken = [int(m.group(1)) for e in _storage.subdirs(root)
                 if (m := re.fullmatch(r"version_(\d+)", e))]
    elif os.path.isdir(root):
        for entry in os.listdir(root):
            m = re.fullmatch(r"version_(\d+)", entry)
            if m and os.path.isdir(os.path.join(root, entry)):
                taken.append(int(m.group(1)))
    return max(taken) + 1 if taken else 0


def _claim_version(root: str, version: int | None) -> tuple[int, str]:
    """Create and return `root/version_N`; with version=None take the next free N.

    Creating the folder claims the number, so two runs starting together differ (on a
    URL, creating a marker object in it exclusively: `ftrain.storage.claim`).
    """
    if _storage.is_url(root):
        if version is not None:
            _storage.claim(_storage.join(root, f"version_{version}"))  # or reuse it
            return version, _storage.join(root, f"version_{version}")
        while True:
            n = next_version(root)
            if _storage.claim(_storage.join(root, f"version_{n}")):
                return n, _storage.join(root, f"version_{n}")
    os.makedirs(root, exist_ok=True)
    if version is not None:
        path = os.path.join(root, f"version_{version}")
        os.makedirs(path, exist_ok=True)
        return version, path
    while True:
        n = next_version(root)
        path = os.path.join(root, f"version_{n}")
        try:
            os.mkdir(path)
            return n, path
        except FileExistsError:
            continue


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys; values other than bool/int/float/str become JSON."""
    flat: dict[str, Any] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value if value is not None else "None"
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


class _Versioned:
    """A logger that writes to `<save_dir>/<name>/version_N`, claimed on first use."""

    save_dir: str
    name: str
    _requested_version: int | None
    _version: int | None = None
    _log_dir: str | None = None

    def _ensure(self) -> None:
        if self._log_dir is None:
            self._version, self._log_dir = _claim_version(
                _storage.join(self.save_dir, self.name), self._requested_version)

    @property
    def version(self) -> int:
        self._ensure()
        assert self._version is not None
        return self._version

    @property
    def log_dir(self) -> str:
        self._ensure()
        assert self._log_dir is not None
        return self._log_dir


class TensorBoard(_Versioned):
    """TensorBoard event files under `<save_dir>/<name>/version_N` (the default logger).

    `.experiment` is the `torch.utils.tensorboard.SummaryWriter`, for images, histograms,
    figures and anything else TensorBoard shows. `save_dir` may be a URL (`s3://...`,
    `gs://...`, `memory://...`): TensorBoard writes it through fsspec.

    Examples:
        >>> import tempfile, ftrain as ft
        >>> logger = ft.loggers.TensorBoard(tempfile.mkdtemp())
        >>> logger.log_metrics({"loss": 0.5}, step=1)
        >>> logger.finalize()
        >>> logger.version
        0
    """

    def __init__(self, save_dir: str = ".", name: str = "ftrain_logs",
                 version: int | None = None, *, flush_secs: int = 30) -> None:
        self.save_dir = _storage.local_path(str(save_dir))
        self.name = name
        self._requested_version = version
        self.flush_secs = flush_secs
        self._writer: Any = None

    @property
    def experiment(self) -> Any:
        """The `SummaryWriter` (created on first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # lazy: a slow import
            self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=self.flush_secs)
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        writer = self.experiment
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, global_step=step)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Write the HPARAMS tab: the hyperparameters with the run's final metrics."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        writer = self.experiment
        flat = flatten_hparams(hparams)
        metric_dict = {f"hparams/{k}": float(v) for k, v in metrics.items()} or \
            {"hparams/none": 0.0}
        exp, ssi, sei = hparams_summary(flat, metric_dict)
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for tag, value in metric_dict.items():  # the tab reads these scalar tags
            writer.add_scalar(tag, value)
        writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def finalize(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoard({_storage.join(self.save_dir, self.name)!r})"


class CSV(_Versioned):
    """`<save_dir>/<name>/version_N/metrics.csv`: a `step` column and one per metric.

    Rows are buffered and appended every `flush_every` rows and at `finalize` (only the
    unwritten rows are held); a new metric name rewrites the file once with the wider
    header. Hyperparameters go to `hparams.json` beside it. `save_dir` may be a URL
    (`s3://...`, `memory://...`, through fsspec): object stores cannot append, so each
    flush there puts the whole file again, atomically.

    Examples:
        >>> import tempfile, ftrain as ft
        >>> logger = ft.loggers.CSV(tempfile.mkdtemp())
        >>> logger.log_metrics({"loss": 0.5}, step=1); logger.finalize()
        >>> open(logger.log_dir + "/metrics.csv").read().splitlines()
        ['step,loss', '1,0.5']
    """

    def __init__(self, save_dir: str = ".", name: str = "ftrain_logs",
                 version: int | None = None, *, flush_every: int = 100) -> None:
        self.save_dir = _storage.local_path(str(save_dir))
        self.name = name
        self._requested_version = version
        self.flush_every = flush_every
        self.rows: list[dict[str, Any]] = []  # not yet written
        self._columns: list[str] = ["step"]
        self._known = {"step"}
        self._in_file = False

    @property
    def path(self) -> str:
        return _storage.join(self.log_dir, "metrics.csv")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.rows.append({"step": step, **metrics})
        if len(self.rows) >= self.flush_every:
            self.flush()

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        with _storage.open_text(_storage.join(self.log_dir, "hparams.json"), "w") as f:
            json.dump({"hparams": dict(hparams), "metrics": dict(metrics)}, f, indent=2,
                      default=str)

    def flush(self) -> None:
        if not self.rows and self._in_file:
            return
        new_columns = [c for row in self.rows for c in row if c not in self._known]
        rows = self.rows
        if new_columns and self._in_file:  # a wider header: rewrite the file once
            with _storage.open_text(self.path, "r") as f:
                rows = list(csv.DictReader(f)) + rows
            self._in_file = False
        for c in dict.fromkeys(new_columns):
            self._columns.append(c)
            self._known.add(c)
        mode = "a" if self._in_file else "w"
        with _storage.open_text(self.path, mode) as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)
        self._in_file = True
        self.rows = []

    def finalize(self) -> None:
        self.flush()

    def __repr__(self) -> str:
        return f"CSV({_storage.join(self.save_dir, self.name)!r})"


# Experiment trackers: each in its own module, imported on first use (ft.loggers.MLflow).
_TRACKERS = {"MLflow": "mlflow_logger", "WandB": "wandb_logger", "DVCLive": "dvclive_logger"}


def __getattr__(name: str) -> Any:
    if name in _TRACKERS:
        import importlib

        module = importlib.import_module(f"ftrain.layers.logging.{_TRACKERS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'ftrain.loggers' has no attribute {name!r}")
