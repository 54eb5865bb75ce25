"""torch.distributed plumbing: the process group, reductions, and failing together.

Rules kept here: ranks stay in lockstep (every collective is reached by every rank at the
same point of the loop), no collective hides in rank-0-only code, and a failing rank tears
the process group down so its peers fail within seconds instead of waiting for a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ftrain._run import run_info
from ftrain.errors import FTrainError

log = logging.getLogger("ftrain")
# Long enough for a rank-0 checkpoint of a large model while the others wait at the next
# collective; short enough that a lost rank is noticed (torch's default is 30 minutes).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
# Per run and torchrun restart: a restarted group must not read an earlier failure.
_FAILED_KEY = (f"ftrain/failed/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
               f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
# How long a rank whose peer failed may take to fail on its own (its collective erroring)
# before the watchdog ends the process.
PEER_GRACE_S = 5.0
_POLL_S = 2.0
_created = False  # ftrain initialized the group, so ftrain destroys it
_watching = False


class PeerFailedError(FTrainError):
    """Another rank failed; this rank stopped because the process group went down."""


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) with peers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    """This process's device: `cuda:<LOCAL_RANK>` when CUDA is available, else the CPU.

    Examples:
        >>> import ftrain as ft
        >>> ft.local_device().type in ("cpu", "cuda")
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup(backend: str | None, timeout: datetime.timedelta) -> tuple[int, int]:
    """Join the process group torchrun describes (once); (rank, world size)."""
    global _created
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if not launched():
            return 0, 1
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend, timeout=timeout)
        _created = True
        atexit.register(teardown)  # a live group can abort the interpreter at exit
    if dist.get_world_size() > 1:
        _watch_peers(dist.get_rank())
    return dist.get_rank(), dist.get_world_size()


def _store_client() -> Any:
    """A connection of our own to the launcher's key-value store (torchrun's
    MASTER_ADDR:MASTER_PORT), or None. Separate from the group's, so a blocking wait
    here never holds a lock the training thread needs."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False,
                             timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    except Exception:
        return None


def _watch_peers(rank: int) -> None:
    """Start a daemon thread that ends this process if another rank reports a failure
    and this one has not failed on its own within PEER_GRACE_S (it may be blocked in a
    collective that torch would only time out much later)."""
    global _watching
    if _watching:
        return
    store = _store_client()
    if store is None:
        return
    _watching = True
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(_POLL_S):  # one store round-trip per poll
            try:
                text = _reported(store)
            except Exception:  # the store went away: the job is over
                return
            if text is None:
                continue
            if _own(text, rank) or stop.wait(PEER_GRACE_S):
                return
            log.error("rank %d: %s; this rank was blocked and exits now", rank, text)
            for handler in logging.getLogger().handlers + log.handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            os._exit(1)

    thread = threading.Thread(target=watch, name="ftrain-peer-watchdog", daemon=True)
    thread.start()

    def halt() -> None:  # a daemon thread inside a C++ store call at exit aborts Python
        stop.set()
        thread.join(timeout=15)

    atexit.register(halt)


# How long teardown lets gloo's worker threads drop the work of the last collectives.
_DRAIN_S = 0.05


def teardown() -> None:
    """Destroy the process group if ftrain created it (at exit)."""
    global _created
    if _created and dist.is_initialized():
        # A synchronous collective returns as soon as its work is done, but a gloo worker
        # thread still drops that work afterwards, and doing so (tensors with Python
        # references) needs the GIL. Exiting right after it, the worker could still be
        # waiting for the GIL when the interpreter finalizes, which aborts the process
        # ("terminate called without an active exception": 3 of ~300 torchrun exits
        # here; core dump: ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> take_gil).
        # Sleeping releases the GIL while the interpreter is still alive.
        time.sleep(_DRAIN_S)
        dist.destroy_process_group()
    _created = False


def fail(err: BaseException, step: int) -> BaseException | None:
    """This rank's loop failed: show why, tell the peers, take the group down.

    Returns an error to raise instead when the cause was another rank's failure.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    peer = _peer_failure(rank)
    if peer is not None:
        log.error("rank %d stops at step %d: %s", rank, step, peer)
        replacement: BaseException | None = PeerFailedError(
            f"{peer}; rank {rank} stopped at step {step} because the process group went "
            f"down ({type(err).__name__}: {err})")
    else:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        log.error("rank %d of %d failed at step %d; taking the process group down so the "
                  "other ranks stop too:\n%s", rank, world, step, text)
        store = _store_client()
        if store is not None:
            with contextlib.suppress(Exception):  # the store may be gone with the agent
                store.set(_FAILED_KEY, f"rank {rank} failed at step {step}: "
                          f"{type(err).__name__}: {err}")
        replacement = None
    _take_down()
    return replacement


