"""Changing a run mid-way: which parameters train, and the optimizer that trains them.

The trainable set lives in the state's model skeleton (each meta parameter's
`requires_grad`, as `TrainState.create` took it from the user's module): frozen
parameters get no gradient, no update and no optimizer state. `freeze`, `unfreeze`,
`with_optimizer` and `set_hparams` (the `TrainState` methods call them) return new
states with a new skeleton, a new params dict (the same tensors: a loop sees the new dict
and installs the state again, so its module, DistributedDataParallel wrapper and prepared
update follow the new set) and the optimizer state rebuilt by
`ftrain.optim.regroup.carry_state` (newly trainable parameters start fresh, the others
keep theirs).

Each change is also written, as plain data, to the state's `"finetune"` slot (the frozen
names and a log of the changes), so a checkpoint holds it: `ft.load(path, like=...)`
replays on `like` the changes it has not had yet (e.g. an unfreeze at epoch 3, for a run
resumed at epoch 5 from a freshly built state), before its strict comparison. A change
that is not plain data (a new optimizer, a schedule as a setting) cannot be replayed:
loading then raises and says what to build `like` with.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ftrain.errors import CheckpointError, ConfigError
from ftrain.optim import regroup

if TYPE_CHECKING:  # state.py calls this module: no import back at run time
    from ftrain.core.state import TrainState

SLOT = "finetune"


def parts(state: TrainState) -> list[tuple[str | None, Any, Any, Any, Any, Any]]:
    """(name, template, optimizer, params, buffers, opt_state) per model (as
    `ftrain.core.state.parts`, which imports this module)."""
    if isinstance(state.model, dict):
        return [(n, state.model[n], state.optimizer[n], state.params[n], state.buffers[n],
                 state.opt_state[n]) for n in state.model]
    return [(None, state.model, state.optimizer, state.params, state.buffers,
             state.opt_state)]


def _patterns(patterns: str | Iterable[str], what: str) -> list[str]:
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise ConfigError(f"{what} takes glob patterns over parameter names (a string or a "
                          f"list of strings, e.g. 'backbone.*'), got {patterns!r}")
    return pats


def _names(state: TrainState) -> list[str]:
    """Every parameter name; `<model>.<name>` in a several-model state."""
    return [n if part is None else f"{part}.{n}"
            for part, _, _, params, _, _ in parts(state) for n in params]


def _match(state: TrainState, pats: list[str], what: str) -> set[str]:
    names = _names(state)
    out: set[str] = set()
    for pat in pats:
        hit = {n for n in names if fnmatch.fnmatchcase(n, pat)}
        if not hit:
            shown = ", ".join(names[:16]) + (", ..." if len(names) > 16 else "")
            raise ConfigError(f"{what}: pattern {pat!r} matches no parameter; the "
                              f"parameters are: {shown}")
        out |= hit
    return out


def frozen(state: TrainState) -> list[str]:
    """The names of the parameters that do not train now (sorted).

    Examples:
        >>> import torch, ftrain as ft
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> state = ft.TrainState.create(net, ft.optim.sgd(0.1)).freeze("0.*")
        >>> frozen(state)
        ['0.bias', '0.weight']
    """
    return sorted(n if part is None else f"{part}.{n}"
                  for part, template, _, params, _, _ in parts(state) for n in params
                  if not template.get_parameter(n).requires_grad)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _record(state: TrainState, entry: dict[str, Any]) -> dict[str, Any]:
    old = state.slots.get(SLOT) or {}
    return {"frozen": frozen(state), "log": [*old.get("log", []), entry]}


def _rebuild(state: TrainState, trainable: set[str], optimizers: dict[str | None, Any],
             keep: bool, entry: dict[str, Any]) -> TrainState:
    """The state with `trainable` training under `optimizers` (per model part)."""
    models: dict[str | None, Any] = {}
    new_params: dict[str | None, Any] = {}
    opt_states: dict[str | None, Any] = {}
    for part, template, old_opt, params, _, opt_state in parts(state):
        skeleton = copy.deepcopy(template)  # meta: no weights copied
        prefix = "" if part is None else f"{part}."
        was = {n for n in params if template.get_parameter(n).requires_grad}
        now = {n for n in params if prefix + n in trainable}
        for n in params:
            skeleton.get_parameter(n).requires_grad_(n in now)
        opt = optimizers.get(part, old_opt)
        if opt is None:
            state_now: Any = {}
        else:
            live = {n: t for n, t in params.items() if n in now}
            try:
                state_now = regroup.carry_state(opt, live, opt_state if keep else {},
                                                was & now if keep else set(),
                                                old_opt if keep else None)
            except ConfigError as err:
                raise ConfigError(f"{entry['op']}: with trainable parameters "
                                  f"{sorted(now)[:12]}, the optimizer cannot start: {err}; "
                                  "change the optimizer too (state.with_optimizer)") from err
        models[part], new_params[part], opt_states[part] = skeleton, dict(params), state_now
    state_out = state.replace(
        model=models[None] if not state.multi else {p: models[p] for p in state.model},
        params=new_params[None] if not state.multi else {p: new_params[p] for p in state.model},
        opt_state=opt_states[None] if not state.multi else {p: opt_states[p]
                                                            for p in state.model},
        optimizer=optimizers.get(None, state.optimizer) if not state.multi else {
            p: optimizers.get(p, state.optimizer[p]) for p in state.model})
    state_out.slots[SLOT] = _record(state_out, entry)
    return state_out


def _split(state: TrainState, pats: list[str], what: str) -> dict[str | None, tuple[str, ...]]:
    """Each model part's group patterns: the patterns as given for one model; for several,
    each pattern must name its model (`"G.fc.*"` is pattern `"fc.*"` of model G)."""
    if not state.multi:
        return {None: tuple(pats)}
    out: dict[str | None, tuple[str, ...]] = {}
    for pat in pats:
        head, _, rest = pat.partition(".")
        if head not in state.model or not rest:
            raise ConfigError(f"{what}: in a state of several models a pattern with "
                              f"settings must start with a model name "
                              f"({sorted(state.model)}), e.g. '{next(iter(state.model))}.*';"
                              f" got {pat!r}")
        out[head] = (*out.get(head, ()), rest)
    return out


def freeze(state: TrainState, patterns: str | Iterable[str]) -> TrainState:
    """The state with the parameters matching `patterns` frozen (see `TrainState.freeze`)."""
    pats = _patterns(patterns, "freeze")
    hit = _match(state, pats, "freeze")
    trainable = set(_names(state)) - set(frozen(state)) - hit
    return _rebuild(state, trainable, {}, True, {"op": "freeze", "patterns": pats})


def unfreeze(state: TrainState, patterns: str | Iterable[str], settings: Mapping[str, Any]
             ) -> TrainState:
    """The state with the parameters matching `patterns` trainable (see
    `TrainState.unfreeze`)."""
    pats = _patterns(patterns, "unfreeze")
    hit = _match(state, pats, "unfreeze")
    was = set(_names(state)) - set(frozen(state))
    trainable = was | hit
    optimizers: dict[str | None, Any] = {}
    if settings:
        split = _split(state, pats, "unfreeze")
        if hit & was:  # the new group would change how those already train
            raise ConfigError(f"unfreeze {list(pats)} with settings {sorted(settings)}: "
                              f"the patterns also match parameters that already train "
                              f"({sorted(hit & was)[:5]}); name only the frozen ones")
        for part, group in split.items():
            opt = state.optimizer if part is None else state.optimizer[part]
            if opt is None:
                raise ConfigError(f"unfreeze with settings {sorted(settings)}: "
                                  f"{'the model' if part is None else part} has no optimizer")
            optimizers[part] = regroup.add_group(opt, group, settings)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    entry = {"op": "unfreeze", "patterns": pats, "settings": plain,
             "replayable": _plain(list(settings.values()))}
    if not entry["replayable"]:
        entry["settings"] = {k: (v if _plain(v) else repr(v)) for k, v in plain.items()}
    return _rebuild(state, trainable, optimizers, True, entry)


def set_hparams(state: TrainState, group: str | None, settings: Mapping[str, Any],
                model: str | None = None) -> TrainState:
    """The state with one parameter group's settings changed (see `TrainState.set_hparams`)."""
    part = _part(state, model, "set_hparams")
    opt = state.optimizer if part is None else state.optimizer[part]
    if opt is None:
        raise ConfigError("set_hparams: this state has no optimizer")
    new = regroup.set_hparams(opt, group, settings)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    replayable = _plain(list(settings.values()))
    entry = {"op": "set_hparams", "group": group, "model": part, "replayable": replayable,
             "settings": plain if replayable else {k: repr(v) for k, v in plain.items()}}
    trainable = set(_names(state)) - set(frozen(state))
    return _rebuild(state, trainable, {part: new}, True, entry)


