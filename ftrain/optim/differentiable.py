"""Differentiable forms of ftrain's optimizers, for `ft.unroll`.

The loop's kernels (torch's fused and foreach ones) update parameters in place, outside
autograd. Here each update is written out of place from the same formulas (torch's
`_single_tensor_sgd` / `_single_tensor_adam`, `clip_grad_norm_`), so a chain of steps is
one autograd graph: a loss on the result differentiates with respect to the initial
parameters and to learning rates given as tensors. Supported: `sgd` (momentum,
nesterov, weight decay, maximize), `adam` / `adamw` (amsgrad too) and `clip_grad_norm`;
any other transform is refused, naming it (a `ConfigError`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ftrain.errors import ConfigError
from ftrain.optim._core import Optimizer
from ftrain.optim._kernels import _SGD, _Adam, _ClipGradNorm, _group_settings

Tensors = dict[str, torch.Tensor]
LRs = torch.Tensor | Mapping[str, torch.Tensor] | None
Ts = tuple[torch.Tensor, ...] | list[torch.Tensor]  # what torch's foreach ops take and give


def check(optimizer: Any) -> None:
    """Refuse an optimizer with a transform that has no differentiable form here."""
    if not isinstance(optimizer, Optimizer):
        raise ConfigError(f"ft.unroll differentiates ftrain's own optimizers (ft.optim.sgd, "
                          f"adam, adamw, clip_grad_norm), got {type(optimizer).__name__}")
    for t in optimizer.transforms:
        if not isinstance(t, (_SGD, _Adam, _ClipGradNorm)):
            raise ConfigError(f"ft.unroll: the optimizer's {t.name!r} transform has no "
                              "differentiable form; ft.optim.sgd, adam, adamw and "
                              "clip_grad_norm have")
        if isinstance(t, _SGD) and t.dampening != 0:
            raise ConfigError("ft.unroll: sgd with dampening has no differentiable form "
                              "here (its first step copies the gradient); use dampening=0")


def plan(optimizer: Optimizer, names: list[str]) -> list[tuple[str, Any, list[Any]]]:
    """(state key, transform, [(group index, names, settings or None: a schedule's, read
    each step)]) for the given trainable names: what `update` walks, worked out once."""
    out = []
    for key, t in zip(optimizer.keys, optimizer.transforms):
        groups = []
        if not isinstance(t, _ClipGradNorm):
            for gi, members in t.groups.split(names).items():
                fixed = not callable(t.groups.settings(gi)["lr"])  # else: a schedule
                opts = _group_settings(t.groups, gi, None, torch.zeros(())) if fixed else None
                groups.append((gi, members, opts))
        out.append((key, t, groups))
    return out


def update(optimizer: Optimizer, params: Tensors, grads: Tensors, opt_state: dict[str, Any],
           lr: LRs = None, steps: list[tuple[str, Any, list[Any]]] | None = None
           ) -> tuple[Tensors, dict[str, Any]]:
    """One update, out of place: the new params and optimizer state (graph tensors).
    `lr` replaces the optimizer's learning rates: one tensor for every parameter, or a
    dict from parameter name to a tensor (0-d, or shaped like the parameter: MetaSGD).
    `steps`: `plan(optimizer, names)`, when the caller updates the same names often.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.optim.differentiable import update
        >>> opt = ft.optim.sgd(0.1)
        >>> w = {"w": torch.ones(2)}
        >>> lr = torch.tensor(0.5, requires_grad=True)
        >>> new, _ = update(opt, w, {"w": torch.ones(2)}, opt.init(w), lr=lr)
        >>> new["w"].tolist(), new["w"].requires_grad
        ([0.5, 0.5], True)
    """
    count = opt_state["count"]
    new_state: dict[str, Any] = {"count": count + 1}
    params = dict(params)
    grads = {n: g for n, g in grads.items() if g is not None}
    if steps is None:
        steps = plan(optimizer, list(params))
    for key, t, groups in steps:
        state = opt_state[key]
        if isinstance(t, _ClipGradNorm):
            grads = _clip(grads, t.max_norm, t.norm_type)
            new_state[key] = state
            continue
        state = _copy(state)
        for gi, names, fixed in groups:
            opts = fixed if fixed is not None else _group_settings(t.groups, gi, None, count)
            names = [n for n in names if n in grads]
            if not names:
                continue
            ps: Ts = [params[n] for n in names]
            gs: Ts = [grads[n] for n in names]
            if t.maximize:
                gs = torch._foreach_neg(gs)
            rates = _rates(lr, names, opts["lr"], gs)
            new = _sgd(ps, gs, state, names, rates, opts) if isinstance(t, _SGD) else \
                _adam(ps, gs, state, names, rates, opts, t)
            params.update(zip(names, new))
        new_state[key] = state
    return params, new_state


def _copy(state: Any) -> Any:
    return {k: (_copy(v) if isinstance(v, dict) else v) for k, v in state.items()}


def _rates(lr: LRs, names: list[str], own: Any, like: Ts) -> Any:
    """The group's learning rate: a number (the optimizer's), or one tensor per parameter
    (given ones; torch's foreach ops differentiate list against list, not a scalar)."""
    if lr is None or (not isinstance(lr, torch.Tensor) and not any(n in lr for n in names)):
        return own
    picked = [lr if isinstance(lr, torch.Tensor) else lr.get(n, own) for n in names]
    return [r.expand_as(g) if isinstance(r, torch.Tensor) else torch.full_like(g, float(r))
            for r, g in zip(picked, like)]


def _scaled(ts: Ts, rate: Any, by: float = 1.0) -> Ts:
    """Each tensor times its learning rate (times `by`)."""
    if isinstance(rate, list):
        out = torch._foreach_mul(list(ts), rate)
        return torch._foreach_mul(out, by) if by != 1.0 else out
    return torch._foreach_mul(ts, rate * by)


def _clip(grads: Tensors, max_norm: float, norm_type: float) -> Tensors:
    if not grads:
        return grads
    total = torch.linalg.vector_norm(
        torch.stack(torch._foreach_norm(list(grads.values()), norm_type)), norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {n: g * coef for n, g in grads.items()}


def _sgd(ps: Ts, gs: Ts, state: dict[str, Any],
         names: list[str], rate: Any, opts: dict[str, Any]) -> Ts:
    wd, momentum = opts["weight_decay"], opts["momentum"]
    if wd:
        gs = torch._foreach_add(gs, ps, alpha=wd)
    bufs = state["momentum_buffer"]
    if momentum and names[0] in bufs:
        # zero buffers at the start give torch's first step (buf = g)
        new = torch._foreach_add(torch._foreach_mul([bufs[n] for n in names], momentum), gs)
        bufs.update(zip(names, new))
        gs = torch._foreach_add(gs, new, alpha=momentum) if opts["nesterov"] else new
    if not isinstance(rate, list):
        return torch._foreach_add(ps, gs, alpha=-rate)  # one op for p - lr * g
    return torch._foreach_sub(ps, _scaled(gs, rate))


def _adam(ps: Ts, gs: Ts, state: dict[str, Any],
          names: list[str], rate: Any, opts: dict[str, Any], t: _Adam) -> Ts:
    beta1, beta2 = opts["betas"]
    wd, eps = opts["weight_decay"], opts["eps"]
    if wd and t.decoupled:
        ps = torch._foreach_sub(ps, _scaled(ps, rate, wd))
    elif wd:
        gs = torch._foreach_add(gs, ps, alpha=wd)
    steps = torch._foreach_add([state["step"][n] for n in names], 1.0)
    state["step"].update(zip(names, steps))
    m = torch._foreach_add(torch._foreach_mul([state["exp_avg"][n] for n in names], beta1),
                           gs, alpha=1 - beta1)
    v = torch._foreach_addcmul(torch._foreach_mul([state["exp_avg_sq"][n] for n in names],
                                                  beta2), gs, gs, value=1 - beta2)
    state["exp_avg"].update(zip(names, m))
    state["exp_avg_sq"].update(zip(names, v))
    if t.amsgrad:
        v = torch._foreach_maximum([state["max_exp_avg_sq"][n] for n in names], v)
        state["max_exp_avg_sq"].update(zip(names, v))
    out = []
    # the bias corrections from each step count, read on the host (CPU tensors, as
    # ftrain's non-fused Adam keeps them: no device sync); equal counts go together
    counts = [float(s) for s in steps]
    for k in sorted(set(counts)):
        idx = [i for i, c in enumerate(counts) if c == k]
        bias1, bias2_sqrt = 1 - beta1 ** k, math.sqrt(1 - beta2 ** k)
        # sqrt at 0 has an infinite derivative: an entry whose gradients were all exactly
        # 0 (a dead ReLU) would give NaN meta-gradients. Clamped to the smallest normal
        # float (float32's for float16), every value stays as it was (its root is far
        # under eps)
        vk = [v[i] for i in idx]
        roots: Ts
        if vk[0].dtype == torch.float16:  # its smallest normal's root (8e-3) is not small
            roots = [r.to(torch.float16) for r in torch._foreach_sqrt(torch._foreach_clamp_min(
                [x.float() for x in vk], torch.finfo(torch.float32).tiny))]
        else:
            roots = torch._foreach_sqrt(torch._foreach_clamp_min(
                vk, torch.finfo(vk[0].dtype).tiny))
        denom = torch._foreach_add(torch._foreach_div(roots, bias2_sqrt), eps)
        step = _scaled(torch._foreach_div([m[i] for i in idx], denom),
                       [rate[i] for i in idx] if isinstance(rate, list) else rate,
                       1 / bias1)
        out.append(dict(zip(idx, torch._foreach_sub([ps[i] for i in idx], step))))
    merged = {i: x for part in out for i, x in part.items()}
    return [merged[i] for i in range(len(ps))]
