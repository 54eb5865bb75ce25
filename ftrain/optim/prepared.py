"""A loop's eager update, prepared once per run: the same kernels, none of the plumbing.

The general eager update (`Optimizer.update` -> each transform's `apply` ->
`apply_gradients` -> `adam_update` -> `torch.optim.adam.adam` -> torch's fused wrapper)
rebuilds per step what never changes in a loop: the split into parameter groups, each
group's settings, the kernel choice, the tensor lists, and torch's own grouping by device
and dtype. On a tiny model that plumbing costs several times the kernel itself (~100 us
against ~20 us per step on the development CPU). A loop updates the same tensors with
the same optimizer every step, so it prepares the update once (`Optimizer.prepare`) and
each step reads the gradients and calls torch's fused kernels directly, with the
arguments torch's fused path gives them: bitwise torch.optim's numbers.

Each function here prepares one transform (its `prepare` method calls it) and returns a
`Run`, or None where it cannot: Adam/AdamW and SGD when the fused kernel is chosen and
each group's tensors share one device and dtype; gradient clipping. Anything else
(foreach or single-tensor kernels, tensor settings) leaves the loop on the general update.
A prepared update (`ftrain.optim._core.Prepared`) is tied to the dicts it was prepared
from, which the loop checks each step by identity: states are values, ftrain never
reassigns a tensor inside one, and a changed state (`state.replace(opt_state=...)`) is
prepared again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ftrain.optim._core import Run, choose_impl, fused_devices, resolve_lr
from ftrain.optim.updates import clip_grad_norm_update


def _homogeneous(tensors: list[torch.Tensor]) -> bool:
    """One device, one floating dtype, dense and contiguous: one fused kernel call."""
    if not tensors:
        return False
    first = tensors[0]
    return all(t.device == first.device and t.dtype == first.dtype and
               t.is_floating_point() and t.is_contiguous() and t.layout == torch.strided
               for t in tensors)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shards of DTensors (views: updated in place), plain tensors as they are."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def _lr(setting: Any) -> Callable[[torch.Tensor], Any]:
    """The learning rate per update: a number once, a schedule at each count (as the
    general path's `resolve_lr`)."""
    if callable(setting):
        return lambda count: resolve_lr(setting, count)
    value = setting
    return lambda count: value


def _fused_groups(t: Any, names: list[str], params: list[torch.Tensor]
                  ) -> list[tuple[list[int], list[str], list[torch.Tensor], dict[str, Any]]] | None:
    """Per parameter group of `t`: (positions in `names`, names, params, settings), or
    None where some group would not run torch's fused kernel."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for gi, group in t.groups.split(names).items():
        ps = [params[index[n]] for n in group]
        fused, _ = choose_impl(ps, t.fused, t.foreach)
        if not fused or ps[0].device.type not in fused_devices():
            return None
        out.append(([index[n] for n in group], group, ps, t.groups.settings(gi)))
    return out


def prepare_adam(t: Any, names: list[str], params: list[torch.Tensor],
                 state: dict[str, Any]) -> Run | None:
    """Adam/AdamW on torch's fused kernel, one call per parameter group."""
    groups = _fused_groups(t, names, params)
    if groups is None:
        return None
    calls = []
    for at, group, ps, opts in groups:
        if any(isinstance(v, torch.Tensor) for k, v in opts.items() if k != "lr"):
            return None
        ms = [state["exp_avg"][n] for n in group]
        vs = [state["exp_avg_sq"][n] for n in group]
        vmax = [state["max_exp_avg_sq"][n] for n in group] if t.amsgrad else []
        steps = [state["step"][n] for n in group]
        if not _homogeneous(ps + ms + vs + vmax) or any(
                s.dim() != 0 or s.device != ps[0].device for s in steps):
            return None
        beta1, beta2 = opts["betas"]
        calls.append((at, ps, ms, vs, vmax, steps, _lr(opts["lr"]),
                      dict(amsgrad=t.amsgrad, beta1=beta1, beta2=beta2,
                           weight_decay=opts["weight_decay"], eps=opts["eps"],
                           maximize=t.maximize)))
    kernel = torch._fused_adamw_ if t.decoupled else torch._fused_adam_

    def run(grads: list[torch.Tensor], count: torch.Tensor,
            found_inf: torch.Tensor | None) -> None:
        for at, ps, ms, vs, vmax, steps, lr, kw in calls:
            # the fused kernels walk memory linearly (as the general path: contiguous)
            gs = [grads[i].contiguous() for i in at]
            torch._foreach_add_(steps, 1)
            kernel(ps, gs, ms, vs, vmax, steps, lr=lr(count), grad_scale=None,
                   found_inf=found_inf, **kw)
            if found_inf is not None:  # a skipped update does not count (torch's order)
                torch._foreach_sub_(steps, [found_inf] * len(steps))
    return run


def prepare_sgd(t: Any, names: list[str], params: list[torch.Tensor],
                state: dict[str, Any]) -> Run | None:
    """SGD on torch's fused kernel, one call per parameter group."""
    groups = _fused_groups(t, names, params)
    if groups is None:
        return None
    if t.dampening != 0:
        return None  # its first step is special: the general update does it
    calls = []
    bufs = state["momentum_buffer"]
    for at, group, ps, opts in groups:
        mom = opts["momentum"]
        if isinstance(mom, torch.Tensor) or isinstance(opts["weight_decay"], torch.Tensor):
            return None
        if mom != 0 and not all(n in bufs for n in group):
            return None  # torch would make throw-away buffers: the general path does
        bs = [bufs[n] for n in group] if mom != 0 else []
        if not _homogeneous(ps + bs):
            return None
        calls.append((at, ps, bs, _lr(opts["lr"]),
                      dict(weight_decay=opts["weight_decay"], momentum=mom, dampening=0.0,
                           nesterov=opts["nesterov"], maximize=t.maximize,
                           is_first_step=False)))

    def run(grads: list[torch.Tensor], count: torch.Tensor,
            found_inf: torch.Tensor | None) -> None:
        for at, ps, bs, lr, kw in calls:
            gs = [grads[i].contiguous() for i in at]
            # with_fsdp: DTensor has no sharding rule for fused SGD; its local shards do
            torch._fused_sgd_(_local(ps), _local(gs), _local(bs), lr=lr(count),
                              grad_scale=None, found_inf=found_inf, **kw)
    return run


def prepare_clip(t: Any, names: list[str], params: list[torch.Tensor],
                 state: dict[str, Any]) -> Run:
    """Global-norm clipping over every gradient (the general path's function)."""
    def run(grads: list[torch.Tensor], count: torch.Tensor,
            found_inf: torch.Tensor | None) -> None:
        clip_grad_norm_update(grads, t.max_norm, t.norm_type)
    return run
