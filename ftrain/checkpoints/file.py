"""Checkpoints are plain data: `ft.save`, `ft.load`, `ft.load_hparams`.

A checkpoint holds the whole state (params, buffers, optimizer state, step, seed, every
slot, and so the data position) plus hyperparameters and a format version: tensors and
JSON-compatible values only, written with `torch.save` and read with
`torch.load(weights_only=True)`, so nothing in the file is imported or called. Writes are
atomic: a temporary file in the target folder, flushed and fsynced, then renamed over the
target (and the folder fsynced), so a kill at any moment leaves either the old file or the
new one, never a partial file under the target name.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import pickle
import pickletools
import re
import secrets
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ftrain.checkpoints import folders as _folders

from ftrain.core import health
from ftrain.core.slots import clip as _clip
from ftrain.core.slots import short as _short
from ftrain.errors import CheckpointError, ConfigError
from ftrain.core.state import TrainState, parts

FORMAT = "ftrain.checkpoints.file"
VERSION = 1
TMP_PREFIX = _folders.TMP_PREFIX
_FIELDS = ("params", "buffers", "opt_state", "slots", "step", "seed")


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


def atomic_write(path: str, write: Callable[[Any], None], *, prefix: str | None = None
                 ) -> None:
    """Write `path` atomically: temp file in the same folder, fsync, rename, fsync folder.

    A failure to write (a full disk, an I/O error, torch's writer giving up) is a
    CheckpointError naming `path`; the temporary file is removed and a file already at
    `path` is left as it was. The temporary's name starts with `prefix` and ends `.tmp`;
    by default `.tmp-<host>-<pid>-`, so a clean-up can tell a dead writer's leftovers from
    a live one's (`ftrain.checkpoints.folders.remove_stale_temporaries`).
    """
    if prefix is None:
        prefix = _folders.tmp_prefix()
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _create_temporary(folder, prefix)
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)):  # RuntimeError: torch.save's writer
            raise CheckpointError(_write_failure(path, err)) from err
        raise
    fsync_dir(folder)


def _create_temporary(folder: str, prefix: str) -> tuple[int, str]:
    """A new, unique file in `folder`, opened for writing. Created with mode 0o666, so the
    kernel applies the umask exactly as for open(); the umask itself is never read (reading
    it means setting it, which races with other threads creating files)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{prefix}{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", folder)


def _write_failure(path: str, err: BaseException) -> str:
    # torch's writer turns the OSError of a full disk into "unexpected pos": show the OSError
    cause: BaseException | None = err
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, OSError):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    shown = cause if isinstance(cause, OSError) else err
    return (f"{path!r} could not be written ({type(shown).__name__}: {_first_line(shown)}); "
            "nothing was written there: a file already at that path is unchanged")


def fsync_dir(folder: str) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def payload(state: TrainState, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dict `ft.save` writes (after checking everything in it is plain data)."""
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


def save(path: str | os.PathLike[str], state: TrainState,
         hparams: Mapping[str, Any] | None = None) -> str:
    """Write the whole state (and `hparams`) to `path` atomically; return the path.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.adam(1e-3))
        >>> path = ft.save(os.path.join(tempfile.mkdtemp(), "a.ckpt"), state, {"lr": 1e-3})
        >>> ft.load(path, like=state).step, ft.load_hparams(path)
        (0, {'lr': 0.001})
    """
    if not isinstance(state, TrainState):
        raise ConfigError(f"ft.save expects a TrainState, got {type(state).__name__}")
    data = payload(state, hparams)
    path = os.fspath(path)
    atomic_write(path, lambda f: torch.save(data, f))
    return path


def read(path: str | os.PathLike[str], map_location: Any = None, *,
         mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint file safely (weights_only) and check its shape (`check_payload`).

    Every failure is a CheckpointError that names the file and says which of these it is:
    no such file; not a checkpoint at all (what its first bytes look like); truncated or
    damaged; unsafe (it asks to import or call something: never done); a `map_location`
    naming a device that is not available here; malformed contents.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path!r}")
    problem = _device_problem(map_location)
    if problem is not None:
        raise CheckpointError(f"{path!r} cannot be loaded with map_location={map_location!r}: "
                              f"{problem}")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise CheckpointError(f"{path!r} cannot be read: {err}") from err
    if not head.startswith(_ZIP_MAGIC):  # ft.save writes zip archives; nothing else is unpickled
        raise CheckpointError(f"{path!r} is not a checkpoint: {_looks_like(head)} (ft.save "
                              "writes torch's zip format)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        asks = _asks_for_code(path, str(err))
        if asks is not None:
            raise CheckpointError(
                f"{path!r} is not a safe checkpoint: it asks to run or import something "
                f"({asks}), which ftrain never does: nothing in it was imported or "
                "called") from err
        raise CheckpointError(_damaged(path, err)) from err
    except RuntimeError as err:
        if re.search(r"device|data location", str(err), re.IGNORECASE):
            where = (f"map_location={map_location!r}" if map_location is not None
                     else "the devices it was saved from (pass map_location=)")
            raise CheckpointError(f"{path!r} cannot be loaded onto {where}: a device is not "
                                  f"available here ({_first_line(err)})") from err
        raise CheckpointError(_damaged(path, err)) from err
    except Exception as err:  # a damaged archive or pickle fails in many ways: OSError
        raise CheckpointError(_damaged(path, err)) from err  # (EINVAL), KeyError, IndexError...
    return check_payload(data, path)


_ZIP_MAGIC = b"PK\x03\x04"
_MAGIC = [(b"\x1f\x8b", "gzip-compressed data"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
          (b"\x93NUMPY", "a NumPy .npy array"), (b"PK\x05\x06", "an empty zip archive"),
          (b"\x7fELF", "an ELF executable"), (b"GGUF", "a GGUF model file")]
# pickle opcodes that import or call something (torch's safe loader reports them by number)
_CODE_OPCODES = {105: "INST", 111: "OBJ", 129: "NEWOBJ", 130: "EXT1", 131: "EXT2",
                 132: "EXT4", 146: "NEWOBJ_EX", 147: "STACK_GLOBAL"}
# what torch's safe loader says when a pickle asks for a global or a call it does not allow
_ASKS = [(re.compile(r"GLOBAL (\S+) was not an allowed global"), "to import {}"),
         (re.compile(r"unsupported GLOBAL (\S+) whose module"), "to import {}"),
         (re.compile(r"call reduce for unrecognized function (.+?)(?: which belongs|$)",
                     re.MULTILINE), "to call {}"),
         (re.compile(r"create new object .* but got (.+)"), "to create an object of {}"),
         (re.compile(r"Can only build .* but got (.+)"), "to build an object of {}"),
         (re.compile(r"(\S+) must be imported to load"), "for classes of {}")]


def _asks_for_code(path: str, message: str) -> str | None:
    """What a rejected pickle asked to import or call; None if it is merely damaged."""
    for pattern, text in _ASKS:
        m = pattern.search(message)
        if m is not None:
            return text.format(_clip(m.group(1), 120))
    m = re.search(r"Unsupported operand (\d+)", message)
    if m is None:
        return None
    # torch stopped at an opcode it does not read (e.g. protocol 4's FRAME) before any
    # import: look for one in the rest of the stream (parsed, never run)
    allowed = _allowed_globals()
    names = [n for n in _pickle_globals(path) if n not in allowed]
    if names:
        return f"to import {_clip(', '.join(dict.fromkeys(names)), 120)}"
    if int(m.group(1)) in _CODE_OPCODES:
        return f"pickle opcode {_CODE_OPCODES[int(m.group(1))]}, which imports or calls"
    return None


def _pickle_globals(path: str) -> list[str]:
    """The globals (module.name) that a torch archive's data.pkl names, found by parsing
    its first megabyte with pickletools (which imports and calls nothing)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            with z.open(name) as f:
                raw = f.read(1 << 20)
    except Exception:  # only to word the message
        return []
    found: list[str] = []
    strings: list[Any] = []  # what string-pushing (and memo-fetching) opcodes pushed
    memo: dict[int, Any] = {}
    with contextlib.suppress(Exception):  # a damaged stream: what was parsed so far
        for op, arg, _ in pickletools.genops(raw):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                found.append(".".join(str(s) for s in strings[-2:]))
            elif op.name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int):
                memo[arg] = strings[-1] if strings else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(arg, int):
                strings.append(memo.get(arg))
            elif isinstance(arg, str):
                strings.append(arg)
    return found


