"""Building a population from states, a factory or a fresh template, and taking members
out of it as ordinary states."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ftrain.core.state import LOOP_SLOT, TrainState
from ftrain.errors import ConfigError
from ftrain.optim import Optimizer
from ftrain.populations.hparams import (
    HPARAMS,
    PopulationOptimizer,
    _check_hparams,
    _hparam_tensors,
    _inferred_hparams,
    _structural,
)
from ftrain.populations.model import SLOT, StackedModel, _check_population, is_population
from ftrain.populations.seeding import _materialize, _trainable


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _resolve_n(n: int | None, seeds: Sequence[int] | None, hparams: Mapping[str, Any],
               states: Sequence[TrainState] | None) -> int:
    """The population size all arguments agree on (an error names the disagreement)."""
    sizes: dict[str, int] = {}
    if n is not None:
        sizes["n"] = _positive_int("n", n)
    if seeds is not None:
        sizes["len(seeds)"] = len(seeds)
    if states is not None:
        sizes["the number of states"] = len(states)
    for name, values in hparams.items():
        sizes[f"len(hparams[{name!r}])"] = len(values)
    if not sizes:
        raise ConfigError("ft.population needs the number of members: n=, seeds=, per-member "
                          "hparams= or a list of states")
    distinct = set(sizes.values())
    if len(distinct) > 1:
        said = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ConfigError(f"ft.population: the member counts disagree: {said}")
    size = distinct.pop()
    if size < 1:
        raise ConfigError("ft.population needs at least one member")
    return size


def _check_seeds(seeds: Sequence[Any]) -> list[int]:
    out = []
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool):
            raise ConfigError(f"seeds must be ints, got {s!r}")
        out.append(s)
    return out


def _stack_trees(trees: list[Any], where: str) -> Any:
    first = trees[0]
    if isinstance(first, Mapping):
        for i, t in enumerate(trees[1:], 1):
            if not isinstance(t, Mapping) or set(t) != set(first):
                raise ConfigError(f"member {i}'s {where} does not match member 0's: keys "
                                  f"{sorted(t) if isinstance(t, Mapping) else type(t).__name__}"
                                  f" vs {sorted(first)}")
        return {k: _stack_trees([t[k] for t in trees], f"{where}.{k}") for k in first}
    if isinstance(first, torch.Tensor):
        for i, t in enumerate(trees[1:], 1):
            if not isinstance(t, torch.Tensor) or t.shape != first.shape or \
                    t.dtype != first.dtype or t.device != first.device:
                found = (f"{t.dtype}{list(t.shape)} on {t.device}"
                         if isinstance(t, torch.Tensor) else type(t).__name__)
                raise ConfigError(f"member {i}'s {where} is {found}, member 0's "
                                  f"{first.dtype}{list(first.shape)} on {first.device}")
        return torch.stack([t.detach() for t in trees])
    for i, t in enumerate(trees[1:], 1):
        if t != first:
            raise ConfigError(f"member {i}'s {where} is {t!r}, member 0's {first!r}")
    return copy.deepcopy(first)



def population(source: TrainState | Sequence[TrainState] | Callable[[int], TrainState],
               n: int | None = None, *, seeds: Sequence[int] | None = None,
               hparams: Mapping[str, Sequence[Any]] | None = None,
               seed: int | None = None) -> TrainState:
    """Stack N members into one population state, trained together by `vmap`.

    `source` is one of:

    - a fresh template state: member i's parameters are drawn anew by re-running every
      module's `reset_parameters()` with the CPU generator seeded with `seeds[i]` (the
      same numbers as `torch.manual_seed(seeds[i]); Model()` for models that build their
      modules in the order they register them); buffers of modules without a reset
      method are copied;
    - a factory `seed -> TrainState`, called once per seed;
    - a list of states (same model and optimizer; they may differ in the optimizer's
      `lr`, `weight_decay`, `momentum`, `eps` and `betas`, which become per-member
      hyperparameters); `[state] * n` starts every member from the same weights.

    `seeds` default to `template.seed + i` (`range(n)` for a factory; the states' own
    seeds for a list). `hparams` maps `"lr"`, `"weight_decay"`, `"momentum"` (SGD),
    `"eps"` and `"betas"` (Adam/AdamW) to one value per member, replacing the optimizer's
    base setting (parameter groups that set it keep theirs); `lr` values may also all be
    schedules. `n`, the seeds, the states and each hparams list must agree in length.
    `seed` is the population's own seed (shuffling, the step's random stream); default:
    the template's seed or the first member's.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import population
        >>> template = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.adamw(1e-3))
        >>> pop = population(template, hparams={"lr": [1e-3, 3e-3, 1e-2]})
        >>> record = pop.slots["population"]
        >>> record["seeds"], tuple(pop.params["weight"].shape)
        ([0, 1, 2], (3, 1, 3))
    """
    given = dict(hparams) if hparams is not None else {}
    if isinstance(source, TrainState):
        _ = source.params  # a donated state raises here
        if is_population(source):
            raise ConfigError("this state is already a population; take members with "
                              "ft.member(pop, i) to build another")
        if source.multi:
            raise ConfigError("populations of multi-model states are not supported; build "
                              "one population per model")
        if source.step != 0:
            raise ConfigError(f"a template state must be fresh (step 0, got {source.step}): "
                              "its members are re-initialized from their seeds. To stack "
                              "trained states pass a list of them")
        size = _resolve_n(n, seeds, given, None)
        seed_list = _check_seeds(seeds) if seeds is not None else [source.seed + i
                                                                   for i in range(size)]
        checked = _check_hparams(given, source.optimizer)
        template = source.model
        opt = source.optimizer
        init_opt = _structural(opt, checked) if opt is not None else None
        params_list, buffers_list, opt_list = [], [], []
        for s in seed_list:
            p, b = _materialize(template, source, s)
            params_list.append(p)
            buffers_list.append(b)
            opt_list.append(init_opt.init(_trainable(template, p)) if init_opt is not None
                            else {})
        return _assemble(template, opt, params_list, buffers_list, opt_list, 0, seed_list,
                         checked, source.seed if seed is None else seed, source.device)
    if callable(source) and not isinstance(source, (list, tuple)):
        size = _resolve_n(n, seeds, given, None)
        seed_list = _check_seeds(seeds) if seeds is not None else list(range(size))
        states = []
        for s in seed_list:
            made = source(s)
            if not isinstance(made, TrainState):
                raise ConfigError(f"the population factory must return a TrainState, got "
                                  f"{type(made).__name__} for seed {s}")
            states.append(made.replace(seed=s))
        return _from_states(states, seed_list, given, seed)
    if isinstance(source, (list, tuple)):
        if not source:
            raise ConfigError("ft.population got an empty list of states")
        for i, s in enumerate(source):
            if not isinstance(s, TrainState):
                raise ConfigError(f"ft.population: item {i} of the list is a "
                                  f"{type(s).__name__}, not a TrainState")
            _ = s.params  # a donated state raises here
        _resolve_n(n, seeds, given, source)
        seed_list = _check_seeds(seeds) if seeds is not None else [s.seed for s in source]
        return _from_states(list(source), seed_list, given, seed)
    raise ConfigError(f"ft.population takes a TrainState, a list of them or a factory "
                      f"seed -> TrainState, got {type(source).__name__}")


def _from_states(states: list[TrainState], seeds: list[int], given: Mapping[str, Any],
                 seed: int | None) -> TrainState:
    first = states[0]
    for i, s in enumerate(states):
        if is_population(s):
            raise ConfigError(f"member {i} is already a population")
        if s.multi:
            raise ConfigError("populations of multi-model states are not supported; build "
                              "one population per model")
        if s.step != first.step:
            raise ConfigError(f"the states must be at the same step: member {i} is at step "
                              f"{s.step}, member 0 at step {first.step}")
        if type(s.model) is not type(first.model):
            raise ConfigError(f"member {i}'s model is a {type(s.model).__name__}, member 0's "
                              f"a {type(first.model).__name__}")
        flags = {n: p.requires_grad for n, p in s.model.named_parameters()}
        if flags != {n: p.requires_grad for n, p in first.model.named_parameters()}:
            raise ConfigError(f"member {i}'s model has other parameters (or other frozen "
                              "ones) than member 0's")
    hparams = _inferred_hparams(states)
    hparams.update(_check_hparams(given, first.optimizer))
    params = [s.params for s in states]
    buffers = [s.buffers for s in states]
    return _assemble(first.model, first.optimizer, params, buffers,
                     [s.opt_state for s in states], first.step, seeds, hparams,
                     seeds[0] if seed is None else seed, first.device)


def _assemble(template: nn.Module, optimizer: Any, params: list[Any], buffers: list[Any],
              opt_states: list[Any], step: int, seeds: list[int],
              hparams: Mapping[str, list[Any]], seed: int, device: torch.device
              ) -> TrainState:
    n = len(params)
    stacked_params = _stack_trees(params, "params")  # checks names, shapes, dtypes, devices
    stacked_buffers = _stack_trees(buffers, "buffers")
    stacked_opt = _stack_trees(opt_states, "opt_state") if optimizer is not None else {}
    pop_opt = None
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise ConfigError(f"a population needs an ftrain optimizer, got {optimizer!r}")
        lr = hparams.get("lr")
        schedules = tuple(lr) if lr is not None and callable(lr[0]) else None
        base = optimizer.with_settings({k: v[0] for k, v in hparams.items()})
        pop_opt = PopulationOptimizer(base, n, tuple(hparams), schedules,
                                      _lockstep(stacked_opt))
        stacked_opt[HPARAMS] = _hparam_tensors(hparams, device)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    # plain data for checkpoints and people (the step reads opt_state["hparams"])
    shown = {k: [repr(v) if callable(v) else list(v) if isinstance(v, (tuple, list)) else v
                 for v in vals] for k, vals in hparams.items()}
    record = {"n": n, "seeds": list(seeds), "hparams": shown}
    return TrainState(params=stacked_params, buffers=stacked_buffers, opt_state=stacked_opt,
                      step=step, seed=seed, slots={SLOT: record},
                      model=StackedModel(template, n), optimizer=pop_opt)


# -- taking members out ----------------------------------------------------------------

def _index_tree(tree: Any, i: int) -> Any:
    if isinstance(tree, Mapping):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree[i].clone()
    return copy.deepcopy(tree)


def _prune(tree: Any, like: Any, where: str) -> Any:
    """`tree` restricted to `like`'s structure (a member without momentum drops buffers)."""
    if isinstance(like, Mapping):
        if not isinstance(tree, Mapping) or not set(like) <= set(tree):
            found = sorted(tree) if isinstance(tree, Mapping) else tree
            raise ConfigError(f"the population's {where} lacks entries a member needs: "
                              f"{sorted(like)} vs {found}")
        return {k: _prune(tree[k], like[k], f"{where}.{k}") for k in like}
    return tree


