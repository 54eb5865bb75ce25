"""`with_amp`: mixed precision (autocast), with a dynamic loss scaler for float16.

`with_amp` sets the core step's autocast dtype (see ftrain.core.phases for the phase order).
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

import attrs
import torch

from ftrain.core.layer import Step
from ftrain.core.phases import with_option
from ftrain.core.state import TrainState
from ftrain.errors import CheckpointError, ConfigError

_SLOT_KEYS = {"scale": torch.float32, "growth_tracker": torch.int32, "skipped": torch.int64}


@attrs.frozen
class Amp:
    """The precision option `with_amp` gives a core step (a frozen record)."""

    dtype: torch.dtype
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    name: str = "amp"

    def __attrs_post_init__(self) -> None:
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"with_amp: dtype must be torch.bfloat16 or torch.float16, got "
                              f"{self.dtype!r}")
        if self.scaling:
            if not (self.init_scale > 0 and self.growth_factor > 1.0
                    and 0.0 < self.backoff_factor < 1.0):
                raise ConfigError(
                    f"with_amp: need init_scale > 0, growth_factor > 1 and 0 < "
                    f"backoff_factor < 1, got init_scale={self.init_scale}, growth_factor="
                    f"{self.growth_factor}, backoff_factor={self.backoff_factor}")
            if not isinstance(self.growth_interval, int) or self.growth_interval < 1:
                raise ConfigError(f"with_amp: growth_interval must be an int >= 1, got "
                                  f"{self.growth_interval!r}")
            if not isinstance(self.name, str) or not self.name:
                raise ConfigError(f"name= must be a non-empty string, got {self.name!r}")

    def __repr__(self) -> str:
        return f"with_amp({self.dtype})"

    @property
    def scaling(self) -> bool:
        """float16 scales the loss (a slot); bfloat16 does not need to."""
        return self.dtype == torch.float16

    def fresh_slot(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {"scale": torch.full((), float(self.init_scale), dtype=torch.float32,
                                    device=device),
                "growth_tracker": torch.zeros((), dtype=torch.int32, device=device),
                "skipped": torch.zeros((), dtype=torch.int64, device=device)}

    def init(self, state: TrainState) -> TrainState:
        """Create the loss scaler's slot, or check the one a checkpoint brought."""
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
             growth_interval: int = 2000, name: str = "amp") -> Step:
    """Run the forward and loss under autocast in `dtype` on the state's device type.

    `torch.bfloat16` (the default; CPU and recent GPUs) needs no loss scaling.
    `torch.float16` adds a dynamic loss scaler in `state.slots[name]`: overflowing steps
    are skipped on the device (params, optimizer state and schedule position unchanged),
    the scale backs off by `backoff_factor` and grows by `growth_factor` after
    `growth_interval` clean steps, as torch's GradScaler does. It returns a new stack
    whose core step (`train_step` or `manual_step`) has this option set, so it may be
    applied anywhere in the stack; `step` itself is unchanged.

    Examples:
        >>> import torch, ftrain as ft
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> step = ft.with_amp(step, torch.bfloat16)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state, metrics = step(state, (torch.randn(8, 3), torch.randn(8, 1)))
        >>> state.step
        1
    """
    amp = Amp(dtype, float(init_scale), float(growth_factor), float(backoff_factor),
              growth_interval, name)
    return with_option(step, "amp", amp, "with_amp")


def loss_scale(state: TrainState, name: str = "amp") -> float | None:
    """The float16 loss scale of `state` (host sync here), or None without a scaler.

    Examples:
        >>> import torch, ftrain as ft
        >>> ft.loss_scale(ft.TrainState.create(torch.nn.Linear(1, 1))) is None
        True
    """
    slot = state.slots.get(name)
    return float(slot["scale"]) if isinstance(slot, dict) and "scale" in slot else None
