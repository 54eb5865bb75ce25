"""`with_accumulation(step, n, over="batches")`: one update from n consecutive batches
(Lightning's `accumulate_grad_batches`).

What the counters mean:

- `state.step` counts batches (loop iterations), as it always does; so do `max_steps` and
  `every_n_steps` (logging, checkpoints). The optimizer's own count (`opt_state["count"]`)
  counts updates, and learning-rate schedules follow it: they advance once per group. To
  train U updates, give `max_steps=U * n`.
- Every batch returns its own metrics (its loss as a plain step would report it); the
  step that ends a group adds what an update adds (`grad_norm` when a logger asks).

Weighting: each batch has a weight w (`weight(batch)`: its number of samples by default,
or e.g. its number of tokens). Its loss is multiplied by w / u before its backward, u being
the weight of the group's first batch (under with_ddp the ranks' mean: a 4-byte
all-reduce per group), so the factors stay near 1 (float16 loss scaling is not thrown off
by weights in the thousands) and a group of equal batches multiplies by exactly 1. The
gradients add up, and the update divides them by the sum of the factors (under with_ddp
over every rank: one 4-byte all-reduce per update). For a loss that is a mean over samples
(tokens), the update then equals one step on all of the group's samples at once, whatever
the batches' sizes.

The partial gradient lives in the slot "accumulation": `{"batches": k, "weight": the
factors' sum so far, "unit": u, "grads": {name: tensor}, "world", "local", "bad"}`. In a
loop its tensors are the parameters' own `.grad` (no copy); a checkpoint written mid-group
holds them and a resumed run puts them back, so it continues exactly. After an update the
slot is empty again.

Epoch ends: an epoch's last, partial group still updates, at the epoch end, with the
weight it has (as Lightning does). A run that stops mid-epoch (max_steps, a signal) keeps
its partial group in the slot (a warning says so), and continuing goes on with it.

with_ddp: the batches before a group's last run under DDP's `no_sync` (no all-reduce); the
last one all-reduces the summed gradients (the epoch-end update of a partial group
all-reduces them explicitly). A partial gradient is each rank's own, so before a
checkpoint is written (with_checkpointing asks the stack to "verify" the state first) it
is averaged across the ranks (one all-reduce of the gradients per save mid-group): rank
0's checkpoint then holds every rank's share, and a resume on as many processes is exact
(a run with mid-group saves equals one without up to rounding). A mid-group state that was
saved otherwise under with_ddp (`ft.save`, an error's state), or one resumed under another
number of processes, is refused with a ConfigError.

with_amp: each batch's backward is scaled by the loss scale, which changes only at an
update (float16: an overflow anywhere in the group skips the group's update). Not with
with_fsdp, with_dp or ft.compile (ConfigError).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ftrain.core import context
from ftrain.core import phases as _phases
from ftrain.core import rng as _rng
from ftrain.core import slots as _slots
from ftrain.core.state import TrainState, clone_tree, parts
from ftrain.core.trigger import ended_epoch
from ftrain.data.batches import batch_size
from ftrain.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger("ftrain")
SLOT = "accumulation"
Metrics = dict[str, torch.Tensor]

_FIELDS = {
    "batches": (_slots.count, "an int >= 0"),
    "weight": (lambda v: _slots.finite(v) or _slots.scalar_tensor(v),
               "a number or a 0-d tensor (the group's weight so far)"),
    "unit": (lambda v: v is None or _slots.finite(v) or _slots.scalar_tensor(v),
             "None or a number or a 0-d tensor (the group's first weight)"),
    "grads": (lambda v: isinstance(v, dict), "a dict of gradients by parameter name"),
    "world": (_slots.positive, "an int >= 1"),
    "local": (lambda v: isinstance(v, bool), "a bool"),
    "bad": (lambda v: v is None or _slots.scalar_tensor(v), "None or a 0-d tensor"),
}


def empty(world: int) -> dict[str, Any]:
    """The slot between groups."""
    return {"batches": 0, "weight": 0.0, "unit": None, "grads": {}, "world": world,
            "local": False, "bad": None}


def init(state: TrainState, phases: Any) -> TrainState:
    """Create the slot, or check one restored from a checkpoint against this run (after
    with_ddp joined: the world is known); nothing without over="batches"."""
    if not phases.batches:
        return state
    n, world = phases.accumulation.micro_batches, phases.world
    slot = state.slots.get(SLOT)
    if slot is None:
        return state.replace(slots={**state.slots, SLOT: empty(world)})
    _slots.check(slot, SLOT, _FIELDS)
    k = slot["batches"]
    if k >= n:
        raise ConfigError(f"this state's accumulation group holds {k} batches; "
                          f"with_accumulation({n}, over='batches') needs fewer than {n}: "
                          f"resume with the same number of batches per update")
    if k and slot["world"] != world:
        raise ConfigError(f"this state stopped {k} batches into an accumulation group "
                          f"under {slot['world']} process(es); this run has {world}. The "
                          f"partial gradient cannot be shared out anew: resume under "
                          f"{slot['world']}, or from a checkpoint at an update")
    if k and slot["local"] and world > 1:
        raise ConfigError(f"this state stopped {k} batches into an accumulation group under "
                          f"with_ddp, and its partial gradient is one rank's own (it was "
                          f"saved without with_checkpointing, which averages it across "
                          f"ranks first): resume from a with_checkpointing checkpoint")
    return state


def _weight(acc: Any, batch: Any, step: int) -> Any:
    """A batch's weight: a number > 0, or a 0-d tensor (kept on the device)."""
    if acc.weight is None:
        try:
            return batch_size(batch)
        except DataError as err:
            raise DataError(f"step {step}: {err}; or give with_accumulation a "
                            f"weight=batch -> number") from None
    w = acc.weight(batch)
    if isinstance(w, torch.Tensor) and w.dim() == 0:
        return w  # no host check: that would sync every step
    if not _slots.finite(w) or w <= 0:
        raise DataError(f"step {step}: with_accumulation's weight(batch) must return a "
                        f"number > 0 or a 0-d tensor, got {_slots.short(w, 80)}")
    return w


