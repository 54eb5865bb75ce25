"""`with_activation_checkpointing`: recompute chosen submodules' activations in backward.

The combinator returns a new stack whose core step's loss function runs with the chosen
submodules' `forward` replaced (an instance attribute, restored after the call, also on
error) by a call through `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`.
Only the `forward` is replaced, so module hooks (FSDP2's unshard/reshard, users' hooks)
run outside the checkpointed region, once, as with torch's `checkpoint_wrapper`.

Torch's checkpoint restores the RNG state (dropout draws the same mask when recomputed)
and the autocast state. Two things it does not do are handled here:

- a pure (direct) call runs the model through `functional_call`, which has put the
  template's meta tensors back by the time backward recomputes; the forward's parameters
  are remembered and swapped in for the recomputation;
- a forward that updates buffers in place (BatchNorm's running statistics) would update
  them a second time when recomputed; the recomputation runs on copies of the buffers as
  they were before the forward, so the update happens once.

With `ft.compile` (either order): dynamo cannot trace swapping a forward, so the
compiled step installs the checkpointed forwards once on its private copy of the model
(`install`) and traces the plain loss function; its gradients then come from
`torch.autograd.grad` (torch.func refuses checkpoint's saved-tensor hooks), and inductor
rematerializes each region in the backward part of the one graph. Same numbers as the
compiled step without checkpointing (bitwise here) and as the eager checkpointed step (to
float tolerance). Dropout inside a checkpointed submodule is refused there (inductor
cannot recompute random ops in such a graph yet): `fallback=True` runs it eagerly.
"""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ftrain.core.layer import Step, map_core
from ftrain.errors import ConfigError

Spec = str | type


def _check_specs(modules: Any) -> tuple[Spec, ...]:
    if isinstance(modules, (str, type)):
        modules = (modules,)
    try:
        specs = tuple(modules)
    except TypeError:
        raise ConfigError(f"with_activation_checkpointing: modules must be name patterns "
                          f"(e.g. 'blocks.*') or nn.Module classes, got "
                          f"{type(modules).__name__}") from None
    if not specs:
        raise ConfigError("with_activation_checkpointing: modules is empty; name at least "
                          "one submodule pattern or class")
    for s in specs:
        if not (isinstance(s, str) and s) and not (isinstance(s, type)
                                                   and issubclass(s, nn.Module)):
            raise ConfigError(f"with_activation_checkpointing: each of modules must be a "
                              f"non-empty name pattern or an nn.Module class, got {s!r}")
    return specs


def _named(model: Any) -> Iterator[tuple[str, nn.Module]]:
    """Every submodule by qualified name ("part.name" for a dict of models)."""
    if isinstance(model, nn.Module):
        yield from model.named_modules()
    elif isinstance(model, dict):
        for part, m in model.items():
            for name, sub in m.named_modules():
                yield (f"{part}.{name}" if name else part), sub
    else:
        raise ConfigError(f"with_activation_checkpointing: the loss function got a "
                          f"{type(model).__name__}, not a module or a dict of modules")


