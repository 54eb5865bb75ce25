"""SGD, Adam, AdamW and gradient clipping as transforms: settings by parameter group and
state in plain dicts, laid out as `torch.optim`'s (per-parameter `step`, `exp_avg`, ...).

Every path of a transform runs one update function of `ftrain.optim.updates`: `apply`
(eager, from `.grad`: torch's own kernels, bitwise torch.optim), `apply_capturable`
(explicit gradients as device tensor ops, for `ft.compile`) and `apply_gradients` (the
general form: per-member settings for populations). Transforms also answer what a
population asks of them: `settings`, `with_settings(values)` and `same_kind(other)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ftrain.errors import ConfigError
from ftrain.optim import prepared
from ftrain.optim._core import (
    LR,
    Groups,
    Optimizer,
    Pattern,
    Run,
    Tensors,
    check_lr,
    choose_impl,
    resolve_lr,
)
from ftrain.optim.updates import (
    adam_update,
    clip_grad_norm_update,
    clip_grad_value_update,
    sgd_update,
)


def _group_settings(groups: Groups, index: int, given: Mapping[str, Any] | None,
                    count: torch.Tensor) -> dict[str, Any]:
    """A group's settings now: `given` values (e.g. per-member tensors) replace the base
    settings the group does not set itself; a schedule is evaluated at `count`."""
    opts = groups.settings(index)
    if given:
        own = groups.overrides[index - 1][1] if index else {}
        opts.update({k: v for k, v in given.items() if k in opts and k not in own})
    opts["lr"] = resolve_lr(opts["lr"], count)
    betas = opts.get("betas")
    if isinstance(betas, torch.Tensor):
        opts["betas"] = tuple(betas.unbind(-1))
    return opts


class _FromGradients:
    """The two entry points of a transform, both over its one `apply_gradients`."""


    def apply(self, params: Tensors, state: dict[str, Any], count: torch.Tensor,
              found_inf: torch.Tensor | None) -> None:
        """The eager update from each parameter's `.grad` (None: left alone)."""
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        self.apply_gradients(  # type: ignore[attr-defined]  # each transform's one update
            params, grads, state, count, found_inf)

    def apply_capturable(self, params: Tensors, grads: Tensors, state: dict[str, Any],
                         count: torch.Tensor, found_inf: torch.Tensor | None) -> Tensors:
        """The same update as device tensor ops (no host read): for capture."""
        return self.apply_gradients(  # type: ignore[attr-defined, no-any-return]
            params, grads, state, count, found_inf, capturable=True)


@attrs.frozen(eq=False)
class _Grouped(_FromGradients):
    """What Adam and SGD share: settings by parameter group, validated by `check`."""

    groups: Groups

    @property
    def settings(self) -> Mapping[str, Any]:
        """The base settings, which a population's members may have of their own."""
        return self.groups.base

    def with_settings(self, values: Mapping[str, Any]) -> Any:
        """This transform with base settings replaced by `values` (groups keep theirs)."""
        mine = {k: v for k, v in values.items() if k in self.groups.base}
        if not mine:
            return self
        base = {**self.groups.base, **mine}
        overrides = {pat: dict(opts) for pat, opts in self.groups.overrides}
        self.check(base, overrides)  # type: ignore[attr-defined]  # each kind's own
        return attrs.evolve(self, groups=Groups.build(base, overrides))

    def same_kind(self, other: Any) -> bool:
        """Equal to `other` in everything but the base settings."""
        if type(other) is not type(self):
            return False
        for field in attrs.fields(type(self)):
            x, y = getattr(self, field.name), getattr(other, field.name)
            if isinstance(x, Groups):
                if [(p, dict(o)) for p, o in x.overrides] != \
                        [(p, dict(o)) for p, o in y.overrides]:
                    return False
            elif x != y:
                return False
        return True

    def apply_gradients(self, params: Tensors, grads: Tensors, state: dict[str, Any],
                        count: torch.Tensor, found_inf: torch.Tensor | None = None, *,
                        settings: Mapping[str, Any] | None = None, capturable: bool = False,
                        members: bool = False, lockstep: bool = False,
                        keep: list[torch.Tensor] | None = None) -> Tensors:
        """The update from explicit gradients, per parameter group (see
        `Optimizer.apply_gradients`)."""
        names = [n for n in params if n in grads]
        for gi, group in self.groups.split(names).items():
            opts = _group_settings(self.groups, gi, settings, count)
            ps = [params[n] for n in group]
            fused, foreach = choose_impl(ps, self.fused, self.foreach)  # type: ignore
            self._group(  # type: ignore[attr-defined]  # Adam's or SGD's kernels
                group, ps, [grads[n] for n in group], state, opts, count, found_inf,
                fused=fused, foreach=foreach, capturable=capturable, lockstep=lockstep,
                keep=keep)
        return grads

    def current_lrs(self, count: torch.Tensor) -> dict[str | None, Any]:
        return _current_lrs(self.groups, count)


