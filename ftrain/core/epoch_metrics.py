"""Stateful epoch metrics: torchmetrics objects updated per batch, computed once.

`eval_step(fn, metrics={"f1": MulticlassF1Score(...)})` and `train_step(loss_fn,
metrics=...)` take torchmetrics `Metric`s or `MetricCollection`s as *templates*: the
function returns, under each metric's name, the arguments of that metric's `update`
(`{"f1": (logits, y)}`; a single tensor is one argument, a dict keyword arguments).

- An evaluation (`Evaluation`) works on its own fresh copies (deepcopy + reset), so
  nothing leaks between evaluations, the sanity check included, and the user's objects
  are never updated.
- A training epoch keeps the metrics' states as plain tensors in the slot `SLOT` (one
  entry per metric), so a checkpoint holds them and a mid-epoch resume continues them;
  a pure call updates copies. A cached worker object runs torchmetrics' `update` and
  `compute` on those tensors.
- Under several processes the states are synced by torchmetrics itself (its
  `sync`/`gather_all_tensors` over the default process group, the run's) before
  `compute`; with one process they never are, even when a process group exists.

Results: a 0-d result is a metric named after its key; a dict result (a
`MetricCollection`, or a metric that returns a dict) gives `<name>_<key>` for each key;
anything else (a confusion matrix, a curve) is returned as it is by `ft.evaluate`, and
refused where a number is needed (a training epoch's `<name>_epoch`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ftrain.errors import ConfigError, LossError, described

SLOT = "train_metrics"
_UPDATES = "__updates__"  # a leaf's update count in its slot entry (torchmetrics needs it)
Inputs = dict[str, tuple[tuple[Any, ...], dict[str, Any]]]


def _yes() -> bool:
    return True


def _no() -> bool:
    return False


def check(metrics: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """`metrics=` checked: names (not "loss") to torchmetrics Metrics or collections."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"{where}: metrics= must be a dict of name -> torchmetrics Metric, "
                          f"got {type(metrics).__name__}")
    from torchmetrics import Metric, MetricCollection  # lazy: ~0.15 s at import
    out = {}
    for name, metric in metrics.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: metric names must be non-empty strings, got "
                              f"{name!r}")
        if name.startswith("__"):
            raise ConfigError(f"{where}: metric names may not start with '__', got {name!r}")
        if name == "loss":
            raise ConfigError(f"{where}: the metric name 'loss' is taken by the loss itself")
        if not isinstance(metric, (Metric, MetricCollection)):
            raise ConfigError(f"{where}: metrics[{name!r}] must be a torchmetrics Metric or "
                              f"MetricCollection, got {type(metric).__name__}")
        out[name] = metric
    return out


# -- what the function returns ------------------------------------------------------------

def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _args(name: str, value: Any, where: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(value, torch.Tensor):
        return (value.detach(),), {}
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value), {}
    if isinstance(value, Mapping):
        return (), {str(k): _detach(v) for k, v in value.items()}
    raise LossError(f"{where}: the value under {name!r} must be the arguments of that "
                    f"metric's update: a tensor, a tuple (e.g. (logits, targets)) or a dict "
                    f"of keyword arguments, got a {type(value).__name__}")


def _take(values: Mapping[str, Any], names: Any, where: str) -> tuple[dict[str, Any], Inputs]:
    missing = [n for n in names if n not in values]
    if missing:
        raise LossError(f"{where}: metrics= has {missing}, but the function returned no value "
                        f"under {'that name' if len(missing) == 1 else 'those names'} (it "
                        f"returned {sorted(map(str, values))}); return each metric's update "
                        f"arguments under its name, e.g. {{{missing[0]!r}: (logits, y)}}")
    found = {n: _args(n, values[n], where) for n in names}
    return {k: v for k, v in values.items() if k not in found}, found


def split(out: Any, names: Any, where: str) -> tuple[Any, Inputs]:
    """A function's result without the metrics' update arguments, and those arguments."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        rest, found = _take(out[1], names, where)
        return (out[0], rest), found
    if isinstance(out, Mapping):
        return _take(out, names, where)
    raise LossError(f"{where}: with metrics= the function must return (loss, {{name: value}}) "
                    f"or {{name: value}} holding the update arguments of {sorted(names)}, got "
                    f"a {type(out).__name__}")


# -- copies, sync, results ------------------------------------------------------------------

def _leaves(metric: Any) -> list[Any]:
    """A Metric, or a collection's members (their own states, not shared references)."""
    from torchmetrics import MetricCollection
    if isinstance(metric, MetricCollection):
        return list(metric.values(copy_state=False))
    return [metric]


