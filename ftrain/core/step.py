"""Steps: `train_step(loss_fn)` and `eval_step(fn)`, and the step protocol.

A step is `step(state, batch) -> (state, metrics)`; a plain function is one. A step may
also have `init(state) -> state`, `epoch_end(state) -> (state, metrics)`, `close(state)`
and `inner` (the step it wraps). A step asks the loop to stop by `request_stop`, which
puts a reason in `state.slots["stop"]`; it never raises to stop.

The step `train_step` builds runs one iteration: seed the device generator from
(seed, step, rank) -> forward and loss -> backward -> optimizer update. Called directly
it is pure (copies in, new state out); inside a loop it runs on the loop's donated,
bound state (see ftrain.core.bind). Both give bitwise the same numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from ftrain.core import accumulate_batches as _ab
from ftrain.core import bind as _bind
from ftrain.core import context, health
from ftrain.core import epoch_metrics as _em
from ftrain.core import layer as _layer
from ftrain.core import phases as _phases
from ftrain.core import rng as _rng
from ftrain.core import train_metrics as _tm
from ftrain.core.outputs import (  # noqa: F401  (re-exported for the other step kinds)
    _describe,
    _metric,
    add_weighted,
    eval_metrics,
    split_loss,
)
from ftrain.core.phases import grad_norm as _grad_norm
from ftrain.core.state import STOP_SLOT, TrainState, clone_tree, donate, parts
from ftrain.errors import ConfigError, LossError

Metrics = _layer.Metrics
LossFn = Callable[[Any, Any], Any]
NonFinite = Literal["raise", "skip", "ignore"]


def _check_state(state: Any, what: str) -> None:
    if type(state) is not TrainState:
        if isinstance(state, TrainState):
            _ = state.params  # a donated state: raises DonatedStateError saying so
        raise ConfigError(f"{what} expects a TrainState as its first argument, got "
                          f"{type(state).__name__}")


class _Value:
    """A core step is a value: its options are fixed once built. Inner combinators return
    a new core (`with_phases`); assigning an option raises."""

    options: tuple[str, ...] = ()
    _fixed: tuple[str, ...] = ("phases",)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._fixed and name in self.__dict__:
            raise ConfigError(f"{self!r} is a value: its {name} cannot change; build a new "
                              "step (inner combinators such as ft.with_amp return one)")
        object.__setattr__(self, name, value)

    def with_phases(self, phases: _phases.Phases) -> Any:
        """A copy of this core step with other options (this one is unchanged)."""
        new = copy.copy(self)
        object.__setattr__(new, "phases", phases)
        return new

    @property
    def slot_names(self) -> tuple[str, ...]:
        return self.phases.slot_names  # type: ignore[attr-defined, no-any-return]

    def init(self, state: TrainState) -> TrainState:
        return self.phases.init(state)  # type: ignore[attr-defined, no-any-return]

    def epoch_end(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """Report a non-finite loss per the step's policy (host sync: once per epoch)."""
        return _nonfinite_epoch_end(state, self.on_nonfinite)  # type: ignore[attr-defined]


