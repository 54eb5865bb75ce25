"""`with_dp`: DP-SGD as an option of the core step (per-sample clipping, Gaussian noise).

`with_dp` sets the core step's `dp` option (like `with_accumulation`), so the order of
wrapping does not matter. With it the core makes each update's gradient this way:

    per micro-batch: per-sample gradients (torch.func.vmap of torch.func.grad of the
        user's loss_fn on one sample, as a batch of 1), each sample's whole gradient
        scaled by min(1, C / (norm + 1e-6)) (Opacus's flat clipping), summed
    once per update: + Gaussian noise of std noise_multiplier * C (one rank only under
        with_ddp), drawn from a generator seeded from the slot's secret noise_seed
        and its count of noisy steps
    / the expected batch size (the batch's size, or sample_rate * dataset size for
        Poisson batches) -> `.grad`

then the usual phases run (gradient sync across ranks, finite check, update). The noisy
steps are counted in the slot `name` (see ftrain.privacy.accounting): plain host data,
checked when a checkpoint brings it back, turned into epsilon only at epoch ends
(`dp_epsilon`) or by `ftrain.privacy.epsilon(state)`.
"""

from __future__ import annotations

import math
import secrets
import weakref
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ftrain.core import rng as _rng
from ftrain.core.accumulation import split_batch
from ftrain.core.bind import _Apply
from ftrain.core.layer import Step, core
from ftrain.core.outputs import split_loss
from ftrain.core.phases import autocast, with_option
from ftrain.core.state import STOP_SLOT, TrainState
from ftrain.data.batches import batch_size
from ftrain.errors import ConfigError
from ftrain.parallel import dist as _dist
from ftrain.privacy import accounting as _acc
from ftrain.privacy import sampling as _sampling

NOISE = 5  # salt of the noise stream (ftrain.core.rng uses 1-4)
_checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # templates found fit for DP
_generators: dict[torch.device, torch.Generator] = {}
# Per-sample gradients are taken for this many bytes' worth of samples at a time (then
# clipped and summed): fresh buffers of this size are reused by the allocator instead of
# being mapped and faulted in anew each step, and memory stays bounded by it.
CHUNK_BYTES = 32 << 20