def member(pop: TrainState, i: int) -> TrainState:
    """Member `i` of a population as an ordinary, independent `TrainState`.

    Its tensors are copies; its optimizer is the population's with member i's
    hyperparameters put in; its seed is member i's; its step and data position are the
    population's. It trains, saves, loads, binds and exports like any state.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import member, population
        >>> template = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> pop = population(template, hparams={"lr": [0.1, 0.2]})
        >>> m = member(pop, 1)
        >>> m.seed, tuple(m.params["weight"].shape), ft.bind(m)(torch.randn(4, 3)).shape
        (1, (1, 3), torch.Size([4, 1]))
    """
    _check_population(pop, "ft.member")
    n = pop.model.n
    if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
        raise ConfigError(f"member index must be an int in [0, {n}), got {i!r}")
    i %= n
    template = pop.model.template
    params = {k: v[i].clone() for k, v in pop.params.items()}
    buffers = {k: v[i].clone() for k, v in pop.buffers.items()}
    record = pop.slots.get(SLOT, {})
    seeds = record.get("seeds") or [pop.seed] * n
    slots = {LOOP_SLOT: copy.deepcopy(pop.slots[LOOP_SLOT])} if LOOP_SLOT in pop.slots else {}
    if pop.optimizer is None:
        return TrainState(params=params, buffers=buffers, opt_state={}, step=pop.step,
                          seed=int(seeds[i]), slots=slots, model=template, optimizer=None)
    optimizer = pop.optimizer.member(pop.opt_state, i)
    sliced = _index_tree({k: v for k, v in pop.opt_state.items() if k != HPARAMS}, i)
    fresh = optimizer.init(_trainable(template, params))
    opt_state = _prune(sliced, fresh, "opt_state")
    return TrainState(params=params, buffers=buffers, opt_state=opt_state, step=pop.step,
                      seed=int(seeds[i]), slots=slots, model=template, optimizer=optimizer)


