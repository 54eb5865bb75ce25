"""Per-step overhead and peak memory of `ft.fit` against a hand-written loop and Lightning.

Part a, throughput (tiny MLP 32-64-10, batch 32, cross-entropy, Adam lr 1e-3, CPU, one
thread). Variants, all fed the same list of pre-made (x, y) batches:

- hand loop, `torch.optim.Adam` defaults (zero_grad; forward; loss; backward; step),
- hand loop, `torch.optim.Adam(fused=True)`: the kernel ftrain uses by default, so the
  ratio to it is ftrain's own overhead,
- `ft.fit(ft.train_step(loss_fn), state, data, epochs=1, logger=False, checkpoint=False,
  progress=False)`,
- `ft.fit` with its defaults (TensorBoard logger, checkpointing, progress bar forced on
  with `progress="always"` and drawn to an in-memory file), for the contract's
  ">= 3x Lightning" figure,
- PyTorch Lightning with its defaults (logger, progress bar, checkpointing, model summary)
  except `default_root_dir` (a temp dir). Its console output is discarded.

Steady state: each variant's whole training call is timed over N1 and N2 batches (model
construction excluded; for Lightning, `Trainer(...)` plus `trainer.fit` are timed), so
per-step = (t(N2) - t(N1)) / (N2 - N1) and start-up = t(N1) - N1 * per-step (the fixed
cost of a call: set-up before the first batch plus teardown). t(N1) is the fastest of 3
short calls: N1 is small, so noise in per-step barely leaks into the start-up figure.
Variants are interleaved in every round (the order rotates between rounds) after a
warm-up round; the summary gives medians over rounds, and ratios as medians of the
per-round ratios (paired, so slow drift of a shared machine cancels) with their range.

Part b, peak memory (MLP 2048-4096-4096-10, ~25.2M params, batch 64, Adam, ~10 steps).
Each variant runs in a fresh child process (this script with a hidden flag), which warms
up every code path on the tiny model (lazy imports), makes its data, records its RSS,
resets the peak (VmHWM) and reports peak RSS minus that baseline, so imports and data are
not counted. ftrain's state is built inline, so the weights exist once, as in the hand
loop.

Run: `python benchmarks/overhead.py` (about 2 minutes) or `--quick` (< 30 s smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ftrain as ft

Batch = tuple[torch.Tensor, torch.Tensor]

# Contract targets (design.md, "Performance contract").
SPEED_TARGET = 0.95  # ft.fit steps/s >= 0.95x the hand loop with default torch Adam
MEMORY_TARGET = 1.1  # ft.fit peak memory <= 1.1x the hand loop
LIGHTNING_TARGET = 3.0  # contract: ft with logging and progress bar on >= 3x Lightning


# -- models, data, loss -------------------------------------------------------------------

def make_tiny() -> nn.Module:
    torch.manual_seed(0)  # every variant starts from the same weights
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def make_big() -> nn.Module:
    # 2048*4096 + 4096*4096 + 4096*10 weights (+ biases) = 25.2M params, ~100 MB fp32.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 10))


def make_data(n: int, batch: int, features: int) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, features, generator=g),
             torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# -- the training variants: each returns the wall time of one whole training call --------

def hand_loop(model: nn.Module, data: list[Batch], fused: bool | None) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    start = time.perf_counter()
    for batch in data:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def ft_fit(make_model: Callable[[], nn.Module], data: list[Batch],
           root: str | None = None) -> float:
    """`ft.fit` with logging, checkpointing and progress bar off, or (given `root`) with
    its defaults there and the bar drawn to an in-memory file, as Lightning's is."""
    step = ft.train_step(loss_fn)
    # Built inline: the state holds the only copy of the weights (the module is dropped).
    state = ft.TrainState.create(make_model(), ft.optim.adam(1e-3))
    if root is None:
        start = time.perf_counter()
        ft.fit(step, state, data, epochs=1, logger=False, checkpoint=False, progress=False)
        return time.perf_counter() - start
    with contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        # "always": the bar is drawn although stderr is not a terminal
        ft.fit(step, state, data, epochs=1, root_dir=root, progress="always")
        return time.perf_counter() - start


