"""`with_accumulation`: one update from several micro-batches of each batch, or (with
`over="batches"`, `ftrain.core.accumulate_batches`) from several consecutive batches.

`with_accumulation` returns a new stack whose core step splits each batch the loop hands
it into `micro_batches` parts, runs forward and backward on each (gradients add up,
weighted by each part's share of the samples, so the update equals one on the whole
batch), then updates once. One loop
iteration is one update: `state.step`, logging intervals, `max_steps`, schedules and
checkpoints all count updates, and a checkpoint never falls between micro-batches (there
is no half-accumulated gradient to save). Under `with_ddp` gradients are all-reduced only
for the last micro-batch. Give the loader the full batch size (micro-batch size times
`micro_batches`); only one micro-batch's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs
import torch
from torch.utils import _pytree as pytree

from ftrain.core.layer import Step
from ftrain.core.phases import with_option
from ftrain.data.batches import batch_size
from ftrain.errors import ConfigError, DataError


def split_batch(batch: Any, n: int) -> list[Any]:
    """Split every tensor of a (nested) batch along dim 0 into `n` near-equal parts.

    Non-tensor leaves (and 0-d tensors) are shared by every part. A batch smaller than `n`
    gives as many parts as it has samples.

    Examples:
        >>> import torch
        >>> from ftrain.core.accumulation import split_batch
        >>> parts = split_batch((torch.zeros(10, 3), torch.arange(10)), 4)
        >>> [len(p[1]) for p in parts]
        [3, 3, 2, 2]
    """
    leaves, spec = pytree.tree_flatten(batch)
    sizes = {int(t.shape[0]) for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0}
    if not sizes:
        raise DataError(f"with_accumulation cannot split a batch without tensors of at least "
                        f"one dimension (found {type(batch).__name__}); pass split=")
    if len(sizes) > 1:
        raise DataError(f"with_accumulation splits a batch along dim 0, but its tensors have "
                        f"different lengths {sorted(sizes)}; pass split=")
    parts = min(n, sizes.pop())
    pieces = [torch.tensor_split(t, parts) if isinstance(t, torch.Tensor) and t.dim() > 0
              else [t] * parts for t in leaves]
    return [pytree.tree_unflatten([p[i] for p in pieces], spec) for i in range(parts)]


Over = Literal["micro_batches", "batches"]


@attrs.frozen
class Accumulation:
    """The option `with_accumulation` gives a core step (a frozen record): `micro_batches`
    parts of each batch, or with `over="batches"` that many consecutive batches, each
    weighted by `weight(batch)` (default: its number of samples)."""

    micro_batches: int
    split: Callable[[Any], list[Any]] | None = None
    over: Over = "micro_batches"
    weight: Callable[[Any], Any] | None = None

    def __attrs_post_init__(self) -> None:
        n = self.micro_batches
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            what = "the number of batches" if self.over == "batches" else "micro_batches"
            raise ConfigError(f"with_accumulation: {what} must be an int >= 1, got {n!r}")
        if self.split is not None and not callable(self.split):
            raise ConfigError(f"with_accumulation: split must be a function batch -> list of "
                              f"micro-batches, got {type(self.split).__name__}")
        if self.over not in ("micro_batches", "batches"):
            raise ConfigError(f"with_accumulation: over must be 'micro_batches' (parts of "
                              f"each batch) or 'batches' (consecutive batches), got "
                              f"{self.over!r}")
        if self.over == "batches" and self.split is not None:
            raise ConfigError("with_accumulation(over='batches') accumulates whole batches: "
                              "split= (how to cut one batch into micro-batches) does not "
                              "apply; drop it")
        if self.weight is not None and (self.over != "batches" or not callable(self.weight)):
            raise ConfigError(f"with_accumulation: weight= is a function batch -> its weight "
                              f"(e.g. its number of tokens) for over='batches', got "
                              f"{type(self.weight).__name__} with over={self.over!r}")

    @property
    def over_batches(self) -> bool:
        return self.over == "batches"

    def __repr__(self) -> str:
        if self.over_batches:
            return f"with_accumulation({self.micro_batches}, over='batches')"
        return f"with_accumulation({self.micro_batches})"

    def split_batch(self, batch: Any, step: int) -> list[Any]:
        if self.split is None:
            return split_batch(batch, self.micro_batches)
        parts = self.split(batch)
        if not isinstance(parts, (list, tuple)) or not parts:
            raise DataError(f"step {step}: split= must return a non-empty list of "
                            f"micro-batches, got {type(parts).__name__}")
        return list(parts)

    @staticmethod
    def weights(parts: list[Any]) -> list[float]:
        """Each micro-batch's share of the samples (losses are means over samples)."""
        sizes = [_micro_size(p) for p in parts]
        total = float(sum(sizes))
        return [s / total for s in sizes]


def _micro_size(part: Any) -> int:
    """A micro-batch's size: the leading dimension its tensors agree on, else (the
    documented rule for `split=` parts holding shared tensors, e.g. class weights) the
    first tensor's leading dimension."""
    try:
        return batch_size(part)
    except DataError:
        leaves = [t for t in pytree.tree_leaves(part)
                  if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not leaves:
            raise
        return int(leaves[0].shape[0])


def with_accumulation(step: Any, micro_batches: int, *,
                      split: Callable[[Any], list[Any]] | None = None,
                      over: Over = "micro_batches",
                      weight: Callable[[Any], Any] | None = None) -> Step:
    """Accumulate gradients over `micro_batches` parts of each batch, then update once.

    Each batch is split along dim 0 (or by `split(batch) -> [micro_batch, ...]`); the loss
    of each part is weighted by its share of the samples, so the update equals a single
    step on the whole batch (a mean loss assumed) while only one part's activations are in
    memory. Steps, schedules and logging count updates.

    `over="batches"` (Lightning's `accumulate_grad_batches`) makes one update from that
    many consecutive loop batches instead, each weighted by `weight(batch)` (its number of
    samples by default; e.g. its number of tokens), so the update equals one step on all
    of them for a mean loss. `state.step` then counts batches and the optimizer's count
    updates; the partial gradient lives in the slot "accumulation", so a checkpoint taken
    mid-group resumes exactly; an epoch's last, partial group still updates. See
    `ftrain.core.accumulate_batches`.

    Examples:
        >>> import torch, ftrain as ft
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> step = ft.with_accumulation(step, 4)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state, metrics = step(state, (torch.randn(32, 3), torch.randn(32, 1)))
        >>> state.step   # one update from four micro-batches of 8
        1
        >>> step = ft.with_accumulation(ft.train_step(lambda m, b: m(b).pow(2).mean()), 2,
        ...                             over="batches")
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state, _ = step(state, torch.randn(4, 3))        # accumulated, no update yet
        >>> int(state.opt_state["count"]), state.slots["accumulation"]["batches"]
        (0, 1)
        >>> state, _ = step(state, torch.randn(6, 3))        # the group's end: one update
        >>> int(state.opt_state["count"]), state.slots["accumulation"]["batches"], state.step
        (1, 0, 2)
    """
    return with_option(step, "accumulation", Accumulation(micro_batches, split, over, weight),
                       "with_accumulation",
                       " (in a manual step call m.backward per micro-batch, then m.apply once)")
