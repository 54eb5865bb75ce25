"""Re-seeding: a member's parameters drawn anew by re-running the modules' resets."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ftrain.core.state import TrainState
from ftrain.errors import ConfigError


def _materialize(template: nn.Module, state: TrainState, seed: int) -> tuple[dict, dict]:
    """Member params drawn by re-running the modules' reset_parameters under `seed`."""
    names = [n for n, _ in template.named_parameters(remove_duplicate=False)]
    if len(names) != len(dict(template.named_parameters())):
        # which module's initialization a tied tensor keeps depends on the direction of the
        # tie (a = b or b = a), which the finished model no longer shows
        raise ConfigError("ft.population cannot re-initialize a model with tied weights "
                          "from a seed; pass a factory (lambda seed: "
                          "TrainState.create(make_model(seed), ...)) or a list of states")
    if any(parametrize.is_parametrized(m) for m in template.modules()):
        # reset_parameters() would initialize the computed tensor, not the stored originals
        raise ConfigError("ft.population cannot re-initialize a parametrized module (e.g. "
                          "weight_norm) with reset_parameters(); pass a factory "
                          "(lambda seed: TrainState.create(make_model(seed), ...)) or a list "
                          "of states")
    module = copy.deepcopy(template).to_empty(device="cpu")
    covered: set[int] = set()
    order: list[nn.Module] = []

    def visit(m: nn.Module) -> None:  # children first: constructors reset children first
        for child in m.children():
            visit(child)
        if callable(getattr(m, "reset_parameters", None)) or callable(
                getattr(m, "_reset_parameters", None)):
            order.append(m)
            covered.update(id(p) for p in m.parameters())
            covered.update(id(b) for b in m.buffers(recurse=False))

    visit(module)
    missing = [n for n, p in module.named_parameters() if id(p) not in covered]
    if missing:
        raise ConfigError(
            f"ft.population re-initializes each member from its seed with the modules' "
            f"reset_parameters(), but no module resets {missing}; pass a factory "
            "(lambda seed: TrainState.create(make_model(seed), ...)) or a list of states")
    generator = torch.default_generator
    saved = generator.get_state()
    try:
        generator.manual_seed(seed)
        with torch.no_grad():
            for m in order:
                reset: Any = getattr(m, "reset_parameters", None)
                if not callable(reset):
                    reset = m._reset_parameters
                reset()
    finally:
        generator.set_state(saved)
    device = state.device
    params = {n: p.detach().to(device) for n, p in module.named_parameters()}
    buffers = {n: (b.detach().to(device) if id(b) in covered
                   else state.buffers[n].detach().clone())
               for n, b in module.named_buffers()}
    return params, buffers


def _trainable(template: nn.Module, params: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    return {n: t for n, t in params.items() if template.get_parameter(n).requires_grad}

