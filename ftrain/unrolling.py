"""Differentiable training steps: `ft.unroll` (k steps kept in one autograd graph) and
`ft.apply` (the state's model called on its tensors, no binding).

A loop's step updates parameters in place, outside autograd. `unroll` runs a
`train_step`'s loss function functionally on the state's tensors and ftrain's optimizer
in its differentiable form (`ftrain.optim.differentiable`), keeping every step's graph
(`create_graph=True`), so a loss on the resulting state differentiates with respect to
the initial parameters (MAML) and to learning rates given as tensors (MetaSGD,
hypergradient descent). Memory grows with the number of steps: each keeps its
activations and gradients for the outer backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ftrain.core import rng as _rng
from ftrain.core.bind import _Apply
from ftrain.core.outputs import split_loss
from ftrain.core.state import TrainState, parts
from ftrain.core.step import TrainStep, require_optimizer
from ftrain.errors import ConfigError
from ftrain.optim import differentiable

LRs = torch.Tensor | Mapping[str, torch.Tensor] | None


def apply(state: TrainState, *inputs: Any, model: str | None = None) -> Any:
    """The state's model called on `inputs` with the state's own tensors (a functional
    call: nothing is bound or copied, so the output differentiates with respect to the
    state's params, e.g. those `ft.unroll` returns). `model=` picks one model of a
    multi-model state.

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1))
        >>> ft.apply(state, torch.ones(3, 2)).shape
        torch.Size([3, 1])
    """
    if not isinstance(state, TrainState):
        raise ConfigError(f"ft.apply needs a TrainState, got {type(state).__name__}")
    if state.multi:
        if model is None or model not in state.model:
            raise ConfigError(f"ft.apply on a state with models {sorted(state.model)} needs "
                              f"model=<one of them>, got {model!r}")
        template, params, buffers = state.model[model], state.params[model], \
            state.buffers[model]
    else:
        if model is not None:
            raise ConfigError("model= picks one of several models; this state holds one")
        template, params, buffers = state.model, state.params, state.buffers
    return torch.func.functional_call(template, {**params, **buffers}, inputs)


def _core(step: Any) -> TrainStep:
    if not isinstance(step, TrainStep):
        raise ConfigError(f"ft.unroll runs an ft.train_step(loss_fn) with no layers around "
                          f"it (they do not run inside the graph), got {step!r}")
    options = [k for k in step.options if getattr(step.phases, k) is not None]
    if options or step.metrics:
        raise ConfigError(f"ft.unroll runs a plain ft.train_step; this one has "
                          f"{options + (['metrics='] if step.metrics else [])}")
    return step


class _Forward:
    """The loss function run on the template with given tensors (functional_call), set up
    once per unroll: the wrapper module and the names it takes. (`bind.pure_call` does the
    same per call; building the wrapper and setting its mode each step cost 5-8% of a
    MAML meta-iteration in benchmarks/unroll.py.)"""

    def __init__(self, state: TrainState, fn: Any) -> None:
        self.apply = _Apply(state.model)
        self.apply.train(True)
        self.fn, self.multi = fn, state.multi

    def __call__(self, params: dict[Any, Any], buffers: dict[Any, Any], batch: Any) -> Any:
        tensors: dict[str, torch.Tensor] = {}
        for part in params:
            prefix = "model." if part is None else f"model.{part}."
            for k, v in params[part].items():
                tensors[prefix + k] = v
            for k, v in buffers[part].items():
                tensors[prefix + k] = v
        seen: dict[str, Any] | None = {} if any(buffers.values()) else None
        out = torch.func.functional_call(self.apply, tensors, (self.fn, batch, seen),
                                         strict=False)
        for name, value in (seen or {}).items():  # buffers the forward reassigned
            part, _, rest = name.partition(".") if self.multi else (None, "", name)
            if buffers[part].get(rest) is not value:
                buffers[part][rest] = value
        return out


def _lr_for(lr: LRs, part: str | None, names: Iterable[str]) -> LRs:
    """The learning rates of one model's parameters (names "<model>.<param>" in a dict
    for a multi-model state); a name that is not a trainable parameter is an error."""
    if lr is None or isinstance(lr, torch.Tensor):
        return lr
    prefix = "" if part is None else f"{part}."
    return {k[len(prefix):]: v for k, v in lr.items() if k.startswith(prefix)
            and k[len(prefix):] in set(names)}


def unroll(step: Any, state: TrainState, batches: Iterable[Any], *, lr: LRs = None
           ) -> TrainState:
    """Run `step` (an `ft.train_step`) on each batch, keeping the autograd graph: the
    returned state's params and optimizer state are graph tensors, so a loss on them
    (`ft.apply(new, x)`) differentiates with respect to the given state's params (those
    that require grad) and to `lr` (a tensor for every parameter, or a dict from
    parameter name, "<model>.<name>" for several models, to a 0-d tensor or one shaped
    like the parameter), which replaces the optimizer's learning rates. Each step draws
    its randomness as the loop's step of that number does. The optimizer must be
    ftrain's sgd, adam, adamw and clip_grad_norm (a `ConfigError` names another).

    Examples:
        >>> import torch, ftrain as ft
        >>> from torch.nn import functional as F
        >>> step = ft.train_step(lambda m, b: F.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> w0 = {k: v.detach().requires_grad_() for k, v in state.params.items()}
        >>> batch = (torch.randn(4, 2), torch.randn(4, 1))
        >>> new = ft.unroll(step, state.replace(params=w0), [batch, batch])
        >>> outer = F.mse_loss(ft.apply(new, batch[0]), batch[1])
        >>> [g.shape for g in torch.autograd.grad(outer, list(w0.values()))]
        [torch.Size([1, 2]), torch.Size([1])]
    """
    core = _core(step)
    if not isinstance(state, TrainState):
        raise ConfigError(f"ft.unroll needs a TrainState, got {type(state).__name__}")
    require_optimizer(state)
    for _, _, optimizer, _, _, _ in parts(state):
        if optimizer is not None:
            differentiable.check(optimizer)
    if lr is not None and not isinstance(lr, torch.Tensor):
        if not isinstance(lr, Mapping):
            raise ConfigError(f"ft.unroll: lr must be a tensor or a dict of tensors by "
                              f"parameter name, got {type(lr).__name__}")
        known = {n if part is None else f"{part}.{n}" for part, t, _, p, _, _ in parts(state)
                 for n in p if t.get_parameter(n).requires_grad}
        unknown = sorted(set(lr) - known)
        if unknown:
            raise ConfigError(f"ft.unroll: lr= names {unknown}, which are not trainable "
                              f"parameters; these are {sorted(known)[:12]}")
    params: dict[Any, Any] = {}
    buffers: dict[Any, Any] = {}
    work = []  # per trained model: (part, optimizer, trainable names, its update's plan)
    for part, template, optimizer, p, b, _ in parts(state):
        names = [n for n, q in template.named_parameters() if q.requires_grad]
        params[part] = {n: (t.detach().requires_grad_() if n in names and not t.requires_grad
                            else t) for n, t in p.items()}
        buffers[part] = {n: t.clone() for n, t in b.items()}  # BatchNorm updates in place
        if optimizer is not None:
            work.append((part, optimizer, names, differentiable.plan(optimizer, names)))
    opt_state: Any = dict(state.opt_state) if state.multi else state.opt_state
    forward = _Forward(state, core.loss_fn)
    generator = _rng.generator_for(state.device)
    number = state.step
    for index, batch in enumerate(batches):
        with _rng.step_seeded(generator, state.seed, number, _rng.rank()):
            out = forward(params, buffers, batch)
        loss, _ = split_loss(out, f"ft.unroll, batch {index}")
        for part, optimizer, names, steps in work:
            grads = torch.autograd.grad(loss, [params[part][n] for n in names],
                                        create_graph=True, retain_graph=True,
                                        allow_unused=True)
            mine = opt_state[part] if state.multi else opt_state
            new_params, new_opt = differentiable.update(
                optimizer, params[part], dict(zip(names, grads)), mine,
                _lr_for(lr, part, names), steps)
            params[part] = new_params
            if state.multi:
                opt_state[part] = new_opt
            else:
                opt_state = new_opt
        number += 1
    return state.replace(params=params if state.multi else params[None],
                         buffers=buffers if state.multi else buffers[None],
                         opt_state=opt_state, step=number)
