"""Populations: N models of one architecture trained together, in one step, with vmap.

`population(...)` stacks N states into one *population state*: an ordinary `TrainState`
whose params, buffers and optimizer state have a leading member dimension N. Its `model`
is a `StackedModel` (the template's module tree with every tensor stacked), so the
loops bind it, `ft.save` / `ft.load` store it, and `ft.bind(pop)` runs every member at once.
Its `optimizer` is a `PopulationOptimizer`: the members' shared optimizer plus their
own hyperparameters (learning rate, weight decay, momentum, eps, betas), which live as
device tensors in `pop.opt_state["hparams"]`.

`vmap(train_step(loss_fn))` (or `population_step(loss_fn)`) trains all members in one
step: per-member losses and gradients (eagerly a vmapped forward of the template with the
members' tensors in its slots, and one autograd backward; compiled,
`torch.func.vmap(torch.func.grad_and_value(...))`), then
Adam / AdamW / SGD (and gradient clipping) with each member's hyperparameters, the same
math as torch's kernels (batched tensor ops; torch's fused Adam kernel where the device
has one). The step is a plain `(state, batch) -> (state, metrics)`
function, so `ft.fit`, `ft.iterate` and the outer combinators (logging, validation,
checkpoints, early stopping) drive it.
Its metrics are 0-d tensors: `"loss"` is the mean over members and `"loss/m3"` member 3's.

`member(pop, i)` returns member i as an ordinary state (its optimizer rebuilt with its
hyperparameters) that trains, saves, loads, binds and exports like any other.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from ftrain.core import bind as _bind
from ftrain.core import rng as _rng
from ftrain.core.state import LOOP_SLOT, TrainState, clone_tree
from ftrain.core.step import _nonfinite_epoch_end, advance, pure_result
from ftrain.core.swap import Slots
from ftrain.errors import ConfigError, DataError, NonFiniteLossError
from ftrain.optim._core import Groups, Optimizer, fused_devices
from ftrain.optim._kernels import _SGD, _Adam, _ClipGradNorm

SLOT = "population"
log = logging.getLogger("ftrain")
HPARAMS = "hparams"
Metrics = dict[str, torch.Tensor]
Randomness = Literal["different", "same"]
Leaves = list[torch.Tensor] | tuple[torch.Tensor, ...]
# a kernel body's results: [N] metrics, (means, members' values) when compiled, and the
# per-member factors of the update
Body = tuple[Metrics, tuple[Metrics, dict[str, tuple[torch.Tensor, ...]]] | None,
             list[torch.Tensor]]

# Hyperparameters a member may have of its own, and the optimizers that take them.
_KNOWN = ("lr", "weight_decay", "momentum", "eps", "betas")


# -- the model: the template's tree with every tensor stacked ------------------------------

class StackedModel(nn.Module):
    """The model of a population: the template's modules with every parameter and buffer
    stacked along a new leading member dimension.

    Names are the template's (`"0.weight"`), so a loop can bind a population and a
    checkpoint names its tensors as a single model's. Calling a bound copy (`ft.bind(pop)`)
    runs every member on the same inputs (vmap) and stacks the outputs along dim 0.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import population
        >>> pop = population(ft.TrainState.create(torch.nn.Linear(3, 2)), n=4)
        >>> pop.model.n, tuple(pop.params["weight"].shape)
        (4, (4, 2, 3))
        >>> ft.bind(pop)(torch.randn(5, 3)).shape   # 4 members, 5 samples, 2 outputs
        torch.Size([4, 5, 2])
    """

    def __init__(self, template: nn.Module, n: int) -> None:
        super().__init__()
        memo: dict[int, Any] = {}
        for p in template.parameters():
            memo[id(p)] = nn.Parameter(torch.empty((n, *p.shape), dtype=p.dtype, device="meta"),
                                       p.requires_grad)
        for b in template.buffers():
            memo[id(b)] = torch.empty((n, *b.shape), dtype=b.dtype, device="meta")
        stacked = copy.deepcopy(template, memo)
        # adopt the stacked tree as this module's own, so parameter names stay the template's
        self._parameters.update(stacked._parameters)
        self._buffers.update(stacked._buffers)
        self._non_persistent_buffers_set.update(stacked._non_persistent_buffers_set)
        self._modules.update(stacked._modules)
        object.__setattr__(self, "_population_template", template)
        object.__setattr__(self, "_population_n", n)

    @property
    def template(self) -> nn.Module:
        """One member's parameter-free skeleton (the model of `member(pop, i)`)."""
        template: nn.Module = self.__dict__["_population_template"]
        return template

    @property
    def n(self) -> int:
        """The number of members."""
        n: int = self.__dict__["_population_n"]
        return n

    def train(self, mode: bool = True) -> StackedModel:
        super().train(mode)
        self.template.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params: dict[str, torch.Tensor] = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        template = self.template

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], a: Any, k: Any) -> Any:
            return torch.func.functional_call(template, {**p, **b}, tuple(a), k)

        return torch.func.vmap(one, in_dims=(0, 0, None, None), randomness="different")(
            params, buffers, args, kwargs)


