"""Train a digits classifier with differential privacy (DP-SGD) through `with_dp`.

    python examples/dp_digits.py                  # prints accuracy=... epsilon=...
    python examples/dp_digits.py --epsilon 1.0    # a tighter privacy budget

scikit-learn's 8x8 digits (1797 images; 80% train, 20% test), a 64-32-10 MLP, and
DP-SGD: each sample's gradient clipped to norm 1.0, Gaussian noise of std 2.0 x 1.0
added to their sum, batches Poisson-sampled (each training image joins each step's
batch with probability 64/1437), the privacy spent accounted by Opacus's RDP accountant
at delta = 1e-5, and training stopped by `target_epsilon` when that budget is spent.
Measured on the development CPU (torch 2.13, one thread): with the default budget,
epsilon = 3.0, the run stops after 739 steps (about 5 s) at test accuracy 0.91 to 0.95
(the noise seed is secret, so runs differ; 0.944 with `--noise-seed 0`); the test fixes
that seed and asserts accuracy >= 0.90 at epsilon <= 3.0.

Nothing is downloaded; the data ships inside scikit-learn.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import ftrain as ft
from ftrain.privacy import epsilon, poisson_loader, with_dp


def splits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), \
        TensorDataset(x[order[cut:]], y[order[cut:]])


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def accuracy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"accuracy": (model(x).argmax(-1) == y).float().mean()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0, help="the privacy budget")
    parser.add_argument("--noise", type=float, default=2.0, help="noise multiplier")
    parser.add_argument("--clip", type=float, default=1.0, help="max per-sample grad norm")
    parser.add_argument("--lr", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=64, help="expected batch size")
    parser.add_argument("--noise-seed", type=int, default=None,
                        help="fix the noise (tests only; by default it is secret)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, test = splits()
    loader = poisson_loader(train, args.batch / len(train))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    step = with_dp(ft.train_step(loss_fn), max_grad_norm=args.clip,
                   noise_multiplier=args.noise, delta=1e-5, data=loader,
                   target_epsilon=args.epsilon, noise_seed=args.noise_seed)
    state = ft.TrainState.create(model, ft.optim.sgd(args.lr, momentum=0.5), seed=0)
    state = ft.fit(step, state, loader, epochs=1000, logger=False, checkpoint=False,
                   progress=False)  # target_epsilon stops it earlier
    result = ft.evaluate(ft.eval_step(accuracy), state, [test.tensors])
    spent = epsilon(state)
    print(f"steps={state.step} accuracy={result['accuracy']:.4f} epsilon={spent:.3f} "
          f"delta=1e-05")
    return {"steps": state.step, "accuracy": result["accuracy"], "epsilon": spent}


if __name__ == "__main__":
    main()
