"""Whole-step compilation (`ft.compile`) against eager loops: steps/s in steady state.

CPU (always): tiny MLP 32-64-10, batch 32, cross-entropy, Adam lr 1e-3, one thread
(`torch.set_num_threads(1)`). Variants, each fed the same list of E pre-made batches per
round (E = 1000; 200 with `--quick`):

- hand: a hand-written eager loop with `torch.optim.Adam` (torch's default, foreach):
  zero_grad; forward; loss; backward; step,
- ft eager: `ft.fit(ft.train_step(loss_fn), state, data, epochs=k, logger=False,
  checkpoint=False, progress=False)`,
- ft compiled: the same with `ft.compile(ft.train_step(loss_fn))`.

Each variant keeps its model (state) across rounds: one warm-up round first (the compiled
step compiles there; its compile time is reported separately as the first call's time
over one batch minus the eager step's first call), then R rounds (7; 2 with `--quick`)
with the variants interleaved and their order rotating. Per step = round time / E (a fit
call's own start-up, ~1 ms, is spread over the E steps). Medians over rounds; ratios are
medians of the per-round ratios (paired, so a shared machine's slow drift cancels), with
their range. Target (issue 7): ft compiled >= 3x the hand loop's steps/s.

CUDA (when available, guarded): `mode="reduce-overhead"` (CUDA graphs) against the eager
hand loop, on the tiny MLP (fp32, batch 32) and on a small GPT-style decoder in bf16
(4 layers, d=256, 4 heads, vocab 4096, sequence 128, batch 16; AdamW lr 3e-4, hand loop
with `torch.autocast` and `torch.optim.AdamW(fused=True)`, ft with `ft.with_amp(...,
torch.bfloat16)`), timed with `torch.cuda.synchronize()` around each round.

Run: `python benchmarks/compile.py` (about 1-2 minutes on a CPU, compile included) or
`--quick` (a smoke run).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import GPT, loss_fn, sync
from torch import nn

import ftrain as ft
from ftrain.compiling.step import compile as ft_compile

Batch = tuple[torch.Tensor, torch.Tensor]
OFF = {"logger": False, "checkpoint": False, "progress": False}
TARGET = 3.0  # ft compiled >= 3x the hand loop's steps/s (CPU, tiny MLP)


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def make_data(n: int, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 32, generator=g).to(device),
             torch.randint(0, 10, (32,), generator=g).to(device)) for _ in range(n)]


# -- variants: objects with run(data) -> seconds, keeping their state between calls -------

class Hand:
    """A hand-written eager loop (optionally under bf16 autocast, fused AdamW)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer,
                 loss: Callable[[nn.Module, Any], torch.Tensor], device: torch.device,
                 amp: torch.dtype | None = None) -> None:
        self.model, self.opt, self.loss, self.device, self.amp = model, opt, loss, device, amp

    def run(self, data: list[Any]) -> float:
        model, opt, loss_of = self.model, self.opt, self.loss
        sync(self.device)
        start = time.perf_counter()
        for batch in data:
            opt.zero_grad()
            if self.amp is None:
                loss = loss_of(model, batch)
            else:
                with torch.autocast(self.device.type, dtype=self.amp):
                    loss = loss_of(model, batch)
            loss.backward()
            opt.step()
        sync(self.device)
        return time.perf_counter() - start


class Fit:
    """`ft.fit` over whole epochs, continuing from the state the last call returned."""

    def __init__(self, step: Any, state: ft.TrainState, device: torch.device) -> None:
        self.step, self.state, self.device = step, state, device

    def run(self, data: list[Any]) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.state = ft.fit(self.step, self.state, data, epochs=self.state.epoch + 1, **OFF)
        sync(self.device)
        return time.perf_counter() - start


def measure(variants: dict[str, Any], data: list[Any], rounds: int) -> dict[str, list[float]]:
    """Per-step seconds of each variant per round: interleaved, order rotating."""
    names = list(variants)
    for name in names:  # warm-up round (compiles, allocator, caches)
        variants[name].run(data)
    per_step: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            per_step[name].append(variants[name].run(data) / len(data))
    return per_step


def report(per_step: dict[str, list[float]], base: str, target: str | None = None) -> None:
    names = list(per_step)
    width = max(len(n) for n in names) + 2
    print(f"  {'variant':<{width}}{'us/step':>10}{'steps/s':>10}{f'x {base}':>12}"
          f"{'range':>16}")
    for name in names:
        us = 1e6 * statistics.median(per_step[name])
        ratios = [b / v for b, v in zip(per_step[base], per_step[name])]
        ratio = statistics.median(ratios)
        print(f"  {name:<{width}}{us:>10.1f}{1e6 / us:>10.0f}{ratio:>12.2f}"
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>16}")
    if target is not None:
        ratio = statistics.median(b / v for b, v in zip(per_step[base], per_step[target]))
        verdict = "meets" if ratio >= TARGET else "MISSES"
        print(f"  {target} / {base}: {ratio:.2f}x ({verdict} the {TARGET:g}x target)")


