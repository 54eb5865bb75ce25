"""Joining a data-parallel run: what `with_ddp` and `with_fsdp` both do at `init`."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ftrain.core.context import binding_of
from ftrain.core.run import run_info
from ftrain.core.state import LOOP_SLOT, TrainState
from ftrain.parallel import dist as _dist


def join(state: TrainState, backend: str | None, timeout: datetime.timedelta,
         shared: Callable[[torch.Tensor], bool] = lambda t: True) -> int:
    """Join the process group torchrun describes, note this rank's place (and the failure
    handler) in the loop's run, check that every rank starts at the same step and data
    position, and copy rank 0's tensors that `shared` selects to every rank, in place.
    Returns the world size (1: a single process, nothing else done).

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.parallel.dist import DEFAULT_TIMEOUT
        >>> from ftrain.parallel.join import join
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> join(state, None, DEFAULT_TIMEOUT)  # plain python: one process
        1
    """
    rank, world = _dist.setup(backend, timeout)
    run = run_info(state)
    if run is not None:
        run.rank, run.world = rank, world
        run.on_error = _dist.fail
    binding = binding_of(state)
    if binding is not None:  # made before the group existed: its dropout stream is rank 0's
        binding.rank = rank
    if world > 1:
        pos: Any = state.slots.get(LOOP_SLOT) or {}
        _dist.check_same((state.step, int(pos.get("epoch", 0)), int(pos.get("batch", 0))),
                         "the starting (step, epoch, batch)")
        _dist.broadcast([t for t in pytree.tree_leaves((state.params, state.buffers,
                                                        state.opt_state))
                         if isinstance(t, torch.Tensor) and shared(t)])
    return world
