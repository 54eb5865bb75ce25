"""Per-step overhead and peak memory of `ft.fit` against a hand-written loop and Lightning.

Part a, throughput (tiny MLP 32-64-10, batch 32, cross-entropy, Adam lr 1e-3, CPU, one
thread). One epoch is one pass over a list of E pre-made (x, y) batches (E = 500 by
default, `--epoch-steps`); every variant is fed that same list and runs whole epochs:

- hand loop, `torch.optim.Adam` defaults (zero_grad; forward; loss; backward; step),
- hand loop, `torch.optim.Adam(fused=True)`: the kernel ftrain uses by default, so the
  ratio to it is ftrain's own overhead (issue 14's target: >= 1.0x, ftrain adds nothing
  a hand loop does not do),
- `ft.fit(ft.train_step(loss_fn), state, data, epochs=k, logger=False, checkpoint=False,
  progress=False)`,
- `ft.fit` with TensorBoard logging and the progress bar as below but `checkpoint=False`
  (info: it separates the per-step cost of logging from that of checkpoints),
- `ft.fit` out of the box: TensorBoard logging every 50 steps (the default `with_logging`),
  the progress bar (forced on with `progress="always"`, as stderr is no terminal here, and
  drawn to an in-memory file) and a checkpoint at the end of every epoch (the default
  `checkpoint=True`: atomic, fsynced writes of the whole state plus `last.ckpt` and the
  index), `root_dir` a fresh temp dir per call; for the contract's ">= 3x Lightning"
  figure and for ">= 0.9x the hand loop without logging",
- `ft.fit` out of the box as above, but with an MLflow logger (`ft.loggers.MLflow`, one
  SQLite store for all calls, made in the warm-up round) in place of TensorBoard and
  `ft.with_throughput` on (issue 18: still >= 3x Lightning),
- PyTorch Lightning with its defaults (TensorBoard logger, progress bar, ModelCheckpoint at
  every epoch end, model summary) except `default_root_dir` (a fresh temp dir per call),
  `max_epochs=k` over the same E batches. Its console output is discarded. Its
  `training_step` logs nothing with `self.log` (the cheapest Lightning set-up; ft logs
  the loss), so the ratio to it is conservative.

Steady state: each variant's whole training call is timed over N1 = E and N2 = N1 + ~3000
batches (whole epochs both; model construction, the temp dir's creation and removal and an
`os.sync()` before each call that writes files are not timed; for Lightning, `Trainer(...)`
plus `trainer.fit` are timed), so per-step = (t(N2) - t(N1)) / (N2 - N1) and start-up =
t(N1) - N1 * per-step (the fixed cost of a call: set-up before the first batch plus
teardown). As N2 - N1 spans (N2 - N1) / E epochs, per-step carries epoch-end work
(checkpoints) in proportion: 1/E of a checkpoint per step, so the defaults rows depend on E
(a shorter epoch costs ft more: its checkpoint fsyncs, Lightning's does not). t(N1) is the
fastest of 3 short calls, so noise in per-step barely leaks into start-up.
Variants are interleaved in every round (the order rotates between rounds) after a
warm-up round; the summary gives medians over rounds, and ratios as medians of the
per-round ratios (paired, so slow drift of a shared machine cancels) with their range.

Part b, peak memory (MLP 2048-4096-4096-10, ~25.2M params, batch 64, Adam, ~10 steps).
Each variant runs in a fresh child process (this script with a hidden flag), which warms
up every code path on the tiny model (lazy imports), makes its data, records its RSS,
resets the peak (VmHWM) and reports peak RSS minus that baseline, so imports and data are
not counted. ftrain's state is built inline, so the weights exist once, as in the hand
loop.

Run: `python benchmarks/overhead.py` (about 3 minutes) or `--quick` (< 30 s smoke run,
E = 50).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _common import Batches, loss_fn, status_kb
from torch import nn

import ftrain as ft

Batch = tuple[torch.Tensor, torch.Tensor]

# Contract targets (design.md, "Performance contract").
SPEED_TARGET = 0.95  # ft.fit steps/s >= 0.95x the hand loop with default torch Adam
FUSED_TARGET = 1.0  # issue 14: >= 1.0x the hand loop with the same (fused) Adam kernel
MEMORY_TARGET = 1.1  # ft.fit peak memory <= 1.1x the hand loop
LIGHTNING_TARGET = 3.0  # contract: ft with logging and progress bar on >= 3x Lightning
DEFAULTS_TARGET = 0.9  # ft.fit out of the box >= 0.9x the hand loop without logging


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


# -- the training variants: each returns the wall time of one whole training call --------

def hand_loop(model: nn.Module, data: list[Batch], fused: bool | None,
              epochs: int = 1) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in data:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


@contextlib.contextmanager
def fresh_dir(parent: str | None) -> Any:
    """A new empty folder under `parent` (None: no folder), removed afterwards; callers
    create and remove it outside the timed region. `os.sync()` first: the removal of the
    previous call's folder is written out now, not in this call's first fsync (ft's
    checkpoints fsync; Lightning's do not)."""
    if parent is None:
        yield None
        return
    os.sync()
    path = tempfile.mkdtemp(dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ft_fit(make_model: Callable[[], nn.Module], data: list[Batch], epochs: int = 1,
           root: str | None = None, checkpoint: bool = True, tracked: bool = False) -> float:
    """`ft.fit` with logging, checkpointing and progress bar off, or (given `root`, a
    parent folder) out of the box in a fresh folder under it (without checkpoints if
    `checkpoint` is False), the bar drawn to an in-memory file, as Lightning's is.
    `tracked`: the defaults with an MLflow logger (SQLite in the run's folder) instead of
    TensorBoard, and `ft.with_throughput` on."""
    step = ft.train_step(loss_fn)
    if tracked:
        step = ft.with_throughput(step)
    # Built inline: the state holds the only copy of the weights (the module is dropped).
    state = ft.TrainState.create(make_model(), ft.optim.adam(1e-3))
    if root is None:
        start = time.perf_counter()
        ft.fit(step, state, data, epochs=epochs, logger=False, checkpoint=False,
               progress=False)
        return time.perf_counter() - start
    with fresh_dir(root) as run_dir, contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        # defaults: logger=True, checkpoint=True; "always": the bar is drawn although
        # stderr is not a terminal
        # one tracking database for every call (as a user's existing mlflow.db): its
        # creation (~2 s, varying) would swamp the per-step difference of the two calls
        logger = ft.loggers.MLflow("bench", tracking_uri="sqlite:///" + os.path.join(
            root, "mlflow.db")) if tracked else True
        ft.fit(step, state, data, epochs=epochs, root_dir=run_dir, progress="always",
               checkpoint=checkpoint, logger=logger)
        return time.perf_counter() - start


def lightning_runner(root: str) -> Callable[[list[Batch], int], float] | None:
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

    def run(data: list[Batch], epochs: int) -> float:
        module = Module()
        sink = io.StringIO()
        with fresh_dir(root) as run_dir, contextlib.redirect_stderr(sink), \
                contextlib.redirect_stdout(sink):
            start = time.perf_counter()
            trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1,
                                default_root_dir=run_dir)
            trainer.fit(module, train_dataloaders=Batches(data))
            elapsed = time.perf_counter() - start
            saved = trainer.checkpoint_callback is not None and os.path.isfile(
                trainer.checkpoint_callback.best_model_path)
        if trainer.global_step != epochs * len(data):
            raise RuntimeError(f"Lightning ran {trainer.global_step} steps, not "
                               f"{epochs * len(data)}")
        if not saved:
            raise RuntimeError("Lightning's ModelCheckpoint wrote no checkpoint")
        return elapsed

    return run


# -- part a: throughput ---------------------------------------------------------------------

def throughput(epoch_steps: int, n1: int, n2: int, rounds: int) -> dict[str, Any]:
    """Per-step time and start-up of each variant; n1 and n2 are multiples of
    `epoch_steps` (each call runs n // epoch_steps epochs over one list of batches)."""
    torch.set_num_threads(1)
    data = make_data(epoch_steps, 32, 32)
    # ft and Lightning come first so that their first calls (below) pay their own lazy
    # start-up; the first torch.optim.Adam imports torch._dynamo, which Lightning pays.
    tmp = tempfile.TemporaryDirectory(prefix="ftrain-bench-")
    variants: dict[str, Callable[[int], float]] = {
        "ft.fit": lambda k: ft_fit(make_tiny, data, k),
        "ft.fit logging+bar": lambda k: ft_fit(make_tiny, data, k, tmp.name, False),
        "ft.fit defaults": lambda k: ft_fit(make_tiny, data, k, tmp.name),
    }
    if importlib.util.find_spec("mlflow") is not None:
        variants["ft defaults+MLflow+tp"] = lambda k: ft_fit(make_tiny, data, k, tmp.name,
                                                             tracked=True)
    else:
        print("mlflow is not installed: skipping the MLflow + throughput row")
    lightning = lightning_runner(tmp.name)
    if lightning is None:
        print("lightning is not importable: skipping the Lightning row")
    else:
        variants["Lightning defaults"] = lambda k: lightning(data, k)
    variants["hand, Adam default"] = lambda k: hand_loop(make_tiny(), data, None, k)
    variants["hand, Adam fused"] = lambda k: hand_loop(make_tiny(), data, True, k)

    def timed(run: Callable[[int], float], n: int) -> float:
        gc.collect()  # garbage of the previous variant (Lightning's) is not charged here
        elapsed = run(n // epoch_steps)
        if torch.get_num_threads() != 1:
            raise RuntimeError("a variant changed torch's thread count")
        return elapsed

    # Warm-up round (one epoch): lazy imports, first-call costs, allocator. Its times give
    # the start-up of a first call in a process (ft pays torch's own first-op costs).
    n_warm = epoch_steps
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
        if a not in per_step or b not in per_step:
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
        "ft logging/hand default": ratio("ft.fit logging+bar", "hand, Adam default"),
        "ft defaults/Lightning": ratio("ft.fit defaults", "Lightning defaults"),
        "ft tracked/Lightning": ratio("ft defaults+MLflow+tp", "Lightning defaults"),
        "ft defaults/hand default": ratio("ft.fit defaults", "hand, Adam default"),
    }


# -- part b: peak memory (one child process per variant) --------------------------------

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
    base = status_kb("VmRSS")
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
    peak = status_kb("VmHWM")
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
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7)")
    parser.add_argument("--epoch-steps", type=int, default=None,
                        help="batches per epoch, E (default 500; 50 with --quick)")
    parser.add_argument("--memory-steps", type=int, default=None,
                        help="steps per memory child (default 10)")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        memory_child(args.memory_child, args.memory_steps or 10)
        return

    epoch_steps = args.epoch_steps or (50 if args.quick else 500)
    if epoch_steps < 1:
        parser.error("--epoch-steps must be >= 1")
    # whole epochs: N1 = one epoch, N2 - N1 about 3000 steps (150 with --quick)
    extra = max(1, round((150 if args.quick else 3000) / epoch_steps))
    n1, n2 = epoch_steps, epoch_steps * (1 + extra)
    rounds = args.rounds or (1 if args.quick else 7)
    mem_steps = args.memory_steps or (2 if args.quick else 10)
    print(f"torch {torch.__version__}, 1 thread; epoch = {epoch_steps} steps; N1={n1}, "
          f"N2={n2} ({extra} epoch(s) apart); {rounds} round(s)", flush=True)
    t = throughput(epoch_steps, n1, n2, rounds)
    m = memory(mem_steps)

    print("\n== summary ==")
    print(f"tiny MLP, {epoch_steps} steps per epoch, median of {rounds} round(s); start-up "
          "= time before the first batch, warm (repeated calls) / first call in the process:")
    for name, sps in t["steps_per_s"].items():
        print(f"  {name:<22} {sps:6.0f} steps/s   start-up {t['startup_s'][name]:6.3f} s / "
              f"{t['first_startup_s'][name]:6.3f} s")
    def show(label: str, r: tuple[float, float, float], note: str) -> None:
        print(f"{label:<32} {r[0]:5.2f}x (rounds {r[1]:.2f}-{r[2]:.2f})   {note}")

    speed = t["ft/hand default"]
    show("ft / hand (Adam default)", speed,
         f"target >= {SPEED_TARGET}x   {verdict(speed[0] >= SPEED_TARGET)}")
    fused = t["ft/hand fused"]
    show("ft / hand (Adam fused)", fused,
         f"target >= {FUSED_TARGET}x   {verdict(fused[0] >= FUSED_TARGET)}  (same kernel)")
    if t["ft/Lightning"] is not None:
        show("ft / Lightning", t["ft/Lightning"], "info: ft with everything off")
        show("ft logging+bar / Lightning", t["ft logging/Lightning"],
             "info: no checkpoints")
        vs = t["ft defaults/Lightning"]
        show("ft defaults / Lightning", vs,
             f"target >= {LIGHTNING_TARGET}x   {verdict(vs[0] >= LIGHTNING_TARGET)}")
        tracked = t["ft tracked/Lightning"]
        if tracked is not None:
            show("ft +MLflow+throughput / Lightning", tracked,
                 f"target >= {LIGHTNING_TARGET}x   {verdict(tracked[0] >= LIGHTNING_TARGET)}")
    show("ft logging+bar / hand (default)", t["ft logging/hand default"],
         "info: no checkpoints")
    dh = t["ft defaults/hand default"]
    show("ft defaults / hand (default)", dh,
         f"target >= {DEFAULTS_TARGET}x   {verdict(dh[0] >= DEFAULTS_TARGET)}")
    print("  (ft defaults: TensorBoard every 50 steps, progress bar, checkpoint per epoch)")
    if args.quick:
        print("  (--quick: one round, 50-step epochs: a smoke run, not a measurement)")
    print(f"peak memory above baseline, 25.2M-param MLP, batch 64, {mem_steps} steps:")
    for name in ("hand", "hand-fused", "ft"):
        print(f"  {name:<20} {m[name]:8.1f} MiB")
    mem = m["ft/hand"]
    print(f"ft / hand (Adam default) memory  {mem:5.2f}x   target <= {MEMORY_TARGET}x   "
          f"{verdict(mem <= MEMORY_TARGET)}")


if __name__ == "__main__":
    main()
