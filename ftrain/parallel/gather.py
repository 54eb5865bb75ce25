"""Sharded prediction's collectives: one model on every rank, and every rank's outputs
gathered on every rank in the one-process order.

Under with_ddp the ranks' parameters are identical, but their buffers are not: each
rank's last forward updated its BatchNorm statistics from its own batch (DDP broadcasts
rank 0's at the start of the next forward). `rank0_buffers` gives a prediction rank 0's
buffers (the ones its checkpoints hold) on copies, so every rank predicts with the same
model and the gathered outputs are the ones a single process would produce.

`ft.predict` on several processes deals out whole batches (batch i to rank i % world) and
each rank keeps `(i, output)` pairs. Gathering them takes two collectives:

1. one object all-gather of the *structure*: each output with its tensors (in dicts,
   lists, tuples, namedtuples) replaced by placeholders that say dtype, shape, device
   type and where their bytes lie; anything else (numbers, strings, other objects)
   travels here as it is;
2. one tensor all-gather of the *data*: each rank's tensors as raw bytes in one buffer,
   padded to the longest rank's (ranks hold unequal shares: 5 batches on 2 ranks), so any
   dtype (bfloat16, bool, complex) goes in the same call.

A rank's own outputs are returned as they were; the others' tensors are views into the
gathered buffer, moved to this rank's device when they were on an accelerator. Errors
(an output that cannot be sent) are found before the first collective and raised on every
rank, so no rank is left waiting.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from ftrain.core.state import TrainState, clone_tree
from ftrain.errors import ConfigError, FTrainError

_ALIGN = 16  # bytes: the largest element (complex128), so every slice views as its dtype


class _Hole:
    """A tensor's place in a gathered output: what to rebuild from the bytes."""

    __slots__ = ("device", "dtype", "nbytes", "offset", "shape")

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype, self.shape, self.device = t.dtype, tuple(t.shape), t.device.type
        self.offset, self.nbytes = 0, t.numel() * t.element_size()  # offset: _flatten

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.dtype, self.shape, self.device, self.offset, self.nbytes)

    def __setstate__(self, s: tuple[Any, ...]) -> None:
        self.dtype, self.shape, self.device, self.offset, self.nbytes = s


def _dense(t: torch.Tensor, index: int) -> None:
    if type(t) not in (torch.Tensor, nn.Parameter) or t.layout != torch.strided or \
            t.is_quantized:
        kind = type(t).__name__ if type(t) not in (torch.Tensor, nn.Parameter) else \
            "quantized" if t.is_quantized else str(t.layout)
        raise ConfigError(f"prediction batch {index}: gathering outputs across ranks needs "
                          f"plain dense tensors, found a {kind} tensor; return dense ones "
                          "from fn= (e.g. .to_dense()), or write_to=<folder>")


def _strip(value: Any, index: int, pairs: list[tuple[torch.Tensor, _Hole]]) -> Any:
    """`value` with each tensor replaced by a hole (appended to `pairs` with it), through
    dicts (any subclass, order kept), lists, tuples and namedtuples; anything else is a
    leaf that travels as it is (pickled)."""
    if isinstance(value, torch.Tensor):
        _dense(value, index)
        pairs.append((value, _Hole(value)))
        return pairs[-1][1]
    return _map(value, lambda v: _strip(v, index, pairs))


