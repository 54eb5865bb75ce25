"""`evaluate` and `predict`: a model over data in eval mode, no gradients; the state is
not changed."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ftrain.core import bind as _bind
from ftrain.core import epoch_metrics as _em
from ftrain.core import step as _step
from ftrain.core.run import run_info
from ftrain.core.state import TrainState, check_real, is_donated
from ftrain.data import batches as _data
from ftrain.data.module import resolve
from ftrain.errors import ConfigError, DataError, FTrainError, StepError, check_int
from ftrain.loops import predict_writer as _pw

log = logging.getLogger("ftrain")
Metrics = dict[str, torch.Tensor]


def _check_state(state: Any, where: str) -> None:
    if is_donated(state):
        _ = state.params  # raises DonatedStateError naming the loop that took it
    if not isinstance(state, TrainState):
        raise ConfigError(f"{where} expects a TrainState, got {type(state).__name__}")



# -- evaluation and prediction -----------------------------------------------------------

def _eval_state(state: TrainState, gather: bool = False
                ) -> tuple[TrainState, _bind.Binding | None]:
    """`state` bound for evaluation: the loop's binding, else a temporary read-only one.
    `gather`: a with_fsdp loop's state is gathered into a temporary binding too (its
    sharded modules need every rank in every forward; ft.predict's ranks run unequal
    numbers of batches)."""
    _check_state(state, "evaluation")
    check_real(state, "evaluation")
    loop = _bind.binding_of(state)
    if loop is not None and not (gather and loop.fsdp is not None):
        return state, None
    from ftrain.parallel.fsdp import is_sharded, unshard
    if is_sharded(state):  # a with_fsdp run's result: every rank gathers the weights
        state = unshard(state)
    return state, _bind.Binding(state, training=False)


def _batches(data: Any, limit: int | None, what: str) -> Any:
    check_int(f"{what} limit_batches", limit, 1)
    if not isinstance(data, Iterable):
        raise DataError(f"{what} data must be a DataLoader or an iterable of batches, got "
                        f"{type(data).__name__}")
    it = iter(data)
    return it if limit is None else (b for _, b in zip(range(limit), it))


def _even(batches: Iterable[Any], pad: list[int | None] | None) -> Iterable[Any]:
    """(batch, real) pairs; with `pad` (every rank's count), the shorter ranks' extra
    forwards on a repeated batch (real=False), so every rank runs as many."""
    if pad is None:
        return ((b, True) for b in batches)
    from ftrain.parallel.even import padded
    return padded(batches, pad)


def evaluate(evaluator: Callable[[TrainState, Any], Metrics], state: TrainState, data: Any,
             *, limit_batches: int | None = None,
             batch_size: Callable[[Any], int] | None = None, progress: bool | str = False,
             desc: str = "evaluation", distributed: bool | None = None,
             numbers_only: bool = False) -> dict[str, Any]:
    """Run `evaluator` over `data` and return each metric's mean weighted by batch size.

    Batch size is inferred from the batch (`ftrain.data.batches.batch_size`: the leading
    dimension of its tensors, in tuples, namedtuples, dicts, dataclasses and nested ones;
    a batch it cannot size is a `DataError`) unless `batch_size(batch) -> int` (or the
    evaluator's own: `ft.eval_step(fn, batch_size=...)`) says. One host sync, at the end.
    The state is not changed. `progress` shows a transient bar (True: when
    stderr is a terminal; "always").

    An `ft.eval_step(fn, metrics={...})`'s torchmetrics metrics are not averaged: this
    evaluation gets fresh copies, updates them per batch and computes them once at the end
    (see docs/metrics.md). A 0-d result is a float; another result (a confusion matrix) is
    returned as a CPU tensor, or refused with `numbers_only=True` (what `with_validation`
    asks for: its results join the run's metrics, which are numbers).

    Under `with_ddp` (validation inside a data-parallel loop, or `distributed=True` on
    every rank) each rank evaluates its share (every sample on exactly one rank) and the
    weighted sums are all-reduced and the metrics' states synced, so all ranks return the
    same numbers.

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
    if batch_size is not None and not callable(batch_size):
        raise ConfigError(f"evaluate's batch_size must be a function batch -> int, got "
                          f"{type(batch_size).__name__}")
    if batch_size is None:
        batch_size = getattr(evaluator, "batch_size", None)
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
    pad: list[int | None] | None = None  # every rank's batch count, to even them out
    collective = False  # with_fsdp in the loop: every forward needs every rank
    if world > 1:
        data = _data.shard_eval(data, rank, world)
        loop = _bind.binding_of(state) if own is None else None
        if loop is not None and loop.fsdp is not None:  # sharded forwards are collective:
            from ftrain.parallel.even import counts  # as many on every rank
            collective = True
            n = _data.num_batches(data)
            pad = counts(n if limit_batches is None or n is None else min(n, limit_batches))
            if None in pad:  # lengths unknown: this evaluation on full weights
                state, own = _eval_state(state, gather=True)
                pad = None
            elif len(set(pad)) == 1:
                pad = None
    device = state.device
    # an eval_step with metrics=: this evaluation's own fresh copies
    start = getattr(evaluator, "start_evaluation", None)
    session = start(device, world) if start is not None else None
    call = evaluator
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
        for index, (batch, real) in enumerate(_even(_batches(data, limit_batches, "evaluate"),
                                                    pad)):
            batch = _data.to_device(batch, device)
            if not real:  # a forward the other ranks' sharded modules need: discarded
                evaluator(state, batch)
                continue
            n, unsized = _size(batch, batch_size, index)
            if bar is not None:
                bar.update(1)
            if n == 0:
                if collective and own is None:  # skipped, it would leave the others waiting
                    raise DataError(f"evaluation batch {index} has no samples; under "
                                    "with_fsdp every rank runs every forward: keep "
                                    "evaluation batches non-empty")
                continue  # no samples: nothing to weigh (its mean would be nan)
            try:
                out = call(state, batch) if session is None else \
                    session(state, batch, f"evaluation batch {index}")
            except FTrainError:
                raise
            except Exception as err:
                raise StepError(f"evaluation batch {index} failed: {type(err).__name__}: "
                                f"{err}") from err
            if not isinstance(out, dict):
                raise ConfigError(f"an evaluator must return a dict of metrics, got "
                                  f"{type(out).__name__}")
            if session is None or out:
                # the one check every metric goes through (training steps' too)
                out = _step.eval_metrics(out, f"evaluation batch {index}", device)
            if out and unsized is not None:
                raise unsized  # averaging needs the batch's size
            if weights and out.keys() != values.keys():
                raise ConfigError(f"evaluation batch {index} returned metrics "
                                  f"{sorted(out)}, earlier batches {sorted(values)}")
            for k, v in out.items():
                values.setdefault(k, []).append(v)
            weights.append(n)
    finally:
        if bar is not None:
            bar.close()
        if own is not None:
            own.end()
    if world > 1:
        results = _reduce_across_ranks(values, weights, world)
    else:
        if not weights:
            raise DataError("the evaluation data produced no samples (no batches, or only "
                            "batches of size 0)")
        results = reduce_weighted(values, weights) if values else {}
    if session is not None:
        computed = _em.host_values(session.compute())  # all ranks: synced states
        if numbers_only:
            _em.require_numbers(computed)
        clash = sorted(set(computed) & set(results))
        if clash:
            raise ConfigError(f"the evaluator's metrics= results {clash} have the names of "
                              f"metrics its function returns; rename one")
        results.update(computed)
    return results


def _size(batch: Any, batch_size: Callable[[Any], int] | None, index: int
          ) -> tuple[int, DataError | None]:
    """The batch's size, or (1, the error) when it cannot be told: only metrics averaged
    over batches need it (a torchmetrics-only evaluator does not)."""
    if batch_size is None:
        try:
            return _data.batch_size(batch), None
        except DataError as err:
            return 1, DataError(f"evaluation batch {index}: {err}; pass evaluate("
                                f"batch_size=fn) (with_validation(batch_size=fn))")
    n = batch_size(batch)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"evaluation batch {index}: batch_size must give an int "
                          f">= 0, got {n!r}")
    return n, None


def _reduce_across_ranks(values: dict[str, list[torch.Tensor]], weights: list[int],
                         world: int) -> dict[str, float]:
    """Weighted means over every rank's batches: sums and counts all-reduced (one sync)."""
    import torch.distributed as dist

    names = sorted(values)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (names, len(weights)))  # a rank without batches
    # learns the names
    known: list[str] = next((g[0] for g in gathered if g[0]), [])
    if any(g[0] and g[0] != known for g in gathered):
        raise ConfigError(f"ranks' evaluators returned different metrics: "
                          f"{[g[0] for g in gathered]}")
    if not any(g[1] for g in gathered):
        raise DataError("the evaluation data produced no samples on any rank")
    if not known:
        return {}  # only stateful metrics (synced by their own compute)
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
            model: str | None = None, limit_batches: int | None = None,
            write_to: str | os.PathLike[str] | None = None, batches_per_file: int = 1,
            distributed: bool | None = None) -> Any:
    """The model's outputs on each batch, in eval mode under `torch.no_grad`.

    By default `model(batch)`, or `model(batch[0])` for a tuple or list batch (the inputs of
    an (inputs, targets) pair); `fn(model, batch)` to choose. For a multi-model state
    name the model (`model="G"`) or give `fn`, which then receives the dict of models.

    `write_to=folder` writes the outputs (moved to the CPU; plain data) as they come, a
    file per `batches_per_file` batches, instead of keeping them in memory, and returns
    the folder; `ft.read_predictions(folder)` gives them back in order (Lightning's
    `BasePredictionWriter`).

    Under several processes (`distributed=True` on every rank under torchrun, or inside
    a `with_ddp` / `with_fsdp` loop) the batches are dealt out whole, batch i to rank
    i % world, so each rank predicts its share with rank 0's buffers (one broadcast:
    under with_ddp each rank's BatchNorm statistics follow its own last batch, and rank
    0's are the ones its checkpoints hold); every rank must call it. In memory, the
    outputs are then gathered so that *every* rank returns the list one process would
    (the same batches, in the data's order, nothing repeated: dealing whole batches needs
    no padding), at the cost of every rank holding all of them (two collectives, one a
    host sync). With `write_to`, each rank writes its own batches, tagged with their
    index, into the same folder and nothing is gathered; every batch is written once. A
    process group is joined if torchrun launched this process and none exists yet.

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2))
        >>> outs = ft.predict(state, [torch.randn(4, 3), torch.randn(2, 3)])
        >>> [tuple(o.shape) for o in outs]
        [(4, 2), (2, 2)]
    """
    data = resolve(data, "predict")
    rank, world = 0, 1
    if distributed is None:
        run = run_info(state)
        rank, world = (run.rank, run.world) if run is not None else (0, 1)
    elif distributed:  # under torchrun: the process group, joined here if need be
        from ftrain.parallel import dist as _pd
        rank, world = _pd.rank_world()
        if world == 1:
            rank, world = _pd.setup(None, _pd.DEFAULT_TIMEOUT)
    check_int("predict limit_batches", limit_batches, 1)
    _check_state(state, "evaluation")
    pad: list[int | None] | None = None  # in a with_fsdp loop: each rank's batch count
    loop = _bind.binding_of(state)
    if world > 1 and loop is not None and loop.fsdp is not None:
        total = _data.num_batches(data)
        if total is not None:  # else: this prediction on full weights
            total = total if limit_batches is None else min(total, limit_batches)
            pad = [len(range(r, total, world)) for r in range(world)]  # dealt i % world
    if world > 1 and (loop is None or loop.fsdp is None):
        from ftrain.parallel.fsdp import is_sharded
        from ftrain.parallel.gather import rank0_buffers
        check_real(state, "evaluation")  # a deferred (meta) state: its own error first
        if not is_sharded(state):  # one model on every rank: rank 0's buffers (collective)
            state = rank0_buffers(state)
    state, own = _eval_state(state, gather=pad is None)
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
    if pad is not None:  # through the sharded root, which gathers the root's own params
        chosen, given = model, call

        def call(_target: Any, batch: Any) -> Any:
            return binding.fsdp(lambda m, b: given(m[chosen] if chosen else m, b), batch)
    device = state.device
    outputs: list[tuple[int, Any]] = []  # (batch index in the whole data, output)
    writer = None if write_to is None else _pw.PredictionWriter(write_to, rank, world,
                                                                 batches_per_file)
    if not isinstance(data, Iterable):
        raise DataError(f"predict data must be a DataLoader or an iterable of batches, "
                        f"got {type(data).__name__}")
    try:
        with torch.no_grad():
            for (index, batch), real in _even(_pw.shard_batches(data, rank, world,
                                                                limit_batches), pad):
                if not real:  # a forward the other ranks' sharded modules need: discarded
                    call(target, _data.to_device(batch, device))
                    continue
                try:
                    out = call(target, _data.to_device(batch, device))
                except Exception as err:
                    raise StepError(f"prediction batch {index} failed: {type(err).__name__}: "
                                    f"{err}") from err
                if writer is None:
                    outputs.append((index, out))
                else:
                    writer.add(index, out)  # written, not kept
            if writer is not None:
                writer.finish()
    finally:
        if own is not None:
            own.end()
    if writer is None:
        if world == 1:
            return [out for _, out in outputs]
        from ftrain.parallel.gather import gather_outputs
        return gather_outputs(outputs, device)  # collectives: every rank is here
    if world > 1:  # every rank's files are complete when any rank reads them
        from ftrain.parallel.dist import barrier
        barrier()
    return writer.folder
