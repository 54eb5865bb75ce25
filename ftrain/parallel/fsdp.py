"""`with_fsdp`: parameters, gradients and optimizer state sharded across ranks (FSDP2).

At `init` the layer joins the process group as `with_ddp` does (same checks, failure
handling and timeouts), broadcasts rank 0's plain tensors, then applies torch's
`fully_shard` to the loop's bound modules: each block the wrapping policy picks, then a
root wrapper that calls the loss function (so FSDP sees the whole forward). The state's
params become the sharded parameters themselves (`DTensor`s, `Shard(0)` on a 1-D mesh
over the world) and every optimizer-state tensor shaped like a parameter is sharded the
same way, so each rank holds about 1/world of both (see docs/scaling.md). FSDP
reduce-scatters the gradients during backward (averaged over ranks), so the explicit
gradient all-reduce of a pure call does not run; the optimizer's kernels then update the
local shards. Clipping and the `grad_norm` metric read DTensor norms, which are global.

A state that already holds DTensors (a sharded checkpoint, or the result of an earlier
run) is gathered once per binding (parameter by parameter) and sharded again by FSDP.

Run as one process the layer does nothing, as `with_ddp`.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ftrain.core.bind import _Apply, binding_of
from ftrain.core.layer import Step
from ftrain.core.phases import with_option
from ftrain.core.state import TrainState, parts
from ftrain.errors import ConfigError
from ftrain.parallel import dist as _dist
from ftrain.parallel.join import join

ShardSpec = Sequence["type[nn.Module] | str"]


def _is_dtensor(t: Any) -> bool:
    # duck-typed: importing torch.distributed.tensor costs time on every `import ftrain`
    return isinstance(t, torch.Tensor) and hasattr(t, "device_mesh") and hasattr(t, "to_local")


def is_sharded(state: TrainState) -> bool:
    """True when `state` holds sharded tensors (DTensors), as a `with_fsdp` loop on more
    than one process leaves it.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.parallel.fsdp import is_sharded
        >>> is_sharded(ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1)))
        False
    """
    return any(_is_dtensor(t) for t in pytree.tree_leaves(
        (state.params, state.buffers, state.opt_state, state.slots)))


def unshard(state: TrainState) -> TrainState:
    """`state` with full, plain params and buffers (optimizer state unchanged): what a
    sharded state needs outside a `with_fsdp` loop (`ft.evaluate` and `ft.predict` call
    it; call it before `ft.bind` or an export). Every rank must call it: one all-gather
    per sharded tensor.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.parallel.fsdp import unshard
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1))
        >>> unshard(state).params["weight"].shape
        torch.Size([1, 2])
    """
    def full(t: Any) -> Any:
        return t.full_tensor() if _is_dtensor(t) else t
    return state.replace(params=pytree.tree_map(full, state.params),
                         buffers=pytree.tree_map(full, state.buffers))


def same_count(n: int | None) -> bool:
    """Whether every rank passes the same known number (a rank's evaluation batches):
    the sharded modules' forwards are collective, so ranks must run equally many. One
    all_gather of a Python int (host sync); every rank calls it."""
    import torch.distributed as dist
    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, n)
    return None not in counts and len(set(counts)) == 1


_MESH: dict[tuple[str, int], Any] = {}


def mesh_for(device_type: str, world: int) -> Any:
    """The 1-D device mesh over the whole world (made once per process)."""
    key = (device_type, world)
    if key not in _MESH:
        from torch.distributed.device_mesh import init_device_mesh
        _MESH[key] = init_device_mesh(device_type, (world,))
    return _MESH[key]


class _Root(_Apply):
    """The root FSDP module: calls `fn(model, batch)`; `no_sync` defers the
    reduce-scatter (accumulation: every micro-batch but the last)."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            self.set_requires_gradient_sync(True)  # type: ignore[operator]


@attrs.frozen(eq=False)
class FSDP:
    """The sharding option `with_fsdp` gives a core step (a frozen record)."""

    backend: str | None
    timeout: datetime.timedelta
    shard: tuple[Any, ...] | None
    reshard_after_forward: bool
    offload: bool

    def __attrs_post_init__(self) -> None:
        if self.backend not in (None, "gloo", "nccl", "mpi", "xccl"):
            raise ConfigError(f"with_fsdp: backend must be None, 'gloo' or 'nccl', got "
                              f"{self.backend!r}")
        if not isinstance(self.timeout, datetime.timedelta):
            raise ConfigError(f"with_fsdp: timeout must be a datetime.timedelta, got "
                              f"{type(self.timeout).__name__}")
        for item in self.shard or ():
            if not (isinstance(item, str) or (isinstance(item, type)
                                              and issubclass(item, nn.Module))):
                raise ConfigError(f"with_fsdp: shard= takes module classes and name patterns "
                                  f"(fnmatch), got {item!r}")
        for flag in ("reshard_after_forward", "offload"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"with_fsdp: {flag} must be True or False, got "
                                  f"{getattr(self, flag)!r}")

    def __repr__(self) -> str:
        return f"with_fsdp(world={self.world})"

    @property
    def world(self) -> int:
        return _dist.rank_world()[1]

    # -- the wrapping policy -------------------------------------------------------------

    def targets(self, model: nn.Module) -> list[nn.Module]:
        """The modules to shard, innermost first (the root wrapper comes after them).
        Patterns and classes that match nothing are an error naming them."""
        named = [(n, m) for n, m in model.named_modules() if n]
        if self.shard is None:  # each top-level block that holds parameters
            return [m for _, m in model.named_children()
                    if any(True for _ in m.parameters())]
        hits: dict[int, tuple[int, nn.Module]] = {}
        unmatched = []
        for item in self.shard:
            found = [(n, m) for n, m in named
                     if (isinstance(m, item) if isinstance(item, type)
                         else fnmatch.fnmatchcase(n, item))]
            if not found:
                unmatched.append(item.__name__ if isinstance(item, type) else item)
            for n, m in found:
                hits[id(m)] = (n.count("."), m)
        if unmatched:
            raise ConfigError(f"with_fsdp: shard= entries {unmatched} match no submodule of "
                              f"the model; its submodules are "
                              f"{[n for n, _ in named][:20]}")
        return [m for _, m in sorted(hits.values(), key=lambda x: -x[0])]  # deepest first

    # -- the layer's work ------------------------------------------------------------------

    def init(self, state: TrainState, amp: Any = None) -> TrainState:
        """Join the process group, start from rank 0's state, shard the bound modules
        (`amp`: the core's `with_amp` option, for the mixed-precision policy)."""
        self.targets(_Apply(state.model).model)  # a bad policy fails on one process too
        # sharded tensors differ by rank by design; the rest must start equal
        if join(state, self.backend, self.timeout, lambda t: not _is_dtensor(t)) > 1:
            binding = binding_of(state)
            if binding is not None:
                self.module_for(binding, state, amp)
        return state

    def check_pure(self, state: TrainState) -> None:
        if is_sharded(state):
            raise ConfigError("a direct (pure) call of a with_fsdp step on a sharded state is "
                              "not supported: run it in a loop (ft.fit / ft.iterate), which "
                              "runs the forward through the sharded modules")

    def module_for(self, binding: Any, state: TrainState, amp: Any = None) -> Any:
        """The root FSDP module of the binding (built once per binding: the state's params
        and optimizer state become sharded, in place), or None on one process."""
        world = self.world
        if world <= 1:
            return None
        if binding.fsdp is not None:
            return binding.fsdp
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )
        device = binding.leaves[0].device if binding.leaves else state.device
        mesh = mesh_for(device.type, world)
        _gather_sharded(binding)
        root = _Root(binding.model_arg)
        kw: dict[str, Any] = dict(
            mesh=mesh, reshard_after_forward=self.reshard_after_forward,
            # bf16 compute copies of fp32 shards; gradients reduced in fp32
            mp_policy=MixedPrecisionPolicy(param_dtype=amp.dtype, reduce_dtype=torch.float32)
            if amp is not None else MixedPrecisionPolicy(),
            offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
            if self.offload else OffloadPolicy())
        for target in self.targets(root.model):
            fully_shard(target, **kw)
        fully_shard(root, **kw)
        root._get_fsdp_state()._lazy_init()  # type: ignore[operator]  # pads shards now
        _adopt_shards(binding, state, mesh)
        binding.fsdp = root
        return root


