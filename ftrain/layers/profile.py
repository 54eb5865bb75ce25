"""`with_profiling`: where the time goes ("simple"), a cProfile report ("advanced"), or a
torch.profiler trace for TensorBoard ("torch").

"simple" times the phases of each iteration: data (fetch and move), forward and loss,
backward, optimizer update, logging, checkpointing. The device is synchronized at each
phase boundary, only while profiling (the numbers would be launch times otherwise). The
phases are timed by the loop, the core step and the logging layer, which look for the
run's recorder (one attribute read per step when not profiling).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
from typing import Any, Literal

import torch

from ftrain.core import bind as _bind
from ftrain.core.health import log
from ftrain.core.layer import Combinator
from ftrain.core.run import run_info
from ftrain.core.state import TrainState
from ftrain.errors import ConfigError
from ftrain.storage import is_url

PHASES = ("data", "forward", "backward", "optimizer", "logging", "checkpointing")
Kind = Literal["simple", "advanced", "torch"]


class Recorder:
    """Accumulates phase durations; `lap(name)` closes the phase that started last."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.add(phase, now - self.last)
        self.last = now

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds
        self.counts[phase] = self.counts.get(phase, 0) + 1

    def table(self) -> str:
        total = sum(self.totals.values()) or 1.0
        rows = [f"{'phase':<14}{'calls':>8}{'mean (ms)':>12}{'total (s)':>12}{'share':>8}"]
        for phase in [*PHASES, *sorted(set(self.totals) - set(PHASES))]:
            if phase not in self.totals:
                continue
            t, n = self.totals[phase], self.counts[phase]
            rows.append(f"{phase:<14}{n:>8}{1000 * t / n:>12.3f}{t:>12.3f}"
                        f"{100 * t / total:>7.1f}%")
        rows.append(f"{'total':<14}{'':>8}{'':>12}{total:>12.3f}{100.0:>7.1f}%")
        return "\n".join(rows)


def recorder_of(state: TrainState) -> Recorder | None:
    """The recorder of the run `state` belongs to, or None when not profiling."""
    binding = _bind.binding_of(state)
    return getattr(binding, "profiler", None) if binding is not None else None


class WithProfiling(Combinator):
    """The combinator built by `with_profiling`."""

    def __init__(self, inner: Any, kind: Kind = "simple", *, filename: str | None = None,
                 dirpath: str | None = None, file: Any = None, wait: int = 1, warmup: int = 1,
                 active: int = 3) -> None:
        super().__init__(inner, None)
        if kind not in ("simple", "advanced", "torch"):
            raise ConfigError(f"with_profiling: kind must be 'simple', 'advanced' or 'torch', "
                              f"got {kind!r}")
        self.kind = kind
        self.filename = filename
        self.dirpath = dirpath
        self.file = file
        self.schedule = (wait, warmup, active)
        self.recorder: Recorder | None = None
        self.cprofile: cProfile.Profile | None = None
        self.torch_profiler: Any = None
        self.report = ""

    def __repr__(self) -> str:
        return f"with_profiling({self.kind!r})"

    def after_init(self, state: TrainState) -> TrainState:
        binding = _bind.binding_of(state)
        if self.kind == "simple":
            if binding is None:
                log.warning("with_profiling('simple') times loop phases; outside a loop it "
                            "records nothing")
            else:
                self.recorder = binding.profiler = Recorder(state.device)
        elif self.kind == "advanced":
            self.cprofile = cProfile.Profile()
            self.cprofile.enable()
        else:
            run = run_info(state)
            root = (run.root_dir if run is not None else None) or os.getcwd()
            path = self.dirpath or os.path.join(root, "ftrain_logs", "profiler")
            if is_url(path):  # torch's trace handler writes with os
                raise ConfigError(f"with_profiling('torch') writes its traces to a local "
                                  f"folder, got the URL {path!r} (a URL root_dir?): pass "
                                  "dirpath=<a local folder>")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if state.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            wait, warmup, active = self.schedule
            self.torch_profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active,
                                                 repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(path))
            self.dirpath = path
            self.torch_profiler.start()
        return state

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        result = self.inner(state, batch)
        if self.torch_profiler is not None:
            self.torch_profiler.step()
        return result  # type: ignore[no-any-return]

    def at_close(self, state: TrainState) -> None:
        if self.kind == "simple" and self.recorder is not None:
            binding = _bind.binding_of(state)
            if binding is not None:
                binding.profiler = None
            self.report = "ftrain profile (simple)\n" + self.recorder.table()
        elif self.kind == "advanced" and self.cprofile is not None:
            self.cprofile.disable()
            out = io.StringIO()
            pstats.Stats(self.cprofile, stream=out).sort_stats("cumulative").print_stats(40)
            self.report = "ftrain profile (advanced, cProfile)\n" + out.getvalue()
            self.cprofile = None
        elif self.kind == "torch" and self.torch_profiler is not None:
            self.torch_profiler.stop()
            self.torch_profiler = None
            self.report = f"ftrain profile (torch): trace written under {self.dirpath}"
        if not self.report:
            return
        if self.filename is not None:
            with open(self.filename, "w") as f:
                f.write(self.report + "\n")
        else:
            print(self.report, file=self.file or sys.stdout)


def with_profiling(step: Any, kind: Kind = "simple", *, filename: str | None = None,
                   dirpath: str | None = None, file: Any = None, wait: int = 1,
                   warmup: int = 1, active: int = 3) -> WithProfiling:
    """Profile the run: "simple" (phase table), "advanced" (cProfile) or "torch" (trace).

    The report is printed at the end of the run (to `file`, default stdout) or written to
    `filename`, and kept as `.report`. "torch" writes a `torch.profiler` trace under
    `dirpath` (default `<root_dir>/ftrain_logs/profiler`) that TensorBoard opens,
    recording `active` steps after `wait` skipped and `warmup` warm-up steps.

    Examples:
        >>> import io, torch, ftrain as ft
        >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> out = io.StringIO()
        >>> step = ft.with_profiling(ft.train_step(loss), "simple", file=out)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> _ = ft.fit(step, state, data, epochs=1, logger=False, progress=False,
        ...            checkpoint=False)
        >>> "forward" in out.getvalue() and "optimizer" in out.getvalue()
        True
    """
    return WithProfiling(step, kind, filename=filename, dirpath=dirpath, file=file, wait=wait,
                         warmup=warmup, active=active)
