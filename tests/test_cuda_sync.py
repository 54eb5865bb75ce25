"""No hidden host syncs on CUDA (skipped without CUDA): `ft.fit` with TensorBoard logging
runs under `torch.cuda.set_sync_debug_mode("error")` everywhere but its documented sync
points (a logging step reads its values; an epoch end logs, validates and checks the loss;
`close` writes the last records), so any other call that waits for the GPU raises.

How the documented points are let through, without touching ftrain: an outermost layer
(`SyncChecked`) sets the mode per step from the logging layer's own trigger and around
`epoch_end` and `close`. The loop's own work between steps (fetching the next batch,
moving it to the device, position bookkeeping) runs under "error".

Run with `python -m pytest -k cuda tests/` on a machine with a GPU (every CUDA-only test
has "cuda" in its name).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import classify, make_batches, make_dataset
from torch import nn
from torch.utils.data import DataLoader

import ftrain as ft
from ftrain.core.layer import Combinator
from ftrain.data.batches import to_device
from ftrain.data.prefetch import DevicePrefetcher
from ftrain.layers.logging import WithLogging

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

WARMUP = 2  # first steps: optimizer state, cuBLAS handles, the event writer (one-time)


def mode(name: str) -> None:
    torch.cuda.set_sync_debug_mode(name)


class SyncChecked(Combinator):
    """The steps of `inner` under sync debug "error" but for the documented sync points;
    records which steps ran checked."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.logging = ft.combinators.find(inner, WithLogging)
        self.checked: list[int] = []
        self.allowed: list[int] = []

    def __call__(self, state: ft.TrainState, batch: Any) -> Any:
        number = state.step + 1  # the step about to run, as the logging layer counts
        sync_point = state.step < WARMUP or self.logging.trigger.step_due(number)
        (self.allowed if sync_point else self.checked).append(number)
        mode("default" if sync_point else "error")
        try:
            return self.inner(state, batch)
        finally:
            mode("error")  # the loop's work until the next step is checked too

    def epoch_end(self, state: ft.TrainState) -> Any:
        mode("default")
        try:
            return super().epoch_end(state)
        finally:
            mode("error")

    def close(self, state: ft.TrainState) -> None:
        mode("default")  # and it stays: the loop hands the state back after this
        super().close(state)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def run_checked(data: Any, tmp_path: Any, dtype: torch.dtype | None = None,
                epochs: int = 2, every: int = 4, optimizer: Any = None) -> SyncChecked:
    device = torch.device("cuda", torch.cuda.current_device())
    core = ft.train_step(classify)
    if dtype is not None:
        core = ft.with_amp(core, dtype)
    val = [to_device(b, device) for b in make_batches(2, seed=9)]
    inner = ft.with_validation(core, ft.eval_step(classify), val)
    step = SyncChecked(ft.with_logging(inner, [ft.loggers.TensorBoard(str(tmp_path))],
                                       every_n_steps=every))
    torch.manual_seed(0)
    state = ft.TrainState.create(MLP(), optimizer or ft.optim.adam(1e-3), seed=0).to(device)
    try:
        state = ft.fit(step, state, data, epochs=epochs, checkpoint=False, progress=False)
    finally:
        mode("default")
    assert state.step > WARMUP + 4 and step.checked
    assert (tmp_path / "ftrain_logs").exists()  # the logger did write
    return step


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_cuda_fit_with_logging_has_no_hidden_sync(tmp_path: Any, dtype: torch.dtype | None
                                                   ) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    data = [to_device(b, device) for b in make_batches(10)]  # already on the GPU
    step = run_checked(data, tmp_path, dtype)
    assert 4 in step.allowed and 8 in step.allowed and 5 in step.checked


def test_cuda_fit_with_a_schedule_and_clipping_has_no_hidden_sync(tmp_path: Any) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    data = [to_device(b, device) for b in make_batches(10)]
    schedule = ft.optim.schedules.warmup_cosine(1e-3, 5, 30)
    optimizer = ft.optim.chain(ft.optim.clip_grad_norm(1.0),
                               ft.optim.adamw(schedule, weight_decay=0.1))
    run_checked(data, tmp_path, optimizer=optimizer)


def test_cuda_long_epoch_with_logging_has_no_hidden_sync(tmp_path: Any) -> None:
    # past the points where the logging layer and the loss check fold what they kept of
    # each step (every 256 and 1,024 steps): those folds run on the device
    device = torch.device("cuda", torch.cuda.current_device())
    batch = to_device(make_batches(1)[0], device)
    step = run_checked([batch] * 1100, tmp_path, epochs=1, every=500)
    assert len(step.checked) > 1000


def test_cuda_fit_from_a_pinned_loader_has_no_hidden_sync(tmp_path: Any) -> None:
    loader = DataLoader(make_dataset(96), batch_size=12, shuffle=True, pin_memory=True)
    run_checked(loader, tmp_path)


def test_cuda_fit_from_host_batches_has_no_hidden_sync(tmp_path: Any) -> None:
    # Unpinned CPU batches: a blocking copy would wait for the GPU at every step; the
    # loop's prefetcher pins them and copies on its side stream instead.
    run_checked(make_batches(10), tmp_path)


@pytest.mark.parametrize("pin", [True, False])
def test_cuda_prefetcher_put_and_get_do_not_sync(pin: bool) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    mover = DevicePrefetcher(device, pin=pin)
    host = make_batches(4)
    pinned = [(x.pin_memory(), y.pin_memory()) for x, y in host]
    mover.get(mover.put(host[0]))  # one-time: the side stream, the first pinned blocks
    out = []
    mode("error")
    try:
        for batch in [*host, *pinned]:
            x, y = mover.get(mover.put(batch))
            out.append((x * 2, y + 1))  # used on the compute stream
    finally:
        mode("default")
    for (x, y), (hx, hy) in zip(out, [*host, *pinned]):
        assert torch.equal(x.cpu(), hx * 2) and torch.equal(y.cpu(), hy + 1)
