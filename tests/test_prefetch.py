"""Prefetching batches to the device (ftrain.data.prefetch): a pass-through on the CPU that
moves exactly what `to_device` moves; on CUDA (tests skipped without it) the same batches,
in the same order, and bitwise the same training."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import pytest
import torch
from helpers import Net, classify, make_batches, make_dataset, tensors_equal
from torch.utils.data import DataLoader

import ftrain as ft
from ftrain.data.batches import to_device
from ftrain.data.prefetch import DevicePrefetcher, map_tensors, prefetch

Pair = namedtuple("Pair", ["x", "y"])


class Tagged(tuple):
    """A tuple subclass that is not a namedtuple: rebuilt from one iterable."""


@dataclasses.dataclass
class Record:
    x: torch.Tensor


def structures() -> list[Any]:
    t = torch.arange(6.0).reshape(2, 3)
    return [
        t,
        (t, torch.ones(2, dtype=torch.long)),
        [t, t + 1],
        Pair(t, torch.zeros(2)),
        Tagged((t, "name")),
        {"x": t, "meta": {"ids": [1, 2], "mask": t > 2}, "name": "b"},
        [(t, {"y": Pair(t, None)})],
        Record(t),  # to_device keeps a dataclass as it is
        "not a tensor",
        None,
        (),
    ]


def same_structure(a: Any, b: Any) -> bool:
    """Same types all the way down, tensors with equal device, dtype, shape (and values
    where they have storage)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        same = a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
        return same and (a.device.type == "meta" or torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_structure(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_structure(a[k], b[k]) for k in a)
    return a is b or a == b


# -- the CPU: a pass-through ------------------------------------------------------------

@pytest.mark.parametrize("batch", structures(), ids=lambda b: type(b).__name__)
def test_map_tensors_walks_what_to_device_walks(batch: Any) -> None:
    meta = torch.device("meta")  # a real move on any machine, no memory
    assert same_structure(map_tensors(batch, lambda t: t.to(meta)), to_device(batch, meta))


@pytest.mark.parametrize("batch", structures(), ids=lambda b: type(b).__name__)
def test_cpu_prefetcher_is_to_device_with_no_copies(batch: Any) -> None:
    mover = DevicePrefetcher("cpu")
    moved = mover.put(batch)
    assert mover.get(moved) is moved
    assert same_structure(moved, to_device(batch, torch.device("cpu")))
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    map_tensors(batch, lambda t: before.append(t) or t)
    map_tensors(moved, lambda t: after.append(t) or t)
    assert len(before) == len(after)
    assert all(a is b for a, b in zip(before, after))  # the same tensor objects


def test_meta_device_moves_like_to_device() -> None:
    batch = {"x": torch.ones(3), "y": [torch.zeros(2)]}
    mover = DevicePrefetcher(torch.device("meta"))
    moved = mover.get(mover.put(batch))
    assert moved["x"].device.type == "meta" and moved["y"][0].device.type == "meta"
    assert batch["x"].device.type == "cpu"  # the host batch is untouched


def test_prefetch_keeps_order_and_values_and_reads_one_batch_ahead() -> None:
    data = make_batches(5)
    fetched: list[int] = []

    def source():
        for i, batch in enumerate(data):
            fetched.append(i)
            yield batch

    out = []
    for i, batch in enumerate(prefetch(source(), "cpu")):
        # batch i is handed out once batch i + 1 was fetched (its copy then starts)
        assert fetched == list(range(min(i + 2, len(data))))
        out.append(batch)
    assert len(out) == len(data)
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(out, data))
    assert list(prefetch([], "cpu")) == []


def test_fit_over_prefetched_batches_matches_fit_over_the_list() -> None:
    data = make_batches(6)

    def train(batches: Any) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        state = ft.TrainState.create(Net(), ft.optim.adam(1e-2), seed=3)
        state = ft.fit(ft.train_step(classify), state, batches, epochs=1, logger=False,
                       checkpoint=False, progress=False)
        return {k: v.detach().clone() for k, v in state.params.items()}

    assert tensors_equal(train(prefetch(data, "cpu")), train(data))


@pytest.mark.parametrize("device, match", [
    ("no-such-device", "needs a device"),
    (["cuda"], "needs a device"),
])
def test_a_bad_device_is_a_config_error_naming_it(device: Any, match: str) -> None:
    with pytest.raises(ft.ConfigError, match=match) as info:
        DevicePrefetcher(device)
    assert repr(device) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ft.ConfigError, match="needs CUDA, which is not available"):
        DevicePrefetcher("cuda")


