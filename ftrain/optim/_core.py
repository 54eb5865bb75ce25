"""The optimizer protocol: a chain of gradient transforms with one update count.

A *transform* has `init(params) -> state` and `apply(params, state, count, found_inf)`.
`apply` reads each parameter's `.grad` (None: no gradient this step, left alone) and
works in place on the tensors it is given: the step hands it copies in a pure call and
the live tensors in a loop. An `Optimizer` chains transforms and keeps the count of
applied updates as a 0-d device tensor that schedules read, so a skipped update (found_inf
set, e.g. an fp16 overflow) changes neither the params nor the schedule position, and the
host never has to look. A transform may also have `apply_capturable(params, grads, state,
count, found_inf) -> grads` (gradients given explicitly, everything on the device), which
`Optimizer.update_capturable` chains for a compiled step.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs
import torch

from ftrain.errors import ConfigError

Tensors = dict[str, torch.Tensor]
# A prepared transform (see ftrain.optim.prepared): (gradients, count, found_inf) -> None.
Run = Callable[[list[torch.Tensor], torch.Tensor, "torch.Tensor | None"], None]
Schedule = Callable[[Any], Any]
LR = float | Schedule
Pattern = str | Callable[[str], bool]


class Transform(Protocol):
    """One stage of an optimizer chain (clipping, Adam, SGD, ...)."""

    name: str

    def init(self, params: Tensors) -> dict[str, Any]: ...

    def apply(self, params: Tensors, state: dict[str, Any], count: torch.Tensor,
              found_inf: torch.Tensor | None) -> None: ...


@attrs.frozen(cache_hash=False)
class Optimizer:
    """A chain of transforms plus the 0-d device count of applied updates.

    `init(params)` returns `{"count": tensor(0), <transform name>: <its state>, ...}`;
    `update(params, opt_state, found_inf=None)` applies the chain in place.

    Examples:
        >>> import torch, ftrain as ft
        >>> opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.sgd(0.1))
        >>> w = torch.ones(2, requires_grad=True); w.grad = torch.full((2,), 10.0)
        >>> state = opt.init({"w": w.detach()})
        >>> with torch.no_grad(): opt.update({"w": w}, state)
        >>> int(state["count"]), [round(v, 4) for v in w.tolist()]
        (1, [0.9293, 0.9293])
    """

    transforms: tuple[Any, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """Each transform's key in the state (a plain property: torch.compile traces it,
        where a cached_property on this slotted record made dynamo give up)."""
        seen: dict[str, int] = {}
        keys = []
        for t in self.transforms:
            n = seen.get(t.name, 0)
            seen[t.name] = n + 1
            keys.append(t.name if n == 0 else f"{t.name}_{n}")
        return tuple(keys)

    def init(self, params: Tensors) -> dict[str, Any]:
        device = next(iter(params.values())).device if params else torch.device("cpu")
        state: dict[str, Any] = {"count": torch.zeros((), dtype=torch.int64, device=device)}
        for key, t in zip(self.keys, self.transforms):
            state[key] = t.init(params)
        return state

    def update(self, params: Tensors, opt_state: dict[str, Any],
               found_inf: torch.Tensor | None = None) -> None:
        """Apply one update in place from the params' `.grad`; call under `torch.no_grad()`."""
        count = opt_state["count"]
        for key, t in zip(self.keys, self.transforms):
            t.apply(params, opt_state[key], count, found_inf)
        _advance(count, found_inf)

    def prepare(self, params: Mapping[str, torch.Tensor], opt_state: dict[str, Any]
                ) -> Prepared | None:
        """This optimizer's eager update for exactly these tensors, prepared once for a
        loop (see `ftrain.optim.prepared`), or None where a transform cannot prepare
        (its kernel is not a fused one, or it has no `prepare`): `update` then serves.

        Examples:
            >>> import torch, ftrain as ft
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = ft.optim.sgd(0.1)
            >>> state = opt.init({"w": w.detach()})
            >>> params = {"w": w}
            >>> prepared = opt.prepare(params, state)
            >>> w.grad = torch.full((2,), 2.0)
            >>> prepared.fits(params, state), prepared.update(None)
            (True, True)
            >>> [round(v, 4) for v in w.tolist()], w.grad, int(state["count"])
            ([0.8, 0.8], None, 1)
        """
        names, tensors = list(params), list(params.values())
        if not names or not isinstance(opt_state.get("count"), torch.Tensor):
            return None
        runs = []
        for key, t in zip(self.keys, self.transforms):
            make, state = getattr(t, "prepare", None), opt_state.get(key)
            if make is None or not isinstance(state, dict):
                return None
            try:
                run = make(names, tensors, state)
            except (KeyError, TypeError, ValueError):  # a state not laid out as expected:
                return None  # the general update reports it properly
            if run is None:
                return None
            runs.append(run)
        return Prepared(params, opt_state, self.keys, runs)

    def update_capturable(self, params: Tensors, grads: Tensors, opt_state: dict[str, Any],
                          found_inf: torch.Tensor | None = None) -> None:
        """`update` for whole-step capture (`ft.compile`, CUDA graphs): same math, no host.

        Gradients are given explicitly (`grads[name]` for each name of `params`; e.g. from
        `torch.func.grad`) instead of read from `.grad`; learning rates, the count and the
        skip decision stay device tensors, and a skipped update (`found_inf` set) is applied
        with `torch.where`, never a Python branch on a value, so `torch.compile(fullgraph=True)`
        traces it once. Params and `opt_state` are updated in place. Each transform needs an
        `apply_capturable(params, grads, state, count, found_inf) -> grads` method.

        Examples:
            >>> import torch, ftrain as ft
            >>> opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.sgd(0.1))
            >>> w = torch.ones(2)
            >>> state = opt.init({"w": w})
            >>> opt.update_capturable({"w": w}, {"w": torch.full((2,), 10.0)}, state)
            >>> int(state["count"]), [round(v, 4) for v in w.tolist()]
            (1, [0.9293, 0.9293])
        """
        count = opt_state["count"]
        with torch.no_grad():
            for key, t in zip(self.keys, self.transforms):
                fn = getattr(t, "apply_capturable", None)
                if fn is None:
                    raise ConfigError(
                        f"optimizer transform {key!r} ({type(t).__name__}) has no capturable "
                        "update (an apply_capturable(params, grads, state, count, found_inf) "
                        "method), so it cannot run inside a compiled step")
                grads = fn(params, grads, opt_state[key], count, found_inf)
            _advance(count, found_inf)

    def apply_gradients(self, params: Tensors, grads: Tensors, opt_state: dict[str, Any],
                        found_inf: torch.Tensor | None = None, *,
                        settings: Mapping[str, Any] | None = None, capturable: bool = False,
                        members: bool = False, lockstep: bool = False,
                        keep: list[torch.Tensor] | None = None) -> None:
        """One update from explicit gradients, in place, with settings that may be tensors.

        `settings` replace the transforms' base settings (`lr`, `weight_decay`, ...; groups
        that set one keep theirs) with numbers or tensors: 0-d, or `[N]` per member when
        `members=True` (every tensor leads with the member dimension N, and clipping is
        per member). `lockstep`: every parameter's step is the update count, the same for
        all members (a population), so Adam's bias corrections are computed once.
        `capturable` forces the tensor path (no host read, as `update_capturable`).
        `keep` collects per-member factors (see `ftrain.optim.updates.Factors`).

        Examples:
            >>> import torch, ftrain as ft
            >>> opt = ft.optim.sgd(0.1)
            >>> w = torch.ones(2, 3)   # two members of a population
            >>> state = opt.init({"w": w})
            >>> opt.apply_gradients({"w": w}, {"w": torch.ones(2, 3)}, state, members=True,
            ...                     settings={"lr": torch.tensor([0.1, 0.5])})
            >>> w[:, 0].tolist()
            [0.8999999761581421, 0.5]
        """
        count = opt_state["count"]
        with torch.no_grad():
            for key, t in zip(self.keys, self.transforms):
                fn = getattr(t, "apply_gradients", None)
                if fn is None:
                    raise ConfigError(
                        f"optimizer transform {key!r} ({type(t).__name__}) has no "
                        "apply_gradients method (ftrain's adam, adamw, sgd and "
                        "clip_grad_norm have one)")
                grads = fn(params, grads, opt_state[key], count, found_inf, settings=settings,
                           capturable=capturable, members=members, lockstep=lockstep,
                           keep=keep)
            _advance(count, found_inf)

    def settings(self) -> dict[str, Any]:
        """The base settings of every transform (`lr`, `momentum`, ...), by setting name.

        Examples:
            >>> import ftrain as ft
            >>> ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.sgd(0.1)).settings()
            {'lr': 0.1, 'momentum': 0.0, 'nesterov': False, 'weight_decay': 0.0}
        """
        out: dict[str, Any] = {}
        for t in self.transforms:
            out.update(getattr(t, "settings", {}))
        return out

    def with_settings(self, values: Mapping[str, Any]) -> Optimizer:
        """This optimizer with its base settings replaced by `values` (validated; groups
        that set a value keep theirs).

        Examples:
            >>> import ftrain as ft
            >>> ft.optim.adamw(1e-3).with_settings({"lr": 3e-3}).settings()["lr"]
            0.003
        """
        unknown = sorted(set(values) - set(self.settings()))
        if unknown:
            raise ConfigError(f"this optimizer has no setting {unknown}; its settings are "
                              f"{sorted(self.settings())}")
        return Optimizer(tuple(t.with_settings(values) if hasattr(t, "with_settings") else t
                               for t in self.transforms))

    def same_kind(self, other: Any) -> bool:
        """Whether `other` is this optimizer up to base settings (same transforms, groups).

        Examples:
            >>> import ftrain as ft
            >>> ft.optim.adam(1e-3).same_kind(ft.optim.adam(1e-2)), \\
            ...     ft.optim.adam(1e-3).same_kind(ft.optim.adamw(1e-3))
            (True, False)
        """
        return isinstance(other, Optimizer) and len(other.transforms) == len(
            self.transforms) and all(hasattr(a, "same_kind") and a.same_kind(b)
                                     for a, b in zip(self.transforms, other.transforms))

    def learning_rates(self, opt_state: dict[str, Any]) -> dict[str, Any]:
        """The learning rate each transform would use now, by transform key (and group)."""
        out: dict[str, Any] = {}
        for key, t in zip(self.keys, self.transforms):
            lrs = getattr(t, "current_lrs", None)
            if lrs is not None:
                for group, lr in lrs(opt_state["count"]).items():
                    out[key if group is None else f"{key}/{group}"] = lr
        return out


