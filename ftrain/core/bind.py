"""The two ways a step runs a model: bound (a loop's donated state) and pure (a copy).

*Bound*: a loop installs the state's tensors in a real copy of the template once (the
parameters become `nn.Parameter`s sharing the state's storage, buffers are the state's own
tensors), then every step is a plain forward, backward and in-place update, exactly as a
hand-written loop, and torch's module machinery (hooks, DDP, checkpointing) works as usual.
Swapping tensors in per step would cost ~10 us for 4 tensors and ~2 ms for 600.

*Pure*: a direct call runs the template through `torch.func.functional_call` on the
tensors it is given (copies, for a training step), so the caller's state is untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ftrain.core import context, health
from ftrain.core import rng as _rng
from ftrain.core.context import binding_of as binding_of
from ftrain.core.context import stepping as stepping
from ftrain.core.state import TrainState, check_real, parts
from ftrain.errors import ConfigError


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _check_names(kind: str, part: str | None, expected: list[str], found: Any) -> None:
    missing = [n for n in expected if n not in found]
    unknown = [n for n in found if n not in set(expected)]
    if missing or unknown:
        where = f"model {part!r}" if part is not None else "the model"
        raise ConfigError(f"state {kind} do not fit {where}: missing {missing}, "
                          f"unknown {unknown}")


def install(module: nn.Module, params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor], part: str | None = None
            ) -> dict[str, nn.Parameter]:
    """Put `params` and `buffers` into `module` (a copy of a meta template), sharing storage.

    Tied parameters (one tensor under several names) get one shared `nn.Parameter`.
    Returns the trainable parameters by name.
    """
    canonical = dict(module.named_parameters())  # first name of each distinct tensor
    _check_names("params", part, list(canonical), params)
    made: dict[int, nn.Parameter] = {}
    for name, meta in canonical.items():
        value = params[name]
        if value.shape != meta.shape or value.dtype != meta.dtype:
            raise ConfigError(f"param {name!r} is {value.dtype}{list(value.shape)}, the "
                              f"model expects {meta.dtype}{list(meta.shape)}")
        made[id(meta)] = nn.Parameter(value, requires_grad=meta.requires_grad)
    for name, meta in module.named_parameters(remove_duplicate=False):
        owner, leaf = _owner(module, name)
        owner._parameters[leaf] = made[id(meta)]
    buffer_names = [n for n, _ in module.named_buffers()]
    _check_names("buffers", part, buffer_names, buffers)
    first: dict[int, str] = {}
    for name, buf in module.named_buffers(remove_duplicate=False):
        canon = first.setdefault(id(buf), name)
        owner, leaf = _owner(module, name)
        owner._buffers[leaf] = buffers[canon]
    return {n: made[id(m)] for n, m in canonical.items() if m.requires_grad}


class Binding:
    """A loop's live installation of a state's tensors in real modules: the run context.

    It holds what a run needs beyond the state's data: the modules, the DDP wrapper, the
    loop's settings (`run`), losses pending a non-finite check, the profiler's recorder
    and the requests layers make of the loop. Registered while live; `end` unregisters.
    """

    def __init__(self, state: TrainState, training: bool = True) -> None:
        self.params = state.params
        self.live = True
        context.register(self)
        self.modules: dict[str | None, nn.Module] = {}
        self.trainable: dict[str | None, dict[str, nn.Parameter]] = {}
        self.buffers: dict[str | None, dict[str, torch.Tensor]] = {}
        self._persistent: list[tuple[dict[str, Any], str]] = []
        for name, template, _, params, buffers, _ in parts(state):
            module = copy.deepcopy(template)  # meta skeleton: no weights copied
            self.trainable[name] = install(module, params, buffers, name)
            self.modules[name] = module
            self.buffers[name] = buffers
            for bname, _ in module.named_buffers():
                owner, leaf = _owner(module, bname)
                if leaf not in owner._non_persistent_buffers_set:  # state, not constants
                    self._persistent.append((buffers, bname))
        self.buffer_slots = self._buffer_slots()
        self.model_arg: Any = self._model_arg()
        # every trainable parameter, flat: what gradient sync, unscaling and norms walk
        self.leaves = [p for ps in self.trainable.values() for p in ps.values()]
        self.training: bool | None = None
        self.set_mode(training)
        self.generator = _rng.generator_for(state.device)
        self.rank = _rng.rank()
        # Losses since the last non-finite check: appended per step, inspected on the
        # device only where the host reads values anyway (see ftrain.core.health).
        self.pending: list[torch.Tensor] = []
        self.pending_steps: list[int] = []
        self.nonfinite_policy = "raise"  # set by the core step on each bound call
        self.in_step = False  # True while the loop itself calls the step: run bound then
        self.owner: object | None = None  # the loop that runs this binding
        self.deferred: list[Any] = []  # actions for the loop once the whole stack returned
        self.run: Any = None  # the loop's RunInfo
        self.latest: Any = None  # the newest state the core step produced (error recovery)
        # Set by a step once it starts changing params in place (the optimizer update): a
        # failure after that point cannot be rolled back (see the loop's error handling).
        self.changed = False
        # A copy of the persistent buffers taken before each loop step, so a step that
        # fails after its forward updated them in place (BatchNorm statistics) leaves the
        # state as it was; non-persistent buffers (masks, caches) are constants and not
        # copied. The tensors copied are found once (again after a reassignment).
        self._tracked: list[torch.Tensor] | None = None
        self.buffer_copy: list[torch.Tensor] | None = None
        self.profiler: Any = None  # a with_profiling("simple") recorder, while profiling
        self.ddp: Any = None  # the modules under DistributedDataParallel (with_ddp)
        self.sync_batchnorm = False  # BatchNorm converted (with_ddp(sync_batchnorm=True))
        self.fsdp: Any = None  # the root module under FSDP2's fully_shard (with_fsdp)
        self.compiled_inputs: Any = None  # ft.compile's per-run lookup of input tensors
        # each model part's optimizer update prepared for these tensors (phases.apply_update)
        self.prepared: dict[str | None, Any] = {}
        # what a layer keeps for this run only, by slot name (with_rollback's good states)
        self.layer_runs: dict[str, Any] = {}

    def _model_arg(self) -> Any:
        return (self.modules[None] if None in self.modules
                else {n: m for n, m in self.modules.items()})

    def _buffer_slots(self) -> list[tuple[dict[str, Any], str, str, dict[str, Any]]]:
        """(owner module's buffer dict, leaf, name, the state's dict) of every buffer."""
        slots = []
        for name, module in self.modules.items():
            for bname, _ in module.named_buffers():
                owner, leaf = _owner(module, bname)
                slots.append((owner._buffers, leaf, bname, self.buffers[name]))
        return slots

    def convert_modules(self, convert: Any) -> None:
        """Run `convert(module)` on each model's module and use what it returns from now on
        (`with_ddp(sync_batchnorm=True)`: BatchNorm -> SyncBatchNorm). The new modules must
        hold the very same parameter and buffer tensors under the same names, so the
        state's dicts, the trainable parameters and the optimizer's view stay valid; a
        conversion that does not is a ConfigError. Call it before anything wraps the
        modules (DDP)."""
        for name, module in list(self.modules.items()):
            def tensors(m: nn.Module) -> list[dict[str, torch.Tensor]]:
                return [dict(m.named_parameters()), dict(m.named_buffers())]
            before = tensors(module)  # taken first: conversion may work in place
            new = convert(module)
            for kind, old_ts, new_ts in zip(("parameters", "buffers"), before, tensors(new)):
                if old_ts.keys() != new_ts.keys() or any(
                        new_ts[k] is not t for k, t in old_ts.items()):
                    where = f"model {name!r}" if name is not None else "the model"
                    raise ConfigError(
                        f"converting {where}'s modules must keep its {kind}' tensors under "
                        f"the same names: expected {sorted(old_ts)}, found {sorted(new_ts)}")
            self.modules[name] = new
        self.model_arg = self._model_arg()
        self.buffer_slots = self._buffer_slots()

    def take_over(self, old: Binding) -> None:
        """Continue `old`'s run with this binding's tensors (a state whose params dict
        changed mid-run: a new trainable set after `freeze`/`unfreeze`, replaced tensors):
        the loop's context moves over, `old` ends. The DistributedDataParallel wrapper and
        the prepared update are not taken: both are built again for these modules (DDP
        registers the parameters that require grad when it is built)."""
        self.run, self.owner, self.profiler = old.run, old.owner, old.profiler
        self.rank, self.nonfinite_policy = old.rank, old.nonfinite_policy
        self.layer_runs = {**old.layer_runs, **self.layer_runs}
        self.deferred = [*old.deferred, *self.deferred]
        self.pending = [*old.pending, *self.pending]
        self.pending_steps = [*old.pending_steps, *self.pending_steps]
        old.deferred, old.pending, old.pending_steps = [], [], []
        self.set_mode(bool(old.training))
        old.end()
        old.ddp = old.fsdp = None  # frees its reducer; the new modules get their own
        old.prepared, old.modules, old.trainable, old.leaves = {}, {}, {}, []
        old.model_arg = None

    def set_mode(self, training: bool) -> None:
        if self.training is not training:
            for m in self.modules.values():
                m.train(training)
            self.training = training

    def hand_over(self, state: TrainState) -> None:
        """Fold losses still pending a non-finite check into `state`'s slot (no sync)."""
        if self.pending:
            state.slots[health.SLOT] = health.fold(state.slots.get(health.SLOT), self.pending,
                                                   self.pending_steps)
            self.pending, self.pending_steps = [], []

    def sync_buffers(self) -> None:
        """Take buffers a module reassigned (instead of updating in place) into the state.

        An identity check per buffer per step (~0.1 us each); nothing for buffer-free models.
        """
        for owner_buffers, leaf, name, expected in self.buffer_slots:
            current = owner_buffers[leaf]
            if current is not expected[name]:
                expected[name] = current
                self._tracked = None  # copy the new tensor from now on

    def save_buffers(self) -> None:
        """Copy the persistent buffers aside before a loop step: one foreach copy (~2.4 us
        for a BatchNorm layer's three buffers on this CPU), nothing without buffers."""
        tracked = self._tracked
        if tracked is None:  # first step, or a buffer was reassigned: find them again
            tracked = self._tracked = [d[k] for d, k in self._persistent
                                       if isinstance(d[k], torch.Tensor)]
            self.buffer_copy = [t.detach().clone() for t in tracked]
        elif tracked and self.buffer_copy is not None:
            torch._foreach_copy_(self.buffer_copy, tracked)

    def restore_buffers(self) -> None:
        """Undo what a failed step's forward did to the buffers (in place)."""
        if self._tracked and self.buffer_copy is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._tracked, self.buffer_copy)

    def fits(self, state: TrainState) -> bool:
        return self.live and state.params is self.params

    def end(self) -> None:
        """Stop being live: states holding these params are plain data again."""
        self.live = False
        context.unregister(self)

    def release(self, state: TrainState) -> TrainState:
        """End the binding; return `state` unbound.

        Buffers are already current (`sync_buffers` runs after each bound step). Losses
        still pending a non-finite check are folded into the state's slot (device ops, no
        sync), so `ft.check_finite` on the returned state still sees them.
        """
        self.hand_over(state)
        self.end()
        self.modules = {}
        self.model_arg = None
        self.trainable = {}
        self.leaves = []
        self.ddp = self.fsdp = None  # frees DDP's reducer and its hold on the group
        self.prepared = {}
        return state


