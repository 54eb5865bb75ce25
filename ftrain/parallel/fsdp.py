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

FSDP shards meta placeholders, so no rank ever holds the whole model: each allocates its
shards and copies in its chunk of a plain state, its local part of a sharded one (a
sharded checkpoint, an earlier run), or, for a model built on the meta device, the values
its modules' initializers give (`ftrain.parallel.materialize`).

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
from ftrain.parallel.materialize import InitFn, holds_meta

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
    init_fn: InitFn | None = None

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
        if self.init_fn is not None and not callable(self.init_fn):
            raise ConfigError(f"with_fsdp: init must be a function init(module) or None, got "
                              f"{self.init_fn!r}")
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
        world = join(state, self.backend, self.timeout,
                     lambda t: not _is_dtensor(t) and not t.is_meta)
        binding = binding_of(state)
        if binding is not None and (world > 1 or holds_meta(_tensors(state))):
            self.module_for(binding, state, amp)
        return state

    def check_pure(self, state: TrainState) -> None:
        if holds_meta(_tensors(state)):
            raise ConfigError(_DEFERRED_PURE)
        if is_sharded(state):
            raise ConfigError("a direct (pure) call of a with_fsdp step on a sharded state is "
                              "not supported: run it in a loop (ft.fit / ft.iterate), which "
                              "runs the forward through the sharded modules")

    def module_for(self, binding: Any, state: TrainState, amp: Any = None) -> Any:
        """The root FSDP module of the binding (built once per binding: the state's params
        and optimizer state become sharded, in place), or None on one process (where a
        meta-device state is made real, whole)."""
        world = self.world
        if binding.fsdp is not None:
            return binding.fsdp
        device = _device_of(binding)
        if world <= 1:
            if holds_meta(_tensors(state)):
                sources = _sources(binding)
                for module in binding.modules.values():
                    module.to_empty(device=device)
                _make_real(binding, sources, state.seed, self.init_fn)
                _adopt(binding, state, None, device)
            return None
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )
        mesh = mesh_for(device.type, world)
        # FSDP shards meta placeholders (no memory), each rank allocates its shards, then
        # gets their values: its chunk of a plain tensor, its local part of a sharded one
        # (a sharded checkpoint), an initializer's values for a meta one: never whole
        sources = _sources(binding)
        _to_placeholders(binding)
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
        root.to_empty(device=device)
        _make_real(binding, sources, state.seed, self.init_fn)
        root._get_fsdp_state()._lazy_init()  # type: ignore[operator]  # pads shards now
        _adopt(binding, state, mesh, device)
        binding.fsdp = root
        return root


_DEFERRED_PURE = ("a direct (pure) call of a with_fsdp step on a meta-device state is not "
                  "supported: run it in a loop (ft.fit / ft.iterate), which makes the "
                  "tensors real when it starts")


def _tensors(state: TrainState) -> Any:
    return (state.params, state.buffers, state.opt_state)


def _device_of(binding: Any) -> torch.device:
    """Where the shards live: the bound tensors' device, or this process's device for a
    meta-device model."""
    for module in binding.modules.values():
        for t in list(module.parameters()) + list(module.buffers()):
            if not t.is_meta:
                return t.device
    return _dist.local_device()


def _sources(binding: Any) -> dict[Any, dict[str, torch.Tensor]]:
    """Every bound tensor by part and name (tied ones under each name), before FSDP."""
    # detached: to_empty may swap a Parameter's data in place, these keep the old tensors
    return {part: {n: t.detach() for n, t in [*m.named_parameters(remove_duplicate=False),
                                              *m.named_buffers(remove_duplicate=False)]}
            for part, m in binding.modules.items()}


def _to_placeholders(binding: Any) -> None:
    """Replace the bound modules' parameters by meta ones of the same shape (tied ones
    stay tied), for FSDP to shard without memory; buffers are reallocated by to_empty."""
    for module in binding.modules.values():
        made: dict[int, nn.Parameter] = {}
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            new = made.get(id(p))
            if new is None:
                new = made[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"),
                    requires_grad=p.requires_grad)
            path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(path) if path else module
            owner._parameters[leaf] = new


def _layout(t: Any) -> tuple[Any, ...]:
    return tuple(t.placements), t.device_mesh, t.shape


def _make_real(binding: Any, sources: dict[Any, dict[str, torch.Tensor]], seed: int,
               init: InitFn | None) -> None:
    """Give the bound modules' freshly allocated tensors their values from `sources`
    (whole, or this rank's chunk), and initialize those whose source was meta."""
    from ftrain.parallel.materialize import initialize, write
    for part, module in binding.modules.items():
        pending: set[int] = set()
        names: dict[int, str] = {}
        done: set[int] = set()
        for name, t in [*module.named_parameters(remove_duplicate=False),
                        *module.named_buffers(remove_duplicate=False)]:
            if id(t) in done:
                continue
            done.add(id(t))
            src = sources[part][name]
            if src.is_meta:
                pending.add(id(t))
                names[id(t)] = name if part is None else f"{part}.{name}"
            elif _is_dtensor(src) and _is_dtensor(t) and _layout(src) == _layout(t):
                with torch.no_grad():  # a sharded checkpoint's shard: this rank's already
                    t.to_local().copy_(src.to_local())  # type: ignore[attr-defined]
            else:
                write(t, src.full_tensor() if _is_dtensor(src) else src)  # type: ignore
        if pending:
            initialize(module, pending, names, seed, init)


def _adopt(binding: Any, state: TrainState, mesh: Any, device: torch.device) -> None:
    """Make the state's params the modules' (now FSDP's sharded) parameters (detached
    views, sharing their storage) and its buffers the modules' buffers; shard its
    parameter-shaped optimizer state alike, or create it afresh where it was meta; the
    binding updates these parameters from now on."""
    from ftrain.core import rng as _rng
    for part, _, optimizer, params, buffers, opt_state in parts(state):
        module = binding.modules[part]
        shapes = {}
        trainable = {}
        for name, p in module.named_parameters():
            shapes[name] = p.shape
            params[name] = p.detach()
            if p.requires_grad:
                trainable[name] = p
        for name, b in module.named_buffers():
            buffers[name] = b
        binding.trainable[part] = trainable
        if holds_meta(opt_state):  # a meta-device start: the optimizer's fresh state
            fresh = optimizer.init({n: p.detach() for n, p in trainable.items()})
            opt_state.clear()
            opt_state.update(fresh)
        elif mesh is not None:
            _shard_tree(opt_state, shapes, mesh)
    binding.leaves = [p for ps in binding.trainable.values() for p in ps.values()]
    binding.prepared = {}
    binding._tracked = None
    binding.generator = _rng.generator_for(device)


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
              init: InitFn | None = None, backend: str | None = None,
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
    float16 is refused. A model built on the meta device (`with torch.device("meta"):`)
    never exists whole: each rank allocates its shards and fills them module by module
    from `reset_parameters()`, or `init(module)` when given (values as the CPU build's
    after the same seed; see `ftrain.parallel.materialize`). The data is sharded by rank
    and metrics reduced as under
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
                  reshard_after_forward, offload, init)
    return with_option(step, "fsdp", option, "with_fsdp",
                       " (with_fsdp supports ft.train_step cores)")
