"""What EMA and SWA share: the averaged weights in a slot, their update, and `averaged`.

A layer that averages keeps `state.slots[name] = {"kind", "count", "seen", "params",
"buffers", ...}`: `params` mirrors `state.params` (same names, shapes, dtypes, devices),
`buffers` the floating-point buffers it averages or recomputed (BatchNorm statistics);
`count` is the number of updates made (a host int, so deciding needs no sync) and `seen`
the `state.step` the slot is current for. The slot is plain data, so a checkpoint holds
it and a resume continues the average exactly.

`averaged(state, name)` is the state with those weights swapped in: usable with
`ft.evaluate`, `ft.bind`, `ft.export.*` and `ft.save`. `averaged(evaluator, name)` is an
evaluator that evaluates on them (for `with_validation`, placed outside the layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, overload

import torch
from torch import nn

from ftrain.core import slots as _slots
from ftrain.core.state import TrainState, clone_tree, parts
from ftrain.errors import CheckpointError, ConfigError

Tree = dict[str, Any]


# -- trees of tensors (params nest one level deeper for a multi-model state) -------------

def pairs(avg: Tree, ref: Tree) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(averaged, current) tensor pairs, walking `avg`'s names (a subset of `ref`'s)."""
    for key, value in avg.items():
        if isinstance(value, dict):
            yield from pairs(value, ref[key])
        else:
            yield value, ref[key]


def floating(tree: Tree) -> Tree:
    """The floating-point tensors of a (nested) dict: what can be averaged."""
    out: Tree = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = floating(value)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = value
    return out


def merged(base: Tree, over: Tree) -> Tree:
    """`base` with the tensors of `over` (same nesting) in place of its own."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) else value
    return out


def check_tree(saved: Any, ref: Tree, where: str) -> None:
    """A slot's tree read back (maybe from a file): the same names, shapes, dtypes and
    devices as `ref`, else a CheckpointError naming the first difference."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} must be a dict of tensors, found "
                              f"{_slots.short(saved, 100)}")
    if set(saved) != set(ref):
        raise CheckpointError(f"{where} does not fit this state: missing "
                              f"{sorted(set(ref) - set(saved))[:8]}, unknown "
                              f"{sorted(map(str, set(saved) - set(ref)))[:8]}")
    for key, want in ref.items():
        got = saved[key]
        if isinstance(want, dict):
            check_tree(got, want, f"{where}.{key}")
        elif not isinstance(got, torch.Tensor) or got.shape != want.shape or \
                got.dtype != want.dtype or got.device != want.device:
            found = (f"{got.dtype}{list(got.shape)} on {got.device}"
                     if isinstance(got, torch.Tensor) else _slots.short(got, 60))
            raise CheckpointError(f"{where}.{key} must be {want.dtype}{list(want.shape)} on "
                                  f"{want.device} (as the state's), found {found}")


def copy_tree(tree: Tree) -> Tree:
    return clone_tree(tree)  # type: ignore[no-any-return]


# -- the update: one foreach kernel per (device, dtype) group ----------------------------

def grouped(avg: Any, cur: Any) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The pairs split by (device, dtype), as torch's AveragedModel groups them."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Any], list[Any]]] = {}
    for a, c in zip(avg, cur):
        g = groups.setdefault((a.device, a.dtype), ([], []))
        g[0].append(a)
        g[1].append(c)
    return list(groups.values())


def grouped_pairs(avg: Tree, ref: Tree) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """`grouped` over the pairs of two trees (see `pairs`)."""
    a, c = [], []
    for x, y in pairs(avg, ref):
        a.append(x)
        c.append(y)
    return grouped(a, c)


@torch.no_grad()
def lerp_(groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]], weight: float) -> None:
    """avg += weight * (cur - avg) on the device, torch's `_foreach_lerp_` per group: the
    kernel of `get_ema_multi_avg_fn` (weight = 1 - decay) and of
    `get_swa_multi_avg_fn` (weight = 1 / (n + 1)). No host sync."""
    for avg, cur in groups:
        torch._foreach_lerp_(avg, cur, weight)


@torch.no_grad()
def copy_(groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
    """avg = cur (the first update, as AveragedModel's)."""
    for avg, cur in groups:
        torch._foreach_copy_(avg, cur)


# -- the slot ----------------------------------------------------------------------------

SLOT_FIELDS = {"kind": (_slots.text, "'ema' or 'swa'"),
               "count": (_slots.count, "an int >= 0"),
               "seen": (_slots.count, "an int >= 0")}


def fresh_slot(state: TrainState, kind: str, buffers: bool) -> dict[str, Any]:
    """A new slot: copies of the params (and floating buffers), no update made yet."""
    return {"kind": kind, "count": 0, "seen": state.step,
            "params": copy_tree(state.params),
            "buffers": copy_tree(floating(state.buffers)) if buffers else {}}


def check_slot(slot: Any, name: str, kind: str, state: TrainState,
               buffers_ref: Tree | None) -> None:
    """A slot read back from a checkpoint fits this layer and this state."""
    _slots.check(slot, name, SLOT_FIELDS)
    if slot["kind"] != kind:
        raise CheckpointError(f"the state's {name!r} slot holds a {slot['kind']!r} average, "
                              f"this layer keeps a {kind!r} one; give it another name=")
    check_tree(slot.get("params"), state.params, f"the {name!r} slot's params")
    if buffers_ref is not None:
        check_tree(slot.get("buffers"), buffers_ref, f"the {name!r} slot's buffers")


def slot_of(state: TrainState, name: str) -> dict[str, Any]:
    if not isinstance(state, TrainState):
        raise ConfigError(f"averaged expects a TrainState (or an evaluator), got "
                          f"{type(state).__name__}")
    slot = state.slots.get(name)
    if slot is None:
        averaging = sorted(k for k, v in state.slots.items()
                           if isinstance(v, dict) and v.get("kind") in ("ema", "swa"))
        raise ConfigError(f"this state has no {name!r} slot of averaged weights (slots with "
                          f"averages: {averaging}); run it through ft.with_ema or ft.with_swa "
                          f"(name={name!r}) first. Evaluating inside the layer's init (a "
                          "with_validation sanity check inside with_ema) also lands here: "
                          "place with_validation outside the averaging layer")
    _slots.check(slot, name, SLOT_FIELDS)
    return slot  # type: ignore[no-any-return]


def has_batch_norm(state: TrainState) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               for _, template, *_ in parts(state) for m in template.modules())


