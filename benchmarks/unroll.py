"""`ft.unroll` against a hand-written torch.func unroll and torchopt, on MAML's task.

    python benchmarks/unroll.py            # 15 rounds
    python benchmarks/unroll.py --quick    # 3 rounds

One meta-iteration: 10 sinusoid tasks, each 3 inner steps (SGD at 0.01, or Adam at 1e-3)
on its 10 support points from the shared parameters, the adapted model's loss on 10
query points, and the backward of the mean of those losses to the shared parameters.
Three implementations of the same computation, timed interleaved (one meta-iteration
each, in turn) so machine noise falls on all alike: `ft.unroll` + `ft.apply`; a
hand-written unroll (torch.func.functional_call, torch.autograd.grad with
create_graph, the update written out); torchopt's functional optimizers
(`torchopt.sgd` / `adam`, `update(..., inplace=False)`, `apply_updates`) when torchopt
is installed (it is not a dependency). Each meta-gradient is checked against the
hand-written one first. Target: ft / hand >= 1.0x (medians of steps/s).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import ftrain as ft

K, TASKS, STEPS = 10, 10, 3
TINY = torch.finfo(torch.float32).tiny


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 1))


def tasks(n: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    amplitude = torch.empty(n, 1, 1).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(n, 1, 1).uniform_(0.0, math.pi, generator=g)
    xs = torch.empty(n, 2 * K, 1).uniform_(-5.0, 5.0, generator=g)
    ys = amplitude * torch.sin(xs - phase)
    return list(zip(xs[:, :K], ys[:, :K], xs[:, K:], ys[:, K:]))


def regression(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1])


TEMPLATES: dict[bool, ft.TrainState] = {}  # the inner optimizer's state, made once
STEP = ft.train_step(regression)


def ftrain_way(net: nn.Module, batch: list[tuple[torch.Tensor, ...]], adam: bool) -> list:
    if adam not in TEMPLATES:
        TEMPLATES[adam] = ft.TrainState.create(net, ft.optim.adam(1e-3) if adam
                                               else ft.optim.sgd(0.01))
    template, step = TEMPLATES[adam], STEP
    params = dict(net.named_parameters())
    losses = []
    for xs, ys, xq, yq in batch:
        task = ft.unroll(step, template.replace(params=params), [(xs, ys)] * STEPS)
        losses.append(F.mse_loss(ft.apply(task, xq), yq))
    return list(torch.autograd.grad(torch.stack(losses).mean(), list(params.values())))


def hand_way(net: nn.Module, batch: list[tuple[torch.Tensor, ...]], adam: bool) -> list:
    params = dict(net.named_parameters())
    losses = []
    for xs, ys, xq, yq in batch:
        w = dict(params)
        m = {k: torch.zeros_like(v) for k, v in w.items()}
        v2 = {k: torch.zeros_like(v) for k, v in w.items()}
        for t in range(1, STEPS + 1):
            loss = F.mse_loss(functional_call(net, w, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            for (k, p), g in zip(list(w.items()), grads):
                if adam:
                    m[k] = 0.9 * m[k] + 0.1 * g
                    v2[k] = 0.999 * v2[k] + 0.001 * g * g
                    # clamped: ReLU's dead units give exact zeros, and sqrt'(0) is inf
                    denom = (v2[k].clamp_min(TINY) / (1 - 0.999 ** t)).sqrt() + 1e-8
                    w[k] = p - 1e-3 * (m[k] / (1 - 0.9 ** t)) / denom
                else:
                    w[k] = p - 0.01 * g
        losses.append(F.mse_loss(functional_call(net, w, (xq,)), yq))
    return list(torch.autograd.grad(torch.stack(losses).mean(), list(params.values())))


def torchopt_way(net: nn.Module, batch: list[tuple[torch.Tensor, ...]], adam: bool) -> list:
    import torchopt
    names = [n for n, _ in net.named_parameters()]
    params = tuple(net.parameters())
    losses = []
    for xs, ys, xq, yq in batch:
        opt = torchopt.adam(1e-3, eps_root=TINY) if adam else torchopt.sgd(0.01)
        w, state = params, opt.init(params)
        for _ in range(STEPS):
            loss = F.mse_loss(functional_call(net, dict(zip(names, w)), (xs,)), ys)
            grads = torch.autograd.grad(loss, w, create_graph=True)
            updates, state = opt.update(grads, state, inplace=False)
            w = torchopt.apply_updates(w, updates, inplace=False)
        losses.append(F.mse_loss(functional_call(net, dict(zip(names, w)), (xq,)), yq))
    return list(torch.autograd.grad(torch.stack(losses).mean(), list(params)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    ways = {"ftrain": ftrain_way, "hand": hand_way}
    try:
        import torchopt  # noqa: F401
        ways["torchopt"] = torchopt_way
    except ImportError:
        print("torchopt is not installed: ftrain against the hand-written unroll only")
    net, batch = model(), tasks(TASKS)
    lines = []
    for adam in (False, True):
        inner = "Adam 1e-3" if adam else "SGD 0.01"
        want = hand_way(net, batch, adam)
        for way in ways.values():  # the same meta-gradient first
            for a, b in zip(way(net, batch, adam), want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, way in ways.items():
                t0 = time.perf_counter()
                way(net, batch, adam)
                times[name].append(time.perf_counter() - t0)
        rate = {name: 1 / statistics.median(t) for name, t in times.items()}
        lines.append(f"inner {inner}: meta-iterations/s, median of {rounds}: " + ", ".join(
            f"{n} {r:.1f}" for n, r in rate.items()))
        lines.append(f"  ft / hand {rate['ftrain'] / rate['hand']:.2f}x (target >= 1.0x)"
                     + (f", ft / torchopt {rate['ftrain'] / rate['torchopt']:.2f}x"
                        if "torchopt" in rate else ""))
    print(f"== ft.unroll: {TASKS} tasks x {STEPS} inner steps, MLP 1-40-40-1, CPU "
          f"({torch.get_num_threads()} threads) ==")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