# -- the optimizer record ------------------------------------------------------------------

def _member_settings(transform: Any) -> set[str]:
    groups = getattr(transform, "groups", None)
    return set(groups.base) if isinstance(groups, Groups) else set()


def _rebuild(optimizer: Optimizer, values: Mapping[str, Any]) -> Optimizer:
    """`optimizer` with its base settings replaced by `values` (groups keep overrides)."""
    transforms = []
    for t in optimizer.transforms:
        mine = {k: v for k, v in values.items() if k in _member_settings(t)}
        if mine:
            groups = t.groups
            base = {**groups.base, **mine}
            t = attrs.evolve(t, groups=Groups.build(
                base, {pat: dict(opts) for pat, opts in groups.overrides}))
        transforms.append(t)
    return Optimizer(tuple(transforms))


@attrs.frozen(eq=False)
class PopulationOptimizer:
    """A population's optimizer: the members' shared `base` optimizer plus the names of
    the hyperparameters each member has of its own (their values are device tensors in
    `pop.opt_state["hparams"]`; per-member learning-rate schedules are kept here).

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import population
        >>> pop = population(ft.TrainState.create(torch.nn.Linear(3, 2), ft.optim.adam(1e-3)),
        ...                  hparams={"lr": [1e-3, 1e-2]})
        >>> hparams = pop.opt_state["hparams"]
        >>> pop.optimizer.names, hparams["lr"].tolist()
        (('lr',), [0.001, 0.01])
    """

    base: Optimizer
    n: int
    names: tuple[str, ...]
    lr_schedules: tuple[Any, ...] | None = None

    def values(self, opt_state: Mapping[str, Any], i: int) -> dict[str, Any]:
        """Member `i`'s own hyperparameters as Python values (a host read)."""
        out: dict[str, Any] = {}
        for name, t in opt_state.get(HPARAMS, {}).items():
            row = t[i].tolist()
            out[name] = tuple(row) if name == "betas" else row
        if self.lr_schedules is not None:
            out["lr"] = self.lr_schedules[i]
        return out

    def member(self, opt_state: Mapping[str, Any], i: int) -> Optimizer:
        """Member `i`'s own optimizer: the base one with its hyperparameters put in."""
        return _rebuild(self.base, self.values(opt_state, i))

    def init(self, params: Any) -> Any:
        raise ConfigError("a population's optimizer state is made by ft.population; "
                          "build a state with TrainState.create and pass it to ft.population")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("a population trains with ft.vmap(ft.train_step(loss_fn)) (or "
                          "ft.population_step), not with ft.train_step")

    def learning_rates(self, opt_state: Mapping[str, Any]) -> dict[str, Any]:
        """Each member's current learning rate per transform (`"adamw/m3"`), for logging."""
        count = opt_state["count"]
        hps = opt_state.get(HPARAMS, {})
        out: dict[str, Any] = {}
        for key, t in zip(self.base.keys, self.base.transforms):
            if "lr" not in _member_settings(t):
                continue
            lr = _lr_value(self, t.groups.base["lr"], hps, count)
            lr = torch.as_tensor(lr, device=count.device).expand(count.shape)
            for i, v in enumerate(lr.unbind(0)):
                out[f"{key}/m{i}"] = v
        return out