class Prepared:
    """An optimizer's update tied to one params dict and one optimizer state (built by
    `Optimizer.prepare`); a loop checks `fits` each step and calls `update`."""

    def __init__(self, params: Mapping[str, torch.Tensor], opt_state: dict[str, Any],
                 keys: tuple[str, ...], runs: list[Run]) -> None:
        self.params, self.opt_state, self.runs = params, opt_state, runs
        self.tensors = list(params.values())
        self.count = opt_state["count"]
        # the dicts the prepared lists were read from, as (parent, key, dict): a state
        # holding others is prepared again
        self.links = _links(opt_state, keys)

    def fits(self, params: Mapping[str, torch.Tensor], opt_state: dict[str, Any]) -> bool:
        """Whether this update was prepared from exactly these dicts (identity checks)."""
        if params is not self.params or opt_state is not self.opt_state:
            return False
        for parent, key, child in self.links:  # noqa: SIM110  (no generator per step)
            if parent.get(key) is not child:
                return False
        return True

    def update(self, found_inf: torch.Tensor | None) -> bool:
        """One update in place from the params' `.grad`, which are then cleared; False
        (nothing done) when a parameter has no gradient this step: `Optimizer.update`
        handles that."""
        grads = []
        for p in self.tensors:
            g = p.grad
            if g is None:
                return False
            grads.append(g)
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # no_grad without its context object (as torch.optim)
        try:
            for run in self.runs:
                run(grads, self.count, found_inf)
            _advance(self.count, found_inf)
        finally:
            torch._C._set_grad_enabled(enabled)
        for p in self.tensors:
            p.grad = None
        return True


