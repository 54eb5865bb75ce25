"""The function `ft.compile` captures: one whole training iteration, in place on its inputs.

`_iteration` builds it for one model (`_Model`: a private train-mode copy of the state's
template, with its parameter and buffer slots listed once), one optimizer chain per part
and the step's options (autocast, accumulation, gradient norm, skipping non-finite
updates):

    forward and loss (under autocast with `with_amp`) -> gradients (`torch.func`, loss
    scaled for float16) -> unscale and finite check -> clipping -> optimizer update

Everything it reads besides its inputs is fixed per compiled variant: the closure names
in `_OWN_CLOSURE` and this module's globals are not guarded on each call (see
`ftrain.compiling.capture._guard_filter`), so keep the two in step when editing it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ftrain.core import bind as _bind
from ftrain.core import layer as _layer
from ftrain.core import phases as _phases
from ftrain.core.outputs import add_weighted, split_loss
from ftrain.core.state import TrainState, parts

_WHERE = "compiled step"

Metrics = _layer.Metrics


class _Model:
    """A private copy of a state's template (meta skeleton) wrapped to call the loss
    function, in train mode for good (evaluation calls on the state's template cannot
    toggle it), its parameter and buffer slots (`_slots`: the iteration puts the state's
    tensors there, as functional_call would, for a fraction of the tracing time), plus
    each part's trainable parameter names and the flat-name layout."""

    def __init__(self, state: TrainState) -> None:
        self.template = state.model
        self.apply = _bind._Apply(copy.deepcopy(state.model))
        self.apply.train(True)
        self.slots = _slots(self.apply)
        self.trainable: dict[str | None, set[str]] = {}
        self.layout: list[tuple[str | None, list[tuple[str, str]]]] = []
        for part, template, _, params, _, _ in parts(state):
            names = {n for n in params if template.get_parameter(n).requires_grad}
            self.trainable[part] = names
            prefix = "model." if part is None else f"model.{part}."
            self.layout.append((part, [(prefix + n, n) for n in params if n in names]))


Slot = tuple[torch.nn.Module, str, bool, str, str]


