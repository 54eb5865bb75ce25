"""Trained by tests/test_multinode.py: one process per torchrun agent, two agents
(`--nnodes=2`), or in the test's own process as the one-process reference.

usage: multinode_train.py OUT LAYER MODE     LAYER: fsdp | ddp    MODE: train | fail

`train`: 6 steps of Adam on 16 samples per step in total (16 / world per rank); each rank
writes its full (gathered) parameters to OUT/rank<global rank>.pt. `fail`: global rank 1
raises at step 3, printing the wall-clock time it does so. Every process first prints
which node (agent) runs which global rank.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft

STEPS = 6
GLOBAL_BATCH = 16


def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(m(b[0]), b[1])


def setup(world: int) -> tuple[ft.TrainState, DataLoader]:
    """The start state and the loader: the same on every rank and in the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH * STEPS
    x, y = torch.randn(n, 8, generator=g), torch.randn(n, 3, generator=g)
    # unshuffled: rank r takes samples r, r + world, ... so each update sees the same 16
    loader = DataLoader(TensorDataset(x, y), batch_size=GLOBAL_BATCH // world)
    return ft.TrainState.create(model, ft.optim.adam(1e-2), seed=3), loader


def reference() -> dict[str, torch.Tensor]:
    """One process, no parallel layer, the whole global batch per step."""
    state, loader = setup(1)
    state = ft.fit(ft.train_step(loss_fn), state, loader, max_steps=STEPS, logger=False,
                   checkpoint=False, progress=False)
    return state.params


def main() -> None:
    out, layer, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    print(f"multinode: global rank {rank} of {world} on node {os.environ['GROUP_RANK']}",
          file=sys.stderr, flush=True)
    calls = [0]

    def failing_loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if rank == 1 and calls[0] == 3:
            print(f"multinode: failing at {time.time():.3f}", file=sys.stderr, flush=True)
            raise ValueError("boom on rank 1 at step 3")
        calls[0] += 1
        return loss_fn(m, b)

    # well under ftrain's 5-minute default: a peer failure that went unnoticed would show
    # as a CollectiveTimeoutError after 30 s instead of the PeerFailedError the test wants
    timeout = datetime.timedelta(seconds=30)
    core = ft.train_step(failing_loss if mode == "fail" else loss_fn)
    step = ft.with_fsdp(core, timeout=timeout) if layer == "fsdp" else \
        ft.with_ddp(core, timeout=timeout)
    state, loader = setup(world)
    state = ft.fit(step, state, loader, max_steps=STEPS, logger=False, checkpoint=False,
                   progress=False)
    if layer == "fsdp":
        from ftrain.parallel.fsdp import is_sharded, unshard
        assert is_sharded(state), "with_fsdp on 2 ranks left plain tensors"
        state = unshard(state)  # an all-gather per parameter: every rank calls it
    torch.save({"params": dict(state.params), "step": state.step}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main()
