"""`with_throughput`: samples/s, tokens/s, achieved TFLOP/s, MFU, data wait and peak memory.

Every `every_n_steps` steps the layer adds, for the steps since its last report:

- `throughput/samples_per_s` (and `tokens_per_s` with `tokens=`): over all ranks;
- `throughput/tflops` and, where the device's peak is known, `throughput/mfu`: the
  model FLOPs done per second per device (from `flops_per_sample`, or counted once by
  `torch.utils.flop_counter` on the first batch: forward and backward, a direct call on
  a copy of the state) against the device's dense peak for the compute dtype;
- `throughput/step_s` (inside the step) and `throughput/data_s` (between steps: data
  loading and the loop), means per step;
- `throughput/peak_mem_mb`: the device's peak allocated memory (CUDA), or the process's
  peak RSS on the CPU.

Cost: per step, two clock reads (CUDA: two events recorded, no sync) and a batch-size
count on the host; at a report, one device sync (CUDA) to read the events.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch

from ftrain.core import context
from ftrain.core.layer import Combinator, Metrics
from ftrain.core.state import TrainState
from ftrain.data.batches import batch_size
from ftrain.errors import ConfigError, check_int

# Dense (no sparsity) peak FLOP/s by device-name fragment and compute dtype, from the
# vendors' datasheets (their headline tensor-core numbers assume 2:4 sparsity: halved).
PEAK_FLOPS: dict[str, dict[torch.dtype, float]] = {
    "h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12},
    "h100 pcie": {torch.bfloat16: 756.5e12, torch.float16: 756.5e12,
                  torch.float32: 378e12},
    "h100": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12},
    "a100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},
    "l4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 60e12},
    "v100": {torch.float16: 125e12, torch.float32: 15.7e12},
    "t4": {torch.float16: 65e12, torch.float32: 8.1e12},
}
PREFIX = "throughput/"


def device_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The dense peak FLOP/s of `device` for `dtype` from `PEAK_FLOPS`, or None.

    Examples:
        >>> import torch
        >>> device_peak(torch.device("cpu"), torch.float32) is None
        True
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for fragment, table in PEAK_FLOPS.items():  # the most specific fragments come first
        if fragment in name:
            return table.get(dtype)
    return None


class _Run:
    """Clocks of one loop run (kept in its binding, never in the state)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.since = time.perf_counter()  # the last report
        self.left = self.since  # when the previous step returned
        self.data = 0.0
        self.inside = 0.0
        self.events: list[tuple[Any, Any]] = []
        self.steps = 0
        self.samples = 0
        self.tokens = 0


