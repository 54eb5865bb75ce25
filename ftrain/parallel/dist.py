"""torch.distributed plumbing: the process group, reductions, and failing together.

Rules kept here: ranks stay in lockstep (every collective is reached by every rank at the
same point of the loop), no collective hides in rank-0-only code, and a failing rank tears
the process group down so its peers fail within seconds instead of waiting for a timeout.
A rank whose collective times out asks its peers, through the launcher's store, where they
are (step and Python stack, answered by each rank's watchdog thread), and its error names
the ranks that never reached the collective.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ftrain.core import context
from ftrain.core.run import run_info
from ftrain.errors import FTrainError

log = logging.getLogger("ftrain")
# Long enough for a rank-0 checkpoint of a large model while the others wait at the next
# collective; short enough that a lost rank is noticed (torch's default is 30 minutes).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
# Per run and torchrun restart: a restarted group must not read an earlier failure.
_RUN = (f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
        f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
_FAILED_KEY = f"ftrain/failed/{_RUN}"
# A rank whose collective timed out adds 1 here; every watchdog answers request n under
# f"{_WHERE_KEY}/{n}/{rank}" with where its rank is (step, main thread's Python stack).
_ASK_KEY = f"ftrain/ask/{_RUN}"
_WHERE_KEY = f"ftrain/where/{_RUN}"
# How long a rank whose peer failed may take to fail on its own (its collective erroring)
# before the watchdog ends the process.
PEER_GRACE_S = 5.0
_POLL_S = 2.0
# How long a rank whose collective timed out waits for its peers to say where they are
# (a watchdog answers within one poll unless its process is hung outside Python).
ANSWER_S = _POLL_S + 3.0
_FRAMES = 15  # innermost frames of a rank's stack shown in the error
_created = False  # ftrain initialized the group, so ftrain destroys it
_watching = False
_timeout: datetime.timedelta | None = None  # the group's collective timeout, if ftrain set it
# Set when this rank is in fail(): where its error was raised (formatted stack and
# innermost frame), answered to peers instead of the stack inside fail().
_failing: tuple[list[str], str] | None = None


class PeerFailedError(FTrainError):
    """Another rank failed; this rank stopped because the process group went down."""


class CollectiveError(FTrainError):
    """A collective failed and no rank reported an error: the message names the ranks that
    did not reach it, with their steps and Python stacks."""


class CollectiveTimeoutError(CollectiveError):
    """A collective timed out (`with_ddp(timeout=...)`): the message names the ranks that
    did not reach it (stuck, e.g. sleeping in their loss), their steps and Python stacks."""


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
    global _created, _timeout
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
        _timeout = timeout
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
    """Start a daemon thread that answers a peer asking where this rank is (its collective
    timed out), and ends this process if another rank reports a failure and this one has
    not failed on its own within PEER_GRACE_S (it may be stuck outside any collective, or
    blocked in one that torch would only time out much later)."""
    global _watching
    if _watching:
        return
    store = _store_client()
    if store is None:
        return
    _watching = True
    stop = threading.Event()

    def watch() -> None:
        answered = 0
        while not stop.wait(_POLL_S):  # two store round-trips per poll
            try:
                answered = _answer(store, rank, answered)
                text = _reported(store)
            except Exception:  # the store went away: the job is over
                return
            if text is None:
                continue
            if _own(text, rank) or stop.wait(PEER_GRACE_S):
                return
            step, (stack, where) = context.at_step, _main_stack()
            log.error("rank %d: %s; this rank was blocked and exits now; it was at step %s "
                      "in %s, stack (most recent call last):\n%s", rank, text,
                      step if step >= 0 else "?", where, "".join(stack).rstrip())
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

    Returns an error to raise instead when the cause was another rank's failure, or, when
    a collective failed or timed out with no rank reporting an error, a `CollectiveError`
    that names the ranks which did not reach it (asked through the store: bounded by
    ANSWER_S).
    """
    global _failing
    if not (dist.is_available() and dist.is_initialized()):
        return None
    cause = _collective_error(err) or err
    _failing = _shown(traceback.extract_tb(cause.__traceback__))
    rank, world = dist.get_rank(), dist.get_world_size()
    store = _store_client()
    peer = _peer_failure(store, rank)
    replacement: BaseException | None = None
    if peer is None and store is not None and _collective_error(err) is not None:
        replacement = _diagnose(store, err, rank, world, step)
        peer = _peer_failure(store, rank)  # a peer may have failed while we asked
    if peer is not None:
        log.error("rank %d stops at step %d: %s", rank, step, peer)
        replacement = PeerFailedError(
            f"{peer}; rank {rank} stopped at step {step} because the process group went "
            f"down ({type(err).__name__}: {err})")
    else:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        if replacement is not None:
            text = f"{type(replacement).__name__}: {replacement}\n{text}"
        log.error("rank %d of %d failed at step %d; taking the process group down so the "
                  "other ranks stop too:\n%s", rank, world, step, text)
        shown = replacement if replacement is not None else err
        summary = str(shown).split("\n", 1)[0]  # peers log their own stacks
        if store is not None:
            with contextlib.suppress(Exception):  # the store may be gone with the agent
                store.set(_FAILED_KEY, f"rank {rank} failed at step {step}: "
                          f"{type(shown).__name__}: {summary}")
    _take_down()
    return replacement


def _collective_error(err: BaseException) -> BaseException | None:
    """The error of a collective (gloo/nccl, or torch's DistError) in `err`'s chain."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, dist.DistError) or (
                isinstance(e, RuntimeError) and ("gloo" in text or "nccl" in text)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _timed_out(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _main_frame() -> Any:
    """The main thread's innermost frame (None if it has ended)."""
    return sys._current_frames().get(threading.main_thread().ident or -1)


