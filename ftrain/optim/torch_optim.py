"""`from_torch`: any `torch.optim.Optimizer` (torch's own or a third party's) as a pure
ftrain optimizer.

The transform keeps no torch optimizer in the state: `opt_state` holds the optimizer's
per-parameter state as plain tensors, laid out as ftrain's own optimizers lay theirs out
(`{"state": {field: {param name: tensor}}}`), so it checkpoints with `weights_only`, a
resume is exact, and a direct step call (which works on copies) leaves its input alone.
An update builds a real torch optimizer over the params, hands it those tensors (shared,
not copied), calls its `.step()`, and writes back anything it replaced. A loop prepares
that torch optimizer once (`prepare`, as `ftrain.optim.prepared` does for the fused
kernels) and reuses it while the params and state dicts are the same ones.

The state's layout is fixed when the state is made: `init` runs one step on throw-away
copies with zero gradients and records each state entry as torch's lazy initialisation
creates it (before the update touches it), so a fresh state and a checkpoint agree.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from ftrain.errors import ConfigError
from ftrain.optim._core import Groups, Optimizer, Pattern, Run, Tensors, check_lr

_NUMBER_TYPES = {"int": int, "float": float, "bool": bool}
_REFUSED = {
    "LBFGS": "LBFGS re-evaluates the loss several times per step through a closure "
             "(optimizer.step(closure)); an ftrain step computes the loss once per update. "
             "Write a hand-written step that calls torch.optim.LBFGS with a closure",
    "SparseAdam": "SparseAdam takes only sparse gradients (nn.Embedding(sparse=True)), "
                  "which ftrain's steps and gradient transforms do not produce; use "
                  "from_torch(torch.optim.Adam) or ft.optim.adam for dense gradients",
}


class _Recording(dict):  # type: ignore[type-arg]
    """A parameter's state dict that keeps a copy of each entry as first assigned: torch
    creates its state lazily inside `step`, just before the update changes it."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[str, Any] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self.first:
            self.first[key] = value.detach().clone() if isinstance(value, torch.Tensor) \
                else value
        super().__setitem__(key, value)


