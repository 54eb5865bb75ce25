"""The model of a population: the template's module tree with every tensor stacked."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ftrain.core.state import TrainState
from ftrain.errors import ConfigError

SLOT = "population"


class StackedModel(nn.Module):
    """The model of a population: the template's modules with every parameter and buffer
    stacked along a new leading member dimension.

    Names are the template's (`"0.weight"`), so a loop can bind a population and a
    checkpoint names its tensors as a single model's. Calling a bound copy (`ft.bind(pop)`)
    runs every member on the same inputs (vmap) and stacks the outputs along dim 0.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import population
        >>> pop = population(ft.TrainState.create(torch.nn.Linear(3, 2)), n=4)
        >>> pop.model.n, tuple(pop.params["weight"].shape)
        (4, (4, 2, 3))
        >>> ft.bind(pop)(torch.randn(5, 3)).shape   # 4 members, 5 samples, 2 outputs
        torch.Size([4, 5, 2])
    """

    def __init__(self, template: nn.Module, n: int) -> None:
        super().__init__()
        memo: dict[int, Any] = {}
        for p in template.parameters():
            memo[id(p)] = nn.Parameter(torch.empty((n, *p.shape), dtype=p.dtype, device="meta"),
                                       p.requires_grad)
        for b in template.buffers():
            memo[id(b)] = torch.empty((n, *b.shape), dtype=b.dtype, device="meta")
        stacked = copy.deepcopy(template, memo)
        # adopt the stacked tree as this module's own, so parameter names stay the template's
        self._parameters.update(stacked._parameters)
        self._buffers.update(stacked._buffers)
        self._non_persistent_buffers_set.update(stacked._non_persistent_buffers_set)
        self._modules.update(stacked._modules)
        object.__setattr__(self, "_population_template", template)
        object.__setattr__(self, "_population_n", n)

    @property
    def template(self) -> nn.Module:
        """One member's parameter-free skeleton (the model of `member(pop, i)`)."""
        template: nn.Module = self.__dict__["_population_template"]
        return template

    @property
    def n(self) -> int:
        """The number of members."""
        n: int = self.__dict__["_population_n"]
        return n

    def train(self, mode: bool = True) -> StackedModel:
        super().train(mode)
        self.template.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params: dict[str, torch.Tensor] = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        template = self.template

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], a: Any, k: Any) -> Any:
            return torch.func.functional_call(template, {**p, **b}, tuple(a), k)

        return torch.func.vmap(one, in_dims=(0, 0, None, None), randomness="different")(
            params, buffers, args, kwargs)



def is_population(state: Any) -> bool:
    """True when `state` is a population state made by `population`.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import is_population, population
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1))
        >>> is_population(s), is_population(population(s, n=2))
        (False, True)
    """
    return isinstance(state, TrainState) and isinstance(state.model, StackedModel)


def _check_population(state: Any, what: str) -> None:
    if not isinstance(state, TrainState):
        raise ConfigError(f"{what} expects a population state (ft.population(...)), got "
                          f"{type(state).__name__}")
    _ = state.params  # a donated state raises DonatedStateError here
    if not is_population(state):
        raise ConfigError(f"{what} expects a population state made by ft.population(...); "
                          "this is an ordinary TrainState (stack states with "
                          "ft.population(state, n=...) first)")

