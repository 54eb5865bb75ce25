"""The phases of one update, shared by `train_step` and hand-written (manual) steps.

Inner combinators (`with_amp`, `with_accumulation`, `with_ddp`) do not wrap the
computation: each returns a new stack whose core step has one more option set (a frozen
`Phases` record; `with_option` below), and the core runs the phases in this fixed order
whatever the wrapping order was:

    forward and loss under autocast -> (scaled) backward -> gradient sync across ranks
    -> unscale and finite check (agreed by all ranks) -> clipping -> update -> scale update

Everything here runs on the device: no host sync.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import attrs
import torch

from ftrain.core.layer import map_core
from ftrain.core.state import clone_tree
from ftrain.errors import ConfigError

# A logging layer's request for this call: add the global gradient norm (after backward,
# before clipping) to the metrics. A context variable, set around one call, so no step
# object is ever changed to ask for it (one `.get()` per step).
GRAD_NORM: contextvars.ContextVar[bool] = contextvars.ContextVar("ftrain_grad_norm",
                                                                 default=False)


@attrs.frozen
class Phases:
    """The options inner combinators give a core step; each kind set at most once.

    `amp`: `ftrain.core.amp.Amp` (autocast dtype, loss scaler); `accumulation`:
    `ftrain.core.accumulation.Accumulation` (micro-batches); `ddp`:
    `ftrain.parallel.ddp.DDP` (process group, DistributedDataParallel options); `fsdp`:
    `ftrain.parallel.fsdp.FSDP` (process group, sharding policy); `dp`:
    `ftrain.privacy.dp.DP` (per-sample clipping and noise replace forward and backward).
    """

    amp: Any = None
    accumulation: Any = None
    ddp: Any = None
    fsdp: Any = None
    dp: Any = None

    def __attrs_post_init__(self) -> None:
        if self.ddp is not None and self.fsdp is not None:
            raise ConfigError("with_ddp and with_fsdp cannot both wrap one step: with_fsdp "
                              "is data-parallel too (it also shards the model); use one")
        if self.fsdp is not None and self.amp is not None and self.amp.scaling:
            raise ConfigError("with_fsdp with with_amp(torch.float16) is not supported (its "
                              "loss scaler would read sharded gradients); use "
                              "with_amp(torch.bfloat16)")
        if self.dp is not None and (self.fsdp is not None or (
                self.amp is not None and self.amp.scaling)):
            raise ConfigError("with_dp works with with_ddp and with_amp(torch.bfloat16), "
                              "not with with_fsdp or float16 loss scaling")
        if self.batches and (self.fsdp is not None or self.dp is not None):
            raise ConfigError("with_accumulation(over='batches') is not supported with "
                              f"{'with_fsdp' if self.fsdp is not None else 'with_dp'} (its "
                              "partial gradients are sharded or per-sample); accumulate "
                              "micro-batches of each batch (over='micro_batches') instead")

    @property
    def batches(self) -> bool:
        """Whether the update is made from several consecutive batches (a slot)."""
        return self.accumulation is not None and self.accumulation.over_batches

    @property
    def parallel(self) -> Any:
        """The data-parallel option (ddp or fsdp), or None."""
        return self.ddp if self.ddp is not None else self.fsdp

    @property
    def world(self) -> int:
        parallel = self.parallel
        return parallel.world if parallel is not None else 1

    def init(self, state: Any) -> Any:
        """What the options need before the first step: join the process group (ddp,
        fsdp: which also shards the bound modules), create or check the loss scaler's
        slot (float16)."""
        if self.ddp is not None:
            state = self.ddp.init(state)
        if self.fsdp is not None:
            state = self.fsdp.init(state, self.amp)
        if self.amp is not None:
            state = self.amp.init(state)
        if self.dp is not None:
            state = self.dp.init(state)
        return state

    @property
    def slot_names(self) -> tuple[str, ...]:
        names: tuple[str, ...] = (self.amp.name,) if self.amp is not None and \
            self.amp.scaling else ()
        names += ("accumulation",) if self.batches else ()
        return names + ((self.dp.name,) if self.dp is not None else ())

    @property
    def spent_slots(self) -> tuple[str, ...]:
        """Slots that only ever grow: privacy spent cannot be taken back, so with_rollback
        leaves the dp slot's count of noisy steps as it is when it goes back."""
        return (self.dp.name,) if self.dp is not None else ()


def with_option(step: Any, kind: str, value: Any, what: str, unsupported: str = "") -> Any:
    """`step` rebuilt around a core that has option `kind` set to `value` (`map_core`):
    the given stack and its core are unchanged. Setting a kind twice is an error."""
    def change(core: Any) -> Any:
        phases = getattr(core, "phases", None)
        if not isinstance(phases, Phases) or kind not in getattr(core, "options", ()):
            raise ConfigError(f"{what} sets an option of the core step built by "
                              f"ft.train_step or ft.manual_step; the innermost step here is "
                              f"{core!r}{unsupported}")
        current = getattr(phases, kind)
        if current is not None:
            raise ConfigError(f"this core step's {kind} option is already set ({current!r}); "
                              f"{what} sets it once per stack")
        return core.with_phases(attrs.evolve(phases, **{kind: value}))
    return map_core(step, change)