def follow(old: TrainState, new: TrainState) -> None:
    """A layer (e.g. an `ft.every` hook) returned `new` for the loop-run `old`, with
    another params dict (`freeze`, `unfreeze`): bind `new` now, in `old`'s run, so the
    layers outside it and the loop see a running state (a checkpoint saved at this step
    is deferred as usual). Nothing to do outside a loop or for the same params dict."""
    binding = binding_of(old)
    if binding is None or binding.owner is None or new.params is old.params \
            or binding_of(new) is not None:
        return
    successor = Binding(new, training=bool(binding.training))
    successor.take_over(binding)
    successor.latest = new


class _Apply(nn.Module):
    """Calls `fn(model, batch)` as a module forward, so functional_call (and DDP) see it."""

    def __init__(self, model: nn.Module | dict[str, nn.Module]) -> None:
        super().__init__()
        self.multi = isinstance(model, dict)
        self.model: nn.Module = nn.ModuleDict(model) if isinstance(model, dict) else model

    def forward(self, fn: Any, batch: Any, seen: dict[str, Any] | None = None) -> Any:
        model = dict(self.model.named_children()) if self.multi else self.model
        out = fn(model, batch)
        if seen is not None:  # buffers as the forward left them (some modules reassign)
            seen.update(self.model.named_buffers())
        return out


