"""A run logging to an experiment tracker, for the SIGKILL + resume tests.

    python tracker_run.py ROOT TRACKER [--kill-at N] [--ddp]

TRACKER: mlflow, wandb or dvclive (files under ROOT). Logs every step, checkpoints every
4 steps, resumes "auto". With --kill-at N the process SIGKILLs itself as step N starts
(after the checkpoint of step N - N % 4 and the logs of steps up to N - 1). Dropout and
shuffling make a wrong resume visible in the logged losses.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft


def tracker(kind: str, root: str) -> object:
    if kind == "mlflow":
        return ft.loggers.MLflow("kill", save_dir=root)
    if kind == "wandb":
        # W&B writes an offline run's file every 15 s by default: here every 50 ms, as a
        # long run would have written its history before a kill
        return ft.loggers.WandB("kill", mode="offline", save_dir=root,
                                settings={"x_transaction_log_flush_interval": 0.05})
    if kind == "dvclive":
        return ft.loggers.DVCLive(os.path.join(root, "dvclive"),
                                  save_dvc_exp=False)
    raise SystemExit(f"unknown tracker {kind}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("tracker")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # 6 batches/epoch
    state = ft.TrainState.create(model, ft.optim.adam(1e-2), seed=3)
    core = ft.train_step(lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    if args.ddp:
        core = ft.with_ddp(core)

    def killed(state: ft.TrainState, batch: object) -> object:
        if args.kill_at is not None and state.step + 1 == args.kill_at:
            if args.tracker == "wandb":
                time.sleep(0.5)  # a flush of the W&B file (see tracker())
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: as a preempted machine
        return core(state, batch)

    killed.inner = core  # type: ignore[attr-defined]
    killed.init = core.init  # type: ignore[attr-defined]  (with_ddp joins here)
    killed.epoch_end = core.epoch_end  # type: ignore[attr-defined]
    step = ft.with_logging(killed, [tracker(args.tracker, args.root)], every_n_steps=1)
    step = ft.with_checkpointing(step, every_n_steps=4, every_n_epochs=None)
    ft.fit(step, state, data, epochs=3, root_dir=args.root, progress=False, resume="auto",
           hparams={"lr": 0.01, "width": 16})


if __name__ == "__main__":
    main()
