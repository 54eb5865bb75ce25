"""Everything GPU-related of ftrain, in one call of at most 8 minutes, ending in one table.

Run on a machine with a GPU, from the repository root:

    python benchmarks/gpu.py --out $OUT/gpu_results.json

(PYTHONPATH=. where ftrain is not installed). `--cpu-smoke` runs every section's code on
the CPU at tiny sizes (CUDA-only parts are reported as skipped, ft.compile only with
`--with-compile`) in about a minute; its timings mean nothing. Without CUDA and without
`--cpu-smoke` the script says so and exits with status 0. `--only tests,graphs` runs some
sections; `--max-minutes` sets the budget.

Time budget: the sections share `--max-minutes` (default 8) by weight; a section gets its
share of the time left when it starts, so time a section leaves unused goes to the later
ones. Timing rounds stop at the section's deadline (at least one round runs), subprocesses
are killed at it, and a section that would start with too little time left is reported
as not run. A watchdog prints the table with what was measured and exits (status 3) if the
budget is overrun anyway (a compile that takes longer than its share, a hung kernel). The
JSON summary (`--out`) is rewritten after every section.

Sections, in the order they run:

tests: the CUDA-only tests, `python -m pytest -k cuda` over the test files that mention
CUDA (every CUDA-only test has "cuda" in its name): pass/fail counts, failing test names.
They run in a child process, so their sync-debug settings cannot leak into the timings.

(a) convergence: an MLP 32-256-256-10 learns a fixed random linear teacher's labels
(cross-entropy, batch 256, `ft.optim.adam(1e-3)`, 400 steps through `ft.iterate` over 64
batches on the GPU) under `ft.with_amp(step, torch.bfloat16)` and under float16 (loss
scaler, `growth_interval=50`). Pass: every loss finite and the mean of the last 20 losses
below half the mean of the first 20.

(b) no host sync (CUDA only): the same MLP, `ft.iterate` without logger, data on the GPU;
after 16 warm-up steps, 1,040 steps under `torch.cuda.set_sync_debug_mode("error")`
(they include the loop's fold of pending losses every 1,024 steps), then the same under
"warn", counting sync warnings by call site. Plain, bfloat16, float16, and bfloat16 under
`with_logging` between two logging intervals.

(c) bf16 LM: a GPT-style decoder (6 layers, d=512, 8 heads, vocab 8192, sequence 256,
batch 16, ~27M parameters), AdamW 3e-4: `ft.fit(ft.with_amp(ft.train_step(loss),
torch.bfloat16), ...)` against a hand loop (`torch.autocast`, `AdamW(fused=True)`) and,
for information, Lightning (`precision="bf16-mixed"`) when installed. Target: ft / hand
>= 0.97x. (d) the same in float16: ftrain's loss scaler against `torch.amp.GradScaler`.

(e) CUDA graphs: a tiny MLP 32-64-10 (batch 32, fp32, Adam 1e-3) where launch overhead
is everything: `ft.compile(step, mode="reduce-overhead")` (ftrain's CUDA-graph path)
against ft eager, a hand eager loop (`Adam(fused=True)`), and a hand-captured CUDA graph
of the whole iteration (static input buffers, `Adam(capturable=True)`, forward, backward
and update captured once with `torch.cuda.graph`, replayed per batch). The first call's
time (compile and capture) is reported.

(f) fused optimizer kernels: a wide MLP (8 layers of 1024 units, batch 64: the update is
a large part of the step): ft's default Adam (torch's fused kernel on CUDA) against a
hand loop with `Adam(fused=True)`, and fused against foreach in both.

(g) host-to-device prefetch: an MLP 12288-1024-1024-10, batch 256 (12.6 MB of input per
step) fed from CPU memory. Hand loops: data already on the GPU (no transfer: the bound),
a blocking copy per step (pageable memory), a non-blocking copy from pinned memory on the
compute stream, and `ftrain.data.prefetch.prefetch` (copies one batch ahead on a side
stream, pinning pageable batches); `ft.fit` over the host batches and over batches on
the GPU. The copy time per batch (pageable, pinned) is measured alone for scale.

(i) throughput and MFU: `ft.with_throughput` on the bf16 GPT of (c): the tokens/s, TFLOP/s
(torch's flop counter, with the 6N rule for scale) and MFU (against the device table) it
reports, its tokens/s against the time per step measured outside it, and its cost (ft
with the layer against ft without, target >= 0.97x).

(h) DDP (two or more GPUs; with `--cpu-smoke`, 2 CPU processes): the script launches
itself under `torch.distributed.run`, one process per GPU (NCCL), and times
`ft.with_ddp(ft.with_amp(ft.train_step(loss), torch.bfloat16))` against hand-written
`DistributedDataParallel` with autocast and fused AdamW on the GPT of (c), each rank
taking its share of the same batches. Target: >= 0.97x.

Timing method (c-h): every variant is fed the same list of E batches per epoch. A call
trains k epochs and is timed with `torch.cuda.synchronize()` before starting the clock and
before stopping it. Steady state: per step = (t(1 + X epochs) - t(1 epoch)) / (X x E),
with t(1 epoch) the faster of 2 calls, so start-up and teardown cancel; start-up = t(1) -
E x per step. GPT variants (c, d, h) train a fresh model in every call; the others keep
their model across calls. One warm-up call per variant first, then up to R = 5 rounds
with the variants interleaved and their order rotating; medians over rounds, ratios as
medians of per-round ratios (paired) with their range.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import gc
import itertools
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import GPT, Batches, sync
from _common import loss_fn as mlp_loss
from torch import nn

import ftrain as ft
from ftrain.data.prefetch import prefetch

Batch = tuple[torch.Tensor, torch.Tensor]
Variant = Callable[[int], float]  # epochs -> seconds of the timed region
ROOT = Path(__file__).resolve().parent.parent
OFF = {"logger": False, "checkpoint": False, "progress": False}
TARGET = 0.97  # ft >= 0.97x the hand-written loop: bf16 LM, fused Adam, DDP
LR, WEIGHT_DECAY = 3e-4, 0.01


@dataclass(frozen=True)
class Config:
    vocab: int
    seq: int
    d: int
    heads: int
    layers: int
    batch: int
    epoch_batches: int  # E for the GPT sections
    extra_epochs: int  # X
    rounds: int  # R
    mlp_steps: int  # (a): steps and batch size
    mlp_batch: int
    sync_checked: int  # (b)
    tiny_batches: int  # E for (e)
    wide: int  # (f): width and depth of the MLP, its batch, E
    wide_layers: int
    wide_batch: int
    wide_batches: int
    pf_features: int  # (g): input features, hidden units, batch, E
    pf_hidden: int
    pf_batch: int
    pf_batches: int


FULL = Config(vocab=8192, seq=256, d=512, heads=8, layers=6, batch=16, epoch_batches=40,
              extra_epochs=5, rounds=5, mlp_steps=400, mlp_batch=256, sync_checked=1040,
              tiny_batches=400,
              wide=1024, wide_layers=8, wide_batch=64, wide_batches=60, pf_features=12288,
              pf_hidden=1024, pf_batch=256, pf_batches=40)
SMOKE = Config(vocab=128, seq=16, d=32, heads=2, layers=1, batch=2, epoch_batches=4,
               extra_epochs=1, rounds=1, mlp_steps=150, mlp_batch=32, sync_checked=40,
               tiny_batches=8,
               wide=64, wide_layers=2, wide_batch=8, wide_batches=4, pf_features=64,
               pf_hidden=32, pf_batch=8, pf_batches=4)

# Section weights: each gets (its weight / the weights left) of the time left.
WEIGHTS = {"tests": 120, "convergence": 15, "sync_free": 25, "gpt_bf16": 90, "graphs": 90,
           "fused": 35, "prefetch": 35, "gpt_fp16": 45, "ddp": 70, "mfu": 60}
MIN_SECONDS = {"tests": 20, "graphs": 30, "ddp": 30}  # below this a section is not started
RESERVE_S = 15  # kept back for the table and the JSON


# -- small helpers ------------------------------------------------------------------------

def error_record(err: BaseException) -> dict[str, Any]:
    """An error for the JSON: its message, the messages of its causes and contexts, and
    the formatted traceback."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    chain, seen = [], set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(f"{type(cur).__name__}: {cur}"[:1000])
        cur = cur.__cause__ or cur.__context__
    return {"error": chain[0][:2000], "chain": chain, "traceback": text[-12000:]}


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def row(check: str, ftrain: str = "", reference: str = "", ratio: str = "",
        target: str = "", result: str = "") -> dict[str, str]:
    """One line of the final table."""
    return {"check": check, "ftrain": ftrain, "reference": reference, "ratio": ratio,
            "target": target, "result": result}


