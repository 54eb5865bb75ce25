"""`manual_step`: a hand-written step that updates several models with several optimizers.

A GAN updates the discriminator, then the generator, each from its own loss and with its
own optimizer. `manual_step(fn)` gives `fn(m, batch)` a `Manual` with the models
(bound to the state's tensors, train mode) and the same update phases `train_step` uses:
`m.update(loss, "D")` runs the (scaled) backward into D's parameters only, the gradient
sync across ranks, unscaling and the finite check, and D's optimizer chain. The result is
an ordinary step: pure when called directly, bound inside a loop, and every combinator
(`with_amp`, `with_ddp`, logging, checkpointing, ...) works around it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ftrain.core import bind as _bind
from ftrain.core import health
from ftrain.core import layer as _layer
from ftrain.core import phases as _phases
from ftrain.core import rng as _rng
from ftrain.core.state import TrainState
from ftrain.core.step import (
    NonFinite,
    _check_state,
    _grad_norm,
    _Value,
    advance,
    check_core_args,
    eval_metrics,
)
from ftrain.errors import ConfigError, LossError

Metrics = _layer.Metrics


class Manual:
    """What a manual step's function receives: the models and the update helpers.

    `m.model` is the model (a dict of models for a multi-model state); `m.state` the
    input state (read `step`, `seed`, `slots`; its tensors are the models' own).
    """

    def __init__(self, core: ManualStep, state: TrainState, binding: Any) -> None:
        self.state = state
        self.model = binding.model_arg
        self._core = core
        self._binding = binding
        self._scale = _phases.scaler(core.phases, state)
        self._pending: dict[str | None, list[torch.Tensor]] = {}
        self.found_inf: torch.Tensor | None = None  # any update skipped this step
        self.metrics: Metrics = {}
        self.losses: list[torch.Tensor] = []

    def _part(self, model: str | None, what: str) -> str | None:
        trainable = self._binding.trainable
        if model is None and None not in trainable:
            raise ConfigError(f"m.{what}: this state holds several models "
                              f"{sorted(trainable)}; name the one to update")
        if model not in trainable:
            names = "one model (pass no name)" if None in trainable else sorted(trainable)
            raise ConfigError(f"m.{what}: no model {model!r} in this state; it holds {names}")
        return model

    def backward(self, loss: torch.Tensor, model: str | None = None) -> None:
        """Add `loss`'s gradients to `model`'s trainable parameters (only theirs).

        Scaled by the float16 loss scale under `with_amp`; run outside autocast.
        """
        part = self._part(model, "backward")
        where = f"step {self.state.step}, model {part!r}" if part else f"step {self.state.step}"
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0
                and loss.is_floating_point()):
            raise LossError(f"{where}: m.backward needs a 0-d floating-point loss, got "
                            f"{type(loss).__name__}"
                            f"{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if not loss.requires_grad:
            raise LossError(f"{where}: the loss does not require grad")
        params = list(self._binding.trainable[part].values())
        scaled = loss if self._scale is None else loss * self._scale["scale"]
        with torch.autocast(self.state.device.type, enabled=False):
            scaled.backward(inputs=params)
        self._pending.setdefault(part, []).append(loss.detach())
        self.losses.append(loss.detach())

    def apply(self, model: str | None = None) -> None:
        """Update `model` from its accumulated gradients with its optimizer, then clear them.

        Gradient sync across ranks, unscaling and the finite check come first; a skipped
        update (float16 overflow, or a non-finite loss with `on_nonfinite="skip"`) leaves
        the model and its optimizer state unchanged, decided on the device.
        """
        part = self._part(model, "apply")
        losses = self._pending.pop(part, None)
        if losses is None:
            raise ConfigError(f"m.apply({part!r}) without a m.backward for it first")
        params = self._binding.trainable[part]
        leaves = list(params.values())
        loss_bad = None
        if self._core.on_nonfinite == "skip":
            loss_bad = (~torch.isfinite(torch.stack(losses)).all()).to(torch.float32)
        found_inf = _phases.prepare(self._core.phases, leaves, loss_bad, self._scale, True)
        if _phases.GRAD_NORM.get():
            self.metrics["grad_norm" if part is None else f"grad_norm/{part}"] = \
                _grad_norm(leaves)
        state = self.state
        optimizer = state.optimizer if part is None else state.optimizer[part]
        opt_state = state.opt_state if part is None else state.opt_state[part]
        if optimizer is None:
            raise ConfigError(f"m.apply: model {part!r} has no optimizer in this state")
        self._binding.changed = True  # from here on a failure cannot be rolled back
        with torch.autocast(state.device.type, enabled=False):  # updates in full precision
            _phases.apply_update(optimizer, params, opt_state, found_inf)
        self.found_inf = _phases.combine(self.found_inf, found_inf)

    def update(self, loss: torch.Tensor, model: str | None = None) -> None:
        """`backward(loss, model)` then `apply(model)`: one optimizer step for one model.

        Examples:
            >>> import torch, ftrain as ft
            >>> def fn(m, batch):
            ...     loss = m.model(batch).pow(2).mean()
            ...     m.update(loss)
            ...     return {"loss": loss}
            >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
            >>> new, metrics = ft.manual_step(fn)(state, torch.randn(4, 2))
            >>> new.step
            1
        """
        self.backward(loss, model)
        self.apply(model)

    def finish(self) -> None:
        if self._pending:
            names = sorted(str(p) for p in self._pending)
            for part in self._pending:  # leave no stale gradient behind
                for p in self._binding.trainable[part].values():
                    p.grad = None
            raise ConfigError(f"step {self.state.step}: m.backward for {names} was not "
                              "followed by m.apply; gradients would leak into the next step")
        if self._scale is not None:  # no update at all (found_inf None): nothing overflowed
            found_inf = self.found_inf if self.found_inf is not None else torch.zeros(
                (), device=self._scale["scale"].device)
            _phases.update_scale(self._core.phases.amp, self._scale, found_inf)


class ManualStep(_Value):
    """The step built by `manual_step`."""

    inner = None
    options = ("amp", "ddp")
    _fixed = ("fn", "on_nonfinite", "phases")

    def __init__(self, fn: Callable[[Manual, Any], Any], on_nonfinite: NonFinite) -> None:
        check_core_args(fn, "manual_step needs a callable fn(m, batch)", on_nonfinite)
        self.fn = fn
        self.on_nonfinite = on_nonfinite
        self.phases = _phases.Phases()

    def __repr__(self) -> str:
        return f"manual_step({getattr(self.fn, '__qualname__', repr(self.fn))})"

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if type(state) is not TrainState:
            _check_state(state, "a manual step")
        binding = _bind.stepping(state)
        if binding is not None:
            return self._run(state, binding, batch)
        # pure: the same code on a bound copy, which is then released
        work = state.copy()
        tmp = _bind.Binding(work, training=True)
        try:
            new, metrics = self._run(work, tmp, batch)
        finally:
            tmp.in_step = False
        new = tmp.release(new)
        if self.on_nonfinite != "ignore" and health.SLOT in new.slots:
            new.slots[health.SLOT]["policy"] = self.on_nonfinite
        return new, metrics

    def _run(self, state: TrainState, binding: Any, batch: Any
             ) -> tuple[TrainState, Metrics]:
        binding.set_mode(True)
        binding.nonfinite_policy = self.on_nonfinite
        if self.phases.ddp is not None:  # with_ddp(sync_batchnorm): converted once
            self.phases.ddp.prepare(binding)
        m = Manual(self, state, binding)
        with _rng.step_seeded(binding.generator, state.seed, state.step, binding.rank), \
                _phases.autocast(self.phases, state.device):
            out = self.fn(m, batch)
        m.finish()
        metrics = eval_metrics(out, f"manual step {state.step}", state.device)
        metrics.update(m.metrics)
        return advance(state, binding, m.losses, self.on_nonfinite, "a manual step"), metrics


def manual_step(fn: Callable[[Manual, Any], Any], *,
                on_nonfinite: NonFinite = "raise") -> ManualStep:
    """A step from `fn(m, batch) -> {name: metric}` that updates models by hand.

    Inside `fn`, `m.model` holds the model(s) and `m.update(loss, "name")` makes one
    optimizer step for one model (`m.backward` + `m.apply` to accumulate first). The
    state holds every model's optimizer state; the function returns the metrics.

    Examples:
        >>> import torch, ftrain as ft
        >>> def gan(m, batch):
        ...     G, D = m.model["G"], m.model["D"]
        ...     fake = G(torch.randn(len(batch), 2))
        ...     d_loss = (D(fake.detach()) - D(batch)).mean()
        ...     m.update(d_loss, "D")
        ...     g_loss = -D(fake).mean()
        ...     m.update(g_loss, "G")
        ...     return {"d_loss": d_loss, "g_loss": g_loss}
        >>> models = {"G": torch.nn.Linear(2, 3), "D": torch.nn.Linear(3, 1)}
        >>> opts = {"G": ft.optim.adam(1e-3), "D": ft.optim.adam(1e-3)}
        >>> state = ft.TrainState.create(models, opts)
        >>> state, metrics = ft.manual_step(gan)(state, torch.randn(8, 3))
        >>> sorted(metrics)
        ['d_loss', 'g_loss']
    """
    return ManualStep(fn, on_nonfinite)
