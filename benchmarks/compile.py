"""Whole-step compilation (`ft.compile`) against eager loops: steps/s and compile time.

CPU (always): tiny MLP 32-64-10, batch 32, cross-entropy, Adam lr 1e-3, one thread
(`torch.set_num_threads(1)`). Variants, each fed the same list of E pre-made batches per
round (E = 1000; 200 with `--quick`):

- hand: a hand-written eager loop with `torch.optim.Adam` (torch's default, foreach):
  zero_grad; forward; loss; backward; step,
- ft eager: `ft.fit(ft.train_step(loss_fn), state, data, epochs=k, logger=False,
  checkpoint=False, progress=False)`,
- ft compiled: the same with `ft.compile(ft.train_step(loss_fn))`.

Each variant keeps its model (state) across rounds: one warm-up round first (the compiled
step compiles there), then R rounds (7; 2 with `--quick`) with the variants interleaved
and their order rotating. Per step = round time / E (a fit call's own start-up, ~1 ms, is
spread over the E steps). Medians over rounds; ratios are medians of the per-round ratios
(paired, so a shared machine's slow drift cancels), with their range. Target (issue 14):
ft compiled >= 4x the hand loop's steps/s.

Compile time, each in a fresh process (this script with `--compile-child`), all with one
new, empty `TORCHINDUCTOR_CACHE_DIR`: the first call of the compiled step minus the first
call of the eager step, importing torch._dynamo and torch._inductor included (the first
compiled call does). Cold: the empty cache (inductor generates and compiles C++); warm:
the same cache, populated by the cold process (inductor's AOTAutograd and FX graph caches
hit; dynamo still traces). One cold and 3 warm processes (1 with `--quick`); the warm
line is the median, with the parts: imports, dynamo's tracing, the backend (inductor,
loading from the cache) and the rest. Target (issue 14): warm <= 5 s.

CUDA (when available, guarded): `mode="reduce-overhead"` (CUDA graphs) against the eager
hand loop, on the tiny MLP (fp32, batch 32) and on a small GPT-style decoder in bf16
(4 layers, d=256, 4 heads, vocab 4096, sequence 128, batch 16; AdamW lr 3e-4, hand loop
with `torch.autocast` and `torch.optim.AdamW(fused=True)`, ft with `ft.with_amp(...,
torch.bfloat16)`), timed with `torch.cuda.synchronize()` around each round.

Run: `python benchmarks/compile.py` (about 2-3 minutes on a CPU, compiles included) or
`--quick` (a smoke run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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
TARGET = 4.0  # ft compiled >= 4x the hand loop's steps/s (CPU, tiny MLP)
WARM_TARGET = 5.0  # seconds: the first compiled call in a process with a warm cache


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

def cpu(epoch: int, rounds: int) -> float:
    """Steady-state steps/s of the three CPU variants; returns compiled / hand."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    data = make_data(epoch, device)
    print(f"CPU, tiny MLP 32-64-10, batch 32, Adam lr 1e-3, 1 thread; E={epoch}, "
          f"R={rounds} rounds (noisy on a shared machine)")
    compiled = ft_compile(ft.train_step(loss_fn))
    hand_model = make_mlp()
    variants = {
        "hand loop": Hand(hand_model, torch.optim.Adam(hand_model.parameters(), lr=1e-3),
                          loss_fn, device),
        "ft eager": Fit(ft.train_step(loss_fn),
                        ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)), device),
        "ft compiled": Fit(compiled, ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)),
                           device),
    }
    per_step = measure(variants, data, rounds)
    report(per_step, "hand loop", "ft compiled")
    if compiled.compiles != 1 or compiled.fallback_reason is not None:
        print(f"  note: {compiled.compiles} graphs compiled, fallback: "
              f"{compiled.fallback_reason}")
    else:
        parts(compiled, variants["ft compiled"], variants["hand loop"], data, rounds)
    return statistics.median(h / c for h, c in zip(per_step["hand loop"],
                                                   per_step["ft compiled"]))


def parts(compiled: Any, fit: Fit, hand: Hand, data: list[Any], rounds: int) -> None:
    """Where a compiled step's time goes (us, the fastest of interleaved rounds: the cost
    with the least interference from other processes): the whole
    `ft.fit` step; the call of the compiled iteration (`ftrain.compiling.direct.Direct`:
    dynamo's guards, then the transformed bytecode); the guards alone; the bytecode and
    graph alone (dynamo's input flattening, AOTAutograd's and inductor's wrappers, the
    kernels). Reads ft.compile's internals: a diagnosis, not an API."""
    (fn, _), = compiled._fns.values()
    if not getattr(fn, "cached", None):
        print("  (parts: the compiled iteration is called through torch.compile's hook)")
        return
    state = fit.state
    args = compiled._flatten(state, state.params, state.buffers, state.opt_state)
    (check, run), = fn.cached
    n = len(data)

    def timed(call: Callable[[Any], Any]) -> float:
        start = time.perf_counter()
        for batch in data:
            call(batch)
        return (time.perf_counter() - start) / n

    measures: dict[str, Callable[[], float]] = {
        "hand loop step": lambda: hand.run(data) / n,
        "ft.fit step": lambda: fit.run(data) / n,
        "compiled call": lambda: timed(lambda b: fn(*args, b, None)),
        "  guards": lambda: timed(lambda b: check(fn._locals((*args, b, None)))),
        "  bytecode + graph": lambda: timed(lambda b: run(*args, b, None)),
    }
    got: dict[str, list[float]] = {k: [] for k in measures}
    for _ in range(max(rounds, 5)):
        for name, measure_one in measures.items():
            got[name].append(measure_one())
    us = {k: 1e6 * min(v) for k, v in got.items()}
    print("  where a compiled step's time goes (us, fastest round of each):")
    for name, value in us.items():
        print(f"    {name:<20}{value:8.1f}")
    rest = us["compiled call"] - us["  guards"] - us["  bytecode + graph"]
    print(f"    -> ft loop and step {us['ft.fit step'] - us['compiled call']:.1f}, "
          f"direct-call bookkeeping {rest:.1f}; hand loop / bytecode + graph "
          f"{us['hand loop step'] / us['  bytecode + graph']:.2f}x")