def _unit(w: Any, world: int, device: torch.device) -> Any:
    """The group's unit of weight: its first batch's (the ranks' mean under with_ddp)."""
    if world <= 1:
        return float(w) if not isinstance(w, torch.Tensor) else w
    import torch.distributed as dist
    unit = torch.as_tensor(w, dtype=torch.float32, device=device).clone()
    dist.all_reduce(unit)  # 4 bytes, once per group; stays on the device
    return unit / world


class Group:
    """One batch of a group, as a core step runs it: weighs it, runs its backward
    (under no_sync unless it ends the group), then holds or finishes the group. `slots`
    is where the new slot goes (a loop's own slots, or a pure call's new dict)."""

    def __init__(self, core: Any, state: TrainState, slots: dict[str, Any]) -> None:
        self.core, self.acc = core, core.phases.accumulation
        self.slot = state.slots.get(SLOT) or empty(core.phases.world)
        self.slots = slots
        self.due = self.slot["batches"] + 1 >= self.acc.micro_batches
        self.w: Any = None  # this batch's factor: its weight / the group's unit
        self.unit: Any = self.slot["unit"]
        self.pure = False

    def _gradients(self, state: TrainState, batch: Any, call: Callable[[Any], Any],
                   generator: torch.Generator, rank: int,
                   inputs: list[torch.Tensor] | None, no_sync: Any,
                   scale: dict[str, torch.Tensor] | None, prof: Any = None) -> Metrics:
        """The core's forward and backward of this batch, its loss times its factor."""
        w = _weight(self.acc, batch, state.step)
        if not self.slot["batches"] or self.unit is None:  # the group's first batch
            self.unit = _unit(w, self.core.phases.world, state.device)
        self.w = w = w / self.unit
        micro, where = self.core._micro, f"step {state.step}"
        with _rng.step_seeded(generator, state.seed, state.step, rank):
            if no_sync is None or self.due:
                return micro(state, batch, w, where, call, inputs, scale, prof)  # type: ignore[no-any-return]
            with no_sync():  # DDP: no all-reduce before the group's last batch
                return micro(state, batch, w, where, call, inputs, scale, prof)  # type: ignore[no-any-return]

    def held(self, trainable: dict[Any, dict[str, torch.Tensor]], metrics: Metrics
             ) -> dict[str, Any]:
        """The slot after a batch that does not end its group: the gradients so far
        (`trainable`'s `.grad`, by reference), the weight, the non-finite flag."""
        bad = self.slot["bad"]
        if self.core.on_nonfinite == "skip":  # on the device: no host sync
            now = (~torch.isfinite(metrics["loss"])).to(torch.float32)
            bad = now if bad is None else torch.maximum(bad, now)
        world = self.core.phases.world
        return {"batches": self.slot["batches"] + 1, "weight": self.slot["weight"] + self.w,
                "unit": self.unit, "grads": grads_of(trainable), "world": world,
                "local": world > 1, "bad": bad}

    def finish(self, leaves: list[torch.Tensor], bad: torch.Tensor | None
               ) -> torch.Tensor | None:
        """Before the update: divide the summed gradients by the group's weight (all
        ranks' under with_ddp, whose all-reduce averaged them: so by the mean weight),
        empty the slot; return the whole group's non-finite flag (on_nonfinite="skip":
        `bad` is this batch's)."""
        earlier = self.slot["bad"]
        if bad is not None and earlier is not None:
            bad = torch.maximum(bad, earlier)
        total = self.slot["weight"] + (self.w if self.w is not None else 0.0)
        world = self.core.phases.world
        grads = [p.grad for p in leaves if p.grad is not None]
        if world > 1:
            import torch.distributed as dist
            device = grads[0].device if grads else None
            total = torch.as_tensor(total, dtype=torch.float32, device=device).clone()
            dist.all_reduce(total)  # 4 bytes: every rank's weight (host round-trip)
            total = total / world  # the gradients are the ranks' mean
        if grads:
            torch._foreach_div_(grads, total)
        self.slots[SLOT] = empty(world)
        return bad


