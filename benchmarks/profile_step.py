"""Where a training step's time goes: `ft.fit`'s loop against a hand loop, part by part.

Workload: the tiny MLP of `overhead.py` (32-64-10, batch 32, cross-entropy, Adam lr 1e-3
with torch's fused CPU kernel in both loops, CPU, one thread), E pre-made batches per
epoch (E = 500; `--quick`: 100), `ft.fit(..., logger=False, checkpoint=False,
progress=False)` against `zero_grad; forward; loss; backward; step` over the same list.

Two measurements of each loop, each over the same number of steps:

1. Python-level sampling: a thread reads the training thread's Python stack every
   ~0.2 ms (`sys._current_frames`; the interpreter's switch interval is lowered so the
   sampler gets its turn) and charges the sample to the part named by the innermost frame
   that a rule below recognises (`fetch`: the data iterator; `move`: `to_device`;
   `seeding`: ftrain.core.rng; `forward`: the model and loss; `backward`: autograd;
   `update`: the optimizer, gradient clearing included; `metrics`: the non-finite check
   and metric records; `hooks`: layer plumbing; `bookkeeping`: the loop, the run context,
   the state record and the data position; `other`: everything else, e.g. the timing
   harness). Samples become microseconds per step in proportion to the wall time of the
   sampled run. Time in C++ is charged to the Python frame that called it.
2. `torch.profiler`: the summed self CPU time of aten operators per step, i.e. the math
   both loops must pay; the wall time minus it is the Python (and dispatch) cost.

Wall time per step is measured separately, without the sampler (median of --rounds runs,
the loops interleaved). The sampler slows a run down by a few percent; its per-part
figures are scaled to the unsampled wall time, so parts add up to the median wall time.

Run: `python benchmarks/profile_step.py` (~1 minute) or `--quick` (~10 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import FrameType

import torch
from _common import loss_fn
from torch import nn

import ftrain as ft

Batch = tuple[torch.Tensor, torch.Tensor]
PARTS = ("fetch", "move", "seeding", "forward", "backward", "update", "metrics", "hooks",
         "bookkeeping", "other")

# (path fragment, function names or None for any, part), tried innermost frame first; a
# frame no rule matches (contextlib, torch.utils, ...) passes to the one that called it.
RULES: tuple[tuple[str, frozenset[str] | None, str], ...] = (
    ("ftrain/data/batches.py", frozenset({"to_device", "_move"}), "move"),
    ("ftrain/data/", None, "fetch"),
    ("ftrain/core/rng.py", None, "seeding"),
    ("ftrain/core/health.py", None, "metrics"),
    ("ftrain/core/step.py", frozenset({"split_loss", "_metric", "_add_weighted"}), "metrics"),
    ("torch/autograd/", None, "backward"),
    ("torch/optim/", None, "update"),
    ("ftrain/optim/", None, "update"),
    ("ftrain/core/phases.py", None, "update"),
    ("ftrain/core/step.py", frozenset({"_update"}), "update"),
    ("torch/nn/", None, "forward"),
    ("benchmarks/_common.py", None, "forward"),
    ("ftrain/core/layer.py", None, "hooks"),
    ("ftrain/layers/", None, "hooks"),
    ("ftrain/", None, "bookkeeping"),
    ("profile_step.py", frozenset({"hand_steps"}), "bookkeeping"),
)


def classify(frame: FrameType | None) -> str:
    while frame is not None:
        path, name = frame.f_code.co_filename, frame.f_code.co_name
        for fragment, names, part in RULES:
            if fragment in path and (names is None or name in names):
                return part
        frame = frame.f_back
    return "other"


class Sampler:
    """Samples one thread's Python stack every `interval` seconds while running."""

    def __init__(self, thread_id: int, interval: float = 2e-4) -> None:
        self.thread_id, self.interval = thread_id, interval
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = sys._current_frames().get(self.thread_id)
            self.counts[classify(frame)] += 1
            time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._old = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)  # the sampler gets the interpreter often enough
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._old)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def make_data(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(n)]


def hand_steps(data: list[Batch], epochs: int) -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    for _ in range(epochs):
        for batch in data:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()