@attrs.frozen(eq=False)
class FromTorch:
    """The transform built by `from_torch` (see there)."""

    cls: type
    kwargs: tuple[tuple[str, Any], ...]
    groups: Groups
    name: str

    # -- what populations and ft.compile ask of a transform ---------------------------

    @property
    def settings(self) -> Mapping[str, Any]:
        return {}  # torch's settings stay torch's: nothing per population member

    def same_kind(self, other: Any) -> bool:
        return isinstance(other, FromTorch) and (self.cls, self.kwargs, self.name) == (
            other.cls, other.kwargs, other.name) and \
            [(p, dict(o)) for p, o in self.groups.overrides] == \
            [(p, dict(o)) for p, o in other.groups.overrides]

    def current_lrs(self, count: torch.Tensor) -> dict[str | None, Any]:
        """Each group's learning rate for the update at `count` (a schedule evaluated)."""
        return {self.groups.label(i): _lr_value(self.groups.settings(i)["lr"], count)
                for i in range(len(self.groups.overrides) + 1)}

    def check(self, base: Mapping[str, Any], groups: Any) -> None:
        """Validate settings for new groups (as ftrain's own transforms do)."""
        _check_groups(self.cls, base, groups)
        check_lr(base["lr"], f"from_torch({self.cls.__name__})")

    # -- the transform ------------------------------------------------------------------

    def init(self, params: Tensors) -> dict[str, Any]:
        """The state torch creates at its first step, per parameter name, as tensors."""
        self.groups.check(params)
        names = list(params)
        if not names:  # nothing to train (all frozen): torch refuses an empty list
            return {"state": {}, "numbers": {}}
        copies = [p.detach().clone() for p in params.values()]
        for c in copies:
            c.grad = torch.zeros_like(c)
        try:
            opt = self._build(names, copies, _host_count(None))
            opt.state = collections.defaultdict(_Recording)  # type: ignore[assignment]
            with torch.no_grad():
                opt.step()
        except Exception as err:  # torch refuses these params: say which optimizer
            raise ConfigError(f"from_torch({self.cls.__name__}): its first step on the "
                              f"parameters {names[:8]} failed: {err}") from err
        fields: dict[str, dict[str, torch.Tensor]] = {}
        numbers: dict[str, str] = {}
        for name, c in zip(names, copies):
            rec = opt.state.get(c)
            for key, value in (rec.first if isinstance(rec, _Recording) else {}).items():
                fields.setdefault(key, {})[name] = self._as_tensor(key, value, numbers)
        return {"state": fields, "numbers": numbers}

    def _as_tensor(self, key: str, value: Any, numbers: dict[str, str]) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        kind = type(value).__name__
        if kind not in _NUMBER_TYPES:
            raise ConfigError(f"from_torch({self.cls.__name__}): its state entry {key!r} is "
                              f"a {kind}; ftrain keeps optimizer state as tensors and numbers "
                              "(int, float, bool) only")
        if numbers.setdefault(key, kind) != kind:
            raise ConfigError(f"from_torch({self.cls.__name__}): its state entry {key!r} is "
                              f"a {numbers[key]} for one parameter and a {kind} for another")
        # a Python number kept as a host tensor: written back with fill_ (no device sync)
        dtype = {"int": torch.int64, "float": torch.float64, "bool": torch.bool}[kind]
        return torch.tensor(value, dtype=dtype)

    def apply(self, params: Tensors, state: dict[str, Any], count: torch.Tensor,
              found_inf: torch.Tensor | None) -> None:
        """One update from the params' `.grad` (None: torch leaves the parameter alone)."""
        names = list(params)
        if names:
            _Live(self, names, list(params.values()), state).step(count, found_inf)

    def prepare(self, names: list[str], params: list[torch.Tensor],
                state: dict[str, Any]) -> Run | None:
        """A torch optimizer built once for a loop's tensors (see `Optimizer.prepare`)."""
        if not isinstance(state.get("state"), dict):
            return None
        live = _Live(self, names, params, state)

        def run(grads: list[torch.Tensor], count: torch.Tensor,
                found_inf: torch.Tensor | None) -> None:
            live.step(count, found_inf)
        return run

    def _build(self, names: list[str], params: list[torch.Tensor],
               count: Callable[[], int]) -> torch.optim.Optimizer:
        """A torch optimizer over `params`: one torch group per ftrain group."""
        index = {n: i for i, n in enumerate(names)}
        param_groups = []
        for gi, group in sorted(self.groups.split(names).items()):
            own = dict(self.groups.overrides[gi - 1][1]) if gi else {}
            own["lr"] = _lr_float(self.groups.settings(gi)["lr"], count)
            param_groups.append({"params": [params[index[n]] for n in group], **own})
        return self.cls(param_groups, **dict(self.kwargs))  # type: ignore[no-any-return]