def _links(opt_state: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[Any, Any, Any]]:
    out: list[tuple[Any, Any, Any]] = []
    for key in keys:
        sub = opt_state.get(key)
        out.append((opt_state, key, sub))
        if isinstance(sub, dict):
            out.extend((sub, k, v) for k, v in sub.items() if isinstance(v, dict))
    return out


def _advance(count: torch.Tensor, found_inf: torch.Tensor | None) -> None:
    """One more applied update; a skipped one does not advance the schedule (no host read)."""
    if found_inf is None:
        count.add_(1)
    else:
        count.add_(1 - found_inf.to(torch.int64))


def chain(*parts: Any) -> Optimizer:
    """Run transforms in order, e.g. clip the gradient norm, then apply AdamW.

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.adamw(1e-3))
        >>> opt.keys
        ('clip_grad_norm', 'adamw')
    """
    transforms: list[Any] = []
    for p in parts:
        if isinstance(p, Optimizer):
            transforms.extend(p.transforms)
        elif hasattr(p, "init") and hasattr(p, "apply"):
            transforms.append(p)
        else:
            raise ConfigError(f"chain() takes optimizers and transforms, got {type(p).__name__}")
    return Optimizer(tuple(transforms))


# -- parameter groups: per-name settings (e.g. no weight decay for biases and norms) ----

