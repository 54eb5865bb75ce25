"""The run context: which loop, if any, is running a state right now.

A state is data and carries no run object. A loop's live installation of a state's
tensors (a `ftrain.core.bind.Binding`: modules, DDP wrapper, the loop's settings, losses
pending a non-finite check, the profiler's recorder, requests to the loop) is registered
here under the identity of the params dict it installed. Finding it is one dict lookup
and an identity check, so a state whose params dict was replaced is rebound rather than
silently trained on the old tensors, and copies (`state.copy()`) are never bound.
"""

from __future__ import annotations

from typing import Any

_LIVE: dict[int, Any] = {}
# The step this process is at: the loop stores it before each step and the core step
# after its update (plain int stores); with_ddp's watchdog reports it when a peer's
# collective times out.
at_step = -1


def register(binding: Any) -> None:
    """Make `binding` the live one for the params dict it installed."""
    _LIVE[id(binding.params)] = binding


def unregister(binding: Any) -> None:
    key = id(binding.params)
    if _LIVE.get(key) is binding:
        del _LIVE[key]


def binding_of(state: Any) -> Any:
    """The live binding of `state` (a loop runs it), or None: plain data.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.core.context import binding_of
        >>> binding_of(ft.TrainState.create(torch.nn.Linear(1, 1))) is None
        True
    """
    params = object.__getattribute__(state, "__dict__").get("params")
    b = _LIVE.get(id(params))
    return b if b is not None and b.params is params else None


def stepping(state: Any) -> Any:
    """The binding of a loop that is calling a step on `state` right now (the step then
    runs bound, in place), or None: a direct call, which is pure."""
    params = state.params
    b = _LIVE.get(id(params))
    return b if b is not None and b.in_step and b.params is params else None
