"""GPU checks and timings of ftrain's mixed precision, prepared to run once on a lent GPU.

Without CUDA the script says so and exits with status 0 (`--cpu-smoke` exercises the code
paths on the CPU at tiny sizes instead). Each section runs under its own try/except: an
error is printed, recorded in the JSON summary and the next section runs. The summary is
written to `--out` (default `gpu_results.json`) after every section, so a run cut short
still leaves what it measured.

(a) Convergence: an MLP 32-256-256-10 learns a fixed random linear teacher's labels
(cross-entropy, batch 256, `ft.optim.adam(1e-3)`, 400 steps through `ft.iterate` over 64
batches already on the GPU) under `ft.with_amp(step, torch.bfloat16)` and under
`ft.with_amp(step, torch.float16)` (its loss scaler with `growth_interval=50`, so the
scale both grows and backs off within the run). Pass: every loss finite and the mean of
the last 20 losses below half the mean of the first 20. The final loss scale and the
number of skipped (overflowing) steps are reported for float16.

(b) No host sync in non-logging steps: the same MLP, `ft.iterate` with no logger,
checkpoint or progress bar, data a list of batches on the GPU. After 16 warm-up steps,
1,040 steps run under `torch.cuda.set_sync_debug_mode("error")` (they include the loop's
fold of pending losses, every 1,024 steps, and no epoch end); any synchronizing CUDA call
raises, and the error with its traceback is recorded. The same steps then run under "warn"
mode in a fresh loop, counting sync warnings by call site. Done for a plain `train_step`,
bfloat16 and float16 (loss scaler), and (info) for bfloat16 under
`ft.with_logging(step, [CSV], every_n_steps=10**6)`: the steps between a logging run's
intervals.

(c) bfloat16 speed: a GPT-style decoder (6 layers, d=512, 8 heads, MLP 4d with GELU,
pre-LayerNorm, learned positions, untied head, causal `F.scaled_dot_product_attention`;
vocab 8192, sequence 256, batch 16, ~27M parameters) on random tokens, AdamW lr 3e-4,
weight decay 0.01:

- ft: `ft.fit(ft.with_amp(ft.train_step(loss), torch.bfloat16), state, data, epochs=k,
  logger=False, checkpoint=False, progress=False)`, `ft.optim.adamw` (torch's fused
  kernel on CUDA),
- hand: `torch.autocast("cuda", torch.bfloat16)` around forward and loss,
  `torch.optim.AdamW(fused=True)`, zero_grad(set_to_none) / backward / step,
- Lightning: `Trainer(precision="bf16-mixed", accelerator="gpu", devices=1, logger=False,
  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
  max_epochs=k)`, `configure_optimizers` returning `torch.optim.AdamW(fused=True)`,
  `training_step` returning the loss (nothing logged).

(d) float16 speed: the same model, ft with `ft.with_amp(..., torch.float16)` (ftrain's
loss scaler) against a hand loop with `torch.amp.GradScaler("cuda")` (scale, backward,
`scaler.step(opt)` on fused AdamW, update).

Timing method (c, d): every variant is fed the same list of E = 40 batches already on the
GPU, and each call trains a fresh model (built, moved to the GPU and given its optimizer
outside the timed region; for Lightning `Trainer(...)` and `trainer.fit` are timed, its
teardown moving the model back to the CPU included). A call is timed with
`torch.cuda.synchronize()` before starting the clock and before stopping it. Steady state:
per step = (t(k2 epochs) - t(k1 = 1 epoch)) / ((k2 - k1) x E), with k2 = 6 and t(k1) the
faster of 2 calls, so start-up and teardown cancel; start-up = t(k1) - E x per step. One
warm-up call per variant first (CUDA context, cuBLAS, attention kernels, lazy imports),
then R = 5 rounds with the variants interleaved and their order rotating; medians over
rounds, ratios as medians of per-round ratios (paired) with their range. Peak allocated
GPU memory of each call is recorded too. Rounds stop early if the time budget
(`--max-minutes`, default 5) would be exceeded. Target: ft / hand >= 0.97x in bfloat16.

Run from the repository root: `PYTHONPATH=. python benchmarks/gpu.py --out
$OUT/gpu_results.json` (expected 2-3 minutes on an H100 or H200, 5 at most by the budget;
PYTHONPATH only where ftrain is not installed), or `python benchmarks/gpu.py --cpu-smoke
--out /tmp/gpu_smoke.json` on the CPU (sections a, c and d at tiny sizes: 2 layers, d=64,
sequence 32, 4 batches per epoch, one round; seconds; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _common import GPT, Batches, sync
from _common import loss_fn as mlp_loss
from torch import nn

import ftrain as ft

Batch = tuple[torch.Tensor, torch.Tensor]

BF16_TARGET = 0.97  # ft bf16 steps/s >= 0.97x the hand-written autocast loop
LR, WEIGHT_DECAY = 3e-4, 0.01


@dataclass(frozen=True)
class Config:
    vocab: int
    seq: int
    d: int
    heads: int
    layers: int
    batch: int
    epoch_batches: int  # E: batches per epoch
    extra_epochs: int  # k2 - k1
    rounds: int
    mlp_steps: int  # section (a)


FULL = Config(vocab=8192, seq=256, d=512, heads=8, layers=6, batch=16, epoch_batches=40,
              extra_epochs=5, rounds=5, mlp_steps=400)
SMOKE = Config(vocab=256, seq=32, d=64, heads=4, layers=2, batch=4, epoch_batches=4,
               extra_epochs=1, rounds=1, mlp_steps=150)


# -- the GPT-style model ------------------------------------------------------------------

def make_gpt(cfg: Config) -> GPT:
    torch.manual_seed(0)  # every variant starts from the same weights
    return GPT(cfg.vocab, cfg.seq, cfg.d, cfg.layers, cfg.heads)


def gpt_data(cfg: Config, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(cfg.epoch_batches):
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=g)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def gpt_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# -- the MLP of sections (a) and (b) --------------------------------------------------------

def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def mlp_data(n: int, batch: int, device: torch.device) -> list[Batch]:
    """Batches labelled by a fixed random linear teacher: learnable, so the loss falls."""
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(32, 10, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 32, generator=g)
        out.append((x.to(device), (x @ teacher).argmax(1).to(device)))
    return out


# -- helpers ----------------------------------------------------------------------------------

def error_record(err: BaseException) -> dict[str, Any]:
    """An error for the JSON: its message, the messages of its causes and contexts (the
    first one is usually the root), and the formatted traceback."""
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


def iterate_all(step: Any, state: ft.TrainState, data: list[Batch], max_steps: int
                ) -> tuple[ft.TrainState, list[torch.Tensor]]:
    """Run `ft.iterate` to the end: the final state (the loop's return value) and the
    per-step losses (device tensors; no sync here)."""
    gen = ft.iterate(step, state, data, max_steps=max_steps)
    losses = []
    while True:
        try:
            _, metrics = next(gen)
        except StopIteration as done:
            return done.value, losses
        losses.append(metrics["loss"])


def amp_step(loss: Callable[[Any, Any], torch.Tensor], dtype: torch.dtype | None,
             **kwargs: Any) -> Any:
    step = ft.train_step(loss)
    return step if dtype is None else ft.with_amp(step, dtype, **kwargs)


# -- (a) convergence ----------------------------------------------------------------------------

def converge(device: torch.device, dtype: torch.dtype, steps: int) -> dict[str, Any]:
    data = mlp_data(64, 256, device)
    scaler = {"growth_interval": 50} if dtype == torch.float16 else {}
    step = amp_step(mlp_loss, dtype, **scaler)
    state = ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3), seed=0).to(device)
    start = time.perf_counter()
    state, losses = iterate_all(step, state, data, steps)
    values = torch.stack(losses).float().cpu().tolist()
    elapsed = time.perf_counter() - start
    k = min(20, max(1, steps // 4))
    first, last = statistics.fmean(values[:k]), statistics.fmean(values[-k:])
    finite = all(math.isfinite(v) for v in values)
    res: dict[str, Any] = {"steps": state.step, "first_loss": first, "last_loss": last,
                           "all_finite": finite, "passed": finite and last < 0.5 * first,
                           "seconds": elapsed}
    if dtype == torch.float16:
        res["loss_scale"] = ft.loss_scale(state)
        res["skipped_steps"] = int(state.slots["amp"]["skipped"])
        res["growth_interval"] = 50
    if state.step != steps:
        raise RuntimeError(f"ran {state.step} steps, expected {steps}")
    return res


def section_convergence(device: torch.device, dtypes: list[torch.dtype], steps: int
                        ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in dtypes:
        name = dtype_name(dtype)
        try:
            res = converge(device, dtype, steps)
            scale = (f", final loss scale {res['loss_scale']:g}, {res['skipped_steps']} "
                     "skipped step(s)") if "loss_scale" in res else ""
            print(f"  {name}: loss {res['first_loss']:.3f} -> {res['last_loss']:.3f} in "
                  f"{res['steps']} steps{scale}   {'PASS' if res['passed'] else 'FAIL'}",
                  flush=True)
        except Exception as err:
            res = error_record(err)
            print(f"  {name}: ERROR {res['error']}", flush=True)
        out[name] = res
    return out


# -- (b) no host sync ---------------------------------------------------------------------------

SYNC_WARMUP, SYNC_CHECKED = 16, 1040


def sync_run(device: torch.device, dtype: torch.dtype | None, mode: str,
             log_dir: str | None = None) -> dict[str, Any]:
    """SYNC_WARMUP steps, then SYNC_CHECKED under sync debug `mode` ("error" or "warn");
    with `log_dir`, under `with_logging` whose interval no checked step reaches."""
    total = SYNC_WARMUP + SYNC_CHECKED
    data = mlp_data(total + 8, 64, device)  # longer than the run: no epoch end inside
    step = amp_step(mlp_loss, dtype)
    if log_dir is not None:
        step = ft.with_logging(step, [ft.loggers.CSV(log_dir)], every_n_steps=10**6)
    state = ft.TrainState.create(make_mlp(), ft.optim.adam(1e-3), seed=0).to(device)
    gen = ft.iterate(step, state, data, max_steps=len(data))
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
        torch.cuda.synchronize(device)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # restored when the block ends
            torch.cuda.set_sync_debug_mode(mode)
            try:
                for _ in range(SYNC_CHECKED):
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


def section_sync_free(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    configs = [(dtype_name(d), d, False) for d in (None, torch.bfloat16, torch.float16)]
    configs.append(("bf16+logging", torch.bfloat16, True))  # info: a logging run's other steps
    for name, dtype, logging_on in configs:
        try:
            with tempfile.TemporaryDirectory(prefix="ftrain-gpu-") as tmp:
                strict = sync_run(device, dtype, "error", tmp if logging_on else None)
                diag = sync_run(device, dtype, "warn", tmp if logging_on else None)
            passed = "error" not in strict and strict["checked_steps"] == SYNC_CHECKED and \
                "error" not in diag and diag["sync_warnings"] == 0
            res = {"passed": passed, "error_mode": strict, "warn_mode": diag}
            line = f"  {name}: {strict['checked_steps']}/{SYNC_CHECKED} steps without a sync " \
                   f"(error mode); {diag.get('sync_warnings', '?')} sync warning(s) (warn " \
                   f"mode)   {'PASS' if passed else 'FAIL'}"
            print(line, flush=True)
            if "error" in strict:
                print(f"    error: {strict['error']}", flush=True)
                print("    " + strict["traceback"].strip().replace("\n", "\n    ")[-3000:],
                      flush=True)
            for site, count in diag.get("sites", {}).items():
                print(f"    {count} x {site}", flush=True)
                if site in diag.get("stacks", {}):
                    print("      " + diag["stacks"][site].strip().replace("\n", "\n      "),
                          flush=True)
        except Exception as err:
            res = error_record(err)
            print(f"  {name}: ERROR {res['error']}", flush=True)
        out[name] = res
    return out


# -- (c, d) timing ------------------------------------------------------------------------------

Variant = Callable[[int], float]  # epochs -> seconds of the timed region


def ft_variant(cfg: Config, data: list[Batch], device: torch.device, dtype: torch.dtype
               ) -> Variant:
    def run(epochs: int) -> float:
        state = ft.TrainState.create(make_gpt(cfg), ft.optim.adamw(LR, weight_decay=WEIGHT_DECAY),
                                     seed=0).to(device)
        step = ft.with_amp(ft.train_step(gpt_loss), dtype)
        sync(device)
        start = time.perf_counter()
        state = ft.fit(step, state, data, epochs=epochs, logger=False, checkpoint=False,
                       progress=False)
        sync(device)
        elapsed = time.perf_counter() - start
        if state.step != epochs * len(data):
            raise RuntimeError(f"ft ran {state.step} steps, expected {epochs * len(data)}")
        return elapsed
    return run


def hand_variant(cfg: Config, data: list[Batch], device: torch.device, dtype: torch.dtype
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


def lightning_variant(cfg: Config, data: list[Batch], device: torch.device) -> Variant:
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

    accelerator = "gpu" if device.type == "cuda" else "cpu"

    def run(epochs: int) -> float:
        module = LitGPT()
        sync(device)
        start = time.perf_counter()
        trainer = L.Trainer(max_epochs=epochs, precision="bf16-mixed",
                            accelerator=accelerator, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, train_dataloaders=Batches(data))
        sync(device)
        elapsed = time.perf_counter() - start
        if trainer.global_step != epochs * len(data):
            raise RuntimeError(f"Lightning ran {trainer.global_step} steps, expected "
                               f"{epochs * len(data)}")
        return elapsed
    return run


def time_variants(variants: dict[str, Variant], cfg: Config, device: torch.device,
                  deadline: float) -> dict[str, Any]:
    """Warm-up call per variant, then interleaved rounds; a failing variant is recorded
    and dropped, the others go on."""
    e, x = cfg.epoch_batches, cfg.extra_epochs
    errors: dict[str, Any] = {}
    alive = list(variants)

    def call(name: str, epochs: int) -> tuple[float, int]:
        gc.collect()  # garbage of the previous call (Lightning's cycles) is not charged here
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
    stopped_early = False
    last_round = 0.0
    for r in range(cfg.rounds):
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
            per = (t2 - t1) / (x * e)
            record[name] = {"per_step_s": per, "startup_s": t1 - e * per, "peak_bytes": peak}
        alive = [n for n in alive if n not in errors]
        rounds.append(record)
        last_round = time.monotonic() - began
        print(f"  round {r + 1}/{cfg.rounds} ms/step: " +
              ", ".join(f"{n} {v['per_step_s'] * 1e3:.3f}" for n, v in record.items()),
              flush=True)
    summary: dict[str, Any] = {}
    for name in variants:
        per = [rd[name]["per_step_s"] for rd in rounds if name in rd]
        if not per:
            continue
        summary[name] = {
            "ms_per_step": statistics.median(per) * 1e3,
            "steps_per_s": statistics.median(1 / p for p in per),
            "tokens_per_s": statistics.median(cfg.batch * cfg.seq / p for p in per),
            "startup_s": statistics.median(rd[name]["startup_s"] for rd in rounds
                                           if name in rd),
            "peak_mib": (statistics.median(rd[name]["peak_bytes"] for rd in rounds
                                           if name in rd) / 2**20
                         if device.type == "cuda" else None),
            "rounds_ms_per_step": [p * 1e3 for p in per],
        }
    return {"variants": summary, "rounds": rounds, "errors": errors,
            "warmup_s": warm, "stopped_early": stopped_early}


def ratio(result: dict[str, Any], a: str, b: str) -> dict[str, float] | None:
    """Speed of a over b: median, min and max of the per-round ratios."""
    r = [rd[b]["per_step_s"] / rd[a]["per_step_s"] for rd in result["rounds"]
         if a in rd and b in rd]
    if not r:
        return None
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": len(r)}


def show_timing(result: dict[str, Any]) -> None:
    for name, v in result["variants"].items():
        peak = "n/a" if v["peak_mib"] is None else f"{v['peak_mib']:.0f} MiB"
        print(f"  {name:<20} {v['ms_per_step']:8.3f} ms/step  {v['steps_per_s']:7.1f} steps/s  "
              f"{v['tokens_per_s']:9.0f} tokens/s  start-up {v['startup_s']:6.3f} s  "
              f"peak GPU memory {peak}", flush=True)


def show_ratio(label: str, r: dict[str, float] | None, note: str) -> None:
    if r is None:
        print(f"  {label:<28} n/a (a variant failed)", flush=True)
        return
    print(f"  {label:<28} {r['median']:6.3f}x (rounds {r['min']:.3f}-{r['max']:.3f}, "
          f"n={r['rounds']})   {note}", flush=True)


def section_bf16(cfg: Config, data: list[Batch], device: torch.device, deadline: float
                 ) -> dict[str, Any]:
    variants: dict[str, Variant] = {
        "ft bf16": ft_variant(cfg, data, device, torch.bfloat16),
        "hand bf16": hand_variant(cfg, data, device, torch.bfloat16),
    }
    lightning_error = None
    try:
        variants["Lightning bf16"] = lightning_variant(cfg, data, device)
    except Exception as err:
        lightning_error = error_record(err)
        print(f"  Lightning unavailable: {lightning_error['error']}", flush=True)
    res = time_variants(variants, cfg, device, deadline)
    if lightning_error is not None:
        res["errors"]["Lightning bf16"] = lightning_error
    res["ft/hand"] = ratio(res, "ft bf16", "hand bf16")
    res["ft/Lightning"] = ratio(res, "ft bf16", "Lightning bf16")
    res["target"] = BF16_TARGET
    res["passed"] = res["ft/hand"] is not None and res["ft/hand"]["median"] >= BF16_TARGET
    show_timing(res)
    verdict = ("PASS" if res["passed"] else "FAIL") if device.type == "cuda" else \
        "(CPU smoke run: not a measurement)"
    show_ratio("ft / hand (bf16)", res["ft/hand"], f"target >= {BF16_TARGET}x   {verdict}")
    show_ratio("ft / Lightning (bf16)", res["ft/Lightning"], "info")
    return res


def section_fp16(cfg: Config, data: list[Batch], device: torch.device, deadline: float
                 ) -> dict[str, Any]:
    variants: dict[str, Variant] = {
        "ft fp16": ft_variant(cfg, data, device, torch.float16),
        "hand fp16 GradScaler": hand_variant(cfg, data, device, torch.float16),
    }
    res = time_variants(variants, cfg, device, deadline)
    res["ft/hand"] = ratio(res, "ft fp16", "hand fp16 GradScaler")
    show_timing(res)
    show_ratio("ft / hand (fp16)", res["ft/hand"],
               f"info (the bf16 target is {BF16_TARGET}x)")
    return res


# -- entry ----------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "ftrain": ft.__version__,
                           "python": sys.version.split()[0], "device": str(device)}
    try:
        import lightning
        env["lightning"] = lightning.__version__
    except Exception as err:  # recorded, the Lightning variant reports it too
        env["lightning"] = f"unavailable: {type(err).__name__}: {err}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported())
    else:
        env["gpu"] = None
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_results.json", help="JSON summary path")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run sections a (bf16, fp16), c and d on the CPU at tiny sizes")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5)")
    parser.add_argument("--max-minutes", type=float, default=5.0,
                        help="time budget; timing rounds stop early to keep within it")
    args = parser.parse_args()

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu.py: no CUDA device (torch.cuda.is_available() is False); nothing to run. "
              "Run it on a GPU machine, or with --cpu-smoke to exercise the code paths on "
              "the CPU.")
        return
    began = time.monotonic()
    deadline = began + args.max_minutes * 60
    cfg = SMOKE if args.cpu_smoke else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        cfg = Config(**{**asdict(cfg), "rounds": args.rounds})
    device = torch.device("cpu") if args.cpu_smoke else ft.local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                               "config": asdict(cfg), "sections": {}}

    def save() -> None:
        results["elapsed_s"] = time.monotonic() - began
        directory = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(directory, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    def section(key: str, title: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"\n== {title} ==", flush=True)
        start = time.monotonic()
        try:
            results["sections"][key] = fn()
        except Exception as err:
            results["sections"][key] = error_record(err)
            print(f"  ERROR {results['sections'][key]['error']}", flush=True)
            print("  " + results["sections"][key]["traceback"].strip().replace("\n", "\n  "),
                  flush=True)
        finally:
            if device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.set_sync_debug_mode("default")
        results["sections"][key]["section_s"] = time.monotonic() - start
        save()

    try:
        results["environment"] = environment(device)
    except Exception as err:
        results["environment"] = error_record(err)
    env = results["environment"]
    print(f"device: {env.get('gpu') or 'cpu'} ({device}); torch {torch.__version__}, "
          f"CUDA {env.get('cuda')}, ftrain {ft.__version__}, lightning "
          f"{env.get('lightning')}", flush=True)
    if args.cpu_smoke:
        print("--cpu-smoke: tiny sizes on the CPU; the timings mean nothing", flush=True)
    n_params = sum(p.numel() for p in make_gpt(cfg).parameters())
    results["gpt_params"] = n_params
    print(f"GPT: {cfg.layers} layers, d={cfg.d}, {cfg.heads} heads, seq {cfg.seq}, vocab "
          f"{cfg.vocab}, batch {cfg.batch}: {n_params / 1e6:.1f}M parameters; E = "
          f"{cfg.epoch_batches} batches per epoch, k1 = 1, k2 = {1 + cfg.extra_epochs} "
          f"epochs, {cfg.rounds} round(s)", flush=True)
    save()

    section("convergence", "(a) convergence under with_amp (MLP, ft.iterate)",
            lambda: section_convergence(device, [torch.bfloat16, torch.float16],
                                        cfg.mlp_steps))
    if device.type == "cuda":
        section("sync_free", "(b) no host sync in non-logging steps (ft.iterate)",
                lambda: section_sync_free(device))
    else:
        results["sections"]["sync_free"] = {"skipped": "needs CUDA"}
        print("\n== (b) no host sync: skipped (needs CUDA) ==", flush=True)
    data: list[Batch] = []

    def bf16() -> dict[str, Any]:
        data.extend(gpt_data(cfg, device))
        # (c) gets ~60% of the time left, (d) the rest
        return section_bf16(cfg, data, device,
                            time.monotonic() + 0.6 * (deadline - time.monotonic()))

    def fp16() -> dict[str, Any]:
        if not data:
            data.extend(gpt_data(cfg, device))
        return section_fp16(cfg, data, device, deadline)

    section("gpt_bf16", "(c) GPT bfloat16: ft vs hand autocast loop vs Lightning", bf16)
    section("gpt_fp16", "(d) GPT float16: ft loss scaler vs hand loop with GradScaler", fp16)

    s = results["sections"]
    checks = {
        "convergence bf16": s["convergence"].get("bf16", {}).get("passed"),
        "convergence fp16": s["convergence"].get("fp16", {}).get("passed"),
        "sync-free fp32": s["sync_free"].get("fp32", {}).get("passed"),
        "sync-free bf16": s["sync_free"].get("bf16", {}).get("passed"),
        "sync-free fp16": s["sync_free"].get("fp16", {}).get("passed"),
        "sync-free bf16+logging": s["sync_free"].get("bf16+logging", {}).get("passed"),
        # the smoke run's timings (4 steps apart, CPU) check nothing
        f"ft/hand bf16 >= {BF16_TARGET}": None if args.cpu_smoke else
        s["gpt_bf16"].get("passed"),
    }
    results["checks"] = checks
    save()
    print(f"\n== summary ({env.get('gpu') or 'cpu'}, {results['elapsed_s']:.0f} s) ==")
    for name, ok in checks.items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[ok]
        print(f"  {name:<26} {verdict}")
    for key in ("gpt_bf16", "gpt_fp16"):
        for name in ("ft/hand", "ft/Lightning"):
            value = s[key].get(name)
            if value:
                print(f"  {key} {name:<13} {value['median']:.3f}x (rounds "
                      f"{value['min']:.3f}-{value['max']:.3f})")
    print(f"results written to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
