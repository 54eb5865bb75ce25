"""Trained by tests/test_ddp_lockstep.py under torchrun: ranks that must agree.

usage: ddp_lockstep.py OUT MODE [SLEEP]
MODE: preempt (SLEEP s per step; SIGTERM comes from the test) | resume | uneven-sized |
      uneven-iterable | lying-length
"""

import os
import sys
import time

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import ftrain as ft


class Stream(IterableDataset):
    """An iterable dataset that yields a rank-dependent number of batches (a bug to catch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            x = torch.randn(4, 5, generator=g)
            yield x, (x.sum(1) > 0).long()


class Sized(Stream):
    """An iterable dataset whose __len__ says 12, whatever it yields (a bug to catch)."""

    def __len__(self) -> int:
        return 12


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 5, generator=g)
    y = (x.sum(1) > 0).long()
    data: object = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    if mode == "uneven-sized":  # each rank its own shard, of different lengths
        mine = TensorDataset(x[: 64 - 16 * rank], y[: 64 - 16 * rank])
        data = DataLoader(mine, batch_size=4,
                          sampler=DistributedSampler(mine, num_replicas=2, rank=rank))
    elif mode == "uneven-iterable":
        data = DataLoader(Stream(12 - 2 * rank), batch_size=None)
    elif mode == "lying-length":  # says 12 batches; rank 1's yields 8
        data = DataLoader(Sized(12 - 4 * rank), batch_size=None)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    log = open(f"{out}/steps{rank}", "a")

    def loss_fn(m, b):
        if pause:
            time.sleep(pause)
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    core = ft.with_ddp(ft.train_step(loss_fn))  # inner options go on the core first

    def step(state, batch):
        state, metrics = core(state, batch)
        log.write(f"{state.step}\n")
        log.flush()
        return state, metrics

    step.inner = core  # type: ignore[attr-defined]
    step.init, step.epoch_end = core.init, core.epoch_end  # type: ignore[attr-defined]
    with open(f"{out}/pid{rank}", "w") as f:
        f.write(str(os.getpid()))
    state = ft.TrainState.create(model, ft.optim.adam(1e-2), seed=3)
    saving = ft.with_checkpointing(step, f"{out}/ckpt", every_n_steps=10)
    state = ft.fit(saving, state, data, max_steps=30, logger=False, progress=False,
                   resume="auto" if mode == "resume" else None)
    torch.save({"params": state.params, "step": state.step}, f"{out}/final{rank}.pt")
    print(f"rank {rank} done at step {state.step}", flush=True)


if __name__ == "__main__":
    main()
