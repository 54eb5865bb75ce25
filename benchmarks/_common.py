"""Pieces the benchmark scripts share (imported as a sibling: `python benchmarks/x.py`
puts this folder on the path). The hand-written loops stay in each script, in full."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of a classifier on an (inputs, labels) batch."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batches:
    """A list of batches seen as one iterable (Lightning takes a bare list for several
    dataloaders); iterating it costs what iterating the list costs."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
