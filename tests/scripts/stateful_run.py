"""A run on a stream that keeps its own position (torchdata's StatefulDataLoader over an
IterableDataset with state_dict), for tests/test_stateful_data.py: checkpoints every step,
resumes "auto".

    python stateful_run.py ROOT OUT [--sleep S] [--accumulate N]

Appends "<step> <loss as float.hex()> <sample ids>" to OUT after every step and
"<first step> <samples read>" (this process's) to OUT + ".reads" at the end; saves the
final params to OUT + ".final.pt". `--accumulate N`: one update per N batches
(with_accumulation over="batches"), for tests/test_accumulate_batches.py.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import ftrain as ft

warnings.filterwarnings("ignore", message=".*set_vital.*")


class Stream(IterableDataset):
    """48 samples a pass, each pass in its own order; its position is its state."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(48, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
        self.pos, self.passes, self.reads = 0, 0, 0

    def __iter__(self):
        order = torch.randperm(48, generator=torch.Generator().manual_seed(self.passes))
        while self.pos < 48:
            i = int(order[self.pos])
            self.pos += 1
            self.reads += 1
            yield self.x[i], self.y[i], i
        self.pos, self.passes = 0, self.passes + 1

    def state_dict(self) -> dict:
        return {"pos": self.pos, "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.passes = state["pos"], state["passes"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--accumulate", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    loader = StatefulDataLoader(Stream(), batch_size=8)  # 6 batches a pass
    state = ft.TrainState.create(model, ft.optim.adamw(1e-2), seed=3)
    core = ft.train_step(lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    if args.accumulate:
        core = ft.with_accumulation(core, args.accumulate, over="batches")
    out = open(args.out, "a")  # kept open for the whole run

    first: list[int] = []

    def record(state, batch):
        if not first:
            first.append(state.step)  # where this process began
        state, metrics = core(state, batch)
        ids = ",".join(str(i) for i in batch[2].tolist())
        out.write(f"{state.step} {float(metrics['loss']).hex()} {ids}\n")
        out.flush()
        if args.sleep:
            time.sleep(args.sleep)
        return state, metrics

    record.inner = core  # type: ignore[attr-defined]
    record.init = core.init  # type: ignore[attr-defined]  # the core's slot, its epoch end
    record.epoch_end = core.epoch_end  # type: ignore[attr-defined]
    step = ft.with_checkpointing(record, every_n_steps=1, every_n_epochs=None, save_top_k=1)
    state = ft.fit(step, state, loader, epochs=3, root_dir=args.root, logger=False,
                   progress=False, resume="auto")
    torch.save(state.params, args.out + ".final.pt")
    with open(args.out + ".reads", "a") as f:
        f.write(f"{first[0]} {loader.dataset.reads}\n")


if __name__ == "__main__":
    main()
