"""Run by tests/test_accumulate_batches.py under torchrun (2 ranks):
with_accumulation(over="batches") under with_ddp. Ten batches of varied sizes, dealt out
in whole batches (rank 0: 0, 2, 4, ...; rank 1: 1, 3, 5, ...), two per group on each
rank: the groups are batches 0-3, 4-7 and 8-9 (the epoch's last, partial group). Checks,
written to OUT/rank<r>.json: the partial gradient differs between the ranks before a
group's end (no all-reduce there); the result equals one process stepping on each
group's samples at once; a run stopped mid-group with a checkpoint every step and
resumed equals the run never stopped, bitwise.

usage: torchrun --nproc_per_node=2 ddp_accumulate.py OUT
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import ftrain as ft

RANK = int(os.environ["RANK"])
G = torch.Generator().manual_seed(2)
SIZES = [3, 7, 5, 2, 4, 6, 5, 3, 2, 4]
X = torch.randn(sum(SIZES), 5, generator=G)
Y = torch.randn(sum(SIZES), 1, generator=G)
DATA = list(zip(X.split(SIZES), Y.split(SIZES)))


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return ft.TrainState.create(model, ft.optim.sgd(0.1), seed=3)


def mse(m, b):
    return torch.nn.functional.mse_loss(m(b[0]), b[1])


def step(out: str | None = None):
    core = ft.with_accumulation(ft.with_ddp(ft.train_step(mse)), 2, over="batches")
    return core if out is None else ft.with_checkpointing(core, out, every_n_steps=1,
                                                          every_n_epochs=None)


def main() -> None:
    out = sys.argv[1]
    result = {}
    # the partial gradient after one batch: each rank's own
    for state, _ in ft.iterate(step(), fresh(), DATA, epochs=1):
        mine = state.slots["accumulation"]["grads"]["0.weight"].clone()
        break
    both = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    result["local_grads_differ"] = not torch.equal(both[0], both[1])

    straight = ft.fit(step(), fresh(), DATA, epochs=1, logger=False, checkpoint=False,
                      progress=False)
    one = fresh()  # one process, one step on each group's samples
    for group in (DATA[0:4], DATA[4:8], DATA[8:10]):
        one, _ = ft.train_step(mse)(one, (torch.cat([b[0] for b in group]),
                                          torch.cat([b[1] for b in group])))
    result["max_diff_to_one_process"] = max(
        float((straight.params[k] - one.params[k]).abs().max()) for k in one.params)

    folder = os.path.join(out, "ckpt")
    ft.fit(step(folder), fresh(), DATA, max_steps=3, logger=False, progress=False)
    saved = ft.load(os.path.join(folder, "last.ckpt"), like=fresh())
    resumed = ft.fit(step(folder), saved, DATA, epochs=1, logger=False, progress=False)
    uninterrupted = ft.fit(step(os.path.join(out, "ref")), fresh(), DATA, epochs=1,
                           logger=False, progress=False)
    result["resumed_bitwise"] = all(torch.equal(resumed.params[k], uninterrupted.params[k])
                                    for k in resumed.params)
    result["counts"] = [int(resumed.opt_state["count"]), int(straight.opt_state["count"])]
    with open(os.path.join(out, f"rank{RANK}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