def _allowed_globals() -> set[str]:
    try:  # private to torch: used only to word a message
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:
        return set()


def _looks_like(head: bytes) -> str:
    """What a file that is no zip archive seems to be, from its first bytes."""
    if not head:
        return "the file is empty"
    if head[0] == 0x80 and len(head) > 1 and head[1] <= 5:
        return (f"a bare pickle (protocol {head[1]}), e.g. a legacy torch file, which ftrain "
                "never unpickles")
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) > 9 and head[8:10] == b'{"':
        return "a safetensors file"
    if head.startswith(b"PK"):
        return (f"a damaged or cut-short zip archive (it starts {head[:8].hex(' ')}, not with "
                "a zip file header)")
    for cut in range(min(4, len(head))):  # the bytes read may end inside a UTF-8 character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(c.isprintable() or c in "\t\r\n" for c in text):
            return f"text starting {text[:40]!r}"
        break
    return f"binary data starting {head[:16].hex(' ')}"


def _damaged(path: str, err: BaseException) -> str:
    """The message for a zip archive torch cannot read: cut short, foreign, or damaged."""
    detail = f"{type(err).__name__}: {_first_line(err)}"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception:  # only to word the message: the archive's directory is unreadable
        return (f"{path!r} is truncated or not a checkpoint: it starts as a zip archive but "
                f"its directory is missing or damaged (cut short while written or copied?) "
                f"({detail})")
    if not any(n.endswith("/data.pkl") for n in names):
        return (f"{path!r} is not a checkpoint: a zip archive without torch's data.pkl "
                f"(it holds {_short(names)})")
    return (f"{path!r} is truncated or not a checkpoint: a torch zip archive whose contents "
            f"are damaged ({detail})")


