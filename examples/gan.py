"""Train a GAN on scikit-learn's 8x8 digits with a hand-written (manual) ftrain step.

    python examples/gan.py                       # prints samples and how digit-like they are
    python examples/gan.py --precision bf16      # forward passes under bfloat16 autocast
    python examples/gan.py --resume              # continues an interrupted run exactly
    torchrun --nproc_per_node=2 examples/gan.py  # the same script, data-parallel
    tensorboard --logdir ftrain_logs             # d_loss, g_loss, d_real, d_fake

A generator G (16 noise values -> MLP -> 64 pixels in [-1, 1]) and a discriminator D
(64 pixels -> MLP -> 1 logit) live in one `ft.TrainState`, each with its own Adam. The step
function updates D on real and generated digits, then G through the updated D (the
non-saturating GAN losses), with `m.update(d_loss, "D")` and `m.update(g_loss, "G")`. The
rest is the usual stack around it: optional bf16 autocast, data parallelism under
torchrun, logging, and a checkpoint per epoch that holds both models and both optimizers.

How digit-like are the samples? A small classifier, trained here on 1500 real digits,
labels 1000 generated ones: its mean top-class probability, the fraction it is confident
about (p > 0.9) and how many of the 10 classes it sees (a collapsed generator draws few).
The mean and spread of the pixels, the mean image and each sample's distance to its nearest
real digit are compared too. The same numbers for an untrained generator and for the 297
held-out real digits frame the result.

On this 2-core CPU the default run takes about 15 s (bf16 about 25 s: autocast's casts cost
more than they save on a CPU; 2 processes under torchrun about 45 s, two gradient
all-reduces per step). The data ships inside scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft

NOISE = 16
METRICS = ("confidence", "confident", "classes", "pixel_mean", "pixel_std",
           "mean_image_error", "nearest_real")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as (pixels scaled from 0..16 to [-1, 1], labels)."""
    x, y = load_digits(return_X_y=True)
    return (torch.tensor(x, dtype=torch.float32) / 8.0 - 1.0,
            torch.tensor(y, dtype=torch.int64))


def generator(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(NOISE, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, 64), nn.Tanh())


def discriminator(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, 1))


def new_state(seed: int = 0, lr: float = 2e-4) -> ft.TrainState:
    """Both models and their optimizers in one state (also the template for ft.load)."""
    torch.manual_seed(seed)  # the initial weights
    return ft.TrainState.create({"G": generator(), "D": discriminator()},
                                {"G": ft.optim.adam(lr, betas=(0.5, 0.999)),
                                 "D": ft.optim.adam(lr, betas=(0.5, 0.999))}, seed=seed)


