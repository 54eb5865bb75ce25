"""Data-parallel throughput of `ft.with_ddp` against a hand-written DistributedDataParallel
loop, and the scaling efficiency of both from 1 to 2 processes (gloo, CPU).

Model and data: an MLP 64-256-256-10 (ReLU), cross-entropy, Adam lr 1e-3, batch 64 per
rank, on S synthetic samples (64 features, 10 classes, made by the script with a fixed
seed; S = 12,800 by default, 6,400 with `--quick`, a multiple of 2 x 64 so every rank
gets whole batches). One epoch is one pass over the S samples shared out by rank, so a
rank runs S / (64 x N) steps per epoch on N processes; throughput is counted in samples of
the whole job per second.

Variants (each in every round, order rotating between rounds):

- hand: `DistributedDataParallel(model)` (the bare model on one process, as a script
  written with `if world > 1`), `torch.optim.Adam(fused=True)` (the kernel ftrain uses by
  default), a `DataLoader` over a `DistributedSampler` (shuffle, `set_epoch` per epoch),
  zero_grad; forward; loss; backward; step,
- ft: `ft.fit(ft.with_ddp(ft.train_step(loss_fn)), state, loader, epochs=k, logger=False,
  checkpoint=False, progress=False)` over a `DataLoader(shuffle=True)` of the same dataset,
  which `with_ddp` shards with a `DistributedSampler` itself; on one process the layer
  does nothing (no DDP wrapper), as the hand loop. `with_ddp`'s defaults differ from
  DDP's in one option, `gradient_as_bucket_view=True` (the update reads the all-reduce
  buckets: one gradient copy per step less, bitwise the same training); the hand loop
  keeps torch's defaults, as a script written from its tutorial does.

Method: the script launches itself twice with `python -m torch.distributed.run
--standalone --nproc_per_node=N` (N = 1, then N = 2; a hidden flag selects worker mode;
OMP_NUM_THREADS=1 and `torch.set_num_threads(1)` in every worker; on 2 ranks the workers
join one gloo process group, which `with_ddp` then uses). Each worker makes the dataset,
warms up every variant with one epoch, then runs R rounds. In a round each variant's
whole training call (a fresh model, optimizer, loader and, for ft, a fresh step and state)
is timed for k1 = 1 epoch (the fastest of 2 calls) and for k2 = 1 + X epochs; per sample
= (t(k2) - t(k1)) / (X x S), so start-up (DDP construction and its parameter broadcast,
ft's init and rank check, the loader's first batch) cancels and the steady state
remains. Every timed call starts and ends at a barrier, so it spans the same work on every
rank; rank 0's clock is used and rank 0 writes the rounds as JSON to a file the parent
reads. Every call's step count is checked against epochs x steps per epoch.

Summary: its first line, the only output line that starts with `ft / hand` (so
`python benchmarks/ddp.py | grep '^ft / hand'` shows it; printed, flushed, even when a
launch fails), is ft / hand at 2 processes: the median of the per-round ratios (paired:
both ran in the same round) with their range, target >= 0.97x. Then medians over rounds
of samples/s per variant and N, the ratio at 1 process and of each variant's fastest
round (information), and scaling efficiency = (samples/s at 2 processes) / (2 x samples/s
at 1 process) per variant, from the medians (the two launches are not paired).

The cost of ftrain's step-boundary agreement (stop signals, batch counts; see
ftrain/parallel/lockstep.py): with data of known length the loop exchanges
asynchronously every k steps (k adapts so exchanges are ~0.25 s apart). Rank 0 reads
`ftrain.parallel.lockstep.COST` (exchanges, main-thread time inside them) around every
ft call and splits it as the throughput is split, by the k1/k2 difference: per step in
steady state (also as a share of ft's step) and per call (the first exchanges and the
last wait); medians over rounds. One synchronous exchange, what data without a length
pays every step, is timed alone. For scale, the 2-process workers also time
a bare gloo all-reduce of a gradient-sized tensor (DDP's one bucket per step here), and
the parent prints the 1-minute load average before and after (above the core count:
other processes competed for the cores, and the rounds' spread shows it).

Caveat: the machine this was written on has 2 CPU cores, so the 2 workers share them with
the gloo threads that run DDP's all-reduce and with the (mostly idle) torchrun agent and
this parent process; 2-process throughput and scaling efficiency are then bounded by the
cores, not by ftrain or DDP. The ft / hand ratio is what the benchmark checks; scaling
efficiency is information about the machine as much as about the code.

Run: `python benchmarks/ddp.py` (R = 15, X = 3; 3-6 minutes on 2 cores) or `--quick`
(< 60 s smoke run: R = 2, X = 2, S = 6,400).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from _common import loss_fn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ftrain as ft

Batch = tuple[torch.Tensor, torch.Tensor]

RATIO_TARGET = 0.97  # ft.with_ddp throughput >= 0.97x the hand-written DDP loop at 2 ranks
BATCH = 64  # per rank
FEATURES, HIDDEN, CLASSES = 64, 256, 10


# -- model, data, loss ----------------------------------------------------------------------

def make_model() -> nn.Module:
    torch.manual_seed(0)  # every variant and rank starts from the same weights
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN),
                         nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def make_dataset(samples: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (samples,), generator=g)
    return TensorDataset(x, y)


# -- the variants: each runs `epochs` epochs from scratch and returns its step count --------

def hand_run(dataset: TensorDataset, epochs: int, rank: int, world: int) -> int:
    model = make_model()
    if world > 1:
        model = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=0)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    steps = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            steps += 1
    return steps


def ft_run(dataset: TensorDataset, epochs: int) -> int:
    step = ft.with_ddp(ft.train_step(loss_fn))
    state = ft.TrainState.create(make_model(), ft.optim.adam(1e-3), seed=0)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    state = ft.fit(step, state, loader, epochs=epochs, logger=False, checkpoint=False,
                   progress=False)
    return state.step


# -- worker (one per rank, under torchrun) --------------------------------------------------

def allreduce_time(world: int, calls: int = 50, repeats: int = 5) -> float:
    """Milliseconds per gloo all-reduce of a float32 tensor the size of the model's
    gradients (what DDP sends each step, in one bucket here): the communication floor."""
    n = sum(p.numel() for p in make_model().parameters())
    grads = torch.ones(n)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            dist.all_reduce(grads)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def lockstep_time(world: int, calls: int = 200, repeats: int = 5) -> float:
    """Microseconds per synchronous step-boundary exchange of ftrain's loop under with_ddp
    (stop signals and "every rank has a batch"), timed alone: what data without a length
    pays every step. (With a length the exchange is asynchronous, every k steps: the
    worker measures it inside the ft calls.)"""
    from ftrain.parallel.lockstep import Lockstep
    lock = Lockstep(dist.get_rank(), world)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for i in range(calls):
            lock.exchange([], True, False, 0, i)
        times.append((time.perf_counter() - start) / calls * 1e6)
    lock.close(False)
    return statistics.median(times)


def worker(out: str, samples: int, rounds: int, extra: int) -> None:
    from ftrain.parallel.lockstep import COST
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # one group for both variants; with_ddp joins the existing one
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    dataset = make_dataset(samples)
    steps_per_epoch = samples // (BATCH * world)
    variants: dict[str, Callable[[int], int]] = {
        "hand": lambda k: hand_run(dataset, k, rank, world),
        "ft": lambda k: ft_run(dataset, k),
    }

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    ft_steps = [0]  # steps of every ft call, to check COST's count of boundaries

    def timed(name: str, epochs: int) -> tuple[float, int, float]:
        """Seconds of the call, and its agreement's exchanges and main-thread seconds."""
        gc.collect()
        barrier()
        exchanges, spent = COST.exchanges, COST.seconds
        start = time.perf_counter()
        steps = variants[name](epochs)
        barrier()
        elapsed = time.perf_counter() - start
        if steps != epochs * steps_per_epoch:
            raise RuntimeError(f"{name} ran {steps} steps on rank {rank}, expected "
                               f"{epochs * steps_per_epoch}")
        if name == "ft":
            ft_steps[0] += steps
        if torch.get_num_threads() != 1:
            raise RuntimeError(f"{name} changed torch's thread count")
        return elapsed, COST.exchanges - exchanges, COST.seconds - spent

    def say(text: str) -> None:
        if rank == 0:
            print(f"  [N={world}] {text}", flush=True)

    names = list(variants)
    first = {name: timed(name, 1)[0] for name in names}  # warm-up: lazy imports, first calls
    say("warm-up epoch (s): " + ", ".join(f"{n} {first[n]:.2f}" for n in names))
    k1, k2 = 1, 1 + extra
    sps: dict[str, list[float]] = {n: [] for n in names}
    startup: dict[str, list[float]] = {n: [] for n in names}
    # ft's agreement per round, by the same k1/k2 difference: steady state per step
    # (main-thread us, exchanges) and what a call pays at its start and end (ms)
    lock_rounds: dict[str, list[float]] = {"us_per_step": [], "exchanges_per_step": [],
                                           "ms_per_call": []}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t1, n1, c1 = min(timed(name, k1) for _ in range(2))
            t2, n2, c2 = timed(name, k2)
            per_sample = (t2 - t1) / ((k2 - k1) * samples)
            sps[name].append(1 / per_sample)
            startup[name].append(t1 - k1 * samples * per_sample)
            if name == "ft" and world > 1:
                steps = (k2 - k1) * steps_per_epoch
                lock_rounds["us_per_step"].append((c2 - c1) / steps * 1e6)
                lock_rounds["exchanges_per_step"].append((n2 - n1) / steps)
                lock_rounds["ms_per_call"].append(
                    (c1 - k1 * steps_per_epoch * (c2 - c1) / steps) * 1e3)
        say(f"round {r + 1}/{rounds} samples/s: " +
            ", ".join(f"{n} {sps[n][-1]:.0f}" for n in names))
    lockstep: dict[str, Any] | None = None
    if world > 1:  # what the ft calls' agreement cost, before the timings below add to it
        if COST.boundaries != ft_steps[0]:
            raise RuntimeError(f"lockstep counted {COST.boundaries} step boundaries, the ft "
                               f"calls ran {ft_steps[0]} steps")
        lockstep = {k: statistics.median(v) for k, v in lock_rounds.items()}
        lockstep["sync_us"] = lockstep_time(world)
    allreduce_ms = allreduce_time(world) if world > 1 else None
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "samples": samples, "steps_per_epoch": steps_per_epoch,
                       "samples_per_s": sps, "startup_s": startup,
                       "allreduce_ms": allreduce_ms, "lockstep": lockstep}, f)
    barrier()
    if world > 1:
        dist.destroy_process_group()