def _map(value: Any, fn: Any) -> Any:
    """`value`'s container rebuilt with `fn` applied to each item; a leaf as it is."""
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps the type (OrderedDict, defaultdict's factory)
        for k in out:
            out[k] = fn(out[k])
        return out
    if type(value) is list:
        return [fn(v) for v in value]
    if isinstance(value, tuple):
        items = [fn(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _fill(value: Any, parts: Any) -> Any:
    """A stripped output with each hole replaced by its tensor (`parts(hole)`)."""
    if isinstance(value, _Hole):
        return parts(value)
    return _map(value, lambda v: _fill(v, parts))


def _flatten(mine: Sequence[tuple[int, Any]]
             ) -> tuple[list[tuple[int, Any]], list[tuple[torch.Tensor, _Hole]], int]:
    """(index, output with tensors as holes) per output, each tensor with its hole, and
    the buffer's length in bytes. The bytes of tensors on one device lie together (one
    copy per device), each tensor's at an offset aligned to _ALIGN."""
    pairs: list[tuple[torch.Tensor, _Hole]] = []
    entries = [(index, _strip(out, index, pairs)) for index, out in mine]
    offset = 0
    for group in _by_device(pairs).values():
        for _, hole in group:
            hole.offset = offset
            offset += -(-hole.nbytes // _ALIGN) * _ALIGN
    return entries, pairs, offset


def _by_device(pairs: list[tuple[torch.Tensor, _Hole]]
               ) -> dict[torch.device, list[tuple[torch.Tensor, _Hole]]]:
    groups: dict[torch.device, list[tuple[torch.Tensor, _Hole]]] = {}
    for t, h in pairs:
        groups.setdefault(t.device, []).append((t, h))
    return groups


def _raw(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes as a flat uint8 tensor (a copy only if `t` is not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _pack(pairs: list[tuple[torch.Tensor, _Hole]], size: int, device: torch.device
          ) -> torch.Tensor:
    """One uint8 buffer of `size` bytes on `device` holding every tensor at its hole's
    offset: its device's region filled there, then one copy (device to host when the
    collective runs on the CPU)."""
    buf = torch.zeros(size, dtype=torch.uint8, device=device)
    for source, group in _by_device(pairs).items():
        start = group[0][1].offset
        end = group[-1][1].offset + group[-1][1].nbytes
        region = torch.zeros(end - start, dtype=torch.uint8, device=source)
        for t, h in group:
            region[h.offset - start:h.offset - start + h.nbytes].copy_(_raw(t))
        buf[start:end].copy_(region)
    return buf


def rank0_buffers(state: TrainState) -> TrainState:
    """`state` with its buffers replaced by copies holding rank 0's values (one broadcast:
    collective here) and a new params dict holding the same tensors, so that a loop's
    binding of `state` is not used (nor changed) for the prediction. Every rank calls
    it; `state` itself is not changed. Unchanged without buffers or process group.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.parallel.gather import rank0_buffers
        >>> state = ft.TrainState.create(torch.nn.BatchNorm1d(2))
        >>> rank0_buffers(state) is state   # one process: nothing to agree on
        True
    """
    from ftrain.parallel.dist import broadcast, rank_world
    leaves = [t for t in pytree.tree_leaves(state.buffers) if isinstance(t, torch.Tensor)]
    if rank_world()[1] <= 1 or not leaves:
        return state
    buffers = clone_tree(state.buffers)
    broadcast([t for t in pytree.tree_leaves(buffers) if isinstance(t, torch.Tensor)])
    return state.replace(params=dict(state.params), buffers=buffers)


def gather_outputs(mine: Sequence[tuple[int, Any]], device: torch.device) -> list[Any]:
    """Every rank's `(index, output)` pairs, as one list in index order, on every rank.

    Every rank calls it (two collectives and a host sync). Tensors another rank produced
    on an accelerator come to `device` (this rank's); CPU tensors stay on the CPU.
    Outside a process group (or on one process) it just orders `mine`.

    Examples:
        >>> import torch
        >>> from ftrain.parallel.gather import gather_outputs
        >>> gather_outputs([(1, "b"), (0, torch.ones(1))], torch.device("cpu"))
        [tensor([1.]), 'b']
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world <= 1:
        return [out for _, out in sorted(mine, key=lambda p: p[0])]
    rank = dist.get_rank()
    payload: bytes | None = None
    problem: str | None = None
    try:
        entries, pairs, size = _flatten(mine)
        payload = pickle.dumps(entries)
    except Exception as err:  # reported to every rank below, not raised alone
        pairs, size = [], 0
        problem = str(err) if isinstance(err, FTrainError) else \
            f"its outputs cannot be sent to the other ranks ({type(err).__name__}: {err})"
    found: list[Any] = [None] * world
    dist.all_gather_object(found, (payload, size, problem))  # collective + host sync here
    bad = [(r, p) for r, (_, _, p) in enumerate(found) if p is not None]
    if bad:
        raise ConfigError("ft.predict across ranks: " + "; ".join(
            f"rank {r}: {p}" for r, p in bad))
    most = max(s for _, s, _ in found)
    parts: list[torch.Tensor] = []
    if most:  # every rank sees the same sizes: all call it or none
        from ftrain.parallel.dist import collective_device
        where = collective_device()
        buf = _pack(pairs, most, where)
        parts = [torch.empty(most, dtype=torch.uint8, device=where) for _ in range(world)]
        dist.all_gather(parts, buf)  # collective here
    outputs: dict[int, Any] = dict(mine)  # this rank's own, as they are
    for r, (blob, _, _) in enumerate(found):
        if r == rank:
            continue
        moved: dict[str, torch.Tensor] = {}  # rank r's bytes, once per target device

        def tensor(hole: _Hole, r: int = r, moved: dict[str, torch.Tensor] = moved
                   ) -> torch.Tensor:
            # made on rank r's accelerator: to this rank's; on the CPU: stays there
            target = str(device) if hole.device == device.type else hole.device
            if target not in moved:  # one copy per rank and device
                moved[target] = parts[r].to(target)
            raw = moved[target][hole.offset:hole.offset + hole.nbytes]
            return raw.view(hole.dtype).reshape(hole.shape)  # a view: no copy
        for index, stripped in pickle.loads(blob):  # a peer's, of this very job
            outputs[index] = _fill(stripped, tensor)
    order = sorted(outputs)
    if order != list(range(len(order))):  # dealt by shard_batches: never, unless a bug
        raise FTrainError(f"gathered predictions of batches {order[:10]}..., expected "
                          f"0..{len(order) - 1}")
    return [outputs[i] for i in order]
