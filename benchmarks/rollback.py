"""What `ft.with_rollback` costs a run that never diverges, against the same loop without it.

    python benchmarks/rollback.py            # 9 rounds of 400 steps
    python benchmarks/rollback.py --quick    # 3 rounds of 100 steps

A tiny MLP (32-64-1, Adam, batch 32, one thread): the per-step work of the layer is a
list append, and every `every_n_steps` one host read of the window's losses and one copy
of the state (the newest good state), so on a model this small the relative cost is the
largest it gets. Rounds interleave the variants so machine noise falls on all alike.
Prints median us/step and the ratio to the plain loop (target: every_n_steps=10 within
1.10x), and the memory of one good state.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import ftrain as ft

OFF = {"logger": False, "checkpoint": False, "progress": False}


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    return ft.TrainState.create(model, ft.optim.adam(1e-3))


def timed(step: object, data: list) -> tuple[float, ft.TrainState]:
    state = fresh()
    start = time.perf_counter()
    state = ft.fit(step, state, data, epochs=1, **OFF)
    return time.perf_counter() - start, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds, steps = (3, 100) if args.quick else (9, 400)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 32, generator=g), torch.randn(32, 1, generator=g))
            for _ in range(steps)]
    core = ft.train_step(loss_fn)
    variants = {"plain": core,
                "every_n_steps=100": ft.with_rollback(core, every_n_steps=100),
                "every_n_steps=10": ft.with_rollback(core, every_n_steps=10),
                "every_n_steps=1": ft.with_rollback(core, every_n_steps=1)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    finals = {}
    timed(core, data[:10])  # warm-up
    for _ in range(rounds):
        for name, step in variants.items():
            seconds, finals[name] = timed(step, data)
            times[name].append(seconds)
    plain = finals["plain"]
    for name, state in finals.items():  # nothing diverged: the same numbers bitwise
        assert all(torch.equal(state.params[k], plain.params[k]) for k in plain.params), name
    base = statistics.median(times["plain"])
    print(f"{'variant':<20} {'us/step':>9} {'ratio':>7}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<20} {med / steps * 1e6:9.1f} {med / base:7.3f}")
    state = plain
    nbytes = sum(t.numel() * t.element_size() for t in
                 torch.utils._pytree.tree_leaves((state.params, state.buffers,
                                                  state.opt_state))
                 if isinstance(t, torch.Tensor))
    print(f"one good state: {nbytes / 1024:.1f} KiB (keep=2 holds two)")


if __name__ == "__main__":
    main()
