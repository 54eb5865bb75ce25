"""Trained by tests/test_ddp_resize.py: stop mid-epoch under one number of processes,
continue under another. Every step appends the sample indices it trained on.

usage: ddp_resize.py OUT TAG (--max-steps N | --resume PATH)   (torchrun or plain python)
"""

import argparse
import os

import torch
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("tag")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=96)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 5, generator=g)
    x = x[:args.samples]
    data = DataLoader(TensorDataset(x, (x.sum(1) > 0).long(), torch.arange(len(x))),
                      batch_size=args.batch, shuffle=True)
    seen = open(f"{args.out}/{args.tag}-rank{rank}.txt", "a")

    def loss_fn(m, b):
        seen.write(" ".join(str(int(i)) for i in b[2]) + "\n")
        seen.flush()
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    state = ft.TrainState.create(model, ft.optim.sgd(0.1), seed=3)
    step = ft.with_checkpointing(ft.with_ddp(ft.train_step(loss_fn)), f"{args.out}/{args.tag}")
    if args.resume:
        state = ft.fit(step, state, data, epochs=1, logger=False, progress=False,
                       resume=args.resume)
    else:
        state = ft.fit(step, state, data, max_steps=args.max_steps, logger=False,
                       progress=False)
    print(f"rank {rank} ended at step {state.step}, position {state.slots['loop']}", flush=True)


if __name__ == "__main__":
    main()
