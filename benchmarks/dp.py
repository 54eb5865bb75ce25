"""DP-SGD: `ft.with_dp` (torch.func per-sample gradients) against Opacus, side by side.

    python benchmarks/dp.py            # 7 rounds of 20 steps each, and memory
    python benchmarks/dp.py --quick    # smoke run: batch 32, 2 rounds of 3 steps

The same model (MLP 256-512-512-10, ~0.4M params), batch size (256), optimizer (SGD
0.05), clipping (max_grad_norm 1.0) and noise (noise_multiplier 1.0) in both:

- ft:     `ft.iterate(with_dp(train_step(loss_fn), ...), state, data)`: a loop's bound
          state, per-sample gradients by `vmap(grad(...))`, clipped, summed, noised;
- opacus: `GradSampleModule` + `DPOptimizer` over `torch.optim.SGD`, the loop written out
          (zero_grad, forward, backward, step), as Opacus's `make_private` sets it up.

Timing: one thread; rounds interleaved (a block of steps of each variant in turn) after a
warm-up, so machine noise falls on both; the medians of steps/s and their ratio.
Target: ft / opacus >= 1.5x. Memory: each variant in its own child process, the peak
RSS (VmHWM, reset after warm-up) above the RSS before training.
Before timing, one noise-free step of each is checked to give the same parameters.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from _common import loss_fn, status_kb
from torch import nn

import ftrain as ft
from ftrain.privacy import with_dp

D_IN, HIDDEN, CLASSES, BATCH = 256, 512, 10, 256
CLIP, NOISE, LR = 1.0, 1.0, 0.05
TARGET = 1.5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN),
                         nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def make_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, D_IN, generator=g), torch.randint(0, CLASSES, (BATCH,),
                                                                   generator=g))
            for _ in range(n)]


class Cycle:
    """Batches without end: one 'epoch' as long as asked (a loop's iterable)."""

    def __init__(self, data: list[Any], length: int) -> None:
        self.data, self.length = data, length

    def __iter__(self) -> Any:
        return (self.data[i % len(self.data)] for i in range(self.length))

    def __len__(self) -> int:
        return self.length


def ft_runner(data: list[Any], total: int, noise: float = NOISE) -> Any:
    step = with_dp(ft.train_step(loss_fn), max_grad_norm=CLIP, noise_multiplier=noise,
                   sample_rate=0.01)
    state = ft.TrainState.create(make_model(), ft.optim.sgd(LR), seed=0)
    return ft.iterate(step, state, Cycle(data, total), epochs=1)


def opacus_runner(data: list[Any], total: int, noise: float = NOISE) -> Any:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    model = GradSampleModule(make_model())
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=noise,
                      max_grad_norm=CLIP, expected_batch_size=BATCH)

    def run() -> Any:
        for i in range(total):
            batch = data[i % len(data)]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            yield model, loss
    return run()


def check_same() -> float:
    """Max abs difference of the params after one noise-free step of each."""
    data = make_data(1)
    state, _ = next(ft_runner(data, 1, noise=0.0))
    model, _ = next(opacus_runner(data, 1, noise=0.0))
    ours = dict(state.params)
    theirs = {n.removeprefix("_module."): p for n, p in model.named_parameters()}
    return max(float((ours[n] - theirs[n]).detach().abs().max()) for n in ours)


def timing(rounds: int, steps: int) -> dict[str, list[float]]:
    data = make_data(8)
    total = (rounds + 1) * steps
    runners = {"ft": ft_runner(data, total), "opacus": opacus_runner(data, total)}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for name, gen in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                next(gen)
            dt = time.perf_counter() - t0
            if r:
                rates[name].append(steps / dt)
    for gen in runners.values():
        gen.close()
    return rates


# -- memory: one child process per variant ------------------------------------------------

def memory_child(variant: str, steps: int) -> None:
    data = make_data(4)
    make = ft_runner if variant == "ft" else opacus_runner
    for _ in make(data, 2):  # warm-up: lazy imports and first-call allocations
        pass
    gc.collect()
    base = status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    for _ in make(data, steps):
        pass
    print(json.dumps({"base_kb": base, "peak_kb": status_kb("VmHWM"), "reset": reset}))


def memory(steps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for variant in ("ft", "opacus"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-child",
                               variant, "--memory-steps", str(steps), "--batch",
                               str(BATCH)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        if not rec["reset"]:
            print(f"note: VmHWM not reset in the {variant} child; its peak includes start-up")
        out[variant] = (rec["peak_kb"] - rec["base_kb"]) / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (7)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (20)")
    parser.add_argument("--memory-steps", type=int, default=None, help="(default 10)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (256)")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global BATCH
    BATCH = args.batch or (32 if args.quick else BATCH)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message=".*backward hook.*")
    mem_steps = args.memory_steps or (3 if args.quick else 10)
    if args.memory_child:
        memory_child(args.memory_child, mem_steps)
        return
    rounds = args.rounds or (2 if args.quick else 7)
    steps = args.steps or (3 if args.quick else 20)
    diff = check_same()
    rates = timing(rounds, steps)
    mem = memory(mem_steps)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["ft"] / med["opacus"]
    print(f"== ft.with_dp vs Opacus: MLP {D_IN}-{HIDDEN}-{HIDDEN}-{CLASSES}, batch {BATCH}, "
          f"SGD, noise {NOISE}, clip {CLIP}, CPU ({torch.get_num_threads()} thread) ==")
    print(f"same params after one noise-free step: max |diff| = {diff:.2e}")
    for name in ("ft", "opacus"):
        shown = " ".join(f"{r:.1f}" for r in rates[name])
        print(f"{name:7s} steps/s median {med[name]:8.2f}   rounds: {shown}")
    print(f"ft / opacus (steps/s)   {ratio:.2f}x  target >= {TARGET}x  "
          f"{'PASS' if ratio >= TARGET else 'FAIL'}")
    print(f"peak memory above start (MiB, {mem_steps} steps): ft {mem['ft']:.1f}, "
          f"opacus {mem['opacus']:.1f}, ft / opacus {mem['ft'] / mem['opacus']:.2f}x")


if __name__ == "__main__":
    main()
