"""`lr_find`: the learning-rate range test of Lightning's `Tuner.lr_find`.

A copy of the state trains for up to `num_steps` steps with a fresh optimizer state and
an lr that grows each update from `min_lr` to `max_lr` (update i of N uses
`min_lr * (max_lr / min_lr) ** ((i + 1) / N)`, or the linear equivalent: Lightning's
schedule); the loss is smoothed as Lightning smooths it (beta 0.98) and the sweep stops
once the smoothed loss passes `early_stop_threshold` times the best. The suggestion is
Lightning's: the lr where the smoothed loss falls fastest (the most negative gradient
d loss / d lr, the first 10 and the last point left out). The state given is untouched.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import torch

from ftrain.core.host import to_host
from ftrain.core.state import TrainState
from ftrain.errors import ConfigError, check_int
from ftrain.layers.swa import with_lr
from ftrain.loops.train import iterate


@attrs.frozen
class Sweep:
    """The lr schedule of the range test: a function of the update count (an int, or a
    0-d tensor on the device: then no host sync)."""

    min_lr: float
    max_lr: float
    num_steps: int
    mode: str

    def __call__(self, count: Any) -> Any:
        if isinstance(count, torch.Tensor):
            r = (count.to(torch.float64) + 1) / self.num_steps
        else:
            r = (count + 1) / self.num_steps
        if self.mode == "linear":
            return self.min_lr + r * (self.max_lr - self.min_lr)
        return self.min_lr * (self.max_lr / self.min_lr) ** r


@attrs.frozen
class LRFinderResult:
    """What `lr_find` found: the lrs tried, the smoothed (and raw) losses, the suggestion.

    `suggestion` is None when fewer than 2 finite points remain after the skipped ones.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestion: float | None
    suggestion_index: int | None
    stopped_early: bool

    def table(self, every: int = 1) -> str:
        """The sweep as text: step, lr, smoothed and raw loss; `<-` marks the suggestion."""
        rows = [f"{'step':>5}  {'lr':>10}  {'loss':>10}  {'raw loss':>10}"]
        for i, (lr, loss, raw) in enumerate(zip(self.lrs, self.losses, self.raw_losses)):
            if i % every and i != self.suggestion_index:
                continue
            mark = "  <- suggestion" if i == self.suggestion_index else ""
            rows.append(f"{i:>5}  {lr:>10.3e}  {loss:>10.4g}  {raw:>10.4g}{mark}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def plot(self, suggest: bool = True, ax: Any = None) -> Any:
        """The smoothed loss against the lr (log scale for an exponential sweep) with the
        suggestion marked; a matplotlib Figure. Needs matplotlib (not a dependency)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ConfigError("LRFinderResult.plot needs matplotlib (pip install "
                              "matplotlib); result.table() needs nothing") from err
        if ax is None:
            fig, ax = plt.subplots()
        else:
            fig = ax.figure
        ax.plot(self.lrs, self.losses)
        if len(self.lrs) > 1 and self.lrs[-1] / max(self.lrs[0], 1e-300) > 100:
            ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss (smoothed)")
        if suggest and self.suggestion_index is not None:
            i = self.suggestion_index
            ax.plot(self.lrs[i], self.losses[i], markersize=10, marker="o", color="red")
        return fig


def suggest(lrs: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 1
            ) -> int | None:
    """Lightning's rule: the index of the steepest descent of the loss in the lr.

    Examples:
        >>> from ftrain.tune.lr_find import suggest
        >>> suggest([1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 1.0, 0.5, 0.4], 0, 1)
        1
    """
    n = len(losses)
    idx = list(range(n))[skip_begin:n - skip_end if skip_end else n]
    finite = [i for i in idx if math.isfinite(losses[i])]
    if len(finite) < 2:
        return None
    lr = torch.tensor([lrs[i] for i in finite], dtype=torch.float64)
    loss = torch.tensor([losses[i] for i in finite], dtype=torch.float64)
    grads = torch.gradient(loss, spacing=[lr])[0]
    return finite[int(torch.argmin(grads))]


def _checked(min_lr: float, max_lr: float, num_steps: int, mode: str,
             early_stop_threshold: float | None) -> None:
    for label, v in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"lr_find: {label} must be a positive float, got {v!r}")
    if not min_lr < max_lr:
        raise ConfigError(f"lr_find: min_lr ({min_lr}) must be below max_lr ({max_lr})")
    check_int("lr_find: num_steps", num_steps, 2)
    if num_steps is None:
        raise ConfigError("lr_find: num_steps must be an int >= 2, got None")
    if mode not in ("exponential", "linear"):
        raise ConfigError(f"lr_find: mode must be 'exponential' or 'linear', got {mode!r}")
    if early_stop_threshold is not None and not (
            isinstance(early_stop_threshold, (int, float)) and early_stop_threshold > 0):
        raise ConfigError(f"lr_find: early_stop_threshold must be a positive float or None, "
                          f"got {early_stop_threshold!r}")


def trial_state(state: TrainState, optimizer: Any = None) -> TrainState:
    """A fresh run from `state`'s weights: a copy, step 0, no slots, and a fresh state for
    `optimizer` (default: the state's own)."""
    if not isinstance(state, TrainState):
        raise ConfigError(f"a tuner needs a TrainState, got {type(state).__name__}")
    copy = state.copy()  # a donated state raises here, naming the loop
    if copy.multi:
        raise ConfigError(f"the tuners work on a single-model state; this one holds "
                          f"{sorted(copy.model)}")
    optimizer = copy.optimizer if optimizer is None else optimizer
    if optimizer is None:
        raise ConfigError("this state has no optimizer to tune with; create it with "
                          "TrainState.create(model, optimizer)")
    trainable = {n: t for n, t in copy.params.items()
                 if copy.model.get_parameter(n).requires_grad}
    return copy.replace(optimizer=optimizer, opt_state=optimizer.init(trainable), step=0,
                        slots={})


def lr_find(step: Any, state: TrainState, data: Any, *, min_lr: float = 1e-8,
            max_lr: float = 1.0, num_steps: int = 100,
            mode: Literal["exponential", "linear"] = "exponential",
            early_stop_threshold: float | None = 4.0, beta: float = 0.98) -> LRFinderResult:
    """An lr range test (Lightning's `Tuner.lr_find`); `state` is left untouched.

    Trains a copy of `state` with `step` for up to `num_steps` steps (cycling through
    `data` as epochs if it is shorter), from its weights with a fresh optimizer state,
    every parameter group's lr swept from `min_lr` to `max_lr`. Returns the lrs, the
    smoothed losses, a `suggestion` (steepest descent), `table()` and `plot()`. Reads the
    loss on the host each step (a host sync per step: the sweep decides when to stop).
    Outer layers of `step` (logging, validation, checkpointing) run too: pass the core
    step to leave them out.

    Examples:
        >>> import torch, ftrain as ft
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 4); y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        >>> data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(torch.nn.Linear(4, 1), ft.optim.sgd(0.1))
        >>> result = ft.tune.lr_find(step, state, data, min_lr=1e-4, max_lr=10.0,
        ...                          num_steps=40)
        >>> 1e-4 < result.suggestion < 10.0, state.step
        (True, 0)
    """
    _checked(min_lr, max_lr, num_steps, mode, early_stop_threshold)
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"lr_find: beta must be in [0, 1), got {beta!r}")
    sweep = Sweep(float(min_lr), float(max_lr), num_steps, mode)
    if not isinstance(state, TrainState):
        raise ConfigError(f"lr_find needs a TrainState, got {type(state).__name__}")
    if state.optimizer is None:
        raise ConfigError("lr_find: this state has no optimizer to sweep the lr of; create "
                          "it with TrainState.create(model, optimizer)")
    trial = trial_state(state, with_lr(state.optimizer, sweep, "lr_find"))
    lrs: list[float] = []
    losses: list[float] = []
    raw: list[float] = []
    avg, best, before = 0.0, math.inf, 0
    stopped = False
    for i, (s, metrics) in enumerate(iterate(step, trial, data, max_steps=num_steps)):
        if "loss" not in metrics:
            raise ConfigError(f"lr_find: the step's metrics have no 'loss' (they have "
                              f"{sorted(metrics)})")
        # host sync here, once per step: the sweep decides whether to go on
        loss, count = to_host([metrics["loss"], s.opt_state["count"]])
        lrs.append(float(sweep(before)))  # the lr this step's update used
        before = int(count)
        raw.append(loss)
        avg = beta * avg + (1 - beta) * loss
        smoothed = avg / (1 - beta ** (i + 2))  # Lightning's bias correction, as it has it
        losses.append(smoothed)
        if early_stop_threshold is not None and i + 1 > 1 and \
                (smoothed > early_stop_threshold * best or not math.isfinite(smoothed)):
            stopped = True
            break
        if smoothed < best or i == 0:
            best = smoothed
    index = suggest(lrs, losses)
    return LRFinderResult(lrs, losses, raw, lrs[index] if index is not None else None,
                          index, stopped)
