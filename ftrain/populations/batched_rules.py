"""The rules of the batched fast path: torch functions on `Members` computed on the
stacked [N, ...] values as vmap would compute them member by member (equal to float
rounding). Every rule either computes its function exactly so or raises `Unsupported`;
a function without a rule is unsupported.

Covered: shape queries; pointwise math and activations; reductions; softmax and friends;
view and indexing ops; matmul, `linear` (one GEMM for a shared input, `baddbmm` per
layer after it), `layer_norm`, `embedding`, `dropout` (CPU, the draws vmap makes);
`cross_entropy`, `nll_loss` (class-index targets) and the pointwise losses (`mse_loss`,
`l1_loss`, `smooth_l1_loss`, `huber_loss`, `binary_cross_entropy[_with_logits]`).
Convolutions, normalization with running statistics, recurrent layers and in-place ops
on members' parameters have no rule: such a model's step runs through vmap.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F

from ftrain.populations.batched import RULES, Members, Rule, Unsupported


def _register(funcs: Sequence[Any], rule: Rule) -> None:
    for f in funcs:
        if f is not None:
            RULES[f] = rule


def _variants(name: str) -> list[Any]:
    """`torch.name`, `Tensor.name` and `F.name`, those that exist (`torch.float` is a
    dtype, not a function)."""
    found = [getattr(ns, name, None) for ns in (torch, torch.Tensor, F)]
    return [f if callable(f) else None for f in found]


def _is(x: Any) -> TypeGuard[Members]:
    return isinstance(x, Members)


def _rank(x: torch.Tensor) -> int:
    """A tensor's rank as one member sees it."""
    return x.stacked.dim() - 1 if isinstance(x, Members) else x.dim()


def _dtype(x: torch.Tensor) -> torch.dtype:
    return x.stacked.dtype if isinstance(x, Members) else x.dtype  # (no torch function call)


def _padded(x: Members, rank: int) -> torch.Tensor:
    """x's stacked values with size-1 dims after the member dim, up to logical `rank`:
    broadcasting against plain tensors then lines up as it does for one member."""
    stacked = x.stacked
    k = rank - (stacked.dim() - 1)
    return stacked if k <= 0 else stacked.reshape(stacked.shape[:1] + (1,) * k + stacked.shape[1:])


def _phys(d: int, rank: int) -> int:
    """A member's dim `d` (of `rank` dims) as the stacked tensor's."""
    if not -rank <= d < rank:
        raise Unsupported(f"dim {d} out of range for {rank} dims")
    return d % rank + 1


def _members(*values: Any) -> Any:
    return tuple(Members(v) for v in values)


# -- shape queries -----------------------------------------------------------------------

def _meta(get: Callable[[torch.Tensor], Any]) -> Rule:
    return lambda x: get(x.stacked)


def _size(x: Members, dim: int | None = None) -> Any:
    shape = x.stacked.shape[1:]
    return shape if dim is None else shape[dim]


T = torch.Tensor


def _getter(name: str) -> Any:
    """The function a property read of a tensor passes to `__torch_function__`."""
    return getattr(T, name).__get__


for _f, _get in [(_getter("shape"), lambda t: t.shape[1:]),
                 (_getter("ndim"), lambda t: t.dim() - 1),
                 (T.dim, lambda t: t.dim() - 1), (T.ndimension, lambda t: t.dim() - 1),
                 (_getter("dtype"), lambda t: t.dtype), (_getter("device"), lambda t: t.device),
                 (_getter("is_cuda"), lambda t: t.is_cuda), (_getter("is_cpu"), lambda t: t.is_cpu),
                 (_getter("layout"), lambda t: t.layout), (T.get_device, lambda t: t.get_device()),
                 (_getter("requires_grad"), lambda t: t.requires_grad),
                 (T.is_floating_point, lambda t: t.is_floating_point()),
                 (torch.is_floating_point, lambda t: t.is_floating_point()),
                 (T.is_complex, lambda t: t.is_complex()), (T.is_signed, lambda t: t.is_signed()),
                 (T.numel, lambda t: t[0].numel()), (torch.numel, lambda t: t[0].numel()),
                 (T.nelement, lambda t: t[0].numel()), (T.element_size, lambda t: t.element_size()),
                 (T.__len__, lambda t: len(t[0]))]:
    RULES[_f] = _meta(_get)