def configure_sync(metric: Any, world: int) -> None:
    """Sync states over the default process group before compute iff `world` > 1."""
    for leaf in _leaves(metric):
        leaf.distributed_available_fn = _yes if world > 1 else _no
        leaf.sync_on_compute = True
        leaf._to_sync = True
        leaf._should_unsync = True
        leaf.dist_sync_on_step = False
        leaf.process_group = None  # the default group: the run's (with_ddp)


def fresh(template: Any, device: torch.device, world: int) -> Any:
    """A reset copy of `template` on `device`; the template is untouched."""
    metric = copy.deepcopy(template)
    metric.reset()
    metric.to(device)
    configure_sync(metric, world)
    return metric


def flatten(name: str, value: Any) -> dict[str, Any]:
    """A compute() result as named values: dicts give `<name>_<key>` (nested too)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, v in value.items():
            out.update(flatten(f"{name}_{key}", v))
        return out
    return {name: value}


def compute(name: str, metric: Any) -> dict[str, Any]:
    """`metric.compute()` as named values (syncing across ranks if configured to)."""
    with warnings.catch_warnings():  # a rank without batches: its empty state is fine
        warnings.filterwarnings("ignore", message=".*was called before the ``update``")
        with torch.no_grad():
            return flatten(name, metric.compute())


def updated(metric: Any) -> bool:
    return any(leaf._update_count > 0 for leaf in _leaves(metric))


class Evaluation:
    """One evaluation's own metric copies: `update` per batch, `compute` once."""

    def __init__(self, templates: Mapping[str, Any], device: torch.device, world: int
                 ) -> None:
        self.metrics = {n: fresh(t, device, world) for n, t in templates.items()}
        self.world = world

    def update(self, inputs: Inputs) -> None:
        """Each metric's `update` with this batch's arguments (no host sync of ftrain's)."""
        for name, (args, kwargs) in inputs.items():
            self.metrics[name].update(*args, **kwargs)

    def compute(self) -> dict[str, Any]:
        """Every metric's result (all ranks take part when synced)."""
        if self.world > 1:
            align_empty([leaf for m in self.metrics.values() for leaf in _leaves(m)],
                        self.world)
        out: dict[str, Any] = {}
        for name, metric in self.metrics.items():
            out.update(compute(name, metric))
        return out


def align_empty(leaves: list[Any], world: int) -> None:
    """Give a rank's empty list states (no batch on this rank) the dtype and trailing
    shape the other ranks' have, so the states' all-gather matches (torchmetrics would
    send a float32 placeholder, and the collective would fail). One small all-gather."""
    import torch.distributed as dist
    mine = [{a: (str(v[0].dtype).removeprefix("torch."), tuple(v[0].shape[1:]))
             for a in leaf._defaults if isinstance(v := getattr(leaf, a), list) and v}
            for leaf in leaves]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    for i, leaf in enumerate(leaves):
        for attr in leaf._defaults:
            value = getattr(leaf, attr)
            if not isinstance(value, list) or value:
                continue
            known = next((g[i][attr] for g in gathered if attr in g[i]), None)
            if known is not None:
                dtype, trailing = known
                setattr(leaf, attr, [torch.empty((0, *trailing), device=leaf.device,
                                                 dtype=getattr(torch, dtype))])


class Session:
    """One evaluation of an `EvalStep`: `(state, batch, where) -> metrics` runs the step
    and updates this evaluation's metric copies; `compute()` gives their results."""

    def __init__(self, run: Any, evaluation: Evaluation | None) -> None:
        self.run, self.evaluation = run, evaluation

    def __call__(self, state: Any, batch: Any, where: str = "evaluation") -> Any:
        return self.run(state, batch, self.evaluation, where)

    def compute(self) -> dict[str, Any]:
        return self.evaluation.compute() if self.evaluation is not None else {}


def host_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Results for `ft.evaluate`: 0-d tensors as floats (one host transfer), other tensors
    on the CPU as they are, numbers as floats."""
    scalars = {k: v for k, v in values.items()
               if isinstance(v, torch.Tensor) and v.dim() == 0}
    out: dict[str, Any] = {}
    if scalars:
        floats = torch.stack([v.detach().to("cpu", torch.float64)
                              for v in scalars.values()]).tolist()  # host sync here
        out.update(zip(scalars, floats))
    for k, v in values.items():
        if k in scalars:
            continue
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        else:
            out[k] = v
    return {k: out[k] for k in values}


def require_numbers(values: Mapping[str, Any]) -> None:
    """Refuse results that are not numbers where they join a run's metrics."""
    for name, value in values.items():
        if not isinstance(value, float):
            raise ConfigError(f"metric {name!r} computed {described(value)}, not a number; results "
                              f"that join a run's metrics (with_validation) must be numbers: "
                              f"evaluate it with ft.evaluate, which returns it as it is, or "
                              f"return its entries as separate metrics")
