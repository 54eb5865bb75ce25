"""The index `checkpoints.json` of a checkpoint folder, and the bookkeeping it holds.

`with_checkpointing` writes the index after each save, naming the best and the last
checkpoint and every kept one. Everything read back (the index, or a layer's slot in a
restored state) is untrusted input, checked field by field by `check_slot`.
`checkpoints(dirpath)` reads an index; `latest_valid(dirpath)` finds the checkpoint a
resume continues from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, NoReturn

import attrs

from ftrain import storage as _storage
from ftrain.checkpointing import ckptdir as _ckptdir
from ftrain.checkpointing import folders as _folders
from ftrain.checkpointing.file import read
from ftrain.checkpointing.folders import SUFFIX, TMP_PREFIX
from ftrain.core import slots as _slots
from ftrain.errors import CheckpointError

__all__ = ["INDEX", "LAST", "CheckpointIndex", "check_slot", "checkpoints", "continues",
           "index_json", "latest_valid", "read_index"]

INDEX = "checkpoints.json"
LAST = "last.ckpt"
_INDEX_LIMIT = 16 * 1024 * 1024  # an index of thousands of entries is well under this
_MAX_ENTRIES = 100_000
_RUN_ID = re.compile(r"[0-9a-f]{32}")


@attrs.frozen
class CheckpointIndex:
    """What `checkpoints.json` says: the best and last checkpoint, and all kept ones."""

    dirpath: str
    best: str | None
    last: str | None
    monitor: str | None
    mode: str
    best_score: float | None
    saved: list[dict[str, Any]]


def read_index(dirpath: str) -> dict[str, Any] | None:
    """The index of `dirpath` as checked plain data, None if there is none; anything in
    it that is not what a checkpointing layer writes is a CheckpointError.

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> read_index(d) is None
        True
        >>> with open(os.path.join(d, INDEX), "w") as f:
        ...     _ = f.write('{"best": "../escape.ckpt"}')
        >>> read_index(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ftrain.errors.CheckpointError: the index ...
    """
    path = _storage.join(dirpath, INDEX)
    try:
        raw = _storage.read_bytes(path, _INDEX_LIMIT)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CheckpointError(f"cannot read the checkpoint index {path!r}: {err}") from err
    if len(raw) > _INDEX_LIMIT:
        raise CheckpointError(f"{path!r} is over {_INDEX_LIMIT} bytes: not an index this "
                              "library wrote")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path!r} is not a valid index: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} is not a valid index: expected a JSON object, "
                              f"found {type(data).__name__}")
    return check_slot(data, f"the index {path!r}")


def checkpoints(dirpath: str | os.PathLike[str]) -> CheckpointIndex:
    """Read the index of a checkpoint folder written by `with_checkpointing`.

    Given a folder of runs (`<root_dir>/checkpoints`, which holds one `version_N` folder
    per run), it reads the newest run's index. File names in the index are checked: each
    must be a bare name inside the folder.

    Examples:
        >>> import tempfile, torch, ftrain as ft
        >>> d = tempfile.mkdtemp()
        >>> step = ft.with_checkpointing(
        ...     ft.train_step(lambda m, b: m(b).pow(2).mean()), d, filename="{epoch}")
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> _ = ft.fit(step, state, [torch.randn(4, 2)], epochs=2, logger=False, progress=False)
        >>> index = ft.checkpoints(d)
        >>> os.path.basename(index.best), os.path.basename(index.last)
        ('1.ckpt', 'last.ckpt')
    """
    dirpath = _storage.local_path(dirpath)
    data = read_index(dirpath)
    if data is None:
        for _, run in _folders.versions(dirpath):
            data = read_index(run)
            if data is not None:
                dirpath = run
                break
    if data is None:
        raise CheckpointError(f"no checkpoint index {INDEX} in {dirpath!r} (nor in a "
                              "version_N run folder inside it)")

    def full(name: str | None) -> str | None:
        return _storage.join(dirpath, name) if name else None

    return CheckpointIndex(
        dirpath=dirpath, best=full(data["best"]), last=full(data["last"]),
        monitor=data["monitor"], mode=data["mode"], best_score=data["best_score"],
        saved=[{**s, "path": full(s["file"])} for s in data["saved"]])


def continues(slot: Mapping[str, Any], folder: str) -> bool:
    """Whether `slot` (checked by `check_slot`) is `folder`'s own bookkeeping: written in
    that folder by the run the folder's index names, at the newest save there (an older
    checkpoint of that run continued here would overwrite what came after it). Only then
    may the files it lists be deleted.

    Examples:
        >>> import tempfile
        >>> continues(check_slot({"dir": None}, "a slot"), tempfile.mkdtemp())
        False
    """
    if slot["run"] is None or slot["dir"] is None or not _folders.same_folder(
            slot["dir"], folder):
        return False
    try:
        index = read_index(folder)
    except CheckpointError:
        return False
    return index is not None and index["run"] == slot["run"] and \
        index["last_step"] == slot["last_step"]


def latest_valid(dirpath: str) -> str | None:
    """The newest checkpoint in `dirpath` that loads (for `resume="auto"`), or None when
    the folder holds no checkpoint file at all.

    The index's `last` (the newest save of the run that wrote it) comes first; without a
    usable index, the most recently written `*.ckpt`. Temporary files of an interrupted
    save never match; each candidate is opened (memory-mapped, tensors not read) and
    skipped if it is truncated or not a checkpoint. Checkpoint files present but none
    readable is a CheckpointError naming each file and why: resuming must never start
    fresh over them (and then overwrite them).

    Examples:
        >>> import tempfile
        >>> latest_valid(tempfile.mkdtemp()) is None  # no checkpoint: start fresh
        True
    """
    dirpath = _storage.local_path(dirpath)
    if not _storage.isdir(dirpath):
        return None
    problems: dict[str, str] = {}

    def loads(path: str) -> bool:
        try:
            read(path, map_location="cpu", mmap=True)
            return True
        except CheckpointError as err:
            problems[path.rsplit("/", 1)[-1] if _storage.is_url(path)
                     else os.path.basename(path)] = str(err)
            return False

    try:
        index = read_index(dirpath)
    except CheckpointError as err:
        problems[INDEX] = str(err)
        index = None
    if index is not None and index["last"] is not None:
        last = _own(dirpath, index["last"])
        if last is not None and loads(last):
            return last
    candidates = sorted(
        (_mtime(path), path) for path in (
            _own(dirpath, e) for e in (_storage.listdir(dirpath) if _storage.is_url(dirpath)
                                       else os.listdir(dirpath))
            if e.endswith(SUFFIX) and not e.startswith(TMP_PREFIX))
        if path is not None)
    for _, path in reversed(candidates):
        if loads(path):
            return path
    if candidates:
        shown = "\n".join(f"  {name}: {why}" for name, why in sorted(problems.items()))
        raise CheckpointError(
            f"{dirpath!r} holds checkpoint files but none can be read, so a resume "
            f"cannot continue from them (nothing was overwritten):\n{shown}\nMove them "
            "away to start fresh, or resume from a readable file with resume=<path>")
    return None


def _own(folder: str, name: str) -> str | None:
    """A checkpoint file, or a sharded checkpoint's folder, of `folder` (never a link)."""
    return _folders.own_file(folder, name) or _ckptdir.own_dir(folder, name)


