"""Changing an optimizer mid-run: a group's settings, a new group, a new optimizer, and the
optimizer state that carries over (fine-tuning; `TrainState.unfreeze` and friends).

An optimizer is a value, so every change here returns a new one. The optimizer state is
rebuilt by `carry_state`: the new optimizer's fresh `init` for the parameters it trains
now, with the entries of the old state copied in where they still fit, which is what
torch does when a parameter group is added (the new parameters start fresh, the others
keep their moments and step counts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ftrain.errors import ConfigError
from ftrain.optim._core import Groups, Optimizer, Pattern, _pattern_name


def _grouped(optimizer: Any, what: str) -> list[int]:
    """Positions of the transforms with parameter groups (`groups`: a `Groups`)."""
    if not isinstance(optimizer, Optimizer):
        raise ConfigError(f"{what} needs an ft.optim optimizer, got "
                          f"{type(optimizer).__name__}")
    found = [i for i, t in enumerate(optimizer.transforms)
             if isinstance(getattr(t, "groups", None), Groups) and hasattr(t, "check")]
    if not found:
        raise ConfigError(f"{what}: no transform of this optimizer ({list(optimizer.keys)}) "
                          "has parameter groups")
    return found


def _rebuilt(t: Any, base: Mapping[str, Any],
             overrides: Mapping[Pattern, Mapping[str, Any]]) -> Any:
    t.check(dict(base), {p: dict(o) for p, o in overrides.items()})  # each kind's checks
    return attrs.evolve(t, groups=Groups.build(base, overrides))


def add_group(optimizer: Optimizer, patterns: tuple[str, ...],
              settings: Mapping[str, Any]) -> Optimizer:
    """`optimizer` with a new parameter group for `patterns`, ahead of the others (as a
    torch param group added later: its parameters take the new group's settings, the
    base settings for the rest, whatever an older group's pattern says).

    Examples:
        >>> import ftrain as ft
        >>> opt = add_group(ft.optim.adamw(1e-3), ("backbone.*",), {"lr": 1e-4})
        >>> opt.transforms[0].groups.settings(1)["lr"]
        0.0001
    """
    where = _grouped(optimizer, "adding a parameter group")
    transforms = list(optimizer.transforms)
    known: set[str] = set()
    for i in where:
        known.update(transforms[i].groups.base)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"a new parameter group sets {unknown}; this optimizer's settings "
                          f"are {sorted(known)}")
    for i in where:
        t = transforms[i]
        clash = [p for p in patterns if p in dict(t.groups.overrides)]
        if clash:  # the new settings would silently replace that group's own
            raise ConfigError(f"a new parameter group for {clash}: already a group of this "
                              f"optimizer; unfreeze without settings, then change the "
                              f"group with set_hparams({_pattern_name(clash[0])!r}, ...)")
        mine = {k: v for k, v in settings.items() if k in t.groups.base}
        new: dict[Pattern, Mapping[str, Any]] = {p: mine for p in patterns}
        new.update(t.groups.overrides)
        transforms[i] = _rebuilt(t, t.groups.base, new)
    return Optimizer(tuple(transforms))


def set_hparams(optimizer: Optimizer, group: str | None, settings: Mapping[str, Any]
                ) -> Optimizer:
    """`optimizer` with `settings` changed for one group: `None` for the base settings
    (every parameter no group claims), else the group's pattern as it was given.

    Examples:
        >>> import ftrain as ft
        >>> opt = ft.optim.adamw(1e-3, groups={"*.bias": {"weight_decay": 0.0}})
        >>> set_hparams(opt, "*.bias", {"lr": 1e-2}).transforms[0].groups.settings(1)["lr"]
        0.01
    """
    if not settings:
        raise ConfigError("set_hparams needs at least one setting, e.g. lr=1e-4")
    where = _grouped(optimizer, "set_hparams")
    transforms = list(optimizer.transforms)
    labels: list[str] = []
    known: set[str] = set()
    hit = False
    for i in where:
        t = transforms[i]
        known.update(t.groups.base)
        mine = {k: v for k, v in settings.items() if k in t.groups.base}
        overrides = {pat: dict(opts) for pat, opts in t.groups.overrides}
        labels.extend(_pattern_name(p) for p in overrides)
        if group is None:
            if mine:
                transforms[i] = _rebuilt(t, {**t.groups.base, **mine}, overrides)
            hit = True
            continue
        for pat in overrides:
            if _pattern_name(pat) == group:
                overrides[pat] = {**overrides[pat], **mine}
                transforms[i] = _rebuilt(t, t.groups.base, overrides)
                hit = True
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"set_hparams: this optimizer has no setting {unknown}; its "
                          f"settings are {sorted(known)}")
    if not hit:
        raise ConfigError(f"set_hparams: no parameter group {group!r}; the groups are "
                          f"{labels} (group=None changes the base settings)")
    return Optimizer(tuple(transforms))


def _fits(old: Any, new: Any) -> bool:
    if isinstance(new, torch.Tensor):
        return isinstance(old, torch.Tensor) and old.shape == new.shape and \
            old.dtype == new.dtype and old.device == new.device
    return False


def _carry(old: Any, fresh: Any, names: set[str], keep: set[str]) -> Any:
    """`fresh` with `old`'s tensors where they fit: per-parameter entries (dicts keyed by
    parameter name) for the names in `keep`, other tensors (e.g. the update count)
    everywhere; everything else (bookkeeping) stays fresh."""
    if isinstance(fresh, dict):
        if not isinstance(old, dict):
            return fresh
        per_param = bool(fresh) and all(k in names for k in fresh)
        out = {}
        for k, v in fresh.items():
            if per_param and k not in keep:
                out[k] = v
            else:
                out[k] = _carry(old.get(k), v, names, keep) if k in old else v
        return out
    return old if _fits(old, fresh) else fresh


def carry_state(optimizer: Optimizer, params: Mapping[str, torch.Tensor],
                old_state: Mapping[str, Any], keep: set[str],
                previous: Optimizer | None = None) -> dict[str, Any]:
    """The state `optimizer` starts from for `params` (the trainable ones): fresh
    (`optimizer.init`), with `old_state`'s entries kept for the parameters in `keep`
    and the update count kept, per transform that is the same kind at the same place
    in the chain as in `previous` (the old optimizer; None: all kept where they fit).

    Examples:
        >>> import torch, ftrain as ft
        >>> opt = ft.optim.adam(0.1)
        >>> old = opt.init({"a": torch.zeros(2)})
        >>> _ = old["adam"]["exp_avg"]["a"].fill_(1.0); _ = old["count"].fill_(3)
        >>> new = carry_state(opt, {"a": torch.zeros(2), "b": torch.zeros(1)}, old, {"a"})
        >>> new["adam"]["exp_avg"]["a"].tolist(), new["adam"]["exp_avg"]["b"].tolist()
        ([1.0, 1.0], [0.0])
        >>> int(new["count"])
        3
    """
    fresh = optimizer.init(dict(params))
    names = set(params) | {k for sub in old_state.values() if isinstance(sub, dict)
                           for k in _param_keys(sub)}
    out: dict[str, Any] = {"count": _carry(old_state.get("count"), fresh["count"], names,
                                           keep)}
    for i, key in enumerate(optimizer.keys):
        same = previous is None or (
            i < len(previous.transforms) and previous.keys[i] == key
            and type(previous.transforms[i]) is type(optimizer.transforms[i]))
        out[key] = (_carry(old_state.get(key), fresh[key], names, keep)
                    if same and key in old_state else fresh[key])
    return out


def _param_keys(tree: dict[str, Any]) -> set[str]:
    """Names of the per-parameter entries under one transform's state."""
    out: set[str] = set()
    for v in tree.values():
        if isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()):
            out.update(v)
    return out