def ft_steps(data: list[Batch], epochs: int) -> None:
    state = ft.TrainState.create(make_model(), ft.optim.adam(1e-3))
    ft.fit(ft.train_step(loss_fn), state, data, epochs=epochs, logger=False,
           checkpoint=False, progress=False)


LOOPS: dict[str, Callable[[list[Batch], int], None]] = {"hand": hand_steps, "ft": ft_steps}


def wall_per_step(data: list[Batch], epochs: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each loop: (t(1 + epochs) - t(1)) / (epochs * E), so a
    call's start-up cancels; the loops interleaved, their order alternating."""
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    names = list(LOOPS)
    for run in LOOPS.values():  # warm-up: lazy imports, first-call costs
        run(data, 1)
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:
            t0 = time.perf_counter()
            LOOPS[name](data, 1)
            t1 = time.perf_counter()
            LOOPS[name](data, 1 + epochs)
            t2 = time.perf_counter()
            times[name].append(((t2 - t1) - (t1 - t0)) / (epochs * len(data)))
    return {name: statistics.median(ts) for name, ts in times.items()}


def sampled_parts(data: list[Batch], epochs: int) -> dict[str, dict[str, float]]:
    """Share of the samples in each part, per loop (sums to 1)."""
    out = {}
    for name, run in LOOPS.items():
        run(data, 1)  # warm
        with Sampler(threading.get_ident()) as sampler:
            run(data, epochs)
        total = sum(sampler.counts.values())
        out[name] = {part: sampler.counts[part] / total for part in PARTS}
    return out


def op_time(data: list[Batch], epochs: int) -> dict[str, float]:
    """Seconds per step in aten operators (self CPU time summed), per loop: a run of
    1 + `epochs` epochs minus a run of 1, so set-up ops (state creation) cancel."""
    from torch.profiler import ProfilerActivity, profile

    def aten_s(run: Callable[[list[Batch], int], None], n: int) -> float:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(data, n)
        return sum(e.self_cpu_time_total for e in prof.key_averages()
                   if e.key.startswith("aten::")) * 1e-6
    out = {}
    for name, run in LOOPS.items():
        run(data, 1)
        out[name] = (aten_s(run, 1 + epochs) - aten_s(run, 1)) / (epochs * len(data))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~10 s)")
    parser.add_argument("--epoch-steps", type=int, default=None,
                        help="batches per epoch (default 500; 100 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="wall-time rounds (default 7; 2 with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_data(args.epoch_steps or (100 if args.quick else 500))
    epochs = 2 if args.quick else 4
    rounds = args.rounds or (2 if args.quick else 7)

    wall = wall_per_step(data, epochs, rounds)
    shares = sampled_parts(data, epochs)
    ops = op_time(data, 1 if args.quick else 2)

    print(f"torch {torch.__version__}, CPU, 1 thread; tiny MLP 32-64-10, batch 32, fused "
          f"Adam; E={len(data)}, median of {rounds} round(s)")
    print("\n== per-step microseconds by part (Python-level sampling, scaled to the wall "
          "time) ==")
    print(f"  {'part':<13}{'hand':>9}{'ft':>9}{'ft - hand':>11}")
    for part in PARTS:
        h, f = (shares[n][part] * wall[n] * 1e6 for n in ("hand", "ft"))
        print(f"  {part:<13}{h:9.1f}{f:9.1f}{f - h:11.1f}")
    print(f"  {'total (wall)':<13}{wall['hand'] * 1e6:9.1f}{wall['ft'] * 1e6:9.1f}"
          f"{(wall['ft'] - wall['hand']) * 1e6:11.1f}")
    print(f"  {'aten ops':<13}{ops['hand'] * 1e6:9.1f}{ops['ft'] * 1e6:9.1f}"
          f"{(ops['ft'] - ops['hand']) * 1e6:11.1f}   (torch.profiler self CPU)")
    print(f"ft / hand speed {wall['hand'] / wall['ft']:.3f}x (wall medians)")
    if args.quick:
        print("  (--quick: short runs, a smoke run, not a measurement)")


if __name__ == "__main__":
    main()