def grads_of(trainable: dict[Any, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """The parameters' gradients by name (by model, then name, for several models)."""
    grads = {part: {n: p.grad for n, p in ps.items() if p.grad is not None}
             for part, ps in trainable.items()}
    return grads.get(None, grads)


def install(core: Any, state: TrainState, binding: Any) -> None:
    """Before a bound step: a partial gradient restored from a checkpoint becomes the
    parameters' `.grad` (one identity check per step when it already is)."""
    slot = state.slots.get(SLOT)
    if slot is None or not slot["batches"]:
        return
    grads = slot["grads"] if state.multi else {None: slot["grads"]}
    for part, named in grads.items():
        for name, g in named.items():
            p = binding.trainable.get(part, {}).get(name)
            if p is not None and p.grad is g:
                return  # installed: the loop's own gradients
            _check_grad(p, g, part, name)
            p.grad = g  # type: ignore[union-attr]


def _check_grad(p: Any, g: Any, part: Any, name: str) -> None:
    what = name if part is None else f"{part}.{name}"
    if p is None:
        raise CheckpointError(f"the state's {SLOT!r} slot holds a gradient for {what!r}, "
                              "which is not a trainable parameter of this state")
    if not isinstance(g, torch.Tensor) or g.shape != p.shape or g.dtype != p.dtype:
        found = (f"{g.dtype} {list(g.shape)}" if isinstance(g, torch.Tensor)
                 else type(g).__name__)
        raise CheckpointError(f"the state's {SLOT!r} slot: the gradient of {what!r} must be "
                              f"a {p.dtype} tensor of shape {list(p.shape)}, found {found}")
    if g.device != p.device:
        raise CheckpointError(f"the state's {SLOT!r} slot: the gradient of {what!r} is on "
                              f"{g.device}, its parameter on {p.device}; load the state "
                              f"onto the parameters' device")


def install_pure(state: TrainState, trainable: list[Any]) -> None:
    """A pure call: the copies' `.grad` start from copies of the slot's gradients."""
    slot = state.slots.get(SLOT)
    if slot is None or not slot["batches"]:
        return
    grads = slot["grads"] if state.multi else {None: slot["grads"]}
    for part, _, chosen in trainable:
        for name, g in grads.get(part, {}).items():
            _check_grad(chosen.get(name), g, part, name)
            chosen[name].grad = g.detach().clone()


def held(group: Group | None, trainable: list[Any], metrics: Metrics) -> bool:
    """After a batch's backward: if it does not end its group, put the gradients so far
    in the slot and say so (no update now). `trainable`: (part, optimizer, params) as the
    core lists them; a pure call's copies lose their `.grad` (they become the new
    state's parameters), a loop's keep it (the slot refers to them)."""
    if group is None or group.due:
        return False
    named = {part: ps for part, _, ps in trainable}
    group.slots[SLOT] = group.held(named, metrics)
    if group.pure:
        for ps in named.values():
            for p in ps.values():
                p.grad = None
    return True


def begin(core: Any, state: TrainState, binding: Any, slots: dict[str, Any] | None = None,
          trainable: list[Any] | None = None) -> Group | None:
    """The Group of this batch under over="batches" (else None), with a partial gradient
    restored from a checkpoint put back first: as the loop's parameters' `.grad`
    (`binding`), or as a pure call's copies' (`slots`, `trainable`)."""
    acc = core.phases.accumulation
    if acc is None or not acc.over_batches:
        return None
    if binding is not None:
        install(core, state, binding)
        return Group(core, state, state.slots)
    assert slots is not None and trainable is not None
    install_pure(state, trainable)
    group = Group(core, state, slots)
    group.pure = True
    return group


def flush(core: Any, state: TrainState) -> TrainState:
    """At an epoch's end: update with the epoch's last, partial group. A run stopping
    mid-epoch keeps it (said once, in a warning)."""
    slot = state.slots.get(SLOT)
    if slot is None or not slot["batches"]:
        return state
    if not ended_epoch(state):
        log.warning("stopping %d batch(es) into an accumulation group of %d: their "
                    "gradient is kept in the state's %r slot, and a run continuing from "
                    "this state goes on with it", slot["batches"],
                    core.phases.accumulation.micro_batches, SLOT)
        return state
    binding = context.binding_of(state)
    if binding is not None and binding.live:
        install(core, state, binding)
        trainable = [(part, state.optimizer if part is None else state.optimizer[part], ps)
                     for part, ps in binding.trainable.items()]
        _update(core, state, state.slots, trainable, binding.leaves, state.opt_state,
                binding.prepared)
        return state
    # a direct call: the update on copies, a new state (the step count stays)
    params, chosen_all = {}, []
    slots = dict(state.slots)
    for part, template, optimizer, p, _, _ in parts(state):
        copies = {n: t.detach().clone() for n, t in p.items()}
        chosen = {n: c for n, c in copies.items()
                  if template.get_parameter(n).requires_grad}
        params[part] = copies
        chosen_all.append((part, optimizer, chosen))
    install_pure(state, chosen_all)
    opt_state = clone_tree(state.opt_state)
    leaves = [t for _, _, c in chosen_all for t in c.values()]
    _update(core, state, slots, chosen_all, leaves, opt_state, None)
    return state.replace(params=params if state.multi else params[None],
                         opt_state=opt_state, slots=slots)


def _update(core: Any, state: TrainState, slots: dict[str, Any], trainable: list[Any],
            leaves: list[torch.Tensor], opt_state: Any, prepared: Any) -> None:
    group = Group(core, state, slots)
    group.due = True
    scale = _phases.scaler(core.phases, state, None if slots is state.slots else slots)
    zero = torch.zeros((), device=state.device)  # this "step" has no loss of its own
    # the group's last batches ran under no_sync: all-reduce explicitly
    core._update(state, {"loss": zero}, trainable, leaves, opt_state, scale,
                 explicit_sync=True, prepared=prepared, group=group)


def on_request(core: Any, state: TrainState, what: str) -> tuple[TrainState, None]:
    """"verify" (a checkpoint is about to be written): under with_ddp, average a partial
    gradient across the ranks so the checkpoint holds every rank's share (a collective:
    every rank saves at the same step). No note: the save goes ahead."""
    slot = state.slots.get(SLOT)
    world = core.phases.world
    if what != "verify" or slot is None or not slot["batches"] or not slot["local"] or \
            world <= 1:
        return state, None
    import torch.distributed as dist
    binding = context.binding_of(state)
    if binding is not None and binding.live:  # the ranks agree on which have gradients
        _phases.all_reduce_grads(binding.leaves, world)  # averaged in place: the slot's tensors
        grads = grads_of(binding.trainable)
    else:
        grads = slot["grads"]
        for g in (grads.values() if not state.multi else
                  [t for part in grads.values() for t in part.values()]):
            dist.all_reduce(g)
            g.div_(world)
    device = state.device
    weight = torch.as_tensor(slot["weight"], dtype=torch.float32, device=device).clone()
    dist.all_reduce(weight)
    bad = slot["bad"]
    if bad is not None:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    state.slots[SLOT] = {**slot, "grads": grads, "weight": weight / world, "local": False}
    return state, None
