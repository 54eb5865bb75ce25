"""The step protocol and how layers compose: one place for forwarding and rebuilding.

A step is `step(state, batch) -> (state, metrics)`. It may also have `init(state) ->
state`, `epoch_end(state) -> (state, metrics)`, `close(state)` and `inner` (the step it
wraps). The loops drive a stack only through `init`, `epoch_end` and `close` below, so a
plain function is a step and a user's own layer needs no base class.

ftrain's own layers derive from `Combinator`, which does the forwarding once: a layer
writes only its own hooks (`setup`, `after_init`, `at_epoch_end`, `at_close`), owns at
most one named slot, and declares what it reads (`reads`) and writes (`writes`) of the
metrics, so a stack in an order that cannot work fails when it is built.

Steps are values: `map_core(step, fn)` rebuilds a stack around a new core (`fn(core)`),
copying each layer and leaving the given stack unchanged. Inner combinators (`with_amp`,
`with_accumulation`, `with_ddp`) and `ft.compile` are built on it.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs
import torch

from ftrain.core.state import TrainState
from ftrain.errors import ConfigError

Metrics = dict[str, torch.Tensor]


class Step(Protocol):
    """What a training step is: `(state, batch) -> (new state, metrics)`.

    The optional parts of the protocol (`init`, `epoch_end`, `close`, `inner`) are looked
    up with `getattr`, so any callable of this shape is a step.
    """

    def __call__(self, state: TrainState, batch: Any, /) -> tuple[TrainState, Metrics]: ...


# -- the protocol, as the loops drive it -------------------------------------------------

def init(step: Any, state: TrainState) -> TrainState:
    """Call `step.init(state)` if the step has one."""
    fn = getattr(step, "init", None)
    return fn(state) if fn is not None else state


def epoch_end(step: Any, state: TrainState) -> tuple[TrainState, Metrics]:
    """Call `step.epoch_end(state)` if the step has one."""
    fn = getattr(step, "epoch_end", None)
    if fn is None:
        return state, {}
    result = fn(state)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ConfigError(f"{step!r}.epoch_end must return (state, metrics), got "
                          f"{type(result).__name__}")
    return result  # type: ignore[no-any-return]


def close(step: Any, state: TrainState) -> None:
    """Call `step.close(state)` if the step has one."""
    fn = getattr(step, "close", None)
    if fn is not None:
        fn(state)


def layers(step: Any) -> list[Any]:
    """The combinator stack from the outermost step to the core, following `.inner`.

    Examples:
        >>> import torch, ftrain as ft
        >>> step = ft.with_logging(ft.train_step(lambda m, b: m(b).sum()), [])
        >>> [type(layer).__name__ for layer in ft.combinators.layers(step)]
        ['WithLogging', 'TrainStep']
    """
    out = []
    seen = set()
    while step is not None:
        if id(step) in seen:
            raise ConfigError("a step's .inner chain loops back on itself")
        seen.add(id(step))
        out.append(step)
        step = getattr(step, "inner", None)
    return out


def core(step: Any) -> Any:
    """The innermost step of a combinator stack (following `.inner`).

    Examples:
        >>> import torch, ftrain as ft
        >>> core = ft.train_step(lambda m, b: m(b).sum())
        >>> ft.combinators.core(ft.with_logging(core, [])) is core
        True
    """
    return layers(step)[-1]


def find(step: Any, kind: type) -> Any:
    """The outermost layer of `step` that is a `kind`, or None (for users' inspection;
    ftrain's layers and loops never look each other up)."""
    for layer in layers(step):
        if isinstance(layer, kind):
            return layer
    return None


def matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A test for metric names matching any of the `fnmatch` patterns (e.g. "val_*")."""
    regex = "|".join(fnmatch.translate(p) for p in patterns)
    if not regex:
        return lambda name: False
    return re.compile(regex).match  # type: ignore[return-value]


def written_inside(step: Any, key: str) -> list[str]:
    """The patterns, declared by the layers of `step` (`writes`), that `key` matches."""
    return [p for layer in layers(step) for p in getattr(layer, "writes", ())
            if fnmatch.fnmatchcase(key, p)]


def provides(step: Any, role: str) -> bool:
    """True when a layer of `step` declares `role` (e.g. "logging", "checkpointing"):
    how `ft.fit` adds its default layers without adding a second of a kind."""
    return any(getattr(layer, "role", None) == role for layer in layers(step))


def request(step: Any, state: TrainState, what: str) -> tuple[TrainState, list[str]]:
    """Ask every layer of `step` to do `what` now (e.g. "save": a checkpoint before
    stopping on SIGTERM). Each layer with an `on_request(state, what) -> (state, note)`
    hook may act; returns the state and the notes of those that did."""
    notes = []
    for layer in layers(step):
        hook = getattr(layer, "on_request", None)
        if hook is not None:
            state, note = hook(state, what)
            if note:
                notes.append(note)
    return state, notes


def rewrap(layer: Any, inner: Any) -> Any:
    """A copy of `layer` around `inner`; `layer` itself is unchanged."""
    if attrs.has(type(layer)):
        return attrs.evolve(layer, inner=inner)
    new = copy.copy(layer)
    if new is layer:  # a function: it calls the step it captured, which cannot be swapped
        raise ConfigError(
            f"cannot rebuild {layer!r} around a new inner step: a function is not copied "
            "and calls the step it captured. Apply inner combinators (with_amp, with_ddp, "
            "with_accumulation, ft.compile) to the core before wrapping it in your own "
            "function, or write the layer as an object that calls self.inner")
    object.__setattr__(new, "inner", inner)
    return new


def map_core(step: Any, fn: Any) -> Any:
    """The stack `step` rebuilt around `fn(core)`: every layer copied, nothing changed.

    Examples:
        >>> import torch, ftrain as ft
        >>> core = ft.train_step(lambda m, b: m(b).sum())
        >>> stack = ft.with_logging(core, [])
        >>> other = ft.combinators.map_core(stack, lambda c: ft.train_step(c.loss_fn))
        >>> other is not stack and ft.combinators.core(stack) is core
        True
    """
    stack = layers(step)
    new = fn(stack[-1])
    for layer in reversed(stack[:-1]):
        new = rewrap(layer, new)
    check_stack(new)
    return new


def claims(layer: Any) -> tuple[str, ...]:
    """The slot names `layer` owns (a layer's `slot_name`; a core step's `slot_names`)."""
    names = getattr(layer, "slot_names", None)
    if names is not None:
        return tuple(names)
    name = getattr(layer, "slot_name", None)
    return (name,) if name else ()


def check_stack(step: Any) -> None:
    """Refuse a stack that cannot work, when it is built: two layers owning one slot, or a
    layer that reads a metric which only a layer outside it adds (it would never see it).
    Layers declare `reads` (metric names) and `writes` (metric names or prefixes)."""
    stack = layers(step)
    writers = [(prefix, layer) for layer in stack for prefix in getattr(layer, "writes", ())]
    owners: dict[str, Any] = {}
    inside: set[str] = set()  # prefixes written by the layers inside the current one
    for layer in reversed(stack):  # the core first
        for name in claims(layer):
            if name in owners:
                raise ConfigError(f"two combinators claim the slot {name!r}: {layer!r} and "
                                  f"{owners[name]!r}; give one of them another name=")
            owners[name] = layer
        for key in getattr(layer, "reads", ()):
            matching = [(p, w) for p, w in writers
                        if fnmatch.fnmatchcase(key, p) and w is not layer]
            if matching and not any(p in inside for p, _ in matching):
                raise ConfigError(
                    f"{layer!r} reads {key!r}, which only {matching[0][1]!r} adds, and that "
                    f"layer sits outside it, so it would never see the value: wrap "
                    f"{layer!r} around it instead (e.g. early_stop(with_validation(step, "
                    f"...), monitor=...))")
        inside.update(getattr(layer, "writes", ()))


class Combinator:
    """Base of ftrain's layers: forwarding, slot ownership and order checks, once.

    A layer overrides only what it does: `__call__` (calling `self.inner`), and the hooks
    `after_init(state) -> state`, `at_epoch_end(state, metrics) -> (state, metrics)`
    (`metrics`: what the layers inside it produced at this epoch end) and
    `at_close(state)`. It lists the metric names (or prefixes) it `reads` and `writes`.
    """

    slot_name: str | None = None
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def __init__(self, inner: Any, slot_name: str | None = None) -> None:
        if not callable(inner):
            raise ConfigError(f"{type(self).__name__} wraps a step (state, batch) -> "
                              f"(state, metrics), got {type(inner).__name__}")
        if slot_name is not None and (not isinstance(slot_name, str) or not slot_name):
            raise ConfigError(f"name= must be a non-empty string, got {slot_name!r}")
        self.inner = inner
        self.slot_name = slot_name

    def _checked(self) -> None:
        """Call at the end of a layer's __init__: the stack it makes must work."""
        check_stack(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(slot={self.slot_name!r})"

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        return self.inner(state, batch)  # type: ignore[no-any-return]

    # -- the protocol: the inner step first, then this layer's hook ----------------------

    def init(self, state: TrainState) -> TrainState:
        return self.after_init(init(self.inner, state))

    def epoch_end(self, state: TrainState) -> tuple[TrainState, Metrics]:
        state, metrics = epoch_end(self.inner, state)
        return self.at_epoch_end(state, metrics)

    def close(self, state: TrainState) -> None:
        try:
            close(self.inner, state)
        finally:
            self.at_close(state)

    # -- hooks a layer overrides -----------------------------------------------------------

    def after_init(self, state: TrainState) -> TrainState:
        return state

    def at_epoch_end(self, state: TrainState, metrics: Metrics
                     ) -> tuple[TrainState, Metrics]:
        return state, metrics

    def at_close(self, state: TrainState) -> None:
        return None