def _gather_sharded(binding: Any) -> None:
    """Replace DTensor parameters (a sharded state bound again) by full plain ones, so
    FSDP shards them afresh (one all-gather per parameter)."""
    for module in binding.modules.values():
        made: dict[int, nn.Parameter] = {}
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            if not _is_dtensor(p):
                continue
            new = made.get(id(p))
            if new is None:
                new = made[id(p)] = nn.Parameter(p.full_tensor().detach(),  # type: ignore
                                                 requires_grad=p.requires_grad)
            path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(path) if path else module
            owner._parameters[leaf] = new


def _adopt_shards(binding: Any, state: TrainState, mesh: Any) -> None:
    """Make the state's params FSDP's sharded parameters (detached views, sharing their
    storage) and shard its parameter-shaped optimizer state alike; the binding updates
    the sharded parameters from now on."""
    for part, _, _, params, _, opt_state in parts(state):
        module = binding.modules[part]
        shapes = {}
        trainable = {}
        for name, p in module.named_parameters():
            shapes[name] = p.shape
            params[name] = p.detach()
            if p.requires_grad:
                trainable[name] = p
        binding.trainable[part] = trainable
        _shard_tree(opt_state, shapes, mesh)
    binding.leaves = [p for ps in binding.trainable.values() for p in ps.values()]
    binding.prepared = {}
    binding._tracked = None


