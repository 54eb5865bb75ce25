"""Run a module with other tensors in its parameter and buffer slots: the part of
`torch.func.functional_call` a step repeats, with the module walk done once.

`functional_call` walks the whole module tree on every call (to find tied tensors and
parse dotted names). A population step calls its loss function once per step on the same
skeleton, so `Slots` finds every slot once and a call is one dict write per slot and one
to put it back. Under `torch.compile` it also means fewer guards on the module tree.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize


class Slots:
    """Every parameter and buffer slot of `module`, each with the name its tensor has in
    `named_parameters()` / `named_buffers()` (a tied tensor's slots share one name).

    Examples:
        >>> import torch
        >>> from ftrain.core.swap import Slots
        >>> lin = torch.nn.Linear(2, 1)
        >>> slots = Slots(lin)
        >>> old = slots.put({"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
        >>> lin(torch.ones(1, 2)).item()
        2.0
        >>> slots.restore(old)
        >>> lin.weight is old[0]
        True
    """

    def __init__(self, module: nn.Module) -> None:
        if any(parametrize.is_parametrized(m) for m in module.modules()):
            raise ValueError("a parametrized module's tensors are not in its slots")
        name_of: dict[int, str] = {}
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            name_of.setdefault(id(t), name)
        self.places: list[tuple[dict[str, torch.Tensor | None], str, str]] = []
        seen: set[tuple[int, str]] = set()
        for mod in module.modules():  # a shared submodule once: put and restore pair up
            params: dict[str, torch.Tensor | None] = mod._parameters  # type: ignore[assignment]
            for store in (params, mod._buffers):
                for key, value in store.items():
                    if value is not None and (id(store), key) not in seen:
                        seen.add((id(store), key))
                        self.places.append((store, key, name_of[id(value)]))

    def put(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Put `tensors` (by name; every slot's) in the slots; returns what they held."""
        new = [tensors[name] for _, _, name in self.places]  # a missing name changes nothing
        old: list[torch.Tensor] = []
        for (store, key, _), t in zip(self.places, new):
            old.append(store[key])  # type: ignore[arg-type]
            store[key] = t
        return old

    def current(self, names: list[str], given: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """The tensors the slots hold now, by name: a tensor the forward put in a slot in
        place of the `given` one (a module may reassign a buffer), else the given one."""
        now = {name: given[name] for name in names}
        for store, key, name in self.places:
            if name in now and store[key] is not given[name]:
                now[name] = store[key]  # type: ignore[assignment]
        return now

    def restore(self, old: list[torch.Tensor]) -> None:
        """Put back what `put` returned."""
        for (store, key, _), t in zip(self.places, old):
            store[key] = t