def _lr_value(opt: PopulationOptimizer, base_lr: Any, hps: Mapping[str, torch.Tensor],
              count: torch.Tensor) -> Any:
    """The learning rate of every member now: a float or a float64 tensor [N]."""
    if "lr" in hps:
        return hps["lr"]
    if opt.lr_schedules is not None:
        return torch.stack([torch.as_tensor(s(c), dtype=torch.float64, device=count.device)
                            for s, c in zip(opt.lr_schedules, count.unbind(0))])
    if callable(base_lr):
        return torch.as_tensor(base_lr(count), dtype=torch.float64, device=count.device)
    return base_lr


# -- building a population -------------------------------------------------------------

def is_population(state: Any) -> bool:
    """True when `state` is a population state made by `population`.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.populations.population import is_population, population
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1))
        >>> is_population(s), is_population(population(s, n=2))
        (False, True)
    """
    return isinstance(state, TrainState) and isinstance(state.model, StackedModel)


def _check_population(state: Any, what: str) -> None:
    if not isinstance(state, TrainState):
        raise ConfigError(f"{what} expects a population state (ft.population(...)), got "
                          f"{type(state).__name__}")
    _ = state.params  # a donated state raises DonatedStateError here
    if not is_population(state):
        raise ConfigError(f"{what} expects a population state made by ft.population(...); "
                          "this is an ordinary TrainState (stack states with "
                          "ft.population(state, n=...) first)")


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


def _check_hparams(hparams: Any, optimizer: Any) -> dict[str, list[Any]]:
    """Per-member hyperparameters, validated against the members' optimizer."""
    if hparams is None or (isinstance(hparams, Mapping) and not hparams):
        return {}
    if not isinstance(hparams, Mapping):
        raise ConfigError(f"hparams must map a hyperparameter name to one value per member, "
                          f"got {type(hparams).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise ConfigError("per-member hparams need the state's optimizer to be an ftrain "
                          f"optimizer (ft.optim.adam/adamw/sgd), got {optimizer!r}")
    settings = set().union(*(_member_settings(t) for t in optimizer.transforms))
    out: dict[str, list[Any]] = {}
    for name, values in hparams.items():
        if name not in _KNOWN:
            raise ConfigError(f"unknown per-member hyperparameter {name!r}; a member may have "
                              f"its own {list(_KNOWN)}")
        if name not in settings:
            kinds = [t.name for t in optimizer.transforms]
            raise ConfigError(f"per-member hyperparameter {name!r} does not apply to this "
                              f"optimizer ({' -> '.join(kinds)})")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ConfigError(f"hparams[{name!r}] must be a list with one value per member, "
                              f"got {values!r}")
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        for v in values:
            _check_value(name, v)
        out[name] = values
    nesterov = any(isinstance(t, _SGD) and t.groups.base["nesterov"]
                   for t in optimizer.transforms)
    if nesterov and any(m <= 0 for m in out.get("momentum", [])):
        raise ConfigError("hparams['momentum']: nesterov=True needs momentum > 0 for every "
                          "member")
    if "lr" in out and len({callable(v) for v in out["lr"]}) > 1:
        raise ConfigError("hparams['lr'] mixes numbers and schedules; give all members "
                          "numbers or all members schedules")
    return out


def _check_value(name: str, v: Any) -> None:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if name == "lr" and callable(v):
        return
    if name == "betas":
        if not (isinstance(v, (tuple, list)) and len(v) == 2
                and all(number(b) and 0.0 <= b < 1.0 for b in v)):
            raise ConfigError(f"hparams['betas'] values must be two floats in [0, 1), got {v!r}")
        return
    if not number(v) or v < 0:
        what = "a non-negative float or a schedule" if name == "lr" else "a non-negative float"
        raise ConfigError(f"hparams[{name!r}] values must be {what}, got {v!r}")


def _hparam_tensors(hparams: Mapping[str, list[Any]], device: torch.device
                    ) -> dict[str, torch.Tensor]:
    """Numeric per-member hyperparameters as float64 device tensors ([N], betas [N, 2])."""
    return {name: torch.tensor([list(v) if name == "betas" else float(v) for v in values],
                               dtype=torch.float64, device=device)
            for name, values in hparams.items() if not (name == "lr" and callable(values[0]))}


