"""A training run for the kill-and-resume tests: checkpoints every step, resumes "auto".

    python resumable.py ROOT OUT [--sleep S] [--big]

Appends "<step> <loss as float.hex()>" to OUT after every step, and at the end saves the
final params to OUT + ".final.pt". Shuffling, dropout and a warmup-cosine schedule make
any resume mistake visible.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--big", action="store_true", help="a ~16 MB state (save tests)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden = 1024 if args.big else 32
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(hidden, hidden if args.big else 4), nn.ReLU(),
                          nn.Linear(hidden if args.big else 4, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # 12 batches/epoch
    schedule = ft.optim.schedules.warmup_cosine(1e-2, warmup_steps=5, total_steps=36)
    state = ft.TrainState.create(model, ft.optim.adamw(schedule), seed=3)

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    core = ft.train_step(loss_fn)
    out = open(args.out, "a")  # kept open for the whole run

    def record(state, batch):
        state, metrics = core(state, batch)
        out.write(f"{state.step} {float(metrics['loss']).hex()}\n")
        out.flush()
        if args.sleep:
            time.sleep(args.sleep)
        return state, metrics

    record.inner = core  # type: ignore[attr-defined]
    step = ft.with_checkpointing(record, every_n_steps=1, every_n_epochs=None, save_top_k=2)
    state = ft.fit(step, state, data, epochs=args.epochs, root_dir=args.root, logger=False,
                   progress=False, resume="auto")
    torch.save(state.params, args.out + ".final.pt")


if __name__ == "__main__":
    main()
