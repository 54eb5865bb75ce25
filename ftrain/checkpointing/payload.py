"""What a checkpoint holds: the dict `ft.save` writes (`payload`) and the check of the dict
a file gave back (`check_payload`), before anything uses it.

A checkpoint is plain data: tensors and JSON-compatible values only. What a file gives
back is untrusted input: every field's type, the nesting and the absence of cycles are
checked here, and names, shapes and dtypes are compared with the live state later
(`ftrain.checkpointing.file.load`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ftrain.core import health
from ftrain.core.slots import short as _short
from ftrain.core.state import TrainState
from ftrain.errors import CheckpointError, ConfigError

FORMAT = "ftrain.checkpoint"  # the marker in every file: never changes with the layout
VERSION = 1
_FIELDS = ("params", "buffers", "opt_state", "slots", "step", "seed")
_MAX_DEPTH = 100  # far deeper than any state; hostile nesting must not exhaust the stack


def _check_plain(value: Any, where: str) -> None:
    """Only tensors and JSON-compatible values may go into a checkpoint."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(
            value, (bool, int, float, str)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: keys must be strings or ints, got {k!r}")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} is a {type(value).__name__}; a checkpoint holds tensors "
                          "and JSON-compatible values (dict, list, str, int, float, bool, "
                          "None) only")


def _plain_slots(slots: Mapping[str, Any]) -> dict[str, Any]:
    # tuples become lists (torch's safe loader reads both, JSON-style data has lists)
    out = {}
    for name, value in slots.items():
        _check_plain(value, f"slots.{name}")
        out[name] = value
    return out


def payload(state: TrainState, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dict `ft.save` writes (after checking everything in it is plain data).

    Examples:
        >>> import torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1))
        >>> data = payload(state, {"lr": 0.1})
        >>> data["format"], data["version"], data["step"], data["hparams"]
        ('ftrain.checkpoint', 1, 0, {'lr': 0.1})
        >>> check_payload(data, "a.ckpt") is data
        True
    """
    if hparams is not None:
        if not isinstance(hparams, Mapping):
            raise ConfigError(f"hparams must be a dict, got {type(hparams).__name__}")
        _check_plain(dict(hparams), "hparams")
    step, seed = int(state.step), int(state.seed)
    if step < 0:  # a file that `read` would refuse is never written
        raise CheckpointError(f"cannot save this state: step must be an int >= 0, found "
                              f"{step}")
    health.pending_record(state)  # fold in-flight non-finite records into the slot
    return {"format": FORMAT, "version": VERSION, "params": state.params,
            "buffers": state.buffers, "opt_state": state.opt_state, "step": step,
            "seed": seed, "slots": _plain_slots(state.slots),
            "hparams": dict(hparams) if hparams is not None else None,
            "models": sorted(state.model) if state.multi else None}


def check_payload(data: Any, path: str) -> dict[str, Any]:
    """Check the top-level shape of what a checkpoint file held, before anything uses it.

    The format marker and version; `step` an int >= 0, `seed` an int; `params`, `buffers` and
    `opt_state` dicts (of one dict per model when `models` lists them); `slots` a dict
    with str keys; `hparams` None or a dict; `models` None or a list of str; no container
    nested absurdly deep or containing itself. Names, shapes and dtypes are compared with
    the state later (`load`). A CheckpointError names the file, the field, what was
    expected and what was found.

    Examples:
        >>> check_payload({"format": FORMAT, "version": VERSION, "params": {}, "buffers": {},
        ...                "opt_state": {}, "slots": {}, "step": 3.7, "seed": 0}, "a.ckpt")
        Traceback (most recent call last):
        ...
        ftrain.errors.CheckpointError: 'a.ckpt': step must be an int >= 0, found 3.7
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} is not an ftrain checkpoint (no format marker): it "
                              f"holds {_short(data)}")
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an ftrain checkpoint (no format marker "
                              f"{FORMAT!r}; 'format' is {_short(data.get('format'))})")
    version = data.get("version")
    if not _is_int(version):
        raise _malformed(path, "version", "an int (the format version)", version)
    if version != VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format version {version}; this "
                              f"ftrain reads version {VERSION}")
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise CheckpointError(f"{path!r} has no {missing[0]!r} field (a checkpoint has "
                              f"{list(_FIELDS)}; found {_short(list(data))})")
    if not _is_int(data["step"]) or data["step"] < 0:
        raise _malformed(path, "step", "an int >= 0", data["step"])
    if not _is_int(data["seed"]):  # TrainState.create takes any int seed
        raise _malformed(path, "seed", "an int", data["seed"])
    models = data.get("models")
    if models is not None and not (isinstance(models, list)
                                   and all(isinstance(m, str) for m in models)):
        raise _malformed(path, "models", "None or a list of str (model names)", models)
    for field in ("params", "buffers", "opt_state"):
        expected = ("a dict of tensors by name" if field != "opt_state"
                    else "a dict (optimizer state)")
        value = data[field]
        if not isinstance(value, dict):
            raise _malformed(path, field, expected if models is None
                             else f"a dict of models' dicts ({models})", value)
        if models is None:
            if field != "opt_state":
                _check_str_keys(path, field, value)
            continue
        unknown = [k for k in value if k not in models]
        if unknown:
            raise CheckpointError(f"{path!r}: {field} holds model(s) {_short(unknown)} not "
                                  f"listed in models {_short(models)}")
        for name, sub in value.items():
            if not isinstance(sub, dict):
                raise _malformed(path, f"{field}[{name!r}]", expected, sub)
            if field != "opt_state":
                _check_str_keys(path, f"{field}[{name!r}]", sub)
    if not isinstance(data["slots"], dict):
        raise _malformed(path, "slots", "a dict of slots by name", data["slots"])
    _check_str_keys(path, "slots", data["slots"])
    hparams = data.get("hparams")
    if hparams is not None and not isinstance(hparams, dict):
        raise _malformed(path, "hparams", "None or a dict", hparams)
    for field in ("params", "buffers", "opt_state", "slots", "hparams"):
        problem = _nesting_problem(data.get(field))
        if problem is not None:
            raise CheckpointError(f"{path!r}: {field} {problem}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _malformed(path: str, field: str, expected: str, found: Any) -> CheckpointError:
    return CheckpointError(f"{path!r}: {field} must be {expected}, found {_short(found)}")


def _check_str_keys(path: str, field: str, value: dict[Any, Any]) -> None:
    for key in value:
        if not isinstance(key, str):
            raise CheckpointError(f"{path!r}: {field} must have str keys (names), found "
                                  f"{_short(key)}")


def _nesting_problem(value: Any) -> str | None:
    """Whether containers nest deeper than _MAX_DEPTH or contain themselves (a pickle can
    make cycles). Iterative, and each container is walked once (shared ones are fine)."""
    done: set[int] = set()
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(value, 0, False)]
    while stack:
        node, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            done.add(id(node))
            continue
        if not isinstance(node, (dict, list, tuple)) or id(node) in done:
            continue
        if id(node) in on_path:
            return "contains itself (a cycle)"
        if depth >= _MAX_DEPTH:
            return f"is nested more than {_MAX_DEPTH} levels deep"
        on_path.add(id(node))
        stack.append((node, depth, True))
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1, False) for child in children)
    return None