def _first_line(err: BaseException) -> str:
    """The gist of an error, without torch's advice (such as loading with weights_only=False)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("Weights only load failed.", "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _clip(lines[0] if lines else type(err).__name__, 200)


def _device_problem(location: Any) -> str | None:
    """Why tensors cannot be put where `location` says in this process (None: they can, or
    it is a callable, which torch checks itself)."""
    if isinstance(location, Mapping):
        for value in location.values():
            problem = _device_problem(value)
            if problem is not None:
                return problem
        return None
    if not isinstance(location, (str, torch.device)):
        return None
    try:
        device = torch.device(location)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ConfigError(f"map_location={location!r} is not a device: {err}") from err
    if device.type in ("cpu", "meta"):
        return None
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if callable(available) and not available():
        return (f"device {str(device)!r} is not available here (torch.{device.type}."
                "is_available() is False)")
    count = getattr(module, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        return (f"device {str(device)!r} is not available here (this machine has "
                f"{count()} {device.type} device(s))")
    return None


# -- what a loaded checkpoint must look like ---------------------------------------------

_MAX_DEPTH = 100  # far deeper than any state; hostile nesting must not exhaust the stack


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


def load_hparams(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The hyperparameters stored in a checkpoint ({} if none); tensors are not read.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1))
        >>> path = ft.save(os.path.join(tempfile.mkdtemp(), "m.ckpt"), state, {"width": 2})
        >>> {**ft.load_hparams(path), "width": 4}   # overrides for a rebuilt model
        {'width': 4}
    """
    return dict(read(path, map_location="cpu", mmap=True).get("hparams") or {})


def _flat(tree: Any, root: str) -> dict[str, Any]:
    leaves, _ = pytree.tree_flatten_with_path(tree)
    return {root + pytree.keystr(p): leaf for p, leaf in leaves}


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _compare(kind: str, saved: Any, like: Any, path: str) -> None:
    """Strict: the same tensors by name, shape and dtype; the error names the field."""
    a = {k: v for k, v in _flat(saved, kind).items() if isinstance(v, torch.Tensor)}
    b = {k: v for k, v in _flat(like, kind).items() if isinstance(v, torch.Tensor)}
    missing = [k for k in b if k not in a]
    unknown = [k for k in a if k not in b]
    if missing or unknown:
        raise CheckpointError(f"{path!r} does not fit this state ({kind}): missing "
                              f"{missing[:8]}, unknown {unknown[:8]}; a checkpoint from "
                              "another model or optimizer? (exclude= loads it partially)")
    for key, value in a.items():
        ref = b[key]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise CheckpointError(
                f"{path!r}: {key} is {value.dtype}{list(value.shape)} in the checkpoint, "
                f"{ref.dtype}{list(ref.shape)} in this state")


def _merge(saved: dict[str, Any], like: dict[str, Any], patterns: list[str]) -> dict[str, Any]:
    """Saved tensors, except names matching `patterns`, which keep `like`'s."""
    return {k: (like[k] if _excluded(k, patterns) or k not in saved else saved[k])
            for k in like}


def _patterns_for(patterns: list[str], part: str | None, parts_: list[str]) -> list[str]:
    """The patterns that apply to one model: `"G.fc.*"` to model G as `"fc.*"`; a pattern
    naming no model applies to every model."""
    if part is None:
        return patterns
    out = []
    for p in patterns:
        head = p.split(".", 1)[0]
        if head in parts_:
            if head == part and "." in p:
                out.append(p.split(".", 1)[1])
        else:
            out.append(p)
    return out


