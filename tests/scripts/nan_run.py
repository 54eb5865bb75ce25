"""Trained by tests/test_repro.py: a regression on log-features whose data has a zero in
the batch of step 37 (a data bug, no injected flag): log gives -inf there, the gradient
nan, and `check_finite_every_step=True` stops the step before its update.

usage: nan_run.py ROOT           trains (fails at step 37, writing ROOT/repro/step-37-rank0)
       nan_run.py ROOT BUNDLE    replays the bundle in this fresh process; writes ROOT/replay.pt
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn import functional as F

import ftrain as ft


def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = b
    return F.mse_loss(m(torch.log(x)), y)  # the line the replay names


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.1), nn.Tanh(), nn.Linear(16, 1))
    return ft.TrainState.create(model, ft.optim.adamw(1e-2), seed=7)


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64 * 8, 3, generator=g) + 0.5
    x[37 * 8 + 5, 1] = 0.0  # one bad sample in the 38th batch: step 37
    y = torch.randn(64 * 8, 1, generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)]


step = ft.train_step(loss_fn, check_finite_every_step=True)

if __name__ == "__main__":
    if len(sys.argv) == 2:  # the defaults: a logger on, so capture_failures="auto" writes
        ft.fit(step, fresh(), data(), epochs=1, root_dir=sys.argv[1], progress=False,
               checkpoint=False)
    else:
        found = ft.replay(sys.argv[2], step, like=fresh(), anomaly=True)
        torch.save({"reproduced": found.reproduced, "culprit": found.culprit,
                    "error": f"{type(found.error).__name__}: {found.error}",
                    "info": found.info, "step": found.state.step, "batch": found.batch,
                    "params": found.state.params}, f"{sys.argv[1]}/replay.pt")
