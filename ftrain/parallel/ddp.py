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

Run as one process (plain `python`), the layer does nothing: the same script runs both
ways.
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs

from ftrain.core.bind import _Apply
from ftrain.core.layer import Step
from ftrain.core.phases import with_option
from ftrain.core.state import TrainState
from ftrain.errors import ConfigError
from ftrain.parallel import dist as _dist
from ftrain.parallel.join import join


@attrs.frozen(eq=False)
class DDP:
    """The data-parallel option `with_ddp` gives a core step (a frozen record)."""

    backend: str | None
    timeout: datetime.timedelta
    options: dict[str, Any]

    def __attrs_post_init__(self) -> None:
        if self.backend not in (None, "gloo", "nccl", "mpi", "xccl"):
            raise ConfigError(f"with_ddp: backend must be None, 'gloo' or 'nccl', got "
                              f"{self.backend!r}")
        if not isinstance(self.timeout, datetime.timedelta):
            raise ConfigError(f"with_ddp: timeout must be a datetime.timedelta, got "
                              f"{type(self.timeout).__name__}")

    def __repr__(self) -> str:
        return f"with_ddp(world={self.world})"

    @property
    def world(self) -> int:
        return _dist.rank_world()[1]

    def init(self, state: TrainState) -> TrainState:
        """Join the process group; every rank starts where rank 0 does, with its tensors
        (copied in place: a loop's bound module sees rank 0's values)."""
        join(state, self.backend, self.timeout)
        return state

    def module_for(self, binding: Any) -> Any:
        """The binding's modules under DistributedDataParallel (built once per binding),
        or None on a single process."""
        if self.world <= 1:
            return None
        ddp = binding.ddp
        if ddp is None:
            from torch.nn.parallel import DistributedDataParallel
            apply = _Apply(binding.model_arg)
            device = binding.leaves[0].device
            ddp = DistributedDataParallel(
                apply, device_ids=[device] if device.type == "cuda" else None,
                init_sync=False,  # init already broadcast rank 0's state
                **{k: v for k, v in self.options.items() if v is not None})
            binding.ddp = ddp
        return ddp


def with_ddp(step: Any, *, backend: str | None = None,
             timeout: datetime.timedelta = _dist.DEFAULT_TIMEOUT,
             find_unused_parameters: bool = False, sync_buffers: bool = True,
             bucket_cap_mb: float | None = None, gradient_as_bucket_view: bool = True,
             static_graph: bool = False) -> Step:
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
    step; it is off because a loss function may branch. On one process the layer does
    nothing.

    Examples:
        >>> import torch, ftrain as ft
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> step = ft.with_ddp(step)   # launch with: torchrun --nproc_per_node=2 train.py
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state, metrics = step(state, (torch.randn(8, 3), torch.randn(8, 1)))
    """
    options: dict[str, Any] = dict(
        find_unused_parameters=find_unused_parameters, forward_sync_buffers=sync_buffers,
        bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
        static_graph=static_graph)
    return with_option(step, "ddp", DDP(backend, timeout, options), "with_ddp")
