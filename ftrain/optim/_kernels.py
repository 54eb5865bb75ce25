"""SGD, Adam and AdamW as transforms over torch's own optimizer kernels.

The math is torch's (`torch.optim.adam.adam`, `torch.optim.sgd.sgd` with foreach or fused
implementations); ftrain only keeps the state in a plain dict and the update count on the
device. State layout mirrors `torch.optim` (per-parameter `step`, `exp_avg`, ...), so the
numbers match the torch optimizers exactly when the same implementation is chosen.

Each transform also has `apply_capturable`, the same math as device tensor ops on
explicitly given gradients, with no host sync or value-dependent Python branch, for
whole-step capture (`ft.compile`, CUDA graphs); see `Optimizer.update_capturable`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch
from torch.optim.adam import adam as _adam_kernel
from torch.optim.sgd import sgd as _sgd_kernel

from ftrain.errors import ConfigError
from ftrain.optim._core import (
    LR,
    Groups,
    Optimizer,
    Pattern,
    Tensors,
    check_lr,
    choose_impl,
    resolve_lr,
    write,
)


def _with_grads(params: Tensors, names: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    keep = [n for n in names if params[n].grad is not None]
    return keep, [params[n] for n in keep]


def _skip_on_host(found_inf: torch.Tensor | None, fused: bool) -> bool:
    # Only the fused kernels take found_inf; elsewhere decide on the host (sync here).
    return found_inf is not None and not fused and bool(found_inf.item())


def _groups_to_update(transform: Any, params: Tensors, names: Any, count: torch.Tensor,
                      found_inf: torch.Tensor | None) -> Iterator[tuple[Any, ...]]:
    """Per parameter group with gradients: (names, params, fused, foreach, settings, lr)."""
    for gi, group in transform.groups.split(names).items():
        group, ps = _with_grads(params, group)
        if not ps:
            continue
        fused, foreach = choose_impl(ps, transform.fused, transform.foreach)
        if _skip_on_host(found_inf, fused):
            continue
        opts = transform.groups.settings(gi)
        yield group, ps, fused, foreach, opts, resolve_lr(opts["lr"], count)


def _capture_groups(groups: Groups, params: Tensors, grads: Tensors, count: torch.Tensor
                    ) -> Iterator[tuple[list[str], dict[str, Any], Any]]:
    """Per parameter group with gradients: (names, settings, lr at `count`), for capture."""
    for gi, names in groups.split([n for n in params if n in grads]).items():
        opts = groups.settings(gi)
        yield names, opts, resolve_lr(opts["lr"], count)


@attrs.frozen(eq=False)
class _Adam:
    groups: Groups
    decoupled: bool
    amsgrad: bool
    fused: bool | None
    foreach: bool | None
    name: str

    def init(self, params: Tensors) -> dict[str, Any]:
        self.groups.check(params)
        fused, _ = choose_impl(list(params.values()), self.fused, self.foreach)

        def zeros(p: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(p, memory_format=torch.preserve_format)

        # torch keeps `step` as a float32 scalar (on the param's device for fused kernels)
        state: dict[str, Any] = {
            "step": {n: torch.zeros((), dtype=torch.float32,
                                    device=p.device if fused else "cpu")
                     for n, p in params.items()},
            "exp_avg": {n: zeros(p) for n, p in params.items()},
            "exp_avg_sq": {n: zeros(p) for n, p in params.items()},
        }
        if self.amsgrad:
            state["max_exp_avg_sq"] = {n: zeros(p) for n, p in params.items()}
        return state

    def apply(self, params: Tensors, state: dict[str, Any], count: torch.Tensor,
              found_inf: torch.Tensor | None) -> None:
        for names, ps, fused, foreach, opts, lr in _groups_to_update(
                self, params, state["step"], count, found_inf):
            if isinstance(lr, torch.Tensor) and foreach:
                lr = float(lr)  # torch's foreach kernel takes no tensor lr (host sync here)
            beta1, beta2 = opts["betas"]
            _adam_kernel(
                ps, [p.grad for p in ps],  # type: ignore[misc]
                [state["exp_avg"][n] for n in names], [state["exp_avg_sq"][n] for n in names],
                [state["max_exp_avg_sq"][n] for n in names] if self.amsgrad else [],
                [state["step"][n] for n in names],
                foreach=foreach, fused=fused, capturable=False, differentiable=False,
                grad_scale=None, found_inf=found_inf if fused else None, has_complex=False,
                decoupled_weight_decay=self.decoupled, amsgrad=self.amsgrad,
                beta1=beta1, beta2=beta2, lr=lr, weight_decay=opts["weight_decay"],
                eps=opts["eps"], maximize=False)

    def apply_capturable(self, params: Tensors, grads: Tensors, state: dict[str, Any],
                         count: torch.Tensor, found_inf: torch.Tensor | None) -> Tensors:
        """The update of `apply` (torch's Adam math) as device tensor ops: for capture."""
        skip = None if found_inf is None else found_inf > 0
        with torch.no_grad():
            for names, opts, lr in _capture_groups(self.groups, params, grads, count):
                beta1, beta2 = opts["betas"]
                wd, eps = opts["weight_decay"], opts["eps"]
                for n in names:
                    p, g = params[n], grads[n]
                    step_t = state["step"][n]
                    step = step_t + 1
                    new_p = p
                    if wd != 0:
                        if self.decoupled:
                            new_p = p * (1 - lr * wd)
                        else:
                            g = g.add(p, alpha=wd)
                    exp_avg = state["exp_avg"][n].lerp(g, 1 - beta1)
                    exp_avg_sq = state["exp_avg_sq"][n].mul(beta2).addcmul(
                        g, g, value=1 - beta2)
                    s64 = step.to(torch.float64)
                    step_size = lr / (1 - torch.pow(beta1, s64))
                    bc2_sqrt = (1 - torch.pow(beta2, s64)).sqrt()
                    if self.amsgrad:
                        biggest = torch.maximum(state["max_exp_avg_sq"][n], exp_avg_sq)
                        write(state["max_exp_avg_sq"][n], biggest, skip)
                        denom = biggest.sqrt() / bc2_sqrt + eps
                    else:
                        denom = exp_avg_sq.sqrt() / bc2_sqrt + eps
                    new_p = new_p - (exp_avg / denom) * step_size
                    write(p, new_p.to(p.dtype), skip)
                    write(state["exp_avg"][n], exp_avg, skip)
                    write(state["exp_avg_sq"][n], exp_avg_sq, skip)
                    write(step_t, step, skip)
        return grads

    def current_lrs(self, count: torch.Tensor) -> dict[str | None, Any]:
        return _current_lrs(self.groups, count)


@attrs.frozen(eq=False)
class _SGD:
    groups: Groups
    fused: bool | None
    foreach: bool | None
    name: str = "sgd"

    def init(self, params: Tensors) -> dict[str, Any]:
        self.groups.check(params)
        momentum = any(self.groups.settings(i)["momentum"] for i in
                       range(len(self.groups.overrides) + 1))
        # Zero buffers give torch's first step exactly (buf = 0 * m + g) and keep the
        # state's structure fixed from the start (strict checkpoints, compilation).
        return {"momentum_buffer": {n: torch.zeros_like(p) for n, p in params.items()}
                if momentum else {}, "names": sorted(params)}

    def apply(self, params: Tensors, state: dict[str, Any], count: torch.Tensor,
              found_inf: torch.Tensor | None) -> None:
        for names, ps, fused, foreach, opts, lr in _groups_to_update(
                self, params, state["names"], count, found_inf):
            bufs = ([state["momentum_buffer"][n] for n in names] if opts["momentum"]
                    else [None] * len(names))
            _sgd_kernel(
                ps, [p.grad for p in ps], bufs,  # type: ignore[misc]
                foreach=foreach, fused=fused, grad_scale=None,
                found_inf=found_inf if fused else None,
                weight_decay=opts["weight_decay"], momentum=opts["momentum"], lr=lr,
                dampening=0.0, nesterov=opts["nesterov"], maximize=False)

    def apply_capturable(self, params: Tensors, grads: Tensors, state: dict[str, Any],
                         count: torch.Tensor, found_inf: torch.Tensor | None) -> Tensors:
        """The update of `apply` (torch's SGD math) as device tensor ops: for capture."""
        skip = None if found_inf is None else found_inf > 0
        with torch.no_grad():
            for names, opts, lr in _capture_groups(self.groups, params, grads, count):
                momentum, wd = opts["momentum"], opts["weight_decay"]
                for n in names:
                    p, g = params[n], grads[n]
                    if wd != 0:
                        g = g.add(p, alpha=wd)
                    if momentum:
                        buf = state["momentum_buffer"][n]
                        new_buf = buf.mul(momentum).add(g)
                        write(buf, new_buf, skip)
                        g = g.add(new_buf, alpha=momentum) if opts["nesterov"] else new_buf
                    write(p, (p - g * lr).to(p.dtype), skip)
        return grads

    def current_lrs(self, count: torch.Tensor) -> dict[str | None, Any]:
        return _current_lrs(self.groups, count)


def _current_lrs(groups: Groups, count: torch.Tensor) -> dict[str | None, Any]:
    return {groups.label(i): resolve_lr(groups.settings(i)["lr"], count)
            for i in range(len(groups.overrides) + 1)}


def _check_betas(betas: Any, eps: float, weight_decay: float, what: str) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"{what}: betas must be two floats in [0, 1), got {betas!r}")
    if eps < 0 or weight_decay < 0:
        raise ConfigError(f"{what}: eps and weight_decay must be >= 0, got eps={eps}, "
                          f"weight_decay={weight_decay}")