@attrs.frozen(eq=False)
class _Adam(_Grouped):
    decoupled: bool
    amsgrad: bool
    fused: bool | None
    foreach: bool | None
    name: str
    maximize: bool = False

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

    def check(self, base: Mapping[str, Any], groups: Any) -> None:
        for where, opts in _each_group(self.name, dict(base), groups):
            check_lr(opts["lr"], where)
            _check_betas(opts["betas"], opts["eps"], opts["weight_decay"], where)

    def prepare(self, names: list[str], params: list[torch.Tensor],
                state: dict[str, Any]) -> Run | None:
        """This update prepared for a loop (`ftrain.optim.prepared`), or None."""
        return prepared.prepare_adam(self, names, params, state)

    def _group(self, names: list[str], ps: list[torch.Tensor], gs: list[torch.Tensor],
               state: dict[str, Any], opts: dict[str, Any], count: torch.Tensor,
               found_inf: torch.Tensor | None, **how: Any) -> None:
        beta1, beta2 = opts["betas"]
        lockstep = how.pop("lockstep")
        adam_update(
            ps, gs, [state["exp_avg"][n] for n in names],
            [state["exp_avg_sq"][n] for n in names],
            [state["max_exp_avg_sq"][n] for n in names] if self.amsgrad else [],
            [state["step"][n] for n in names], lr=opts["lr"], beta1=beta1, beta2=beta2,
            eps=opts["eps"], weight_decay=opts["weight_decay"], decoupled=self.decoupled,
            amsgrad=self.amsgrad, found_inf=found_inf, maximize=self.maximize,
            shared_step=count.reshape(-1)[0] + 1 if lockstep else None, **how)


@attrs.frozen(eq=False)
class _SGD(_Grouped):
    fused: bool | None
    foreach: bool | None
    name: str = "sgd"
    dampening: float = 0.0
    maximize: bool = False

    def init(self, params: Tensors) -> dict[str, Any]:
        self.groups.check(params)
        momentum = any(self.groups.settings(i)["momentum"] for i in
                       range(len(self.groups.overrides) + 1))
        # Zero buffers give torch's first step exactly (buf = 0 * m + g) and keep the
        # state's structure fixed from the start (strict checkpoints, compilation).
        state: dict[str, Any] = {
            "momentum_buffer": {n: torch.zeros_like(p) for n, p in params.items()}
            if momentum else {}, "names": sorted(params)}
        if momentum and self.dampening != 0:
            # with dampening the first step differs (torch: buf = g, not (1 - d) * g):
            # whether a buffer has started, as host tensors (read without a device sync)
            state["started"] = {n: torch.zeros((), dtype=torch.bool) for n in params}
        return state

    @property
    def apply_capturable(self) -> Any:
        """The capturable update, absent with dampening (its first step is decided on the
        host): `ft.compile` then runs the eager step."""
        if self.dampening != 0:
            raise AttributeError("sgd with dampening has no capturable update (torch's "
                                 "first step copies the gradient, decided on the host)")
        return _FromGradients.apply_capturable.__get__(self)

    def check(self, base: Mapping[str, Any], groups: Any) -> None:
        _check_sgd(dict(base), groups)

    def prepare(self, names: list[str], params: list[torch.Tensor],
                state: dict[str, Any]) -> Run | None:
        """This update prepared for a loop (`ftrain.optim.prepared`), or None."""
        return prepared.prepare_sgd(self, names, params, state)

    def _group(self, names: list[str], ps: list[torch.Tensor], gs: list[torch.Tensor],
               state: dict[str, Any], opts: dict[str, Any], count: torch.Tensor,
               found_inf: torch.Tensor | None, **how: Any) -> None:
        how.pop("lockstep")
        mom, bufs = opts["momentum"], state["momentum_buffer"]
        with_bufs = bool(names) and names[0] in bufs and (
            isinstance(mom, torch.Tensor) or mom != 0)
        kw = dict(lr=opts["lr"], momentum=mom, weight_decay=opts["weight_decay"],
                  nesterov=opts["nesterov"], dampening=self.dampening,
                  maximize=self.maximize, **how)
        started = state.get("started")
        if with_bufs and started is not None:
            fresh = [i for i, n in enumerate(names) if not bool(started[n])]  # host tensors
            if fresh:
                if found_inf is not None and bool(found_inf.item()):  # host sync, first
                    return  # steps only: torch's new buffer must not be kept when skipped
                new: list[torch.Tensor | None] = [None] * len(fresh)  # torch: buf = g
                sgd_update([ps[i] for i in fresh], [gs[i] for i in fresh], new,
                           found_inf=found_inf, **kw)
                for i, buf in zip(fresh, new):
                    bufs[names[i]].copy_(buf)  # type: ignore[arg-type]
                    started[names[i]].fill_(True)
                rest = [i for i in range(len(names)) if i not in set(fresh)]
                names, ps, gs = [names[i] for i in rest], [ps[i] for i in rest], \
                    [gs[i] for i in rest]
        sgd_update(ps, gs, [bufs[n] for n in names] if with_bufs else [None] * len(names),
                   found_inf=found_inf, **kw)


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