def _slots(module: torch.nn.Module) -> list[Slot]:
    """Every parameter and buffer slot of `module`, tied aliases included: (owning
    module, attribute, is a parameter, flat name, flat name of the first slot holding
    the same tensor). What functional_call finds by walking the module on every call."""
    first: dict[int, str] = {}
    slots: list[Slot] = []
    for is_param, named in ((True, module.named_parameters(remove_duplicate=False)),
                            (False, module.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            owner, _, attr = name.rpartition(".")
            slots.append((module.get_submodule(owner), attr, is_param, name,
                          first.setdefault(id(tensor), name)))
    return slots


def _swap(slots: list[Slot], tensors: dict[str, torch.Tensor]) -> list[Any]:
    """Put `tensors` (by flat name; a tied alias takes its first name's tensor) into
    the module's slots, as `torch.func.functional_call(..., tie_weights=True,
    strict=False)` does; returns what was there, for `_swap_back`."""
    old = []
    for owner, attr, is_param, name, first in slots:
        table = owner._parameters if is_param else owner._buffers
        old.append(table[attr])
        tensor = tensors.get(name)
        if tensor is None:
            tensor = tensors.get(first)
        if tensor is not None:
            table[attr] = tensor  # type: ignore[assignment]
    return old


def _swap_back(slots: list[Slot], old: list[Any]) -> None:
    for (owner, attr, is_param, _, _), tensor in zip(slots, old):
        (owner._parameters if is_param else owner._buffers)[attr] = tensor


def _autograd_grad_and_value(fn: Callable[..., Any], has_aux: bool = True
                             ) -> Callable[..., Any]:
    """`torch.func.grad_and_value(fn, has_aux=True)` by `torch.autograd.grad` (argument 0
    differentiated; an unused one gets zeros, aux is detached), for checkpointed forwards:
    torch.func's transforms refuse the saved-tensor hooks that checkpoint uses, while
    dynamo (`trace_autograd_ops`) traces autograd.grad with checkpoint regions."""
    def wrapped(train: dict[str, torch.Tensor], *args: Any) -> Any:
        leaves = {n: t.detach().requires_grad_(True) for n, t in train.items()}
        with torch.enable_grad():
            value, aux = fn(leaves, *args)
            found = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        grads = {n: torch.zeros_like(t) if g is None else g
                 for (n, t), g in zip(leaves.items(), found)}
        aux = torch.utils._pytree.tree_map(
            lambda v: v.detach() if isinstance(v, torch.Tensor) else v, aux)
        return grads, (value.detach(), aux)
    return wrapped


def _iteration(loss_fn: Any, model: _Model, optimizers: tuple[Any, ...],
               device: torch.device, amp: Any, acc: Any, *, want_grad_norm: bool,
               skip_nonfinite: bool, checkpointed: bool = False) -> Callable[..., Metrics]:
    """The function torch.compile traces: one whole iteration, in place on its inputs.
    `checkpointed`: the model's forwards run checkpoint regions, so gradients come from
    `torch.autograd.grad` instead of `torch.func` (see `_autograd_grad_and_value`)."""
    grad_and_value = _autograd_grad_and_value if checkpointed else torch.func.grad_and_value
    apply = model.apply
    layout = model.layout
    slots = model.slots
    dtype = None if amp is None else amp.dtype

    def iteration(train: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                  buffers: dict[str, torch.Tensor], opt_states: list[Any], batch: Any,
                  scale: dict[str, torch.Tensor] | None) -> Metrics:
        micro = [batch] if acc is None else acc.split_batch(batch, 0)
        weights = [1.0] if acc is None else acc.weights(micro)

        def forward(train: dict[str, torch.Tensor], bufs: dict[str, torch.Tensor],
                    mb: Any, w: float) -> tuple[torch.Tensor, Any]:
            seen: dict[str, torch.Tensor] = {}
            tensors = {**train, **frozen, **bufs}
            old = _swap(slots, tensors)
            try:
                if dtype is None:
                    out = apply(loss_fn, mb, seen)
                    loss, metrics = split_loss(out, _WHERE)
                else:
                    with torch.autocast(device.type, dtype=dtype):
                        out = apply(loss_fn, mb, seen)
                        loss, metrics = split_loss(out, _WHERE)
            finally:
                _swap_back(slots, old)
            scaled = loss if w == 1.0 else loss * w
            if scale is not None:
                scaled = scaled * scale["scale"]
            # buffers the forward reassigned instead of updating in place
            changed = {"model." + n: v for n, v in seen.items()
                       if "model." + n in bufs and v is not bufs["model." + n]}
            return scaled, (metrics, changed)

        grads: dict[str, torch.Tensor] = {}
        metrics: Metrics = {}
        for i, (mb, w) in enumerate(zip(micro, weights)):
            g, (_, (m, changed)) = grad_and_value(forward, has_aux=True)(
                train, buffers, mb, w)
            for name, value in changed.items():
                buffers[name].copy_(value)
            grads = g if i == 0 else {n: grads[n] + g[n] for n in g}
            if len(micro) == 1:
                metrics = m
            else:
                add_weighted(metrics, m, w, _WHERE)
        found_inf = None
        if skip_nonfinite:
            found_inf = (~torch.isfinite(metrics["loss"])).to(torch.float32)
        if scale is not None:  # in place on this iteration's own gradient tensors
            found_inf = _phases.combine(found_inf,
                                        _phases.unscale_grads(list(grads.values()), scale))
        if want_grad_norm:
            metrics["grad_norm"] = _total_norm(list(grads.values()), device)
        for (_, names), optimizer, opt_state in zip(layout, optimizers, opt_states):
            if optimizer is None or not names:
                continue
            optimizer.update_capturable({n: train[f] for f, n in names},
                                        {n: grads[f] for f, n in names}, opt_state, found_inf)
        if scale is not None:
            _phases.update_scale(amp, scale, found_inf)  # type: ignore[arg-type]
        return metrics

    return iteration


def _total_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads)


# The closure variables of `iteration` above: ftrain's own, immutable for a compiled
# variant, so not guarded on each call (`capture._guard_filter`).
_OWN_CLOSURE = frozenset(("apply", "layout", "optimizers", "acc", "dtype", "want_grad_norm",
                          "skip_nonfinite", "device", "slots", "grad_and_value"))