def gan_step(m: ft.Manual, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One iteration: a discriminator update, then a generator update."""
    real, _ = batch
    G, D = m.model["G"], m.model["D"]
    n, device = len(real), real.device
    ones, zeros = torch.ones(n, 1, device=device), torch.zeros(n, 1, device=device)
    # ftrain seeds the device's generator from (seed, step, rank) for each step: the noise
    # is reproducible, resumes exactly, and differs between ranks
    fake = G(torch.randn(n, NOISE, device=device))

    # D: real -> 1, fake -> 0; fake is detached, so no gradient reaches G
    real_logits, fake_logits = D(real), D(fake.detach())
    d_loss = (F.binary_cross_entropy_with_logits(real_logits, ones)
              + F.binary_cross_entropy_with_logits(fake_logits, zeros))
    m.update(d_loss, "D")  # backward into D's parameters only, then D's Adam

    # G: the non-saturating loss -log D(G(z)), through the D just updated
    g_loss = F.binary_cross_entropy_with_logits(D(fake), ones)
    m.update(g_loss, "G")  # back-propagates into G's parameters only; D is left alone
    return {"d_loss": d_loss, "g_loss": g_loss,
            # D's mean P(real) on real and on fake digits (float32 also under bf16 autocast)
            "d_real": torch.sigmoid(real_logits.float()).mean(),
            "d_fake": torch.sigmoid(fake_logits.float()).mean()}


# -- measuring the samples ------------------------------------------------------------------

def classifier(x: torch.Tensor, y: torch.Tensor, seed: int) -> ft.TrainState:
    """A small digits classifier (under a second; ~97% on held-out digits)."""
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    state = ft.TrainState.create(model, ft.optim.adamw(3e-3), seed=seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    return ft.fit(ft.train_step(loss_fn), state, loader, epochs=30,
                  logger=False, checkpoint=False, progress=False)


def samples(state: ft.TrainState, n: int = 1000, seed: int = 123) -> torch.Tensor:
    """`n` images from the generator (the same noise for every state)."""
    z = torch.randn(n, NOISE, generator=torch.Generator().manual_seed(seed))
    return torch.cat(ft.predict(state, [z], model="G")).float()


def quality(images: torch.Tensor, real: torch.Tensor, judge: ft.TrainState
            ) -> dict[str, float]:
    """How digit-like `images` are: the judge's view, pixel statistics, nearest real digit."""
    top, label = torch.cat(ft.predict(judge, [images])).softmax(-1).max(-1)
    counts = torch.bincount(label, minlength=10)
    return {
        "confidence": float(top.mean()),                  # mean top-class probability
        "confident": float((top > 0.9).float().mean()),   # fraction with p > 0.9
        "classes": float((counts > len(images) // 100).sum()),  # classes with > 1% of them
        "pixel_mean": float(images.mean()),
        "pixel_std": float(images.std()),
        "mean_image_error": float((images.mean(0) - real.mean(0)).abs().mean()),
        "nearest_real": float(torch.cdist(images, real).min(1).values.mean()),  # L2
    }


def show(images: torch.Tensor) -> str:
    """Images in [-1, 1] side by side as text."""
    shades = " .:-=+*#%@"
    rows = []
    for r in range(8):
        pixels = ((images[:, 8 * r:8 * r + 8] + 1) / 2).clamp(0, 1) * (len(shades) - 1)
        rows.append("  ".join("".join(shades[int(p)] for p in img) for img in pixels))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32",
                        help="bf16: forward passes under bfloat16 autocast")
    parser.add_argument("--root-dir", default=".",
                        help="where ftrain_logs/ and checkpoints-gan/ are written")
    parser.add_argument("--progress", action="store_true", help="force the progress bar")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in <root-dir>/checkpoints-gan")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads: models this small run fastest on one, and "
                             "more threads than free cores slow every step a lot")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    x, y = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True,
                        drop_last=True)

    # The stack. with_amp and with_ddp set options on the core step (autocast; the gradient
    # all-reduce in m.update), so their place in the stack does not matter; on one
    # process with_ddp does nothing. Logging and checkpointing see only the step protocol.
    step: Any = ft.manual_step(gan_step)
    if args.precision == "bf16":
        step = ft.with_amp(step, torch.bfloat16)
    step = ft.with_ddp(step)
    step = ft.with_logging(step, every_n_steps=25, prog_bar=["d_loss", "g_loss"])
    ckpt_dir = os.path.join(args.root_dir, "checkpoints-gan")
    step = ft.with_checkpointing(step, ckpt_dir)  # every epoch; the newest and last.ckpt

    untrained = new_state(args.seed, args.lr)
    state = ft.fit(step, untrained.copy(), loader, epochs=args.epochs,
                   root_dir=args.root_dir, progress="always" if args.progress else True,
                   hparams=vars(args), resume="auto" if args.resume else None)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {"step": state.step}  # rank 0 reports

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    fit_idx, held_idx = order[:1500], order[1500:]
    judge = classifier(x[fit_idx], y[fit_idx], args.seed)
    reference = x[fit_idx]
    results = {"untrained": quality(samples(untrained), reference, judge),
               "trained": quality(samples(state), reference, judge),
               "real": quality(x[held_idx], reference, judge)}
    print(show(samples(state, 10)))
    print(f"{'':18}" + "".join(f"{name:>12}" for name in results))
    for key in METRICS:
        print(f"{key:18}" + "".join(f"{r[key]:12.3f}" for r in results.values()))
    return {**results, "step": state.step, "checkpoint": ft.checkpoints(ckpt_dir).last}


if __name__ == "__main__":
    main()
