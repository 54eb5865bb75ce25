"""Good states kept aside by `with_rollback`, and put back in place.

A snapshot copies a loop's live state: its tensors (params, buffers, optimizer state) and
the slots of the layers inside `with_rollback`. Storage is allocated once per ring entry
and reused when the ring turns (copies into it, no allocation), on the state's device or
in host memory (pinned when CUDA is there, so copies overlap). Memory: one snapshot is
params + buffers + optimizer state, so a ring of `keep` costs `keep` times that.
Restoring copies back into the live tensors, so the loop's modules, DDP's wrapper and the
optimizer's prepared update keep working on the same tensors.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from ftrain.core.state import TrainState, clone_tree
from ftrain.errors import RollbackError


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (with_fsdp), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t  # type: ignore[no-any-return]


def _leaves(state: TrainState) -> tuple[list[Any], Any]:
    return pytree.tree_flatten((state.params, state.buffers, state.opt_state))


@attrs.define
class Snapshot:
    """One good state: its step, the loop position after it, its tensors and slots."""

    step: int
    where: tuple[int, int]  # (epoch, batches consumed in it) after this step
    spec: Any  # the structure of (params, buffers, opt_state)
    tensors: list[torch.Tensor]
    others: list[Any]  # non-tensor leaves (names in an optimizer state), compared on restore
    slots: dict[str, Any]
    history: list[float]
    source: tuple[Any, ...] = ()  # the dicts it was taken from (a new one: a new structure)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def _storage(t: torch.Tensor, where: str) -> torch.Tensor:
    if where == "device":
        return torch.empty_like(t)
    return torch.empty(t.shape, dtype=t.dtype, device="cpu",
                       pin_memory=t.device.type == "cuda")


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    with torch.no_grad():
        if dst and all(d.device == s.device for d, s in zip(dst, src)):
            torch._foreach_copy_(dst, src)  # one launch per dtype
        else:  # to or from host memory: stream-ordered, so non_blocking is safe
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)


class Flat:
    """A state's tensors flattened once per run: a loop updates the same tensors in its
    same dicts, so while the dicts are the same objects the list is reused (the pytree
    walk costs more than the copy for a small model)."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] = ()
        self.live: list[torch.Tensor] = []
        self.others: list[Any] = []
        self.spec: Any = None

    def of(self, state: TrainState) -> Flat:
        # a module may reassign a buffer (`self.b = f(self.b)`) in the same dict: its
        # tensors are part of the key (a short walk; buffers are few)
        key = (state.params, state.opt_state, state.buffers,
               *pytree.tree_leaves(state.buffers))
        if len(self.key) != len(key) or any(a is not b for a, b in zip(self.key, key)):
            leaves, self.spec = _leaves(state)
            self.live = [_local(t) for t in leaves if isinstance(t, torch.Tensor)]
            self.others = [x for x in leaves if not isinstance(x, torch.Tensor)]
            self.key = key
        return self


def take(state: TrainState, where: tuple[int, int], slot_names: list[str],
         history: list[float], placement: str, reuse: Snapshot | None,
         flat: Flat | None = None) -> Snapshot:
    """A snapshot of `state` (copies), in `reuse`'s storage when the structure matches."""
    flat = (flat or Flat()).of(state)
    live, spec = flat.live, flat.spec
    fits = reuse is not None and reuse.spec == spec and len(reuse.tensors) == len(live) and \
        all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(reuse.tensors, live))
    store = reuse.tensors if fits and reuse is not None else [_storage(t, placement)
                                                               for t in live]
    _copy(store, live)
    slots = {n: clone_tree(state.slots[n]) for n in slot_names if n in state.slots}
    return Snapshot(state.step, where, spec, store, list(flat.others), slots, list(history),
                    (state.params, state.buffers, state.opt_state))


def restore(snapshot: Snapshot, state: TrainState) -> None:
    """Copy `snapshot`'s tensors back into `state`'s (in place: a loop's live tensors)."""
    leaves, spec = _leaves(state)
    live = [_local(t) for t in leaves if isinstance(t, torch.Tensor)]
    others = [x for x in leaves if not isinstance(x, torch.Tensor)]
    if spec != snapshot.spec or others != snapshot.others or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(live, snapshot.tensors)):
        raise RollbackError(
            f"with_rollback cannot go back to step {snapshot.step}: the state's parameters, "
            "buffers or optimizer state changed shape since then (a freeze, unfreeze or "
            "optimizer swap); resume from a checkpoint instead")
    _copy(live, snapshot.tensors)


def as_state(snapshot: Snapshot, like: TrainState) -> TrainState:
    """The snapshot as a state of its own (new tensors, not bound to any loop)."""
    it = iter(snapshot.tensors)
    others = iter(snapshot.others)
    leaves, _ = _leaves(like)
    rebuilt = [next(it).detach().to(t.device, copy=True) if isinstance(t, torch.Tensor)
               else next(others) for t in leaves]
    params, buffers, opt_state = pytree.tree_unflatten(rebuilt, snapshot.spec)
    slots = {**{k: v for k, v in like.slots.items() if k not in snapshot.slots},
             **clone_tree(snapshot.slots)}
    return like.replace(params=params, buffers=buffers, opt_state=opt_state,
                        step=snapshot.step, slots=slots)