def verdict(ok: bool | None, smoke: bool) -> str:
    if smoke:
        return "smoke"
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def fmt_ratio(r: dict[str, float] | None) -> str:
    if r is None:
        return "n/a"
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}, n={r['rounds']})"


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


@dataclass
class Ctx:
    """What every section gets: device, sizes, its deadline, smoke mode."""

    device: torch.device
    cfg: Config
    deadline: float
    smoke: bool
    compile: bool = True  # (e) runs ft.compile (a --cpu-smoke run only if asked)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# -- timing ---------------------------------------------------------------------------------

def time_variants(variants: dict[str, Variant], ctx: Ctx, batches: int, units: int = 1,
                  deadline: float | None = None) -> dict[str, Any]:
    """Warm-up call per variant, then interleaved rounds until R rounds or the deadline;
    a failing variant is recorded and dropped, the others go on."""
    x, device = ctx.cfg.extra_epochs, ctx.device
    deadline = ctx.deadline if deadline is None else deadline
    errors: dict[str, Any] = {}
    alive = list(variants)

    def call(name: str, epochs: int) -> tuple[float, int]:
        gc.collect()  # garbage of the previous call is not charged here
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elapsed = variants[name](epochs)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
        return elapsed, peak

    warm: dict[str, float] = {}
    for name in list(alive):
        try:
            warm[name] = call(name, 1)[0]
        except Exception as err:
            errors[name] = error_record(err)
            alive.remove(name)
            print(f"  {name}: ERROR in warm-up: {errors[name]['error']}", flush=True)
    print("  warm-up call (s): " + ", ".join(f"{n} {t:.2f}" for n, t in warm.items()),
          flush=True)
    rounds: list[dict[str, dict[str, float]]] = []
    stopped_early, last_round = False, 0.0
    for r in range(ctx.cfg.rounds):
        if not alive:
            break
        began = time.monotonic()
        if rounds and began + last_round > deadline:
            stopped_early = True
            print(f"  time budget: stopping after {len(rounds)} round(s)", flush=True)
            break
        record: dict[str, dict[str, float]] = {}
        shift = r % len(alive)
        for name in alive[shift:] + alive[:shift]:
            try:
                t1 = min(call(name, 1)[0] for _ in range(2))
                t2, peak = call(name, 1 + x)
            except Exception as err:
                errors[name] = error_record(err)
                print(f"  {name}: ERROR {errors[name]['error']}", flush=True)
                continue
            per = max((t2 - t1) / (x * batches), 1e-9)
            record[name] = {"per_step_s": per, "startup_s": t1 - batches * per,
                            "peak_bytes": peak}
        alive = [n for n in alive if n not in errors]
        rounds.append(record)
        last_round = time.monotonic() - began
        print(f"  round {r + 1}/{ctx.cfg.rounds}: " + ", ".join(
            f"{n} {fmt_time(v['per_step_s'])}" for n, v in record.items()), flush=True)
    summary: dict[str, Any] = {}
    for name in variants:
        per = [rd[name]["per_step_s"] for rd in rounds if name in rd]
        if not per:
            continue
        summary[name] = {
            "s_per_step": statistics.median(per),
            "steps_per_s": statistics.median(1 / p for p in per),
            "units_per_s": statistics.median(units / p for p in per),
            "startup_s": statistics.median(rd[name]["startup_s"] for rd in rounds
                                           if name in rd),
            "peak_mib": (statistics.median(rd[name]["peak_bytes"] for rd in rounds
                                           if name in rd) / 2**20 if ctx.cuda else None),
            "rounds_s_per_step": per,
        }
        print(f"  {name:<24} {fmt_time(summary[name]['s_per_step']):>12}/step  start-up "
              f"{summary[name]['startup_s']:.3f} s" + (
                  f"  peak {summary[name]['peak_mib']:.0f} MiB" if ctx.cuda else ""),
              flush=True)
    return {"variants": summary, "rounds": rounds, "errors": errors, "warmup_s": warm,
            "stopped_early": stopped_early}


