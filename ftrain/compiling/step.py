"""`ft.compile`: the core step's whole iteration as one compiled graph.

`compile(ft.train_step(loss_fn))` returns a core step (a `CompiledStep`, itself a
`TrainStep`, so inner combinators find it and outer ones wrap it as usual) whose
iteration runs as one `torch.compile(fullgraph=True)` function:

    forward and loss (under autocast with `with_amp`) -> gradients (`torch.func`, loss
    scaled for float16) -> unscale and finite check -> clipping -> optimizer update

The forward and backward are `torch.func.grad_and_value` over the model with the state's
tensors swapped in (as `functional_call` does); the optimizer chain runs its capturable path
(`ftrain.optim.Optimizer.update_capturable`: the same math as the eager kernels,
updates in place, learning rate, update count and loss scale as device tensors, skipped
updates by `torch.where`), so schedules and loss scaling never recompile. Inside a loop
the state's own tensors are updated in place (donated, as the eager step does); a direct
call is pure (it works on copies). Dropout is seeded from (seed, step, rank) as in the
eager step. On CUDA, `mode="reduce-overhead"` replays the iteration as a CUDA graph with
the state's tensors at static addresses.

A loss function that cannot be captured in one graph (`.item()`, Python control flow on
tensor values, unsupported calls) is reported with the reason: `fallback=True` logs a
warning and runs the eager step from then on, `fallback=False` raises `ConfigError`.

This module is the step protocol side; the captured function is in `iteration`, the
torch.compile wrapping, guard filtering and failure diagnosis in `capture`, the per-step
call through dynamo's guards without its frame hook in `direct`, the inductor options
and on-disk caches in `options`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Literal

import attrs
import torch

from ftrain.compiling.capture import _Compiled, _equivalent, _NotCapturable, _reason, _same
from ftrain.compiling.iteration import Metrics, _iteration, _Model
from ftrain.core import activation_checkpointing as _ac
from ftrain.core import bind as _bind
from ftrain.core import phases as _phases
from ftrain.core import rng as _rng
from ftrain.core.layer import map_core
from ftrain.core.state import TrainState, clone_tree, parts
from ftrain.core.step import (
    TrainStep,
    _check_state,
    advance,
    pure_result,
    require_optimizer,
)
from ftrain.errors import ConfigError, NonFiniteLossError
from ftrain.optim.schedules import per_epoch

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Modes that replay CUDA graphs on CUDA, and what a pure call (fresh copies every call,
# so no static addresses) compiles with instead.
_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}

log = logging.getLogger("ftrain")


def compile(step: Any, mode: Mode = "default", *, fullgraph: bool = True,
            fallback: bool = True, dynamic: bool | None = False) -> Any:
    """Compile the core training step's whole iteration with `torch.compile`.

    `step` is a step built by `ft.train_step`, or a stack of combinators around one: the
    stack is returned with its core replaced by a `CompiledStep` (the layers are
    reused, not copied). Forward, backward, gradient unscaling and clipping, and the
    optimizer update run as one graph; learning rate, update count and loss scale are
    device tensors, so schedules and float16 loss scaling do not recompile. Results equal
    the eager step's within float tolerance, and states (and checkpoints) are the same as
    an eager run's.

    `mode`: torch.compile's mode; on CUDA "reduce-overhead" (and "max-autotune") replay
    the iteration as a CUDA graph over the loop's state at static addresses (a direct,
    pure call compiles without CUDA graphs). `fullgraph=False` lets torch.compile split
    the iteration where it must. `fallback`: when the loss function cannot be captured,
    log a warning with the reason and run the eager step (True), or raise `ConfigError`
    with the reason (False). `dynamic` is torch.compile's: False compiles one graph per
    batch shape (e.g. a smaller last batch adds one), None lets torch generalize shapes.

    The first call compiles (seconds); `CompiledStep.compiles` counts graphs compiled.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.compiling.step import compile
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return torch.nn.functional.mse_loss(model(x), y)
        >>> step = compile(ft.train_step(loss_fn))
        >>> step
        compile(train_step(loss_fn), mode='default')
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.adam(1e-3))
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> state, metrics = step(state, batch)  # compiles: seconds  # doctest: +SKIP
        >>> state.step, step.compiles  # doctest: +SKIP
        (1, 1)
    """
    if mode not in _MODES:
        raise ConfigError(f"ft.compile: mode must be one of {list(_MODES)}, got {mode!r}")
    if dynamic not in (None, True, False):
        raise ConfigError(f"ft.compile: dynamic must be None, True or False, got {dynamic!r}")
    def compiled(core: Any) -> Any:
        if isinstance(core, CompiledStep):
            raise ConfigError(f"ft.compile: {core!r} is compiled already")
        own = getattr(core, "compiled", None)
        if own is not None:  # e.g. a population's vmapped step compiles itself
            return own(mode=mode, fullgraph=fullgraph, dynamic=dynamic, fallback=fallback)
        if type(core) is not TrainStep:
            raise ConfigError(f"ft.compile compiles the core step built by ft.train_step; "
                              f"the innermost step here is {core!r} (a manual step or a "
                              "plain function: compile its parts with torch.compile "
                              "yourself)")
        if core.metrics:  # their updates run on the host's torchmetrics objects
            raise ConfigError(f"ft.compile does not support train_step(metrics=...) yet "
                              f"(got metrics {sorted(core.metrics)}); compute epoch "
                              "metrics with an evaluator (ft.eval_step(metrics=...)) or "
                              "train without ft.compile")
        return CompiledStep(core, mode, fullgraph=fullgraph, fallback=fallback,
                            dynamic=dynamic)
    return map_core(step, compiled)  # a new stack: `step` is unchanged


class CompiledStep(TrainStep):
    """The core step `compile` builds: a `TrainStep` whose iteration is compiled.

    `compiles` counts the graphs compiled so far (one per variant: batch shape, logging
    the gradient norm, ...); `fallback_reason` is set once the step fell back to eager.
    """

    def __init__(self, eager: TrainStep, mode: str, *, fullgraph: bool, fallback: bool,
                 dynamic: bool | None) -> None:
        if eager.phases.dp is not None:  # its per-sample phase is not in the graph
            raise ConfigError("ft.compile does not support with_dp: the compiled iteration "
                              "would train without per-sample clipping and noise; train "
                              "the private step eagerly")
        super().__init__(eager.loss_fn, on_nonfinite=eager.on_nonfinite,  # type: ignore[arg-type]
                         check_finite_every_step=eager.check_finite_every_step,
                         phases=eager.phases)
        self.eager_step = eager
        self.mode = mode
        self.fullgraph = fullgraph
        self.fallback = fallback
        self.dynamic = dynamic
        self.compiles = 0
        self.fallback_reason: str | None = None
        self._fns: dict[tuple[Any, ...], tuple[Callable[..., Metrics], _Compiled]] = {}
        self._last: tuple[Any, ...] | None = None  # the last lookup, checked by identity
        # templates (and optimizers) seen, by id, each mapped to the first equivalent one:
        # a new state of the same model and optimizer reuses the compiled iteration
        self._models: dict[int, tuple[Any, _Model]] = {}
        self._optimizers: dict[int, tuple[Any, Any]] = {}
        self._python_wrapper: set[tuple[Any, ...]] = set()  # variants without cpp_wrapper

    def __repr__(self) -> str:
        return f"compile({super().__repr__()}, mode={self.mode!r})"

    def with_phases(self, phases: _phases.Phases) -> CompiledStep:
        """A new compiled step (its own graphs) around the eager step with `phases`."""
        return type(self)(self.eager_step.with_phases(phases), self.mode,
                          fullgraph=self.fullgraph, fallback=self.fallback,
                          dynamic=self.dynamic)

    # -- the step ------------------------------------------------------------------------

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if type(state) is not TrainState:
            _check_state(state, "a training step")
        if self.fallback_reason is not None:
            return TrainStep.__call__(self, state, batch)
        binding = _bind.stepping(state)
        bound = binding is not None
        world = self.phases.world
        if world > 1:
            why = (f"with_fsdp across {world} processes: FSDP2 gathers and reduce-scatters "
                   "the shards in hooks around an eager forward and backward"
                   if self.phases.fsdp is not None else
                   f"with_ddp across {world} processes: DistributedDataParallel syncs "
                   "gradients during an eager backward")
            return self._give_up(why, None, state, batch, bound)
        try:
            if bound:
                return self._run_bound(state, binding, batch)
            return self._run_pure(state, batch)
        except _NotCapturable as err:
            return self._give_up(str(err), None, state, batch, bound)
        except Exception as err:
            if not _dynamo_error(err):
                raise
            if self._drop_cpp_wrapper(err):
                return self(state, batch)  # nothing ran: compile again, Python wrapper
            return self._give_up(_reason(err), err, state, batch, bound)

    def _cpp_wrapper(self, device: torch.device, amp: Any, key: tuple[Any, ...]) -> bool:
        """Whether a variant compiles with inductor's C++ wrapper (`ftrain.compiling.options`):
        on the CPU, except where it cannot call a kernel (float16 loss scaling's unscale)
        or failed before."""
        return device.type == "cpu" and (amp is None or not amp.scaling) and \
            key not in self._python_wrapper

    def _drop_cpp_wrapper(self, err: BaseException) -> bool:
        """Whether the variant just called failed in inductor with its C++ wrapper; then it
        is forgotten, and compiled with the Python wrapper from the next call on."""
        from torch._dynamo.exc import BackendCompilerFailed

        last = self._last
        if last is None or not last[2].cpp_wrapper or \
                not isinstance(err, BackendCompilerFailed):
            return False
        key = last[2].key
        self._python_wrapper.add(key)
        self._fns.pop(key, None)
        self._last = None
        log.info("ft.compile: compiling the training step of %s with inductor's Python "
                 "wrapper (its C++ wrapper failed: %s)",
                 getattr(self.loss_fn, "__qualname__", repr(self.loss_fn)), _reason(err))
        return True

    def _give_up(self, reason: str, err: BaseException | None, state: TrainState, batch: Any,
                 bound: bool) -> tuple[TrainState, Metrics]:
        """The iteration cannot be compiled: the loss function's own error if the eager
        step fails too, else a ConfigError (fallback=False) or a warning and the eager step."""
        probe = None
        if err is not None:  # the eager step on copies: a user error surfaces as itself
            try:
                probe = TrainStep._pure(self, state, batch)
            except Exception as eager_err:
                raise eager_err from None
        name = getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))
        if not self.fallback:
            raise ConfigError(f"ft.compile: cannot compile the training step of {name} into "
                              f"one graph: {reason}. Make the loss function capturable (see "
                              f"the compile docs), or pass fallback=True to run it eagerly"
                              ) from err
        self.fallback_reason = reason
        log.warning("ft.compile: running the training step of %s eagerly: %s", name, reason)
        if bound:
            return TrainStep._bound(self, state, _bind.stepping(state), batch)
        if probe is not None:
            return probe
        return TrainStep._pure(self, state, batch)

    def _run_bound(self, state: TrainState, binding: Any, batch: Any
                   ) -> tuple[TrainState, Metrics]:
        prof = self._begin(binding)
        scale = _phases.scaler(self.phases, state)
        # The loop's state flattened into the compiled function's inputs once per run:
        # kept on the binding, so it goes when the run ends.
        cache = binding.compiled_inputs
        if cache is None or cache[0] is not self or cache[1] is not state.params or \
                cache[2] is not state.buffers or cache[3] is not state.opt_state or \
                cache[6] is not scale:
            device = state.device
            graphs = _graphs(self.mode, device)
            args = self._flatten(state, state.params, state.buffers, state.opt_state)
            if graphs:  # CUDA graphs: the state's tensors stay where they are
                for t in torch.utils._pytree.tree_leaves([args, scale]):
                    if isinstance(t, torch.Tensor):
                        torch._dynamo.mark_static_address(t)
            cache = (self, state.params, state.buffers, state.opt_state, args, graphs, scale,
                     device)
            binding.compiled_inputs = cache
        metrics = self._execute(state, cache[4], batch, scale, binding.generator, binding.rank,
                                cache[7], cache[5])
        if prof is not None:
            prof.lap("compiled step")
        return advance(state, binding, [metrics["loss"]], self.on_nonfinite), metrics

    def _run_pure(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        require_optimizer(state)
        params = clone_tree(state.params)
        buffers = clone_tree(state.buffers)
        opt_state = clone_tree(state.opt_state)
        slots = dict(state.slots)
        scale = _phases.scaler(self.phases, state, slots)
        args = self._flatten(state, params, buffers, opt_state)
        device = state.device
        mode = _GRAPH_MODES.get(self.mode, self.mode) if _graphs(self.mode, device) \
            else self.mode
        metrics = self._execute(state, args, batch, scale, _rng.generator_for(device),
                                _rng.rank(), device, False, mode)
        return pure_result(state, metrics, params, buffers, opt_state, slots,
                           self.on_nonfinite), metrics

    # -- the compiled iteration ----------------------------------------------------------

    def _execute(self, state: TrainState, args: tuple[Any, ...], batch: Any,
                 scale: dict[str, torch.Tensor] | None, generator: torch.Generator,
                 rank: int, device: torch.device, graphs: bool, mode: str | None = None
                 ) -> Metrics:
        fn, compiled = self._function(state, device, graphs, mode or self.mode)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # Seed from (seed, step, rank) as the eager step does; skipped when no compiled
        # graph of this iteration draws random numbers (checked at compile time).
        with contextlib.ExitStack() as stack:
            if isinstance(self.loss_fn, _ac._CheckpointedLoss):
                # dynamo traces the checkpointed forward's autograd.grad only with this on
                # (read when it traces; calls through the cached graph do not look)
                stack.enter_context(torch._dynamo.config.patch(trace_autograd_ops=True))
            if compiled.random or compiled.graphs == 0:
                stack.enter_context(_rng.step_seeded(generator, state.seed, state.step, rank))
            metrics = fn(*args, batch, scale)
        if graphs:  # a CUDA graph's outputs are overwritten by its next replay
            metrics = {k: v.clone() for k, v in metrics.items()}
        if self.check_finite_every_step and not bool(torch.isfinite(metrics["loss"])):
            raise NonFiniteLossError(  # host sync (opt-in); the update was skipped
                f"the loss was {metrics['loss'].item()} at step {state.step}")
        return metrics

    def _model(self, state: TrainState) -> _Model:
        entry = self._models.get(id(state.model))
        if entry is not None and entry[0] is state.model:
            return entry[1]
        model = next((m for _, m in self._models.values()
                      if _equivalent(m.template, state.model)), None)
        if model is None:
            model = _Model(state)
            if isinstance(self.loss_fn, _ac._CheckpointedLoss):  # on the private copy
                apply = model.apply
                targets = _ac.install(dict(apply.model.named_children()) if apply.multi
                                      else apply.model, self.loss_fn.specs)
                drops = [m for t in targets for m in t.modules()
                         if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
                if drops:  # inductor refuses random ops in a rematerialized region
                    raise _NotCapturable(
                        f"with_activation_checkpointing: {drops[0]!r} is inside a "
                        "checkpointed submodule, and torch.compile cannot recompute random "
                        "numbers there yet; checkpoint submodules without dropout, or run "
                        "the checkpointed step eagerly")
        self._models[id(state.model)] = (state.model, model)
        return model

    def _optimizer(self, optimizer: Any) -> Any:
        entry = self._optimizers.get(id(optimizer))
        if entry is not None and entry[0] is optimizer:
            return entry[1]
        if _holds(optimizer, per_epoch):  # it reads the loop's epoch, a host int
            raise ConfigError("ft.compile does not support schedules.per_epoch learning "
                              "rates yet (the compiled step would keep one epoch's value); "
                              "use a schedule of the update count, or the eager step")
        same = next((o for _, o in self._optimizers.values() if _same(o, optimizer)),
                    optimizer)
        self._optimizers[id(optimizer)] = (optimizer, same)
        return same

    def _flatten(self, state: TrainState, params: Any, buffers: Any, opt_state: Any
                 ) -> tuple[Any, ...]:
        """(trainable, frozen, buffers, optimizer states): the compiled function's inputs."""
        model = self._model(state)
        train: dict[str, torch.Tensor] = {}
        frozen: dict[str, torch.Tensor] = {}
        bufs: dict[str, torch.Tensor] = {}
        opt_states = []
        for part, _, _, _, _, _ in parts(state):
            p = params if part is None else params[part]
            b = buffers if part is None else buffers[part]
            prefix = "model." if part is None else f"model.{part}."
            trainable = model.trainable[part]
            for name, t in p.items():
                (train if name in trainable else frozen)[prefix + name] = t
            for name, t in b.items():
                bufs[prefix + name] = t
            opt_states.append(opt_state if part is None else opt_state[part])
        return train, frozen, bufs, opt_states

    def _function(self, state: TrainState, device: torch.device, graphs: bool, mode: str
                  ) -> tuple[Callable[..., Metrics], _Compiled]:
        """The compiled iteration for this state's model and the step's current options."""
        amp = self.phases.amp
        acc = self.phases.accumulation
        if acc is not None and acc.over_batches:  # an update spans several calls
            raise ConfigError("ft.compile does not support with_accumulation(over="
                              "'batches'); accumulate micro-batches of each batch instead")
        want_grad_norm = _phases.GRAD_NORM.get()
        fast = (state.model, state.optimizer, device, graphs, mode, want_grad_norm, amp,
                acc)
        last = self._last
        if last is not None and last[0] == fast:
            return last[1], last[2]
        model = self._model(state)
        optimizers = tuple(self._optimizer(o) for _, _, o, _, _, _ in parts(state))
        for optimizer in optimizers:
            for key, t in zip(optimizer.keys if optimizer is not None else (),
                              optimizer.transforms if optimizer is not None else ()):
                if not hasattr(t, "apply_capturable"):
                    raise _NotCapturable(
                        f"optimizer transform {key!r} ({type(t).__name__}) has no capturable "
                        "update (an apply_capturable(params, grads, state, count, "
                        "found_inf) -> grads method)")
        amp_key = None if amp is None else (amp.dtype, amp.scaling, amp.growth_factor,
                                            amp.backoff_factor, amp.growth_interval)
        acc_key = None if acc is None else (acc.micro_batches, acc.split)
        key = (id(model), tuple(id(o) for o in optimizers), device, graphs, mode,
               want_grad_norm, amp_key, acc_key, self.on_nonfinite,
               self.check_finite_every_step)
        entry = self._fns.get(key)
        if entry is None:
            loss_fn: Any = self.loss_fn
            checkpointed = isinstance(loss_fn, _ac._CheckpointedLoss)
            if checkpointed:  # the model copy's forwards checkpoint: the plain loss
                if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
                    raise _NotCapturable("with_activation_checkpointing needs a torch whose "
                                         "dynamo traces torch.autograd.grad (trace_autograd_ops)")
                loss_fn = loss_fn.loss_fn
            iteration = _iteration(loss_fn, model, optimizers, device, amp, acc,
                                   want_grad_norm=want_grad_norm,
                                   skip_nonfinite=self.on_nonfinite == "skip"
                                   or self.check_finite_every_step,
                                   checkpointed=checkpointed)
            compiled = _Compiled(self, key)
            entry = self._fns[key] = (compiled.compile(
                iteration, mode, self.fullgraph, self.dynamic, direct=not graphs,
                cpp_wrapper=self._cpp_wrapper(device, amp, key)), compiled)
        self._last = (fast, *entry)
        return entry


def _dynamo_error(err: BaseException) -> bool:
    """Whether `err` is torch.compile's (imported only then: torch._dynamo is slow to
    import, and an import statement on every step costs a microsecond or two)."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(err, TorchDynamoException)


def _graphs(mode: str, device: torch.device) -> bool:
    """Whether this mode replays CUDA graphs on this device."""
    return mode in _GRAPH_MODES and device.type == "cuda"


def _holds(value: Any, kind: type, depth: int = 0) -> bool:
    """Whether `value` (an optimizer: attrs records, containers, schedules) holds a `kind`."""
    if isinstance(value, kind):
        return True
    if depth > 8 or isinstance(value, (str, bytes, int, float, torch.Tensor)):
        return False
    if isinstance(value, dict):
        return any(_holds(v, kind, depth + 1) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_holds(v, kind, depth + 1) for v in value)
    if attrs.has(type(value)):
        return any(_holds(getattr(value, f.name), kind, depth + 1)
                   for f in attrs.fields(type(value)))
    return False