def split_members(results: Mapping[str, Any], n: int | None = None) -> list[dict[str, Any]]:
    """Per-member dicts from a population step's or evaluation's flat metrics.

    `{"loss": mean, "loss/m0": a, "loss/m1": b}` becomes `[{"loss": a}, {"loss": b}]`;
    entries without a member suffix (the means) are left out.

    Examples:
        >>> from ftrain.populations.population import split_members
        >>> split_members({"acc": 0.5, "acc/m0": 0.4, "acc/m1": 0.6})
        [{'acc': 0.4}, {'acc': 0.6}]
    """
    members: dict[int, dict[str, Any]] = {}
    for key, value in results.items():
        name, sep, tail = key.rpartition("/m")
        if sep and tail.isdigit():
            members.setdefault(int(tail), {})[name] = value
    size = n if n is not None else (max(members) + 1 if members else 0)
    return [members.get(i, {}) for i in range(size)]



def _lockstep(opt_state: Mapping[str, Any]) -> bool:
    """Whether every member's count is the same and every per-parameter `step` (Adam's)
    equals it: then the members update in lockstep (a population never skips a member's
    update and updates every parameter), which lets Adam use one count for all (a host
    read, once per population)."""
    count = opt_state.get("count")
    if not isinstance(count, torch.Tensor) or count.numel() == 0:
        return False
    first = float(count.reshape(-1)[0])
    if not bool((count == first).all()):
        return False
    for value in opt_state.values():
        steps = value.get("step") if isinstance(value, Mapping) else None
        if isinstance(steps, Mapping) and not all(
                bool((s == first).all()) for s in steps.values()):
            return False
    return True
