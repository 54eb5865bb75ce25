"""Evaluating every member of a population at once: no grad, eval mode, vmapped."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ftrain.core import bind as _bind
from ftrain.core.state import TrainState
from ftrain.core.step import eval_metrics
from ftrain.errors import ConfigError
from ftrain.populations.metrics import Metrics, _check_batch, _member_metrics, _member_values
from ftrain.populations.model import StackedModel, _check_population


class PopulationEvalStep:
    """The evaluation step built by `population_eval_step`."""

    inner = None

    def __init__(self, fn: Callable[[Any, Any], Any], *, per_member_batches: bool = False,
                 member_metrics: bool = True) -> None:
        if not callable(fn):
            raise ConfigError(f"population_eval_step needs a callable fn(model, batch), got "
                              f"{type(fn).__name__}")
        self.fn = fn
        self.per_member_batches = bool(per_member_batches)
        self.member_metrics = bool(member_metrics)
        self._cache: tuple[nn.Module, Callable[..., Any]] | None = None

    def __repr__(self) -> str:
        return f"population_eval_step({getattr(self.fn, '__qualname__', repr(self.fn))})"

    def _evaluator(self, model: StackedModel) -> Callable[..., Any]:
        if self._cache is not None and self._cache[0] is model:
            return self._cache[1]
        apply = _bind._Apply(copy.deepcopy(model.template)).train(False)
        fn = self.fn

        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                batch: Any) -> Metrics:
            tensors = {"model." + k: v for k, v in params.items()}
            tensors.update({"model." + k: v for k, v in buffers.items()})
            out = torch.func.functional_call(apply, tensors, (fn, batch), strict=False)
            return eval_metrics(out, "population evaluation", torch.device("cpu"))

        evaluator = torch.func.vmap(one, in_dims=(0, 0, 0 if self.per_member_batches else None),
                                    randomness="different")
        self._cache = (model, evaluator)
        return evaluator

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        _check_population(state, "a population evaluation step")
        if self.per_member_batches:
            _check_batch(batch, state.model.n, "evaluation")
        evaluator = self._evaluator(state.model)
        with torch.no_grad():
            values = evaluator(state.params, state.buffers, batch)
        return _member_metrics(*_member_values(values, self.member_metrics))


def population_eval_step(fn: Callable[[Any, Any], Any], *, per_member_batches: bool = False,
                         member_metrics: bool = True) -> PopulationEvalStep:
    """Evaluate every member of a population on a batch: no grad, eval mode, vmapped.

    `fn(model, batch)` is the ordinary metric function (one member's model). Metrics:
    each one's mean over members and member i's as `"<name>/m<i>"`, so
    `ft.evaluate(population_eval_step(fn), pop, data)` reports every member and
    `split_members` turns that into one dict per member.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain import population, population_eval_step, split_members
        >>> pop = population(ft.TrainState.create(torch.nn.Linear(3, 1)), n=2)
        >>> evaluator = population_eval_step(
        ...     lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> results = ft.evaluate(evaluator, pop, [(torch.randn(8, 3), torch.randn(8, 1))])
        >>> sorted(results), len(split_members(results))
        (['loss', 'loss/m0', 'loss/m1'], 2)
    """
    return PopulationEvalStep(fn, per_member_batches=per_member_batches,
                              member_metrics=member_metrics)

