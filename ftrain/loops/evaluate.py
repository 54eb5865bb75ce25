"""`evaluate` and `predict`: a model over data in eval mode, no gradients; the state is
not changed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ftrain.core import bind as _bind
from ftrain.core import step as _step
from ftrain.core.run import run_info
from ftrain.core.state import TrainState, is_donated
from ftrain.data import batches as _data
from ftrain.data.module import resolve
from ftrain.errors import ConfigError, DataError, FTrainError, StepError, check_int

log = logging.getLogger("ftrain")
Metrics = dict[str, torch.Tensor]


def _check_state(state: Any, where: str) -> None:
    if is_donated(state):
        _ = state.params  # raises DonatedStateError naming the loop that took it
    if not isinstance(state, TrainState):
        raise ConfigError(f"{where} expects a TrainState, got {type(state).__name__}")



# -- evaluation and prediction -----------------------------------------------------------

def _eval_state(state: TrainState) -> tuple[TrainState, _bind.Binding | None]:
    """`state` bound for evaluation: the loop's binding, else a temporary read-only one."""
    _check_state(state, "evaluation")
    if _bind.binding_of(state) is not None:
        return state, None
    return state, _bind.Binding(state, training=False)


def _batches(data: Any, limit: int | None, what: str) -> Any:
    check_int(f"{what} limit_batches", limit, 1)
    if not isinstance(data, Iterable):
        raise DataError(f"{what} data must be a DataLoader or an iterable of batches, got "
                        f"{type(data).__name__}")
    it = iter(data)
    return it if limit is None else (b for _, b in zip(range(limit), it))


def evaluate(evaluator: Callable[[TrainState, Any], Metrics], state: TrainState, data: Any,
             *, limit_batches: int | None = None,
             batch_size: Callable[[Any], int] | None = None, progress: bool | str = False,
             desc: str = "evaluation", distributed: bool | None = None) -> dict[str, float]:
    """Run `evaluator` over `data` and return each metric's mean weighted by batch size.

    Batch size is the first dimension of the batch's first tensor unless `batch_size`
    says otherwise. One host sync, at the end. The state is not changed. `progress`
    shows a transient bar (True: when stderr is a terminal; "always").

    Under `with_ddp` (validation inside a data-parallel loop, or `distributed=True` on
    every rank) each rank evaluates its share (every sample on exactly one rank) and the
    weighted sums are all-reduced, so all ranks return the same numbers.

    Examples:
        >>> import torch, ftrain as ft
        >>> evaluator = ft.eval_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1))
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(3)]
        >>> sorted(ft.evaluate(evaluator, state, data))
        ['loss']
    """
    if not callable(evaluator):
        raise ConfigError(f"evaluate needs an evaluator (state, batch) -> metrics, got "
                          f"{type(evaluator).__name__}")
    data = resolve(data, "test", "val")
    from ftrain.populations.population import is_population
    if isinstance(evaluator, _step.EvalStep) and is_population(state):
        raise ConfigError("this state is a population: evaluate its members with "
                          "ft.vmap(ft.eval_step(fn)), or one member with ft.member(pop, i)")
    state, own = _eval_state(state)
    world = 1
    if distributed is None:
        run = run_info(state)
        rank, world = (run.rank, run.world) if run is not None else (0, 1)
    elif distributed:
        from ftrain.parallel.dist import rank_world
        rank, world = rank_world()
    if world > 1:
        data = _data.shard_eval(data, rank, world)
    device = state.device
    values: dict[str, list[torch.Tensor]] = {}
    weights: list[int] = []
    bar = None
    if progress:
        from ftrain.layers.logging.progress import eval_bar
        total = _data.num_batches(data)
        if limit_batches is not None:
            total = limit_batches if total is None else min(total, limit_batches)
        bar = eval_bar(total, desc, progress == "always" or _stderr_is_terminal())
    try:
        for index, batch in enumerate(_batches(data, limit_batches, "evaluate")):
            batch = _data.to_device(batch, device)
            n = batch_size(batch) if batch_size is not None else _data.batch_size(batch)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"evaluation batch {index}: batch_size must give an int "
                                  f">= 0, got {n!r}")
            if bar is not None:
                bar.update(1)
            if n == 0:
                continue  # no samples: nothing to weigh (its mean would be nan)
            try:
                out = evaluator(state, batch)
            except FTrainError:
                raise
            except Exception as err:
                raise StepError(f"evaluation batch {index} failed: {type(err).__name__}: "
                                f"{err}") from err
            if not isinstance(out, dict):
                raise ConfigError(f"an evaluator must return a dict of metrics, got "
                                  f"{type(out).__name__}")
            # the one check every metric goes through (training steps' too)
            metrics = _step.eval_metrics(out, f"evaluation batch {index}", device)
            if values and metrics.keys() != values.keys():
                raise ConfigError(f"evaluation batch {index} returned metrics "
                                  f"{sorted(metrics)}, earlier batches {sorted(values)}")
            for k, v in metrics.items():
                values.setdefault(k, []).append(v)
            weights.append(n)
    finally:
        if bar is not None:
            bar.close()
        if own is not None:
            own.end()
    if world > 1:
        return _reduce_across_ranks(values, weights, world)
    if not weights:
        raise DataError("the evaluation data produced no samples (no batches, or only "
                        "batches of size 0)")
    return reduce_weighted(values, weights)


