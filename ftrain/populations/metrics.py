"""A population's metrics: [N] vectors, their means and each member's value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ftrain.core.step import split_loss
from ftrain.errors import DataError

Metrics = dict[str, torch.Tensor]


def _split(out: Any) -> tuple[torch.Tensor, Metrics]:
    """A member's `loss` or `(loss, metrics)` inside vmap, checked as train_step does."""
    return split_loss(out, "population step")


_KEYS: dict[tuple[str, int], list[str]] = {}


def _member_values(values: Mapping[str, torch.Tensor], per_member: bool
                   ) -> tuple[Metrics, dict[str, tuple[torch.Tensor, ...]]]:
    """[N] metric vectors -> their means (0-d) and, if asked, each one's N members."""
    means: Metrics = {}
    members: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, vec in values.items():
        vec = vec.detach()
        means[name] = vec.mean() if vec.is_floating_point() else vec.double().mean()
        if per_member:
            members[name] = vec.unbind(0)
    return means, members


def _member_metrics(means: Metrics, members: Mapping[str, tuple[torch.Tensor, ...]]
                    ) -> Metrics:
    """The step's metrics: each mean, followed by `name/m{i}` for each member's value."""
    out: Metrics = {}
    for name, mean in means.items():
        out[name] = mean
        values = members.get(name)
        if values is not None:
            keys = _KEYS.get((name, len(values)))
            if keys is None:
                keys = _KEYS[(name, len(values))] = [f"{name}/m{i}" for i in range(len(values))]
            out.update(zip(keys, values))
    return out


def _check_batch(batch: Any, n: int, where: str) -> None:
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] != n):
            raise DataError(f"{where}: per_member_batches=True needs every tensor in the "
                            f"batch to lead with the member dimension {n}, found "
                            f"{leaf.dtype}{list(leaf.shape)}")

