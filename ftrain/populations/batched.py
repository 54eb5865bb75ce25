"""The batched fast path of a population step: every member's forward computed on the
stacked tensors directly (one GEMM per linear layer, one cross-entropy over [N, B, C])
instead of through vmap's batching rules, which run `linear` as matmul + add and
`nll_loss` through a Python decomposition.

The user's `loss_fn(model, batch)` runs unchanged on the template, with a `Members`
tensor in each parameter and buffer slot: a tensor that shows one member's shape and
holds all N members' values ([N, ...]). Every torch function that touches a `Members`
goes to a rule (`batched_rules`, `batched_views`, `batched_nn`: computed on the stacked
values, the result a `Members` again); a function without a rule raises `Unsupported`,
and so does anything that gets past the rules to torch's dispatcher. While the loss
function runs, a torch function mode also stops random functions on plain tensors when
members draw different numbers (vmap would give each member its own draws; a plain call
would share one), and any draw from the generator outside the rules is caught after the
forward. The plan catches the failure and runs that step, and every later one, through
vmap: a model or loss without rules is slower, never different.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ftrain.core.step import split_loss

Rule = Callable[..., Any]
# torch function -> its rule on Members: batched_rules, batched_views and batched_nn fill it
# when imported (the plan imports them)
RULES: dict[Any, Rule] = {}


class Unsupported(Exception):
    """A step the batched path cannot compute exactly as vmap would: it takes vmap."""


class Members(torch.Tensor):
    """One tensor of every member: shows a member's shape (`stacked.shape[1:]`), dtype and
    device; `stacked` holds the N members' values stacked along dim 0.

    Examples:
        >>> import torch
        >>> from ftrain.populations.batched import Members
        >>> w = Members(torch.zeros(4, 3, 2))
        >>> tuple(w.shape), tuple(w.stacked.shape)
        ((3, 2), (4, 3, 2))
    """

    stacked: torch.Tensor

    @staticmethod
    def __new__(cls, stacked: torch.Tensor) -> Members:
        # cost: ~3 us per wrapper (measured); slot tensors' wrappers are reused across steps
        out = torch.Tensor._make_wrapper_subclass(cls, stacked.shape[1:], dtype=stacked.dtype,
                                                  device=stacked.device)
        out.stacked = stacked
        return out  # type: ignore[no-any-return]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        return _apply(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (),  # type: ignore[override]
                           kwargs: Any = None) -> Any:
        raise Unsupported(f"{func} reached the dispatcher")


def _apply(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    rule = RULES.get(func)
    if rule is None:
        raise Unsupported(f"no batched rule for {getattr(func, '__name__', func)}")
    if torch._C._is_any_autocast_enabled():  # the rules' ops would round otherwise
        raise Unsupported("autocast")
    return rule(*args, **kwargs)


_RANDOM_NAMES = frozenset((
    "normal", "normal_", "bernoulli", "bernoulli_", "multinomial", "poisson", "binomial",
    "uniform_", "random_", "exponential_", "geometric_", "cauchy_", "log_normal_", "rrelu",
    "rrelu_", "rrelu_with_noise", "gumbel_softmax", "_standard_gamma", "_sample_dirichlet"))


def _random_functions() -> frozenset[Any]:
    """Torch functions that draw random numbers, by name (generously: a false match only
    costs the fast path; a draw the names miss shows in the generator's state)."""
    found: set[Any] = set()
    namespaces = [*torch.overrides.get_overridable_functions().values(),
                  torch.overrides.get_ignored_functions()]
    for funcs in namespaces:
        for f in funcs:
            name = getattr(f, "__name__", "") or ""
            if (name in _RANDOM_NAMES or name.startswith(("rand", "_rand")) or "dropout" in name
                    or "fractional_max_pool" in name):
                found.add(f)
    return frozenset(found)


_RANDOM: frozenset[Any] | None = None


class _Guard(TorchFunctionMode):
    """Routes functions on Members to their rules; with `different` randomness, a random
    function on plain tensors is refused (under vmap each member would draw its own)."""

    def __init__(self, refuse_random: bool) -> None:
        super().__init__()
        self.refuse_random = refuse_random

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if Members in types:
            return _apply(func, args, kwargs)
        if self.refuse_random and _RANDOM is not None and func in _RANDOM:
            raise Unsupported(f"{getattr(func, '__name__', func)} on plain tensors draws "
                              "one value for all members")
        return func(*args, **kwargs)


class Draws:
    """The generator the members' random rules draw from, and the state they left it in:
    a draw outside the rules (a random op on plain tensors that the guard's names miss,
    e.g. inside a C++ function) shows as a state the rules did not leave.

    Examples:
        >>> import torch
        >>> from ftrain.populations.batched import Draws, Unsupported
        >>> draws = Draws(torch.Generator().manual_seed(0), "different")
        >>> _ = torch.rand(2, generator=draws.generator)
        >>> try:
        ...     draws.check()
        ... except Unsupported as err:
        ...     print(err)
        random numbers were drawn outside the batched rules
    """

    current: Draws | None = None

    def __init__(self, generator: torch.Generator, randomness: str) -> None:
        self.generator, self.randomness = generator, randomness
        self.start = generator.get_state()
        self.left = _bytes(self.start)

    def check(self) -> None:
        if self.randomness == "different" and _bytes(self.generator.get_state()) != self.left:
            raise Unsupported("random numbers were drawn outside the batched rules")

    def drew(self) -> None:
        self.left = _bytes(self.generator.get_state())


def _bytes(state: torch.Tensor) -> bytes:
    return state.numpy().tobytes()  # cost: ~1 us for a CPU generator's 5 KB


class BatchedLoss:
    """`loss_fn` run once on the stacked tensors of all members (the template's slots
    hold `Members`): any exception means the step runs through vmap instead.

    Examples:
        >>> import torch
        >>> from ftrain.core.swap import Slots
        >>> from ftrain.populations import batched_nn  # registers the rules
        >>> from ftrain.populations.batched import BatchedLoss
        >>> lin = torch.nn.Linear(3, 2)
        >>> run = BatchedLoss(lin, Slots(lin), lambda m, b: m(b).sum(), [], "different", False)
        >>> members = {"weight": torch.ones(4, 2, 3), "bias": torch.arange(8.0).view(4, 2)}
        >>> loss, metrics = run(members, torch.ones(5, 3), torch.default_generator)
        >>> loss.tolist()   # member i: 5 samples x (3 + 3 + 4i + 1)
        [35.0, 55.0, 75.0, 95.0]
    """

    def __init__(self, template: torch.nn.Module, slots: Any, loss_fn: Callable[..., Any],
                 names: list[str], randomness: str, per_member_batches: bool) -> None:
        global _RANDOM
        if _RANDOM is None:
            _RANDOM = _random_functions()
        self.template, self.slots, self.loss_fn = template, slots, loss_fn
        self.names, self.randomness = names, randomness
        self.per_member_batches = per_member_batches
        self.wrapped: dict[str, Members] = {}
        self.draws: Draws | None = None
        self.guard = _Guard(randomness == "different")

    def _wrap(self, name: str, t: torch.Tensor) -> Members:
        w = self.wrapped.get(name)
        if w is None or w.stacked is not t:
            w = self.wrapped[name] = Members(t)
        return w

    def __call__(self, tensors: dict[str, torch.Tensor], batch: Any,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The members' losses [N] and metrics {name: [N]}; raises when the step must run
        through vmap (then `rewind` puts the generator back)."""
        n = next(iter(tensors.values())).shape[0]
        wrapped = {k: self._wrap(k, v) for k, v in tensors.items()}
        if self.per_member_batches:
            leaves, spec = pytree.tree_flatten(batch)
            if not all(isinstance(x, torch.Tensor) for x in leaves):
                raise Unsupported("a per-member batch with non-tensor leaves")
            batch = pytree.tree_unflatten([Members(x) for x in leaves], spec)
        draws = self.draws = Draws.current = Draws(generator, self.randomness)
        old = self.slots.put(wrapped)
        try:
            with self.guard:
                out = self.loss_fn(self.template, batch)
            loss: torch.Tensor = out
            metrics: dict[str, torch.Tensor] | None = None
            if not (type(out) is Members and out.stacked.dim() == 1
                    and out.stacked.is_floating_point()):  # else: split_loss's checks, fast
                loss, metrics = split_loss(out, "population step")
            now = self.slots.current(self.names, wrapped)
            if any(now[k] is not wrapped[k] for k in self.names):
                raise Unsupported("the forward replaced a buffer")
            draws.check()
        finally:
            Draws.current = None
            self.slots.restore(old)
        if not isinstance(loss, Members):
            raise Unsupported("a loss that does not depend on the model")
        if metrics is None:
            return loss.stacked, {"loss": loss.stacked.detach()}
        return loss.stacked, {k: _stacked(v, n) for k, v in metrics.items()}

    def rewind(self) -> None:
        """Put the generator back where the last call found it (vmap draws afresh)."""
        if self.draws is not None:
            self.draws.generator.set_state(self.draws.start)


def _stacked(value: torch.Tensor, n: int) -> torch.Tensor:
    """A 0-d metric as the members' [N] values (a plain tensor is every member's)."""
    return value.stacked if isinstance(value, Members) else value.expand(n)