def _materialize(template: nn.Module, state: TrainState, seed: int) -> tuple[dict, dict]:
    """Member params drawn by re-running the modules' reset_parameters under `seed`."""
    names = [n for n, _ in template.named_parameters(remove_duplicate=False)]
    if len(names) != len(dict(template.named_parameters())):
        # which module's initialization a tied tensor keeps depends on the direction of the
        # tie (a = b or b = a), which the finished model no longer shows
        raise ConfigError("ft.population cannot re-initialize a model with tied weights "
                          "from a seed; pass a factory (lambda seed: "
                          "TrainState.create(make_model(seed), ...)) or a list of states")
    if any(parametrize.is_parametrized(m) for m in template.modules()):
        # reset_parameters() would initialize the computed tensor, not the stored originals
        raise ConfigError("ft.population cannot re-initialize a parametrized module (e.g. "
                          "weight_norm) with reset_parameters(); pass a factory "
                          "(lambda seed: TrainState.create(make_model(seed), ...)) or a list "
                          "of states")
    module = copy.deepcopy(template).to_empty(device="cpu")
    covered: set[int] = set()
    order: list[nn.Module] = []

    def visit(m: nn.Module) -> None:  # children first: constructors reset children first
        for child in m.children():
            visit(child)
        if callable(getattr(m, "reset_parameters", None)) or callable(
                getattr(m, "_reset_parameters", None)):
            order.append(m)
            covered.update(id(p) for p in m.parameters())
            covered.update(id(b) for b in m.buffers(recurse=False))

    visit(module)
    missing = [n for n, p in module.named_parameters() if id(p) not in covered]
    if missing:
        raise ConfigError(
            f"ft.population re-initializes each member from its seed with the modules' "
            f"reset_parameters(), but no module resets {missing}; pass a factory "
            "(lambda seed: TrainState.create(make_model(seed), ...)) or a list of states")
    generator = torch.default_generator
    saved = generator.get_state()
    try:
        generator.manual_seed(seed)
        with torch.no_grad():
            for m in order:
                reset: Any = getattr(m, "reset_parameters", None)
                if not callable(reset):
                    reset = m._reset_parameters
                reset()
    finally:
        generator.set_state(saved)
    device = state.device
    params = {n: p.detach().to(device) for n, p in module.named_parameters()}
    buffers = {n: (b.detach().to(device) if id(b) in covered
                   else state.buffers[n].detach().clone())
               for n, b in module.named_buffers()}
    return params, buffers


def _trainable(template: nn.Module, params: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    return {n: t for n, t in params.items() if template.get_parameter(n).requires_grad}


def _structural(optimizer: Optimizer, hparams: Mapping[str, list[Any]]) -> Optimizer:
    """An optimizer whose state has every entry some member needs (momentum buffers)."""
    if "momentum" in hparams:
        return _rebuild(optimizer, {"momentum": max(hparams["momentum"])})
    return optimizer


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


def _same_static(a: Any, b: Any) -> bool:
    """Transforms equal in everything but their base settings."""
    if type(a) is not type(b):
        return False
    for field in attrs.fields(type(a)):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, Groups):
            if [(p, dict(o)) for p, o in x.overrides] != [(p, dict(o)) for p, o in y.overrides]:
                return False
        elif x != y:
            return False
    return True


def _inferred_hparams(states: Sequence[TrainState]) -> dict[str, list[Any]]:
    """Settings in which the states' optimizers differ become per-member hparams."""
    base = states[0].optimizer
    if base is None or not all(s.optimizer is not None for s in states):
        if any(s.optimizer is not None for s in states):
            raise ConfigError("some states have an optimizer and some do not")
        return {}
    if not isinstance(base, Optimizer):
        raise ConfigError(f"a population needs ftrain optimizers, got {base!r}")
    out: dict[str, list[Any]] = {}
    for i, s in enumerate(states):
        opt = s.optimizer
        if not isinstance(opt, Optimizer) or len(opt.transforms) != len(base.transforms) or \
                not all(_same_static(a, b) for a, b in zip(opt.transforms, base.transforms)):
            raise ConfigError(f"member {i}'s optimizer is not member 0's up to per-member "
                              f"hyperparameters {list(_KNOWN)}")
    for ti, t in enumerate(base.transforms):
        for key in sorted(_member_settings(t)):
            values = [s.optimizer.transforms[ti].groups.base[key] for s in states]
            if all(v == values[0] for v in values):
                continue
            if key not in _KNOWN:
                raise ConfigError(f"the states' optimizers differ in {key!r}, which members "
                                  f"cannot have of their own (only {list(_KNOWN)})")
            if key in out and out[key] != values:
                raise ConfigError(f"the states' optimizers differ in {key!r} in two transforms")
            out[key] = values
    return out


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
        base = _rebuild(optimizer, {k: v[0] for k, v in hparams.items()})
        pop_opt = PopulationOptimizer(base, n, tuple(hparams), schedules)
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