def _reduce_across_ranks(values: dict[str, list[torch.Tensor]], weights: list[int],
                         world: int) -> dict[str, float]:
    """Weighted means over every rank's batches: sums and counts all-reduced (one sync)."""
    import torch.distributed as dist

    names = sorted(values)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, names)  # a rank without batches learns the names
    known: list[str] = next((g for g in gathered if g), [])
    if any(g and g != known for g in gathered):
        raise ConfigError(f"ranks' evaluators returned different metrics: {gathered}")
    if not known:
        raise DataError("the evaluation data produced no samples on any rank")
    from ftrain.parallel.dist import collective_device
    device = collective_device()
    w = torch.tensor(weights, dtype=torch.float64, device=device)
    sums = [(torch.stack([v.detach().to(device, torch.float64) for v in values[k]]) * w).sum()
            if k in values else torch.zeros((), dtype=torch.float64, device=device)
            for k in known]
    totals = torch.stack([*sums, w.sum()])
    dist.all_reduce(totals)
    host = totals.cpu().tolist()  # host sync here
    return {k: host[i] / host[-1] for i, k in enumerate(known)}


def _stderr_is_terminal() -> bool:
    import sys
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def reduce_weighted(values: dict[str, list[torch.Tensor]], weights: list[int]
                    ) -> dict[str, float]:
    """Weighted means of per-batch metrics, computed on the device; one host sync."""
    total = float(sum(weights))
    means = []
    for vals in values.values():
        stacked = torch.stack([v.detach().to(torch.float64) for v in vals])
        w = torch.tensor(weights, dtype=torch.float64, device=stacked.device)
        means.append(((stacked * w).sum() / total).cpu())
    return dict(zip(values, torch.stack(means).tolist()))


def _default_predict(model: Any, batch: Any) -> Any:
    if isinstance(batch, (list, tuple)) and batch and not hasattr(batch, "_fields"):
        return model(batch[0])  # the inputs of an (inputs, targets) pair
    return model(batch)


def predict(state: TrainState, data: Any, fn: Callable[[Any, Any], Any] | None = None, *,
            model: str | None = None, limit_batches: int | None = None) -> list[Any]:
    """The model's outputs on each batch, in eval mode under `torch.no_grad`.

    By default `model(batch)`, or `model(batch[0])` for a tuple or list batch (the inputs of
    an (inputs, targets) pair); `fn(model, batch)` to choose. For a multi-model state
    name the model (`model="G"`) or give `fn`, which then receives the dict of models.

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> outs = ft.predict(state, [torch.randn(4, 3), torch.randn(2, 3)])
        >>> [tuple(o.shape) for o in outs]
        [(4, 2), (2, 2)]
    """
    data = resolve(data, "predict")
    state, own = _eval_state(state)
    binding = _bind.binding_of(state)
    binding.set_mode(False)
    target = binding.model_arg
    if isinstance(target, dict):
        if model is not None:
            if model not in target:
                raise ConfigError(f"model {model!r} is not in this state; models: "
                                  f"{sorted(target)}")
            target = target[model]
        elif fn is None:
            raise ConfigError(f"this state holds several models {sorted(target)}: pass "
                              "model='<name>' or fn=(models, batch) -> outputs")
    elif model is not None:
        raise ConfigError("model= selects one of several models; this state holds one")
    call = fn or _default_predict
    device = state.device
    outputs = []
    try:
        with torch.no_grad():
            for index, batch in enumerate(_batches(data, limit_batches, "predict")):
                try:
                    outputs.append(call(target, _data.to_device(batch, device)))
                except Exception as err:
                    raise StepError(f"prediction batch {index} failed: {type(err).__name__}: "
                                    f"{err}") from err
    finally:
        if own is not None:
            own.end()
    return outputs
