"""The population step: every member trained on a batch in one vmapped call."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from ftrain.core import bind as _bind
from ftrain.core import rng as _rng
from ftrain.core.state import TrainState, clone_tree
from ftrain.core.step import _nonfinite_epoch_end, advance, pure_result
from ftrain.errors import ConfigError, NonFiniteLossError
from ftrain.populations.metrics import Metrics, _check_batch
from ftrain.populations.model import _check_population
from ftrain.populations.plan import Randomness, _Plan

log = logging.getLogger("ftrain")


@functools.cache
def _isolate() -> dict[str, bool]:
    """Each population's kernel keeps its own compiled graphs (no shared recompile limit)."""
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return {"isolate_recompiles": True}
    return {}  # pragma: no cover - older torch


class PopulationStep:
    """The step built by `population_step` (or `vmap(train_step(loss_fn))`)."""

    inner = None

    def __init__(self, loss_fn: Callable[[Any, Any], Any], *, per_member_batches: bool = False,
                 member_metrics: bool = True, on_nonfinite: Literal["raise", "ignore"] = "raise",
                 check_finite_every_step: bool = False, randomness: Randomness = "different",
                 compile: bool | Mapping[str, Any] = False, fallback: bool = True,
                 batched: bool = True) -> None:
        if not callable(loss_fn):
            raise ConfigError(f"population_step needs a callable loss_fn(model, batch), got "
                              f"{type(loss_fn).__name__}")
        if on_nonfinite not in ("raise", "ignore"):
            raise ConfigError(f"a population step's on_nonfinite must be 'raise' or 'ignore' "
                              f"(per-member skipping is not supported), got {on_nonfinite!r}")
        if randomness not in ("different", "same"):
            raise ConfigError(f"randomness must be 'different' or 'same', got {randomness!r}")
        self.loss_fn = loss_fn
        self.per_member_batches = bool(per_member_batches)
        self.member_metrics = bool(member_metrics)
        self.on_nonfinite = on_nonfinite
        self.check_finite_every_step = check_finite_every_step
        self.randomness = randomness
        # torch.compile options for each kernel once it is built (None: eager)
        self.compile_options: dict[str, Any] | None = None
        if compile is not False:
            if not (compile is True or isinstance(compile, Mapping)):
                raise ConfigError(f"compile must be a bool or a dict of torch.compile "
                                  f"options, got {compile!r}")
            self.compile_options = {"fullgraph": True, **_isolate(),
                                    **(compile if isinstance(compile, Mapping) else {})}
        self.fallback = fallback
        self.fallback_reason: str | None = None
        self.batched = bool(batched)
        self._plans: list[_Plan] = []

    def __repr__(self) -> str:
        name = getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))
        return f"population_step({name}{', compiled' if self.compile_options else ''})"

    @property
    def vmap_reason(self) -> str | None:
        """Why the latest population's eager steps run through vmap rather than the batched
        path (None: batched, or not run yet; see `population_step`)."""
        return self._plans[-1].vmap_reason if self._plans else None

    def compiled(self, *, fallback: bool | None = None, **options: Any) -> PopulationStep:
        """A new step like this one whose kernel is compiled with
        `torch.compile(fullgraph=True, **options)` (what `ft.compile` builds); `fallback`
        (default: this step's) runs it eagerly, with a warning, if it cannot be captured.

        Examples:
            >>> from ftrain.populations.population import population_step
            >>> population_step(lambda m, b: m(b).sum()).compiled(mode="default")
            population_step(<lambda>, compiled)
        """
        return PopulationStep(self.loss_fn, per_member_batches=self.per_member_batches,
                              member_metrics=self.member_metrics,
                              on_nonfinite=self.on_nonfinite,  # type: ignore[arg-type]
                              check_finite_every_step=self.check_finite_every_step,
                              randomness=self.randomness,  # type: ignore[arg-type]
                              compile={**(self.compile_options or {}), **options},
                              fallback=self.fallback if fallback is None else fallback,
                              batched=self.batched)

    def plan(self, state: TrainState) -> _Plan:
        """The kernel and update plan for this population's model and optimizer (cached)."""
        for p in self._plans:
            if p.fits(state):
                return p
        plan = _Plan(self, state)
        self._plans = [*self._plans[-3:], plan]
        return plan

    def kernel(self, state: TrainState) -> Callable[..., Metrics]:
        """The plain in-place kernel `(params, buffers, opt_state, batch) -> [N] metrics`
        for this population (compile it, or call it in a hand-written loop)."""
        _check_population(state, "a population step")
        return self.plan(state).kernel

    def _run(self, plan: _Plan, params: dict[str, torch.Tensor],
             buffers: dict[str, torch.Tensor], opt_state: dict[str, Any], batch: Any
             ) -> tuple[Metrics, Metrics]:
        if not plan.compiled:
            return plan.run(params, buffers, opt_state, batch)
        from torch._dynamo.exc import TorchDynamoException  # lazy: import time of ftrain
        try:  # a capture failure happens while tracing, before any tensor is changed
            return plan.run(params, buffers, opt_state, batch)
        except TorchDynamoException as err:
            reason = _compile_failure(err)
            if not self.fallback:
                raise ConfigError(f"cannot compile the population step of {self!r} into one "
                                  f"graph: {reason}; pass fallback=True to run it eagerly"
                                  ) from err
            self.fallback_reason = reason
            log.warning("running the population step of %r eagerly: %s", self, reason)
            plan.eager()
            return plan.run(params, buffers, opt_state, batch)

    def init(self, state: TrainState) -> TrainState:
        _check_population(state, "a population step")
        self.plan(state)
        return state

    def epoch_end(self, state: TrainState) -> tuple[TrainState, Metrics]:
        return _nonfinite_epoch_end(state, self.on_nonfinite)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        _check_population(state, "a population step")
        plan = self.plan(state)
        if self.per_member_batches:
            _check_batch(batch, state.model.n, f"step {state.step}")
        binding = _bind.stepping(state)
        if binding is not None:  # a loop's donated state: update its live tensors in place
            params, buffers, opt_state = state.params, state.buffers, state.opt_state
            generator, rank = binding.generator, binding.rank
            binding.nonfinite_policy = self.on_nonfinite
        else:  # a direct call is pure: work on copies
            params, buffers, opt_state = (clone_tree(state.params), clone_tree(state.buffers),
                                          clone_tree(state.opt_state))
            generator, rank = _rng.generator_for(state.device), _rng.rank()
        with _rng.step_seeded(generator, state.seed, state.step, rank):
            values, metrics = self._run(plan, params, buffers, opt_state, batch)
        if self.check_finite_every_step and not bool(torch.isfinite(values["loss"]).all()):
            bad = (~torch.isfinite(values["loss"])).nonzero().flatten().tolist()
            raise NonFiniteLossError(f"the loss of member(s) {bad} was not finite at step "
                                     f"{state.step}")
        if binding is not None:  # updated in place
            new = advance(state, binding, [metrics["loss"]], self.on_nonfinite,
                          "a population step")
            return new, metrics
        return pure_result(state, metrics, params, buffers, opt_state, dict(state.slots),
                           self.on_nonfinite), metrics