# -- compile time, in fresh processes ------------------------------------------------------

def compile_child() -> None:
    """One fresh process's first compiled call (see the module doc); prints one JSON line."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    batch = make_data(1, device)[0]
    cpu0 = time.process_time()
    eager = first_call(ft.train_step(loss_fn),
                       ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)), batch, device)
    cpu1 = time.process_time()
    start = time.perf_counter()
    for module in ("torch._dynamo", "torch._inductor.compile_fx"):  # the first call's
        importlib.import_module(module)
    imports = time.perf_counter() - start
    step = ft_compile(ft.train_step(loss_fn))
    first = first_call(step, ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3)), batch,
                       device)
    cpu = time.process_time() - cpu1 - (cpu1 - cpu0)  # this process's CPU time, same span
    from torch._dynamo.utils import compilation_time_metrics, counters

    def spent(name: str) -> float:
        return sum(compilation_time_metrics.get(name, []))

    hits = {k: v for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items()
            if "cache" in k}
    print(json.dumps({"seconds": imports + first - eager, "cpu": cpu, "imports": imports,
                      "tracing": spent("bytecode_tracing"),
                      "backend": spent("OutputGraph.call_user_compiler"),
                      "graphs": step.compiles, "fallback": step.fallback_reason,
                      "caches": hits}))


def compile_times(warm_runs: int) -> float | None:
    """Cold and warm compile time (s) in fresh processes sharing a new cache folder;
    returns the warm median (None when a child failed)."""
    folder = tempfile.mkdtemp(prefix="ftrain-compile-cache-")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=folder)
    runs = []
    try:
        for _ in range(1 + warm_runs):
            proc = subprocess.run([sys.executable, __file__, "--compile-child"], env=env,
                                  capture_output=True, text=True, check=False, timeout=900)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(f"  compile-time child failed ({proc.returncode}): "
                      f"{proc.stderr.strip().splitlines()[-1:]}")
                return None
            runs.append(json.loads(lines[-1]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cold, warm = runs[0], runs[1:]
    middle = sorted(warm, key=lambda r: r["seconds"])[len(warm) // 2]
    seconds = [r["seconds"] for r in warm]
    print("compile time, fresh processes, one new TORCHINDUCTOR_CACHE_DIR (first compiled "
          "call minus an eager one; imports included):")
    print(f"  cold (empty cache)   {cold['seconds']:6.1f} s   caches: {cold['caches']}")
    print(f"  warm (median of {len(warm)})  {middle['seconds']:6.1f} s   "
          f"(range {min(seconds):.1f}-{max(seconds):.1f}; caches: {middle['caches']})")
    rest = middle["seconds"] - middle["imports"] - middle["tracing"] - middle["backend"]
    print(f"    warm parts: import torch._dynamo/_inductor {middle['imports']:.1f} s, "
          f"dynamo tracing {middle['tracing']:.1f} s, backend (cache load) "
          f"{middle['backend']:.1f} s, rest {rest:.1f} s; CPU time {middle['cpu']:.1f} s "
          "(the wall time on an idle machine, about)")
    if middle["graphs"] != 1 or middle["fallback"] is not None:
        print(f"  note: {middle['graphs']} graphs, fallback: {middle['fallback']}")
    return float(middle["seconds"])


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
    parser.add_argument("--no-compile-time", action="store_true",
                        help="skip the cold/warm compile-time processes")
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("torch").setLevel(logging.ERROR)
    if args.compile_child:
        compile_child()
        return
    epoch = args.epoch_steps or (200 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 7)
    warm = None if args.no_compile_time else compile_times(1 if args.quick else 3)
    ratio = cpu(epoch, rounds)
    if torch.cuda.is_available() and not args.no_cuda:
        cuda(epoch, rounds)
    elif not args.no_cuda:
        print("\n(no CUDA device: the reduce-overhead / CUDA-graph timings are skipped)")
    print("\n== summary ==")
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"ft compiled / hand loop (CPU)  {ratio:5.2f}x   target >= {TARGET:g}x   {verdict}")
    if warm is not None:
        verdict = "meets" if warm <= WARM_TARGET else "MISSES"
        print(f"warm compile time (CPU)        {warm:5.1f} s   target <= {WARM_TARGET:g} s  "
              f"{verdict}")
    if args.quick:
        print("(--quick: a smoke run, not a measurement)")


if __name__ == "__main__":
    main()