# -- the step --------------------------------------------------------------------------

def _setting(name: str, opts: Mapping[str, Any], own: Mapping[str, Any],
             hps: Mapping[str, torch.Tensor]) -> Any:
    """A setting for one parameter group: the members' own unless the group fixes it."""
    if name in hps and name not in own:
        return hps[name]
    return opts[name]


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
            if not isinstance(t, (_Adam, _SGD, _ClipGradNorm)):
                raise ConfigError(f"a population step applies adam, adamw, sgd and "
                                  f"clip_grad_norm; this optimizer has {t.name!r}")
        self.popt = opt
        self.loss_fn = step.loss_fn
        self.member_metrics = step.member_metrics
        # per transform: [(settings, the group's own overrides, leaf indices)], fixed once
        self.groups: dict[str, list[tuple[dict[str, Any], dict[str, Any], list[int]]]] = {}
        for key, t in zip(opt.base.keys, opt.base.transforms):
            if isinstance(t, (_Adam, _SGD)):
                split: dict[int, list[int]] = {}
                for j, name in enumerate(self.trainable):
                    split.setdefault(t.groups.index(name), []).append(j)
                self.groups[key] = [
                    (t.groups.settings(gi), dict(t.groups.overrides[gi - 1][1]) if gi else {},
                     idx) for gi, idx in sorted(split.items())]
        try:
            self.slots: Slots | None = Slots(self.template)
        except ValueError:  # parametrized modules: functional_call resolves them
            self.slots, self.apply = None, _bind._Apply(self.template)
        in_dims = (0, 0, 0, 0 if step.per_member_batches else None)
        self.compiled = step.compile_options is not None
        # a CUDA graph's outputs are overwritten by its next replay: such a kernel's
        # results are copied (as ft.compile's are)
        from ftrain.compiling.step import _graphs
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
            self._update(list(trainable.values()), gs, opt_state, _Factors(factors))
            for k, v in new_buffers.items():
                target = buffers[k]
                if torch.compiler.is_compiling() or v.data_ptr() != target.data_ptr():
                    target.copy_(v)
        summary = _member_values(metrics, self.member_metrics) if self.compiled else None
        return metrics, summary, factors

    def _update(self, ps: list[torch.Tensor], gs: Leaves,
                opt_state: dict[str, Any], leaves: _Factors) -> None:
        count = opt_state["count"]
        hps = opt_state.get(HPARAMS, {})
        base = self.popt.base
        for key, t in zip(base.keys, base.transforms):
            if isinstance(t, _ClipGradNorm):
                gs = _clip(gs, t.max_norm, t.norm_type)
            elif isinstance(t, _Adam):
                self._adam(t, self.groups[key], ps, gs, opt_state[key], hps, count, leaves)
            else:
                self._sgd(self.groups[key], ps, gs, opt_state[key], hps, count, leaves)
        count.add_(1)

    def _lr(self, opts: Mapping[str, Any], own: Mapping[str, Any],
            hps: Mapping[str, torch.Tensor], count: torch.Tensor) -> Any:
        """A group's learning rate now: the members' own unless the group sets one."""
        if "lr" not in own:
            return _lr_value(self.popt, opts["lr"], hps, count)
        lr = opts["lr"]
        return torch.as_tensor(lr(count), dtype=torch.float64) if callable(lr) else lr

    def _adam(self, t: Any, groups: list[tuple[dict[str, Any], dict[str, Any], list[int]]],
              ps_all: list[torch.Tensor], gs_all: Leaves, state: dict[str, Any],
              hps: Mapping[str, torch.Tensor], count: torch.Tensor, leaves: _Factors) -> None:
        torch._foreach_add_([state["step"][k] for k in self.trainable], 1.0)
        t_now = (count + 1).to(torch.float64)
        for opts, own, idx in groups:
            names = [self.trainable[j] for j in idx]
            ps = [ps_all[j] for j in idx]
            gs: Leaves = [gs_all[j] for j in idx]
            ms = [state["exp_avg"][k] for k in names]
            vs = [state["exp_avg_sq"][k] for k in names]
            lr = self._lr(opts, own, hps, count)
            wd = _setting("weight_decay", opts, own, hps)
            eps = _setting("eps", opts, own, hps)
            betas = _setting("betas", opts, own, hps)
            b1, b2 = (betas[:, 0], betas[:, 1]) if isinstance(betas, torch.Tensor) else betas
            if t.decoupled:
                if isinstance(wd, torch.Tensor) or wd != 0:
                    torch._foreach_mul_(ps, leaves(1 - lr * wd, ps))
            elif isinstance(wd, torch.Tensor):
                gs = torch._foreach_add(gs, torch._foreach_mul(ps, leaves(wd, ps)))
            elif wd != 0:
                gs = torch._foreach_add(gs, ps, alpha=wd)
            if self._fusable([*ps, *ms, *vs], b1, b2, eps):
                # torch's fused Adam kernel: moments, bias correction and step in one pass
                # (it walks memory linearly: gradients of a vmapped backward may be
                # strided, so they are made contiguous). With a learning rate per member
                # it makes the step for lr = 1, which each member's rate then scales.
                count_now = [t_now[0].to(torch.float32)] * len(ps)
                maxes = [state["max_exp_avg_sq"][k] for k in names] if t.amsgrad else []
                per_member = isinstance(lr, torch.Tensor)
                out = [torch.zeros_like(p, memory_format=torch.contiguous_format)
                       for p in ps] if per_member else ps
                torch._fused_adam_(out, [g.contiguous() for g in gs], ms, vs, maxes,
                                   count_now, amsgrad=t.amsgrad,
                                   lr=1.0 if per_member else float(lr), beta1=float(b1),
                                   beta2=float(b2), weight_decay=0.0, eps=float(eps),
                                   maximize=False)
                if per_member:
                    torch._foreach_addcmul_(ps, out, leaves(lr, ps))
                continue
            step_size = lr / (1 - torch.pow(b1, t_now))
            bc2_sqrt = (1 - torch.pow(b2, t_now)).sqrt()
            torch._foreach_lerp_(ms, gs, leaves(1 - b1, ps))
            if isinstance(b2, torch.Tensor):
                torch._foreach_mul_(vs, leaves(b2, ps))
                sq = torch._foreach_mul(gs, gs)
                torch._foreach_mul_(sq, leaves(1 - b2, ps))
                torch._foreach_add_(vs, sq)
            else:
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
            if t.amsgrad:
                vmax = [state["max_exp_avg_sq"][k] for k in names]
                torch._foreach_maximum_(vmax, vs)
                vs = vmax
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, leaves(bc2_sqrt, ps))
            torch._foreach_add_(denom, leaves(eps, ps))
            scaled = torch._foreach_div(ms, denom)
            torch._foreach_mul_(scaled, leaves(step_size, ps))
            torch._foreach_sub_(ps, scaled)

    def _fusable(self, ps: list[torch.Tensor], *settings: Any) -> bool:
        """Whether torch's fused Adam kernel can make the group's step (eager, shared
        betas and eps, a device with the kernel)."""
        if self.compiled or torch.compiler.is_compiling() or \
                any(isinstance(x, torch.Tensor) for x in settings):
            return False
        return bool(ps) and ps[0].device.type in fused_devices() and all(
            p.is_floating_point() and p.device == ps[0].device and p.is_contiguous()
            for p in ps)

    def _sgd(self, groups: list[tuple[dict[str, Any], dict[str, Any], list[int]]],
             ps_all: list[torch.Tensor], gs_all: Leaves, state: dict[str, Any],
             hps: Mapping[str, torch.Tensor], count: torch.Tensor, leaves: _Factors) -> None:
        bufs = state["momentum_buffer"]
        for opts, own, idx in groups:
            names = [self.trainable[j] for j in idx]
            ps = [ps_all[j] for j in idx]
            gs: Leaves = [gs_all[j] for j in idx]
            lr = self._lr(opts, own, hps, count)
            wd = _setting("weight_decay", opts, own, hps)
            mom = _setting("momentum", opts, own, hps)
            if isinstance(wd, torch.Tensor):
                gs = torch._foreach_add(gs, torch._foreach_mul(ps, leaves(wd, ps)))
            elif wd != 0:
                gs = torch._foreach_add(gs, ps, alpha=wd)
            if names and names[0] in bufs and (isinstance(mom, torch.Tensor) or mom != 0):
                bs = [bufs[k] for k in names]
                momv = leaves(mom, ps)
                torch._foreach_mul_(bs, momv)
                torch._foreach_add_(bs, gs)
                if opts["nesterov"]:
                    gs = torch._foreach_add(gs, torch._foreach_mul(bs, momv))
                else:
                    gs = bs
            if isinstance(lr, torch.Tensor):
                torch._foreach_sub_(ps, torch._foreach_mul(gs, leaves(lr, ps)))
            else:
                torch._foreach_add_(ps, gs, alpha=-lr)