def ratio(result: dict[str, Any], a: str, b: str) -> dict[str, float] | None:
    """Speed of a over b: median, min and max of the per-round ratios."""
    r = [rd[b]["per_step_s"] / rd[a]["per_step_s"] for rd in result["rounds"]
         if a in rd and b in rd]
    if not r:
        return None
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": len(r)}


def per_step(result: dict[str, Any], name: str) -> float | None:
    v = result["variants"].get(name)
    return None if v is None else v["s_per_step"]


def compare(result: dict[str, Any], check: str, a: str, b: str, ctx: Ctx,
            target: float | None = None) -> dict[str, str]:
    """A table row: variant a against variant b (speed ratio), with a target or info."""
    r = ratio(result, a, b)
    ok = None if target is None or r is None else r["median"] >= target
    return row(check, fmt_time(per_step(result, a)), fmt_time(per_step(result, b)),
               fmt_ratio(r), f">= {target:.2f}x" if target is not None else "info",
               verdict(ok, ctx.smoke) if target is not None else
               ("smoke" if ctx.smoke else ""))


def fit_variant(make_step: Callable[[], Any], make_state: Callable[[], ft.TrainState],
                data: Any, device: torch.device, steps_per_epoch: int,
                keep: bool) -> Variant:
    """`ft.fit` for k epochs: a fresh step and state per call, or (keep) one state carried
    from call to call."""
    held: dict[str, Any] = {}

    def run(epochs: int) -> float:
        if keep and "state" in held:
            step, state = held["step"], held["state"]
        else:
            step, state = make_step(), make_state().to(device)
        first = state.step
        sync(device)
        start = time.perf_counter()
        state = ft.fit(step, state, data, epochs=state.epoch + epochs, **OFF)
        sync(device)
        elapsed = time.perf_counter() - start
        if state.step - first != epochs * steps_per_epoch:
            raise RuntimeError(f"ft ran {state.step - first} steps, expected "
                               f"{epochs * steps_per_epoch}")
        if keep:
            held.update(step=step, state=state)
        return elapsed
    return run


# -- models and data ----------------------------------------------------------------------

def make_gpt(cfg: Config) -> GPT:
    torch.manual_seed(0)  # every variant starts from the same weights
    return GPT(cfg.vocab, cfg.seq, cfg.d, cfg.layers, cfg.heads)


def gpt_data(cfg: Config, device: torch.device, n: int | None = None) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(cfg.epoch_batches if n is None else n):
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=g)
        out.append((tokens[:, :-1].contiguous().to(device),
                    tokens[:, 1:].contiguous().to(device)))
    return out