def template(phases: Phases, state: Any) -> Any:
    """The template a direct (pure) call runs: the state's, or with_ddp's copy of it with
    SyncBatchNorm (sync_batchnorm=True on several processes)."""
    return state.model if phases.ddp is None else phases.ddp.template_for(state)


def autocast(phases: Phases, device: torch.device) -> Any:
    """Autocast for the forward and loss, or a no-op without `with_amp`."""
    amp = phases.amp
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp.dtype)


def scaler(phases: Phases, state: Any, slots: dict[str, Any] | None = None
           ) -> dict[str, torch.Tensor] | None:
    """The float16 loss scaler's slot of `state` (created on first use), or None.

    A pure call passes its new `slots`: a copy of the slot goes there, the state's stays.
    """
    amp = phases.amp
    if amp is None or not amp.scaling:
        return None
    slot = state.slots.get(amp.name)
    if slot is None:
        slot = amp.fresh_slot(state.device)
    elif slots is not None:
        slot = clone_tree(slot)
    (state.slots if slots is None else slots)[amp.name] = slot
    return slot  # type: ignore[no-any-return]


def grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global norm of the params' gradients (0 without any), a 0-d device tensor."""
    gradients = grads(params)
    if not gradients:
        return torch.zeros((), device=params[0].device if params else None)
    total = torch.nn.utils.get_total_norm(gradients).detach()  # with_fsdp: global DTensor
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def _by_dtype(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    yield from groups.values()


def all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average gradients across ranks explicitly (pure calls and manual steps; a loop's
    `train_step` lets DistributedDataParallel do it during backward instead)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    if not params:
        return
    # Ranks may have used different parameters (a branch taken on one rank only): agree
    # on which have a gradient anywhere, give the others zeros, so every rank reduces the
    # same list. One small all-reduce and a host read of it (sync here).
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                           device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    for p, anywhere in zip(params, present.tolist()):
        if anywhere and p.grad is None:
            p.grad = torch.zeros_like(p)
    for group in _by_dtype(grads(params)):
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(group, _unflatten_dense_tensors(flat, group)):
            g.copy_(synced)


def unscale(params: list[torch.Tensor], slot: dict[str, torch.Tensor]) -> torch.Tensor:
    """Divide the params' gradients by the loss scale in place; 1.0 when any is inf or NaN
    (device)."""
    return unscale_grads(grads(params), slot)


def unscale_grads(gradients: list[torch.Tensor], slot: dict[str, torch.Tensor]
                  ) -> torch.Tensor:
    """`unscale` on gradient tensors themselves (a compiled step's, which are no `.grad`)."""
    found_inf = torch.zeros((), dtype=torch.float32, device=slot["scale"].device)
    inv_scale = slot["scale"].double().reciprocal().float()
    for group in _by_dtype(gradients):
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
    return found_inf


def agree(found_inf: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank skips if any rank must (one 4-byte all-reduce; none on one process)."""
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    return found_inf


def prepare(phases: Phases, leaves: list[torch.Tensor], loss_bad: torch.Tensor | None,
            scale: dict[str, torch.Tensor] | None, sync: bool) -> torch.Tensor | None:
    """The phases before an update: gradient sync across ranks (if `sync`; DDP's backward
    did it otherwise), then unscaling. Returns the update's `found_inf` (None: nothing can
    skip it), the same on every rank: `loss_bad`, a rank's own non-finite-loss flag, is
    agreed by all; the unscale check needs no agreement, as it reads gradients that are
    identical on every rank after their sync (as torch's GradScaler relies on)."""
    world = phases.world
    if sync and world > 1:
        all_reduce_grads(leaves, world)
    if loss_bad is not None:
        agree(loss_bad, world)
    if scale is None:
        return loss_bad
    return combine(loss_bad, unscale(leaves, scale))


def combine(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return torch.maximum(a, b)


def update_scale(amp: Any, slot: dict[str, torch.Tensor], found_inf: torch.Tensor) -> None:
    """Back the scale off after an overflow, grow it after `growth_interval` clean steps
    (`amp`: the `with_amp` layer's settings)."""
    torch._amp_update_scale_(slot["scale"], slot["growth_tracker"], found_inf,
                             amp.growth_factor, amp.backoff_factor, amp.growth_interval)
    slot["skipped"].add_(found_inf.to(torch.int64))


def apply_update(optimizer: Any, params: dict[str, torch.Tensor], opt_state: Any,
                 found_inf: torch.Tensor | None, prepared: dict[Any, Any] | None = None,
                 part: str | None = None) -> None:
    """Run the optimizer chain in place and clear the gradients.

    A loop passes its binding's `prepared` cache: the update prepared once for these
    tensors (`Optimizer.prepare`: the kernels without the per-step plumbing) runs while
    it fits the state; it is prepared again when the optimizer or its state changes.
    """
    if optimizer is not None and prepared is not None:
        entry = prepared.get(part)
        if entry is None or entry[0] is not optimizer or entry[1] is not opt_state or (
                entry[2] is not None and not entry[2].fits(params, opt_state)):
            prepare = getattr(optimizer, "prepare", None)
            entry = prepared[part] = (optimizer, opt_state, prepare(params, opt_state)
                                      if prepare is not None else None)
        if entry[2] is not None and entry[2].update(found_inf):
            return
    if optimizer is not None:
        with torch.no_grad():
            optimizer.update(params, opt_state, found_inf)
    for p in params.values():
        p.grad = None