def _each_group(name: str, base: dict[str, Any], groups: Any
                ) -> list[tuple[str, dict[str, Any]]]:
    """The base settings and each group's merged settings, to validate them alike."""
    out = [(name, base)]
    for pattern, opts in (groups or {}).items():
        if not isinstance(opts, Mapping):
            raise ConfigError(f"{name}: group {pattern!r} must map setting names to values, "
                              f"got {type(opts).__name__}")
        out.append((f"{name} group {pattern!r}", {**base, **opts}))
    return out


def _adam_like(name: str, decoupled: bool, lr: LR, betas: tuple[float, float], eps: float,
               weight_decay: float, amsgrad: bool, groups: Any, fused: bool | None,
               foreach: bool | None) -> Optimizer:
    base = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    for where, opts in _each_group(name, base, groups):
        check_lr(opts["lr"], where)
        _check_betas(opts["betas"], opts["eps"], opts["weight_decay"], where)
    return Optimizer((_Adam(Groups.build(base, groups), decoupled, amsgrad, fused, foreach,
                            name),))


def adam(lr: LR, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, *, amsgrad: bool = False,
         groups: Mapping[Pattern, Mapping[str, Any]] | None = None,
         fused: bool | None = None, foreach: bool | None = None) -> Optimizer:
    """Adam (L2 weight decay added to the gradient), on torch's Adam kernels.

    `lr` is a float or a schedule. `groups` maps name patterns to setting overrides.
    By default the fused kernel is used where the device has one, else foreach.

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.adam(ft.optim.schedules.cosine_decay(1e-3, 1000))
        >>> sorted(opt.init({}))
        ['adam', 'count']
    """
    return _adam_like("adam", False, lr, betas, eps, weight_decay, amsgrad, groups, fused,
                      foreach)