def select(model: Any, specs: Sequence[Spec]) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of `model` that a spec matches (a nested match is inside
    an outer one's recomputation already); a spec matching nothing is a ConfigError."""
    used: set[int] = set()
    chosen: list[tuple[str, nn.Module]] = []
    for name, sub in _named(model):
        hits = [i for i, s in enumerate(specs)
                if (isinstance(s, str) and fnmatch.fnmatchcase(name, s))
                or (isinstance(s, type) and isinstance(sub, s))]
        if hits:
            used.update(hits)
            chosen.append((name, sub))
    unused = [specs[i] for i in range(len(specs)) if i not in used]
    if unused:
        names = [n for n, _ in _named(model) if n][:12]
        raise ConfigError(f"with_activation_checkpointing: {unused} match no submodule; "
                          f"the model's submodules include {names}")
    outer: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, sub in chosen:  # named_modules lists a parent before its children
        if any(name == o or name.startswith(o + ".") or o == "" for o, _ in outer):
            continue
        if id(sub) in seen:  # one module under two names (shared): checkpoint it once
            continue
        seen.add(id(sub))
        outer.append((name, sub))
    return outer


def _roots(model: Any) -> list[Any]:
    """The module objects a selection depends on (one, or a dict's values in order)."""
    if isinstance(model, dict):
        return [(k, weakref.ref(m)) for k, m in model.items()]
    return [weakref.ref(model)] if isinstance(model, nn.Module) else [model]


def _same_roots(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x == y for x, y in zip(a, b))


def install(model: Any, specs: Sequence[Spec]) -> list[nn.Module]:
    """Give the submodules of `model` that `specs` choose a checkpointed forward for good
    (an instance attribute), for ft.compile's private copy of the model; returns them.
    Dynamo traces each call as a checkpoint region that inductor rematerializes in the
    backward part of the same graph (a graph transform: no Python recomputation, so the
    eager path's parameter and buffer swaps are not needed; buffers are updated once)."""
    targets = [sub for _, sub in select(model, specs)]
    for sub in targets:
        if "forward" in sub.__dict__:
            raise ConfigError(f"with_activation_checkpointing: {sub!r} has its own "
                              "instance forward already (checkpointed twice?)")
        sub.forward = _compiled_forward(sub.forward)  # type: ignore[method-assign]
    return targets


def _compiled_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return forward


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner, name, is_buffer) for every parameter and buffer under `module`."""
    out: list[tuple[nn.Module, str, bool]] = []
    for sub in module.modules():
        out.extend((sub, n, False) for n, p in sub._parameters.items() if p is not None)
        out.extend((sub, n, True) for n, b in sub._buffers.items() if b is not None)
    return out


@contextlib.contextmanager
def _swapped(changes: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> Iterator[None]:
    old: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for owner, name, is_buffer, value in changes:
            table: dict[str, Any] = owner._buffers if is_buffer else owner._parameters
            old.append((table, name, table[name]))
            table[name] = value
    except BaseException:
        for table, name, value in reversed(old):
            table[name] = value
        raise
    try:
        yield
    finally:
        for table, name, value in reversed(old):
            table[name] = value


def _checkpointed_forward(module: nn.Module, original: Callable[..., Any]
                          ) -> Callable[..., Any]:
    """`module.forward` through torch's non-reentrant checkpoint."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        slots = _slots(module)
        # the tensors this forward sees; buffers copied as they were before it (small)
        seen = [(o, n, b, getattr(o, n)) for o, n, b in slots]
        before = [(o, n, b, t.detach().clone() if b else t) for o, n, b, t in seen]
        calls = [0]

        def run(*a: Any, **kw: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:  # the forward itself
                return original(*a, **kw)
            # backward's recomputation: the forward's parameters (a pure call's are gone
            # from the template by now) and fresh copies of the buffers it started from
            changes = [(o, n, b, t.clone() if b else t) for o, n, b, t in before
                       if b or getattr(o, n) is not t]
            with _swapped(changes):
                return original(*a, **kw)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)
    return forward


