"""Trained by tests/test_ddp_stuck.py under torchrun: one rank stalls, the other must name it.

usage: ddp_stuck.py MODE TIMEOUT_S
MODE: loss (rank 1 sleeps in its loss at step 3: DDP's gradient all-reduce waits) |
      eval (rank 1 sleeps in its validation loss: ftrain's metric all-reduce waits)
"""

import datetime
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft

SLEEP_S = 60  # far past the collective timeout: the run must end long before this


def stall_here(mode: str, rank: int, step: int) -> None:
    if rank == 1 and step == 3:
        print(f"rank 1 stalls in {mode} at step 3", flush=True)
        time.sleep(SLEEP_S)


def main() -> None:
    mode, timeout = sys.argv[1], float(sys.argv[2])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g)
    y = (x.sum(1) > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    calls = [0]

    def loss_fn(m, b):
        if mode == "loss":
            stall_here(mode, torch.distributed.get_rank(), calls[0])
        calls[0] += 1
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    evals = [0]

    def eval_fn(m, b):
        if mode == "eval" and evals[0] == 0:
            stall_here(mode, torch.distributed.get_rank(), 3)
        evals[0] += 1
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    step = ft.with_ddp(ft.train_step(loss_fn), timeout=datetime.timedelta(seconds=timeout))
    step = ft.with_validation(step, ft.eval_step(eval_fn), data, every_n_steps=3,
                              sanity_steps=0, limit_val_batches=2)
    state = ft.TrainState.create(model, ft.optim.sgd(0.1), seed=3)
    ft.fit(step, state, data, max_steps=6, progress=False)
    print(f"rank {torch.distributed.get_rank()} done", flush=True)


if __name__ == "__main__":
    main()
