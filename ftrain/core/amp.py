"""`with_amp`: mixed precision (autocast), with a dynamic loss scaler for float16.

The layer sets the core step's autocast dtype (see ftrain.core.phases for the phase order).
bfloat16 keeps float32's range and needs no scaler. float16 gets one that lives in a slot,
`{"scale", "growth_tracker", "skipped"}` (0-d device tensors): the loss is multiplied by
`scale` before backward, gradients are unscaled before clipping, and a step whose gradients
hold an inf or NaN leaves params, optimizer state and the update count (hence the schedule)
unchanged, halves the scale and counts the skip, all decided on the device by torch's amp
kernels; after `growth_interval` clean steps the scale grows. `state.step` counts
iterations and advances either way.
"""

from __future__ import annotations

from typing import Any

import torch

from ftrain.core import step as _step
from ftrain.core.layer import Combinator
from ftrain.core.phases import phases_of
from ftrain.core.state import TrainState
from ftrain.errors import CheckpointError, ConfigError

_SLOT_KEYS = {"scale": torch.float32, "growth_tracker": torch.int32, "skipped": torch.int64}


class WithAmp(Combinator):
    """The layer `with_amp` builds."""

    def __init__(self, inner: Any, dtype: torch.dtype, *, init_scale: float,
                 growth_factor: float, backoff_factor: float, growth_interval: int,
                 name: str) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"with_amp: dtype must be torch.bfloat16 or torch.float16, got "
                              f"{dtype!r}")
        self.dtype = dtype
        self.scaling = dtype == torch.float16
        if self.scaling:
            if not (init_scale > 0 and growth_factor > 1.0 and 0.0 < backoff_factor < 1.0):
                raise ConfigError(
                    f"with_amp: need init_scale > 0, growth_factor > 1 and 0 < "
                    f"backoff_factor < 1, got init_scale={init_scale}, growth_factor="
                    f"{growth_factor}, backoff_factor={backoff_factor}")
            if not isinstance(growth_interval, int) or growth_interval < 1:
                raise ConfigError(f"with_amp: growth_interval must be an int >= 1, got "
                                  f"{growth_interval!r}")
        super().__init__(inner, name if self.scaling else None)
        self.name = name
        self.init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        phases_of(_step.core(inner), "with_amp").claim("amp", self)

    def __repr__(self) -> str:
        return f"with_amp({self.dtype})"

    def fresh_slot(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {"scale": torch.full((), self.init_scale, dtype=torch.float32, device=device),
                "growth_tracker": torch.zeros((), dtype=torch.int32, device=device),
                "skipped": torch.zeros((), dtype=torch.int64, device=device)}

    def init(self, state: TrainState) -> TrainState:
        state = _step.init(self.inner, state)
        if not self.scaling:
            return state
        slot = state.slots.get(self.name)
        if slot is None:
            return state.replace(slots={**state.slots, self.name: self.fresh_slot(state.device)})
        if not isinstance(slot, dict) or set(slot) != set(_SLOT_KEYS) or any(
                not isinstance(slot[k], torch.Tensor) or slot[k].dtype != dt
                for k, dt in _SLOT_KEYS.items()):
            raise CheckpointError(
                f"slot {self.name!r} is not a loss-scaler slot: expected 0-d tensors "
                f"{ {k: str(v) for k, v in _SLOT_KEYS.items()} }, found {_shape(slot)}")
        return state


def _shape(slot: Any) -> Any:
    if isinstance(slot, dict):
        return {k: (str(v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__)
                for k, v in slot.items()}
    return type(slot).__name__


def with_amp(step: Any, dtype: torch.dtype = torch.bfloat16, *, init_scale: float = 2.0**16,
             growth_factor: float = 2.0, backoff_factor: float = 0.5,
             growth_interval: int = 2000, name: str = "amp") -> WithAmp:
    """Run the forward and loss under autocast in `dtype` on the state's device type.

    `torch.bfloat16` (the default; CPU and recent GPUs) needs no loss scaling.
    `torch.float16` adds a dynamic loss scaler in `state.slots[name]`: overflowing steps
    are skipped on the device (params, optimizer state and schedule position unchanged),
    the scale backs off by `backoff_factor` and grows by `growth_factor` after
    `growth_interval` clean steps, as torch's GradScaler does. The layer sets an option on
    the core step (`train_step` or `manual_step`), so it may sit anywhere in the stack.

    Examples:
        >>> import torch, ftrain as ft
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> step = ft.with_amp(step, torch.bfloat16)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state, metrics = step(state, (torch.randn(8, 3), torch.randn(8, 1)))
        >>> state.step
        1
    """
    return WithAmp(step, dtype, init_scale=init_scale, growth_factor=growth_factor,
                   backoff_factor=backoff_factor, growth_interval=growth_interval, name=name)


def loss_scale(state: TrainState, name: str = "amp") -> float | None:
    """The float16 loss scale of `state` (host sync here), or None without a scaler.

    Examples:
        >>> import torch, ftrain as ft
        >>> ft.loss_scale(ft.TrainState.create(torch.nn.Linear(1, 1))) is None
        True
    """
    slot = state.slots.get(name)
    return float(slot["scale"]) if isinstance(slot, dict) and "scale" in slot else None
