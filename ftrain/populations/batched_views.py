"""Rules of the batched fast path for views, indexing and joins: a member's dims are
the stacked tensor's dims after the first (see `batched_rules`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ftrain.populations.batched import RULES, Members, Rule, Unsupported
from ftrain.populations.batched_rules import (
    _getter,
    _is,
    _members,
    _padded,
    _phys,
    _rank,
    _register,
    _variants,
)

T = torch.Tensor


# -- views and indexing --------------------------------------------------------------------

def _sizes(args: tuple[Any, ...], kwargs: dict[str, Any], key: str) -> tuple[int, ...]:
    """`f(2, 3)`, `f((2, 3))` or `f(key=(2, 3))` -> (2, 3)."""
    if not args and key in kwargs:
        args = (kwargs.pop(key),)
    shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], Sequence) else args
    if kwargs or not all(type(s) is int for s in shape):  # e.g. view(dtype)
        raise Unsupported("a view with a dtype, tensors or other arguments")
    return shape


def _view(func: Any, key: str) -> Rule:
    def rule(x: Members, *args: Any, **kwargs: Any) -> Any:
        stacked = x.stacked
        return Members(func(stacked, (stacked.shape[0], *_sizes(args, kwargs, key))))
    return rule


_register([T.reshape, torch.reshape], _view(torch.reshape, "shape"))
RULES[T.view] = _view(T.view, "size")


def _expand(x: Members, *args: Any, **kwargs: Any) -> Any:
    sizes = _sizes(args, kwargs, "size")
    if len(sizes) < _rank(x):
        raise Unsupported("expand to fewer dims")
    return Members(_padded(x, len(sizes)).expand(-1, *sizes))


def _as(func: Rule) -> Rule:
    return lambda x, other: func(x, *(other.stacked.shape[1:] if _is(other) else other.shape))


RULES[T.expand] = _expand
RULES[T.expand_as] = _as(_expand)
RULES[T.view_as] = _as(RULES[T.view])
RULES[T.reshape_as] = _as(RULES[T.reshape])


def _flatten(x: Members, start_dim: int = 0, end_dim: int = -1) -> Any:
    stacked, rank = x.stacked, _rank(x)
    if rank == 0:
        return Members(stacked.reshape(stacked.shape[0], 1))
    return Members(stacked.flatten(_phys(start_dim, rank), _phys(end_dim, rank)))


def _unflatten(x: Members, dim: int, sizes: Sequence[int]) -> Any:
    return Members(x.stacked.unflatten(_phys(dim, _rank(x)), sizes))


def _unsqueeze(x: Members, dim: int) -> Any:
    return Members(x.stacked.unsqueeze(_phys(dim, _rank(x) + 1)))


def _squeeze(x: Members, dim: Any = None) -> Any:
    stacked, rank = x.stacked, _rank(x)
    if rank == 0:
        return Members(stacked)
    if dim is None:
        dims = tuple(i + 1 for i, s in enumerate(stacked.shape[1:]) if s == 1)
    else:
        dims = tuple(_phys(d, rank) for d in (dim if isinstance(dim, Sequence) else (dim,)))
    return Members(stacked.squeeze(dims) if dims else stacked)


def _transpose(x: Members, dim0: int, dim1: int) -> Any:
    rank = _rank(x)
    return Members(x.stacked.transpose(_phys(dim0, rank), _phys(dim1, rank)))


def _permute(x: Members, *args: Any, **kwargs: Any) -> Any:
    rank = _rank(x)
    dims = _sizes(args, kwargs, "dims")
    return Members(x.stacked.permute(0, *(_phys(d, rank) for d in dims)))


def _movedim(x: Members, source: Any, destination: Any) -> Any:
    rank = _rank(x)

    def phys(d: Any) -> Any:
        return tuple(_phys(i, rank) for i in d) if isinstance(d, Sequence) else _phys(d, rank)

    return Members(x.stacked.movedim(phys(source), phys(destination)))


def _t(x: Members) -> Any:
    rank = _rank(x)
    if rank > 2:
        raise Unsupported("t() of more than 2 dims")
    return Members(x.stacked.transpose(1, 2) if rank == 2 else x.stacked)


def _big_t(x: Members) -> Any:
    rank = _rank(x)
    return Members(x.stacked.permute(0, *range(rank, 0, -1)))


def _mt(x: Members) -> Any:
    if _rank(x) < 2:
        raise Unsupported("mT of fewer than 2 dims")
    return Members(x.stacked.transpose(-2, -1))


_register([T.flatten, torch.flatten], _flatten)
_register([T.unflatten, torch.unflatten], _unflatten)
_register([T.unsqueeze, torch.unsqueeze], _unsqueeze)
_register([T.squeeze, torch.squeeze], _squeeze)
_register([T.transpose, torch.transpose, T.swapaxes, torch.swapaxes, T.swapdims,
           torch.swapdims], _transpose)
_register([T.permute, torch.permute], _permute)
_register([T.movedim, torch.movedim, T.moveaxis, torch.moveaxis], _movedim)
_register([T.t, torch.t], _t)
RULES[_getter("T")] = _big_t
RULES[_getter("mT")] = _mt


def _getitem(x: Any, index: Any) -> Any:
    """Basic indexing, and plain tensor indices side by side (then they stay in place)."""
    if not _is(x):
        raise Unsupported("indexing with a member tensor")
    items = index if isinstance(index, tuple) else (index,)
    advanced = []
    for i, item in enumerate(items):
        if isinstance(item, (torch.Tensor, list)):
            if _is(item) or (isinstance(item, list) and not all(type(v) is int for v in item)):
                raise Unsupported("indexing with a member tensor or a nested list")
            advanced.append(i)
        elif isinstance(item, bool) or not (item is None or item is Ellipsis
                                            or isinstance(item, (int, slice))):
            raise Unsupported(f"indexing with {type(item).__name__}")
        elif isinstance(item, slice) and any(isinstance(v, torch.Tensor)
                                             for v in (item.start, item.stop, item.step)):
            raise Unsupported("a slice with tensor bounds")
    if advanced and advanced[-1] - advanced[0] != len(advanced) - 1:
        raise Unsupported("advanced indices apart (they would move to the front)")
    full = (slice(None), *items)
    return Members(x.stacked[full])


RULES[T.__getitem__] = _getitem


def _pieces(method: str) -> Rule:
    def rule(x: Members, arg: Any, dim: int = 0) -> Any:
        if isinstance(arg, torch.Tensor):
            raise Unsupported(f"{method} with a tensor argument")
        return _members(*getattr(x.stacked, method)(arg, _phys(dim, _rank(x))))
    return rule


def _unbind(x: Members, dim: int = 0) -> Any:
    return _members(*x.stacked.unbind(_phys(dim, _rank(x))))


_register([T.chunk, torch.chunk], _pieces("chunk"))
_register([T.split, torch.split], _pieces("split"))
_register([T.unbind, torch.unbind], _unbind)


def _narrow(x: Members, dim: int, start: int, length: int) -> Any:
    if isinstance(start, torch.Tensor):
        raise Unsupported("narrow with a tensor start")
    return Members(x.stacked.narrow(_phys(dim, _rank(x)), start, length))


def _select(x: Members, dim: int, index: int) -> Any:
    if isinstance(index, torch.Tensor):
        raise Unsupported("select with a tensor index")
    return Members(x.stacked.select(_phys(dim, _rank(x)), index))


_register([T.narrow, torch.narrow], _narrow)
_register([T.select, torch.select], _select)


def _joined(func: Any, new_dim: bool) -> Rule:
    """cat/stack: plain tensors are every member's (expanded); the dim shifts by one."""

    def rule(tensors: Sequence[torch.Tensor], dim: int = 0) -> Any:
        n = next(t.stacked.shape[0] for t in tensors if _is(t))
        rank = _rank(tensors[0])
        if any(_rank(t) != rank for t in tensors):
            raise Unsupported(f"{func.__name__} of tensors of different ranks")
        stacked = [t.stacked if _is(t) else t.expand(n, *t.shape) for t in tensors]
        return Members(func(stacked, _phys(dim, rank + 1 if new_dim else rank)))

    return rule


