"""Shared small models and data for the tests (all made here; nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

torch.set_num_threads(1)


class Net(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear: params, buffers and randomness."""

    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def classify(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def make_batches(n: int = 8, batch: int = 12, d_in: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, classes, (batch,),
                                                                  generator=g))
            for _ in range(n)]


def make_dataset(n: int = 96, d_in: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def tensors_equal(a, b) -> bool:
    """Bitwise equality of two (nested) dicts of tensors."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


class CountHostReads(TorchFunctionMode):
    """Counts every tensor-to-host read made through Python (tolist, item, bool, ...)."""

    READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def torchrun_env() -> dict[str, str]:
    """The environment for processes a test launches (torchrun, scripts): one thread each
    (2 cores), no inherited WORLD_SIZE, and the ftrain these tests import on PYTHONPATH
    (not whatever is installed)."""
    import ftrain
    root = str(Path(ftrain.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    return env