def adamw(lr: LR, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2, *, amsgrad: bool = False,
          groups: Mapping[Pattern, Mapping[str, Any]] | None = None,
          fused: bool | None = None, foreach: bool | None = None) -> Optimizer:
    """AdamW (decoupled weight decay), on torch's Adam kernels.

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.adamw(1e-3, groups={"*.bias": {"weight_decay": 0.0}})
    """
    return _adam_like("adamw", True, lr, betas, eps, weight_decay, amsgrad, groups, fused,
                      foreach)


def sgd(lr: LR, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, *,
        groups: Mapping[Pattern, Mapping[str, Any]] | None = None,
        fused: bool | None = None, foreach: bool | None = None) -> Optimizer:
    """SGD with optional (Nesterov) momentum and L2 weight decay, on torch's SGD kernels.

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.sgd(0.1, momentum=0.9, nesterov=True)
    """
    base = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
    for where, opts in _each_group("sgd", base, groups):
        check_lr(opts["lr"], where)
        if opts["momentum"] < 0 or opts["weight_decay"] < 0:
            raise ConfigError(f"{where}: momentum and weight_decay must be >= 0, got "
                              f"momentum={opts['momentum']}, "
                              f"weight_decay={opts['weight_decay']}")
        if opts["nesterov"] and opts["momentum"] <= 0:
            raise ConfigError(f"{where}: nesterov=True needs momentum > 0")
    return Optimizer((_SGD(Groups.build(base, groups), fused, foreach),))


@attrs.frozen(eq=False)
class _ClipGradNorm:
    max_norm: float
    norm_type: float
    name: str = "clip_grad_norm"

    def init(self, params: Tensors) -> dict[str, Any]:
        return {}

    def apply(self, params: Tensors, state: dict[str, Any], count: torch.Tensor,
              found_inf: torch.Tensor | None) -> None:
        with_grad = [p for p in params.values() if p.grad is not None]
        if with_grad:  # torch's clip: norm and scale on the device, no host sync
            torch.nn.utils.clip_grad_norm_(with_grad, self.max_norm, self.norm_type)

    def apply_capturable(self, params: Tensors, grads: Tensors, state: dict[str, Any],
                         count: torch.Tensor, found_inf: torch.Tensor | None) -> Tensors:
        """torch's clip_grad_norm_ math on explicit gradients (returned scaled): for capture."""
        names = [n for n in params if n in grads]
        if not names:
            return grads
        with torch.no_grad():
            total = torch.nn.utils.get_total_norm([grads[n] for n in names], self.norm_type)
            coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
            return {**grads, **{n: grads[n] * coef.to(grads[n].dtype) for n in names}}


def clip_grad_norm(max_norm: float, norm_type: float = 2.0) -> _ClipGradNorm:
    """Scale gradients so their global norm is at most `max_norm` (torch's clip_grad_norm_).

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.sgd(0.1))
    """
    if not max_norm > 0:
        raise ConfigError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    return _ClipGradNorm(float(max_norm), float(norm_type))
