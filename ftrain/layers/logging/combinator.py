"""`with_logging`: metrics to loggers every N steps and reduced per epoch, plus the bar.

Per step it appends the step's metric tensors to epoch accumulators in its slot (a list
append, no device op) and updates the progress bar (a host read at most every half
second). Every `every_n_steps` steps it reads the step's metrics on the host in one
transfer, together with the non-finite-loss record (so a NaN is raised there, naming its
step), and hands plain floats to the loggers. At epoch end it reduces the accumulators on
the device, reads them with the epoch's validation results in one transfer, and logs them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ftrain.core import bind as _bind
from ftrain.core import health
from ftrain.core import phases as _phases
from ftrain.core import rng as _rng
from ftrain.core import slots as _slots
from ftrain.core.host import to_host
from ftrain.core.layer import Combinator, layers
from ftrain.core.run import run_info
from ftrain.core.state import LOOP_SLOT, TrainState
from ftrain.core.trigger import Trigger
from ftrain.data.batches import batch_size
from ftrain.errors import ConfigError, LossError, described
from ftrain.layers.logging import accumulate
from ftrain.layers.logging.loggers import TensorBoard, check_logger
from ftrain.layers.logging.progress import ProgressBar
from ftrain.layers.logging.tracked import check_saved, tracker_keys
from ftrain.optim.rates import lr_values
from ftrain.parallel.dist import across_ranks

Metrics = dict[str, torch.Tensor]
VAL_PREFIX = "val_"
# The slot's record of each tracker's run (ftrain.layers.logging.tracked), beside the
# epoch accumulators: what a resume re-attaches to.
TRACKERS = "trackers"
SLOT_FIELDS = {**accumulate.SLOT_FIELDS,
               TRACKERS: (_slots.dict_of(lambda v: isinstance(v, dict)),
                          "a dict of tracker run records")}


def _names(value: bool | Sequence[str], what: str) -> Any:
    if value is True or value is False:
        return value
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be True, False or a list of metric names, got "
                          f"{value!r}")
    return frozenset(value)


def _check_metrics(metrics: Any, step: int) -> None:
    if not isinstance(metrics, dict):
        raise LossError(f"step {step}: a step must return a dict of metrics, got "
                        f"{type(metrics).__name__}")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise LossError(f"step {step}: metric names must be strings, got {name!r}")
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise LossError(f"step {step}: logged metric {name!r} must be a 0-d tensor, got "
                            f"{described(value)}")


class WithLogging(Combinator):
    """The combinator built by `with_logging`."""

    role = "logging"
    writes = ("*_epoch",)  # the epoch reductions it adds at each epoch end

    def __init__(self, inner: Any, loggers: Any = None, *, every_n_steps: int | None = 50,
                 prog_bar: bool | Sequence[str] = ("loss",), on_step: bool | Sequence[str] = True,
                 on_epoch: bool | Sequence[str] = True, reduce: Mapping[str, Any] | None = None,
                 log_lr: bool = False, log_grad_norm: bool = False,
                 progress: bool | str | None = None, hparams: Mapping[str, Any] | None = None,
                 name: str = "logging", batch_size: Callable[[Any], int] | None = None
                 ) -> None:
        super().__init__(inner, name)
        self.name = name
        self.trigger = Trigger(every_n_steps)
        if progress not in (None, True, False, "always"):
            raise ConfigError(f"progress must be True, False, 'always' or None (follow the "
                              f"loop), got {progress!r}")
        if loggers is not None and not isinstance(loggers, (list, tuple)):
            loggers = [loggers]
        for logger in loggers or []:
            check_logger(logger)
        self.loggers_arg = loggers
        self.every_n_steps = every_n_steps
        self.prog_bar = _names(prog_bar, "prog_bar")
        self.on_step = _names(on_step, "on_step")
        self.on_epoch = _names(on_epoch, "on_epoch")
        self.reduce = accumulate.check_reduce(reduce)
        self.log_lr = log_lr
        self.log_grad_norm = log_grad_norm
        self.progress = progress
        self.hparams = dict(hparams) if hparams is not None else None
        if batch_size is not None and not callable(batch_size):
            raise ConfigError(f"batch_size must be a function batch -> int, got "
                              f"{type(batch_size).__name__}")
        self.batch_size = batch_size  # None: inferred (ft.data.batches.batch_size)
        self.loggers: list[Any] = []
        self.bar: ProgressBar | None = None
        self.final: dict[str, float] = {}
        self.val_prefixes: tuple[str, ...] = (VAL_PREFIX,)
        self.run_hparams: dict[str, Any] | None = None
        self._ready = False
        self._checked()

    def __repr__(self) -> str:
        return f"with_logging(every_n_steps={self.every_n_steps}, slot={self.slot_name!r})"

    # -- setup -----------------------------------------------------------------------------

    def _setup(self, state: TrainState) -> None:
        run = run_info(state)
        root = (run.root_dir if run is not None else None) or os.getcwd()
        main = _rng.rank() == 0  # logs and the bar come from rank 0 only
        if self.loggers_arg is None:
            self.loggers = [TensorBoard(root)] if main else []
        else:
            self.loggers = list(self.loggers_arg) if main else []
        progress = self.progress if self.progress is not None else (
            run.progress if run is not None else False)
        self.bar = ProgressBar(self.prog_bar, always=progress == "always") \
            if progress and main else None
        if self.bar is not None and self.loggers:
            self.bar.version = getattr(self.loggers[0], "version", None)
        self.run_hparams = self.hparams if self.hparams is not None else (
            dict(run.hparams) if run is not None and run.hparams is not None else None)
        if run is not None and run.fast_dev_run:
            self.loggers = []  # a quick check writes nothing
        # evaluation results are what layers inside declare they add ("val_*"): logged
        # when they arrive, not accumulated as training metrics
        prefixes = tuple(p[:-1] for layer in layers(self.inner)
                         for p in getattr(layer, "writes", ())
                         if p.endswith("*") and not any(c in p[:-1] for c in "*?["))
        self.val_prefixes = prefixes or (VAL_PREFIX,)
        self.final = {}
        self._ready = True

    def after_init(self, state: TrainState) -> TrainState:
        self._setup(state)
        if self.name not in state.slots:
            state = state.replace(slots={**state.slots, self.name: accumulate.empty()})
        else:
            _slots.check(state.slots[self.name], self.name, SLOT_FIELDS,
                         may_lack=("seen", TRACKERS))
        return self._attach_trackers(state)

    def _attach_trackers(self, state: TrainState) -> TrainState:
        """Rank 0: each tracker continues the run its record in the slot names (a resume)
        or opens one, and the slot keeps the records, so a checkpoint names the runs."""
        trackers = tracker_keys(self.loggers)
        if not trackers:
            return state
        slot = state.slots[self.name]
        saved = slot.get(TRACKERS, {})
        records = dict(saved)
        for key, logger in trackers:
            records[key] = logger.attach(check_saved(saved.get(key), key), state.step)
            if self.run_hparams is not None:  # now, so a killed run has them too
                logger.log_hparams(self.run_hparams, {})
        return state.replace(slots={**state.slots, self.name: {**slot, TRACKERS: records}})

    def _slot(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """This layer's slot, writable: in place for a loop's state, a copy for a pure call."""
        slot = state.slots.get(self.name)
        if _bind.binding_of(state) is not None and slot is not None:
            return state, slot
        if not self._ready:
            self._setup(state)
        slot = accumulate.empty() if slot is None else {
            "pending": {k: list(v) for k, v in slot["pending"].items()},
            "sizes": list(slot["sizes"]), "partial": dict(slot["partial"]),
            "steps": slot["steps"], "seen": list(slot.get("seen", [])),
            TRACKERS: dict(slot.get(TRACKERS, {}))}
        return state.replace(slots={**state.slots, self.name: slot}), slot

    # -- per step ----------------------------------------------------------------------

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        log_now = self.trigger.step_due(state.step + 1)  # the step about to run
        token = None
        if log_now and self.log_grad_norm:  # ask the core step for the gradient norm
            token = _phases.GRAD_NORM.set(True)
        bar = self.bar
        if bar is not None:
            pos = state.slots.get(LOOP_SLOT)
            if pos is not None and pos["epoch"] != bar.epoch:
                run = run_info(state)
                # inside a step the loop already counts this batch as consumed
                bar.start_epoch(pos["epoch"], run.epoch_length if run else None,
                                max(pos["batch"] - 1, 0))
        try:
            state, metrics = self.inner(state, batch)
        finally:
            if token is not None:
                _phases.GRAD_NORM.reset(token)
        binding = _bind.binding_of(state)
        prof = binding.profiler if binding is not None else None
        t0 = time.perf_counter() if prof is not None else 0.0
        _check_metrics(metrics, state.step)
        state, slot = self._slot(state)
        prefixes = self.val_prefixes
        val = None
        for key in metrics:
            if key.startswith(prefixes):  # validation results arrived with this step
                val = {k: v for k, v in metrics.items() if k.startswith(prefixes)}
                metrics_train = {k: v for k, v in metrics.items() if k not in val}
                break
        else:
            metrics_train = metrics
        size = batch_size(batch) if self.batch_size is None else self.batch_size(batch)
        accumulate.add(slot, metrics_train, self.on_epoch, size, self.reduce)
        if bar is not None:
            bar.update(state.step, metrics_train)
        if log_now:
            self._log_step(state, metrics, val)
        elif val:
            self._log(state, val, state.step)
        if prof is not None:
            prof.add("logging", time.perf_counter() - t0)
        return state, metrics

    def _lrs(self, state: TrainState) -> dict[str, Any]:
        # ft.optim.learning_rates' values, read with this interval's one transfer
        out = {f"lr/{key}": lr for key, lr in lr_values(state).items()}
        if len(out) == 1:
            return {"lr": next(iter(out.values()))}
        return out

    def _log_step(self, state: TrainState, metrics: Metrics, val: Metrics | None) -> None:
        chosen = {k: v for k, v in metrics.items()
                  if self.on_step is True or k in self.on_step} if self.on_step else {}
        if self.log_grad_norm and "grad_norm" in metrics:
            chosen["grad_norm"] = metrics["grad_norm"]
        if val:
            chosen.update(val)
        if self.log_lr:
            chosen.update(self._lrs(state))
        record = health.pending_record(state)
        self._log(state, chosen, state.step, record)

    def _log(self, state: TrainState, values: Mapping[str, Any], step: int,
             record: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        names = list(values)
        tensors = across_ranks(state, list(values.values()), {})
        if record is not None:
            tensors.append(record["step"])
        host = to_host(tensors) if tensors else []  # host sync here
        if record is not None:
            bad = host.pop()
            if bad >= 0:
                health.check_finite(state)  # raises, naming the step
        floats = dict(zip(names, host))
        pos = state.slots.get(LOOP_SLOT)
        if floats and self.loggers:
            epoch = pos["epoch"] if pos is not None else 0
            for logger in self.loggers:
                logger.log_metrics({**floats, "epoch": float(epoch)}, step)
        return floats

    def on_request(self, state: TrainState, what: str) -> tuple[TrainState, str | None]:
        """"verify" (a checkpoint is about to be written): flush the loggers, so what was
        logged up to this step is stored before the checkpoint names it (a tracker
        resumed from that checkpoint then holds at least its steps)."""
        if what == "verify":
            for logger in self.loggers:
                flush = getattr(logger, "flush", None)
                if callable(flush):
                    flush()
        return state, None

    # -- epoch end and close -----------------------------------------------------------

    def at_epoch_end(self, state: TrainState, metrics: Metrics
                     ) -> tuple[TrainState, Metrics]:
        state, slot = self._slot(state)
        pos = state.slots.get(LOOP_SLOT)
        complete = pos is None or pos["batch"] == 0
        reduced = accumulate.results(slot, self.reduce, reset=complete) if self.on_epoch else {}
        if complete:  # an epoch cut short (max_steps, a stop) keeps accumulating on resume
            records = slot.get(TRACKERS)
            slot.clear()
            slot.update(accumulate.empty())
            if records is not None:
                slot[TRACKERS] = records
        epoch_values = {f"{k}_epoch": v for k, v in reduced.items()}
        for k, v in metrics.items():
            if not isinstance(v, torch.Tensor):
                metrics[k] = torch.tensor(float(v))
        out = {**metrics, **epoch_values}
        # every rank returns (and logs) the run's values, so outer layers agree
        how = {f"{k}_epoch": v for k, v in self.reduce.items() if isinstance(v, str)}
        out = dict(zip(out, across_ranks(state, list(out.values()), how, list(out))))
        ended = pos["epoch"] - 1 if pos is not None and pos["batch"] == 0 else (
            pos["epoch"] if pos is not None else 0)
        floats = to_host(list(out.values())) if out else []  # host sync here
        values = dict(zip(out, floats))
        if values:
            for logger in self.loggers:
                logger.log_metrics({**values, "epoch": float(ended)}, state.step)
            self.final.update(values)
            if self.bar is not None:
                self.bar.show({k: v for k, v in values.items()
                               if k.startswith(self.val_prefixes)})
        if self.bar is not None:
            self.bar.end_epoch(state.step)
        for logger in self.loggers:
            flush = getattr(logger, "flush", None)
            if flush is not None:
                flush()
        return state, out

    def at_close(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()
        run = run_info(state)
        final = getattr(run, "checkpoint_path", None)  # set by a checkpointing layer
        for logger in self.loggers:
            if final is not None and callable(getattr(logger, "log_checkpoint", None)):
                logger.log_checkpoint(final)
            hparams = getattr(self, "run_hparams", self.hparams)
            if hparams is not None:
                logger.log_hparams(hparams, self.final)
            logger.finalize()
        self._ready = False


def with_logging(step: Any, loggers: Any = None, *, every_n_steps: int | None = 50,
                 prog_bar: bool | Sequence[str] = ("loss",),
                 on_step: bool | Sequence[str] = True, on_epoch: bool | Sequence[str] = True,
                 reduce: Mapping[str, Any] | None = None, log_lr: bool = False,
                 log_grad_norm: bool = False, progress: bool | str | None = None,
                 hparams: Mapping[str, Any] | None = None, name: str = "logging",
                 batch_size: Callable[[Any], int] | None = None
                 ) -> WithLogging:
    """Log the step's metrics every `every_n_steps` steps and their epoch reductions.

    `loggers`: a logger or list of them (None: TensorBoard under the run's `root_dir`).
    `on_step` / `on_epoch`: which metrics (True: all) are logged per step and reduced per
    epoch (as `<name>_epoch`; a batch-size-weighted mean unless `reduce` names
    `"sum" | "max" | "min" | "last"` or a torchmetrics aggregation Metric; the built-in
    reductions live in the layer's slot and so survive a resume, while a torchmetrics
    Metric keeps its own state: it is not checkpointed, and it is shared by direct calls;
    for F1, AUROC and the like use `train_step(metrics=)`). The batch size is inferred
    from the batch, or given by `batch_size(batch) -> int`; a batch it cannot size is a
    `DataError`. Validation results (`val_*`) are logged when they arrive. `prog_bar`:
    the metrics the progress bar shows (smoothed); `progress`: True, False, `"always"`
    (also when not a terminal) or None (what the loop says: `ft.fit` shows it,
    `ft.iterate` does not).
    `log_lr` logs each optimizer's learning rate and `log_grad_norm` the global gradient
    norm, both at the logging interval only. `hparams` (or `ft.fit(hparams=...)`) go to
    the loggers at the end with the final metrics (TensorBoard's HPARAMS tab).

    Examples:
        >>> import tempfile, torch, ftrain as ft
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> csv = ft.loggers.CSV(tempfile.mkdtemp())
        >>> step = ft.with_logging(step, [csv], every_n_steps=2)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> state = ft.fit(step, state, data, epochs=1, progress=False, checkpoint=False)
        >>> open(csv.path).readline().strip()
        'step,loss,epoch,loss_epoch'
    """
    return WithLogging(step, loggers, every_n_steps=every_n_steps, prog_bar=prog_bar,
                       on_step=on_step, on_epoch=on_epoch, reduce=reduce, log_lr=log_lr,
                       log_grad_norm=log_grad_norm, progress=progress, hparams=hparams,
                       name=name, batch_size=batch_size)