RULES[T.size] = _size
RULES[T.__hash__] = id  # identity, as a tensor's (modules keep parameters in sets)


# -- pointwise ---------------------------------------------------------------------------

_STAND_INS: dict[tuple[torch.dtype, int], torch.Tensor] = {}


def _stand_in(dtype: torch.dtype, rank: int) -> torch.Tensor:
    t = _STAND_INS.get((dtype, rank))
    if t is None:
        t = _STAND_INS[(dtype, rank)] = torch.empty((1,) * rank, dtype=dtype)
    return t


def _check_promotion(tensors: list[torch.Tensor]) -> None:
    """Type promotion ranks 0-d tensors below dimensioned ones, and a member's 0-d value
    is dimensioned when stacked: with mixed dtypes the results could differ."""
    dtypes = [_dtype(t) for t in tensors]
    if all(d == dtypes[0] for d in dtypes):
        return
    if not any(_is(t) and t.stacked.dim() == 1 for t in tensors):
        return
    if len(tensors) == 2:
        (a, b), (da, db) = tensors, dtypes
        logical = torch.result_type(_stand_in(da, min(_rank(a), 1)),
                                    _stand_in(db, min(_rank(b), 1)))
        stacked = torch.result_type(_stand_in(da, 1 if _is(a) else min(_rank(a), 1)),
                                    _stand_in(db, 1 if _is(b) else min(_rank(b), 1)))
        if logical == stacked:
            return
    raise Unsupported("mixed dtypes with a member's 0-d value")


def _inplace_at(func: Any) -> int | None:
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _pointwise(func: Any) -> Rule:
    at = _inplace_at(func)

    def rule(*args: Any, **kwargs: Any) -> Any:
        if not kwargs and len(args) == 1:  # an activation: nothing to line up
            return Members(func(args[0].stacked))
        inplace = kwargs.get("inplace", False) or (at is not None and len(args) > at
                                                   and args[at])
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        rank = max(_rank(t) for t in tensors)
        _check_promotion(tensors)
        args = tuple(_padded(a, rank) if _is(a) else a for a in args)
        kwargs = {k: _padded(v, rank) if _is(v) else v for k, v in kwargs.items()}
        if inplace:  # an activation's in-place form on a value computed in this forward
            if not _is(tensors[0]) or tensors[0].stacked.is_leaf:  # type: ignore[attr-defined]
                raise Unsupported("in place on a parameter, buffer or batch tensor")
            func(*args, **kwargs)
            return tensors[0]
        return Members(func(*args, **kwargs))

    return rule


_UNARY = (
    "relu", "relu6", "gelu", "silu", "mish", "sigmoid", "tanh", "hardtanh", "hardswish",
    "hardsigmoid", "elu", "selu", "celu", "leaky_relu", "softplus", "softsign", "tanhshrink",
    "logsigmoid", "hardshrink", "softshrink", "threshold", "exp", "exp2", "expm1", "log", "log2",
    "log10", "log1p", "sqrt", "rsqrt", "abs", "neg", "negative", "square", "sin", "cos", "tan",
    "reciprocal", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "clamp", "clip",
    "clamp_min", "clamp_max", "isfinite", "isnan", "isinf", "logical_not", "nan_to_num", "erf",
    "erfc", "sinh", "cosh", "asin", "acos", "atan", "asinh", "acosh", "atanh", "detach", "clone",
    "contiguous", "float", "double", "half", "bfloat16", "long", "int", "bool", "to", "type_as",
    "zeros_like", "ones_like", "full_like", "add", "sub", "subtract", "mul", "multiply", "div",
    "divide", "true_divide", "pow", "float_power", "maximum", "minimum", "fmax", "fmin", "eq",
    "ne", "lt", "le", "gt", "ge", "greater", "less", "greater_equal", "less_equal", "not_equal",
    "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor",
    "bitwise_not", "atan2", "remainder", "fmod", "floor_divide", "lerp", "addcmul", "addcdiv",
    "xlogy", "hypot", "masked_fill", "rsub"
)
_DUNDERS = (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__div__", "__rdiv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__",
    "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "__and__", "__or__", "__xor__", "__rand__", "__ror__", "__rxor__",
    "__invert__"
)
for _name in _UNARY:
    for _f in _variants(_name):
        if _f is not None:
            RULES[_f] = _pointwise(_f)