def _mtime(path: str) -> float:
    # 0.0 if deleted meanwhile (a live run's top k): it sorts first, then fails
    return _storage.mtime(path)


def check_slot(slot: Any, where: str) -> dict[str, Any]:
    """A checkpointing slot (or index) read back from a file, checked field by field.

    Everything in it is untrusted input: file names must be bare `*.ckpt` names, counts
    ints, scores numbers. Returns a normalized copy; errors name the field.

    Examples:
        >>> check_slot({"best": "3.ckpt", "best_score": 1}, "a slot")["best_score"]
        1.0
        >>> check_slot({"saved": [{"file": "a.ckpt", "step": -1, "epoch": 0}]}, "a slot")
        Traceback (most recent call last):
        ftrain.errors.CheckpointError: a slot: saved[0].step must be an int >= 0, found -1
    """
    if not isinstance(slot, Mapping):
        raise CheckpointError(f"{where}: expected a dict, found {type(slot).__name__}")

    def fail(field: str, expected: str, value: Any) -> NoReturn:
        raise CheckpointError(f"{where}: {field} must be {expected}, found "
                              f"{_slots.short(value, 120)}")

    def count(field: str, value: Any, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            fail(field, "an int >= 0" + (" or None" if optional else ""), value)
        return int(value)

    def score(field: str, value: Any) -> float | None:
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail(field, "a number or None", value)
        return float(value)

    def name(field: str, value: Any) -> str | None:
        return None if value is None else _folders.bare_name(value, field, where)

    def text(field: str, value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or len(value) > 4096):
            fail(field, "a string or None", value)
        return value  # type: ignore[no-any-return]

    saved_raw = slot.get("saved", [])
    if not isinstance(saved_raw, list) or len(saved_raw) > _MAX_ENTRIES:
        fail("saved", f"a list of at most {_MAX_ENTRIES} entries", saved_raw)
    saved = []
    for i, entry in enumerate(saved_raw):
        if not isinstance(entry, Mapping):
            fail(f"saved[{i}]", "a dict", entry)
        saved.append({"file": _folders.bare_name(entry.get("file"), f"saved[{i}].file",
                                                 where),
                      "score": score(f"saved[{i}].score", entry.get("score")),
                      "step": count(f"saved[{i}].step", entry.get("step")),
                      "epoch": count(f"saved[{i}].epoch", entry.get("epoch"))})
    mode = slot.get("mode", "min")
    if mode not in ("min", "max"):
        fail("mode", "'min' or 'max'", mode)
    last = name("last", slot.get("last"))
    if last not in (None, LAST):
        fail("last", f"{LAST!r} or None", last)
    run_id = text("run", slot.get("run"))
    if run_id is not None and not _RUN_ID.fullmatch(run_id):
        fail("run", "a run id (32 hex digits)", run_id)
    return {"saved": saved, "best": name("best", slot.get("best")),
            "best_score": score("best_score", slot.get("best_score")), "last": last,
            "last_step": count("last_step", slot.get("last_step"), optional=True),
            "monitor": text("monitor", slot.get("monitor")), "mode": mode,
            "dir": text("dir", slot.get("dir")), "run": run_id}


def index_json(slot: Mapping[str, Any], monitor: str | None, mode: str) -> bytes:
    """The bytes of `checkpoints.json` for a checkpointing slot (what `read_index` reads).

    Examples:
        >>> slot = check_slot({"saved": [{"file": "0.ckpt", "step": 1, "epoch": 0}],
        ...                    "best": "0.ckpt", "last": "last.ckpt"}, "a slot")
        >>> json.loads(index_json(slot, None, "min"))["best"]
        '0.ckpt'
    """
    index = {"best": slot["best"], "best_score": slot["best_score"], "last": slot["last"],
             "monitor": monitor, "mode": mode, "saved": slot["saved"],
             "last_step": slot.get("last_step"), "dir": slot.get("dir"), "run": slot.get("run")}
    return json.dumps(index, indent=2).encode()