class TrainStep(_Value):
    """The core training step built by `train_step`."""

    inner = None
    options = ("amp", "accumulation", "ddp", "fsdp", "dp")
    _fixed = ("loss_fn", "on_nonfinite", "check_finite_every_step", "phases", "metrics")

    def __init__(self, loss_fn: LossFn, *, on_nonfinite: NonFinite = "raise",
                 check_finite_every_step: bool = False,
                 phases: _phases.Phases | None = None,
                 metrics: Mapping[str, Any] | None = None) -> None:
        check_core_args(loss_fn, "train_step needs a callable loss_fn(model, batch)",
                        on_nonfinite)
        self.loss_fn = loss_fn
        self.on_nonfinite = on_nonfinite
        self.check_finite_every_step = check_finite_every_step
        self.phases = phases if phases is not None else _phases.Phases()
        self.metrics = _em.check(metrics, "train_step")

    # -- epoch metrics (metrics=): their states in a slot, see ftrain.core.train_metrics

    @property
    def slot_names(self) -> tuple[str, ...]:
        return self.phases.slot_names + ((_tm.SLOT,) if self.metrics else ())

    def init(self, state: TrainState) -> TrainState:
        state = _ab.init(self.phases.init(state), self.phases)  # over="batches": its slot
        return _tm.init(self, state) if self.metrics else state

    def epoch_end(self, state: TrainState) -> tuple[TrainState, Metrics]:
        state, metrics = _nonfinite_epoch_end(_ab.flush(self, state), self.on_nonfinite)
        if self.phases.dp is not None:  # dp_epsilon (ftrain.privacy)
            metrics = {**metrics, **self.phases.dp.epoch_metrics(state)}
        return _tm.epoch_end(self, state) if self.metrics else (state, metrics)

    on_request = _ab.on_request  # "verify" before a save: see ftrain.core.accumulate_batches

    def __repr__(self) -> str:
        name = getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))
        return f"train_step({name})"

    # -- the step ------------------------------------------------------------------------

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if type(state) is not TrainState:
            _check_state(state, "a training step")
        binding = _bind.stepping(state)
        if binding is not None:
            return self._bound(state, binding, batch)
        return self._pure(state, batch)

    def _gradients(self, state: TrainState, batch: Any, call: Callable[[Any], Any],
                   generator: torch.Generator, rank: int,
                   inputs: list[torch.Tensor] | None, no_sync: Any,
                   scale: dict[str, torch.Tensor] | None, prof: Any = None) -> Metrics:
        """Forward and (scaled) backward over the batch's micro-batches; the metrics."""
        acc = self.phases.accumulation
        with _rng.step_seeded(generator, state.seed, state.step, rank):
            if acc is None:  # the common case: one forward and backward
                return self._micro(state, batch, 1.0, f"step {state.step}", call, inputs,
                                   scale, prof)
            micro = acc.split_batch(batch, state.step)
            weights = acc.weights(micro)
            last = len(micro) - 1
            metrics: Metrics = {}
            for i, (mb, w) in enumerate(zip(micro, weights)):
                where = f"step {state.step}, micro-batch {i}"
                if no_sync is not None and i < last:
                    with no_sync():  # DDP: no gradient all-reduce until the last one
                        m = self._micro(state, mb, w, where, call, inputs, scale, prof)
                else:
                    m = self._micro(state, mb, w, where, call, inputs, scale, prof)
                add_weighted(metrics, m, w, where)
            return metrics

    def _micro(self, state: TrainState, batch: Any, weight: float, where: str,
               call: Callable[[Any], Any], inputs: list[torch.Tensor] | None,
               scale: dict[str, torch.Tensor] | None, prof: Any) -> Metrics:
        """One forward (under autocast with with_amp) and its scaled backward."""
        if self.phases.amp is None:
            out = call(batch)
        else:
            with _phases.autocast(self.phases, state.device):
                out = call(batch)
        loss, metrics = split_loss(out, where)
        if prof is not None:
            prof.lap("forward")
        if self.check_finite_every_step and not bool(torch.isfinite(loss)):
            raise health.NonFiniteLossError(  # host sync (opt-in)
                f"the loss was {loss.item()} at {where}")
        if not loss.requires_grad:
            raise LossError(f"{where}: the loss does not require grad; no trainable "
                            "parameter of the state was used to compute it")
        scaled = loss if type(weight) is float and weight == 1.0 else loss * weight
        if scale is not None:
            scaled = scaled * scale["scale"]
        scaled.backward(inputs=inputs)  # pure: gradients go to the copies only
        if prof is not None:
            prof.lap("backward")
        return metrics

    def _update(self, state: TrainState, metrics: Metrics, trainable: list[Any],
                leaves: list[torch.Tensor], opt_state: Any,
                scale: dict[str, torch.Tensor] | None, explicit_sync: bool,
                prepared: dict[Any, Any] | None = None, group: Any = None) -> None:
        """Gradient sync, unscale and finite check, grad norm, optimizer update, scale."""
        loss_bad = None
        if self.on_nonfinite == "skip":  # decided on the device, applied by the kernels
            loss_bad = (~torch.isfinite(metrics["loss"])).to(torch.float32)
        if group is not None:  # over="batches": divided by the group's weight
            loss_bad = group.finish(leaves, loss_bad)
        found_inf = _phases.prepare(self.phases, leaves, loss_bad, scale, explicit_sync)
        if _phases.GRAD_NORM.get():
            metrics["grad_norm"] = _grad_norm(leaves)
        for part, optimizer, params in trainable:
            _phases.apply_update(optimizer, params,
                                 opt_state if part is None else opt_state[part], found_inf,
                                 prepared, part)
        if scale is not None:
            _phases.update_scale(self.phases.amp, scale, found_inf)  # type: ignore[arg-type]

    def _begin(self, binding: Any) -> Any:
        """A bound step starts: train mode, this step's non-finite policy, the profiler."""
        binding.set_mode(True)
        binding.nonfinite_policy = self.on_nonfinite
        prof = binding.profiler
        if prof is not None:
            prof.start()
        return prof

    def _bound(self, state: TrainState, binding: Any, batch: Any
               ) -> tuple[TrainState, Metrics]:
        prof = self._begin(binding)
        scale = _phases.scaler(self.phases, state)
        ddp, fsdp, dp = self.phases.ddp, self.phases.fsdp, self.phases.dp
        module = ddp.module_for(binding) if ddp is not None and dp is None else \
            fsdp.module_for(binding, state, self.phases.amp) if fsdp is not None else None
        if dp is not None:  # per-sample gradients, clipped and noised (ftrain.privacy)
            metrics = dp.bound_gradients(state, batch, self.loss_fn, binding, self.phases)
        elif module is None:
            loss_fn, model = self.loss_fn, binding.model_arg

            def call(mb: Any) -> Any:
                return loss_fn(model, mb)
            no_sync = None
        else:  # DDP / FSDP see the forward and sync (reduce-scatter) during backward
            def call(mb: Any) -> Any:
                return module(self.loss_fn, mb)
            no_sync = module.no_sync
        if self.metrics:
            call, feed = _tm.feeding(self.metrics, call, f"step {state.step}")
        group = _ab.begin(self, state, binding)  # over="batches": this batch's group
        if dp is None:
            metrics = (group or self)._gradients(state, batch, call, binding.generator,
                                                 binding.rank, None, no_sync, scale, prof)
        entry = _tm.updated(self, state, feed) if self.metrics else None
        trainable = [(part, state.optimizer if part is None else state.optimizer[part], ps)
                     for part, ps in binding.trainable.items()]
        if self.check_finite_every_step and scale is None:  # fp16: the scaler skips
            health.check_gradients(trainable, f"step {state.step}")
        binding.changed = True  # from here on a failure cannot be rolled back
        if not _ab.held(group, trainable, metrics):  # over="batches": no update yet
            self._update(state, metrics, trainable, binding.leaves, state.opt_state, scale,
                         explicit_sync=module is None, prepared=binding.prepared, group=group)
        if prof is not None:
            prof.lap("optimizer")
        new = advance(state, binding, [metrics["loss"]], self.on_nonfinite)
        if dp is not None:
            dp.account(state, new.slots)  # the loop's slots: in place
        if entry is not None:
            new.slots[_tm.SLOT] = entry  # the loop's slots: in place, as other layers do
        return new, metrics

    def _pure(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        require_optimizer(state)
        if self.phases.fsdp is not None:
            self.phases.fsdp.check_pure(state)
        params: dict[Any, Any] = {}
        buffers: dict[Any, Any] = {}
        trainable: list[tuple[Any, Any, dict[str, torch.Tensor]]] = []
        for part, template, optimizer, p, b, _ in parts(state):
            copies = {}
            chosen = {}
            for name, t in p.items():
                c = t.detach().clone()
                if template.get_parameter(name).requires_grad:
                    c.requires_grad_(True)
                    chosen[name] = c
                copies[name] = c
            params[part] = copies
            buffers[part] = {n: t.detach().clone() for n, t in b.items()}
            trainable.append((part, optimizer, chosen))
        if not state.multi:
            params, buffers = params[None], buffers[None]
        opt_state = clone_tree(state.opt_state)
        slots = dict(state.slots)
        scale = _phases.scaler(self.phases, state, slots)
        leaves = [t for _, _, chosen in trainable for t in chosen.values()]
        group = _ab.begin(self, state, None, slots, trainable)
        model = _phases.template(self.phases, state)  # with_ddp(sync_batchnorm): a copy

        def call(mb: Any) -> Any:
            return _bind.pure_call(state, self.loss_fn, mb, params, buffers, True,
                                   update_buffers=True, model=model)
        if self.metrics:
            call, feed = _tm.feeding(self.metrics, call, f"step {state.step}")
        if self.phases.dp is not None:  # per-sample gradients, counted (ftrain.privacy)
            metrics = self.phases.dp.pure_gradients(state, batch, self.loss_fn, params,
                                                    buffers, trainable, self.phases, slots)
        else:
            metrics = (group or self)._gradients(state, batch, call, _rng.generator_for(
                state.device), _rng.rank(), leaves, None, scale)
        if self.metrics:
            slots[_tm.SLOT] = _tm.updated(self, state, feed)
        if self.check_finite_every_step and scale is None:  # fp16: the scaler skips
            health.check_gradients(trainable, f"step {state.step}")
        if not _ab.held(group, trainable, metrics):  # over="batches": no update yet
            self._update(state, metrics, trainable, leaves, opt_state, scale,
                         explicit_sync=True, group=group)
        for t in leaves:
            t.requires_grad_(False)
        return pure_result(state, metrics, params, buffers, opt_state, slots,
                           self.on_nonfinite), metrics

def advance(state: TrainState, binding: Any, losses: list[torch.Tensor], on_nonfinite: str,
            what: str = "a training step") -> TrainState:
    """A loop's step is done: note its `losses` for the non-finite check, take reassigned
    buffers, return the next state (step + 1) and donate `state`."""
    if on_nonfinite != "ignore" and losses:
        binding.pending.extend(losses)
        binding.pending_steps.extend([state.step] * len(losses))
        if len(binding.pending) >= health.FOLD_EVERY:
            health.pending_record(state)
    if binding.buffer_slots:
        binding.sync_buffers()
    new = state.replace()
    new.__dict__["step"] = context.at_step = state.step + 1
    binding.latest = new
    donate(state, what)
    return new


def pure_result(state: TrainState, metrics: Metrics, params: Any, buffers: Any,
                opt_state: Any, slots: dict[str, Any], on_nonfinite: str) -> TrainState:
    """A pure call's new state: the loss noted for the non-finite check, step + 1."""
    if on_nonfinite != "ignore":
        record = health.fold(slots.get(health.SLOT), [metrics["loss"]], [state.step])
        record["policy"] = on_nonfinite
        slots[health.SLOT] = record
    new = state.replace(params=params, buffers=buffers, opt_state=opt_state,
                        step=state.step + 1, slots=slots)
    return new


def check_core_args(fn: Any, needs: str, on_nonfinite: Any) -> None:
    """The arguments every core step takes: a function, and a non-finite policy."""
    if not callable(fn):
        raise ConfigError(f"{needs}, got {type(fn).__name__}")
    if on_nonfinite not in ("raise", "skip", "ignore"):
        raise ConfigError(f"on_nonfinite must be 'raise', 'skip' or 'ignore', got "
                          f"{on_nonfinite!r}")


def require_optimizer(state: TrainState) -> None:
    if state.optimizer is None or (state.multi and all(
            o is None for o in state.optimizer.values())):
        raise ConfigError("this state has no optimizer; create it with "
                          "TrainState.create(model, optimizer)")


_nonfinite_epoch_end = health.epoch_end_check  # a core step's epoch end (host sync)


def train_step(loss_fn: LossFn, *, on_nonfinite: NonFinite = "raise",
               check_finite_every_step: bool = False,
               metrics: Mapping[str, Any] | None = None) -> TrainStep:
    """Turn `loss_fn(model, batch) -> loss | (loss, metrics)` into a training step.

    Inside `loss_fn`, `model` (and its submodules; a dict of modules for a multi-model
    state) runs in train mode with the state's params and buffers. The step returns the
    new state and `{"loss": ..., **metrics}` (0-d tensors left on the device).

    A NaN or infinite loss is an error by default, raised at the next point where the
    host reads values anyway (epoch end, logging, validation) and naming the step;
    `check_finite_every_step=True` checks each step's loss and gradients before its
    update (a host sync per step);
    `on_nonfinite="skip"` skips such updates on the device; `"ignore"` does nothing.

    `metrics` (torchmetrics objects by name, as in `eval_step`) are epoch-level training
    metrics: `loss_fn` returns each one's update arguments under its name, and every epoch
    end reports `<name>_epoch`, computed once over the epoch (their states live in the
    slot "train_metrics", so a resumed run continues them). See docs/metrics.md.

    Examples:
        >>> import torch, ftrain as ft
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return torch.nn.functional.mse_loss(model(x), y)
        >>> step = ft.train_step(loss_fn)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> new_state, metrics = step(state, (torch.randn(8, 3), torch.randn(8, 1)))
        >>> new_state.step, sorted(metrics), state.step   # the input is untouched
        (1, ['loss'], 0)
    """
    return TrainStep(loss_fn, on_nonfinite=on_nonfinite,
                     check_finite_every_step=check_finite_every_step, metrics=metrics)


class EvalStep:
    """The evaluation step built by `eval_step`: `(state, batch) -> metrics`."""

    inner = None

    def __init__(self, fn: LossFn, metrics: Mapping[str, Any] | None = None,
                 batch_size: Callable[[Any], int] | None = None) -> None:
        if not callable(fn):
            raise ConfigError(f"eval_step needs a callable fn(model, batch), got "
                              f"{type(fn).__name__}")
        if batch_size is not None and not callable(batch_size):
            raise ConfigError(f"eval_step's batch_size must be a function batch -> int, "
                              f"got {type(batch_size).__name__}")
        self.fn = fn
        self.metrics = _em.check(metrics, "eval_step")
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"eval_step({getattr(self.fn, '__qualname__', repr(self.fn))})"

    def _run(self, state: TrainState, batch: Any, session: _em.Evaluation | None,
             where: str) -> Metrics:
        if type(state) is not TrainState:
            _check_state(state, "an evaluation step")
        binding = _bind.binding_of(state)
        with torch.no_grad():
            if binding is not None:
                binding.set_mode(False)
                out = self.fn(binding.model_arg, batch) if binding.fsdp is None else \
                    binding.fsdp(self.fn, batch)  # with_fsdp: via the sharded root
            else:  # nothing is copied: eval mode under no_grad changes no tensor
                out = _bind.pure_call(state, self.fn, batch, state.params, state.buffers,
                                      False)
            if session is None:
                return eval_metrics(out, where, state.device)
            out, inputs = _em.split(out, self.metrics, where)
            session.update(inputs)
        if isinstance(out, Mapping) and not out:
            return {}  # only stateful metrics
        return eval_metrics(out, where, state.device)

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        if not self.metrics:
            return self._run(state, batch, None, "evaluation")
        # a direct call evaluates this one batch: each metric computed on it alone
        session = _em.Evaluation(self.metrics, state.device, 1)
        metrics = self._run(state, batch, session, "evaluation")
        return {**metrics, **session.compute()}

    def start_evaluation(self, device: torch.device, world: int) -> _em.Session:
        """What `ft.evaluate` runs: this step with its own fresh metric copies."""
        return _em.Session(self._run, _em.Evaluation(self.metrics, device, world)
                           if self.metrics else None)


def eval_step(fn: LossFn, *, metrics: Mapping[str, Any] | None = None,
              batch_size: Callable[[Any], int] | None = None) -> EvalStep:
    """Turn `fn(model, batch)` into an evaluation step: no grad, eval mode, state unchanged.

    `fn` returns a 0-d tensor (reported as "loss"), `(loss, {name: metric})` or a dict
    of metrics. Those are averaged over batches (weighted by batch size) by `ft.evaluate`
    and `with_validation`; `batch_size(batch) -> int` sizes batches it cannot infer.

    `metrics` maps names to torchmetrics `Metric`s or `MetricCollection`s, for metrics a
    mean of per-batch values gets wrong (F1, AUROC, precision, a confusion matrix): `fn`
    returns, under each such name, the arguments of that metric's `update` (`{"f1":
    (logits, y)}`; one tensor is one argument, a dict keyword arguments). Each evaluation
    updates its own fresh copy per batch and computes it once at the end (under `with_ddp`
    over every rank's samples); the objects given here are never updated. A direct call
    computes them on its one batch. See docs/metrics.md.

    Examples:
        >>> import torch, ftrain as ft
        >>> def metric_fn(model, batch):
        ...     x, y = batch
        ...     return {"acc": (model(x).argmax(-1) == y).float().mean()}
        >>> evaluator = ft.eval_step(metric_fn)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> sorted(evaluator(state, (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))))
        ['acc']
        >>> from torchmetrics.classification import MulticlassF1Score
        >>> f1 = ft.eval_step(lambda m, b: {"f1": (m(b[0]), b[1])},
        ...                   metrics={"f1": MulticlassF1Score(2, average="macro")})
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
        >>> sorted(ft.evaluate(f1, state, data))
        ['f1']
    """
    return EvalStep(fn, metrics, batch_size)


def request_stop(state: TrainState, reason: str) -> TrainState:
    """Ask the loop to stop after this step (or epoch end); `reason` is logged.

    Examples:
        >>> import torch, ftrain as ft
        >>> s = ft.request_stop(ft.TrainState.create(torch.nn.Linear(1, 1)), "done")
        >>> ft.stop_reason(s)
        'done'
    """
    return state.replace(slots={**state.slots, STOP_SLOT: str(reason)})


def stop_reason(state: TrainState) -> str | None:
    """The reason a step gave for stopping, or None."""
    reason = state.slots.get(STOP_SLOT)
    return None if reason is None else str(reason)
