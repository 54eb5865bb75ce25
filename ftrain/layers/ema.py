"""`with_ema`: an exponential moving average of the weights, kept in a slot.

After each due step the average moves toward the current weights on the device, with the
kernel torch's `get_ema_multi_avg_fn` uses (`torch._foreach_lerp_(avg, params, 1 -
decay)`, one launch per dtype), so `AveragedModel(model,
multi_avg_fn=get_ema_multi_avg_fn(decay))` updated by hand after the same steps holds
the same numbers. Whether a step is due is decided on the host from `state.step` (an
int): no host sync. As AveragedModel's, the first update copies the weights.

Buffers: by default (`buffers="average"`) floating-point buffers (BatchNorm running
statistics) are averaged with the params, as `AveragedModel(use_buffers=True)` does, and
integer ones (`num_batches_tracked`) are the live model's; `buffers="live"` keeps none
in the slot and uses the live model's buffers (`use_buffers=False`).
"""

from __future__ import annotations

from typing import Any, Literal

from ftrain.core import context
from ftrain.core.layer import Combinator, Metrics
from ftrain.core.state import TrainState
from ftrain.errors import ConfigError, check_int
from ftrain.layers import averaging as _avg


class WithEMA(Combinator):
    """The combinator built by `with_ema`."""

    def __init__(self, inner: Any, decay: float, *, every_n_steps: int = 1,
                 start_step: int = 0, warmup: bool = False,
                 buffers: Literal["average", "live"] = "average", name: str = "ema") -> None:
        super().__init__(inner, name)
        self.name = name
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or \
                not 0.0 <= decay <= 1.0:
            raise ConfigError(f"with_ema: decay must be a float in [0, 1], got {decay!r}")
        check_int("with_ema: every_n_steps", every_n_steps, 1)
        check_int("with_ema: start_step", start_step, 0)
        if every_n_steps is None or start_step is None:
            raise ConfigError("with_ema: every_n_steps and start_step must be ints, not None")
        if buffers not in ("average", "live"):
            raise ConfigError(f"with_ema: buffers must be 'average' or 'live', got "
                              f"{buffers!r}")
        self.decay = float(decay)
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.warmup = bool(warmup)
        self.buffers = buffers
        # the pairs of tensors to update, grouped by (device, dtype): found once per run
        # (the loop updates its tensors in place, so the same lists serve every step)
        self._groups: tuple[Any, ...] | None = None
        self._checked()

    def __repr__(self) -> str:
        return f"with_ema(decay={self.decay}, name={self.name!r})"

    def decay_at(self, count: int) -> float:
        """The decay of update number `count` (0-based): with `warmup`, TensorFlow's
        `ExponentialMovingAverage(num_updates=...)` rule min(decay, (1 + n) / (10 + n)).

        Examples:
            >>> import torch, ftrain as ft
            >>> step = ft.with_ema(ft.train_step(lambda m, b: m(b).sum()), 0.999, warmup=True)
            >>> step.decay_at(0), step.decay_at(10_000)
            (0.1, 0.999)
        """
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + count) / (10 + count))

    def _buffer_ref(self, state: TrainState) -> _avg.Tree | None:
        return _avg.floating(state.buffers) if self.buffers == "average" else {}

    def after_init(self, state: TrainState) -> TrainState:
        slot = state.slots.get(self.name)
        if slot is None:
            slot = _avg.fresh_slot(state, "ema", self.buffers == "average")
        else:
            _avg.check_slot(slot, self.name, "ema", state, self._buffer_ref(state))
            if slot["seen"] != state.step:
                raise ConfigError(
                    f"the {self.name!r} slot was last updated at step {slot['seen']}, the "
                    f"state is at step {state.step}: the state was trained without this "
                    f"layer in between; give with_ema another name= to start a new average")
        return state.replace(slots={**state.slots, self.name: slot})

    def _pairs(self, slot: dict[str, Any], state: TrainState, bound: bool) -> Any:
        """The (average, current) tensors grouped by (device, dtype). In a loop the params
        groups are found once (the loop updates the same tensors in place); buffers are
        looked up each time (a module may reassign one)."""
        cache = self._groups
        if bound and cache is not None and cache[0] is slot["params"] and \
                cache[1] is state.params:
            groups = cache[2]
        else:
            groups = _avg.grouped_pairs(slot["params"], state.params)
            if bound:
                self._groups = (slot["params"], state.params, groups)
        if slot["buffers"]:
            groups = groups + _avg.grouped_pairs(slot["buffers"], state.buffers)
        return groups

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        state, metrics = self.inner(state, batch)
        slot = state.slots.get(self.name)
        if slot is None:  # a direct call without init: start the average here
            slot = _avg.fresh_slot(state, "ema", self.buffers == "average")
        step = state.step
        new = dict(slot)
        new["seen"] = step
        binding = context.stepping(state)
        if step >= self.start_step and step % self.every_n_steps == 0:
            # bound (a loop owns this state): update in place; a direct call is pure and
            # updates copies, leaving the caller's slot as it was
            bound = binding is not None
            if not bound:
                new["params"] = _avg.copy_tree(slot["params"])
                new["buffers"] = _avg.copy_tree(slot["buffers"])
            groups = self._pairs(new, state, bound)
            count = int(slot["count"])
            if count == 0:
                _avg.copy_(groups)
            else:
                _avg.lerp_(groups, 1.0 - self.decay_at(count))
            new["count"] = count + 1
        if binding is not None and binding.latest is not None:
            # the tensors may have changed in place: the state a failing outer layer
            # leaves (the core's, err.state) must say so, or a resume would not match
            binding.latest.slots[self.name] = new
        return state.replace(slots={**state.slots, self.name: new}), metrics


def with_ema(step: Any, decay: float = 0.999, *, every_n_steps: int = 1, start_step: int = 0,
             warmup: bool = False, buffers: Literal["average", "live"] = "average",
             name: str = "ema") -> WithEMA:
    """Keep an exponential moving average of the weights in `state.slots[name]`.

    After every `every_n_steps`-th step from `state.step >= start_step` on:
    `avg = decay * avg + (1 - decay) * params` on the device (the first update copies
    the weights, as torch's `AveragedModel`); `warmup=True` uses
    min(decay, (1 + n) / (10 + n)) for update n. Buffers: see the module (`"average"`:
    floating-point buffers averaged too; `"live"`: the live model's). `ft.averaged(state)`
    is the state with the average swapped in (evaluate, bind, export, save it);
    `ft.averaged(evaluator)` validates on it inside `with_validation(with_ema(...))`.
    The slot is saved with the state: a resumed run continues the same average.

    Examples:
        >>> import torch, ftrain as ft
        >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> step = ft.with_ema(ft.train_step(loss), decay=0.99)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> state = ft.fit(step, state, data, epochs=1, logger=False, checkpoint=False,
        ...                progress=False)
        >>> state.slots["ema"]["count"], sorted(ft.averaged(state).params)
        (4, ['bias', 'weight'])
    """
    return WithEMA(step, decay, every_n_steps=every_n_steps, start_step=start_step,
                   warmup=warmup, buffers=buffers, name=name)