def _check_impl(name: str, fused: bool | None, foreach: bool | None) -> None:
    if fused and foreach:
        raise ConfigError(f"{name}: fused=True and foreach=True cannot both be set (torch "
                          "raises too); pick one kernel")


def _check_sgd(base: dict[str, Any], groups: Any) -> None:
    for where, opts in _each_group("sgd", base, groups):
        check_lr(opts["lr"], where)
        if opts["momentum"] < 0 or opts["weight_decay"] < 0:
            raise ConfigError(f"{where}: momentum and weight_decay must be >= 0, got "
                              f"momentum={opts['momentum']}, "
                              f"weight_decay={opts['weight_decay']}")
        if opts["nesterov"] and opts["momentum"] <= 0:
            raise ConfigError(f"{where}: nesterov=True needs momentum > 0")


def _adam_like(name: str, decoupled: bool, lr: LR, betas: tuple[float, float], eps: float,
               weight_decay: float, amsgrad: bool, groups: Any, fused: bool | None,
               foreach: bool | None, maximize: bool = False) -> Optimizer:
    _check_impl(name, fused, foreach)
    _check_flag(name, "maximize", maximize)
    base = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    made = _Adam(Groups.build(base, {}), decoupled, amsgrad, fused, foreach, name, maximize)
    made.check(base, groups)
    return Optimizer((attrs.evolve(made, groups=Groups.build(base, groups)),))


def adam(lr: LR, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, *, amsgrad: bool = False, maximize: bool = False,
         groups: Mapping[Pattern, Mapping[str, Any]] | None = None,
         fused: bool | None = None, foreach: bool | None = None) -> Optimizer:
    """Adam (L2 weight decay added to the gradient), on torch's Adam kernels.

    `lr` is a float or a schedule. `groups` maps name patterns to setting overrides.
    By default the fused kernel is used where the device has one, else foreach.
    `maximize` ascends the objective (torch's `maximize`).

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.adam(ft.optim.schedules.cosine_decay(1e-3, 1000))
        >>> sorted(opt.init({}))
        ['adam', 'count']
    """
    return _adam_like("adam", False, lr, betas, eps, weight_decay, amsgrad, groups, fused,
                      foreach, maximize)


def adamw(lr: LR, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False,
          groups: Mapping[Pattern, Mapping[str, Any]] | None = None,
          fused: bool | None = None, foreach: bool | None = None) -> Optimizer:
    """AdamW (decoupled weight decay), on torch's Adam kernels.

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.adamw(1e-3, groups={"*.bias": {"weight_decay": 0.0}})
    """
    return _adam_like("adamw", True, lr, betas, eps, weight_decay, amsgrad, groups, fused,
                      foreach, maximize)


def sgd(lr: LR, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, *,
        dampening: float = 0.0, maximize: bool = False,
        groups: Mapping[Pattern, Mapping[str, Any]] | None = None,
        fused: bool | None = None, foreach: bool | None = None) -> Optimizer:
    """SGD with optional (Nesterov) momentum and L2 weight decay, on torch's SGD kernels.

    `dampening` and `maximize` are torch's (for the whole optimizer, not per group);
    with dampening a loop runs torch's general eager update (its first step is special).

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.sgd(0.1, momentum=0.9, nesterov=True)
    """
    _check_impl("sgd", fused, foreach)
    _check_flag("sgd", "maximize", maximize)
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)) or dampening < 0:
        raise ConfigError(f"sgd: dampening must be a number >= 0, got {dampening!r}")
    base = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
    _check_sgd(base, groups)
    if dampening and any(opts.get("nesterov", nesterov) for opts in
                         [base, *(groups or {}).values()]):
        raise ConfigError("sgd: nesterov=True needs dampening=0 (torch's rule), got "
                          f"dampening={dampening}")
    return Optimizer((_SGD(Groups.build(base, groups), fused, foreach, "sgd",
                           float(dampening), maximize),))