def pure_call(state: TrainState, fn: Any, batch: Any, params: Any, buffers: Any,
              training: bool, update_buffers: bool = False, model: Any = None) -> Any:
    """Run `fn(model, batch)` on the template with the given tensors (functional_call).

    With `update_buffers`, buffers the forward reassigned (rather than updated in place)
    are written back into `buffers`, as a loop's bound module keeps them. `model`: a
    template to run instead of the state's, with the same tensor names (with_ddp's
    synced BatchNorm copy).
    """
    check_real(state, "a direct (pure) call of a step")
    apply = _Apply(state.model if model is None else model)
    apply.train(training)
    tensors: dict[str, torch.Tensor] = {}
    if state.multi:
        for part in state.model:
            for k, v in params[part].items():
                tensors[f"model.{part}.{k}"] = v
            for k, v in buffers[part].items():
                tensors[f"model.{part}.{k}"] = v
    else:
        for k, v in params.items():
            tensors["model." + k] = v
        for k, v in buffers.items():
            tensors["model." + k] = v
    seen: dict[str, Any] | None = {} if update_buffers else None
    out = torch.func.functional_call(apply, tensors, (fn, batch, seen), strict=False)
    if seen:
        for name, value in seen.items():
            if state.multi:
                part, _, rest = name.partition(".")
                target = buffers[part]
            else:
                rest, target = name, buffers
            if rest in target and target[rest] is not value:
                target[rest] = value
    return out
