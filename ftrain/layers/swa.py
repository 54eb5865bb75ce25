"""`with_swa`: stochastic weight averaging (Lightning's `StochasticWeightAveraging`).

From epoch `swa_epoch_start` on, the weights at the end of each completed epoch join an
equal-weight average (torch's `get_swa_multi_avg_fn`: `avg += (params - avg) / (n + 1)`,
the first one copied), kept in a slot, as the loop of torch's SWA recipe
(`swa_model.update_parameters(model)` after each SWA epoch) does. The learning rate
follows `torch.optim.swa_utils.SWALR`: the first SWA epoch runs at the optimizer's lr,
then each epoch's lr anneals ("cos" or "linear") from it to `swa_lrs` over
`annealing_epochs` epochs, then stays there. The layer sets it by returning a state
whose optimizer has that lr (a new optimizer value: the optimizer state is kept).

At the end of the run's last epoch, with `bn_data`, the BatchNorm statistics of the
averaged weights are recomputed over it with `torch.optim.swa_utils.update_bn` (reset,
then a cumulative average over one pass in train mode); `ft.update_bn` does the same
for a run that ended otherwise. Until then `ft.averaged(state, "swa")` of a model with
BatchNorm is refused rather than given statistics of other weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch

from ftrain.core import context
from ftrain.core import rng as _rng
from ftrain.core import slots as _slots
from ftrain.core.bind import install
from ftrain.core.health import log
from ftrain.core.host import to_host
from ftrain.core.layer import Combinator, Metrics
from ftrain.core.run import run_info
from ftrain.core.state import LOOP_SLOT, TrainState, clone_tree
from ftrain.core.trigger import ended_epoch, last_epoch
from ftrain.data.module import resolve
from ftrain.errors import CheckpointError, ConfigError, check_int
from ftrain.layers import averaging as _avg
from ftrain.optim._core import Groups, Optimizer

Labels = dict[str | None, float]


# -- the learning rate of any ftrain optimizer -------------------------------------------

def _lr_transforms(optimizer: Any, what: str) -> list[int]:
    if not isinstance(optimizer, Optimizer):
        raise ConfigError(f"{what} needs an ft.optim optimizer (one model), got "
                          f"{type(optimizer).__name__}")
    found = [i for i, t in enumerate(optimizer.transforms)
             if isinstance(getattr(t, "groups", None), Groups) and "lr" in t.groups.base]
    if not found:
        raise ConfigError(f"{what}: no transform of this optimizer ({list(optimizer.keys)}) "
                          "has a learning rate")
    return found


def current_lrs(optimizer: Any, opt_state: Any, what: str) -> Labels:
    """Each parameter group's lr for the next update, by group label (None: the base
    settings), read on the host (a host sync when the lr is a schedule).

    Examples:
        >>> import torch, ftrain as ft
        >>> from ftrain.layers.swa import current_lrs
        >>> opt = ft.optim.sgd(0.1, groups={"bias": {"lr": 0.5}})
        >>> current_lrs(opt, opt.init({"w": torch.ones(2), "bias": torch.ones(1)}), "test")
        {None: 0.1, 'bias': 0.5}
    """
    out: Labels = {}
    count = opt_state["count"]
    for i in _lr_transforms(optimizer, what):
        t = optimizer.transforms[i]
        lrs = {t.groups.label(j): t.groups.settings(j)["lr"]
               for j in range(len(t.groups.overrides) + 1)}
        values = {k: v(count) if callable(v) else v for k, v in lrs.items()}
        host = to_host(list(values.values()))
        out.update(zip(values, host))
    return out


def with_lr(optimizer: Any, lr: Any, what: str = "setting the learning rate") -> Optimizer:
    """`optimizer` with every parameter group's lr set to `lr` (a float or a schedule), or
    per group label from a dict (None: the base settings); other settings unchanged.

    Examples:
        >>> import ftrain as ft
        >>> from ftrain.layers.swa import with_lr
        >>> opt = with_lr(ft.optim.adamw(1e-3, groups={"*.bias": {"lr": 1e-2}}), 0.5)
        >>> [opt.transforms[0].groups.settings(i)["lr"] for i in (0, 1)]
        [0.5, 0.5]
    """
    transforms = list(optimizer.transforms) if isinstance(optimizer, Optimizer) else []
    for i in _lr_transforms(optimizer, what):
        g = transforms[i].groups
        pick = (lambda label: lr[label]) if isinstance(lr, Mapping) else (lambda label: lr)
        base = {**g.base, "lr": pick(None)}
        overrides = {pat: {**opts, "lr": pick(g.label(j + 1))}
                     for j, (pat, opts) in enumerate(g.overrides)}
        transforms[i] = attrs.evolve(transforms[i], groups=Groups.build(base, overrides))
    return Optimizer(tuple(transforms))


def swa_lr(lr0: float, swa: float, epochs_in: int, annealing_epochs: int,
           strategy: str) -> float:
    """SWALR's lr for the SWA epoch `epochs_in` (0: the first) after annealing from `lr0`.

    Examples:
        >>> from ftrain.layers.swa import swa_lr
        >>> [round(swa_lr(1.0, 0.1, k, 2, "linear"), 3) for k in range(4)]
        [1.0, 0.55, 0.1, 0.1]
    """
    steps = max(1, epochs_in) if annealing_epochs == 0 else epochs_in
    t = max(0.0, min(1.0, steps / max(1, annealing_epochs)))
    alpha = t if strategy == "linear" else (1 - math.cos(math.pi * t)) / 2
    return swa * alpha + lr0 * (1 - alpha)


# -- the batch-norm statistics of the averaged weights -----------------------------------

def update_bn(state: TrainState, data: Any, *, name: str = "swa") -> TrainState:
    """Recompute the BatchNorm statistics of slot `name`'s averaged weights over `data`
    (`torch.optim.swa_utils.update_bn`: statistics reset, then one pass in train mode with
    a cumulative average; a batch that is a tuple or list gives its first element to the
    model). Returns the state with them in the slot; the live buffers are untouched.
    Dropout draws from a seed of (seed, step): the same numbers on a rerun.

    Examples:
        >>> import torch, ftrain as ft
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> state = ft.TrainState.create(net, ft.optim.sgd(0.1))
        >>> step = ft.with_swa(ft.train_step(lambda m, b: m(b[0]).pow(2).mean()),
        ...                    swa_epoch_start=1)
        >>> data = [(torch.randn(8, 3),) for _ in range(2)]
        >>> state = ft.fit(step, state, data, epochs=2, logger=False, checkpoint=False,
        ...                progress=False)
        >>> state = ft.update_bn(state, data)
        >>> ft.averaged(state, "swa").buffers["1.running_mean"].shape
        torch.Size([4])
    """
    slot = _avg.slot_of(state, name)
    if slot["kind"] != "swa":
        raise ConfigError(f"update_bn recomputes an SWA average's statistics; the {name!r} "
                          f"slot holds a {slot['kind']!r} average")
    if state.multi:
        raise ConfigError("update_bn works on a single-model state; this one holds "
                          f"{sorted(state.model)}")
    data = resolve(data, "train")
    params = _avg.merged(state.params, slot["params"]) if slot["count"] else state.params
    buffers = clone_tree(state.buffers)  # the pass writes into these copies only
    module = copy.deepcopy(state.model)
    install(module, params, buffers)
    device = state.device
    with torch.no_grad(), _rng.step_seeded(_rng.generator_for(device), state.seed,
                                           state.step, _rng.rank()):
        torch.optim.swa_utils.update_bn(data, module, device=device)
    new = {**slot, "buffers": buffers, "bn": int(slot["count"])}
    return state.replace(slots={**state.slots, name: new})


# -- the layer ---------------------------------------------------------------------------

class WithSWA(Combinator):
    """The combinator built by `with_swa`."""

    def __init__(self, inner: Any, swa_lrs: float | Mapping[str | None, float] | None = None,
                 *, swa_epoch_start: int | float = 0.8, annealing_epochs: int = 10,
                 annealing_strategy: Literal["cos", "linear"] = "cos", bn_data: Any = None,
                 name: str = "swa") -> None:
        super().__init__(inner, name)
        self.name = name
        if isinstance(swa_epoch_start, bool) or not (
                (isinstance(swa_epoch_start, int) and swa_epoch_start >= 1) or
                (isinstance(swa_epoch_start, float) and 0.0 < swa_epoch_start < 1.0)):
            raise ConfigError(f"with_swa: swa_epoch_start must be an int >= 1 (an epoch "
                              f"number) or a float in (0, 1) (a fraction of the epochs), got "
                              f"{swa_epoch_start!r}")
        check_int("with_swa: annealing_epochs", annealing_epochs, 0)
        if annealing_strategy not in ("cos", "linear"):
            raise ConfigError(f"with_swa: annealing_strategy must be 'cos' or 'linear', got "
                              f"{annealing_strategy!r}")
        lrs = list(swa_lrs.values()) if isinstance(swa_lrs, Mapping) else \
            ([] if swa_lrs is None else [swa_lrs])
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in lrs):
            raise ConfigError(f"with_swa: swa_lrs must be a positive float, a dict of them by "
                              f"parameter group (None: the base settings) or None, got "
                              f"{swa_lrs!r}")
        self.swa_lrs = swa_lrs
        self.swa_epoch_start = swa_epoch_start
        self.annealing_epochs = annealing_epochs
        self.annealing_strategy = annealing_strategy
        self.bn_data = bn_data
        self._checked()

    def __repr__(self) -> str:
        return f"with_swa(swa_epoch_start={self.swa_epoch_start}, name={self.name!r})"

    def start_epoch(self, state: TrainState) -> int:
        """The 0-based epoch whose end first joins the average (Lightning's `swa_start`)."""
        start = self.swa_epoch_start
        if isinstance(start, float):
            run = run_info(state)
            if run is None or run.epochs is None:
                raise ConfigError("with_swa: swa_epoch_start as a fraction needs the loop's "
                                  "epochs= (ft.fit(..., epochs=N)); give an epoch number")
            start = int(run.epochs * start)
        return max(int(start) - 1, 0)

    def after_init(self, state: TrainState) -> TrainState:
        if self.bn_data is None and _avg.has_batch_norm(state):
            log.warning("with_swa: the model has BatchNorm layers and no bn_data= was given: "
                        "ft.averaged(state, %r) is refused until ft.update_bn(state, data) "
                        "recomputes their statistics for the average", self.name)
        slot = state.slots.get(self.name)
        if slot is None:
            slot = {**_avg.fresh_slot(state, "swa", False), "lr0": None, "bn": None}
            state = state.replace(slots={**state.slots, self.name: slot})
            if self._swa_lr_at_once() and state.epoch == self.start_epoch(state) == 0:
                state = self._start_swa_lr(state, slot, 0)  # SWALR built before epoch 1
            return state
        _avg.check_slot(slot, self.name, "swa", state, None)
        if slot["buffers"]:
            _avg.check_tree(slot["buffers"], state.buffers, f"the {self.name!r} slot's buffers")
        if not _slots.optional(_slots.count)(slot.get("bn")):
            raise CheckpointError(f"the state's {self.name!r} slot: bn must be an int >= 0 "
                                  f"or None, found {_slots.short(slot.get('bn'), 60)}")
        lr0 = slot.get("lr0")
        if lr0 is not None and not (isinstance(lr0, list) and all(
                isinstance(p, list) and len(p) == 2 and (p[0] is None or isinstance(p[0], str))
                and isinstance(p[1], (int, float)) for p in lr0)):
            raise CheckpointError(f"the state's {self.name!r} slot: lr0 must be a list of "
                                  f"[group, lr] pairs, found {lr0!r:.100}")
        state = state.replace(slots={**state.slots, self.name: slot})
        if lr0 is not None and self.swa_lrs is not None:  # resumed within the SWA epochs
            state = self._set_lr(state, slot, state.epoch)
        return state

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        state, metrics = self.inner(state, batch)
        slot = state.slots.get(self.name)
        if slot is None:
            slot = {**_avg.fresh_slot(state, "swa", False), "lr0": None, "bn": None}
        return state.replace(slots={**state.slots, self.name: {**slot, "seen": state.step}}
                             ), metrics

    def _swa_lr_at_once(self) -> bool:
        """annealing_epochs=0: SWALR sets swa_lrs when it is built, at the start of the
        first SWA epoch (Lightning builds it then), not after that epoch."""
        return self.annealing_epochs == 0 and self.swa_lrs is not None

    def _lr0(self, state: TrainState) -> list[list[Any]]:
        """Each group's lr now, the lr SWALR anneals from ([group, lr] pairs)."""
        known = current_lrs(state.optimizer, state.opt_state, "with_swa")
        if isinstance(self.swa_lrs, Mapping):
            unknown = sorted(map(str, set(self.swa_lrs) - set(known)))
            if unknown:
                raise ConfigError(f"with_swa: swa_lrs names groups {unknown}; this "
                                  f"optimizer's groups are {sorted(map(str, known))}")
        return [[label, lr] for label, lr in known.items()]

    def _start_swa_lr(self, state: TrainState, slot: dict[str, Any], epoch: int
                      ) -> TrainState:
        slot["lr0"] = self._lr0(state)
        state = state.replace(slots={**state.slots, self.name: slot})
        return self._set_lr(state, slot, epoch)

    def _set_lr(self, state: TrainState, slot: dict[str, Any], epoch: int) -> TrainState:
        """The optimizer with the lr SWALR gives epoch `epoch` (0-based)."""
        k = epoch - self.start_epoch(state)
        lr0 = {label: lr for label, lr in slot["lr0"]}
        swa: Any = self.swa_lrs
        targets = dict(swa) if isinstance(swa, Mapping) else dict.fromkeys(lr0, swa)
        # a group the dict does not name keeps its lr
        lrs = {label: v if label not in targets else swa_lr(
            v, float(targets[label]), k, self.annealing_epochs, self.annealing_strategy)
            for label, v in lr0.items()}
        return state.replace(optimizer=with_lr(state.optimizer, lrs, "with_swa"))

    def at_epoch_end(self, state: TrainState, metrics: Metrics
                     ) -> tuple[TrainState, Metrics]:
        if LOOP_SLOT not in state.slots or not ended_epoch(state):
            return state, metrics
        epoch = state.epoch - 1  # the epoch that just ended (0-based)
        start = self.start_epoch(state)
        if epoch < start:
            if self._swa_lr_at_once() and epoch + 1 == start:  # the next epoch is SWA's
                state = self._start_swa_lr(state, dict(state.slots[self.name]), start)
            return state, metrics
        slot = dict(state.slots[self.name])
        if context.binding_of(state) is None:  # not a loop's state: update copies (pure)
            slot["params"] = _avg.copy_tree(slot["params"])
        count = int(slot["count"])
        groups = _avg.grouped_pairs(slot["params"], state.params)
        if count == 0:
            _avg.copy_(groups)
        else:
            _avg.lerp_(groups, 1.0 / (count + 1))
        slot.update(count=count + 1, seen=state.step)
        if self.swa_lrs is not None:
            if slot["lr0"] is None:  # the first SWA epoch ended: anneal from its lr
                slot["lr0"] = self._lr0(state)
            state = self._set_lr(state, slot, epoch + 1)
        state = state.replace(slots={**state.slots, self.name: slot})
        if self.bn_data is not None and last_epoch(state) and _avg.has_batch_norm(state):
            state = update_bn(state, self.bn_data, name=self.name)
        return state, metrics


def with_swa(step: Any, swa_lrs: float | Mapping[str | None, float] | None = None, *,
             swa_epoch_start: int | float = 0.8, annealing_epochs: int = 10,
             annealing_strategy: Literal["cos", "linear"] = "cos", bn_data: Any = None,
             name: str = "swa") -> WithSWA:
    """Stochastic weight averaging, as Lightning's `StochasticWeightAveraging`.

    The weights at the end of each epoch from `swa_epoch_start` on (an epoch number from
    1, or a fraction of `ft.fit`'s epochs; Lightning's rule) are averaged with equal
    weights in `state.slots[name]`. With `swa_lrs` (a float, or a dict by parameter
    group, None naming the base settings; a group it does not name keeps its lr) the lr
    anneals to it as SWALR's does
    (`annealing_epochs`, `annealing_strategy` "cos" or "linear"); without, the lr is
    left alone. A model with BatchNorm needs `bn_data`: its statistics are recomputed
    for the average at the run's last epoch (`ft.update_bn` for a run that ended
    otherwise). `ft.averaged(state, "swa")` is the state with the average in use.

    Examples:
        >>> import torch, ftrain as ft
        >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> step = ft.with_swa(ft.train_step(loss), swa_lrs=0.05, swa_epoch_start=2)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> state = ft.fit(step, state, data, epochs=4, logger=False, checkpoint=False,
        ...                progress=False)
        >>> state.slots["swa"]["count"]   # the ends of epochs 2, 3 and 4
        3
    """
    return WithSWA(step, swa_lrs, swa_epoch_start=swa_epoch_start,
                   annealing_epochs=annealing_epochs, annealing_strategy=annealing_strategy,
                   bn_data=bn_data, name=name)
