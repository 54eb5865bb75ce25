"""A learning-rate sweep in one run: 16 digits classifiers trained together with vmap.

    python examples/sweep.py                 # 16 members, learning rates 1e-4 .. 1e-1
    python examples/sweep.py --members 8 --epochs 5

Every member is the same MLP (64 -> 64 -> 10) with its own initial weights (drawn from its
own seed) and its own AdamW learning rate, log-spaced. `ft.population` stacks them into one
state, `ft.vmap(ft.train_step(...))` trains all of them on each batch in one step, and a
vmapped evaluation step reports every member's validation accuracy each epoch. The best
member by validation accuracy is taken out with `ft.member` (an ordinary state) and tested.

The data ships inside scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft
from ftrain.populations.population import member, population, split_members, vmap


def digits_splits(seed: int = 0) -> dict[str, TensorDataset]:
    """Train/val/test splits (70/15/15) of the 1797 digits, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.7 * len(x)), int(0.15 * len(x))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    return {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}


def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--lr-min", type=float, default=1e-4)
    parser.add_argument("--lr-max", type=float, default=1e-1)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = digits_splits(args.seed)
    train = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True)
    val = DataLoader(data["val"], batch_size=512)
    test = DataLoader(data["test"], batch_size=512)
    lrs = torch.logspace(torch.log10(torch.tensor(args.lr_min)),
                         torch.log10(torch.tensor(args.lr_max)), args.members).tolist()

    # One template; member i gets parameters drawn from seed args.seed + i and lrs[i].
    template = ft.TrainState.create(classifier(), ft.optim.adamw(1e-3, weight_decay=1e-4),
                                    seed=args.seed)
    pop = population(template, hparams={"lr": lrs})

    # All members train on the same shuffled batches; validation reports every member
    # ("val_accuracy/m3") and their mean ("val_accuracy") at each epoch end.
    evaluator = vmap(ft.eval_step(classification_loss))
    step = ft.with_validation(vmap(ft.train_step(classification_loss)), evaluator, val)
    pop = ft.fit(step, pop, train, epochs=args.epochs, logger=False, checkpoint=False,
                 progress=False)

    per_member = split_members(ft.evaluate(evaluator, pop, val))
    print(f"{'member':>6}  {'lr':>9}  {'val loss':>8}  {'val accuracy':>12}")
    for i, (lr, r) in enumerate(zip(lrs, per_member)):
        print(f"{i:>6}  {lr:>9.2e}  {r['loss']:>8.4f}  {r['accuracy']:>12.4f}")
    val_acc = [r["accuracy"] for r in per_member]
    best = max(range(len(val_acc)), key=lambda i: (val_acc[i], -per_member[i]["loss"]))

    # The best member is an ordinary state: evaluate (or save, bind, export) it as any.
    state = member(pop, best)
    test_acc = ft.evaluate(ft.eval_step(classification_loss), state, test)["accuracy"]
    print(f"best member: {best} (lr {lrs[best]:.2e}), val accuracy {val_acc[best]:.4f}, "
          f"test accuracy {test_acc:.4f}")
    return {"lrs": lrs, "val_accuracy": val_acc, "best": best, "best_lr": lrs[best],
            "test_accuracy": test_acc, "steps": pop.step}


if __name__ == "__main__":
    main()