for _name in _DUNDERS:
    if hasattr(T, _name):
        RULES[getattr(T, _name)] = _pointwise(getattr(T, _name))


_where3 = _pointwise(torch.where)


def _where(condition: Any, *args: Any, **kwargs: Any) -> Any:
    if len(args) + len(kwargs) != 2:  # torch.where(cond) is nonzero: no rule
        raise Unsupported("where(condition)")
    return _where3(condition, *args, **kwargs)


_register([torch.where, T.where], _where)


# -- reductions and dim-wise ops -----------------------------------------------------------

def _pop_dim(args: tuple[Any, ...], kwargs: dict[str, Any], default: Any = None
             ) -> tuple[Any, tuple[Any, ...]]:
    if args:
        return args[0], args[1:]
    return kwargs.pop("dim", default), args


def _reduce(func: Any, *, many: bool = True, need_dim: bool = False) -> Rule:
    """sum/mean/amax/...: a member's dims (all when None) as the stacked tensor's."""

    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is(x) or any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            raise Unsupported(f"{func.__name__} with a tensor argument")
        stacked, rank = x.stacked, x.stacked.dim() - 1
        dim, args = _pop_dim(args, kwargs)
        if dim is None and need_dim:
            raise Unsupported(f"{func.__name__} without dim")
        if dim is None or (many and isinstance(dim, (tuple, list)) and len(dim) == 0):
            if not many:  # argmax/argmin/prod over all: over the flattened member
                if kwargs.get("keepdim") or (args and args[0]):
                    raise Unsupported(f"{func.__name__}(dim=None, keepdim=True)")
                return Members(func(stacked.reshape(stacked.shape[0], -1), 1, *args, **kwargs))
            dims: tuple[int, ...] = tuple(range(1, rank + 1))
        else:
            listed = dim if isinstance(dim, (tuple, list)) else (dim,)
            if rank == 0 and all(d in (0, -1) for d in listed):
                dims = ()
            else:
                dims = tuple(_phys(d, rank) for d in listed)
            if not many and len(dims) > 1:
                raise Unsupported(f"{func.__name__} over several dims")
        if not dims:  # a member's 0-d value: reduce over a size-1 dim (same value, dtype)
            out = func(stacked.unsqueeze(1), 1, *args, **kwargs)
            keep = kwargs.get("keepdim") or (args and args[0] is True)
            return Members(out.squeeze(1) if keep else out)
        return Members(func(stacked, dims if many else dims[0], *args, **kwargs))

    return rule


for _name in ("sum", "mean", "nansum", "nanmean", "amax", "amin", "logsumexp", "all", "any",
              "count_nonzero"):
    for _f in _variants(_name):
        if _f is not None:
            RULES[_f] = _reduce(_f, need_dim=_name == "logsumexp")
for _name in ("argmax", "argmin", "prod"):
    for _f in _variants(_name):
        if _f is not None:
            RULES[_f] = _reduce(_f, many=False)


def _max_min(func: Any, pointwise: Any) -> Rule:
    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        other = args[0] if args else kwargs.get("other")
        if isinstance(other, torch.Tensor):
            return _pointwise(pointwise)(x, other)
        dim, args = _pop_dim(args, kwargs)
        if dim is None or not _is(x):  # the whole-tensor form spreads ties' gradients
            raise Unsupported(f"{func.__name__} without dim")
        values, indices = func(x.stacked, _phys(dim, _rank(x)), *args, **kwargs)
        return result(_members(values, indices))

    result = getattr(torch.return_types, func.__name__)
    return rule


_register([torch.max, T.max], _max_min(torch.max, torch.maximum))
_register([torch.min, T.min], _max_min(torch.min, torch.minimum))


def _dimwise(func: Any) -> Rule:
    """softmax/cumsum/...: one dim, kept."""

    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is(x) or any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            raise Unsupported(f"{func.__name__} with a tensor argument")
        dim, args = _pop_dim(args, kwargs)
        if dim is None or _rank(x) == 0:
            raise Unsupported(f"{func.__name__} with an implicit dim or of a 0-d value")
        return Members(func(x.stacked, _phys(dim, _rank(x)), *args, **kwargs))

    return rule


for _name in ("softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "softmin"):
    for _f in _variants(_name):
        if _f is not None:
            RULES[_f] = _dimwise(_f)