# -- the averaged state and evaluator ----------------------------------------------------

def averaged_state(state: TrainState, name: str) -> TrainState:
    slot = slot_of(state, name)
    if slot["seen"] != state.step:
        raise ConfigError(
            f"the {name!r} average was last brought up to date at step {slot['seen']}, "
            f"this state is at step {state.step}: it would not hold this step's average. "
            f"Evaluate outside the averaging layer (ft.with_validation(ft.with_ema(step, "
            f"...), ft.averaged(evaluator), data)), not inside it")
    if slot["count"] == 0:  # no update made yet (before start_step): the weights themselves
        return state.replace()
    buffers = state.buffers
    if slot["kind"] == "swa" and has_batch_norm(state):
        if slot.get("bn") != slot["count"]:
            raise ConfigError(
                f"the {name!r} SWA average has BatchNorm statistics of other weights (they "
                f"were last recomputed at update {slot.get('bn')}, the average has "
                f"{slot['count']} updates); recompute them with ft.update_bn(state, data, "
                f"name={name!r}) (with_swa does this at the run's last epoch given bn_data=)")
        buffers = merged(buffers, slot["buffers"])
    elif slot["buffers"]:
        buffers = merged(buffers, slot["buffers"])
    return state.replace(params=merged(state.params, slot["params"]), buffers=buffers)


class AveragedEval:
    """An evaluator that evaluates `evaluator` on the averaged weights of slot `name`."""

    def __init__(self, evaluator: Callable[[TrainState, Any], Any], name: str) -> None:
        self.evaluator = evaluator
        self.name = name

    def __repr__(self) -> str:
        return f"averaged({self.evaluator!r}, name={self.name!r})"

    def __getattr__(self, attr: str) -> Any:
        if attr in ("evaluator", "name"):
            raise AttributeError(attr)
        value = getattr(self.evaluator, attr)
        if attr == "start_evaluation":  # an eval_step with metrics=: its session, averaged
            def start(*args: Any, **kwargs: Any) -> Any:
                session = value(*args, **kwargs)
                return None if session is None else _AveragedSession(session, self.name)
            return start
        return value  # the evaluator's options (e.g. its metrics)

    def __call__(self, state: TrainState, batch: Any) -> Any:
        # a new params dict: never the loop's binding, so the evaluator runs the averaged
        # tensors through the template (functional_call), leaving the live model alone
        return self.evaluator(averaged_state(state, self.name), batch)


class _AveragedSession:
    """One evaluation's session (fresh metric copies) run on the averaged weights."""

    def __init__(self, session: Any, name: str) -> None:
        self.session, self.name = session, name

    def __getattr__(self, attr: str) -> Any:
        if attr in ("session", "name"):
            raise AttributeError(attr)
        return getattr(self.session, attr)  # compute(), ...

    def __call__(self, state: TrainState, batch: Any, *args: Any, **kwargs: Any) -> Any:
        return self.session(averaged_state(state, self.name), batch, *args, **kwargs)


@overload
def averaged(target: TrainState, name: str = "ema") -> TrainState: ...
@overload
def averaged(target: Callable[[TrainState, Any], Any], name: str = "ema") -> AveragedEval: ...


def averaged(target: Any, name: str = "ema") -> Any:
    """The averaged weights of `ft.with_ema` / `ft.with_swa` (slot `name`) in use.

    Given a state: the state with the averaged params (and the averaged or recomputed
    buffers) swapped in, sharing the slot's tensors (`.copy()` to keep them apart); use it
    with `ft.evaluate`, `ft.bind`, `ft.export.*`, `ft.save`. Before the first update it is
    the state itself. Given an evaluator: an evaluator that evaluates on the averaged
    weights, for `ft.with_validation` placed *outside* the averaging layer (inside it, the
    average would be a step behind: refused with an error).

    Examples:
        >>> import torch, ftrain as ft
        >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> step = ft.with_ema(ft.train_step(loss), decay=0.9)
        >>> step = ft.with_validation(step, ft.averaged(ft.eval_step(loss)), data[:2])
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state = ft.fit(step, state, data, epochs=2, logger=False, checkpoint=False,
        ...                progress=False)
        >>> ema = ft.averaged(state)
        >>> bool((ema.params["weight"] != state.params["weight"]).any())
        True
        >>> sorted(ft.evaluate(ft.eval_step(loss), ema, data))
        ['loss']
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name= must be a non-empty string, got {name!r}")
    if isinstance(target, TrainState):
        return averaged_state(target, name)
    if callable(target):
        return AveragedEval(target, name)
    raise ConfigError(f"averaged takes a TrainState or an evaluator, got "
                      f"{type(target).__name__}")
