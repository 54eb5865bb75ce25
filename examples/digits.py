"""Train an autoencoder and a classifier on scikit-learn's 8x8 digits with ftrain.

    python examples/digits.py            # prints the autoencoder's test error and the
                                         # classifier's test accuracy (expect > 0.9)
    python examples/digits.py --resume   # continues an interrupted run exactly
    python examples/digits.py --precision bf16            # mixed precision (autocast)
    python examples/digits.py --config run.json --lr 1e-2  # a config file, then flags
    python examples/digits.py --print-config              # the resolved configuration
    torchrun --nproc_per_node=2 examples/digits.py        # data parallel, 2 processes
    tensorboard --logdir ftrain_logs     # the runs' curves (one version_N per model)

The classifier keeps its 3 best checkpoints by validation loss, stops early when the
validation loss stops improving, and is tested with the best checkpoint's weights.
Both stacks include `ft.with_ddp`, which does nothing on one process and makes the same
script data-parallel under torchrun (each rank trains on its shard; rank 0 writes).

The configuration is an attrs record (`Config`) that `ft.cli.parse` fills from its
defaults, `--config` files and flags; it is stored in every checkpoint as hparams, so
`ft.cli.from_dict(Config, ft.load_hparams(path), ignore=["model"])` rebuilds it.

The data ships inside scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import os
import pathlib
from typing import Literal

import attrs
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft


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


# -- the autoencoder: 64 -> 8 -> 64 --------------------------------------------------------

def autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8),   # encoder
        nn.ReLU(), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64), nn.Sigmoid())  # decoder


def reconstruction_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                        ) -> torch.Tensor:
    x, _ = batch
    return F.mse_loss(model(x), x)


# -- the classifier -------------------------------------------------------------------------

def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch
    logits = model(x)
    accuracy = (logits.argmax(-1) == y).float().mean()
    return F.cross_entropy(logits, y), {"accuracy": accuracy}


# -- the configuration: one flag per field (--batch-size, --no-progress, ...) ---------------

@attrs.frozen
class Config:
    """The run's settings; `ft.cli.parse(Config, argv)` fills them from the command line."""

    epochs: int = attrs.field(default=20, validator=attrs.validators.ge(1), metadata={
        "help": "training epochs (a total, as Lightning's max_epochs)"})
    lr: float = attrs.field(default=3e-3, validator=attrs.validators.gt(0.0), metadata={
        "help": "peak learning rate"})
    batch_size: int = attrs.field(default=64, validator=attrs.validators.ge(1), metadata={
        "help": "training batch size"})
    seed: int = attrs.field(default=0, metadata={
        "help": "seed of the split, the initial weights, shuffling and dropout"})
    root_dir: pathlib.Path = attrs.field(default=pathlib.Path("."), metadata={
        "help": "where ftrain_logs/ and checkpoints/ are written"})
    precision: Literal["32", "bf16", "16"] = attrs.field(default="32", metadata={
        "help": "32: float32; bf16 / 16: autocast (16 adds a loss scaler)"})
    patience: int = attrs.field(default=2, metadata={
        "help": "early-stopping patience, in validation checks"})
    progress: bool = attrs.field(default=False, metadata={
        "help": "always show the progress bar (else only on a terminal)"})
    resume: bool = attrs.field(default=False, metadata={
        "help": "continue from the newest checkpoint in <root-dir>/checkpoints"})


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = ft.cli.parse(Config, argv, description=__doc__)
    hparams = ft.cli.to_dict(args)  # stored in every checkpoint and in TensorBoard's HPARAMS
    root = os.fspath(args.root_dir)
    progress = "always" if args.progress else True  # shown on a terminal by default
    device = ft.local_device()  # cuda:<LOCAL_RANK> when there is a GPU, else the CPU
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes torchrun started
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None)

    def scaled(step: ft.TrainStep) -> object:  # the inner layers: precision, data parallel
        if args.precision != "32":
            step = ft.with_amp(step, torch.bfloat16 if args.precision == "bf16"
                               else torch.float16)
        return ft.with_ddp(step)

    torch.manual_seed(args.seed)  # the models' initial weights
    data = digits_splits(args.seed)
    train = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True)
    val = DataLoader(data["val"], batch_size=256)
    test = DataLoader(data["test"], batch_size=256)
    steps_per_epoch = -(-len(train) // world)  # each rank trains on its shard
    steps = args.epochs * steps_per_epoch

    # Autoencoder: Adam with a constant learning rate; validated each epoch and logged to
    # TensorBoard (ft.fit's default logger) under <root-dir>/ftrain_logs/version_N.
    step = ft.with_validation(scaled(ft.train_step(reconstruction_loss)),
                              ft.eval_step(reconstruction_loss), val)
    state = ft.TrainState.create(autoencoder(), ft.optim.adam(args.lr), seed=args.seed)
    state = state.to(device)
    state = ft.fit(step, state, train, epochs=args.epochs, root_dir=root,
                   checkpoint=False, progress=progress, hparams={**hparams, "model": "ae"})
    ae = ft.evaluate(ft.eval_step(reconstruction_loss), state, test)
    say(f"autoencoder  test reconstruction MSE: {ae['loss']:.4f}")

    # Classifier: AdamW with warmup and cosine decay, no weight decay on biases.
    schedule = ft.optim.schedules.warmup_cosine(args.lr, warmup_steps=steps_per_epoch,
                                                total_steps=steps)
    optimizer = ft.optim.chain(
        ft.optim.clip_grad_norm(1.0),
        ft.optim.adamw(schedule, weight_decay=1e-2, groups={"*.bias": {"weight_decay": 0.0}}))
    # Validation each epoch -> logging -> top-3 checkpoints by val_loss -> early stopping.
    evaluator = ft.eval_step(classification_loss)
    ckpt_dir = os.path.join(root, "checkpoints")
    step = ft.with_validation(scaled(ft.train_step(classification_loss)), evaluator, val)
    step = ft.with_logging(step, every_n_steps=10, prog_bar=["loss", "accuracy"], log_lr=True)
    step = ft.with_checkpointing(step, ckpt_dir, monitor="val_loss", mode="min",
                                 save_top_k=3, filename="{epoch:02d}-{val_loss:.4f}")
    step = ft.early_stop(step, monitor="val_loss", patience=args.patience, min_delta=2e-3)
    template = ft.TrainState.create(classifier(), optimizer, seed=args.seed).to(device)
    state = ft.fit(step, template.copy(), train, epochs=args.epochs, root_dir=root,
                   progress=progress, hparams={**hparams, "model": "classifier"},
                   resume="auto" if args.resume else None)
    if ft.stop_reason(state):
        say(f"classifier   stopped at epoch {state.epoch}: {ft.stop_reason(state)}")

    # Test with the best checkpoint's weights (Lightning's trainer.test(ckpt_path="best")).
    best = ft.checkpoints(ckpt_dir).best
    best_state = ft.load(best, like=template)
    val_metrics = ft.evaluate(evaluator, best_state, val)
    test_metrics = ft.evaluate(evaluator, best_state, test)
    say(f"classifier   best checkpoint: {os.path.basename(best)}")
    say(f"classifier   val accuracy: {val_metrics['accuracy']:.4f}")
    say(f"classifier   test accuracy: {test_metrics['accuracy']:.4f}")
    return {"ae_mse": ae["loss"], "test_accuracy": test_metrics["accuracy"]}


if __name__ == "__main__":
    main()
