"""Rules of the batched fast path for layers and losses: matmul, `linear` (one GEMM for
the shared input, `baddbmm` for members' inputs), `layer_norm` / `rms_norm`, `embedding`,
`dropout` (CPU: the numbers vmap draws), attention, and the losses (see `batched_rules`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

from ftrain.populations.batched import RULES, Draws, Members, Unsupported
from ftrain.populations.batched_rules import _is, _padded, _pointwise, _rank, _register

T = torch.Tensor
_add, _mul = _pointwise(torch.add), _pointwise(torch.mul)


def _lift(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A stacked tensor's values with size-1 dims after the member dim, to logical `rank`."""
    k = rank - (t.dim() - 1)
    return t if k <= 0 else t.reshape(t.shape[:1] + (1,) * k + t.shape[1:])


def _matmul(a: Any, b: Any) -> Any:
    """torch.matmul per member: a member's vector is a matrix (as matmul treats it) with
    the added dim dropped after; a plain operand's batch dims line up from the right."""
    ra, rb = _rank(a), _rank(b)
    if ra == 0 or rb == 0:
        raise Unsupported("matmul of a 0-d value")
    xa = a.stacked if _is(a) else a
    xb = b.stacked if _is(b) else b
    if ra == 1:
        xa = xa.unsqueeze(-2)
    if rb == 1:
        xb = xb.unsqueeze(-1)
    rank = max(ra, rb, 2)
    xa = _lift(xa, rank) if _is(a) else xa
    xb = _lift(xb, rank) if _is(b) else xb
    out = torch.matmul(xa, xb)
    if ra == 1:
        out = out.squeeze(-2)
    if rb == 1:
        out = out.squeeze(-1)
    return Members(out)


def _fixed_ranks(ranks: tuple[int, int]) -> Any:
    def rule(a: Any, b: Any) -> Any:
        if (_rank(a), _rank(b)) != ranks:
            raise Unsupported(f"operands of ranks other than {ranks}")
        return _matmul(a, b)
    return rule


_register([torch.matmul, T.matmul, T.__matmul__], _matmul)
RULES[T.__rmatmul__] = lambda a, b: _matmul(b, a)
_register([torch.mm, T.mm], _fixed_ranks((2, 2)))
_register([torch.bmm, T.bmm], _fixed_ranks((3, 3)))


def _linear(input: Any, weight: Any, bias: Any = None) -> Any:
    """F.linear per member, with members' weights [N, out, in] computed features-major:
    out^T = W @ x^T, one addmm against all members' weights at once for a shared input
    ([N * out, in] @ [in, M]) and one baddbmm for members' inputs; the result is the
    transposed view of a contiguous [N, out, M]. Measured ~1.6x faster forward and
    backward than batch-major [N, M, out] for the benchmark's MLPs (whose batch-major
    activations then feed bmm with interleaved matrices); vmap runs a matmul and an add."""
    if _rank(input) == 0:
        raise Unsupported("linear of a 0-d input")
    if not _is(weight):
        y = Members(F.linear(input.stacked, weight)) if _is(input) else F.linear(input, weight)
        return y if bias is None else _add(y, bias)
    w = weight.stacked
    bias_shape = None if bias is None else bias.stacked.shape[1:] if _is(bias) else bias.shape
    if w.dim() != 3 or (bias is not None and bias_shape != w.shape[1:2]):
        raise Unsupported("linear with a weight or bias of another shape")
    n, out_f, in_f = w.shape
    if (input.stacked if _is(input) else input).shape[-1] != in_f:  # (no silent reshape)
        raise Unsupported("linear of an input of another width")
    fused = _is(bias)
    # (each view below is an autograd node: the ones a 2-d input does not need are skipped)
    if _is(input):
        x = input.stacked
        lead = x.shape[1:-1]
        xt = (x if x.dim() == 3 else x.reshape(n, -1, in_f)).transpose(1, 2)  # [N, in, M]
        yt = torch.baddbmm(bias.stacked.unsqueeze(2), w, xt) if fused else torch.bmm(w, xt)
    else:
        lead = input.shape[:-1]
        xt = (input if input.dim() == 2 else input.reshape(-1, in_f)).t()  # [in, M]
        wide = w.reshape(n * out_f, in_f)
        yt = (torch.addmm(bias.stacked.view(n * out_f, 1), wide, xt) if fused
              else torch.mm(wide, xt)).view(n, out_f, -1)
    y = yt.transpose(1, 2)  # [N, M, out], a view
    if bias is not None and not fused:
        y = y + bias
    return Members(y if len(lead) == 1 else y.reshape(n, *lead, out_f))


_register([F.linear], _linear)


def _affine(y: Any, weight: Any, bias: Any) -> Any:
    y = y if weight is None else _mul(y, weight)
    return y if bias is None else _add(y, bias)


