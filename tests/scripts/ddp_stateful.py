"""Run by tests/test_stateful_data.py under torchrun (2 ranks): data that keeps its own
position, per rank. For two kinds of data (a stream without a length, which ftrain deals
out in whole batches; a StatefulDataLoader with its own DistributedSampler, which has a
length), on each rank: a run of 2 epochs (the reference); a run stopped mid-epoch with a
checkpoint every step; a new loader and the checkpoint continued to 2 epochs. Writes
OUT/rank<r>.json with what the test checks.

usage: torchrun --nproc_per_node=2 ddp_stateful.py OUT
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from torch.utils.data import IterableDataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

import ftrain as ft

warnings.filterwarnings("ignore", message=".*set_vital.*")
RANK = int(os.environ["RANK"])
G = torch.Generator().manual_seed(1)
X = torch.randn(48, 5, generator=G)
Y = (X.sum(1) > 0).long()


class Stream(IterableDataset):
    """48 samples a pass in a pass-seeded order; its state names the rank it belongs to,
    and refuses another rank's."""

    def __init__(self) -> None:
        self.pos, self.passes = 0, 0

    def __iter__(self):
        order = torch.randperm(48, generator=torch.Generator().manual_seed(self.passes))
        while self.pos < 48:
            i = int(order[self.pos])
            self.pos += 1
            yield X[i], Y[i], i
        self.pos, self.passes = 0, self.passes + 1

    def state_dict(self) -> dict:
        return {"pos": self.pos, "passes": self.passes, "rank": RANK}

    def load_state_dict(self, state: dict) -> None:
        if state["rank"] != RANK:
            raise ValueError(f"rank {RANK} was given rank {state['rank']}'s state")
        self.pos, self.passes = state["pos"], state["passes"]


def loader(kind: str) -> StatefulDataLoader:
    if kind == "stream":
        return StatefulDataLoader(Stream(), batch_size=4)  # 6 steps a rank, an epoch
    data = TensorDataset(X, Y, torch.arange(48))
    return StatefulDataLoader(data, batch_size=4, sampler=DistributedSampler(
        data, num_replicas=2, rank=RANK, shuffle=True, seed=5))


def run(kind: str, out: str, state: ft.TrainState | None = None, **fit):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    fresh = ft.TrainState.create(model, ft.optim.adam(1e-2), seed=3)
    seen: list[list[int]] = []  # the sample ids of each step, in order

    def loss_fn(m, b):
        seen.append(b[2].tolist())
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    step = ft.with_ddp(ft.train_step(loss_fn))
    stack = ft.with_checkpointing(step, out, every_n_steps=1, every_n_epochs=None)
    if state is not None:
        state = ft.load(os.path.join(out, "last.ckpt"), like=fresh)
    final = ft.fit(stack, state or fresh, loader(kind), logger=False, progress=False, **fit)
    return final, seen


def main() -> None:
    out = sys.argv[1]
    result = {}
    for kind in ("stream", "sampler"):
        folder = os.path.join(out, kind)
        ref, ref_seen = run(kind, os.path.join(out, kind + "-ref"), epochs=2)
        run(kind, folder, max_steps=8)  # stopped in epoch 1
        saved = torch.load(os.path.join(folder, "last.ckpt"), weights_only=True)
        states = saved["slots"]["loop"]["data"]
        final, seen = run(kind, folder, state=ref, epochs=2)  # from the checkpoint
        result[kind] = {
            "same": seen == ref_seen[8:],
            "params": all(torch.equal(final.params[k], ref.params[k]) for k in ref.params),
            "states": len(states),
            "ranks": [s.get("dataset_state", {}).get("rank") if s.get("dataset_state")
                      else None for s in states],
            "resumed_at": saved["step"],
        }
    with open(os.path.join(out, f"rank{RANK}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
