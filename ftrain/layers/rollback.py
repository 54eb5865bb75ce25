"""`with_rollback`: go back past a NaN or a loss spike, skip the data that caused it, go on.

In a loop, the layer keeps a small ring of recent good states (`ftrain.layers.snapshots`)
and the losses of the steps since the newest one (device tensors: no sync). Every
`every_n_steps` steps, at each epoch end, before an outer layer saves a checkpoint and at
`max_steps`, it verifies that window: one host read of its losses (averaged over ranks
under `with_ddp`, so every rank decides the same) judged by the detectors. A clean window
becomes the newest snapshot. When a detector fires, the newest snapshot is copied back
into the live tensors (params, buffers, optimizer state, the slots of the layers inside,
`state.step`), the window's batches are skipped (the loop has consumed them; the state
records them), and training continues with the next batch. The i-th rollback in a row
goes i snapshots back (as far as the ring reaches); past `give_up_after` in a row the
layer stops the run with a `RollbackError` (and, if the loop captures failures, a repro
bundle of the failing step).

Because `state.step` goes back with the tensors, the seeds of the steps that follow are
those of a run that never saw the window: the final state equals, bitwise, a run on the
same data without the skipped batches.

Costs: one host read per `every_n_steps` steps, and a copy of the state per snapshot;
memory `keep` x (params + buffers + optimizer state), plus references to the window's
batches when the loop writes repro bundles (`capture_failures`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ftrain.core import context, health
from ftrain.core import layer as _layer
from ftrain.core import slots as _slots
from ftrain.core.layer import Combinator, Metrics
from ftrain.core.state import LOOP_SLOT, TrainState, clone_tree
from ftrain.core.step import request_stop
from ftrain.errors import (
    ConfigError,
    MonitorError,
    NonFiniteLossError,
    RollbackError,
    check_int,
)
from ftrain.layers import divergence
from ftrain.layers import snapshots as _snap
from ftrain.optim.rates import Scaled, group_lrs, with_group_lrs
from ftrain.parallel.dist import across_ranks

log = logging.getLogger("ftrain")
Detector = Callable[[float, Sequence[float]], Any]

def _position(value: Any) -> bool:
    return _slots.list_of(_slots.count)(value) and len(value) == 2


_WHERE = _position
_SKIP = {"step": (_slots.count, "an int >= 0"), "at": (_slots.count, "an int >= 0"),
         "first": (_WHERE, "[epoch, batch] ints >= 0"),
         "last": (_WHERE, "[epoch, batch] ints >= 0"), "reason": (_slots.text, "a string")}
MAX_RECORDS = 100_000  # history values and skipped windows a restored slot may hold
_FIELDS = {
    "rollbacks": (_slots.count, "an int >= 0"),
    "in_a_row": (_slots.count, "an int >= 0"),
    "history": (lambda v: _slots.list_of(_slots.finite)(v) and len(v) <= MAX_RECORDS,
                f"a list of at most {MAX_RECORDS} finite numbers"),
    "skipped": (lambda v: _slots.list_of(lambda e: isinstance(e, dict) and set(e) == set(
        _SKIP) and all(test(e[k]) for k, (test, _) in _SKIP.items()))(v)
        and len(v) <= MAX_RECORDS,
        f"a list of at most {MAX_RECORDS} {{step, at, first, last, reason}} records"),
    "cooldown_until": (_slots.count, "an int >= 0"),
}


class _Run:
    """What one loop run keeps (in its binding, never in the state): the ring of good
    states, the unverified window, the optimizer to go back to after a cooldown."""

    def __init__(self) -> None:
        self.ring: list[_snap.Snapshot] = []
        self.window: list[tuple[torch.Tensor, tuple[int, int], Any]] = []
        self.count: torch.Tensor | None = None  # the "rollbacks" metric, made once per change
        self.scaled: Any = None  # (the run's optimizer, it with the cooldown's lr)
        self.gave_up: RollbackError | None = None
        self.flat = _snap.Flat()  # the live tensors, flattened once per run


def _check_finite_params(state: TrainState) -> None:
    """Refuse to keep a state whose parameters are not finite as the first good one (it
    left an earlier loop between verifications: a break, an error). One host read per run."""
    tensors = [t for t in pytree.tree_leaves(state.params)
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if tensors and not bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
        raise RollbackError(
            f"with_rollback: the state this loop starts from (step {state.step}) has "
            "non-finite parameters; it left an earlier loop between two verifications "
            "(a break, an error). Continue from a checkpoint or from err.state of a "
            "RollbackError, which hold verified states")


def _where(state: TrainState) -> tuple[int, int]:
    """(epoch, batches consumed in it) as the loop's position says; (0, step) outside one."""
    pos = state.slots.get(LOOP_SLOT)
    if not isinstance(pos, dict):
        return 0, state.step
    return int(pos.get("epoch", 0)), int(pos.get("batch", 0))