class _Factors:
    """Per-member [N] factors as views that broadcast against each [N, ...] leaf (in the
    leaf's dtype; a float stays a float), each factor kept in `keep` to be returned."""

    def __init__(self, keep: list[torch.Tensor]) -> None:
        self.keep = keep

    def __call__(self, x: Any, like: list[torch.Tensor]) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        self.keep.append(x)
        cache: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        out = []
        for p in like:
            key = (p.dim(), p.dtype)
            v = cache.get(key)
            if v is None:
                v = cache[key] = x.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
            out.append(v)
        return out


def _clip(gs: Leaves, max_norm: float, norm_type: float
          ) -> list[torch.Tensor]:
    """torch's clip_grad_norm_ per member: each member's global norm over its leaves."""
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), norm_type, dim=1)
                         for g in gs])
    total = torch.linalg.vector_norm(norms, norm_type, dim=0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for g in gs]


def _split(out: Any) -> tuple[torch.Tensor, Metrics]:
    """A member's `loss` or `(loss, metrics)` inside vmap, checked as train_step does."""
    from ftrain.core.step import split_loss
    return split_loss(out, "population step")


_KEYS: dict[tuple[str, int], list[str]] = {}


@functools.cache
def _isolate() -> dict[str, bool]:
    """Each population's kernel keeps its own compiled graphs (no shared recompile limit)."""
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return {"isolate_recompiles": True}
    return {}  # pragma: no cover - older torch


