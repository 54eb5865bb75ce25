"""`with_ddp`: data parallelism over torch.distributed, launched with `torchrun`.

At `init` the layer joins the process group torchrun describes (nccl on CUDA, gloo on the
CPU, with a training-sized collective timeout), checks that every rank starts at the same
step and data position, and broadcasts rank 0's params, buffers and optimizer state. In a
loop the core step then runs its forward through torch's `DistributedDataParallel` on
the bound module (the loss function is called inside a small wrapper module, so DDP sees
the forward and overlaps the gradient all-reduce with backward); a direct (pure) call and
a manual step all-reduce gradients explicitly. The loops shard the data by rank
(`DistributedSampler` order), evaluation shards too and all-reduces its weighted sums,
logged metrics are reduced across ranks, and files are written by rank 0 only.

With `sync_batchnorm=True` the modules a step runs on several processes have their
BatchNorm layers replaced by torch's SyncBatchNorm (`ftrain.parallel.syncbn`); the state
keeps the plain model's template and tensor names.

Run as one process (plain `python`), the layer does nothing: the same script runs both
ways.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import itertools
from typing import Any

import attrs
import torch

from ftrain.core.bind import _Apply, binding_of
from ftrain.core.layer import Step
from ftrain.core.phases import with_option
from ftrain.core.state import TrainState
from ftrain.errors import ConfigError
from ftrain.parallel import dist as _dist
from ftrain.parallel import syncbn as _syncbn
from ftrain.parallel.join import join


@attrs.frozen(eq=False)
class DDP:
    """The data-parallel option `with_ddp` gives a core step (a frozen record)."""

    backend: str | None
    timeout: datetime.timedelta
    options: dict[str, Any]
    sync_batchnorm: bool = False

    def __attrs_post_init__(self) -> None:
        if self.backend not in (None, "gloo", "nccl", "mpi", "xccl"):
            raise ConfigError(f"with_ddp: backend must be None, 'gloo' or 'nccl', got "
                              f"{self.backend!r}")
        if not isinstance(self.timeout, datetime.timedelta):
            raise ConfigError(f"with_ddp: timeout must be a datetime.timedelta, got "
                              f"{type(self.timeout).__name__}")
        if not isinstance(self.sync_batchnorm, bool):
            raise ConfigError(f"with_ddp: sync_batchnorm must be True or False, got "
                              f"{self.sync_batchnorm!r}")

    def __repr__(self) -> str:
        synced = ", sync_batchnorm=True" if self.sync_batchnorm else ""
        return f"with_ddp(world={self.world}{synced})"

    @property
    def world(self) -> int:
        return _dist.rank_world()[1]

    def init(self, state: TrainState) -> TrainState:
        """Join the process group; every rank starts where rank 0 does, with its tensors
        (copied in place: a loop's bound module sees rank 0's values). With
        sync_batchnorm, a device SyncBatchNorm cannot train on is refused first, before
        any collective, so every rank raises the same ConfigError by itself."""
        if self.sync_batchnorm:
            _syncbn.check_device(state.device, _syncbn.world_to_come())
        join(state, self.backend, self.timeout)
        binding = binding_of(state)
        if binding is not None:
            self.prepare(binding)
        return state

    def prepare(self, binding: Any) -> None:
        """With sync_batchnorm on several processes, convert the binding's BatchNorm
        modules to SyncBatchNorm (once per binding: a binding made mid-run, after
        `freeze`, is converted when it first steps)."""
        if self.sync_batchnorm and not binding.sync_batchnorm and self.world > 1:
            _syncbn.check_device(_device(binding), self.world)
            binding.convert_modules(_syncbn.convert)
            binding.sync_batchnorm = True

    def template_for(self, state: TrainState) -> Any:
        """The template a direct (pure) call runs: the state's, or with sync_batchnorm on
        several processes a converted copy of it (the state's template is not changed)."""
        if not self.sync_batchnorm or self.world <= 1:
            return state.model
        _syncbn.check_device(state.device, self.world)
        return _syncbn.synced_template(state.model)

    def module_for(self, binding: Any) -> Any:
        """The binding's modules under DistributedDataParallel (built once per binding),
        or None on a single process."""
        if self.world <= 1:
            return None
        ddp = binding.ddp
        if ddp is None:
            from torch.nn.parallel import DistributedDataParallel
            self.prepare(binding)  # before DDP registers the modules
            apply = _Apply(binding.model_arg)
            device = binding.leaves[0].device
            options = {k: v for k, v in self.options.items() if v is not None}
            if "forward_sync_buffers" in options and not _has_forward_sync_buffers():
                # torch before forward_sync_buffers named it broadcast_buffers
                options["broadcast_buffers"] = options.pop("forward_sync_buffers")
            ddp = DistributedDataParallel(
                apply, device_ids=[device] if device.type == "cuda" else None,
                init_sync=False,  # init already broadcast rank 0's state
                **options)
            binding.ddp = ddp
        return ddp


@functools.cache
def _has_forward_sync_buffers() -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters


def _device(binding: Any) -> torch.device:
    """Where the binding's modules live (the first tensor's device; CPU without any)."""
    for module in binding.modules.values():
        for t in itertools.chain(module.parameters(), module.buffers()):
            return t.device
    return torch.device("cpu")


def with_ddp(step: Any, *, backend: str | None = None,
             timeout: datetime.timedelta = _dist.DEFAULT_TIMEOUT,
             find_unused_parameters: bool = False, sync_buffers: bool = True,
             bucket_cap_mb: float | None = None, gradient_as_bucket_view: bool = True,
             static_graph: bool = False, sync_batchnorm: bool = False) -> Step:
    """Train on every process `torchrun` starts, as one data-parallel run.

    Each rank gets its own shard of every epoch (interleaved by rank, ordered by
    (seed, epoch)); gradients are averaged with torch's DistributedDataParallel, so 2
    ranks with batch b train as 1 process with batch 2b. Logs and checkpoints come from
    rank 0; metrics are averaged across ranks when logged. If a rank fails, it logs its
    traceback and takes the process group down, so every rank exits promptly.
    `timeout` bounds every collective (torch's default is 30 minutes); when one times
    out, the waiting rank raises `CollectiveTimeoutError` naming the ranks that never
    reached it, with their step and Python stack, and those ranks are stopped too. The
    remaining arguments go to `DistributedDataParallel`. `gradient_as_bucket_view` is on
    by default (torch's is off): DDP then hands the update its all-reduce buckets as the
    gradients instead of copying them out, which saves that copy and a second set of
    gradients in memory, and trains bitwise as the copy does (tested on 2 processes).
    `static_graph=True` suits a loss that uses the same parameters the same way every
    step; it is off because a loss function may branch. `sync_batchnorm=True` normalizes
    every BatchNorm with the statistics of the global batch (torch's SyncBatchNorm, put
    in the modules the step runs; the state, its template and its checkpoints stay those
    of the plain model); it needs the model on a CUDA device (or another accelerator
    torch's SyncBatchNorm supports): on several CPU processes init raises a ConfigError.
    On one process the layer does nothing.

    Examples:
        >>> import torch, ftrain as ft
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> step = ft.with_ddp(step)   # launch with: torchrun --nproc_per_node=2 train.py
        >>> synced = ft.with_ddp(ft.train_step(lambda m, b: m(b).mean()), sync_batchnorm=True)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state, metrics = step(state, (torch.randn(8, 3), torch.randn(8, 1)))
    """
    options: dict[str, Any] = dict(
        find_unused_parameters=find_unused_parameters, forward_sync_buffers=sync_buffers,
        bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
        static_graph=static_graph)
    return with_option(step, "ddp", DDP(backend, timeout, options, sync_batchnorm),
                       "with_ddp")
