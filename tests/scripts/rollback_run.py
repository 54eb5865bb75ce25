"""A run whose data has a poisoned batch (NaN inputs at global batch 17), for
tests/test_rollback.py: `with_rollback` must skip the window around it.

    python rollback_run.py ROOT OUT [--kill-at STEP] [--skip A:B]
    torchrun --nproc_per_node=2 rollback_run.py ROOT OUT --ddp

Checkpoints every 3 steps (not a multiple of the rollback's 4: saves fall inside
unverified windows) and resumes "auto". `--kill-at STEP`: SIGKILL itself when the state
reaches STEP after a rollback. `--skip A:B`: the reference run, plain train_step on the
clean data without global batches A..B-1. `--ddp`: the rollback run and then the
reference without the batches the ranks skipped, both under with_ddp; each rank saves
OUT.rank<R>.pt. Saves {"params", "step", "slot"} to OUT.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from torch import nn

import ftrain as ft

POISON = 17


def batches(skip: range = range(0)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
            for _ in range(40)]
    data[POISON] = (torch.full((8, 4), float("nan")), data[POISON][1])
    return [b for i, b in enumerate(data) if i not in skip]


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    schedule = ft.optim.schedules.warmup_cosine(1e-2, warmup_steps=5, total_steps=60)
    return ft.TrainState.create(model, ft.optim.adamw(schedule), seed=1)


def loss_fn(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--skip", default=None)
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    off = {"logger": False, "progress": False}
    if args.skip:  # the reference: no rollback layer, the window left out of the data
        a, b = map(int, args.skip.split(":"))
        state = ft.fit(ft.train_step(loss_fn), fresh(), batches(range(a, b)), epochs=1,
                       checkpoint=False, **off)
        torch.save({"params": state.params, "step": state.step, "slot": None}, args.out)
        return
    core = ft.train_step(loss_fn)
    if args.ddp:
        core = ft.with_ddp(core)

    def kill(state, metrics):  # a hook inside the rollback layer: sees the live state
        if state.step == args.kill_at and state.slots["rollback"]["rollbacks"]:
            os.kill(os.getpid(), signal.SIGKILL)  # really: no clean-up, no exit handler

    inner = ft.every(core, kill, every_n_steps=1) if args.kill_at else core
    step = ft.with_rollback(inner, every_n_steps=4)
    step = ft.with_checkpointing(step, every_n_steps=3, every_n_epochs=None, save_top_k=2)
    state = ft.fit(step, fresh(), batches(), epochs=1, root_dir=args.root, resume="auto",
                   **off)
    result = {"params": state.params, "step": state.step, "slot": state.slots["rollback"]}
    if not args.ddp:
        torch.save(result, args.out)
        return
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    gone = {world * i + r for r in range(world)  # each rank's skipped indices, globally
            for entry in result["slot"]["skipped"]
            for i in range(entry["first"][1], entry["last"][1] + 1)}
    clean = [b for i, b in enumerate(batches()) if i not in gone]
    ref = ft.fit(ft.with_ddp(ft.train_step(loss_fn)), fresh(), clean, epochs=1,
                 checkpoint=False, **off)
    torch.save({**result, "reference": ref.params, "reference_step": ref.step,
                "gone": sorted(gone)}, f"{args.out}.rank{rank}.pt")


if __name__ == "__main__":
    main()
