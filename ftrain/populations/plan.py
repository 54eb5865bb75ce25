"""A population step's plan: the per-member loss and gradients (vmapped) and the
optimizer's update of every member, as one in-place kernel per (model, optimizer)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from ftrain.compiling.step import _graphs
from ftrain.core import bind as _bind
from ftrain.core.state import TrainState
from ftrain.core.swap import Slots
from ftrain.errors import ConfigError
from ftrain.populations.hparams import HPARAMS, PopulationOptimizer, _lr_value
from ftrain.populations.metrics import Metrics, _member_metrics, _member_values, _split
from ftrain.populations.model import StackedModel

if TYPE_CHECKING:
    from ftrain.populations.step import PopulationStep

Randomness = Literal["different", "same"]
Leaves = list[torch.Tensor] | tuple[torch.Tensor, ...]
# a kernel body's results: [N] metrics, (means, members' values) when compiled, and the
# per-member factors of the update
Body = tuple[Metrics, tuple[Metrics, dict[str, tuple[torch.Tensor, ...]]] | None,
             list[torch.Tensor]]


class _Plan:
    """What a population step needs for one (model, optimizer): the per-member loss and
    gradient function and the batched update, as one in-place kernel."""

    def __init__(self, step: PopulationStep, state: TrainState) -> None:
        model: StackedModel = state.model
        self.model, self.optimizer = model, state.optimizer
        self.template = copy.deepcopy(model.template).train(True)  # private: we swap its slots
        self.trainable = [n for n, p in self.template.named_parameters() if p.requires_grad]
        self.frozen = [n for n, p in self.template.named_parameters() if not p.requires_grad]
        self.buffer_names = [n for n, _ in self.template.named_buffers()]
        if not self.trainable:
            raise ConfigError("this population has no trainable parameter")
        opt = state.optimizer
        if not isinstance(opt, PopulationOptimizer):
            raise ConfigError("this population has no optimizer; build it from a state "
                              "made with TrainState.create(model, optimizer)")
        for t in opt.base.transforms:
            if not hasattr(t, "apply_gradients"):
                raise ConfigError(f"a population step applies transforms with an "
                                  f"apply_gradients method (adam, adamw, sgd and "
                                  f"clip_grad_norm); this optimizer has {t.name!r}")
        self.popt = opt
        self.loss_fn = step.loss_fn
        self.member_metrics = step.member_metrics
        try:
            self.slots: Slots | None = Slots(self.template)
        except ValueError:  # parametrized modules: functional_call resolves them
            self.slots, self.apply = None, _bind._Apply(self.template)
        in_dims = (0, 0, 0, 0 if step.per_member_batches else None)
        self.compiled = step.compile_options is not None
        # a CUDA graph's outputs are overwritten by its next replay: such a kernel's
        # results are copied (as ft.compile's are)
        mode = (step.compile_options or {}).get("mode") or "default"
        self.graphs = self.compiled and _graphs(mode, state.device)
        self.forward_fn = torch.func.vmap(self.member_loss, in_dims=in_dims,
                                          randomness=step.randomness)
        self.grad_fn = torch.func.vmap(
            torch.func.grad_and_value(self.member_loss, has_aux=True),
            in_dims=in_dims, randomness=step.randomness)
        self._body: Callable[..., Body] = self._step
        if step.compile_options is not None:
            self._body = torch.compile(self._step, **step.compile_options)

    def member_loss(self, trainable: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                    buffers: dict[str, torch.Tensor], batch: Any) -> Any:
        """One member's loss and (metrics, buffers after the forward), given its tensors."""
        tensors = {**trainable, **frozen, **buffers}
        if self.slots is None:
            seen: dict[str, Any] = {}
            out = torch.func.functional_call(
                self.apply, {"model." + k: v for k, v in tensors.items()},
                (self.loss_fn, batch, seen), strict=False)
            new_buffers = {k: seen[k] for k in self.buffer_names}
        else:
            old = self.slots.put(tensors)
            try:
                out = self.loss_fn(self.template, batch)
                new_buffers = self.slots.current(self.buffer_names, buffers)
            finally:
                self.slots.restore(old)
        loss, metrics = _split(out)
        return loss, (metrics, new_buffers)

    def eager(self) -> None:
        """Run this plan's kernel eagerly from now on (compilation failed)."""
        self.compiled = False
        self._body = self._step

    def kernel(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
               opt_state: dict[str, Any], batch: Any) -> Metrics:
        """One training step of every member, in place on the given tensors."""
        return self.run(params, buffers, opt_state, batch, step_metrics=False)[0]

    def run(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
            opt_state: dict[str, Any], batch: Any, step_metrics: bool = True
            ) -> tuple[Metrics, Metrics]:
        """`kernel`'s [N] metrics, and the step's metrics: their means and, with
        `member_metrics`, `name/m{i}` per member (compiled, made in the graph)."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        values, summary, _ = self._body(params, buffers, opt_state, batch)
        if self.graphs:
            values = {k: v.clone() for k, v in values.items()}
            summary = None  # views of the graph's outputs: made again from the copies
        if not step_metrics:
            return values, {}
        return values, _member_metrics(*(summary or _member_values(values,
                                                                   self.member_metrics)))

    def fits(self, state: TrainState) -> bool:
        return state.model is self.model and state.optimizer is self.optimizer

    def _step(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
              opt_state: dict[str, Any], batch: Any) -> Body:
        """The kernel's body: its [N] metrics; when compiled, the step's metrics
        (`_member_values`, made in the graph: eager ops after a compiled step run on cold
        caches, measured ~25 us for a mean and ~30 us to unbind 32 members), else None; and
        the per-member factors of the update (returned so that a compiled graph computes each
        member's factor once: Inductor otherwise inlines e.g. the bias corrections' `pow`
        into every element's update, measured 219 -> 78 us per Adam update of the
        benchmark's 32 MLPs)."""
        frozen = {k: params[k] for k in self.frozen}
        if self.compiled:  # torch.func all the way: traceable as one graph
            trainable = {k: params[k] for k in self.trainable}
            grads, (_, (metrics, new_buffers)) = self.grad_fn(trainable, frozen, buffers,
                                                              batch)
            gs: Leaves = [grads[k] for k in self.trainable]
        else:  # eager: a vmapped forward and plain autograd (faster than torch.func.grad)
            trainable = {k: (t if t.requires_grad else t.detach().requires_grad_())
                         for k in self.trainable for t in (params[k],)}
            loss, (metrics, new_buffers) = self.forward_fn(trainable, frozen, buffers, batch)
            gs = list(torch.autograd.grad(loss.sum(), list(trainable.values())))
        factors: list[torch.Tensor] = []
        with torch.no_grad():
            self._update(list(trainable.values()), gs, opt_state, factors)
            for k, v in new_buffers.items():
                target = buffers[k]
                if torch.compiler.is_compiling() or v.data_ptr() != target.data_ptr():
                    target.copy_(v)
        summary = _member_values(metrics, self.member_metrics) if self.compiled else None
        return metrics, summary, factors

    def _update(self, ps: list[torch.Tensor], gs: Leaves, opt_state: dict[str, Any],
                keep: list[torch.Tensor]) -> None:
        """The optimizer's own update with each member's hyperparameters (per-member
        tensors), on the stacked tensors."""
        hps = opt_state.get(HPARAMS, {})
        settings: dict[str, Any] = dict(hps)
        if self.popt.lr_schedules is not None:
            settings["lr"] = _lr_value(self.popt, None, hps, opt_state["count"])
        self.popt.base.apply_gradients(
            dict(zip(self.trainable, ps)), dict(zip(self.trainable, gs)), opt_state,
            settings=settings, capturable=self.compiled, members=True,
            lockstep=self.popt.lockstep, keep=keep)