def _take_down() -> None:
    """Abort the group: its connections close now, so peers blocked in a collective fail
    at once (destroying alone leaves them open while DDP still references the group)."""
    global _created
    with contextlib.suppress(Exception):
        dist.distributed_c10d._abort_process_group()
    with contextlib.suppress(Exception):  # already gone
        if dist.is_initialized():
            dist.destroy_process_group()
    _created = False


def _reported(store: Any) -> str | None:
    """The failure a rank reported to the store, or None (raises if the store is gone)."""
    return store.get(_FAILED_KEY).decode() if store.check([_FAILED_KEY]) else None


def _own(text: str, rank: int) -> bool:
    return text.startswith(f"rank {rank} ")


def _peer_failure(rank: int) -> str | None:
    """Another rank's reported failure, or None."""
    store = _store_client()
    if store is None:
        return None
    try:
        text = _reported(store)
    except Exception:
        return None
    return None if text is None or _own(text, rank) else text


def collective_device() -> torch.device:
    """Where tensors for a collective live: nccl reduces CUDA tensors only."""
    return local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (if the group is still up)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_same(values: Any, what: str) -> None:
    """All ranks hold equal `values` (a small picklable object), else an error on all."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    if any(v != gathered[0] for v in gathered):
        shown = ", ".join(f"rank {i}: {v}" for i, v in enumerate(gathered))
        raise FTrainError(f"ranks disagree on {what} ({shown}); every rank must start from "
                          "the same state (resume all ranks from the same checkpoint)")


def broadcast(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s values into every rank's tensors, in place, coalesced."""
    backend = dist.get_backend()
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if backend == "nccl" and t.device.type != "cuda":
            continue  # host-side counters (torch's non-fused optimizer steps) stay local
        groups.setdefault(t.device, []).append(t)
    for group in groups.values():
        dist._broadcast_coalesced(dist.group.WORLD, group,  # type: ignore[arg-type]
                                  256 * 1024 * 1024, src)


def across_ranks(state: Any, values: list[Any], how: Mapping[str, str] | None = None,
                 names: list[str] | None = None) -> list[Any]:
    """Under with_ddp, the values reduced across ranks (mean unless `how` names sum, max
    or min); every rank calls this at the same step. Unchanged on one process."""
    run = run_info(state)
    if run is None or run.world <= 1:
        return values
    idx = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    kinds = [(how or {}).get(names[i], "mean") if names is not None else "mean" for i in idx]
    reduced = reduce_values([values[i] for i in idx], kinds, run.world)
    out = list(values)
    for i, v in zip(idx, reduced):
        out[i] = v
    return out


_OPS = {"mean": "SUM", "sum": "SUM", "max": "MAX", "min": "MIN", "last": "SUM"}


def reduce_values(values: Sequence[torch.Tensor], how: Sequence[str], world: int
                  ) -> list[torch.Tensor]:
    """Reduce 0-d metrics across ranks (mean unless `how` says sum/max/min): one
    all-reduce per kind of reduction. Every rank must call it at the same point."""
    if world <= 1 or not values:
        return list(values)
    device = collective_device()
    out = list(values)
    for op in ("SUM", "MAX", "MIN"):
        idx = [i for i, h in enumerate(how) if _OPS.get(h, "SUM") == op]
        if not idx:
            continue
        stacked = torch.stack([values[i].detach().to(device, torch.float64).reshape(())
                               for i in idx])
        dist.all_reduce(stacked, op=getattr(dist.ReduceOp, op))
        for j, i in enumerate(idx):
            mean = how[i] in ("mean", "last")
            out[i] = stacked[j] / world if mean else stacked[j]
    return out
