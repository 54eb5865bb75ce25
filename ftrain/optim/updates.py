"""The one implementation of each update: Adam/AdamW, SGD and gradient-norm clipping.

Each is a function over lists of tensors (parameters, gradients, state) that works in
place. A hyperparameter (`lr`, `betas`, `eps`, `weight_decay`, `momentum`, `max_norm`)
is a Python number or a tensor: 0-d (a schedule's value, a value captured in a graph),
or `[N]`, one value per member of a population whose tensors lead with the member
dimension N. Every caller uses these functions: the eager optimizer (`Optimizer.update`),
the compiled step (`Optimizer.update_capturable`) and the population step.

Two ways through each function, one algorithm:

- the *fast path*, eager with number hyperparameters: torch's own kernels
  (`torch.optim.adam.adam`, `torch.optim.sgd.sgd`, fused or foreach or single-tensor, as
  asked), so the numbers are bitwise torch.optim's;
- the *tensor path*, for tensor hyperparameters and for capture (`capturable=True`:
  `torch.compile(fullgraph=True)`, CUDA graphs): the same math as batched foreach tensor
  ops, with no host read, a skipped update (`found_inf`) applied with `torch.where`.
  Eager, with per-member learning rates and weight decays only, Adam still runs torch's
  fused kernel where the device has one (for the step at lr = 1, scaled per member).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

from ftrain.errors import ConfigError
from ftrain.optim._core import fused_devices

Hyper = float | torch.Tensor
TensorList = list[torch.Tensor]


class Factors:
    """Hyperparameters broadcast against each tensor of a list: a number stays a number; a
    0-d tensor is cast to the tensor's dtype; an `[N]` tensor becomes an `[N, 1, ...]`
    view in its dtype. Each tensor factor is appended to `keep` (when given): a compiled
    population step returns them from its graph, so each is computed once rather than
    inlined into every element's update."""

    def __init__(self, keep: list[torch.Tensor] | None = None) -> None:
        self.keep = keep

    def one(self, x: Any, like: torch.Tensor) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        x = x.to(like.dtype)
        return x if x.dim() == 0 else x.view(-1, *([1] * (like.dim() - 1)))

    def __call__(self, x: Any, like: Sequence[torch.Tensor]) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if self.keep is not None:
            self.keep.append(x)
        cache: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        out = []
        for p in like:
            key = (p.dim(), p.dtype)
            v = cache.get(key)
            if v is None:
                v = cache[key] = self.one(x, p)
            out.append(v)
        return out

    def each(self, xs: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> TensorList:
        """One factor per tensor (e.g. each parameter's bias correction)."""
        if self.keep is not None:
            self.keep.extend(xs)
        return [self.one(x, p) for x, p in zip(xs, like)]


def _is_number(*xs: Any) -> bool:
    return not any(isinstance(x, torch.Tensor) for x in xs)


def _fast(capturable: bool) -> bool:
    return not capturable and not torch.compiler.is_compiling()


def _host_skip(found_inf: torch.Tensor | None) -> bool:
    """Whether to skip an update decided on the host (kernels without a found_inf input)."""
    return found_inf is not None and bool(found_inf.item())


def _fused_fits(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused kernel can run on these tensors (eager, its device, dense)."""
    return bool(tensors) and tensors[0].device.type in fused_devices() and all(
        t.is_floating_point() and t.device == tensors[0].device and t.is_contiguous()
        for t in tensors)


class _Skip:
    """Run in-place math on copies and keep the originals where `skip` is set: a skipped
    update as tensor ops (no host read), the same math either way."""

    def __init__(self, found_inf: torch.Tensor | None, *lists: Sequence[torch.Tensor]) -> None:
        self.skip = None if found_inf is None else found_inf > 0
        self.originals = lists
        self.work = [list(ts) if self.skip is None else [t.clone() for t in ts]
                     for ts in lists]

    def write(self) -> None:
        if self.skip is None:
            return
        for dsts, news in zip(self.originals, self.work):
            for dst, new in zip(dsts, news):
                dst.copy_(torch.where(self.skip, dst, new))


def adam_update(params: TensorList, grads: TensorList, exp_avgs: TensorList,
                exp_avg_sqs: TensorList, max_exp_avg_sqs: TensorList, steps: TensorList, *,
                lr: Hyper, beta1: Hyper, beta2: Hyper, eps: Hyper, weight_decay: Hyper,
                decoupled: bool, amsgrad: bool, fused: bool = False, foreach: bool = False,
                capturable: bool = False, found_inf: torch.Tensor | None = None,
                shared_step: torch.Tensor | None = None,
                keep: list[torch.Tensor] | None = None, maximize: bool = False) -> None:
    """One Adam (`decoupled=False`) or AdamW step, in place: torch's Adam math.

    `steps` are each parameter's update counts (torch's float32 `step`: 0-d, or `[N]` for
    per-member state) and advance by one. Number hyperparameters, eager, run torch's
    kernel (`fused`, `foreach`, or the single-tensor one when both are False); anything
    else runs the same math as tensor ops. `found_inf` (0-d, nonzero: skip) leaves every
    tensor as it was. `shared_step` (0-d), where the caller knows that every entry of
    `steps` reaches that value with this update, lets per-member state use the fused
    kernel and computes the bias corrections once. `maximize` ascends (as torch: the
    gradient is negated before anything else).

    Examples:
        >>> import torch
        >>> from ftrain.optim.updates import adam_update
        >>> p, g = torch.ones(2), torch.full((2,), 0.5)
        >>> m, v, step = torch.zeros(2), torch.zeros(2), torch.zeros(())
        >>> adam_update([p], [g], [m], [v], [], [step], lr=0.1, beta1=0.9, beta2=0.999,
        ...             eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False)
        >>> [round(x, 4) for x in p.tolist()], float(step)
        ([0.9, 0.9], 1.0)
    """
    if not params:
        return
    hypers = (beta1, beta2, eps, weight_decay)
    scalar_steps = all(s.dim() == 0 for s in steps)
    if _fast(capturable) and _is_number(*hypers) and scalar_steps and (
            not isinstance(lr, torch.Tensor) or lr.dim() == 0):
        if not fused:
            if _host_skip(found_inf):
                return
            if isinstance(lr, torch.Tensor):  # torch's other kernels compute in lr's dtype
                lr = float(lr)
        else:  # the fused kernels walk memory linearly (a vmapped backward gives strides)
            grads = [g.contiguous() for g in grads]
        _torch_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    foreach=foreach, fused=fused, capturable=False, differentiable=False,
                    grad_scale=None, found_inf=found_inf if fused else None,
                    has_complex=False, decoupled_weight_decay=decoupled, amsgrad=amsgrad,
                    beta1=beta1, beta2=beta2, lr=lr,  # type: ignore[arg-type]
                    weight_decay=weight_decay, eps=eps,  # type: ignore[arg-type]
                    maximize=maximize)
        return
    if maximize:  # torch negates the gradient first: the rest is plain descent
        grads = list(torch._foreach_neg(grads))
    f = Factors(keep)
    if _fast(capturable) and found_inf is None and _is_number(beta1, beta2, eps) and \
            (scalar_steps or shared_step is not None) and \
            _fused_fits([*params, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs]):
        _fused_scaled(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, f,
                      lr=lr, beta1=beta1, beta2=beta2, eps=eps,  # type: ignore[arg-type]
                      weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                      shared_step=shared_step)
        return
    work = _Skip(found_inf, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    ps, ms, vs, vmaxs, ss = work.work
    torch._foreach_add_(ss, 1.0)
    gs: Any = _add_weight_decay(ps, grads, f, lr, weight_decay, decoupled)
    torch._foreach_lerp_(ms, gs, f(1 - beta1, ps))
    if isinstance(beta2, torch.Tensor):
        torch._foreach_mul_(vs, f(beta2, ps))
        sq = torch._foreach_mul(gs, gs)
        torch._foreach_mul_(sq, f(1 - beta2, ps))
        torch._foreach_add_(vs, sq)
    else:
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(vmaxs, vs)
        vs = vmaxs
    if shared_step is not None:
        t = shared_step.to(torch.float64)
        step_size = f(lr / (1 - torch.pow(beta1, t)), ps)
        bc2_sqrt = f((1 - torch.pow(beta2, t)).sqrt(), ps)
    else:
        ts = [s.to(torch.float64) for s in ss]
        step_size = f.each([lr / (1 - torch.pow(beta1, t)) for t in ts], ps)
        bc2_sqrt = f.each([(1 - torch.pow(beta2, t)).sqrt() for t in ts], ps)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, f(eps, ps))
    scaled = torch._foreach_div(ms, denom)
    torch._foreach_mul_(scaled, step_size)
    torch._foreach_sub_(ps, scaled)
    work.write()


def _add_weight_decay(ps: TensorList, gs: Any, f: Factors, lr: Hyper, wd: Hyper,
                      decoupled: bool) -> Any:
    """Decoupled decay shrinks the params in place; L2 decay returns `g + wd * p`."""
    if not isinstance(wd, torch.Tensor) and wd == 0:
        return gs
    if decoupled:
        torch._foreach_mul_(ps, f(1 - lr * wd, ps))
        return gs
    if isinstance(wd, torch.Tensor):
        return torch._foreach_add(gs, torch._foreach_mul(ps, f(wd, ps)))
    return torch._foreach_add(gs, ps, alpha=wd)


def _fused_scaled(params: TensorList, grads: Sequence[torch.Tensor], exp_avgs: TensorList,
                  exp_avg_sqs: TensorList, max_exp_avg_sqs: TensorList, steps: TensorList,
                  f: Factors, *, lr: Hyper, beta1: float, beta2: float, eps: float,
                  weight_decay: Hyper, decoupled: bool, amsgrad: bool,
                  shared_step: torch.Tensor | None) -> None:
    """torch's fused Adam kernel with tensor learning rates or weight decays: the decay is
    applied first, the kernel makes the step for lr = 1 and each rate scales it."""
    torch._foreach_add_(steps, 1.0)
    kernel_steps = steps if shared_step is None else \
        [shared_step.to(torch.float32)] * len(params)
    gs = [g.contiguous() for g in grads]  # a vmapped backward may give strided gradients
    if _is_number(lr, weight_decay):
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        kernel(params, gs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kernel_steps,
                           amsgrad=amsgrad, lr=float(lr), beta1=beta1, beta2=beta2,
                           weight_decay=float(weight_decay), eps=eps, maximize=False)
        return
    gs = list(_add_weight_decay(params, gs, f, lr, weight_decay, decoupled))
    per_rate = isinstance(lr, torch.Tensor)
    out = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params] \
        if per_rate else params
    torch._fused_adam_(out, gs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, kernel_steps,
                       amsgrad=amsgrad, lr=1.0 if per_rate else float(lr), beta1=beta1,
                       beta2=beta2, weight_decay=0.0, eps=eps, maximize=False)
    if per_rate:
        torch._foreach_addcmul_(params, out, f(lr, params))


def sgd_update(params: TensorList, grads: TensorList,
               momentum_buffers: Sequence[torch.Tensor | None], *, lr: Hyper,
               momentum: Hyper, weight_decay: Hyper, nesterov: bool, fused: bool = False,
               foreach: bool = False, capturable: bool = False,
               found_inf: torch.Tensor | None = None,
               keep: list[torch.Tensor] | None = None, dampening: float = 0.0,
               maximize: bool = False) -> None:
    """One SGD step with (Nesterov) momentum and L2 weight decay, in place: torch's SGD.

    `momentum_buffers` holds a buffer per parameter (None without momentum: torch's
    kernels then make one, which is not kept). Hyperparameters and paths are as in
    `adam_update`; a per-member momentum of 0 is plain SGD for that member. `dampening`
    and `maximize` are torch's (dampening on torch's eager kernels only: a buffer given as
    None starts as the gradient, torch's first step).

    Examples:
        >>> import torch
        >>> from ftrain.optim.updates import sgd_update
        >>> p, buf = torch.ones(2), torch.zeros(2)
        >>> sgd_update([p], [torch.full((2,), 2.0)], [buf], lr=0.1, momentum=0.9,
        ...            weight_decay=0.0, nesterov=False)
        >>> [round(x, 4) for x in p.tolist()], buf.tolist()
        ([0.8, 0.8], [2.0, 2.0])
    """
    if not params:
        return
    if _fast(capturable) and _is_number(momentum, weight_decay) and (
            not isinstance(lr, torch.Tensor) or lr.dim() == 0):
        if not fused:
            if _host_skip(found_inf):
                return
            if isinstance(lr, torch.Tensor):
                lr = float(lr)
        else:
            grads = [g.contiguous() for g in grads]
        # a list given is filled in by torch where it holds None (torch's first step)
        bufs_in = momentum_buffers if isinstance(momentum_buffers, list) \
            else list(momentum_buffers)
        _torch_sgd(params, grads, bufs_in,  # type: ignore[arg-type]
                   foreach=foreach, fused=fused, grad_scale=None,
                   found_inf=found_inf if fused else None,
                   weight_decay=weight_decay,  # type: ignore[arg-type]
                   momentum=momentum, lr=lr, dampening=dampening,  # type: ignore[arg-type]
                   nesterov=nesterov, maximize=maximize)
        return
    if dampening != 0 and (isinstance(momentum, torch.Tensor) or momentum != 0):
        raise ConfigError("sgd: dampening runs on torch's eager kernels only (torch's first "
                          "step copies the gradient into the buffer, decided on the host); "
                          "not with tensor settings (populations) or inside ft.compile")
    if maximize:  # torch negates the gradient first: the rest is plain descent
        grads = list(torch._foreach_neg(grads))
    f = Factors(keep)
    use_bufs = all(b is not None for b in momentum_buffers) and (
        isinstance(momentum, torch.Tensor) or momentum != 0)
    bufs = [b for b in momentum_buffers if b is not None] if use_bufs else []
    work = _Skip(found_inf, params, bufs)
    ps, bs = work.work
    gs: Any = _add_weight_decay(ps, grads, f, lr, weight_decay, decoupled=False)
    if use_bufs:
        mom = f(momentum, ps)
        torch._foreach_mul_(bs, mom)
        torch._foreach_add_(bs, gs)
        gs = torch._foreach_add(gs, torch._foreach_mul(bs, mom)) if nesterov else bs
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(ps, torch._foreach_mul(gs, f(lr, ps)))
    else:
        torch._foreach_add_(ps, gs, alpha=-lr)
    work.write()


def clip_grad_norm_update(grads: TensorList, max_norm: Hyper, norm_type: float = 2.0, *,
                          members: bool = False,
                          keep: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Scale `grads` in place so their global norm is at most `max_norm`; return the norm.

    torch's `clip_grad_norm_` math (`coef = min(1, max_norm / (norm + 1e-6))`, no host
    read). `members=True`: the tensors lead with the member dimension and each member's
    gradients are clipped by their own norm (the result is then `[N]`).

    Examples:
        >>> import torch
        >>> from ftrain.optim.updates import clip_grad_norm_update
        >>> g = torch.full((4,), 1.0)
        >>> float(clip_grad_norm_update([g], 1.0)), [round(x, 4) for x in g.tolist()]
        (2.0, [0.5, 0.5, 0.5, 0.5])
    """
    if not grads:
        return torch.zeros(())
    if members:
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), norm_type,
                                                      dim=1) for g in grads])
        total = torch.linalg.vector_norm(norms, norm_type, dim=0)
    else:
        total = torch.nn.utils.get_total_norm(grads, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, Factors(keep)(coef, grads) if members else coef)
    return total


def clip_grad_value_update(grads: TensorList, clip_value: float) -> None:
    """Clamp every gradient element to `[-clip_value, clip_value]` in place (torch's
    `clip_grad_value_`: the same foreach clamps, no host read).

    Examples:
        >>> import torch
        >>> from ftrain.optim.updates import clip_grad_value_update
        >>> g = torch.tensor([-3.0, 0.5, 2.0])
        >>> clip_grad_value_update([g], 1.0)
        >>> g.tolist()
        [-1.0, 0.5, 1.0]
    """
    if not grads:
        return
    torch._foreach_clamp_min_(grads, -clip_value)
    torch._foreach_clamp_max_(grads, clip_value)