@attrs.frozen(eq=False)
class Groups:
    """Maps each parameter name to the settings of the first group whose pattern matches.

    Patterns are shell-style globs on the parameter name (`"*.bias"`, `"*norm*"`) or
    predicates `name -> bool`. A pattern that matches no trainable parameter is an error.
    """

    base: Mapping[str, Any]
    overrides: tuple[tuple[Pattern, Mapping[str, Any]], ...]
    _memo: dict[str, int] = attrs.field(factory=dict, init=False)

    @classmethod
    def build(cls, base: Mapping[str, Any],
              groups: Mapping[Pattern, Mapping[str, Any]] | None) -> Groups:
        items = tuple((pat, dict(opts)) for pat, opts in (groups or {}).items())
        for pat, opts in items:
            if not (isinstance(pat, str) or callable(pat)):
                raise ConfigError(f"a group pattern must be a glob string or a callable, "
                                  f"got {type(pat).__name__}")
            unknown = sorted(set(opts) - set(base))
            if unknown:
                raise ConfigError(f"group {_pattern_name(pat)!r} sets {unknown}; this "
                                  f"optimizer's settings are {sorted(base)}")
        return cls(dict(base), items)

    def index(self, name: str) -> int:
        """0 for the base settings, i + 1 for the i-th override group."""
        i = self._memo.get(name)
        if i is None:
            i = 0
            for j, (pat, _) in enumerate(self.overrides):
                if (fnmatch.fnmatchcase(name, pat) if isinstance(pat, str) else pat(name)):
                    i = j + 1
                    break
            self._memo[name] = i
        return i

    def settings(self, index: int) -> dict[str, Any]:
        if index == 0:
            return dict(self.base)
        return {**self.base, **self.overrides[index - 1][1]}

    def label(self, index: int) -> str | None:
        return None if index == 0 else _pattern_name(self.overrides[index - 1][0])

    def check(self, names: Iterable[str]) -> None:
        names = list(names)
        used = {self.index(n) for n in names}
        for j, (pat, _) in enumerate(self.overrides):
            if j + 1 not in used:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ConfigError(f"parameter group pattern {_pattern_name(pat)!r} matched no "
                                  f"trainable parameter (or an earlier pattern took them all); "
                                  f"parameters: {shown}")

    def split(self, names: Iterable[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for n in names:
            out.setdefault(self.index(n), []).append(n)
        return out


def _pattern_name(pat: Pattern) -> str:
    return pat if isinstance(pat, str) else getattr(pat, "__name__", repr(pat))


def resolve_lr(lr: LR, count: torch.Tensor) -> Any:
    """The learning rate for this update: a float, or a schedule evaluated at `count`.

    Schedules compute in float64; on accelerators torch's fused kernels read a float32
    tensor learning rate, so it is cast there (one small device op per update).
    """
    if not callable(lr):
        return lr
    value = lr(count)
    if isinstance(value, torch.Tensor) and value.device.type != "cpu" \
            and value.dtype != torch.float32:
        value = value.to(torch.float32)
    return value


def check_lr(lr: Any, what: str) -> None:
    if callable(lr):
        return
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
        raise ConfigError(f"{what}: lr must be a non-negative float or a schedule "
                          f"(a function of the update count), got {lr!r}")


@functools.cache
def fused_devices() -> tuple[str, ...]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older or newer torch layouts
        return ("cpu", "cuda")


def choose_impl(params: list[torch.Tensor], fused: bool | None,
                foreach: bool | None) -> tuple[bool, bool]:
    """(fused, foreach): fused where the device supports it unless the user said otherwise."""
    if fused is not None or foreach is not None:
        return bool(fused), bool(foreach)
    if params and params[0].device.type in fused_devices() and all(
            p.is_floating_point() for p in params):
        return True, False
    return False, True
