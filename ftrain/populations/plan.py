"""A population step's plan: the per-member loss and gradients (batched, else vmapped) and
the optimizer's update of every member, as one in-place kernel per (model, optimizer)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from ftrain.compiling.step import _graphs
from ftrain.core import bind as _bind
from ftrain.core import rng as _rng
from ftrain.core.state import TrainState
from ftrain.core.swap import Slots
from ftrain.errors import ConfigError
from ftrain.populations.batched import BatchedLoss
from ftrain.populations.hparams import HPARAMS, PopulationOptimizer, _lr_value
from ftrain.populations.metrics import Metrics, _member_metrics, _member_values, _split
from ftrain.populations.model import StackedModel

if TYPE_CHECKING:
    from ftrain.populations.step import PopulationStep

log = logging.getLogger("ftrain")

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
        # eager steps try the batched path first (batched.py); the first step it cannot
        # compute sends this plan to vmap for good, and says why in `vmap_reason`
        self.batched: BatchedLoss | None = None
        self.vmap_reason: str | None = None
        if not step.batched:
            self.vmap_reason = "batched=False"
        elif self.slots is None:
            self.vmap_reason = "parametrized modules"
        else:
            # the rules register themselves on import (cost: ~60 ms, once)
            from ftrain.populations import batched_nn, batched_views  # noqa: F401
            self.batched = BatchedLoss(self.template, self.slots, self.loss_fn,
                                       self.buffer_names, step.randomness,
                                       step.per_member_batches)
        self.generator = _rng.generator_for(state.device)
        self.leaves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ones: torch.Tensor | None = None
        self.label = repr(step)

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
        else:  # eager: a batched or vmapped forward and plain autograd (faster than
            # torch.func.grad); the members' losses are independent, so the gradient of
            # their sum is each member's own
            trainable = {k: self._leaf(k, params[k]) for k in self.trainable}
            done = self._batched(trainable, frozen, buffers, batch) if self.batched else None
            if done is None:
                loss, (metrics, new_buffers) = self.forward_fn(trainable, frozen, buffers,
                                                               batch)
                gs = list(torch.autograd.grad(loss.sum(), list(trainable.values())))
            else:
                gs, metrics = done
                new_buffers = {}  # the batched path refuses a forward that changes one
        factors: list[torch.Tensor] = []
        with torch.no_grad():
            self._update(list(trainable.values()), gs, opt_state, factors)
            for k, v in new_buffers.items():
                target = buffers[k]
                if torch.compiler.is_compiling() or v.data_ptr() != target.data_ptr():
                    target.copy_(v)
        summary = _member_values(metrics, self.member_metrics) if self.compiled else None
        return metrics, summary, factors

    def _leaf(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """`t` as an autograd leaf: itself if it requires grad, else a detached alias, made
        once per tensor (it shares `t`'s storage and version counter, so it sees every
        in-place update; a new one per step cost ~5 us and a new batched wrapper each)."""
        if t.requires_grad:
            return t
        held = self.leaves.get(name)
        if held is None or held[0] is not t:
            held = self.leaves[name] = (t, t.detach().requires_grad_())
        return held[1]

    def _batched(self, trainable: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], batch: Any
                 ) -> tuple[list[torch.Tensor], Metrics] | None:
        """The members' gradients and [N] metrics by the batched path, or None (and vmap
        from now on) when it cannot compute this step as vmap would; nothing has been
        changed then (the generator is put back)."""
        assert self.batched is not None
        try:
            loss, metrics = self.batched({**trainable, **frozen, **buffers}, batch,
                                         self.generator)
            # the gradient of the losses' sum, seeded with its ones directly (no sum op)
            ones = self.ones
            if ones is None or ones.shape != loss.shape or ones.dtype != loss.dtype:
                ones = self.ones = torch.ones_like(loss)
            gs = list(torch.autograd.grad(loss, list(trainable.values()), ones))
        except Exception as err:  # vmap computes it, or raises its own error
            self.batched.rewind()
            self.batched = None
            self.vmap_reason = f"{type(err).__name__}: {err}"
            log.info("the population step %s runs through vmap: %s", self.label,
                     self.vmap_reason)
            return None
        return gs, metrics

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
