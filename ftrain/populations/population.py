"""Populations: N models of one architecture trained together, in one step, with vmap.

`population(...)` stacks N states into one *population state*: an ordinary `TrainState`
whose params, buffers and optimizer state have a leading member dimension N. Its `model`
is a `StackedModel` (the template's module tree with every tensor stacked), so the
loops bind it, `ft.save` / `ft.load` store it, and `ft.bind(pop)` runs every member at once.
Its `optimizer` is a `PopulationOptimizer`: the members' shared optimizer plus their
own hyperparameters (learning rate, weight decay, momentum, eps, betas), which live as
device tensors in `pop.opt_state["hparams"]`.

`vmap(train_step(loss_fn))` (or `population_step(loss_fn)`) trains all members in one
step: per-member losses and gradients (eagerly one forward of the template on all members'
stacked tensors, batched by the rules of `batched` where it has them and vmapped where it
does not, and one autograd backward; compiled,
`torch.func.vmap(torch.func.grad_and_value(...))`), then
Adam / AdamW / SGD (and gradient clipping) with each member's hyperparameters, the same
math as torch's kernels (batched tensor ops; torch's fused Adam kernel where the device
has one). The step is a plain `(state, batch) -> (state, metrics)`
function, so `ft.fit`, `ft.iterate` and the outer combinators (logging, validation,
checkpoints, early stopping) drive it.
Its metrics are 0-d tensors: `"loss"` is the mean over members and `"loss/m3"` member 3's.

`member(pop, i)` returns member i as an ordinary state (its optimizer rebuilt with its
hyperparameters) that trains, saves, loads, binds and exports like any other.

The package's modules, one idea each: `model` (StackedModel), `hparams` (the optimizer
record and per-member hyperparameters), `seeding` (members drawn anew from seeds),
`members` (building a population, taking members out), `plan` (the kernel and update),
`batched` (the batched forward; its rules in `batched_rules`, `batched_views` and
`batched_nn`), `step` (PopulationStep), `evaluation`, `metrics`; this module holds `vmap`
and re-exports the public names.
"""

from __future__ import annotations

from typing import Any

from ftrain.core.step import EvalStep, TrainStep
from ftrain.errors import ConfigError
from ftrain.populations.evaluation import PopulationEvalStep, population_eval_step
from ftrain.populations.hparams import PopulationOptimizer
from ftrain.populations.members import member, population, split_members
from ftrain.populations.model import StackedModel, is_population
from ftrain.populations.step import PopulationStep, population_step

__all__ = ["PopulationEvalStep", "PopulationOptimizer", "PopulationStep", "StackedModel",
           "is_population", "member", "population", "population_eval_step",
           "population_step", "split_members", "vmap"]

def vmap(step: Any, **options: Any) -> PopulationStep | PopulationEvalStep:
    """Turn a core step into its population version: `ft.train_step(loss_fn)` into
    `population_step`, `ft.eval_step(fn)` into `population_eval_step`.

    `options` are those functions' keywords (`per_member_batches`, `member_metrics`, ...);
    a train step's `on_nonfinite` and `check_finite_every_step` carry over. Outer
    combinators (logging, validation, checkpoints, early stopping) wrap the result.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import vmap
        >>> vmap(ft.train_step(lambda m, b: m(b).sum()))
        population_step(<lambda>)
    """
    if isinstance(step, TrainStep):
        phases = step.phases
        used = [k for k in ("amp", "accumulation", "ddp") if getattr(phases, k) is not None]
        if used:
            raise ConfigError(f"ft.vmap: this train step has {used} set by an inner combinator; "
                              "populations support none of with_amp, with_accumulation and "
                              "with_ddp")
        if step.on_nonfinite == "skip":
            raise ConfigError("ft.vmap: on_nonfinite='skip' is not supported for populations "
                              "(use 'raise' or 'ignore')")
        kwargs = {"on_nonfinite": step.on_nonfinite,
                  "check_finite_every_step": step.check_finite_every_step, **options}
        if step.metrics:
            raise ConfigError(f"ft.vmap does not support train_step(metrics=...) (got "
                              f"{sorted(step.metrics)}): return per-member values instead")
        return population_step(step.loss_fn, **kwargs)
    if isinstance(step, EvalStep):
        if step.metrics or step.batch_size is not None:
            raise ConfigError("ft.vmap does not support eval_step(metrics=..., "
                              "batch_size=...): return per-member values from fn instead")
        return population_eval_step(step.fn, **options)
    if isinstance(step, (PopulationStep, PopulationEvalStep)):
        raise ConfigError(f"{step!r} is already a population step")
    raise ConfigError(f"ft.vmap takes a step built by ft.train_step or ft.eval_step, got "
                      f"{step!r}; wrap the vmapped step with outer combinators instead "
                      "(ft.with_logging(ft.vmap(ft.train_step(loss_fn))))")