def _member_values(values: Mapping[str, torch.Tensor], per_member: bool
                   ) -> tuple[Metrics, dict[str, tuple[torch.Tensor, ...]]]:
    """[N] metric vectors -> their means (0-d) and, if asked, each one's N members."""
    means: Metrics = {}
    members: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, vec in values.items():
        vec = vec.detach()
        means[name] = vec.mean() if vec.is_floating_point() else vec.double().mean()
        if per_member:
            members[name] = vec.unbind(0)
    return means, members


def _member_metrics(means: Metrics, members: Mapping[str, tuple[torch.Tensor, ...]]
                    ) -> Metrics:
    """The step's metrics: each mean, followed by `name/m{i}` for each member's value."""
    out: Metrics = {}
    for name, mean in means.items():
        out[name] = mean
        values = members.get(name)
        if values is not None:
            keys = _KEYS.get((name, len(values)))
            if keys is None:
                keys = _KEYS[(name, len(values))] = [f"{name}/m{i}" for i in range(len(values))]
            out.update(zip(keys, values))
    return out


def _check_batch(batch: Any, n: int, where: str) -> None:
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] != n):
            raise DataError(f"{where}: per_member_batches=True needs every tensor in the "
                            f"batch to lead with the member dimension {n}, found "
                            f"{leaf.dtype}{list(leaf.shape)}")