def _compile_failure(err: BaseException) -> str:
    text = str(err).strip()
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)


def population_step(loss_fn: Callable[[Any, Any], Any], *, per_member_batches: bool = False,
                    member_metrics: bool = True,
                    on_nonfinite: Literal["raise", "ignore"] = "raise",
                    check_finite_every_step: bool = False,
                    randomness: Randomness = "different",
                    compile: bool | Mapping[str, Any] = False,
                    fallback: bool = True, batched: bool = True) -> PopulationStep:
    """A step that trains every member of a population on a batch, in one vmapped call.

    `loss_fn(model, batch)` is the ordinary one: it sees one member's model. The batch is
    shared by all members, or (`per_member_batches=True`) each tensor in it leads with the
    member dimension N. Metrics are 0-d tensors: each metric's mean over members under its
    own name and member i's under `"<name>/m<i>"` (`member_metrics=False` keeps the means
    only). The update is the optimizer's (Adam, AdamW, SGD, gradient clipping) with each
    member's hyperparameters. A non-finite loss of any member is raised at the next host
    read (`on_nonfinite="ignore"` lets members diverge). Random layers draw from one
    generator seeded from (population seed, step): members differ from each other
    (`randomness="same"` gives them the same draws) but not as their own seeds would.
    `compile=True` compiles the step's kernel (per-member loss and gradients with
    `torch.func.grad_and_value`, and the update) with `torch.compile(fullgraph=True)`
    once per population model (a dict adds torch.compile options, e.g.
    `{"mode": "max-autotune"}`); a loss function that cannot be captured runs eagerly with
    a warning (`fallback=False` raises instead). An eager step first runs `loss_fn` once on
    all members' stacked tensors (`batched=True`: one GEMM per linear layer, one
    cross-entropy over [N, B, C], ...; see `ftrain.populations.batched`); the first step
    that uses a function it has no rule for runs, like every later one, through vmap
    (`step.vmap_reason` says why; `loss_fn` may then run twice in that step).

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import population, population_step
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return torch.nn.functional.mse_loss(model(x), y)
        >>> template = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> pop = population(template, hparams={"lr": [0.01, 0.1]})
        >>> pop, metrics = population_step(loss_fn)(pop, (torch.randn(8, 3), torch.randn(8, 1)))
        >>> pop.step, sorted(metrics)
        (1, ['loss', 'loss/m0', 'loss/m1'])
    """
    return PopulationStep(loss_fn, per_member_batches=per_member_batches,
                          member_metrics=member_metrics, on_nonfinite=on_nonfinite,
                          check_finite_every_step=check_finite_every_step,
                          randomness=randomness, compile=compile, fallback=fallback,
                          batched=batched)

