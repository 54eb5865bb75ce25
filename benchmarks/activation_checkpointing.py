"""Memory saved and time spent by `ft.with_activation_checkpointing`.

Model: a deep residual MLP (`--depth` blocks of Linear(d, 4d) -> GELU -> Linear(4d, d),
d=`--width`), batch `--batch`. Variants: the plain `ft.train_step` and the same step with
every block checkpointed (`"blocks.*"`), run inside `ft.iterate` (the bound path a loop
uses). Reported per variant:

- saved activation bytes: the sizes of the tensors autograd saves for backward during one
  step, summed by a `torch.autograd.graph.saved_tensors_hooks` pack hook (on any device;
  the recomputation in backward saves its own, freed block by block, not counted);
- peak allocated bytes from `torch.cuda.max_memory_allocated` when on CUDA;
- median step time over `--repeats` timed epochs of `--steps` steps (a warm-up first).

Ratios are checkpointed / plain. `--quick` is a smaller, shorter run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import ftrain as ft


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.nn.functional.gelu(self.fc(x)))


class Net(nn.Module):
    def __init__(self, d: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d) for _ in range(depth)))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def saved_bytes(step: ft.Step, state: ft.TrainState, batch: object) -> int:
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(state, batch)
    return total[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.width, args.depth, args.batch, args.steps, args.repeats = 128, 8, 128, 5, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = Net(args.width, args.depth)
    x = torch.randn(args.batch, args.width, device=device)
    batch = (x, torch.randn(args.batch, 1, device=device))
    base = ft.train_step(loss_fn)
    steps = {"plain": base,
             "checkpointed": ft.with_activation_checkpointing(base, "blocks.*")}
    results: dict[str, dict[str, float]] = {}
    for name, step in steps.items():
        state = ft.TrainState.create(model, ft.optim.adamw(1e-4)).to(device)
        saved = saved_bytes(step, state, batch)
        peak = float("nan")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(state, batch)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        times = []
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            n = 0  # from the same fresh state each time (donate=False leaves it as it is)
            for _ in ft.iterate(step, state, [batch] * args.steps, epochs=1, donate=False):
                n += 1
            assert n == args.steps, n
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:  # the first epoch warms up
                times.append((time.perf_counter() - t0) / args.steps)
        results[name] = {"saved": saved, "peak": peak, "time": statistics.median(times)}
    print(f"device {device} ({torch.get_num_threads()} threads), MLP {args.depth} blocks, "
          f"width {args.width}, batch {args.batch}")
    print(f"{'':14}{'saved MB':>10}{'peak MB':>10}{'ms/step':>10}")
    for name, r in results.items():
        print(f"{name:14}{r['saved'] / 2**20:10.2f}{r['peak'] / 2**20:10.2f}"
              f"{r['time'] * 1e3:10.2f}")
    p, c = results["plain"], results["checkpointed"]
    print(f"checkpointed / plain: saved activations {c['saved'] / p['saved']:.3f}x, "
          f"step time {c['time'] / p['time']:.3f}x")


if __name__ == "__main__":
    main()