class PopulationStep:
    """The step built by `population_step` (or `vmap(train_step(loss_fn))`)."""

    inner = None

    def __init__(self, loss_fn: Callable[[Any, Any], Any], *, per_member_batches: bool = False,
                 member_metrics: bool = True, on_nonfinite: Literal["raise", "ignore"] = "raise",
                 check_finite_every_step: bool = False, randomness: Randomness = "different",
                 compile: bool | Mapping[str, Any] = False, fallback: bool = True) -> None:
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
        self._plans: list[_Plan] = []

    def __repr__(self) -> str:
        name = getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))
        return f"population_step({name}{', compiled' if self.compile_options else ''})"

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
                              fallback=self.fallback if fallback is None else fallback)

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
        from torch._dynamo.exc import TorchDynamoException
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
                    fallback: bool = True) -> PopulationStep:
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
    a warning (`fallback=False` raises instead).

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
                          randomness=randomness, compile=compile, fallback=fallback)


# -- evaluation ------------------------------------------------------------------------

class PopulationEvalStep:
    """The evaluation step built by `population_eval_step`."""

    inner = None

    def __init__(self, fn: Callable[[Any, Any], Any], *, per_member_batches: bool = False,
                 member_metrics: bool = True) -> None:
        if not callable(fn):
            raise ConfigError(f"population_eval_step needs a callable fn(model, batch), got "
                              f"{type(fn).__name__}")
        self.fn = fn
        self.per_member_batches = bool(per_member_batches)
        self.member_metrics = bool(member_metrics)
        self._cache: tuple[nn.Module, Callable[..., Any]] | None = None

    def __repr__(self) -> str:
        return f"population_eval_step({getattr(self.fn, '__qualname__', repr(self.fn))})"

    def _evaluator(self, model: StackedModel) -> Callable[..., Any]:
        if self._cache is not None and self._cache[0] is model:
            return self._cache[1]
        apply = _bind._Apply(copy.deepcopy(model.template)).train(False)
        fn = self.fn

        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                batch: Any) -> Metrics:
            from ftrain.core.step import eval_metrics
            tensors = {"model." + k: v for k, v in params.items()}
            tensors.update({"model." + k: v for k, v in buffers.items()})
            out = torch.func.functional_call(apply, tensors, (fn, batch), strict=False)
            return eval_metrics(out, "population evaluation", torch.device("cpu"))

        evaluator = torch.func.vmap(one, in_dims=(0, 0, 0 if self.per_member_batches else None),
                                    randomness="different")
        self._cache = (model, evaluator)
        return evaluator

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        _check_population(state, "a population evaluation step")
        if self.per_member_batches:
            _check_batch(batch, state.model.n, "evaluation")
        evaluator = self._evaluator(state.model)
        with torch.no_grad():
            values = evaluator(state.params, state.buffers, batch)
        return _member_metrics(*_member_values(values, self.member_metrics))


def population_eval_step(fn: Callable[[Any, Any], Any], *, per_member_batches: bool = False,
                         member_metrics: bool = True) -> PopulationEvalStep:
    """Evaluate every member of a population on a batch: no grad, eval mode, vmapped.

    `fn(model, batch)` is the ordinary metric function (one member's model). Metrics:
    each one's mean over members and member i's as `"<name>/m<i>"`, so
    `ft.evaluate(population_eval_step(fn), pop, data)` reports every member and
    `split_members` turns that into one dict per member.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain import population, population_eval_step, split_members
        >>> pop = population(ft.TrainState.create(torch.nn.Linear(3, 1)), n=2)
        >>> evaluator = population_eval_step(
        ...     lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> results = ft.evaluate(evaluator, pop, [(torch.randn(8, 3), torch.randn(8, 1))])
        >>> sorted(results), len(split_members(results))
        (['loss', 'loss/m0', 'loss/m1'], 2)
    """
    return PopulationEvalStep(fn, per_member_batches=per_member_batches,
                              member_metrics=member_metrics)


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
    from ftrain.core.step import EvalStep, TrainStep
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
        return population_step(step.loss_fn, **kwargs)
    if isinstance(step, EvalStep):
        return population_eval_step(step.fn, **options)
    if isinstance(step, (PopulationStep, PopulationEvalStep)):
        raise ConfigError(f"{step!r} is already a population step")
    raise ConfigError(f"ft.vmap takes a step built by ft.train_step or ft.eval_step, got "
                      f"{step!r}; wrap the vmapped step with outer combinators instead "
                      "(ft.with_logging(ft.vmap(ft.train_step(loss_fn))))")