class Batches:
    """A list of batches seen as one iterable (Lightning takes a bare list for several
    dataloaders); iterating it costs what iterating the list costs."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_runner(root: str) -> Callable[[list[Batch]], float] | None:
    """A Lightning variant with Trainer defaults, or None if lightning is not installed."""
    try:
        import lightning as L
    except ImportError:
        return None
    # Keep the benchmark's output readable: Lightning's info lines, warnings (few workers,
    # ...) and its progress bar go nowhere. The bar is still drawn (to an in-memory file).
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_tiny()

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            return loss_fn(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def run(data: list[Batch]) -> float:
        module = Module()
        sink = io.StringIO()
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            start = time.perf_counter()
            trainer = L.Trainer(max_steps=len(data), accelerator="cpu", devices=1,
                                default_root_dir=root)
            trainer.fit(module, train_dataloaders=Batches(data))
            elapsed = time.perf_counter() - start
        if trainer.global_step != len(data):
            raise RuntimeError(f"Lightning ran {trainer.global_step} steps, not {len(data)}")
        return elapsed

    return run


# -- part a: throughput ---------------------------------------------------------------------

def throughput(n1: int, n2: int, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = make_data(n2, 32, 32)
    # ft and Lightning come first so that their first calls (below) pay their own lazy
    # start-up; the first torch.optim.Adam imports torch._dynamo, which Lightning pays.
    tmp = tempfile.TemporaryDirectory(prefix="ftrain-bench-")
    variants: dict[str, Callable[[list[Batch]], float]] = {
        "ft.fit": lambda d: ft_fit(make_tiny, d),
        "ft.fit logging+bar": lambda d: ft_fit(make_tiny, d, os.path.join(tmp.name, "ft")),
    }
    lightning = lightning_runner(tmp.name)
    if lightning is None:
        print("lightning is not importable: skipping the Lightning row")
    else:
        variants["Lightning defaults"] = lightning
    variants["hand, Adam default"] = lambda d: hand_loop(make_tiny(), d, None)
    variants["hand, Adam fused"] = lambda d: hand_loop(make_tiny(), d, True)

    def timed(run: Callable[[list[Batch]], float], n: int) -> float:
        gc.collect()  # garbage of the previous variant (Lightning's) is not charged here
        elapsed = run(data[:n])
        if torch.get_num_threads() != 1:
            raise RuntimeError("a variant changed torch's thread count")
        return elapsed

    # Warm-up round: lazy imports, first-call costs, allocator. Its times give the
    # start-up of a first call in a process (ft pays torch's own first-op costs).
    n_warm = min(n1, 50)
    first = {name: timed(run, n_warm) for name, run in variants.items()}

    names = list(variants)
    per_step: dict[str, list[float]] = {n: [] for n in names}
    startup: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t1 = min(timed(variants[name], n1) for _ in range(3))
            t2 = timed(variants[name], n2)
            per = (t2 - t1) / (n2 - n1)
            per_step[name].append(per)
            startup[name].append(t1 - n1 * per)
        line = ", ".join(f"{n} {1 / per_step[n][-1]:.0f}" for n in names)
        print(f"round {r + 1}/{rounds} steps/s: {line}", flush=True)
    tmp.cleanup()

    def ratio(a: str, b: str) -> tuple[float, float, float] | None:
        """Speed of a over b: (median, min, max) over rounds."""
        if b not in per_step:
            return None
        r = [y / x for x, y in zip(per_step[a], per_step[b])]
        return statistics.median(r), min(r), max(r)

    return {
        "steps_per_s": {n: statistics.median(1 / p for p in per_step[n]) for n in names},
        "startup_s": {n: statistics.median(startup[n]) for n in names},
        "first_startup_s": {n: first[n] - n_warm * statistics.median(per_step[n])
                            for n in names},
        "ft/hand default": ratio("ft.fit", "hand, Adam default"),
        "ft/hand fused": ratio("ft.fit", "hand, Adam fused"),
        "ft/Lightning": ratio("ft.fit", "Lightning defaults"),
        "ft logging/Lightning": ratio("ft.fit logging+bar", "Lightning defaults"),
    }


# -- part b: peak memory (one child process per variant) --------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, steps: int) -> None:
    """Train the big MLP for `steps` steps; print JSON with peak RSS above the baseline."""
    # Warm up every code path on a tiny model first: the first torch.optim.Adam imports
    # torch._dynamo lazily (~70 MB of RSS), which is start-up, not training memory.
    tiny = make_data(2, 32, 32)
    hand_loop(make_tiny(), tiny, None)
    hand_loop(make_tiny(), tiny, True)
    ft_fit(make_tiny, tiny)
    data = make_data(steps, 64, 2048)
    gc.collect()
    base = _status_kb("VmRSS")
    try:  # reset VmHWM to the current RSS, so start-up peaks do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    if variant == "ft":
        ft_fit(make_big, data)
    else:
        hand_loop(make_big(), data, fused=True if variant == "hand-fused" else None)
    peak = _status_kb("VmHWM")
    print(json.dumps({"variant": variant, "base_kb": base, "peak_kb": peak,
                      "hwm_reset": reset}))


def memory(steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in ("hand", "hand-fused", "ft"):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_memory-child", variant,
             "--memory-steps", str(steps)],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        if not rec["hwm_reset"]:
            print(f"note: could not reset VmHWM in the {variant} child; its peak includes "
                  "start-up")
        out[variant] = (rec["peak_kb"] - rec["base_kb"]) / 1024  # MiB
    out["ft/hand"] = out["ft"] / out["hand"]
    return out


# -- entry ----------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5)")
    parser.add_argument("--memory-steps", type=int, default=None,
                        help="steps per memory child (default 10)")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        memory_child(args.memory_child, args.memory_steps or 10)
        return

    n1, n2 = (20, 220) if args.quick else (20, 3020)
    rounds = args.rounds or (1 if args.quick else 7)
    mem_steps = args.memory_steps or (2 if args.quick else 10)
    print(f"torch {torch.__version__}, 1 thread; N1={n1}, N2={n2}, {rounds} round(s)",
          flush=True)
    t = throughput(n1, n2, rounds)
    m = memory(mem_steps)

    print("\n== summary ==")
    print(f"tiny MLP, median of {rounds} round(s); start-up = time before the first batch, "
          "warm (repeated calls) / first call in the process:")
    for name, sps in t["steps_per_s"].items():
        print(f"  {name:<20} {sps:6.0f} steps/s   start-up {t['startup_s'][name]:6.3f} s / "
              f"{t['first_startup_s'][name]:6.3f} s")
    def show(label: str, r: tuple[float, float, float], note: str) -> None:
        print(f"{label:<26} {r[0]:5.2f}x (rounds {r[1]:.2f}-{r[2]:.2f})   {note}")

    speed = t["ft/hand default"]
    show("ft / hand (Adam default)", speed,
         f"target >= {SPEED_TARGET}x   {verdict(speed[0] >= SPEED_TARGET)}")
    show("ft / hand (Adam fused)", t["ft/hand fused"], "info: same kernel as ft")
    if t["ft/Lightning"] is not None:
        show("ft / Lightning", t["ft/Lightning"], "info: ft with everything off")
        vs = t["ft logging/Lightning"]
        show("ft logging+bar / Lightning", vs,
             f"target >= {LIGHTNING_TARGET}x   {verdict(vs[0] >= LIGHTNING_TARGET)}")
    print(f"peak memory above baseline, 25.2M-param MLP, batch 64, {mem_steps} steps:")
    for name in ("hand", "hand-fused", "ft"):
        print(f"  {name:<20} {m[name]:8.1f} MiB")
    mem = m["ft/hand"]
    print(f"ft / hand (Adam default) memory  {mem:5.2f}x   target <= {MEMORY_TARGET}x   "
          f"{verdict(mem <= MEMORY_TARGET)}")


if __name__ == "__main__":
    main()
