"""Host-to-device batch transfer overlapped with compute: the next batch is copied to the
GPU while the current step runs.

On CUDA, `DevicePrefetcher.put(batch)` copies a host batch's tensors on a side CUDA stream
with `non_blocking=True`, from pinned memory (a tensor not yet pinned is pinned first: a
host-side copy into page-locked memory, after which the transfer to the device runs
without holding the Python thread), and records an event. `get(moved)` makes the compute
stream wait for that event (a device-side wait, no host sync) and marks each copied tensor
as used on the compute stream (`record_stream`), so the caching allocator does not hand
its memory to another tensor before the step's kernels that read it have run.

A loop calls `put` when it fetches the next batch and `get` just before the step that
uses it: the copy then runs on the GPU alongside the kernels of the step before.

Pinning: a `DataLoader(pin_memory=True)` pins in its own thread, off the training loop;
its batches are used as they are. Other data (a list of CPU batches, a loader without
`pin_memory`) is pinned here, on the loop's thread: a memcpy per batch, but the copy to
the device then overlaps the step. Copying pageable memory would instead make the
loop wait for the transfer (torch synchronizes the stream of a blocking copy). `pin=False`
skips pinning (the copy is then staged by the CUDA driver, still on the side stream).

On any other device (the CPU, or "meta"), `put` is `ftrain.data.batches.to_device` and
`get` returns its argument: no extra copies, no streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ftrain.data.batches import map_tensors, to_device
from ftrain.errors import ConfigError

_MAX_PENDING = 16  # batches put but not yet taken (a loop has one or two)


def _device(device: Any) -> torch.device:
    """`device` as a torch.device with an index for CUDA; a ConfigError if it is none."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"a prefetcher needs a device (a torch.device or a name such as "
                          f"'cuda:0'), got {device!r}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"a prefetcher for {dev} needs CUDA, which is not available "
                              "here; use the CPU or the state's device")
        if dev.index is None:  # tensors report their index: compare like with like
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _same(batch: Any) -> Any:
    return batch


def _moving_to(device: torch.device) -> Callable[[Any], Any]:
    # a closure: cheaper per call than functools.partial with a keyword (~0.3 us)
    return lambda batch: to_device(batch, device)


class DevicePrefetcher:
    """Moves batches to `device`, the copy of the next batch overlapping the current step.

    `put(batch)` starts moving a batch and returns it as it will be on the device (the
    same structure `ftrain.data.batches.to_device` returns: tensors in tuples, lists,
    namedtuples and dicts are moved, anything else is kept). `get(moved)` returns it ready
    for the current CUDA stream. Read a moved batch only after `get`. On CUDA the host
    tensors of a batch must not be changed in place until its `get` (a pinned source is
    read by the device while the loop goes on). On other devices `put` is `to_device`
    and `get` returns its argument.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.data.prefetch import DevicePrefetcher
        >>> mover = DevicePrefetcher("cpu")
        >>> batches = [(torch.ones(2, 3), torch.zeros(2))] * 3
        >>> ahead = mover.put(batches[0])
        >>> for nxt in batches[1:] + [None]:
        ...     batch = mover.get(ahead)               # ready for this step
        ...     ahead = mover.put(nxt)                 # the next copy starts now
        ...     loss = batch[0].sum()
        >>> float(loss)
        6.0
    """

    put: Callable[[Any], Any]
    get: Callable[[Any], Any]

    def __init__(self, device: torch.device | str, *, pin: bool = True) -> None:
        if not isinstance(pin, bool):
            raise ConfigError(f"pin must be True or False, got {pin!r}")
        self.device = _device(device)
        self.pin = pin
        if self.device.type != "cuda":  # a pass-through: what the loop did without us
            self.put = _moving_to(self.device)
            self.get = _same
            return
        self.stream = torch.cuda.Stream(device=self.device)
        self._pending: dict[int, tuple[Any, torch.cuda.Event, list[torch.Tensor]]] = {}
        self._events: list[torch.cuda.Event] = []  # waited for: free to record again
        self.put = self._put
        self.get = self._get

    def __repr__(self) -> str:
        return f"DevicePrefetcher({str(self.device)!r}, pin={self.pin})"

    # -- CUDA ---------------------------------------------------------------------------

    def _leaf(self, tensor: torch.Tensor, copied: list[torch.Tensor], compute: Any
              ) -> torch.Tensor:
        """One tensor on the device: a host tensor copied on the side stream (the current
        one while `put` runs), collected in `copied`."""
        if tensor.device == self.device:
            return tensor
        if tensor.device.type != "cpu":  # another GPU: ordered after its producer
            with torch.cuda.stream(compute):
                return tensor.to(self.device)
        if self.pin and not tensor.is_pinned():
            tensor = tensor.pin_memory()  # cost: a host memcpy (none when pinned already)
        out = tensor.to(self.device, non_blocking=True)
        copied.append(out)
        return out

    def _put(self, batch: Any) -> Any:
        compute = torch.cuda.current_stream(self.device)
        copied: list[torch.Tensor] = []
        with torch.cuda.stream(self.stream):
            moved = map_tensors(batch, lambda t: self._leaf(t, copied, compute))
            if not copied:
                return moved
            event = self._events.pop() if self._events else torch.cuda.Event()
            event.record(self.stream)
        if len(self._pending) >= _MAX_PENDING:  # never taken (e.g. a loop that stopped):
            self._get(next(iter(self._pending.values()))[0])  # made ready now, then dropped
        # holding `moved` keeps its id unique while it is pending
        self._pending[id(moved)] = (moved, event, copied)
        return moved

    def _get(self, moved: Any) -> Any:
        entry = self._pending.pop(id(moved), None)
        if entry is None:  # not put here, taken already, or nothing was copied
            return to_device(moved, self.device)
        _, event, copied = entry
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)  # device-side: the host does not wait
        for tensor in copied:  # its memory is not reused before the step has read it
            tensor.record_stream(compute)
        self._events.append(event)
        return moved


def prefetch(batches: Iterable[Any], device: torch.device | str, *, pin: bool = True
             ) -> Iterator[Any]:
    """The batches on `device`, each copied while the step before it runs (CUDA).

    For a hand-written loop: `for batch in prefetch(loader, "cuda"): ...`. The order and
    values are those of `batches`; on the CPU they are `to_device`'s, one by one.

    Examples:
        >>> import torch
        >>> from ftrain.data.prefetch import prefetch
        >>> data = [(torch.full((2,), float(i)), i) for i in range(3)]
        >>> [int(x[0]) + y for x, y in prefetch(data, "cpu")]
        [0, 2, 4]
    """
    mover = DevicePrefetcher(device, pin=pin)
    it = iter(batches)
    end = object()
    nxt = next(it, end)
    if nxt is end:
        return
    ahead = mover.put(nxt)
    for nxt in it:
        following = mover.put(nxt)  # its copy runs while the consumer uses `ahead`
        yield mover.get(ahead)
        ahead = following
    yield mover.get(ahead)