def with_optimizer(state: TrainState, optimizer: Any, keep: bool,
                   model: str | None = None) -> TrainState:
    """The state trained by `optimizer` from now on (see `TrainState.with_optimizer`)."""
    part = _part(state, model, "with_optimizer")
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "keys")):
        raise ConfigError(f"with_optimizer needs an ft.optim optimizer (or None), got "
                          f"{type(optimizer).__name__}")
    entry = {"op": "with_optimizer", "model": part, "keep": keep, "replayable": False,
             "shown": repr(getattr(optimizer, "keys", None))}
    trainable = set(_names(state)) - set(frozen(state))
    return _rebuild(state, trainable, {part: optimizer}, keep, entry)


def _part(state: TrainState, model: str | None, what: str) -> str | None:
    if not state.multi:
        if model is not None:
            raise ConfigError(f"{what}: model={model!r} is for a state of several models; "
                              "this state has one")
        return None
    if model not in state.model:
        raise ConfigError(f"{what}: name the model with model=, one of {sorted(state.model)}; "
                          f"got {model!r}")
    return model


# -- checkpoints: replay on `like` what the saved run changed ------------------------------

def _check_slot(saved: Any, where: str) -> list[dict[str, Any]]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: the {SLOT!r} slot {what}")

    if not isinstance(saved, Mapping):
        raise bad(f"must be a dict, found {type(saved).__name__}")
    log, names = saved.get("log"), saved.get("frozen")
    if not isinstance(log, list) or not all(isinstance(e, Mapping) for e in log):
        raise bad("must hold a list of changes under 'log'")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("must hold a list of parameter names under 'frozen'")
    for e in log:
        op = e.get("op")
        if op not in ("freeze", "unfreeze", "set_hparams", "with_optimizer"):
            raise bad(f"holds an unknown change {op!r}")
        pats = e.get("patterns", [])
        if op in ("freeze", "unfreeze") and not (
                isinstance(pats, list) and pats and all(isinstance(p, str) for p in pats)):
            raise bad(f"holds a {op} without a list of patterns")
        if not isinstance(e.get("settings", {}), Mapping):
            raise bad(f"holds a {op} whose settings are not a dict")
    return [dict(e) for e in log]