def _check_flag(name: str, what: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: {what} must be True or False, got {value!r}")


@attrs.frozen(eq=False)
class _ClipGradNorm(_FromGradients):
    max_norm: float
    norm_type: float
    name: str = "clip_grad_norm"

    @property
    def settings(self) -> Mapping[str, Any]:
        return {}  # no setting a population's members have of their own

    def with_settings(self, values: Mapping[str, Any]) -> _ClipGradNorm:
        return self

    def same_kind(self, other: Any) -> bool:
        return isinstance(other, _ClipGradNorm) and (other.max_norm, other.norm_type) == (
            self.max_norm, self.norm_type)

    def init(self, params: Tensors) -> dict[str, Any]:
        return {}

    def prepare(self, names: list[str], params: list[torch.Tensor],
                state: dict[str, Any]) -> Run:
        """This clipping prepared for a loop (`ftrain.optim.prepared`)."""
        return prepared.prepare_clip(self, names, params, state)

    def apply_gradients(self, params: Tensors, grads: Tensors, state: dict[str, Any],
                        count: torch.Tensor, found_inf: torch.Tensor | None = None, *,
                        settings: Mapping[str, Any] | None = None, capturable: bool = False,
                        members: bool = False, lockstep: bool = False,
                        keep: list[torch.Tensor] | None = None) -> Tensors:
        """torch's clip_grad_norm_ on the given gradients, in place (per member)."""
        gs = [grads[n] for n in params if n in grads]
        clip_grad_norm_update(gs, self.max_norm, self.norm_type, members=members, keep=keep)
        return grads



def clip_grad_norm(max_norm: float, norm_type: float = 2.0) -> _ClipGradNorm:
    """Scale gradients so their global norm is at most `max_norm` (torch's clip_grad_norm_).

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.sgd(0.1))
    """
    if not max_norm > 0:
        raise ConfigError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    return _ClipGradNorm(float(max_norm), float(norm_type))


@attrs.frozen(eq=False)
class _ClipGradValue(_FromGradients):
    clip_value: float
    name: str = "clip_grad_value"

    @property
    def settings(self) -> Mapping[str, Any]:
        return {}

    def with_settings(self, values: Mapping[str, Any]) -> _ClipGradValue:
        return self

    def same_kind(self, other: Any) -> bool:
        return isinstance(other, _ClipGradValue) and other.clip_value == self.clip_value

    def init(self, params: Tensors) -> dict[str, Any]:
        return {}

    def prepare(self, names: list[str], params: list[torch.Tensor],
                state: dict[str, Any]) -> Run:
        """This clipping prepared for a loop: the same clamps on the gradient list."""
        value = self.clip_value

        def run(grads: list[torch.Tensor], count: torch.Tensor,
                found_inf: torch.Tensor | None) -> None:
            clip_grad_value_update(grads, value)
        return run

    def apply_gradients(self, params: Tensors, grads: Tensors, state: dict[str, Any],
                        count: torch.Tensor, found_inf: torch.Tensor | None = None, *,
                        settings: Mapping[str, Any] | None = None, capturable: bool = False,
                        members: bool = False, lockstep: bool = False,
                        keep: list[torch.Tensor] | None = None) -> Tensors:
        """torch's clip_grad_value_ on the given gradients, in place (element-wise, so the
        same per population member)."""
        clip_grad_value_update([grads[n] for n in params if n in grads], self.clip_value)
        return grads


def clip_grad_value(clip_value: float) -> _ClipGradValue:
    """Clamp every gradient element to `[-clip_value, clip_value]` (torch's
    `clip_grad_value_`; Lightning's `gradient_clip_algorithm="value"`).

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.chain(ft.optim.clip_grad_value(0.5), ft.optim.sgd(0.1))
    """
    if isinstance(clip_value, bool) or not isinstance(clip_value, (int, float)) or \
            not clip_value > 0:
        raise ConfigError(f"clip_grad_value: clip_value must be a number > 0, got "
                          f"{clip_value!r}")
    return _ClipGradValue(float(clip_value))