def _number(value: Any, name: str, test: Any, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not test(value):
        raise ConfigError(f"with_dp: {name} must be {expected}, got {value!r}")
    return float(value)


@attrs.frozen
class DP:
    """The privacy option `with_dp` gives a core step (a frozen record); see `with_dp`."""

    max_grad_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    accountant: str = "rdp"
    target_epsilon: float | None = None
    data: Any = attrs.field(default=None, repr=False, eq=False)
    name: str = "dp"
    noise_seed: int | None = None

    def __attrs_post_init__(self) -> None:
        _number(self.max_grad_norm, "max_grad_norm", lambda v: v > 0, "a number > 0")
        _number(self.noise_multiplier, "noise_multiplier", lambda v: v >= 0,
                "a number >= 0")
        _number(self.delta, "delta", lambda v: 0 < v < 1, "a number in (0, 1)")
        if self.sample_rate is not None:
            _sampling.check_rate(self.sample_rate, "with_dp")
        if self.expected_batch_size is not None:
            _number(self.expected_batch_size, "expected_batch_size", lambda v: v > 0,
                    "a number > 0 or None")
        if self.accountant not in _acc.ACCOUNTANTS:
            raise ConfigError(f"with_dp: accountant must be one of {_acc.ACCOUNTANTS}, got "
                              f"{self.accountant!r}")
        if self.target_epsilon is not None:
            _number(self.target_epsilon, "target_epsilon", lambda v: v > 0,
                    "a number > 0 or None")
            if self.noise_multiplier == 0:
                raise ConfigError("with_dp: target_epsilon needs noise_multiplier > 0 (a "
                                  "step without noise spends an infinite epsilon)")
            if self.sample_rate is None and self.data is None:
                raise ConfigError("with_dp: target_epsilon needs the sample rate: pass "
                                  "sample_rate= or data= (the training DataLoader)")
        if self.sample_rate is not None and self.data is not None:
            raise ConfigError("with_dp: give sample_rate= or data=, not both")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name= must be a non-empty string, got {self.name!r}")
        if self.noise_seed is not None and (
                isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int)
                or not 0 <= self.noise_seed < 2**63):
            raise ConfigError(f"with_dp: noise_seed must be None (secret, drawn once) or an "
                              f"int in [0, 2**63), got {self.noise_seed!r}")

    def __repr__(self) -> str:
        return (f"with_dp(max_grad_norm={self.max_grad_norm}, noise_multiplier="
                f"{self.noise_multiplier})")

    # -- accounting ------------------------------------------------------------------------

    def rate_and_size(self, world: int) -> tuple[float | None, float | None]:
        """The sample rate (None: unknown) and the expected batch size (None: the
        batch's own size) of this run with `world` processes."""
        if self.data is not None:
            q, size = _sampling.rate_and_size(self.data, world)
            return q, (self.expected_batch_size if self.expected_batch_size else size)
        return self.sample_rate, self.expected_batch_size

    def init(self, state: TrainState) -> TrainState:
        """Refuse models DP-SGD cannot train; create the slot, or check the one a
        checkpoint brought; compute the step budget of `target_epsilon`."""
        check_model(state)
        _acc.require()
        slot = state.slots.get(self.name)
        if slot is None:
            slot = self.fresh_slot()
        else:
            slot = _acc.check_slot(slot, self.name)
        slot["delta"], slot["accountant"] = self.delta, self.accountant
        slot["max_steps"] = limit = self.budget(slot["history"])
        if limit is not None and slot["steps"] >= limit:
            raise ConfigError(
                f"with_dp: target_epsilon={self.target_epsilon} (delta={self.delta}) allows "
                f"{limit} noisy steps at noise_multiplier={self.noise_multiplier}, and "
                f"{slot['steps']} were taken: nothing is left to train; raise the noise "
                f"or the target, or lower the sample rate")
        return state.replace(slots={**state.slots, self.name: slot})

    def fresh_slot(self) -> dict[str, Any]:
        # the noise must be unknown to whoever sees the model: by default its seed is
        # drawn from the OS's secret source, once per run, and kept in the slot (a
        # resume continues the same stream; keep checkpoints private)
        seed = secrets.randbits(62) if self.noise_seed is None else self.noise_seed
        return {"steps": 0, "history": [], "delta": self.delta,
                "accountant": self.accountant, "max_steps": None, "noise_seed": seed}

    def budget(self, history: list[Any]) -> int | None:
        """The total number of noisy steps `target_epsilon` allows, or None."""
        if self.target_epsilon is None:
            return None
        q, _ = self.rate_and_size(_dist.rank_world()[1])
        assert q is not None  # checked when built
        done = sum(int(h[2]) for h in history)
        return done + _acc.steps_for_epsilon(
            self.target_epsilon, noise_multiplier=self.noise_multiplier, sample_rate=q,
            delta=self.delta, accountant=self.accountant, history=history)

    def account(self, state: TrainState, slots: dict[str, Any]) -> None:
        """Count this step in `slots[name]` (a new dict; host ints only); ask the loop to
        stop once the budget is spent."""
        slot = slots.get(self.name)
        slot = self.fresh_slot() if slot is None else slot
        q, _ = self.rate_and_size(_dist.rank_world()[1])
        history = [list(h) for h in slot["history"]]
        setting = [self.noise_multiplier, q if q is not None else 1.0]
        if history and history[-1][:2] == setting:
            history[-1][2] += 1
        else:
            history.append([*setting, 1])
        steps = slot["steps"] + 1
        slots[self.name] = {**slot, "steps": steps, "history": history}
        limit = slot["max_steps"]
        if limit is not None and steps >= limit:
            slots[STOP_SLOT] = (f"privacy budget spent: {steps} noisy steps reach "
                                f"target_epsilon={self.target_epsilon} at delta={self.delta}")

    def epoch_metrics(self, state: TrainState) -> dict[str, torch.Tensor]:
        """`dp_epsilon`: the privacy spent so far (a host computation, once per epoch)."""
        slot = state.slots.get(self.name)
        if slot is None:
            return {}
        eps = _acc.epsilon_of(slot["history"], self.delta, self.accountant)
        return {"dp_epsilon": torch.tensor(eps, dtype=torch.float64)}

    # -- the gradient phase ----------------------------------------------------------------

    def bound_gradients(self, state: TrainState, batch: Any, loss_fn: Any, binding: Any,
                        phases: Any) -> dict[str, torch.Tensor]:
        """`gradients` in a loop: on the binding's live module (it holds frozen params and
        buffers) for its trainable parameters."""
        if self.name not in state.slots:
            state.slots[self.name] = self.fresh_slot()  # the loop's slots: in place
        return self.gradients(state, batch, loss_fn, binding.model_arg,
                              binding.trainable.get(None, {}), {}, phases,
                              binding.generator, binding.rank)

    def pure_gradients(self, state: TrainState, batch: Any, loss_fn: Any, params: Any,
                       buffers: Any, trainable: list[Any], phases: Any,
                       slots: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`gradients` in a direct call: the template run on the call's copies (`params`,
        `buffers`; `trainable`'s are differentiated), the step counted in `slots`."""
        check_model(state)
        if self.name not in slots:  # a direct call without init: the noise seed first
            slots[self.name] = self.fresh_slot()
            state = state.replace(slots=slots)
        chosen = trainable[0][2]
        others = {n: t for n, t in params.items() if n not in chosen}
        metrics = self.gradients(state, batch, loss_fn, state.model, chosen,
                                 {**others, **buffers}, phases,
                                 _rng.generator_for(state.device), _rng.rank())
        self.account(state, slots)
        return metrics

    def gradients(self, state: TrainState, batch: Any, loss_fn: Any, model: Any,
                  params: dict[str, torch.Tensor], others: dict[str, torch.Tensor],
                  phases: Any, generator: torch.Generator, rank: int
                  ) -> dict[str, torch.Tensor]:
        """Per-sample clipped gradients of `loss_fn` summed over the batch (its
        micro-batches under `with_accumulation`), plus noise, over the expected batch
        size, written to `params`' `.grad`; returns the metrics (means over samples).

        `model` runs `loss_fn` via `functional_call` with `params` (the tensors to
        differentiate) and `others` (frozen params, buffers; none for a loop's live
        module, which holds them)."""
        check_model(state)
        slot = state.slots.get(self.name)
        if slot is not None and slot.get("max_steps") is not None \
                and slot.get("steps", 0) >= slot["max_steps"]:
            raise ConfigError(f"step {state.step}: the privacy budget target_epsilon="
                              f"{self.target_epsilon} is spent ({slot['steps']} noisy "
                              f"steps); a loop stops before this step")
        names = list(params)
        primals = {n: p.detach() for n, p in params.items()}
        apply = _Apply(model)
        summed: list[torch.Tensor] | None = None
        totals: dict[str, torch.Tensor] = {}
        count = 0
        acc = phases.accumulation
        with _rng.step_seeded(generator, state.seed, state.step, rank):
            size = batch_size(batch)
            parts = [batch] if acc is None or size == 0 else acc.split_batch(batch,
                                                                             state.step)
            per_chunk = max(1, CHUNK_BYTES // max(1, sum(
                p.numel() * p.element_size() for p in primals.values())))
            for i, part in enumerate(parts):
                where = f"step {state.step}" + (f", micro-batch {i}" if acc else "")
                n = batch_size(part)
                chunks = [part] if n <= per_chunk else split_batch(
                    part, math.ceil(n / per_chunk))  # near-equal parts <= per_chunk
                for chunk in chunks if n else ():
                    grads, metrics = self._per_sample(apply, loss_fn, primals, others,
                                                      chunk, phases, state.device, where)
                    clipped = self.clip([grads[k] for k in names])
                    del grads
                    summed = clipped if summed is None else [
                        s.add_(c) for s, c in zip(summed, clipped)]
                    for k, v in metrics.items():
                        totals[k] = v.sum(0) if k not in totals else totals[k] + v.sum(0)
                count += n
        if summed is None:
            summed = [torch.zeros_like(primals[k]) for k in names]
        world = phases.world
        self.add_noise(summed, state, rank)
        _, expected = self.rate_and_size(world)
        denominator = float(expected) if expected else float(max(size, 1) * world)
        factor = world / denominator  # with_ddp averages: each rank sends world x its part
        for k, s in zip(names, summed):
            params[k].grad = s.mul_(factor).to(params[k].dtype)
        if not totals:
            return {"loss": torch.zeros((), device=state.device)}
        return {k: (v / count).detach() for k, v in totals.items()}

    def _per_sample(self, apply: nn.Module, loss_fn: Any, primals: dict[str, torch.Tensor],
                    others: dict[str, torch.Tensor], batch: Any, phases: Any,
                    device: torch.device, where: str
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        leaves, spec = pytree.tree_flatten(batch)
        batched = [i for i, t in enumerate(leaves)
                   if isinstance(t, torch.Tensor) and t.dim() > 0]
        prefixed = {"model." + k: v for k, v in others.items()}

        def loss_of(p: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> Any:
            one = list(leaves)
            for i, x in zip(batched, xs):
                one[i] = x.unsqueeze(0)
            sample = pytree.tree_unflatten(one, spec)
            tensors = {**prefixed, **{"model." + k: v for k, v in p.items()}}
            with autocast(phases, device):
                out = torch.func.functional_call(apply, tensors, (loss_fn, sample),
                                                 strict=False)
            loss, metrics = split_loss(out, where)
            return loss, metrics

        grad = torch.func.grad(loss_of, has_aux=True)
        per_sample = torch.func.vmap(grad, in_dims=(None, 0), randomness="different")
        grads, metrics = per_sample(primals, [leaves[i] for i in batched])
        return grads, metrics

    def clip(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each sample's gradient scaled to norm <= max_grad_norm, summed over samples
        (the computation of Opacus's `DPOptimizer.clip_and_accumulate`)."""
        norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grads]
        per_sample = torch.stack(norms, dim=1).norm(2, dim=1)
        factor = (self.max_grad_norm / (per_sample + 1e-6)).clamp(max=1.0)
        return [(factor.to(g.dtype) @ g.reshape(len(g), -1)).view(g.shape[1:])
                for g in grads]  # = einsum("i,i...") as Opacus, as one matrix-vector

    def add_noise(self, summed: list[torch.Tensor], state: TrainState, rank: int) -> None:
        """Gaussian noise of std noise_multiplier * max_grad_norm, on rank 0 only (the
        ranks' sums add up to one noisy sum), from a generator of the slot's secret
        `noise_seed` and its count of noisy steps: that count never goes back (a
        with_rollback does not rewind it), so no noise is ever drawn twice."""
        if self.noise_multiplier == 0 or rank != 0 or not summed:
            return
        slot = state.slots[self.name]
        device = summed[0].device
        g = _generators.get(device)
        if g is None:
            g = _generators[device] = torch.Generator(device=device)
        g.manual_seed(_rng.mix(slot["noise_seed"], slot["steps"], rank, NOISE))
        std = self.noise_multiplier * self.max_grad_norm
        for s in summed:
            s.add_(torch.normal(0.0, std, size=s.shape, device=device, dtype=s.dtype,
                                generator=g))




def check_model(state: TrainState) -> None:
    """Refuse what per-sample gradients cannot be taken of: several models in one state,
    modules mixing samples (BatchNorm; instance norm tracking running statistics)."""
    if state.multi:
        raise ConfigError("with_dp trains a state with one model; this state has "
                          f"{sorted(state.model)}")
    model = state.model
    if model in _checked:
        return
    for name, module in model.named_modules():
        tracking = isinstance(module, nn.modules.instancenorm._InstanceNorm) and \
            module.track_running_stats
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or tracking:
            raise ConfigError(
                f"with_dp: module {name or '(root)'!r} is {type(module).__name__}, which "
                f"mixes samples of a batch (running statistics), so per-sample gradients "
                f"are not private; replace it with nn.GroupNorm or nn.LayerNorm (as "
                f"Opacus's ModuleValidator.fix does)")
    _checked.add(model)


def with_dp(step: Any, *, max_grad_norm: float, noise_multiplier: float,
            delta: float = 1e-5, sample_rate: float | None = None, data: Any = None,
            expected_batch_size: float | None = None, accountant: str = "rdp",
            target_epsilon: float | None = None, noise_seed: int | None = None,
            name: str = "dp") -> Step:
    """Differentially private SGD: per-sample clipped gradients plus Gaussian noise.

    Each sample's gradient (of `loss_fn` on that sample alone, a batch of 1) is scaled to
    norm at most `max_grad_norm`; the sum over the batch gets Gaussian noise of std
    `noise_multiplier * max_grad_norm` and is divided by the expected batch size: the
    batch's size, `expected_batch_size=`, or, for a `poisson_loader` given as `data=`,
    `sample_rate * len(dataset)` (as Opacus). The noise comes from a generator seeded
    from a secret `noise_seed` (drawn from the OS's secret source when the run starts,
    unless given: give one only for tests) and the count of noisy steps, both kept in the
    slot: a resumed run is exact, and no noise is drawn twice (not after a
    `with_rollback` either). The slot, like any checkpoint, must then stay private.
    Works with `with_accumulation` (per-sample gradients add up over micro-batches,
    noise once per update), `with_ddp` (noise on
    rank 0 only) and `with_amp(torch.bfloat16)`; not with float16 loss scaling,
    `with_fsdp`, `train_step(metrics=)` or BatchNorm (refused, naming the module).

    Privacy is accounted in `state.slots[name]` (`steps`, `history`): give the sample
    rate as `sample_rate=` or `data=` (the training DataLoader: a Poisson loader's rate,
    else one batch per `len(data)` batches) to get `dp_epsilon` at every epoch end and
    `ftrain.privacy.epsilon(state)`; `accountant` is Opacus's "rdp" or "prv", at `delta`.
    `target_epsilon` computes at `init` how many steps fit in that budget and asks the
    loop to stop when they are taken.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.privacy import with_dp
        >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> step = with_dp(step, max_grad_norm=1.0, noise_multiplier=1.1, sample_rate=0.01)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state, metrics = step(state, (torch.randn(8, 3), torch.randn(8, 1)))
        >>> state.slots["dp"]["steps"]
        1
    """
    inner = core(step)
    if getattr(inner, "metrics", None):
        raise ConfigError("with_dp cannot run train_step(metrics=...): their updates would "
                          "see one sample at a time; evaluate them with ft.eval_step")
    option = DP(max_grad_norm, noise_multiplier, delta, sample_rate, expected_batch_size,
                accountant, target_epsilon, data, name, noise_seed)
    return with_option(step, "dp", option, "with_dp")
