"""Learning-rate schedules: functions of the update count.

Each schedule accepts a Python int (returns a float) or a 0-d tensor (returns a 0-d
tensor on the same device, computed without a host sync), so the optimizer can keep its
count on the device and a compiled or CUDA-graph-captured step never recompiles.

Examples:
    >>> import torch
    >>> from ftrain.optim import schedules
    >>> s = schedules.warmup_cosine(1e-3, warmup_steps=10, total_steps=110)
    >>> s(0), s(10), round(s(60), 6), s(110)
    (0.0, 0.001, 0.0005, 0.0)
    >>> float(s(torch.tensor(60)))  # same value from a device count
    0.0005
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from ftrain.errors import ConfigError

__all__ = ["constant", "cosine_decay", "join", "linear", "per_epoch", "step_decay",
           "warmup_cosine"]


def _is_tensor(count: Any) -> bool:
    return isinstance(count, torch.Tensor)


def _as_float(count: Any) -> Any:
    return count.to(torch.float64) if _is_tensor(count) else float(count)


def _clip01(x: Any) -> Any:
    return x.clamp(0.0, 1.0) if _is_tensor(x) else min(max(x, 0.0), 1.0)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


@attrs.frozen
class constant:
    """`value` at every count.

    Examples:
        >>> from ftrain.optim import schedules
        >>> schedules.constant(0.1)(123)
        0.1
    """

    value: float

    def __call__(self, count: Any) -> Any:
        if _is_tensor(count):
            return torch.full((), self.value, dtype=torch.float64, device=count.device)
        return self.value


@attrs.frozen
class linear:
    """From `start` to `end` linearly over `steps` updates, then `end` (e.g. warmup).

    Examples:
        >>> from ftrain.optim import schedules
        >>> schedules.linear(0.0, 1.0, steps=4)(1)
        0.25
    """

    start: float
    end: float
    steps: int

    def __attrs_post_init__(self) -> None:
        _positive("linear: steps", self.steps)

    def __call__(self, count: Any) -> Any:
        frac = _clip01(_as_float(count) / self.steps)
        return self.start + (self.end - self.start) * frac


@attrs.frozen
class cosine_decay:
    """From `init` down to `alpha * init` along a half cosine over `decay_steps`.

    Examples:
        >>> from ftrain.optim import schedules
        >>> schedules.cosine_decay(1.0, 10)(10)
        0.0
    """

    init: float
    decay_steps: int
    alpha: float = 0.0

    def __attrs_post_init__(self) -> None:
        _positive("cosine_decay: decay_steps", self.decay_steps)

    def __call__(self, count: Any) -> Any:
        frac = _clip01(_as_float(count) / self.decay_steps)
        cos = torch.cos(frac * math.pi) if _is_tensor(frac) else math.cos(frac * math.pi)
        return self.init * ((1.0 - self.alpha) * 0.5 * (1.0 + cos) + self.alpha)


@attrs.frozen
class step_decay:
    """`init * gamma ** (count // step_size)` (torch's StepLR).

    Examples:
        >>> from ftrain.optim import schedules
        >>> schedules.step_decay(1.0, step_size=10, gamma=0.5)(25)
        0.25
    """

    init: float
    step_size: int
    gamma: float = 0.1

    def __attrs_post_init__(self) -> None:
        _positive("step_decay: step_size", self.step_size)

    def __call__(self, count: Any) -> Any:
        if _is_tensor(count):
            k = torch.div(count, self.step_size, rounding_mode="floor").to(torch.float64)
            return self.init * torch.pow(torch.full_like(k, self.gamma), k)
        return self.init * self.gamma ** (int(count) // self.step_size)


@attrs.frozen
class join:
    """Run `schedules[i]` from `boundaries[i-1]` on; each sees the count since its start.

    Examples:
        >>> from ftrain.optim import schedules
        >>> s = schedules.join([schedules.constant(1.0), schedules.constant(0.1)], [100])
        >>> s(99), s(100)
        (1.0, 0.1)
    """

    schedules: Sequence[Callable[[Any], Any]]
    boundaries: Sequence[int]

    def __attrs_post_init__(self) -> None:
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ConfigError(f"join: {len(self.schedules)} schedules need "
                              f"{len(self.schedules) - 1} boundaries, got {len(self.boundaries)}")
        if list(self.boundaries) != sorted(self.boundaries):
            raise ConfigError(f"join: boundaries must increase, got {list(self.boundaries)}")

    def __call__(self, count: Any) -> Any:
        if not _is_tensor(count):
            start = 0
            for sched, bound in zip(self.schedules, self.boundaries):
                if count < bound:
                    return sched(count - start)
                start = bound
            return self.schedules[-1](count - start)
        # device count: evaluate every piece and select (no host sync)
        value = self.schedules[-1](count - (self.boundaries[-1] if self.boundaries else 0))
        value = torch.as_tensor(value, dtype=torch.float64, device=count.device)
        starts = [0, *self.boundaries[:-1]]
        for sched, start, bound in reversed(list(zip(self.schedules, starts, self.boundaries))):
            piece = torch.as_tensor(sched(count - start), dtype=torch.float64,
                                    device=count.device)
            value = torch.where(count < bound, piece, value)
        return value


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, *, init: float = 0.0,
                  end: float = 0.0) -> join:
    """Linear warmup from `init` to `peak`, then cosine decay to `end` at `total_steps`.

    Examples:
        >>> from ftrain.optim import schedules
        >>> schedules.warmup_cosine(1.0, 10, 20)(5)
        0.5
    """
    _positive("warmup_cosine: warmup_steps", warmup_steps)
    if total_steps <= warmup_steps:
        raise ConfigError(f"warmup_cosine: total_steps ({total_steps}) must exceed "
                          f"warmup_steps ({warmup_steps})")
    if peak == 0:
        return join([linear(init, peak, warmup_steps),
                     linear(peak, end, total_steps - warmup_steps)], [warmup_steps])
    return join([linear(init, peak, warmup_steps),
                 cosine_decay(peak, total_steps - warmup_steps, end / peak)], [warmup_steps])


def _running(attr: str) -> Any:
    """`attr` of the RunInfo of the loop running now (`epoch_length`: batches per epoch
    after sharding and limits; `epoch`), if exactly one loop runs and knows it."""
    from ftrain.core import context

    live = [b for b in list(context._LIVE.values())
            if getattr(b, "run", None) is not None and getattr(b.run, attr) is not None]
    for chosen in ([b for b in live if getattr(b, "in_step", False)], live):
        values = {getattr(b.run, attr) for b in chosen}  # the loop stepping now, if any
        if len(values) == 1:
            return values.pop()
    return None


@attrs.frozen
class per_epoch:
    """`schedule` counted in epochs (Lightning's `interval="epoch"`: the lr changes at
    epoch starts). In a loop (`ft.fit`, `ft.iterate`) it is `schedule(epoch)`, the loop's
    epoch, so updates skipped (`on_nonfinite="skip"`, float16 overflow) and a resume on
    another number of processes do not shift it. Outside a loop (a direct call, a read
    afterwards) the update at count `k` uses `schedule(k // E)`, E updates per epoch:
    `steps_per_epoch` when given, else the last loop's epoch length (after
    `limit_train_batches`, per rank under `with_ddp`); with neither, a ConfigError.

    Examples:
        >>> from ftrain.optim import schedules
        >>> s = schedules.per_epoch(schedules.step_decay(1.0, 1, 0.5), steps_per_epoch=10)
        >>> s(9), s(10), s(25)
        (1.0, 0.5, 0.25)
    """

    schedule: Callable[[Any], Any]
    steps_per_epoch: int | None = None
    _seen: dict[str, int] = attrs.field(factory=dict, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not callable(self.schedule):
            raise ConfigError(f"per_epoch: schedule must be a function of the epoch, got "
                              f"{self.schedule!r}")
        if self.steps_per_epoch is not None:
            _positive("per_epoch: steps_per_epoch", self.steps_per_epoch)

    def epoch_length(self) -> int:
        """E: given, the running loop's (remembered), or a ConfigError."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        n = _running("epoch_length") or None
        if n is not None:
            self._seen["n"] = n
            return n
        if "n" in self._seen:
            return self._seen["n"]
        raise ConfigError("per_epoch: the epoch length is not known: no loop (ft.fit, "
                          "ft.iterate) with data of known length is running. Pass "
                          "steps_per_epoch= (updates per epoch) for direct calls")

    def __call__(self, count: Any) -> Any:
        epoch = _running("epoch")
        if epoch is not None:  # in a loop: its epoch (a skipped update does not shift it)
            return self.schedule(epoch)
        n = self.epoch_length()
        if _is_tensor(count):
            return self.schedule(torch.div(count, n, rounding_mode="floor"))
        return self.schedule(int(count) // n)
