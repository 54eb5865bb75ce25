"""Models built on the meta device, made real without ever being whole on one rank.

`with torch.device("meta"): model = Net()` allocates nothing; `TrainState.create` keeps
such a model's tensors as meta placeholders (a *deferred* state) and `with_fsdp` makes
them real when the run starts: each rank allocates only its shards, then module by module
(children before parents, the order in which constructors run) the module's initializer
runs on full CPU copies of its tensors and each rank keeps its chunk. A rank so holds one
module's full tensors at a time, as the sharded forward does. Every rank draws from the
CPU generator seeded with the state's seed, so the values are those `Net()` gets on the
CPU after `torch.manual_seed(state.seed)`, on any world size and device (the global
generator is left as it was).

The initializer is the module's `reset_parameters()` (torch's layers; `_reset_parameters`
for `nn.MultiheadAttention`), which sees its whole subtree full (MultiheadAttention sets
its `out_proj.bias`), or `init(module)` given to `with_fsdp`, called for each module that
holds tensors to make, with its own tensors full. A tensor no initializer wrote (it still
holds the NaN it was filled with; an integer or bool tensor nothing wrote to) is a
`ConfigError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ftrain.errors import ConfigError

InitFn = Callable[[nn.Module], None]


def is_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


def holds_meta(tree: Any) -> bool:
    """Whether any tensor in `tree` (a state's fields) is a meta placeholder."""
    return any(is_meta(t) for t in pytree.tree_leaves(tree))


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _post_order(child)
    yield module


def _slots(module: nn.Module, recurse: bool) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """(owner's _parameters or _buffers, name, tensor) for each distinct tensor."""
    seen: set[int] = set()
    out = []
    for owner in (module.modules() if recurse else [module]):
        for table in (owner._parameters, owner._buffers):
            for leaf, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((table, leaf, t))
    return out


def _initializer(module: nn.Module, init: InitFn | None) -> Callable[[], Any] | None:
    if init is not None:
        return lambda: init(module)
    for name in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole of `t` (a DTensor is all-gathered: every rank calls this)."""
    whole = t.full_tensor() if hasattr(t, "full_tensor") else t  # type: ignore[operator]
    return whole.detach().to("cpu", copy=True)


def write(t: torch.Tensor, full: torch.Tensor) -> None:
    """Copy `full` into `t`: the whole of it, or this rank's dim-0 chunk for a `Shard(0)`
    DTensor (the layout FSDP2 gives a parameter; `torch.chunk`'s split, no
    communication)."""
    with torch.no_grad():
        if hasattr(t, "to_local"):
            mesh = t.device_mesh  # type: ignore[attr-defined]
            chunks = torch.chunk(full, mesh.size(), dim=0)
            rank = mesh.get_local_rank()
            local = t.to_local()  # type: ignore[operator]
            part = chunks[rank] if rank < len(chunks) else full[:0]
            local.copy_(part.reshape(local.shape))
        else:
            t.copy_(full)


def initialize(model: nn.Module, pending: set[int], names: dict[int, str], seed: int,
               init: InitFn | None = None) -> None:
    """Give each tensor of `model` whose id is in `pending` (allocated, not yet set) its
    initial value, module by module, drawing from the CPU generator seeded with `seed`;
    `names` names them for the error. Every rank calls this (DTensors are gathered and
    written chunk-wise).

    Examples:
        >>> import torch
        >>> from ftrain.parallel.materialize import initialize
        >>> with torch.device("meta"):
        ...     layer = torch.nn.Linear(3, 2)
        >>> layer = layer.to_empty(device="cpu")
        >>> initialize(layer, {id(layer.weight), id(layer.bias)}, {}, seed=0)
        >>> _ = torch.manual_seed(0)
        >>> torch.equal(layer.weight, torch.nn.Linear(3, 2).weight)
        True
    """
    todo = set(pending)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU one only: CUDA's stay as they are
        for module in _post_order(model):
            # a parent's initializer runs whenever its subtree had tensors to make, even
            # when its children made them all: it may set them again (torch's Transformer,
            # a parent's reset_parameters), as after construction on the CPU
            own = any(id(t) in pending for _, _, t in _slots(module, recurse=False))
            below = any(id(t) in pending for _, _, t in _slots(module, recurse=True))
            if not (own if init is not None else below):
                continue
            fn = _initializer(module, init)
            if fn is None:
                continue
            scope = _slots(module, recurse=init is None)
            fulls = []
            for _, _, t in scope:  # host sync: a one-time copy per tensor
                if id(t) in todo:  # NaN, or zeros for integers (set: see the versions)
                    f = torch.zeros(t.shape, dtype=t.dtype, device="cpu")
                    if f.is_floating_point() or f.is_complex():
                        f.fill_(float("nan"))
                    fulls.append(f)
                else:
                    fulls.append(_full(t))
            for (table, leaf, t), f in zip(scope, fulls):
                table[leaf] = nn.Parameter(f, requires_grad=t.requires_grad) \
                    if isinstance(t, nn.Parameter) else f
            placed = [table[leaf] for table, leaf, _ in scope]
            versions = [x._version for x in placed]
            try:
                with torch.no_grad():
                    fn()
            finally:
                made = [table[leaf] for table, leaf, _ in scope]
                for table, leaf, t in scope:
                    table[leaf] = t
            for (_, _, t), f, before, v in zip(scope, made, placed, versions):
                write(t, f.detach())
                if id(t) not in todo:
                    continue
                if f.is_floating_point() or f.is_complex():
                    done = not bool(f.isnan().any())  # every entry written
                else:  # integers and bools: written in place, or replaced
                    done = f is not before or f._version != v
                if done:
                    todo.discard(id(t))
    if todo:
        missing = sorted(names.get(i, "?") for i in todo)
        raise ConfigError(
            f"with_fsdp: {missing[:12]} of the meta-device model got no initial value: "
            "their modules have no reset_parameters() that sets them; pass "
            "with_fsdp(init=fn), fn(module) setting each module's own tensors in place")