def gpt_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def mlp(sizes: list[int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def labelled(n: int, batch: int, features: int, device: torch.device, seed: int = 2
             ) -> list[Batch]:
    """Batches labelled by a fixed random linear teacher: learnable, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(features, 10, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, features, generator=g)
        out.append((x.to(device), (x @ teacher).argmax(1).to(device)))
    return out


def hand_loop(model: nn.Module, opt: torch.optim.Optimizer, data: Any,
              device: torch.device, steps_per_epoch: int, move: bool = False) -> Variant:
    """A hand-written eager loop over `data` (an iterable, re-read per epoch; `move`:
    copy each batch to the device first, blocking unless pinned)."""
    def run(epochs: int) -> float:
        steps = 0
        sync(device)
        start = time.perf_counter()
        for _ in range(epochs):
            for batch in (data() if callable(data) else data):
                if move:
                    batch = tuple(t.to(device, non_blocking=t.is_pinned()) for t in batch)
                opt.zero_grad(set_to_none=True)
                mlp_loss(model, batch).backward()
                opt.step()
                steps += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if steps != epochs * steps_per_epoch:
            raise RuntimeError(f"hand loop ran {steps} steps")
        return elapsed
    return run


# -- tests: the CUDA-only tests -----------------------------------------------------------

def section_tests(ctx: Ctx) -> dict[str, Any]:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "cuda" in p.read_text())
    with tempfile.TemporaryDirectory(prefix="ftrain-gpu-tests-") as tmp:
        report = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", "cuda",
               f"--junitxml={report}", *files]
        print("  " + " ".join(cmd[1:]), flush=True)
        timeout = max(ctx.deadline - time.monotonic(), 5.0)
        code, output = run_child(cmd, timeout)
        res: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_code": code,
                               "output_tail": output[-6000:], "files": files}
        if os.path.exists(report):
            root = ET.parse(report).getroot()
            cases = list(root.iter("testcase"))
            failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
                      if c.find("failure") is not None or c.find("error") is not None]
            skipped = sum(c.find("skipped") is not None for c in cases)
            res.update(total=len(cases), failed=failed, skipped=skipped,
                       passed=len(cases) - len(failed) - skipped)
    print("  " + output.strip().splitlines()[-1] if output.strip() else "  (no output)",
          flush=True)
    if "total" not in res:
        summary = "timed out" if code == -9 else f"no report (exit code {code})"
        res["rows"] = [row("CUDA-only tests (pytest -k cuda)", summary, "", "", "all pass",
                           "FAIL")]
        return res
    for name in res["failed"]:
        print(f"  FAILED {name}", flush=True)
    ok = not res["failed"] and code in (0, 5) and (res["passed"] > 0 or not ctx.cuda)
    text = f"{res['passed']} passed, {len(res['failed'])} failed, {res['skipped']} skipped"
    res["rows"] = [row("CUDA-only tests (pytest -k cuda)", text, "", "", "all pass",
                       ("PASS" if ok else "FAIL") if ctx.cuda else "smoke")]
    res["rows"] += [row(f"  failed: {name}", result="FAIL") for name in res["failed"][:10]]
    return res


def run_child(cmd: list[str], timeout: float, env: dict[str, str] | None = None
              ) -> tuple[int, str]:
    """Run a child process (its own process group, killed whole at the timeout); its exit
    code (-9 when killed) and its output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, (out or "") + f"\n(killed at the time budget, after {timeout:.0f} s)"


# -- (a) convergence ------------------------------------------------------------------------

def amp_step(loss: Callable[[Any, Any], torch.Tensor], dtype: torch.dtype | None,
             **kwargs: Any) -> Any:
    step = ft.train_step(loss)
    return step if dtype is None else ft.with_amp(step, dtype, **kwargs)


def iterate_all(step: Any, state: ft.TrainState, data: list[Batch], max_steps: int
                ) -> tuple[ft.TrainState, list[torch.Tensor]]:
    """Run `ft.iterate` to the end: the final state and the per-step losses (device
    tensors; no sync here)."""
    gen = ft.iterate(step, state, data, max_steps=max_steps)
    losses = []
    while True:
        try:
            _, metrics = next(gen)
        except StopIteration as done:
            return done.value, losses
        losses.append(metrics["loss"])


def converge(device: torch.device, dtype: torch.dtype, steps: int, batch: int
             ) -> dict[str, Any]:
    data = labelled(64, batch, 32, device)
    scaler = {"growth_interval": 50} if dtype == torch.float16 else {}
    state = ft.TrainState.create(mlp([32, 256, 256, 10]), ft.optim.adam(1e-3), seed=0)
    state, losses = iterate_all(amp_step(mlp_loss, dtype, **scaler), state.to(device), data,
                                steps)
    values = torch.stack(losses).float().cpu().tolist()
    k = min(20, max(1, steps // 4))
    first, last = statistics.fmean(values[:k]), statistics.fmean(values[-k:])
    finite = all(math.isfinite(v) for v in values)
    res: dict[str, Any] = {"steps": state.step, "first_loss": first, "last_loss": last,
                           "all_finite": finite, "passed": finite and last < 0.5 * first}
    if dtype == torch.float16:
        res["loss_scale"] = ft.loss_scale(state)
        res["skipped_steps"] = int(state.slots["amp"]["skipped"])
    if state.step != steps:
        raise RuntimeError(f"ran {state.step} steps, expected {steps}")
    return res


def section_convergence(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": []}
    for dtype in (torch.bfloat16, torch.float16):
        name = dtype_name(dtype)
        try:
            res = converge(ctx.device, dtype, ctx.cfg.mlp_steps, ctx.cfg.mlp_batch)
            scale = (f", loss scale {res['loss_scale']:g}, {res['skipped_steps']} skipped"
                     if "loss_scale" in res else "")
            text = f"loss {res['first_loss']:.3f} -> {res['last_loss']:.3f}{scale}"
            out["rows"].append(row(f"with_amp {name} converges (MLP, {res['steps']} steps)",
                                   text, "", "", "last < 0.5 x first",
                                   "PASS" if res["passed"] else "FAIL"))
        except Exception as err:
            res = error_record(err)
            out["rows"].append(row(f"with_amp {name} converges", "ERROR", "", "", "",
                                   "FAIL"))
        print(f"  {name}: {out['rows'][-1]['ftrain']}   {out['rows'][-1]['result']}",
              flush=True)
        out[name] = res
    return out


# -- (b) no host sync ---------------------------------------------------------------------------

SYNC_WARMUP = 16


def sync_run(ctx: Ctx, dtype: torch.dtype | None, mode: str, log_dir: str | None = None
             ) -> dict[str, Any]:
    """SYNC_WARMUP steps, then the checked steps under sync debug `mode` ("error" or
    "warn"); with `log_dir`, under `with_logging` whose interval no checked step reaches."""
    checked = ctx.cfg.sync_checked
    data = labelled(SYNC_WARMUP + checked + 8, 64, 32, ctx.device)  # no epoch end inside
    step = amp_step(mlp_loss, dtype)
    if log_dir is not None:
        step = ft.with_logging(step, [ft.loggers.CSV(log_dir)], every_n_steps=10**6)
    state = ft.TrainState.create(mlp([32, 256, 256, 10]), ft.optim.adam(1e-3), seed=0)
    gen = ft.iterate(step, state.to(ctx.device), data, max_steps=len(data))
    res: dict[str, Any] = {"checked_steps": 0}
    sites: Counter[str] = Counter()
    stacks: dict[str, str] = {}

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
               line: Any = None) -> None:
        """Count torch's sync warnings by call site; keep the first one's Python stack."""
        text = str(message)
        if "synchroniz" not in text:
            return
        key = f"{filename}:{lineno}: {text[:200]}"
        sites[key] += 1
        if key not in stacks:
            frames = [f for f in traceback.extract_stack(limit=16)[:-1]
                      if not f.filename.endswith("warnings.py")]
            stacks[key] = "".join(traceback.format_list(frames[-12:]))

    try:
        for _ in range(SYNC_WARMUP):
            next(gen)
        torch.cuda.synchronize(ctx.device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # restored when the block ends
            torch.cuda.set_sync_debug_mode(mode)
            try:
                for _ in range(checked):
                    next(gen)
                    res["checked_steps"] += 1
            except Exception as err:
                res.update(error_record(err))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if mode == "warn":
            res["sync_warnings"] = sum(sites.values())
            res["sites"] = dict(sites.most_common(20))
            res["stacks"] = {k: stacks[k] for k in list(res["sites"])[:5]}
    finally:
        gen.close()
    return res


def section_sync_free(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": []}
    checked = ctx.cfg.sync_checked
    configs = [(dtype_name(d), d, False) for d in (None, torch.bfloat16, torch.float16)]
    configs.append(("bf16+logging", torch.bfloat16, True))
    for name, dtype, logging_on in configs:
        try:
            with tempfile.TemporaryDirectory(prefix="ftrain-gpu-") as tmp:
                strict = sync_run(ctx, dtype, "error", tmp if logging_on else None)
                diag = sync_run(ctx, dtype, "warn", tmp if logging_on else None)
            passed = "error" not in strict and strict["checked_steps"] == checked and \
                "error" not in diag and diag["sync_warnings"] == 0
            res = {"passed": passed, "error_mode": strict, "warn_mode": diag}
            text = f"{strict['checked_steps']}/{checked} steps, " \
                   f"{diag.get('sync_warnings', '?')} sync warnings"
            if "error" in strict:
                print(f"  {name} error: {strict['error']}\n    " +
                      strict["traceback"].strip().replace("\n", "\n    ")[-3000:], flush=True)
            for site, count in diag.get("sites", {}).items():
                print(f"    {count} x {site}", flush=True)
                if site in diag.get("stacks", {}):
                    print("      " + diag["stacks"][site].strip().replace("\n", "\n      "),
                          flush=True)
        except Exception as err:
            res, passed, text = error_record(err), False, "ERROR"
        out["rows"].append(row(f"no host sync between steps ({name}, ft.iterate)", text, "",
                               "", "0 syncs", "PASS" if passed else "FAIL"))
        print(f"  {name}: {text}   {out['rows'][-1]['result']}", flush=True)
        out[name] = res
    return out


# -- (c, d) the GPT in bf16 and fp16 ----------------------------------------------------------

def gpt_ft(cfg: Config, data: list[Batch], device: torch.device, dtype: torch.dtype
           ) -> Variant:
    return fit_variant(lambda: ft.with_amp(ft.train_step(gpt_loss), dtype),
                       lambda: ft.TrainState.create(
                           make_gpt(cfg), ft.optim.adamw(LR, weight_decay=WEIGHT_DECAY),
                           seed=0), data, device, len(data), keep=False)


def gpt_hand(cfg: Config, data: list[Batch], device: torch.device, dtype: torch.dtype
             ) -> Variant:
    def run(epochs: int) -> float:
        model = make_gpt(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                fused=True)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        steps = 0
        sync(device)
        start = time.perf_counter()
        for _ in range(epochs):
            for batch in data:
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype):
                    loss = gpt_loss(model, batch)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                steps += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if steps != epochs * len(data):
            raise RuntimeError(f"hand loop ran {steps} steps")
        return elapsed
    return run


def gpt_lightning(cfg: Config, data: list[Batch], device: torch.device) -> Variant:
    import lightning as L

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")

    class LitGPT(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_gpt(cfg)

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            return gpt_loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                     fused=True)

    def run(epochs: int) -> float:
        module = LitGPT()
        sync(device)
        start = time.perf_counter()
        trainer = L.Trainer(max_epochs=epochs, precision="bf16-mixed",
                            accelerator="gpu" if device.type == "cuda" else "cpu",
                            devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=Batches(data))
        sync(device)
        elapsed = time.perf_counter() - start
        if trainer.global_step != epochs * len(data):
            raise RuntimeError(f"Lightning ran {trainer.global_step} steps")
        return elapsed
    return run


def section_gpt(ctx: Ctx, dtype: torch.dtype) -> dict[str, Any]:
    cfg, name = ctx.cfg, dtype_name(dtype)
    data = gpt_data(cfg, ctx.device)
    ft_name = f"ft {name}"
    hand = f"hand {name}" + (" GradScaler" if dtype == torch.float16 else "")
    variants = {ft_name: gpt_ft(cfg, data, ctx.device, dtype),
                hand: gpt_hand(cfg, data, ctx.device, dtype)}
    lightning_error = None
    if dtype == torch.bfloat16:
        try:
            variants["Lightning bf16"] = gpt_lightning(cfg, data, ctx.device)
        except Exception as err:
            lightning_error = error_record(err)
            print(f"  Lightning unavailable: {lightning_error['error']}", flush=True)
    res = time_variants(variants, ctx, len(data), units=cfg.batch * cfg.seq)
    params = sum(p.numel() for p in make_gpt(cfg).parameters())
    what = f"GPT {params / 1e6:.3g}M, {cfg.batch}x{cfg.seq} tokens"
    if dtype == torch.bfloat16:
        res["rows"] = [compare(res, f"bf16 LM step: ft.with_amp vs hand autocast ({what})",
                               ft_name, hand, ctx, TARGET)]
        if lightning_error is None:
            res["rows"].append(compare(res, "bf16 LM step: ft vs Lightning bf16-mixed",
                                       ft_name, "Lightning bf16", ctx))
        else:
            res["errors"]["Lightning bf16"] = lightning_error
            res["rows"].append(row("bf16 LM step: ft vs Lightning bf16-mixed",
                                   reference="Lightning not installed", result="n/a"))
    else:
        res["rows"] = [compare(res, f"fp16 LM step: ft loss scaler vs GradScaler ({what})",
                               ft_name, hand, ctx)]
    return res


# -- (i) throughput and MFU of the bf16 GPT ---------------------------------------------------

def section_mfu(ctx: Ctx) -> dict[str, Any]:
    """`ft.with_throughput` on the bf16 GPT of (c): what it reports (tokens/s, TFLOP/s from
    torch's flop counter, MFU against the device table), checked against the time per
    step measured outside it, and what the layer costs (ft with it vs ft without)."""
    cfg, dtype = ctx.cfg, torch.bfloat16
    data = gpt_data(cfg, ctx.device)
    every = max(len(data) // 2, 1)

    def measured() -> Any:
        return ft.with_throughput(ft.with_amp(ft.train_step(gpt_loss), dtype),
                                  every_n_steps=every, tokens=lambda b: b[0].numel())

    def make_state() -> ft.TrainState:
        return ft.TrainState.create(make_gpt(cfg), ft.optim.adamw(LR, weight_decay=WEIGHT_DECAY),
                                    seed=0)

    variants = {"ft bf16": gpt_ft(cfg, data, ctx.device, dtype),
                "ft bf16 + with_throughput": fit_variant(measured, make_state, data,
                                                         ctx.device, len(data), keep=False)}
    res = time_variants(variants, ctx, len(data), units=cfg.batch * cfg.seq)
    reports: list[dict[str, float]] = []
    state = make_state().to(ctx.device)
    for _, metrics in ft.iterate(measured(), state, data, epochs=3):
        found = {k.split("/", 1)[1]: float(v) for k, v in metrics.items()
                 if k.startswith("throughput/")}
        if found:
            reports.append(found)
    last = reports[-1] if reports else {}
    res["reports"] = reports
    step_s = per_step(res, "ft bf16 + with_throughput")
    tokens_s = cfg.batch * cfg.seq / step_s if step_s else None
    params = sum(p.numel() for p in make_gpt(cfg).parameters())
    res["rows"] = [compare(res, "with_throughput's cost (ft with it vs without)",
                           "ft bf16 + with_throughput", "ft bf16", ctx, 0.97)]
    if last:
        agree = tokens_s is not None and abs(last["tokens_per_s"] / tokens_s - 1) < 0.15
        res["rows"].append(row(
            "with_throughput tokens/s vs timed outside it",
            f"{last['tokens_per_s']:.0f}", f"{tokens_s:.0f}" if tokens_s else "",
            f"{last['tokens_per_s'] / tokens_s:.2f}x" if tokens_s else "", "within 15%",
            verdict(agree, ctx.smoke)))
        six_n = 6 * params * last["tokens_per_s"] / 1e12  # the 6N rule, for scale
        res["rows"].append(row(
            "with_throughput TFLOP/s (flop counter) vs 6N rule", f"{last['tflops']:.1f}",
            f"{six_n:.1f}", "", "info", ""))
        mfu = last.get("mfu")
        res["rows"].append(row(
            "with_throughput MFU (device table), peak memory",
            f"{mfu:.1%}" if mfu is not None else "device not in table",
            f"{last['peak_mem_mb']:.0f} MiB", "", "info", ""))
    return res


# -- (e) CUDA graphs on a tiny MLP ----------------------------------------------------------

def tiny() -> nn.Module:
    return mlp([32, 64, 10])


def hand_graph(data: list[Batch], device: torch.device) -> Variant:
    """The whole iteration captured once as a CUDA graph by hand and replayed per batch
    (torch's "whole network capture" recipe)."""
    model = tiny().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    static_x, static_y = (t.clone() for t in data[0])
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the graph (cuBLAS, optimizer state)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            mlp_loss(model, (static_x, static_y)).backward()
            opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = mlp_loss(model, (static_x, static_y))
        loss.backward()
        opt.step()

    def run(epochs: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(epochs):
            for x, y in data:
                static_x.copy_(x)
                static_y.copy_(y)
                graph.replay()
        sync(device)
        return time.perf_counter() - start
    return run


def section_graphs(ctx: Ctx) -> dict[str, Any]:
    device, n = ctx.device, ctx.cfg.tiny_batches
    data = labelled(n, 32, 32, device, seed=1)

    def state() -> ft.TrainState:
        return ft.TrainState.create(tiny(), ft.optim.adam(1e-3), seed=0)

    hand_model = tiny().to(device)
    variants: dict[str, Variant] = {
        "hand eager": hand_loop(hand_model, torch.optim.Adam(
            hand_model.parameters(), lr=1e-3, fused=True), data, device, n),
        "ft eager": fit_variant(lambda: ft.train_step(mlp_loss), state, data, device, n,
                                keep=True),
    }
    compiled = ft.compile(ft.train_step(mlp_loss), mode="reduce-overhead")
    ro = "ft reduce-overhead"
    if ctx.compile:
        variants[ro] = fit_variant(lambda: compiled, state, data, device, n, keep=True)
    if ctx.cuda:
        variants["hand CUDA graph"] = hand_graph(data, device)
    res = time_variants(variants, ctx, n, units=32)
    res["rows"] = [
        compare(res, "tiny MLP: ft eager vs hand eager (fused Adam)", "ft eager",
                "hand eager", ctx),
        compare(res, "tiny MLP: hand-captured CUDA graph vs hand eager", "hand CUDA graph",
                "hand eager", ctx) if ctx.cuda else
        row("tiny MLP: hand-captured CUDA graph", result="skipped (needs CUDA)")]
    if not ctx.compile:
        res["rows"].append(row("tiny MLP: ft.compile reduce-overhead",
                               result="skipped (--cpu-smoke without --with-compile)"))
        return res
    core = ft.combinators.core(compiled)
    res["compiles"] = core.compiles
    res["fallback"] = core.fallback_reason
    warm = res["warmup_s"]
    first = warm.get(ro, math.nan) - warm.get("ft eager", math.nan)
    res["rows"] += [
        compare(res, "tiny MLP: ft.compile reduce-overhead vs ft eager", ro, "ft eager", ctx),
        compare(res, "tiny MLP: ft.compile reduce-overhead vs hand eager", ro, "hand eager",
                ctx),
        compare(res, "tiny MLP: ft.compile reduce-overhead vs hand-captured CUDA graph", ro,
                "hand CUDA graph", ctx) if ctx.cuda else
        row("tiny MLP: ft.compile vs hand-captured CUDA graph",
            result="skipped (needs CUDA)"),
        row("tiny MLP: ft.compile first call (compile, capture)", f"{first:.1f} s", "", "",
            "info", f"{core.compiles} graph(s)" + (
                f", FELL BACK: {core.fallback_reason}" if core.fallback_reason else "")),
    ]
    return res


# -- (f) fused optimizer kernels -----------------------------------------------------------------

def section_fused(ctx: Ctx) -> dict[str, Any]:
    cfg, device, n = ctx.cfg, ctx.device, ctx.cfg.wide_batches
    sizes = [cfg.wide] * (cfg.wide_layers + 1) + [10]
    data = labelled(n, cfg.wide_batch, cfg.wide, device, seed=3)
    variants: dict[str, Variant] = {}
    for impl in ("fused", "foreach"):
        model = mlp(sizes).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **{impl: True})
        variants[f"hand Adam {impl}"] = hand_loop(model, opt, data, device, n)
    variants["ft adam (default)"] = fit_variant(
        lambda: ft.train_step(mlp_loss),
        lambda: ft.TrainState.create(mlp(sizes), ft.optim.adam(1e-3), seed=0), data,
        device, n, keep=True)
    variants["ft adam foreach"] = fit_variant(
        lambda: ft.train_step(mlp_loss),
        lambda: ft.TrainState.create(mlp(sizes), ft.optim.adam(1e-3, foreach=True), seed=0),
        data, device, n, keep=True)
    res = time_variants(variants, ctx, n, units=cfg.wide_batch)
    params = sum(p.numel() for p in mlp(sizes).parameters())
    res["rows"] = [
        compare(res, f"Adam step, {params / 1e6:.3g}M params: ft default (fused) vs hand "
                "fused", "ft adam (default)", "hand Adam fused", ctx, TARGET),
        compare(res, "  ft fused vs ft foreach", "ft adam (default)", "ft adam foreach", ctx),
        compare(res, "  hand fused vs hand foreach", "hand Adam fused", "hand Adam foreach",
                ctx),
    ]
    return res


# -- (g) host-to-device prefetch ------------------------------------------------------------------

def copy_time(host: list[Batch], device: torch.device) -> float:
    """Seconds per batch to copy `host` to the device, one after another (synchronized)."""
    sync(device)
    start = time.perf_counter()
    for x, y in host:
        x.to(device, non_blocking=x.is_pinned())
        y.to(device, non_blocking=y.is_pinned())
    sync(device)
    return (time.perf_counter() - start) / len(host)


def section_prefetch(ctx: Ctx) -> dict[str, Any]:
    cfg, device, n = ctx.cfg, ctx.device, ctx.cfg.pf_batches
    sizes = [cfg.pf_features, cfg.pf_hidden, cfg.pf_hidden, 10]
    host = labelled(n, cfg.pf_batch, cfg.pf_features, torch.device("cpu"), seed=4)
    resident = [(x.to(device), y.to(device)) for x, y in host]
    pinned = [(x.pin_memory(), y.pin_memory()) for x, y in host] if ctx.cuda else None

    def hand(data: Any, move: bool = False) -> Variant:
        model = mlp(sizes).to(device)
        return hand_loop(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True),
                         data, device, n, move=move)

    def fitting(data: Any) -> Variant:
        return fit_variant(lambda: ft.train_step(mlp_loss), lambda: ft.TrainState.create(
            mlp(sizes), ft.optim.adam(1e-3), seed=0), data, device, n, keep=True)

    variants: dict[str, Variant] = {
        "hand on device": hand(resident),
        "hand blocking copy": hand(host, move=True),
        "hand prefetch": hand(lambda: prefetch(host, device)),
        "ft.fit on device": fitting(resident),
        "ft.fit host batches": fitting(host),
    }
    if pinned is not None:
        variants["hand pinned copy"] = hand(pinned, move=True)
        variants["hand prefetch pinned"] = hand(lambda: prefetch(pinned, device))
    res = time_variants(variants, ctx, n, units=cfg.pf_batch)
    res["copy_pageable_s"] = copy_time(host, device)
    res["copy_pinned_s"] = copy_time(pinned, device) if pinned is not None else None
    mb = host[0][0].numel() * host[0][0].element_size() / 1e6
    res["rows"] = [
        row(f"H2D copy of one batch ({mb:.3g} MB): pageable vs pinned",
            fmt_time(res["copy_pageable_s"]), fmt_time(res["copy_pinned_s"]), "", "info",
            f"step on device {fmt_time(per_step(res, 'hand on device'))}"),
        compare(res, "host batches: hand prefetch vs blocking copy", "hand prefetch",
                "hand blocking copy", ctx),
        compare(res, "host batches: hand prefetch vs data on device (1.0 = copy hidden)",
                "hand prefetch", "hand on device", ctx),
        compare(res, "host batches: ft.fit vs ft.fit on device (1.0 = copy hidden)",
                "ft.fit host batches", "ft.fit on device", ctx),
    ]
    if pinned is not None:
        res["rows"].insert(2, compare(res, "pinned host batches: hand prefetch vs inline "
                                      "non-blocking copy", "hand prefetch pinned",
                                      "hand pinned copy", ctx))
    return res


# -- (h) DDP, one GPU per process ------------------------------------------------------------------

def section_ddp(ctx: Ctx) -> dict[str, Any]:
    world = 2 if ctx.smoke else min(torch.cuda.device_count(), 8)
    with tempfile.TemporaryDirectory(prefix="ftrain-gpu-ddp-") as tmp:
        out = os.path.join(tmp, "ddp.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", str(Path(__file__).resolve()), "--ddp-worker",
               out, "--rounds", str(ctx.cfg.rounds)]
        if ctx.smoke:
            cmd.append("--cpu-smoke")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH"))
                                            if p)
        print(f"  {world} processes: " + " ".join(cmd[3:]), flush=True)
        code, output = run_child(cmd, max(ctx.deadline - time.monotonic(), 5.0), env)
        if code != 0 or not os.path.exists(out):
            tail = output.strip()[-3000:]
            print("  " + tail.replace("\n", "\n  "), flush=True)
            return {"exit_code": code, "output_tail": tail, "rows": [row(
                f"DDP {world} GPUs: ft.with_ddp vs hand DDP (bf16 GPT)",
                "timed out" if code == -9 else f"ERROR (exit code {code})", "", "",
                f">= {TARGET:.2f}x", "FAIL")]}
        with open(out) as f:
            res: dict[str, Any] = json.load(f)
    for name, v in res["variants"].items():
        print(f"  {name:<20} {fmt_time(v['s_per_step'])}/step", flush=True)
    res["rows"] = [compare(res, f"DDP {world} {'CPU processes' if ctx.smoke else 'GPUs'}: "
                           "ft.with_ddp vs hand DDP (bf16 GPT, per rank)", "ft DDP",
                           "hand DDP", ctx, TARGET)]
    return res


def ddp_worker(out: str, rounds: int, smoke: bool) -> None:
    """One rank under torch.distributed.run: time ft.with_ddp and hand DDP; rank 0 writes
    the rounds to `out`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(minutes=5))
    cfg = replace(SMOKE if smoke else FULL, rounds=rounds)
    every = gpt_data(cfg, device, cfg.epoch_batches * world)  # the same on every rank
    mine = every[rank::world]  # what with_ddp deals this rank (whole batches, in turn)
    e = len(mine)

    def barrier() -> None:
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()

    def ft_run(epochs: int) -> float:
        step = ft.with_ddp(ft.with_amp(ft.train_step(gpt_loss), torch.bfloat16))
        state = ft.TrainState.create(make_gpt(cfg), ft.optim.adamw(
            LR, weight_decay=WEIGHT_DECAY), seed=0).to(device)
        barrier()
        start = time.perf_counter()
        state = ft.fit(step, state, every, epochs=epochs, **OFF)
        barrier()
        if state.step != epochs * e:
            raise RuntimeError(f"ft ran {state.step} steps on rank {rank}")
        return time.perf_counter() - start

    def hand_run(epochs: int) -> float:
        model = make_gpt(cfg).to(device)
        ddp = DistributedDataParallel(model, device_ids=[local] if cuda else None)
        opt = torch.optim.AdamW(ddp.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                fused=True)
        barrier()
        start = time.perf_counter()
        for _ in range(epochs):
            for batch in mine:
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = gpt_loss(ddp, batch)
                loss.backward()
                opt.step()
        barrier()
        return time.perf_counter() - start

    ctx = Ctx(device, cfg, math.inf, smoke)  # a fixed number of rounds: ranks agree
    res = time_variants({"ft DDP": ft_run, "hand DDP": hand_run}, ctx, e,
                        units=cfg.batch * cfg.seq * world)
    if rank == 0:
        res["world"] = world
        with open(out, "w") as f:
            json.dump(res, f, default=str)
    dist.destroy_process_group()


# -- the run --------------------------------------------------------------------------------------

SECTIONS: list[tuple[str, str, Callable[[Ctx], dict[str, Any]]]] = [
    ("tests", "CUDA-only tests", section_tests),
    ("convergence", "(a) convergence under with_amp", section_convergence),
    ("sync_free", "(b) no host sync between steps", section_sync_free),
    ("gpt_bf16", "(c) bf16 LM: ft.with_amp vs hand autocast vs Lightning",
     lambda ctx: section_gpt(ctx, torch.bfloat16)),
    ("graphs", "(e) CUDA graphs: tiny MLP", section_graphs),
    ("fused", "(f) fused optimizer kernels", section_fused),
    ("prefetch", "(g) host-to-device prefetch", section_prefetch),
    ("gpt_fp16", "(d) fp16 LM: ft loss scaler vs GradScaler",
     lambda ctx: section_gpt(ctx, torch.float16)),
    ("ddp", "(h) DDP, one GPU per process", section_ddp),
    ("mfu", "(i) with_throughput on the bf16 LM: MFU and its cost", section_mfu),
]


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "ftrain": ft.__version__,
                           "python": sys.version.split()[0], "device": str(device)}
    try:
        import lightning
        env["lightning"] = lightning.__version__
    except Exception as err:
        env["lightning"] = f"unavailable: {type(err).__name__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env.update(gpu=None, gpus=0)
    return env


def table(results: dict[str, Any], budget_s: float, note: str = "") -> str:
    env = results.get("environment", {})
    head = (f"ftrain GPU summary: {env.get('gpu') or 'CPU (smoke run)'} x{env.get('gpus', 0)}"
            f", torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"{results.get('elapsed_s', 0):.0f} s of {budget_s:.0f} s{note}")
    rows: list[dict[str, str]] = []
    for key, title, _ in SECTIONS:
        sec = results["sections"].get(key)
        if sec is None:
            if key in results.get("planned", ()):
                rows.append(row(title, result="not run (cut off at the time budget)"))
            continue
        if "rows" in sec:
            rows += sec["rows"]
        elif "skipped" in sec:
            rows.append(row(title, result=f"skipped ({sec['skipped']})"))
        elif "error" in sec:
            rows.append(row(title, sec["error"][:80], result="ERROR"))
    cols = ["check", "ftrain", "reference", "ratio", "target", "result"]
    names = ["check", "ftrain", "reference", "ratio (median, range)", "target", "result"]
    lines = [head, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_results.json", help="JSON summary path")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="every section's code on the CPU at tiny sizes")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5)")
    parser.add_argument("--max-minutes", type=float, default=8.0,
                        help="time budget of the whole run (default 8)")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections: " + ",".join(k for k, _, _ in SECTIONS))
    parser.add_argument("--with-compile", action="store_true",
                        help="with --cpu-smoke: run ft.compile in (e) too (a minute on a CPU)")
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.ddp_worker is not None:
        ddp_worker(args.ddp_worker, args.rounds or FULL.rounds, args.cpu_smoke)
        return
    keys = [k for k, _, _ in SECTIONS]
    only = keys if args.only is None else [k.strip() for k in args.only.split(",")]
    unknown = sorted(set(only) - set(keys))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {keys}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu.py: no CUDA device (torch.cuda.is_available() is False); nothing to run. "
              "Run it on a GPU machine, or with --cpu-smoke to exercise the code on the CPU.")
        return
    logging.getLogger("torch").setLevel(logging.ERROR)
    budget_s = args.max_minutes * 60
    began = time.monotonic()
    end = began + budget_s - RESERVE_S
    cfg = SMOKE if args.cpu_smoke else FULL
    if args.rounds is not None:
        cfg = replace(cfg, rounds=args.rounds)
    device = torch.device("cpu") if args.cpu_smoke else ft.local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # a smoke run on a shared machine: no oversubscription
    results: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                               "config": asdict(cfg), "planned": only, "sections": {}}
    lock = threading.Lock()
    finished: list[bool] = []  # set once the table is printed: the watchdog stands down

    def save() -> None:
        results["elapsed_s"] = time.monotonic() - began
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    def overrun() -> None:  # the watchdog: the table of what was measured, then out
        with lock:
            if finished:
                return
            results["elapsed_s"] = time.monotonic() - began
            print("\n" + table(results, budget_s, "; CUT OFF at the time budget"), flush=True)
            with contextlib.suppress(Exception):
                save()
            os._exit(3)

    watchdog = threading.Timer(budget_s, overrun)
    watchdog.daemon = True
    watchdog.start()
    faulthandler.dump_traceback_later(budget_s + 30, exit=True)  # the GIL held: still out
    results["environment"] = env = environment(device)
    print(f"device: {env.get('gpu') or 'cpu'} x{env['gpus']} ({device}); torch "
          f"{torch.__version__}, CUDA {env.get('cuda')}, ftrain {ft.__version__}, "
          f"lightning {env['lightning']}; budget {budget_s:.0f} s", flush=True)
    if args.cpu_smoke:
        print("--cpu-smoke: tiny sizes on the CPU; the timings mean nothing", flush=True)
    weights = {k: WEIGHTS[k] for k in only}
    if not args.cpu_smoke and env["gpus"] < 2:
        weights.pop("ddp", None)
        if "ddp" in only:
            results["sections"]["ddp"] = {"skipped": "one GPU; needs two or more"}
    if not torch.cuda.is_available() or args.cpu_smoke:
        weights.pop("sync_free", None)
        if "sync_free" in only:
            results["sections"]["sync_free"] = {"skipped": "needs CUDA"}
    for key, title, fn in SECTIONS:
        if key not in weights:
            continue
        now = time.monotonic()
        share = (end - now) * weights[key] / sum(weights.values())
        del weights[key]
        print(f"\n== {title} (up to {share:.0f} s) ==", flush=True)
        if share < MIN_SECONDS.get(key, 5):
            results["sections"][key] = {"skipped": "not run: time budget"}
            print("  not run: too little time left", flush=True)
            continue
        start = time.monotonic()
        try:
            ctx = Ctx(device, cfg, now + share, args.cpu_smoke,
                      compile=not args.cpu_smoke or args.with_compile)
            results["sections"][key] = fn(ctx)
        except Exception as err:
            results["sections"][key] = error_record(err)
            print(f"  ERROR {results['sections'][key]['error']}\n  " +
                  results["sections"][key]["traceback"].strip().replace("\n", "\n  "),
                  flush=True)
        finally:
            if device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.set_sync_debug_mode("default")
        results["sections"][key]["section_s"] = time.monotonic() - start
        save()
    with lock:
        finished.append(True)
        watchdog.cancel()
        faulthandler.cancel_dump_traceback_later()
        save()
        print("\n" + table(results, budget_s), flush=True)
        print(f"\nresults written to {os.path.abspath(args.out)}", flush=True)


if __name__ == "__main__":
    main()
