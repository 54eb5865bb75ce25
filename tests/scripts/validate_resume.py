"""A run for the fractional-validation kill-and-resume test: validates four times an epoch
(`every_n_epochs=0.25`), checkpoints every step, resumes "auto".

    python validate_resume.py ROOT OUT [--sleep S]

Appends "<step> <loss as float.hex()> <val_loss as float.hex() or ->" to OUT after every
step, and at the end saves the final params and the validation slot to OUT + ".final.pt".
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    data = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8, shuffle=True)  # 8 a epoch
    val = {"a": DataLoader(TensorDataset(x[64:80], y[64:80]), batch_size=8),
           "b": DataLoader(TensorDataset(x[80:], y[80:]), batch_size=8)}
    state = ft.TrainState.create(model, ft.optim.adamw(1e-2), seed=3)

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    validated = ft.with_validation(ft.train_step(loss_fn), ft.eval_step(loss_fn), val,
                                   every_n_epochs=0.25)
    out = open(args.out, "a")  # kept open for the whole run

    def record(state, batch):
        state, metrics = validated(state, batch)
        val_loss = float(metrics["val_b_loss"]).hex() if "val_b_loss" in metrics else "-"
        out.write(f"{state.step} {float(metrics['loss']).hex()} {val_loss}\n")
        out.flush()
        if args.sleep:
            time.sleep(args.sleep)
        return state, metrics

    record.inner = validated  # type: ignore[attr-defined]
    for hook in ("init", "epoch_end", "close"):  # the protocol, forwarded
        setattr(record, hook, getattr(validated, hook))
    step = ft.with_checkpointing(record, every_n_steps=1, every_n_epochs=None, save_top_k=1)
    state = ft.fit(step, state, data, epochs=2, root_dir=args.root, logger=False,
                   progress=False, resume="auto", summary=False)
    torch.save({"params": state.params, "checks": state.slots["validation"]["checks"]},
               args.out + ".final.pt")


if __name__ == "__main__":
    main()