_register([torch.cat, torch.concat, torch.concatenate], _joined(torch.cat, False))
_register([torch.stack], _joined(torch.stack, True))


def _gather(x: Any, dim: int, index: Any, *, sparse_grad: bool = False) -> Any:
    if not _is(x) or sparse_grad:
        raise Unsupported("gather from a plain tensor or with sparse gradients")
    n = x.stacked.shape[0]
    idx = index.stacked if _is(index) else index.expand(n, *index.shape)
    return Members(torch.gather(x.stacked, _phys(dim, _rank(x)), idx))


def _index_select(x: Any, dim: int, index: Any) -> Any:
    if not _is(x) or _is(index):
        raise Unsupported("index_select with member indices")
    return Members(torch.index_select(x.stacked, _phys(dim, _rank(x)), index))


def _flip(x: Members, *args: Any, **kwargs: Any) -> Any:
    rank = _rank(x)
    return Members(x.stacked.flip(tuple(_phys(d, rank) for d in _sizes(args, kwargs, "dims"))))


def _last_two(func: Any) -> Rule:
    """tril/triu: on a member's last two dims, which the stacked tensor shares."""
    def rule(x: Members, *args: Any, **kwargs: Any) -> Any:
        if _rank(x) < 2:
            raise Unsupported(f"{func.__name__} of fewer than 2 dims")
        return Members(func(x.stacked, *args, **kwargs))
    return rule


_register([T.gather, torch.gather], _gather)
_register([T.index_select, torch.index_select], _index_select)
_register([T.flip, torch.flip], _flip)
for _name in ("tril", "triu"):
    _register(_variants(_name)[:2], _last_two(getattr(torch, _name)))