class _Live:
    """A torch optimizer over a fixed list of tensors, sharing the ftrain state's tensors."""

    def __init__(self, t: FromTorch, names: list[str], params: list[torch.Tensor],
                 state: dict[str, Any]) -> None:
        self.t, self.state = t, state
        self.fields: dict[str, dict[str, torch.Tensor]] = state["state"]
        self.numbers: dict[str, str] = state.get("numbers", {})
        self.host = _HostCount()
        self.opt = t._build(names, params, lambda: 0)
        self.entries = []
        for name, p in zip(names, params):
            st: dict[str, Any] = {}
            for field, per in self.fields.items():
                if name in per:
                    value = per[name]
                    # host read once per build for state kept as Python numbers
                    st[field] = _NUMBER_TYPES[self.numbers[field]](value.item()) \
                        if field in self.numbers else value
            self.opt.state[p] = st
            self.entries.append((name, st))
        # which groups follow a schedule: their lr is set before every update
        self.scheduled = [
            (group, lr) for group, lr in zip(
                self.opt.param_groups,
                [t.groups.settings(gi)["lr"] for gi, _ in sorted(t.groups.split(names).items())])
            if callable(lr)]
        # torch's own optimizers update their state tensors in place; a third party's may
        # assign new values, which are copied back after every update
        self.in_place = t.cls.__module__.startswith("torch.optim.")

    def step(self, count: torch.Tensor, found_inf: torch.Tensor | None) -> None:
        if found_inf is not None and bool(found_inf.item()):  # host sync: torch's optimizers
            return  # take no skip flag, so a skipped update is decided here
        if self.scheduled:
            now = self.host.read(count)
            for group, lr in self.scheduled:
                group["lr"] = _lr_float(lr, lambda: now)
        self.opt.step()
        if self.scheduled:
            self.host.advanced(count)
        if not self.in_place or self.numbers:
            self._write_back()

    def _write_back(self) -> None:
        cls = self.t.cls
        for name, st in self.entries:
            for key, value in st.items():
                per = self.fields.get(key)
                if per is None or name not in per:
                    raise ConfigError(f"from_torch({cls.__name__}): the optimizer added the "
                                      f"state entry {key!r} after its first step; ftrain "
                                      "fixes the state's layout at init")
                ref = per[name]
                if value is ref:
                    continue
                if isinstance(value, torch.Tensor):
                    ref.copy_(value)  # keep the state's own tensor (loops hold it)
                    st[key] = ref
                else:
                    ref.fill_(value)  # a Python number: a host tensor, no sync


class _HostCount:
    """The update count on the host, read from the device count only when someone else
    moved it (its `_version` says so): a schedule needs a float lr for torch's kernels, and
    a loop should not pay a device sync per update for it."""

    def __init__(self) -> None:
        self.version = -1
        self.value = 0

    def read(self, count: torch.Tensor) -> int:
        if count._version != self.version:
            self.value = int(count)  # host read: once per prepare (or per direct call)
            self.version = count._version
        return self.value

    def advanced(self, count: torch.Tensor) -> None:
        # the optimizer adds 1 to the count after this update (one in-place op)
        self.value += 1
        self.version = count._version + 1


def _host_count(count: torch.Tensor | None) -> Callable[[], int]:
    return lambda: 0 if count is None else int(count)


def _lr_float(lr: Any, count: Callable[[], int]) -> Any:
    """A group's lr for torch: a float (a schedule evaluated at the host count)."""
    if not callable(lr):
        return lr
    value = lr(count())
    return float(value)


def _lr_value(lr: Any, count: torch.Tensor) -> Any:
    return lr(count) if callable(lr) else lr