def _shard_tree(node: Any, shapes: dict[str, torch.Size], mesh: Any) -> None:
    """Shard, in place, every tensor of a nested dict that sits under a parameter's name
    with that parameter's shape (exp_avg, momentum, ...); scalars stay plain."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if isinstance(value, dict):
            _shard_tree(value, shapes, mesh)
        elif isinstance(value, torch.Tensor) and key in shapes and value.dim() >= 1 \
                and value.shape == shapes[key]:
            node[key] = shard_like_fsdp(value, mesh)


def shard_like_fsdp(t: torch.Tensor, mesh: Any) -> Any:
    """`t` as FSDP2 shards a parameter: a DTensor, `Shard(0)` over `mesh`. A plain tensor
    (equal on every rank) keeps this rank's chunk, without communication."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    if _is_dtensor(t):
        if tuple(t.placements) == (Shard(0),) and t.device_mesh == mesh:  # type: ignore
            return DTensor.from_local(t.to_local(), mesh, [Shard(0)],  # type: ignore
                                      run_check=False, shape=t.shape, stride=t.stride())
        t = t.full_tensor()  # type: ignore[attr-defined]  # another layout: gather it
    return distribute_tensor(t.detach(), mesh, [Shard(0)], src_data_rank=None)


def with_fsdp(step: Any, *, shard: ShardSpec | None = None,
              reshard_after_forward: bool = True, offload: bool = False,
              backend: str | None = None,
              timeout: datetime.timedelta = _dist.DEFAULT_TIMEOUT) -> Step:
    """Train on every process `torchrun` starts, each holding 1/world of the model.

    Torch's FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state across
    ranks: each module of the wrapping policy gathers its parameters just before its
    forward (and backward) and frees them after, so a rank holds one block's full
    parameters at a time. `shard` is that policy: by default each top-level child module
    that has parameters, then the root; else a list of module classes and fnmatch
    patterns over submodule names (`["layers.*"]`); an entry that matches nothing is a
    `ConfigError`. `reshard_after_forward=False` keeps the gathered parameters from the
    forward to the backward (less communication, more memory). `offload=True` keeps the
    shards and the optimizer update on the CPU (`CPUOffloadPolicy`). With
    `ft.with_amp(dtype=torch.bfloat16)` the forward runs in bfloat16 on bfloat16 copies
    of the float32 shards (`MixedPrecisionPolicy`; gradients are reduced in float32);
    float16 is refused. The data is sharded by rank and metrics reduced as under
    `with_ddp`, whose `backend` and `timeout` these are. On one process the layer does
    nothing; a direct call on a plain state is the unsharded step.

    Examples:
        >>> import torch, ftrain as ft
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> step = ft.with_fsdp(step)   # launch with: torchrun --nproc_per_node=2 train.py
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.adamw(0.1))
        >>> state, metrics = step(state, (torch.randn(8, 3), torch.randn(8, 1)))
    """
    if shard is not None and (isinstance(shard, (str, type))
                              or not isinstance(shard, Sequence)):
        raise ConfigError(f"with_fsdp: shard= must be a list of module classes and name "
                          f"patterns, got {shard!r}")
    option = FSDP(backend, timeout, tuple(shard) if shard is not None else None,
                  reshard_after_forward, offload)
    return with_option(step, "fsdp", option, "with_fsdp",
                       " (with_fsdp supports ft.train_step cores)")