class WithRollback(Combinator):
    """The combinator built by `with_rollback`."""

    writes = ("rollbacks",)

    def __init__(self, inner: Any, detect: Detector | Sequence[Detector] | None, *,
                 keep: int, every_n_steps: int, where: str, give_up_after: int,
                 lr_factor: float | None, lr_steps: int, monitor: str, name: str) -> None:
        super().__init__(inner, name)
        self.name = name
        found = (divergence.nonfinite,) if detect is None else \
            (detect,) if callable(detect) else tuple(detect)
        if not found or not all(callable(d) for d in found):
            raise ConfigError(f"with_rollback: detect must be a callable (loss, history) -> "
                              f"reason or None, or a list of them; got {detect!r}")
        self.detectors = found
        self.history_size = max([int(getattr(d, "window", 0)) for d in found] + [0])
        check_int("with_rollback: keep", keep, 1)
        check_int("with_rollback: every_n_steps", every_n_steps, 1)
        check_int("with_rollback: give_up_after", give_up_after, 1)
        check_int("with_rollback: lr_steps", lr_steps, 0)
        if where not in ("device", "host"):
            raise ConfigError(f"with_rollback: where must be 'device' or 'host', got "
                              f"{where!r}")
        if lr_factor is not None and (isinstance(lr_factor, bool) or not isinstance(
                lr_factor, (int, float)) or not 0.0 < lr_factor < 1.0):
            raise ConfigError(f"with_rollback: lr_factor must be a float in (0, 1) or None, "
                              f"got {lr_factor!r}")
        if lr_factor is not None and lr_steps < 1:
            raise ConfigError("with_rollback: lr_factor needs lr_steps >= 1 (how many steps "
                              "after a rollback train at the lower learning rate)")
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"with_rollback: monitor must be a metric name, got {monitor!r}")
        if getattr(_layer.core(inner), "check_finite_every_step", False):
            raise ConfigError("with_rollback cannot wrap a train_step with "
                              "check_finite_every_step=True: that step raises at the bad "
                              "step before any rollback; use with_rollback(every_n_steps=1) "
                              "to check every step")
        self.keep, self.every_n_steps, self.placement = keep, every_n_steps, where
        self.give_up_after, self.lr_factor, self.lr_steps = give_up_after, lr_factor, lr_steps
        self.monitor = monitor
        # the slots a rollback puts back: those of the layers inside
        # (not those that only grow: with_dp's privacy spent counts the dropped steps too)
        spent = getattr(getattr(_layer.core(inner), "phases", None), "spent_slots", ())
        self.spent_slots = tuple(spent)
        self.restored_slots = sorted({n for layer in _layer.layers(inner)
                                      for n in _layer.claims(layer)} - set(spent))
        self._checked()

    def __repr__(self) -> str:
        return (f"with_rollback(every_n_steps={self.every_n_steps}, keep={self.keep}, "
                f"name={self.name!r})")

    # -- the slot (plain data: a resumed run continues the same record) ------------------

    def _slot(self, state: TrainState) -> dict[str, Any]:
        slot = state.slots.get(self.name)
        if slot is None:
            return {"rollbacks": 0, "in_a_row": 0, "history": [], "skipped": [],
                    "cooldown_until": 0}
        return slot  # type: ignore[no-any-return]

    def after_init(self, state: TrainState) -> TrainState:
        slot = state.slots.get(self.name)
        if slot is None:
            slot = self._slot(state)
        else:  # read back from a checkpoint: untrusted
            _slots.check(slot, self.name, _FIELDS)
            slot = {**slot, "history": [float(v) for v in slot["history"]]}
        return state.replace(slots={**state.slots, self.name: slot})

    def _judge(self, value: float, history: list[float]) -> str | None:
        if not math.isfinite(value):  # whatever the detectors: a NaN is never good
            return f"the loss was {value}"
        for detect in self.detectors:
            reason = detect(value, history)
            if reason:
                return reason if isinstance(reason, str) else \
                    f"{getattr(detect, '__name__', type(detect).__name__)} fired"
        return None

    def _remember(self, history: list[float], value: float) -> None:
        history.append(value)
        if len(history) > self.history_size:
            del history[:len(history) - self.history_size]

    def _loss(self, metrics: Metrics) -> torch.Tensor:
        loss = metrics.get(self.monitor)
        if not isinstance(loss, torch.Tensor):
            raise MonitorError(f"with_rollback watches {self.monitor!r}, which the step did "
                               f"not return; its metrics: {sorted(metrics)}")
        return loss.detach()

    # -- a direct call: pure, so the input itself is the good state ----------------------

    def _pure(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        new, metrics = self.inner(state, batch)
        slot = dict(self._slot(state))
        history = list(slot["history"])
        value = float(self._loss(metrics))  # host sync: a direct call decides at once
        reason = self._judge(value, history)
        if reason is None:
            self._remember(history, value)
            slot.update(history=history, in_a_row=0)
            return new.replace(slots={**new.slots, self.name: slot}), metrics
        slot["in_a_row"] += 1
        if slot["in_a_row"] > self.give_up_after:
            raise RollbackError(f"with_rollback: {reason} at step {state.step}, the "
                                f"{slot['in_a_row']}th time in a row (give_up_after="
                                f"{self.give_up_after})")
        where = list(_where(state))
        spent = {n: new.slots[n] for n in self.spent_slots if n in new.slots}
        slot["rollbacks"] += 1
        slot["skipped"] = [*slot["skipped"], {"step": state.step, "at": state.step,
                                              "first": where, "last": where,
                                              "reason": reason}]
        log.warning("with_rollback: %s at step %d; the step is skipped", reason, state.step)
        count = torch.tensor(float(slot["rollbacks"]), device=state.device)
        return state.replace(slots={**state.slots, **spent, self.name: slot}), \
            {**metrics, "rollbacks": count}

    # -- in a loop -----------------------------------------------------------------------

    def _run(self, binding: Any, state: TrainState, at: tuple[int, int]
             ) -> tuple[_Run, TrainState]:
        run = binding.layer_runs.get(self.name)
        if run is None or not run.ring:
            _check_finite_params(state)  # the first good state must be good
            run = binding.layer_runs[self.name] = _Run()
            self._push(run, state, at)
            run.count = torch.tensor(float(self._slot(state)["rollbacks"]),
                                     device=state.device)
            return run, state
        params, buffers, opt_state = run.ring[-1].source
        if state.params is not params or state.buffers is not buffers or \
                state.opt_state is not opt_state:
            # new tensors (freeze, unfreeze, an optimizer swap): judge the window on the
            # old ones now, then keep good states of the new structure (every rank makes
            # the same change at the same step)
            before = state.step
            state = self._verify(state, run, binding)
            if state.step == before and run.ring[-1].source[0] is not state.params:
                self._push(run, state, at)
        return run, state

    def _push(self, run: _Run, state: TrainState, where: tuple[int, int]) -> None:
        reuse = run.ring.pop(0) if len(run.ring) >= self.keep else None
        run.ring.append(_snap.take(state, where, self.restored_slots,
                                   self._slot(state)["history"], self.placement, reuse,
                                   run.flat))

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        binding = context.stepping(state)
        if binding is None:
            return self._pure(state, batch)
        epoch, consumed = _where(state)  # the loop counts this batch as consumed already
        at = (epoch, max(consumed - 1, 0))  # (epoch, index) of the batch trained on now
        run, state = self._run(binding, state, at)
        given, cooled = state.optimizer, self._cooled(state, run)
        scaled = cooled.optimizer
        new, metrics = self.inner(cooled, batch)
        if scaled is not given and new.optimizer is scaled:
            new = new.replace(optimizer=given)  # the scaled one stays inside
        # the window's batches are kept only where a give-up would write a bundle of them
        keep = binding.run is not None and binding.run.capture is not None and \
            self._slot(new)["in_a_row"] >= self.give_up_after
        run.window.append((self._loss(metrics), at, batch if keep else None))
        info = binding.run
        if new.step - run.ring[-1].step >= self.every_n_steps or (
                info is not None and info.max_steps is not None
                and new.step >= info.max_steps):
            new = self._verify(new, run, binding)
        return new, {**metrics, "rollbacks": run.count}

    def epoch_end(self, state: TrainState) -> tuple[TrainState, Metrics]:
        # before the layers inside report the epoch (the core raises on a NaN it recorded)
        binding = context.binding_of(state)
        run = binding.layer_runs.get(self.name) if binding is not None else None
        if run is not None:
            state = self._verify(state, run, binding)
            if run.gave_up is not None:
                error, run.gave_up = run.gave_up, None
                raise error
        return _layer.epoch_end(self.inner, state)

    def on_request(self, state: TrainState, what: str) -> tuple[TrainState, str | None]:
        """"verify" (an outer layer is about to save a checkpoint): judge the window now,
        so no unverified state is saved; the note says whether the state went back."""
        if what != "verify":
            return state, None
        binding = context.binding_of(state)
        run = binding.layer_runs.get(self.name) if binding is not None else None
        if run is None or not run.window:
            return state, None
        before = state.step
        state = self._verify(state, run, binding)
        return state, (f"{self.name}: rolled back to step {state.step}"
                       if state.step != before else None)

    def _verify(self, state: TrainState, run: _Run, binding: Any) -> TrainState:
        """Judge the window's losses (host sync here: one read); a clean window becomes
        the newest snapshot, a bad one is rolled back."""
        if not run.window:
            return state
        losses = across_ranks(state, [loss for loss, _, _ in run.window])
        values = torch.stack([v.float() for v in losses]).tolist()
        slot = dict(self._slot(state))
        history = list(slot["history"])
        for i, value in enumerate(values):
            reason = self._judge(value, history)
            if reason is not None:
                return self._roll_back(state, run, binding, slot, i, reason, value)
            self._remember(history, value)
        slot.update(history=history, in_a_row=0)
        state = state.replace(slots={**state.slots, self.name: slot})
        run.window.clear()
        self._push(run, state, _where(state))
        return state

    def _roll_back(self, state: TrainState, run: _Run, binding: Any, slot: dict[str, Any],
                   bad: int, reason: str, value: float) -> TrainState:
        in_a_row = slot["in_a_row"] + 1
        at = run.ring[-1].step + bad  # the step that fired (its number before it ran)
        # the i-th rollback in a row goes i snapshots back, as far as the ring reaches
        keep = max(0, len(run.ring) - in_a_row)
        snapshot = run.ring[keep]
        bundle = None
        if in_a_row > self.give_up_after:
            bundle = self._bundle(run, binding, state, bad, reason, value, at)
        # skipped: the window; going further back, also what was trained since that state
        first = [*run.window[0][1]] if keep == len(run.ring) - 1 else [*snapshot.where]
        del run.ring[keep + 1:]
        _snap.restore(snapshot, state)
        last = [*run.window[-1][1]]
        skipped = {"step": snapshot.step, "at": at, "first": first, "last": last,
                   "reason": reason}
        slot.update(rollbacks=slot["rollbacks"] + 1, in_a_row=in_a_row,
                    history=list(snapshot.history), skipped=[*slot["skipped"], skipped])
        if self.lr_factor is not None:
            slot["cooldown_until"] = snapshot.step + self.lr_steps
        self._forget_losses(state, binding, snapshot.step)
        slots = {**state.slots, **clone_tree(snapshot.slots), self.name: slot}
        new = state.replace(step=snapshot.step, slots=slots)
        context.at_step = snapshot.step
        binding.latest = new
        run.window.clear()
        run.count = torch.tensor(float(slot["rollbacks"]), device=state.device)
        log.warning("with_rollback: %s at step %d; back to step %d, skipping the batches "
                    "from epoch %d batch %d to epoch %d batch %d (rollback %d, %d in a row)",
                    reason, at, snapshot.step, first[0], first[1], last[0], last[1],
                    slot["rollbacks"], in_a_row)
        if in_a_row > self.give_up_after:
            message = (f"with_rollback gave up: the detector fired {in_a_row} times in a row "
                       f"(give_up_after={self.give_up_after}), the last time at step {at}: "
                       f"{reason}. The state went back to step {snapshot.step}, the last "
                       "good one; look at the data around the skipped batches ("
                       f"state.slots[{self.name!r}]['skipped']) or lower the learning rate")
            if bundle is not None:
                message += f"; repro bundle of the failing step: {bundle}"
            error = RollbackError(message)
            error.repro = bundle  # type: ignore[attr-defined]
            run.gave_up = error  # raised at the epoch end the stop below leads to
            new = request_stop(new, "with_rollback gave up")
        return new

    @staticmethod
    def _forget_losses(state: TrainState, binding: Any, step: int) -> None:
        """The dropped steps' losses must not fail the core's deferred non-finite check:
        those still pending are dropped; a record already folded (every FOLD_EVERY steps)
        whose first bad step is a dropped one is cleared (host read: rollbacks only)."""
        keep = [i for i, s in enumerate(binding.pending_steps) if s < step]
        binding.pending = [binding.pending[i] for i in keep]
        binding.pending_steps = [binding.pending_steps[i] for i in keep]
        record = state.slots.get(health.SLOT)
        if record is not None and int(record["step"]) >= step:
            health.clear(state)  # its first bad step is dropped: none before it

    def _bundle(self, run: _Run, binding: Any, state: TrainState, bad: int, reason: str,
                value: float, at: int) -> str | None:
        """The repro bundle of the step that fired: the newest good state run forward
        (directly, pure) over the window's good batches, and the failing batch."""
        info = binding.run
        if info is None or info.capture is None or run.window[bad][2] is None:
            return None
        from ftrain.repro import capture
        try:
            before = _snap.as_state(run.ring[-1], state)
            for _, _, batch in run.window[:bad]:
                before, _ = self.inner(before, batch)
            _, (epoch, index), batch = run.window[bad]
            # worded as train_step(check_finite_every_step=True) raises it, so ft.replay
            # with that step reproduces it
            err = NonFiniteLossError(f"the loss was {value} at step {at}") \
                if not math.isfinite(value) else RollbackError(f"{reason} at step {at}")
            return capture(info.capture[0], before, batch, err, epoch=epoch, index=index,
                           rank=info.rank, world=info.world, limit=info.capture[1])
        except Exception as failed:  # the run's own error must not be hidden by this
            log.error("with_rollback: writing the repro bundle of step %d failed: %s", at,
                      failed)
            return None

    # -- a lower learning rate for a while after a rollback ------------------------------

    def _cooled(self, state: TrainState, run: _Run) -> TrainState:
        """The state the layers inside see: during a cooldown, with the optimizer's
        learning rates scaled (the scaled optimizer is made once per cooldown; states
        leaving this layer carry the one the run was given)."""
        if self.lr_factor is None or state.step >= self._slot(state)["cooldown_until"]:
            return state
        if run.scaled is None or run.scaled[0] is not state.optimizer:
            run.scaled = (state.optimizer, self._scaled(state.optimizer))
        return state.replace(optimizer=run.scaled[1])

    def _scaled(self, optimizer: Any) -> Any:
        if isinstance(optimizer, dict):
            return {k: None if o is None else self._scaled(o) for k, o in optimizer.items()}
        factor = float(self.lr_factor)  # type: ignore[arg-type]
        lrs = group_lrs(optimizer)
        if not lrs:
            raise ConfigError("with_rollback(lr_factor=...) needs an ftrain optimizer with "
                              "an lr setting (ft.optim.*); this one has none to scale")
        return with_group_lrs(optimizer, {k: Scaled(v, factor) if callable(v) else v * factor
                                          for k, v in lrs.items()})


def with_rollback(step: Any, detect: Detector | Sequence[Detector] | None = None, *,
                  keep: int = 2, every_n_steps: int = 10, where: str = "device",
                  give_up_after: int = 3, lr_factor: float | None = None,
                  lr_steps: int = 0, monitor: str = "loss", name: str = "rollback"
                  ) -> WithRollback:
    """Roll back past a NaN or a loss spike: restore the last good state, skip the batches
    that led there, continue.

    `detect` is a detector `(loss, history) -> reason | None` or a list of them (any one
    firing counts): `ft.divergence.nonfinite` (the default) or `ft.divergence.spike(z=...)`
    (a robust z-score over recent losses), or your own. Every `every_n_steps` steps (and at
    epoch ends, before an outer layer saves and at `max_steps`) the losses since the last
    good state are read once and judged; a clean window becomes a good state (a ring of
    `keep`, on the device or `where="host"`). When one fires, the newest good state is put
    back (params, buffers, optimizer state, the slots of the layers inside, `state.step`),
    the window's batches are skipped (recorded in `state.slots[name]["skipped"]`), and
    with `lr_factor` the learning rate is scaled by it for the next `lr_steps` steps. The
    i-th rollback in a row goes i good states back; after `give_up_after` in a row the
    run stops with a `RollbackError` (and a repro bundle where the loop writes them).
    Put it inside the logging and checkpointing layers; under `with_ddp` every rank
    decides on the losses averaged over ranks, so all roll back together.

    Examples:
        >>> import torch, ftrain as ft
        >>> loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> step = ft.with_rollback(ft.train_step(loss), every_n_steps=2)
        >>> data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(6)]
        >>> data[3] = (torch.full((4, 3), float("nan")), torch.randn(4, 1))  # poisoned
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.optim.sgd(0.1))
        >>> state = ft.fit(step, state, data, epochs=1, logger=False, checkpoint=False,
        ...                progress=False)
        >>> state.step, state.slots["rollback"]["skipped"][0]["first"]   # batches 2-3 skipped
        (4, [0, 2])
    """
    return WithRollback(step, detect, keep=keep, every_n_steps=every_n_steps, where=where,
                        give_up_after=give_up_after, lr_factor=lr_factor, lr_steps=lr_steps,
                        monitor=monitor, name=name)