def from_torch(cls: type, lr: Any = None, *,
               groups: Mapping[Pattern, Mapping[str, Any]] | None = None,
               name: str | None = None, **kwargs: Any) -> Optimizer:
    """Any `torch.optim.Optimizer` subclass as a pure ftrain optimizer, bitwise torch's.

    `kwargs` go to `cls` unchanged (torch's defaults and kernel choice hold). `lr` is a
    float, a schedule (a function of the update count; its value reaches torch as a float)
    or None for torch's default. `groups` maps parameter-name patterns to settings of
    `cls` (torch's parameter groups, as for `ft.optim.adam`). The state lives in
    `opt_state[name]` as tensors (`name` defaults to the class name in lower case).
    LBFGS (it needs a closure) and SparseAdam (sparse gradients) are refused.

    Examples:
        >>> import torch, ftrain as ft
        >>> opt = ft.optim.from_torch(torch.optim.RMSprop, lr=0.01, momentum=0.9)
        >>> w = torch.ones(2, requires_grad=True)
        >>> state = opt.init({"w": w.detach()})
        >>> sorted(state["rmsprop"]["state"])
        ['momentum_buffer', 'square_avg', 'step']
        >>> w.grad = torch.ones(2)
        >>> with torch.no_grad(): opt.update({"w": w}, state)
        >>> int(state["count"]), round(w[0].item(), 4)
        (1, 0.9)
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"from_torch needs a torch.optim.Optimizer subclass (e.g. "
                          f"torch.optim.RMSprop), got {cls!r}")
    if cls.__name__ in _REFUSED and cls.__module__.startswith("torch.optim"):
        raise ConfigError(f"from_torch({cls.__name__}): not supported: "
                          f"{_REFUSED[cls.__name__]}")
    if "params" in kwargs:
        raise ConfigError("from_torch: do not pass params=; ftrain gives the optimizer the "
                          "state's trainable parameters (use groups= for parameter groups)")
    if lr is not None:
        check_lr(lr, f"from_torch({cls.__name__})")
    # torch checks its arguments when built: on a throw-away 2-D parameter, now
    probe_kwargs = dict(kwargs)
    if lr is not None:
        probe_kwargs["lr"] = _lr_float(lr, lambda: 0)
    try:
        probe = cls([torch.zeros(2, 2, requires_grad=True)], **probe_kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"from_torch({cls.__name__}, {kwargs}): torch refused the "
                          f"arguments: {err}") from err
    defaults = dict(probe.defaults)
    if "lr" not in defaults:
        raise ConfigError(f"from_torch({cls.__name__}): the optimizer has no 'lr' setting "
                          f"in its defaults ({sorted(defaults)})")
    base = dict(defaults)  # what a group may set: every setting of the optimizer
    base["lr"] = lr if lr is not None else defaults["lr"]
    _check_groups(cls, base, groups)
    key = name if name is not None else cls.__name__.lower()
    if not isinstance(key, str) or not key or key == "count":
        raise ConfigError(f"from_torch: name must be a non-empty string other than "
                          f"'count', got {key!r}")
    made = FromTorch(cls, tuple(sorted(kwargs.items())), Groups.build(base, groups), key)
    for own in [{}, *(dict(o) for o in (groups or {}).values())]:  # each group's settings
        settings = {**probe_kwargs, **own}
        settings["lr"] = _lr_float(settings.get("lr", base["lr"]), lambda: 0)
        probe_t = FromTorch(cls, tuple(sorted((k, v) for k, v in settings.items() if k != "lr")),
                            Groups.build({**base, "lr": settings["lr"]}, None), key)
        _check_first_steps(probe_t, settings)
    return Optimizer((made,))


def _check_first_steps(t: FromTorch, kwargs: Mapping[str, Any]) -> None:
    """Refuse an optimizer whose state ftrain cannot hold before the first step: ftrain
    creates the state at init (from a recorded step on zero gradients), torch at the first
    update, from the gradient (SGD's momentum buffer with dampening: torch starts it at
    the gradient, a zero buffer gives (1 - dampening) times it). Two steps on a probe
    parameter, both ways, must agree bitwise."""
    grad = torch.linspace(-1.0, 1.0, 4).reshape(2, 2)
    theirs = torch.ones(2, 2, requires_grad=True)
    opt = t.cls([theirs], **kwargs)
    mine = torch.ones(2, 2, requires_grad=True)
    state = t.init({"w": mine.detach()})
    count = torch.zeros((), dtype=torch.int64)
    with torch.no_grad():
        for _ in range(2):
            theirs.grad, mine.grad = grad.clone(), grad.clone()
            opt.step()
            t.apply({"w": mine}, state, count, None)
            count += 1
    if not torch.equal(theirs, mine):
        raise ConfigError(
            f"from_torch({t.cls.__name__}, {dict(t.kwargs)}): this optimizer builds its "
            f"state from the first gradient, which ftrain's state (made before the first "
            f"step) cannot reproduce; its updates would differ from torch's"
            + (" (ft.optim.sgd supports dampening)" if t.cls is torch.optim.SGD else ""))


def _check_groups(cls: type, base: Mapping[str, Any],
                  groups: Mapping[Pattern, Mapping[str, Any]] | None) -> None:
    for pattern, opts in (groups or {}).items():
        if not isinstance(opts, Mapping):
            raise ConfigError(f"from_torch({cls.__name__}): group {pattern!r} must map "
                              f"setting names to values, got {type(opts).__name__}")
        if "lr" in opts:
            check_lr(opts["lr"], f"from_torch({cls.__name__}) group {pattern!r}")
    Groups.build(base, groups)  # a setting torch's defaults do not have is refused