def test_pin_must_be_a_bool() -> None:
    with pytest.raises(ft.ConfigError, match="pin must be True or False, got 'yes'"):
        DevicePrefetcher("cpu", pin="yes")  # type: ignore[arg-type]


def test_repr_names_device_and_pinning() -> None:
    assert repr(DevicePrefetcher("cpu", pin=False)) == "DevicePrefetcher('cpu', pin=False)"


# -- CUDA (skipped without it) -------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def busy(device: torch.device) -> None:
    """Queue ~milliseconds of work on the current stream, so that copies on the side
    stream really overlap it (a missing wait or record_stream then shows as wrong data)."""
    a = torch.randn(2048, 2048, device=device)
    for _ in range(8):
        a = torch.tanh(a @ a * 1e-3)


@cuda
@pytest.mark.parametrize("pin", [True, False])
@pytest.mark.parametrize("pinned_source", [False, True])
def test_cuda_prefetch_gives_the_host_batches_in_order(pin: bool, pinned_source: bool
                                                       ) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    host = []
    for i in range(40):
        # whole numbers: their float64 sums are exact in any order, on any device
        x = torch.randint(-1000, 1000, (256, 512), generator=g).float()
        batch = {"x": x.pin_memory() if pinned_source else x, "i": torch.tensor([i]),
                 "pair": Pair(torch.full((3,), float(i)), "tag"), "n": i}
        host.append(batch)
    sums, order = [], []
    for batch in prefetch(host, device, pin=pin):
        busy(device)  # the next batch's copy runs meanwhile
        assert batch["x"].device == device and batch["pair"].x.device == device
        x = batch["x"].double()
        sums.append(torch.stack([x.sum(), x[::7, ::3].sum(), batch["i"][0].double(),
                                 batch["pair"].x.double().sum()]))
        order.append(batch["n"])
        del batch  # memory freed while later copies are queued: record_stream matters
    got = torch.stack(sums).cpu()
    want = torch.tensor([[b["x"].double().sum().item(), b["x"][::7, ::3].double().sum().item(),
                          float(i), 3.0 * i] for i, b in enumerate(host)], dtype=torch.float64)
    assert order == list(range(len(host)))
    assert torch.equal(got, want)
    assert all(b["x"].device.type == "cpu" for b in host)  # the host batches are kept


@cuda
def test_cuda_put_get_by_hand_and_batches_already_on_the_device() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    mover = DevicePrefetcher("cuda")
    assert mover.device == device  # the index is filled in
    resident = (torch.ones(4, device=device), torch.zeros(4, device=device))
    moved = mover.put(resident)
    assert moved[0] is resident[0] and mover.get(moved)[1] is resident[1]
    host = [(torch.full((8,), float(i)), i) for i in range(3)]
    handles = [mover.put(b) for b in host]  # several in flight, taken in any order
    for i in (2, 0, 1):
        x, n = mover.get(handles[i])
        assert n == i and torch.equal(x.cpu(), host[i][0])
    assert mover.get(handles[0])[0] is handles[0][0]  # taken twice: still the same batch


def _trained(data: Any, device: torch.device, epochs: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = ft.TrainState.create(Net(), ft.optim.adam(1e-2), seed=5).to(device)
    state = ft.fit(ft.train_step(classify), state, data, epochs=epochs, logger=False,
                   checkpoint=False, progress=False)
    return {k: v.detach().cpu() for k, v in state.params.items()}


@cuda
def test_cuda_training_with_prefetch_is_bitwise_training_without() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    host = make_batches(12)
    on_device = [to_device(b, device) for b in host]  # nothing left to move: the reference
    reference = _trained(on_device, device)
    # the loop's own move of host batches (prefetched once the loop is wired to it)
    assert tensors_equal(_trained(host, device), reference)
    # batches moved one ahead by prefetch() (a one-shot iterator: one epoch)
    once = _trained(on_device, device, epochs=1)
    assert tensors_equal(_trained(prefetch(host, device), device, epochs=1), once)
    assert tensors_equal(_trained(prefetch(host, device, pin=False), device, epochs=1), once)


@cuda
def test_cuda_training_from_a_pinned_loader_is_bitwise_the_unpinned_one() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    dataset = make_dataset(96)
    unpinned = _trained(DataLoader(dataset, batch_size=12, shuffle=True), device)
    pinned = _trained(DataLoader(dataset, batch_size=12, shuffle=True, pin_memory=True),
                      device)
    assert tensors_equal(pinned, unpinned)