def first_call(step: Any, state: ft.TrainState, batch: Any, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    ft.fit(step, state, [batch], epochs=1, **OFF)
    sync(device)
    return time.perf_counter() - start


# -- CPU ----------------------------------------------------------------------------------

def cpu(epoch: int, rounds: int) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    data = make_data(epoch, device)
    print(f"CPU, tiny MLP 32-64-10, batch 32, Adam lr 1e-3, 1 thread; E={epoch}, "
          f"R={rounds} rounds (noisy on a shared machine)")
    eager_first = first_call(ft.train_step(loss_fn),
                             ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)), data[0],
                             device)
    compiled = ft_compile(ft.train_step(loss_fn))
    compiled_first = first_call(compiled,
                                ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)),
                                data[0], device)
    print(f"  compile time (first call, 1 batch, minus eager's): "
          f"{compiled_first - eager_first:.1f} s ({compiled.compiles} graph; torch's "
          "on-disk cache makes later runs faster)")
    hand_model = make_mlp()
    variants = {
        "hand loop": Hand(hand_model, torch.optim.Adam(hand_model.parameters(), lr=1e-3),
                          loss_fn, device),
        "ft eager": Fit(ft.train_step(loss_fn),
                        ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)), device),
        "ft compiled": Fit(compiled, ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)),
                           device),
    }
    report(measure(variants, data, rounds), "hand loop", "ft compiled")
    if compiled.compiles != 1 or compiled.fallback_reason is not None:
        print(f"  note: {compiled.compiles} graphs compiled, fallback: "
              f"{compiled.fallback_reason}")


# -- CUDA ---------------------------------------------------------------------------------

def gpt_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    idx, target = batch
    logits = model(idx)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def gpt_data(n: int, device: torch.device, vocab: int = 4096, seq: int = 128,
             batch: int = 16) -> list[Batch]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return out


def cuda(epoch: int, rounds: int) -> None:  # pragma: no cover - needs a GPU
    device = torch.device("cuda")
    print(f"\nCUDA ({torch.cuda.get_device_name(device)}): mode='reduce-overhead' "
          f"(CUDA graphs) vs the eager hand loop; E={epoch}, R={rounds}")
    data = make_data(epoch, device)
    print(" tiny MLP 32-64-10, batch 32, fp32, Adam lr 1e-3")
    hand_model = make_mlp().to(device)
    compiled = ft_compile(ft.train_step(loss_fn), mode="reduce-overhead")
    variants: dict[str, Any] = {
        "hand loop": Hand(hand_model, torch.optim.Adam(hand_model.parameters(), lr=1e-3),
                          loss_fn, device),
        "ft eager": Fit(ft.train_step(loss_fn),
                        ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)).to(device),
                        device),
        "ft reduce-overhead": Fit(compiled, ft.TrainState.create(
            make_mlp(), ft.optim.adam(1e-3)).to(device), device),
    }
    report(measure(variants, data, rounds), "hand loop")

    steps = max(20, epoch // 10)
    print(f" GPT-style decoder (4 layers, d=256, vocab 4096, seq 128, batch 16), bf16, "
          f"AdamW lr 3e-4; E={steps}")
    data = gpt_data(steps, device)

    def gpt() -> nn.Module:
        torch.manual_seed(0)
        return GPT().to(device)

    hand_model = gpt()
    opt = torch.optim.AdamW(hand_model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)
    core = ft_compile(ft.train_step(gpt_loss), mode="reduce-overhead")
    variants = {
        "hand loop": Hand(hand_model, opt, gpt_loss, device, amp=torch.bfloat16),
        "ft eager": Fit(ft.with_amp(ft.train_step(gpt_loss), torch.bfloat16),
                        ft.TrainState.create(gpt(), ft.optim.adamw(3e-4)), device),
        "ft reduce-overhead": Fit(ft.with_amp(core, torch.bfloat16),
                                  ft.TrainState.create(gpt(), ft.optim.adamw(3e-4)), device),
    }
    report(measure(variants, data, rounds), "hand loop")
    if core.fallback_reason is not None:
        print(f"  note: the GPT step fell back to eager: {core.fallback_reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short rounds")
    parser.add_argument("--epoch-steps", type=int, default=None,
                        help="batches per round, E (default 1000; 200 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds, R (default 7; 2 with --quick)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA part")
    args = parser.parse_args()
    logging.getLogger("torch").setLevel(logging.ERROR)
    epoch = args.epoch_steps or (200 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 7)
    cpu(epoch, rounds)
    if torch.cuda.is_available() and not args.no_cuda:
        cuda(epoch, rounds)
    elif not args.no_cuda:
        print("\n(no CUDA device: the reduce-overhead / CUDA-graph timings are skipped)")
    if args.quick:
        print("(--quick: a smoke run, not a measurement)")


if __name__ == "__main__":
    main()