class _CheckpointedLoss:
    """The loss function with the chosen submodules' forwards checkpointed for the call."""

    def __init__(self, loss_fn: Callable[..., Any], specs: tuple[Spec, ...]) -> None:
        self.loss_fn = loss_fn
        self.specs = specs
        self.__qualname__ = getattr(loss_fn, "__qualname__", repr(loss_fn))
        # the last selection and the model object(s) it was made on (weakly): a step
        # walks no module tree while the model stays the same object
        self._selected: tuple[list[Any], list[tuple[str, nn.Module]]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_selected": None}  # weak references do not pickle

    def targets(self, model: Any) -> list[tuple[str, nn.Module]]:
        """`select(model, self.specs)`, cached per model object."""
        roots = _roots(model)
        cached = self._selected
        if cached is not None and _same_roots(cached[0], roots):
            return cached[1]
        chosen = select(model, self.specs)
        self._selected = (roots, chosen)
        return chosen

    def __repr__(self) -> str:
        return f"with_activation_checkpointing({self.__qualname__}, {list(self.specs)})"

    def __call__(self, model: Any, batch: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo cannot trace swapping a forward
            raise ConfigError(_NOT_TRACED)
        targets = self.targets(model)
        patched: list[nn.Module] = []
        try:
            for _, sub in targets:
                if "forward" in sub.__dict__:
                    raise ConfigError(f"with_activation_checkpointing: {sub!r} has its own "
                                      "instance forward already (checkpointed twice?)")
                sub.forward = _checkpointed_forward(sub, sub.forward)  # type: ignore[method-assign]
                patched.append(sub)
            return self.loss_fn(model, batch)
        finally:
            for sub in patched:
                del sub.forward


_NOT_TRACED = ("with_activation_checkpointing's loss function cannot be traced by "
               "torch.compile (dynamo cannot trace swapping a submodule's forward); use "
               "ft.compile on the step, which checkpoints its own copy of the model")


def _rebuild(core: Any, specs: tuple[Spec, ...]) -> Any:
    eager = getattr(core, "eager_step", None)
    if eager is not None:  # ft.compile's step: its eager step too (a copy, new graphs)
        if not hasattr(core, "with_phases"):
            raise ConfigError(f"with_activation_checkpointing cannot reach the eager step "
                              f"of {core!r}")
        inner = _rebuild(eager, specs)
        new = core.with_phases(core.phases)
        object.__setattr__(new, "eager_step", inner)
        object.__setattr__(new, "loss_fn", inner.loss_fn)
        return new
    loss_fn = getattr(core, "loss_fn", None)
    if loss_fn is None:
        raise ConfigError(f"with_activation_checkpointing needs a core step built by "
                          f"ft.train_step; the innermost step here is {core!r}")
    if isinstance(loss_fn, _CheckpointedLoss):
        raise ConfigError(f"with_activation_checkpointing: {core!r} checkpoints "
                          f"{list(loss_fn.specs)} already; give all modules in one call")
    new = core.with_phases(core.phases)  # a copy: `core` itself is unchanged
    object.__setattr__(new, "loss_fn", _CheckpointedLoss(loss_fn, specs))
    return new


def with_activation_checkpointing(step: Any, modules: str | type | Sequence[Spec]) -> Step:
    """Recompute the activations of the chosen submodules in backward instead of keeping
    them (`torch.utils.checkpoint`, non-reentrant): less memory, one more forward of them.

    `modules` are `fnmatch` patterns of submodule names (`"blocks.*"`; `"part.name"` for
    a multi-model state) or `nn.Module` classes; a pattern that matches nothing is a
    ConfigError at the first step, and a match inside another match is not checkpointed
    again. Dropout draws the same mask when recomputed (torch restores the RNG state), so
    the numbers are bitwise those of the step without it. It returns a new stack around
    the core step (`step` is unchanged), so it composes with `with_amp`,
    `with_accumulation`, `with_ddp` and `with_fsdp` (whose hooks stay outside the
    recomputed region), in any order, and with `ft.compile` (no dropout inside a
    checkpointed submodule there; see the module docstring).

    Examples:
        >>> import torch, ftrain as ft
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 1))
        >>> step = ft.train_step(lambda m, b: m(b).square().mean())
        >>> step = ft.with_activation_checkpointing(step, ["0", "1"])
        >>> state = ft.TrainState.create(model, ft.optim.sgd(0.1))
        >>> state, metrics = step(state, torch.randn(16, 4))
        >>> state.step
        1
    """
    specs = _check_specs(modules)
    return map_core(step, lambda core: _rebuild(core, specs))