def _layer_norm(input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> Any:
    """Normalized without the affine part, then scaled and shifted per member (as vmap's
    rule does when the weight is batched)."""
    x = input.stacked if _is(input) else input
    if _is(weight) or _is(bias):
        y = F.layer_norm(x, normalized_shape, None, None, eps)
        return _affine(Members(y) if _is(input) else y, weight, bias)
    return Members(F.layer_norm(x, normalized_shape, weight, bias, eps))


def _rms_norm(input: Any, normalized_shape: Any, weight: Any = None,
              eps: float | None = None) -> Any:
    x = input.stacked if _is(input) else input
    if _is(weight):
        y = F.rms_norm(x, normalized_shape, None, eps)
        return _affine(Members(y) if _is(input) else y, weight, None)
    return Members(F.rms_norm(x, normalized_shape, weight, eps))


_register([F.layer_norm], _layer_norm)
_register([getattr(F, "rms_norm", None)], _rms_norm)


def _embedding(input: Any, weight: Any, padding_idx: Any = None, max_norm: Any = None,
               norm_type: float = 2.0, scale_grad_by_freq: bool = False,
               sparse: bool = False) -> Any:
    """F.embedding per member: rows gathered from each member's table (a bad index raises,
    as F.embedding's does); `padding_idx` rows get no gradient, as there."""
    if max_norm is not None or scale_grad_by_freq or sparse or not _is(weight):
        raise Unsupported("embedding of a plain table or with max_norm, scale_grad_by_freq "
                          "or sparse")
    w = weight.stacked
    if w.dim() != 3:
        raise Unsupported("an embedding table that is not 2-d")
    n, rows, d = w.shape
    if padding_idx is not None and not -rows <= padding_idx < rows:
        raise Unsupported("padding_idx out of range")
    if _is(input):
        idx = input.stacked
        flat = idx.reshape(n, -1, 1).expand(-1, -1, d)
        out = torch.gather(w, 1, flat).reshape(*idx.shape, d)
    else:
        idx = input
        out = w.index_select(1, idx.reshape(-1)).reshape(n, *idx.shape, d)
    if padding_idx is not None:  # the same values, without a gradient to the padding row
        pad = (idx == padding_idx % rows).unsqueeze(-1)
        out = torch.where(pad, out.detach(), out)
    return Members(out)


_register([F.embedding], _embedding)


def _dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
    """at::dropout's CPU path (bernoulli_(1 - p), div_, mul) drawing what vmap draws: with
    different randomness a [N, ...] mask filled in the members' order (vmap's is, whatever
    the input's memory layout: so a contiguous one here), with the same randomness one
    member's mask for all. (CUDA's fused kernel draws otherwise: no rule there.)"""
    if not 0.0 <= p <= 1.0 or inplace or not _is(input):
        raise Unsupported("dropout in place, of a plain tensor or with a bad p")
    x = input.stacked
    if not training or p == 0.0 or x.numel() == 0:
        return input
    if p == 1.0:
        return Members(x * torch.zeros((), dtype=x.dtype, device=x.device))
    draws = Draws.current
    if draws is None or x.device.type != "cpu":
        raise Unsupported("dropout on a device other than the CPU")
    draws.check()  # nothing was drawn outside the rules before
    shape = x.shape if draws.randomness == "different" else x.shape[1:]
    noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    draws.drew()
    noise.div_(1 - p)
    return Members(x * noise)


_register([F.dropout], _dropout)
RULES[torch.dropout] = lambda input, p, train: _dropout(input, p, train)


def _attention(query: Any, key: Any, value: Any, attn_mask: Any = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None,
               enable_gqa: bool = False) -> Any:
    if dropout_p != 0.0 or enable_gqa:
        raise Unsupported("attention with dropout or grouped queries")
    n = next(t.stacked.shape[0] for t in (query, key, value, attn_mask) if _is(t))
    rank = max(_rank(query), _rank(key), _rank(value))

    def full(t: Any) -> torch.Tensor:
        if _is(t):
            return _padded(t, rank)
        return t.reshape((1,) * (rank - t.dim()) + t.shape).expand(n, *((-1,) * rank))

    mask = attn_mask
    if _is(mask):
        mask = _padded(mask, rank)
    return Members(F.scaled_dot_product_attention(full(query), full(key), full(value),
                                                  attn_mask=mask, is_causal=is_causal,
                                                  scale=scale))


_register([F.scaled_dot_product_attention], _attention)


# -- losses ------------------------------------------------------------------------------

def _class_loss(fn: Any, input: Any, target: Any, weight: Any, size_average: Any,
                ignore_index: int, reduce: Any, reduction: str, **extra: Any) -> Any:
    """cross_entropy / nll_loss with class-index targets: each member's losses from one
    call over [N * M, C] (`reduction="none"`), then reduced per member; `mean` divides by
    the member's count of targets that are not `ignore_index`, as torch's mean does."""
    if weight is not None or size_average is not None or reduce is not None:
        raise Unsupported(f"{fn.__name__} with class weights or legacy reduction arguments")
    t = target.stacked if _is(target) else target
    if not _is(input) or t.is_floating_point() or t.is_complex():
        raise Unsupported(f"{fn.__name__} of plain input or with probability targets")
    x = input.stacked
    n, rank = x.shape[0], x.dim() - 1
    if rank == 0 or reduction not in ("mean", "sum", "none"):
        raise Unsupported(f"{fn.__name__} of a 0-d input or reduction {reduction!r}")
    t = t if _is(target) else t.expand(n, *t.shape)
    expected = x.shape[:1] + (x.shape[1:2] + x.shape[3:] if rank >= 2 else ())
    if t.shape != expected:
        raise Unsupported(f"{fn.__name__} with a target of another shape")
    xt = x.transpose(1, 2) if rank == 2 else None
    if xt is not None and xt.is_contiguous():  # features-major (from linear): classes in
        # dim 1 of [N, C, B], torch's form for extra dims, with no copy
        per = fn(xt, t, ignore_index=ignore_index, reduction="none", **extra)
    else:
        classes = x.shape[2] if rank >= 2 else x.shape[1]
        logits = x.movedim(2, -1).reshape(-1, classes) if rank >= 2 else x
        per = fn(logits, t.reshape(-1), ignore_index=ignore_index, reduction="none", **extra)
    per = per if per.dim() == 2 else per.view(n, -1)
    if reduction == "none":
        return Members(per.view(t.shape))
    if reduction == "sum":
        return Members(per.sum(1))
    # cost: ~5 us for the count (a host read would cost more)
    valid = (t != ignore_index).view(n, -1).sum(1) if _is(target) else \
        (target != ignore_index).sum()
    return Members(per.sum(1) / valid)


def _cross_entropy(input: Any, target: Any, weight: Any = None, size_average: Any = None,
                   ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                   label_smoothing: float = 0.0) -> Any:
    return _class_loss(F.cross_entropy, input, target, weight, size_average, ignore_index,
                       reduce, reduction, label_smoothing=label_smoothing)


def _nll_loss(input: Any, target: Any, weight: Any = None, size_average: Any = None,
              ignore_index: int = -100, reduce: Any = None, reduction: str = "mean") -> Any:
    return _class_loss(F.nll_loss, input, target, weight, size_average, ignore_index,
                       reduce, reduction)


_register([F.cross_entropy], _cross_entropy)
_register([F.nll_loss], _nll_loss)


def _elementwise_loss(fn: Any, names: list[str], weighted: bool) -> Any:
    """mse_loss / l1_loss / ...: elementwise losses of equal-shaped input and target,
    then reduced over each member's elements."""

    def rule(*args: Any, **kwargs: Any) -> Any:
        bound = dict(zip(names, args))
        bound.update(kwargs)
        reduction = bound.pop("reduction", "mean")
        if bound.pop("size_average", None) is not None or bound.pop("reduce", None) \
                is not None or reduction not in ("mean", "sum", "none"):
            raise Unsupported(f"{fn.__name__} with legacy reduction arguments")
        if not weighted and bound.get("weight") is not None:
            raise Unsupported(f"{fn.__name__} with a weight")
        input, target = bound.pop("input"), bound.pop("target")
        shape = input.stacked.shape[1:] if _is(input) else input.shape
        if (target.stacked.shape[1:] if _is(target) else target.shape) != shape:
            raise Unsupported(f"{fn.__name__} of a target of another shape (broadcast)")
        n = next(t.stacked.shape[0] for t in (input, target) if _is(t))
        rank = len(shape)

        def stacked(t: Any) -> Any:
            return t.stacked if _is(t) else t.expand(n, *t.shape)

        rest = {k: _padded(v, rank) if _is(v) else v for k, v in bound.items()}
        per = fn(stacked(input), stacked(target), reduction="none", **rest)
        if reduction == "none" or rank == 0:
            return Members(per)
        dims = tuple(range(1, rank + 1))
        return Members(per.sum(dims) if reduction == "sum" else per.mean(dims))

    return rule


for _fn, _weighted in [(F.mse_loss, False), (F.l1_loss, False), (F.smooth_l1_loss, False),
                       (F.huber_loss, False), (F.binary_cross_entropy, True),
                       (F.binary_cross_entropy_with_logits, True)]:
    _names = list(inspect.signature(cast(Callable[..., Any], _fn)).parameters)
    RULES[_fn] = _elementwise_loss(_fn, _names, _weighted)