# -- parent ---------------------------------------------------------------------------------

def launch(nproc: int, samples: int, rounds: int, extra: int, tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, f"ddp-{nproc}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.abspath(__file__), "--_worker", out,
           "--samples", str(samples), "--rounds", str(rounds), "--extra-epochs", str(extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    print(f"launching {nproc} process(es) ...", flush=True)
    proc = subprocess.run(cmd, env=env, stdout=None, stderr=subprocess.PIPE, text=True,
                          check=False, timeout=1800)
    if proc.returncode != 0 or not os.path.isfile(out):
        raise RuntimeError(f"torchrun with {nproc} process(es) failed (exit "
                           f"{proc.returncode}):\n{proc.stderr}")
    with open(out) as f:
        return json.load(f)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timing rounds (default 15; 2 with --quick)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per epoch, S (default 12800; 6400 with --quick)")
    parser.add_argument("--extra-epochs", type=int, default=None,
                        help="X, epochs between the short and the long call (default 3; 2 "
                        "with --quick)")
    parser.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    samples = args.samples or (6400 if args.quick else 12800)
    rounds = args.rounds or (2 if args.quick else 15)
    extra = args.extra_epochs or (2 if args.quick else 3)
    if samples % (2 * BATCH) or samples < 2 * BATCH:
        parser.error(f"--samples must be a positive multiple of {2 * BATCH}")
    if rounds < 1 or extra < 1:
        parser.error("--rounds and --extra-epochs must be >= 1")
    if args.worker:
        worker(args.worker, samples, rounds, extra)
        return

    print(f"torch {torch.__version__}, gloo, 1 thread per process, {os.cpu_count()} CPU "
          f"core(s); MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES}, batch {BATCH} per rank, "
          f"S={samples} samples per epoch, k1=1 and k2={1 + extra} epochs, "
          f"{rounds} round(s)", flush=True)
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="ftrain-ddp-bench-") as tmp:
            res = {n: launch(n, samples, rounds, extra, tmp) for n in (1, 2)}
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        # the one line a filtered log keeps says why there is no ratio
        print(f"ft / hand, 2 processes: not measured ({str(err).splitlines()[0].rstrip(':')})",
              flush=True)
        raise
    load_after = os.getloadavg()[0]
    summary(res, rounds, args.quick, load_before, load_after)


def summary(res: dict[int, dict[str, Any]], rounds: int, quick: bool, load_before: float,
            load_after: float) -> None:
    """Print the summary of both launches' results (the ratio line first)."""
    sps = {n: {v: statistics.median(r["samples_per_s"][v]) for v in ("hand", "ft")}
           for n, r in res.items()}
    startup = {n: {v: statistics.median(r["startup_s"][v]) for v in ("hand", "ft")}
               for n, r in res.items()}

    def paired(n: int) -> tuple[float, float, float]:
        r = [f / h for f, h in zip(res[n]["samples_per_s"]["ft"],
                                   res[n]["samples_per_s"]["hand"])]
        return statistics.median(r), min(r), max(r)

    two, one = paired(2), paired(1)
    print("\n== summary ==")
    # The headline, first and the only line starting `ft / hand` (grep '^ft / hand')
    print(f"ft / hand, 2 processes: {two[0]:.3f}x (median of {rounds} round(s), range "
          f"{two[1]:.3f}-{two[2]:.3f})   target >= {RATIO_TARGET}x   "
          f"{'PASS' if two[0] >= RATIO_TARGET else 'FAIL'}", flush=True)
    print(f"median of {rounds} round(s); samples/s of the whole job (steps/s per rank = "
          f"samples/s / ({BATCH} x N)); start-up = fixed cost of a call:")
    for n in (1, 2):
        for v in ("hand", "ft"):
            print(f"  N={n} {v:<5} {sps[n][v]:8.0f} samples/s  {sps[n][v] / (BATCH * n):6.1f} "
                  f"steps/s per rank   start-up {startup[n][v]:6.3f} s")
    print(f"1 process, ft / hand:         {one[0]:5.3f}x (rounds {one[1]:.3f}-{one[2]:.3f})"
          "   info")
    best = {n: {v: max(res[n]["samples_per_s"][v]) for v in ("hand", "ft")} for n in (1, 2)}
    print(f"fastest rounds, ft / hand:    {best[2]['ft'] / best[2]['hand']:5.3f}x at 2, "
          f"{best[1]['ft'] / best[1]['hand']:5.3f}x at 1   info: fastest round of each")
    for v in ("hand", "ft"):
        eff = sps[2][v] / (2 * sps[1][v])
        print(f"scaling efficiency 1->2, {v:<5} {eff:5.3f}   (samples/s at 2) / (2 x at 1)")
    n_params = sum(p.numel() for p in make_model().parameters())
    print(f"gloo all-reduce of the gradients ({n_params} floats, {n_params * 4 / 1024:.0f} KiB) "
          f"between 2 processes: {res[2]['allreduce_ms']:.3f} ms per call; a step at 1 process "
          f"takes {1e3 * BATCH / sps[1]['hand']:.3f} ms (hand)")
    lock = res[2]["lockstep"]
    step_us = 1e6 * BATCH * 2 / sps[2]["ft"]  # one ft step per rank at 2 processes
    every = 1 / lock["exchanges_per_step"] if lock["exchanges_per_step"] > 0 else float("inf")
    print(f"step-boundary agreement, 2 processes, data with a length: "
          f"{lock['us_per_step']:.2f} us per step in steady state "
          f"({100 * lock['us_per_step'] / step_us:.3f}% of ft's {step_us:.0f} us step; one "
          f"asynchronous exchange per {every:.0f} steps), {lock['ms_per_call']:.2f} ms per "
          "fit call at its start and end (main-thread time; medians of the rounds' k1/k2 "
          "differences)")
    print(f"step-boundary agreement, 2 processes, data without a length: "
          f"{lock['sync_us']:.0f} us per step (a synchronous exchange every step)")
    if (os.cpu_count() or 0) < 4:
        print(f"  ({os.cpu_count()} core(s): 2 workers plus gloo's threads share them; "
              "scaling is bounded by the cores)")
    print(f"  (1-minute load average {load_before:.2f} before the launches, {load_after:.2f} "
          "after", end="")
    if max(load_before, load_after) > (os.cpu_count() or 1):
        print(": above the core count, so other processes competed for the cores)")
    else:
        print(")")
    if quick:
        print("  (--quick: two rounds, short epochs: a smoke run, not a measurement)",
              flush=True)


if __name__ == "__main__":
    main()
