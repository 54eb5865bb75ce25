"""What steps return: a loss and metrics, checked (shared by every kind of step).

`split_loss` reads a training function's `loss` or `(loss, {name: metric})`;
`eval_metrics` an evaluation function's loss, `(loss, metrics)` or dict. Metrics are 0-d
tensors left on the device (numbers become device tensors without a host sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ftrain.errors import LossError

Metrics = dict[str, torch.Tensor]


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, tuple):
        return f"a tuple of {len(x)} ({', '.join(type(v).__name__ for v in x)})"
    return f"a {type(x).__name__}"


def _metric(name: Any, value: Any, device: torch.device, where: str) -> torch.Tensor:
    if not isinstance(name, str):
        raise LossError(f"{where}: metric names must be strings, got {name!r}")
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise LossError(f"{where}: metric {name!r} must be a 0-d tensor or a number, got "
                            f"{_describe(value)} (reduce it, e.g. .mean())")
        value = value.detach()
        # half-precision metrics (computed under autocast) are reported in float32
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((), float(value), device=device)  # no host-to-device sync
    raise LossError(f"{where}: metric {name!r} must be a 0-d tensor or a number, got "
                    f"{_describe(value)}")


def split_loss(out: Any, where: str) -> tuple[torch.Tensor, Metrics]:
    """`loss` or `(loss, {name: metric})` -> (loss, metrics with "loss"), checked."""
    if isinstance(out, torch.Tensor):
        loss, extra = out, None
    elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        loss, extra = out
    else:
        raise LossError(f"{where}: loss_fn must return a loss tensor or (loss, {{name: "
                        f"metric}}), got {_describe(out)}")
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
        raise LossError(f"{where}: the loss must be a 0-d floating-point tensor, got "
                        f"{_describe(loss)} (reduce it, e.g. .mean())")
    metrics = {"loss": loss.detach()}
    if extra:
        for name, value in extra.items():
            if name == "loss":
                raise LossError(f"{where}: metric name 'loss' is taken by the loss itself")
            metrics[name] = _metric(name, value, loss.device, where)
    return loss, metrics


def eval_metrics(out: Any, where: str, device: torch.device) -> Metrics:
    """An evaluation function's result (loss, (loss, metrics) or a dict) as metrics."""
    if isinstance(out, Mapping):
        if not out:
            raise LossError(f"{where}: the metric function returned an empty dict")
        return {k: _metric(k, v, device, where) for k, v in out.items()}
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return {"loss": out.detach()}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        metrics = {"loss": _metric("loss", out[0], device, where)}
        for k, v in out[1].items():
            metrics[k] = _metric(k, v, device, where)
        return metrics
    raise LossError(f"{where}: an evaluation function must return a 0-d tensor, "
                    f"(loss, {{name: metric}}) or {{name: metric}}, got {_describe(out)}")


def add_weighted(total: Metrics, metrics: Metrics, weight: float, where: str) -> None:
    """Micro-batch metrics into the batch's: each weighted by its share of the samples.

    Examples:
        >>> import torch
        >>> total = {}
        >>> add_weighted(total, {"loss": torch.tensor(2.0)}, 0.25, "step 0")
        >>> add_weighted(total, {"loss": torch.tensor(4.0)}, 0.75, "step 0")
        >>> float(total["loss"])
        3.5
    """
    if total and total.keys() != metrics.keys():
        raise LossError(f"{where}: the loss function returned metrics {sorted(metrics)}, "
                        f"earlier micro-batches {sorted(total)}")
    for k, v in metrics.items():
        part = v.float() * weight
        total[k] = part if k not in total else total[k] + part
