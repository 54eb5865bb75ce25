"""with_throughput (issue 18, part 2): samples/s, tokens/s, achieved FLOP/s and MFU from
torch's flop counter, data wait and peak memory, every N steps, no host read per step."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import CountHostReads
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ftrain as ft


def loss_fn(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))


def data(n: int = 8, size: int = 32) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 16, generator=g), torch.randn(size, 1, generator=g))
            for _ in range(n)]


def reports(step, batches) -> list[dict]:
    state = ft.TrainState.create(net(), ft.optim.sgd(0.1))
    out = []
    for _, metrics in ft.iterate(step, state, batches, epochs=1):
        found = {k[len("throughput/"):]: float(v) for k, v in metrics.items()
                 if k.startswith("throughput/")}
        if found:
            out.append(found)
    return out


def test_flops_are_counted_by_torch_and_mfu_is_against_the_given_peak():
    model = net()
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model, data(1)[0]).backward()
    expected = counter.get_total_flops() / 32  # forward and backward, per sample
    step = ft.with_throughput(ft.train_step(loss_fn), every_n_steps=4, peak_flops=1e12)
    first, second = reports(step, data(8))
    for r in (first, second):
        per_sample = r["tflops"] * 1e12 / r["samples_per_s"]
        assert per_sample == pytest.approx(expected, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops"] * 1e12 / 1e12, rel=1e-9)
        assert r["samples_per_s"] > 0 and r["step_s"] > 0 and r["data_s"] >= 0
        assert r["peak_mem_mb"] > 0


def test_given_flops_tokens_and_the_time_between_steps():
    def slow(batches):  # the loop waits 20 ms for each batch
        for b in batches:
            time.sleep(0.02)
            yield b

    step = ft.with_throughput(ft.train_step(loss_fn), every_n_steps=3,
                              flops_per_sample=1000.0, tokens=lambda b: 5 * len(b[0]))
    (r,) = reports(step, list(slow(data(3))))  # consumed ahead: no wait inside the loop
    assert r["tokens_per_s"] == pytest.approx(5 * r["samples_per_s"], rel=1e-9)
    assert r["tflops"] * 1e12 / r["samples_per_s"] == pytest.approx(1000.0)
    assert "mfu" not in r  # no known peak for this CPU
    state = ft.TrainState.create(net(), ft.optim.sgd(0.1))
    seen = [m for _, m in ft.iterate(step, state, _Slow(data(3)), epochs=1)]
    waited = float(seen[2]["throughput/data_s"])
    # the loader's sleep shows up as data time, between steps: 20 ms before steps 2 and 3
    # (the wait for the first batch comes before the layer's first call), mean >= 13 ms
    assert waited >= 0.012


class _Slow:
    """A loader that takes 20 ms per batch (a real iterable with a length)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            time.sleep(0.02)
            yield b


def test_no_host_read_per_step_and_a_logger_sees_the_metrics():
    class Memory:  # a logger by the protocol: keeps what it is given
        def __init__(self):
            self.rows = []

        def log_metrics(self, metrics, step):
            self.rows.append((step, dict(metrics)))

        def log_hparams(self, hparams, metrics):
            pass

        def finalize(self):
            pass

    logger = Memory()
    step = ft.with_logging(ft.with_throughput(ft.train_step(loss_fn), every_n_steps=4),
                           [logger], every_n_steps=4, progress=False)
    state = ft.TrainState.create(net(), ft.optim.sgd(0.1))
    inner = ft.with_throughput(ft.train_step(loss_fn), every_n_steps=100,
                               flops_per_sample=1.0)
    counts = []
    for candidate in (ft.train_step(loss_fn), inner):
        with CountHostReads() as reads:
            ft.fit(candidate, ft.TrainState.create(net(), ft.optim.sgd(0.1)), data(8),
                   epochs=1, logger=False, checkpoint=False, progress=False)
        counts.append(reads.count)
    assert counts[1] == counts[0]  # the layer reads nothing to the host (the loop's
    # epoch-end check is the only read either way)
    ft.fit(step, state, data(8), epochs=1, logger=False, checkpoint=False, progress=False)
    logged = [m for _, m in logger.rows if "throughput/samples_per_s" in m]
    assert len(logged) == 2 and all(m["throughput/samples_per_s"] > 0 for m in logged)


def test_bad_arguments_are_refused():
    core = ft.train_step(loss_fn)
    for kwargs, match in [({"every_n_steps": 0}, "every_n_steps"),
                          ({"flops_per_sample": -1.0}, "flops_per_sample must be"),
                          ({"peak_flops": "fast"}, "peak_flops must be"),
                          ({"tokens": 3}, "tokens must be a function")]:
        with pytest.raises(ft.ConfigError, match=match):
            ft.with_throughput(core, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_throughput_reports_mfu_and_memory_with_no_sync_between_reports():
    """On a GPU: CUDA events time the steps, the report's one sync is the only one (sync
    debug "error" for every other step), MFU is against the given peak, and peak memory
    is the allocator's."""
    device = torch.device("cuda", torch.cuda.current_device())
    batches = [(x.to(device), y.to(device)) for x, y in data(24, size=256)]
    every, n = 8, 24
    step = ft.with_throughput(ft.train_step(loss_fn), every_n_steps=every, peak_flops=1e12)
    state = ft.TrainState.create(net(), ft.optim.adam(1e-3)).to(device)
    seen, checked = [], 0
    try:
        for state, metrics in ft.iterate(step, state, batches, epochs=1):
            found = {k[len("throughput/"):]: float(v) for k, v in metrics.items()
                     if k.startswith("throughput/")}
            if found:
                seen.append(found)
            nxt = state.step + 1  # the next step: a report (syncs once), or checked
            check = state.step >= 2 and nxt % every != 0 and nxt <= n
            checked += check
            torch.cuda.set_sync_debug_mode("error" if check else "default")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(seen) == n // every and checked == n - 2 - n // every
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(net().to(device), batches[0]).backward()
    per_sample = counter.get_total_flops() / 256
    for r in seen:
        assert r["samples_per_s"] > 0 and r["step_s"] > 0 and r["data_s"] >= 0
        assert r["tflops"] * 1e12 / r["samples_per_s"] == pytest.approx(per_sample, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops"], rel=1e-6)  # peak 1 TFLOP/s
        assert 0 < r["peak_mem_mb"] < torch.cuda.get_device_properties(device).total_memory
