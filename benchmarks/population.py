"""Training a population with `ft.vmap` against sequential hand-written loops.

Workload (the issue's target): 32 tiny MLPs (32-64-10, ReLU), batch 32, cross-entropy,
Adam lr 1e-3, CPU, torch's default thread count (what a user's hand loop and ftrain both
get unconfigured; `--threads 1` pins one thread for every variant). One "epoch" is a list of E
pre-made (x, y) batches (E = 200 by default, `--steps`); every variant does the same total
work, 32 x E model updates:

- `hand`: 32 sequential hand-written loops, one model after the other, each over the E
  batches with `torch.optim.Adam(lr=1e-3)` (torch's default implementation for CPU
  tensors): zero_grad; forward; loss; backward; step;
- `hand 1 thread`: the same pinned to one thread (`torch.set_num_threads(1)` around it),
  a tiny model's fastest setting; left out when every variant runs on one thread;
- `pop eager`: `ft.fit(ft.vmap(ft.train_step(loss_fn)), pop, data, epochs=1, logger=False,
  checkpoint=False, progress=False)` on a 32-member population (E population steps, each
  training all 32 members: the batched forward of `ftrain.populations.batched`, one GEMM
  per linear layer and one cross-entropy for all members, one backward for the
  per-member gradients, batched Adam);
- `pop vmap` (information): the same with `population_step(loss_fn, batched=False)`, the
  forward through `torch.func.vmap` as before the batched path;
- `pop compiled`: the same with `population_step(loss_fn, compile=True)`, whose kernel
  (per-member loss and gradients, update of every member) is
  `torch.compile(fullgraph=True)`-compiled; compilation happens in a warm-up call outside
  the timing (its cost is printed separately);
- `kernel eager` / `kernel compiled` (information): the step's kernel,
  `step.kernel(pop)(params, buffers, opt_state, batch)`, called in a bare Python loop:
  the population step without the loop's and the step's bookkeeping (metrics per
  member, seeding, the state record), i.e. the least a population iteration costs.

Each variant's whole call is timed (model and state construction excluded). Variants are
interleaved in every round (the order rotates) after a warm-up round; the summary gives
the median time per E steps and the ratios `hand / variant` as medians of the per-round
ratios (paired, so slow drift of a shared machine cancels) with their range.

Targets (issue 14): pop eager >= 10x hand, pop compiled >= 30x hand, judged against the
*faster* hand loop of each round (`best hand`: at torch's default threads or at one), in
the full run (not `--quick`, whose 20 steps leave `ft.fit`'s fixed cost of ~2 ms
unamortized).

Threads: a hand loop of one tiny model gets slightly slower with more threads (its ops
are far below torch's parallel grain, so threads only add overhead), while a population's
batched ops use them; that is part of what batching the members buys. So the variants
run at torch's default thread count, as an unconfigured program would, the hand loop
also at one thread, and the targets are judged against the faster of the two.
`--threads 1` runs every variant on one thread.

Run: `python benchmarks/population.py` (a few minutes) or `--quick` (under a minute,
mostly compiling).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import loss_fn
from torch import nn

import ftrain as ft
from ftrain.populations.population import PopulationStep, population, population_step

Batch = tuple[torch.Tensor, torch.Tensor]
MEMBERS = 32
EAGER_TARGET = 10.0
COMPILED_TARGET = 30.0


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def make_data(steps: int, batch: int = 32) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(steps)]


def hand(data: list[Batch], threads: int | None = None) -> float:
    """32 sequential hand loops with torch.optim.Adam (on `threads` threads); returns the
    wall time."""
    default = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _hand(data)
    finally:
        torch.set_num_threads(default)


def _hand(data: list[Batch]) -> float:
    models = []
    for seed in range(MEMBERS):
        torch.manual_seed(seed)
        models.append(make_model())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    start = time.perf_counter()
    for model, opt in zip(models, opts):
        for batch in data:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def make_population() -> ft.TrainState:
    template = ft.TrainState.create(make_model(), ft.optim.adam(1e-3), seed=0)
    return population(template, n=MEMBERS)


def pop_run(step: Callable[..., object], pop: ft.TrainState, data: list[Batch]) -> float:
    pop = pop.copy()  # same model and optimizer records: the step's (compiled) kernel is reused
    start = time.perf_counter()
    ft.fit(step, pop, data, epochs=1, logger=False, checkpoint=False, progress=False)
    return time.perf_counter() - start


def kernel_run(step: PopulationStep, pop: ft.TrainState, data: list[Batch]) -> float:
    kernel = step.kernel(pop)
    own = pop.copy()
    params, buffers, opt_state = own.params, own.buffers, own.opt_state
    start = time.perf_counter()
    for batch in data:
        kernel(params, buffers, opt_state, batch)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="batches per timed call (E)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a smoke run: E=20, 3 rounds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every variant (default: torch's default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 20, 3
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = make_data(args.steps)
    eager = population_step(loss_fn)
    vmapped = population_step(loss_fn, batched=False)
    compiled = population_step(loss_fn, compile=True)
    pop = make_population()
    t0 = time.perf_counter()
    pop_run(compiled, pop, data[:2])  # compiles the kernel (once per step object)
    compile_s = time.perf_counter() - t0
    variants: dict[str, Callable[[], float]] = {
        "hand": lambda: hand(data),
        "hand 1 thread": lambda: hand(data, threads=1),
        "pop eager": lambda: pop_run(eager, pop, data),
        "pop vmap": lambda: pop_run(vmapped, pop, data),
        "pop compiled": lambda: pop_run(compiled, pop, data),
        "kernel eager": lambda: kernel_run(eager, pop, data),
        "kernel compiled": lambda: kernel_run(compiled, pop, data),
    }
    if torch.get_num_threads() == 1:
        del variants["hand 1 thread"]
    names = list(variants)
    for name in names:  # warm-up round
        variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(variants[name]())
    per_update = {n: statistics.median(t) / (args.steps * MEMBERS) for n, t in times.items()}
    print(f"{MEMBERS} MLPs 32-64-10, batch 32, Adam, {args.steps} steps per call, "
          f"{args.rounds} rounds, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    print(f"compiling the population kernel took {compile_s:.1f} s (once)")
    if eager.vmap_reason is not None:
        print(f"the eager population step ran through vmap: {eager.vmap_reason}")
    print(f"{'variant':<16}{'median s/call':>14}{'us per model update':>22}")
    for n in names:
        print(f"{n:<16}{statistics.median(times[n]):>14.4f}{per_update[n] * 1e6:>22.2f}")
    out: dict[str, float] = {"compile_s": compile_s}
    hands = [n for n in names if n.startswith("hand")]
    best = [min(ts) for ts in zip(*(times[h] for h in hands))]  # the faster hand loop
    targets = {"pop eager": EAGER_TARGET, "pop compiled": COMPILED_TARGET}
    for n in names:
        if n in hands:
            continue
        for base, base_times in [*((h, times[h]) for h in hands), ("best hand", best)]:
            if base == "best hand" and len(hands) == 1:
                continue
            ratios = [h / v for h, v in zip(base_times, times[n])]
            med = statistics.median(ratios)
            line = f"{base} / {n}: {med:.1f}x (range {min(ratios):.1f}-{max(ratios):.1f})"
            if n in targets and base == ("best hand" if len(hands) > 1 else "hand"):
                out[n] = med
                verdict = "meets" if med >= targets[n] else "MISSES"
                line += f"; target >= {targets[n]:.0f}x: {verdict}"
            print(line)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
