"""`with_ddp(sync_batchnorm=True)`: BatchNorm statistics over the global batch.

torch's `SyncBatchNorm.convert_sync_batchnorm` replaces every BatchNorm module of the
modules a step runs: a loop's bound modules (once per binding, before DDP wraps them)
and a pure call's copy of the template. The replacement takes over the BatchNorm's own
parameter and buffer tensors under the same names, so the state, its checkpoints and the
template it carries stay those of the plain model: a checkpoint of a synced run loads
into a plain one and back, and the state a loop returns holds plain BatchNorm.

Cost: in train mode each BatchNorm all-gathers its per-rank mean, inverse std and count
(2C + 1 numbers) in the forward and all-reduces two C-vectors in the backward; eval mode
uses the running statistics and syncs nothing. torch computes those statistics with
kernels that exist for accelerators only (`batch_norm_stats` has no CPU kernel), so a
run on several CPU processes is refused at init.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ftrain.errors import ConfigError


def devices() -> tuple[str, ...]:
    """The device types SyncBatchNorm's training forward accepts (torch's own list).

    Examples:
        >>> from ftrain.parallel.syncbn import devices
        >>> "cuda" in devices() and "cpu" not in devices()
        True
    """
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def world_to_come() -> int:
    """The world size of this run, known before the process group is joined: the group's
    if it exists, else what torchrun says (WORLD_SIZE).

    Examples:
        >>> from ftrain.parallel.syncbn import world_to_come
        >>> world_to_come() >= 1
        True
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_device(device: torch.device, world: int) -> None:
    """Refuse a run that SyncBatchNorm cannot serve: several processes on a device type
    without its kernels (the CPU). One process syncs nothing and is accepted anywhere.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.parallel.syncbn import check_device
        >>> check_device(torch.device("cpu"), 1)   # one process: nothing to sync
        >>> try:
        ...     check_device(torch.device("cpu"), 2)
        ... except ft.ConfigError as err:
        ...     print(str(err).split(" (or")[0], "...", str(err).split("), ")[1][:9])
        with_ddp(sync_batchnorm=True) on 2 processes needs the model on a CUDA device ... found cpu
    """
    if world > 1 and device.type not in devices():
        others = ", ".join(d for d in devices()[1:] if d != "privateuseone")  # unnamed
        raise ConfigError(
            f"with_ddp(sync_batchnorm=True) on {world} processes needs the model on a CUDA "
            f"device (or {others}), found {device.type}: torch's SyncBatchNorm computes its "
            "statistics with accelerator kernels only; train on GPUs, or drop "
            "sync_batchnorm=True (each rank then normalizes with its own batch's statistics)")


def convert(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm (any `_BatchNorm`) replaced by a `SyncBatchNorm` that
    holds the same parameter and buffer tensors under the same names (torch's
    `convert_sync_batchnorm`). Converts in place below the root and returns the root (a
    new one if the root itself is a BatchNorm). Hooks registered on a BatchNorm module
    itself are not carried over (as torch's function does).

    Examples:
        >>> import torch
        >>> from ftrain.parallel.syncbn import convert
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> before = dict(net.state_dict(keep_vars=True))
        >>> synced = convert(net)
        >>> type(synced[1]).__name__
        'SyncBatchNorm'
        >>> all(t is before[n] for n, t in synced.state_dict(keep_vars=True).items())
        True
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether `module` holds a BatchNorm layer (what `convert` replaces).

    Examples:
        >>> import torch
        >>> from ftrain.parallel.syncbn import has_batchnorm
        >>> has_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
        False
    """
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


# A pure call's synced copy of a template, made once per template (meta: no weights).
_synced_templates: weakref.WeakKeyDictionary[nn.Module, nn.Module] = \
    weakref.WeakKeyDictionary()


def synced_template(model: Any) -> Any:
    """A converted copy of a state's template (a module, or a dict of them for several
    models), cached per template; the template itself is left as it is.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.parallel.syncbn import synced_template
        >>> state = ft.TrainState.create(torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
        >>> type(synced_template(state.model)[0]).__name__, type(state.model[0]).__name__
        ('SyncBatchNorm', 'BatchNorm1d')
    """
    if isinstance(model, dict):
        return {k: synced_template(v) for k, v in model.items()}
    copy = _synced_templates.get(model)
    if copy is None:
        import copy as _copy
        copy = _synced_templates[model] = convert(_copy.deepcopy(model))
    return copy
