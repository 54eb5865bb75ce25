"""Trained by tests/test_dp.py under torchrun (2 processes) or as one process.

usage: dp_ddp.py OUT
Under torchrun each rank takes every other batch of BATCHES (ftrain's sharding of a list);
as one process each step's batch is the two ranks' batches joined. Rank 0 saves the
final params and the dp slot to OUT.
"""

import sys

import torch

import ftrain as ft
from ftrain.privacy import with_dp


def main() -> None:
    out = sys.argv[1]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 5, generator=g) * 3, torch.randint(0, 2, (6,), generator=g))
               for _ in range(4)]
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    if world == 1:  # the step's whole sample, as the two ranks' shares together
        batches = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
                   for a, b in zip(batches[::2], batches[1::2])]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    state = ft.TrainState.create(model, ft.optim.sgd(0.5), seed=3)
    step = ft.with_ddp(with_dp(ft.train_step(
        lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])),
        max_grad_norm=1.0, noise_multiplier=1.5, sample_rate=0.1, noise_seed=5))
    state = ft.fit(step, state, batches, epochs=1, logger=False, checkpoint=False,
                   progress=False)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save({"params": dict(state.params), "dp": state.slots["dp"]}, out)


if __name__ == "__main__":
    main()