class WithThroughput(Combinator):
    """The combinator built by `with_throughput`."""

    writes = (PREFIX + "*",)

    def __init__(self, inner: Any, *, every_n_steps: int, flops_per_sample: float | None,
                 samples: Callable[[Any], int] | None, tokens: Callable[[Any], int] | None,
                 peak_flops: float | None, dtype: torch.dtype | None, name: str) -> None:
        super().__init__(inner, None)
        check_int("with_throughput: every_n_steps", every_n_steps, 1)
        for label, value in (("flops_per_sample", flops_per_sample),
                             ("peak_flops", peak_flops)):
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not value > 0):
                raise ConfigError(f"with_throughput: {label} must be a number > 0 or None, "
                                  f"got {value!r}")
        for label, fn in (("samples", samples), ("tokens", tokens)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"with_throughput: {label} must be a function batch -> "
                                  f"int, got {type(fn).__name__}")
        self.every_n_steps, self.flops_per_sample = every_n_steps, flops_per_sample
        self.samples, self.tokens, self.peak_flops = samples, tokens, peak_flops
        self.dtype, self.name = dtype, name
        self._checked()

    def __repr__(self) -> str:
        return f"with_throughput(every_n_steps={self.every_n_steps})"

    def _count(self, batch: Any) -> int:
        n = self.samples(batch) if self.samples is not None else batch_size(batch)
        if n is None:
            raise ConfigError("with_throughput cannot tell this batch's size; pass "
                              "samples=lambda batch: ...")
        return int(n)

    def _flops(self, state: TrainState, batch: Any, n: int, binding: Any) -> float:
        """FLOPs per sample: given, or counted once on this batch (forward and backward
        of a direct call on a copy of the state: the run is not touched)."""
        known = binding.layer_runs.get(self.name + "/flops")
        if known is None:
            if self.flops_per_sample is not None:
                known = float(self.flops_per_sample)
            else:
                from torch.utils.flop_counter import FlopCounterMode
                counter = FlopCounterMode(display=False)
                with counter:
                    self.inner(state.copy(), batch)
                known = counter.get_total_flops() / max(n, 1)
            binding.layer_runs[self.name + "/flops"] = known
        return float(known)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        binding = context.stepping(state)
        if binding is None:  # a direct call: nothing to time
            return self.inner(state, batch)  # type: ignore[no-any-return]
        run = binding.layer_runs.get(self.name)
        if run is None:
            run = binding.layer_runs[self.name] = _Run(state.device.type == "cuda")
        n = self._count(batch)
        flops = self._flops(state, batch, n, binding)
        start = time.perf_counter()
        run.data += start - run.left
        if run.cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        new, metrics = self.inner(state, batch)
        if run.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            run.events.append((begin, end))
        run.left = time.perf_counter()
        run.inside += run.left - start
        run.steps += 1
        run.samples += n
        if self.tokens is not None:
            run.tokens += int(self.tokens(batch))
        if new.step % self.every_n_steps == 0:
            metrics = {**metrics, **self._report(run, new, flops, binding)}
        return new, metrics

    def _report(self, run: _Run, state: TrainState, flops: float, binding: Any
                ) -> Metrics:
        if run.cuda:
            torch.cuda.synchronize(state.device)  # host sync here: one per report
            inside = sum(b.elapsed_time(e) for b, e in run.events) / 1e3
        else:
            inside = run.inside
        now = time.perf_counter()
        elapsed = max(now - run.since, 1e-12)
        world = binding.run.world if binding.run is not None else 1
        out = {"samples_per_s": run.samples * world / elapsed,
               "step_s": inside / run.steps, "data_s": run.data / run.steps,
               "tflops": flops * run.samples / elapsed / 1e12}
        if self.tokens is not None:
            out["tokens_per_s"] = run.tokens * world / elapsed
        dtype = self.dtype
        if dtype is None:
            first = next(iter(state.params.values()), None) if not state.multi else None
            dtype = first.dtype if isinstance(first, torch.Tensor) else torch.float32
        peak = self.peak_flops or device_peak(state.device, dtype)
        if peak:
            out["mfu"] = flops * run.samples / elapsed / peak
        if run.cuda:
            out["peak_mem_mb"] = torch.cuda.max_memory_allocated(state.device) / 2**20
        else:  # ru_maxrss: kilobytes on Linux
            out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        run.since, run.steps, run.samples, run.tokens = now, 0, 0, 0
        run.data = run.inside = 0.0
        run.events = []
        run.left = now
        return {PREFIX + k: torch.tensor(float(v), dtype=torch.float64) for k, v in out.items()}


def with_throughput(step: Any, *, every_n_steps: int = 50,
                    flops_per_sample: float | None = None,
                    samples: Callable[[Any], int] | None = None,
                    tokens: Callable[[Any], int] | None = None,
                    peak_flops: float | None = None, dtype: torch.dtype | None = None,
                    name: str = "throughput") -> WithThroughput:
    """Measure throughput, achieved FLOP/s, MFU, data wait and peak memory every
    `every_n_steps` steps, as `throughput/...` metrics (see the module).

    `samples(batch)` and `tokens(batch)` count a batch (default samples: the batch's
    size); `flops_per_sample` is the model FLOPs of one sample's forward and backward
    (default: counted by `torch.utils.flop_counter` on the first batch); `peak_flops`
    overrides the device's peak (`PEAK_FLOPS` knows H200/H100/A100/L4/V100/T4), and
    `dtype` names the compute dtype it is looked up for (default: the params'; give
    `torch.bfloat16` under `with_amp`). Put it outside the core and inside `with_logging`
    (every_n_steps equal to the logger's), so the logger sees the metrics it adds.

    Examples:
        >>> import torch, ftrain as ft
        >>> step = ft.with_throughput(ft.train_step(lambda m, b: m(b).square().mean()),
        ...                           every_n_steps=2)
        >>> state = ft.TrainState.create(torch.nn.Linear(4, 1), ft.optim.sgd(0.1))
        >>> seen = [m for _, m in ft.iterate(step, state, [torch.randn(8, 4)] * 4, epochs=1)]
        >>> sorted(k for k in seen[1] if k.startswith("throughput/"))[:3]
        ['throughput/data_s', 'throughput/peak_mem_mb', 'throughput/samples_per_s']
        >>> float(seen[1]["throughput/tflops"]) > 0
        True
    """
    return WithThroughput(step, every_n_steps=every_n_steps,
                          flops_per_sample=flops_per_sample, samples=samples,
                          tokens=tokens, peak_flops=peak_flops, dtype=dtype, name=name)