def load(path: str | os.PathLike[str], like: TrainState, *,
         exclude: Iterable[str] = (), map_location: Any = None) -> TrainState:
    """Restore a state saved by `ft.save`, strictly, into the shape of `like`.

    Params, buffers and optimizer state must match `like` in names, shapes and dtypes
    (errors name the field); slots come back as saved. `exclude` takes glob patterns of
    parameter/buffer names (`"head.*"`, `"G.fc.weight"` for a multi-model state) that
    keep `like`'s values, with their optimizer state, for fine-tuning, or the names
    `"opt_state"`, `"slots"`, `"step"` for whole fields. Tensors go to `map_location`
    (default: `like`'s device). `like`'s static fields (model, optimizer) are kept.

    Examples:
        >>> import os, tempfile, torch, ftrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
        >>> path = ft.save(os.path.join(tempfile.mkdtemp(), "s.ckpt"), state.replace(step=7))
        >>> ft.load(path, like=state).step
        7
    """
    if not isinstance(like, TrainState):
        raise ConfigError(f"ft.load needs like=<a TrainState of the same model>, got "
                          f"{type(like).__name__}")
    exclude = list(exclude)
    whole = {p for p in exclude if p in ("opt_state", "slots", "step")}
    names = [p for p in exclude if p not in whole]
    data = read(path, map_location=map_location if map_location is not None else like.device)
    saved_models = data.get("models")
    like_models = sorted(like.model) if like.multi else None
    if saved_models != like_models:
        raise CheckpointError(f"{os.fspath(path)!r} holds models {saved_models}, this state "
                              f"{like_models}")
    params: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    opt_state: dict[str, Any] = {}
    used: set[str] = set()
    part_names = list(like.model) if like.multi else []
    where = os.fspath(path)
    for part, _, _optimizer, p_like, b_like, o_like in parts(like):
        p_saved = data["params"] if part is None else data["params"].get(part, {})
        b_saved = data["buffers"] if part is None else data["buffers"].get(part, {})
        o_saved = data["opt_state"] if part is None else data["opt_state"].get(part, {})
        label = "" if part is None else f" of model {part!r}"
        pats = _patterns_for(names, part, part_names)
        tensor_names = set(p_like) | set(p_saved) | set(b_like) | set(b_saved)
        for pat in pats:
            if any(_excluded(n, [pat]) for n in tensor_names):
                used.add(pat)
        keep_p = {k: v for k, v in p_saved.items() if not _excluded(k, pats)}
        keep_b = {k: v for k, v in b_saved.items() if not _excluded(k, pats)}
        _compare("params" + label, keep_p, {k: v for k, v in p_like.items()
                                            if not _excluded(k, pats)}, where)
        _compare("buffers" + label, keep_b, {k: v for k, v in b_like.items()
                                             if not _excluded(k, pats)}, where)
        new_p = _merge(p_saved, p_like, pats)
        new_b = _merge(b_saved, b_like, pats)
        if "opt_state" in whole:
            new_o = o_like
        else:
            excluded = {n for n in set(p_like) | set(p_saved) if _excluded(n, pats)}
            new_o = _restore_opt(o_saved, o_like, excluded, where, label)
        if part is None:
            params, buffers, opt_state = new_p, new_b, new_o
        else:
            params[part], buffers[part], opt_state[part] = new_p, new_b, new_o
    unmatched = [p for p in names
                 if p not in used and not any(p.endswith("." + u) or u == p for u in used)]
    if unmatched:
        raise ConfigError(f"exclude= pattern(s) {unmatched} matched no parameter or buffer "
                          f"name (use names like 'head.*'"
                          + (", or '<model>.head.*'" if like.multi else "") + ")")
    slots = like.slots if "slots" in whole else dict(data["slots"])
    step = like.step if "step" in whole else int(data["step"])
    return like.replace(params=params, buffers=buffers, opt_state=opt_state, slots=slots,
                        step=step, seed=int(data["seed"]))


def _restore_opt(saved: Any, like: Any, excluded: set[str], path: str, label: str) -> Any:
    """Optimizer state: strict, except the per-parameter entries of excluded parameters,
    which keep `like`'s; values that are not tensors (bookkeeping) come from `like`."""
    def drop(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: drop(v) for k, v in tree.items() if k not in excluded}
        return tree

    _compare("opt_state" + label, drop(saved), drop(like), path)

    def merge(s: Any, ref: Any) -> Any:
        if isinstance(ref, dict):
            # only tensors come from the file, and _compare matched them: a saved entry
            # missing or of another kind holds none, so `like`'s bookkeeping stays
            s = s if isinstance(s, dict) else {}
            return {k: (ref[k] if k in excluded or k not in s else merge(s[k], ref[k]))
                    for k in ref}
        if isinstance(ref, torch.Tensor):
            return s
        return ref

    return merge(saved, like)