def _settings(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in entry.get("settings", {}).items()}


def _replay(like: TrainState, entry: dict[str, Any], where: str) -> TrainState:
    op = entry["op"]
    if not entry.get("replayable", True):
        raise CheckpointError(
            f"{where} was saved after a {op} that cannot be redone from the file "
            f"({ {k: v for k, v in entry.items() if k != 'replayable'} }): build `like` "
            f"with that change made (e.g. like.{op}(...)) before loading")
    if op == "freeze":
        return freeze(like, entry["patterns"])
    if op == "unfreeze":
        return unfreeze(like, entry["patterns"], _settings(entry))
    return set_hparams(like, entry.get("group"), _settings(entry), entry.get("model"))


def restore(like: TrainState, saved: Any, where: str) -> TrainState:
    """`like` with the changes of a saved run's `"finetune"` slot it has not had yet.

    Examples:
        >>> import torch, ftrain as ft
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> like = ft.TrainState.create(net, ft.optim.adam(0.1))
        >>> saved = like.freeze("0.*").slots[SLOT]
        >>> frozen(restore(like, saved, "a.ckpt"))
        ['0.bias', '0.weight']
    """
    if saved is None:
        return like
    log = _check_slot(saved, where)
    mine = (like.slots.get(SLOT) or {}).get("log", [])
    if log[:len(mine)] != mine:
        raise CheckpointError(
            f"{where} was saved after the changes {log} to the trainable parameters or the "
            f"optimizer, and `like` has had {mine}, which are not where that run began: "
            "build `like` as the run began (or with exclude=['slots', 'opt_state'])")
    try:
        for entry in log[len(mine):]:
            like = _replay(like, entry, where)
    except ConfigError as err:
        raise CheckpointError(f"{where}: redoing the run's change to its trainable "
                              f"parameters or optimizer failed: {err}") from err
    if frozen(like) != sorted(saved["frozen"]):
        raise CheckpointError(f"{where} has frozen parameters {sorted(saved['frozen'])[:12]}, "
                              f"this state {frozen(like)[:12]} after redoing the run's "
                              "changes: a checkpoint of another model?")
    return like