def _main_stack(frame: Any = None) -> tuple[list[str], str]:
    """The main thread's Python stack (see `_shown`), from `frame` if given."""
    frame = frame if frame is not None else _main_frame()
    return _shown(traceback.extract_stack(frame)) if frame is not None else ([], "?")


def _shown(frames: traceback.StackSummary) -> tuple[list[str], str]:
    """Formatted lines of a stack (torch's own frames left out but for the innermost few,
    then the innermost _FRAMES frames) and its innermost frame, 'function (file, line n)'."""
    if not frames:
        return [], "?"
    kept = [f for i, f in enumerate(frames)
            if i >= len(frames) - 3 or not f.filename.startswith(_TORCH_DIR)]
    last = frames[-1]
    where = f"{last.name} ({os.path.basename(last.filename)}, line {last.lineno})"
    lines = [f'  File "{f.filename}", line {f.lineno}, in {f.name}\n' +
             (f"    {f.line.strip()}\n" if f.line else "") for f in kept[-_FRAMES:]]
    return lines, where


_WAITING_IN = ("torch/distributed/", "torch/nn/parallel/", "torch/autograd/")


def _whereabouts(rank: int) -> str:
    """Where this rank is, for a peer whose collective timed out: JSON of its rank, step,
    state (failing | waiting: inside a collective or DDP's backward | running) and stack."""
    if _failing is not None:  # where its own collective failed, not inside fail()
        state, (stack, where) = "failing", _failing
    else:
        frame = _main_frame()
        inner = "" if frame is None else frame.f_code.co_filename.replace(os.sep, "/")
        state = "waiting" if any(w in inner for w in _WAITING_IN) else "running"
        stack, where = _main_stack(frame)
    return json.dumps({"rank": rank, "step": context.at_step, "state": state, "where": where,
                       "stack": stack})


def _answer(store: Any, rank: int, answered: int) -> int:
    """Answer the peers' requests after `answered` (store round-trip); the last answered."""
    asked = int(store.add(_ASK_KEY, 0))
    if asked > answered:
        text = _whereabouts(rank)
        for n in range(answered + 1, asked + 1):
            store.set(f"{_WHERE_KEY}/{n}/{rank}", text)
    return asked


def _ask(store: Any, rank: int, world: int) -> dict[int, dict[str, Any]]:
    """The other ranks' whereabouts, as many as answer within ANSWER_S."""
    n = int(store.add(_ASK_KEY, 1))
    keys = {r: f"{_WHERE_KEY}/{n}/{r}" for r in range(world) if r != rank}
    deadline = time.monotonic() + ANSWER_S
    while not store.check(list(keys.values())) and time.monotonic() < deadline:
        time.sleep(0.1)  # one store round-trip per poll
    answers = {}
    for r, key in keys.items():
        with contextlib.suppress(Exception):  # no answer, or not ours to read
            if store.check([key]):
                answers[r] = json.loads(store.get(key).decode())
    return answers


def _diagnose(store: Any, err: BaseException, rank: int, world: int, step: int
              ) -> CollectiveError:
    """Ask the peers where they are and say which ranks did not reach the collective."""
    cause = _collective_error(err) or err
    timed_out = _timed_out(cause)
    try:
        answers = _ask(store, rank, world)
    except Exception:  # the store went away meanwhile: say what we know
        answers = {}
    after = f" after {_timeout.total_seconds():g}s" if _timeout is not None else ""
    what = f"timed out{after}" if timed_out else "failed"
    missing = f"did not reach the collective rank {rank} waited in at step {step} ({what})"
    lines, stuck = [], False
    for r in range(world):
        a = answers.get(r)
        if r == rank:
            continue
        if a is None:
            stuck = True
            lines.append(f"rank {r} of {world} {missing} and did not answer within "
                         f"{ANSWER_S:g}s: hung outside Python (e.g. a C call holding the GIL), "
                         "stopped or gone")
        elif a["state"] == "running":
            stuck = True
            at = a["step"] if a["step"] >= 0 else "?"
            lines.append(f"rank {r} of {world} {missing}: it was at step {at} in "
                         f"{a['where']}\n  stack of rank {r} (most recent call "
                         f"last):\n{''.join(a['stack']).rstrip()}")
    for r, a in sorted(answers.items()):
        if a["state"] != "running":
            at = a["step"] if a["step"] >= 0 else "?"
            doing = ("failing too (its own collective errored)" if a["state"] == "failing"
                     else "waiting in a collective too")
            lines.append(f"rank {r} was {doing}, at step {at}, in {a['where']}")
            if not stuck:  # then the stacks are the only clue to which collectives
                lines.append(f"  stack of rank {r} (most recent call last):\n"
                             f"{''.join(a['stack']).rstrip()}")
    if not stuck:
        lines.insert(0, f"rank {rank} of {world}: the collective at step {step} {what} while "
                        "every other rank was in a collective too: the ranks are out of "
                        "lockstep (a collective that only some ranks reach?)")
    lines.append(f"(rank {rank}: {type(cause).__name__}: {str(cause).strip()})")
    kind = CollectiveTimeoutError if timed_out else CollectiveError
    return kind("\n".join(lines))


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


def _peer_failure(store: Any, rank: int) -> str | None:
    """Another rank's reported failure, or None."""
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
    """Wait for every rank (if the group is still up). If it fails or times out, the
    peers are told (see `fail`) and the error names the rank that did not come."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception as err:
            replacement = fail(err, context.at_step)
            if replacement is None:
                raise
            raise replacement from err


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
