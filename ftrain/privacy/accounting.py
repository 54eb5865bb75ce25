"""Privacy accounting: the `dp` slot, and epsilon from Opacus's accountants.

The slot `with_dp` owns is plain data (a checkpoint carries it, a resume continues it):
`{"steps": noisy steps taken, "history": [[noise_multiplier, sample_rate, steps], ...],
"delta", "accountant", "max_steps", "noise_seed"}`. `history` is the accountant's own record (one
entry per setting used, so a run resumed with other settings is still accounted
exactly); `max_steps` is the budget `target_epsilon` allows (None: no target), computed
again at each `init`. Epsilon is computed by Opacus (`RDPAccountant`, or `PRVAccountant`
with `accountant="prv"`), imported only here and only when asked: never per step.
"""

from __future__ import annotations

import math
from typing import Any

from ftrain.core import slots as _slots
from ftrain.errors import CheckpointError, ConfigError

ACCOUNTANTS = ("rdp", "prv")
MAX_HISTORY = 10_000  # entries a restored slot may hold
NO_LIMIT = 2**40  # steps: a budget this large is no budget


def _accountant(kind: str, history: list[Any]) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant
    accountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if n]
    return accountant


def epsilon_of(history: list[Any], delta: float, kind: str = "rdp") -> float:
    """Epsilon spent by `history` (`[[noise_multiplier, sample_rate, steps], ...]`) at
    `delta`, by Opacus's accountant `kind` ("rdp" or "prv")."""
    if not any(n for _, _, n in history):
        return 0.0
    if any(s == 0 for s, _, n in history if n):
        return math.inf  # a step without noise: no privacy
    return float(_accountant(kind, history).get_epsilon(delta))


def steps_for_epsilon(target_epsilon: float, *, noise_multiplier: float,
                      sample_rate: float, delta: float, accountant: str = "rdp",
                      history: list[Any] | None = None) -> int:
    """How many steps at (`noise_multiplier`, `sample_rate`) fit in `target_epsilon` at
    `delta`, after the steps already in `history` (a bisection over Opacus's accountant;
    monotone in the steps). 0 when even one step would exceed it.

    Examples:
        >>> from ftrain.privacy import steps_for_epsilon
        >>> steps_for_epsilon(2.0, noise_multiplier=1.0, sample_rate=0.01, delta=1e-5)
        881
    """
    before = [list(h) for h in (history or [])]

    def spent(n: int) -> float:
        return epsilon_of([*before, [noise_multiplier, sample_rate, n]], delta, accountant)

    if noise_multiplier <= 0 or spent(1) > target_epsilon:
        return 0
    if accountant == "rdp":
        return _rdp_steps(target_epsilon, noise_multiplier, sample_rate, delta, before)
    return _most_steps(spent, target_epsilon)


def _rdp_steps(target: float, sigma: float, q: float, delta: float,
               before: list[Any]) -> int:
    """RDP grows linearly in the steps: compute it once per step, then bisect cheaply
    with exactly the computation `RDPAccountant.get_epsilon` does."""
    from opacus.accountants.analysis import rdp as analysis
    from opacus.accountants.rdp import RDPAccountant
    orders = RDPAccountant.DEFAULT_ALPHAS
    base = sum(analysis.compute_rdp(q=float(bq), noise_multiplier=float(bs),
                                    steps=int(bn), orders=orders)
               for bs, bq, bn in before if bn) if before else 0.0
    one = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)

    def spent(n: int) -> float:
        eps, _ = analysis.get_privacy_spent(orders=orders, rdp=base + one * n, delta=delta)
        return float(eps)

    return _most_steps(spent, target)


def _most_steps(spent: Any, target: float) -> int:
    """The largest n >= 1 with spent(n) <= target (spent(1) is): epsilon grows with the
    steps, so bracket by doubling, then bisect."""
    lo, hi = 1, 2
    while spent(hi) <= target:
        lo, hi = hi, hi * 2
        if hi > NO_LIMIT:
            return NO_LIMIT
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if spent(mid) <= target else (lo, mid)
    return lo


def _history(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= MAX_HISTORY and all(
        isinstance(h, (list, tuple)) and len(h) == 3
        and _slots.finite(h[0]) and h[0] >= 0
        and _slots.finite(h[1]) and 0 < h[1] <= 1 and _slots.count(h[2]) for h in value)


_FIELDS: dict[str, Any] = {
    "steps": (_slots.count, "an int >= 0"),
    "history": (_history, "a list of [noise_multiplier >= 0, sample_rate in (0, 1], "
                          "steps >= 0]"),
    "delta": (lambda v: _slots.number(v) and 0 < v < 1, "a number in (0, 1)"),
    "accountant": (lambda v: v in ACCOUNTANTS, f"one of {ACCOUNTANTS}"),
    "max_steps": (_slots.optional(_slots.count), "an int >= 0 or None"),
    "noise_seed": (lambda v: _slots.count(v) and v < 2**63, "an int in [0, 2**63)"),
}


def require() -> None:
    """Opacus's accountants are there (checked when a private run starts, not after its
    first epoch)."""
    try:
        import opacus.accountants  # noqa: F401
    except ImportError as err:
        raise ConfigError("with_dp accounts privacy with Opacus's accountants, which are "
                          f"not installed ({err}): pip install 'ftrain[dp]'") from err


def check_slot(slot: Any, name: str) -> dict[str, Any]:
    """A `dp` slot read back from a state (maybe from a file): checked field by field."""
    _slots.check(slot, name, _FIELDS)
    counted = sum(int(h[2]) for h in slot["history"])
    if counted != slot["steps"]:
        raise CheckpointError(f"the state's {name!r} slot: steps must equal the steps in "
                              f"its history ({counted}), found {slot['steps']}")
    return dict(slot)


def epsilon(state: Any, *, name: str = "dp", delta: float | None = None,
            accountant: str | None = None) -> float:
    """The privacy spent so far by `state`'s run under `with_dp` (its slot `name`):
    epsilon at `delta` (default: the run's), by Opacus's accountant (the run's, or
    `accountant=` "rdp" / "prv"). A host computation of a few milliseconds (RDP) to a
    second (PRV): call it where you log, not per step.

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.privacy import with_dp, epsilon
        >>> step = with_dp(ft.train_step(lambda m, b: m(b).pow(2).mean()),
        ...                max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.01)
        >>> state = step.init(ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1)))
        >>> for _ in range(3):
        ...     state, _ = step(state, torch.randn(8, 3))
        >>> round(epsilon(state), 3)
        0.99
    """
    slot = state.slots.get(name)
    if slot is None:
        raise ConfigError(f"this state has no {name!r} slot: it was not trained under "
                          f"with_dp(..., name={name!r})")
    slot = check_slot(slot, name)
    kind = slot["accountant"] if accountant is None else accountant
    if kind not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")
    d = slot["delta"] if delta is None else check_delta(delta)
    return epsilon_of(slot["history"], d, kind)


def check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)
