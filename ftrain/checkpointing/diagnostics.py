"""What went wrong with a checkpoint file, in words: the messages for a file that cannot be
read (what its first bytes look like, whether it asks to import or call something, whether
it is cut short) or written, and whether a `map_location` names a usable device.

Everything here only words a failure: nothing in a file is imported or called (a pickle is
parsed with `pickletools`, never run).
"""

from __future__ import annotations

import contextlib
import pickletools
import re
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ftrain import storage as _storage
from ftrain.core.slots import clip as _clip
from ftrain.core.slots import short as _short
from ftrain.errors import ConfigError

ZIP_MAGIC = b"PK\x03\x04"  # ft.save writes torch's zip format; nothing else is unpickled
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


def asks_for_code(path: str, message: str) -> str | None:
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
        with _zip(path) as z:
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


@contextlib.contextmanager
def _zip(path: str) -> Iterator[zipfile.ZipFile]:
    """The zip archive at `path` (a local path or a URL), opened to word a message."""
    if not _storage.is_url(path):
        with zipfile.ZipFile(path) as z:
            yield z
        return
    with _storage.open_read(path) as f, zipfile.ZipFile(f) as z:
        yield z


def _allowed_globals() -> set[str]:
    try:  # private to torch: used only to word a message
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:
        return set()


def looks_like(head: bytes) -> str:
    """What a file that is no zip archive seems to be, from its first bytes.

    Examples:
        >>> looks_like(b"")
        'the file is empty'
        >>> looks_like(b"version: 1")
        "text starting 'version: 1'"
    """
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


def damaged(path: str, err: BaseException) -> str:
    """The message for a zip archive torch cannot read: cut short, foreign, or damaged."""
    detail = f"{type(err).__name__}: {first_line(err)}"
    try:
        with _zip(path) as z:
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


def first_line(err: BaseException) -> str:
    """The gist of an error, without torch's advice (such as loading with weights_only=False).

    Examples:
        >>> first_line(RuntimeError("Weights only load failed. WeightsUnpickler error: bad\\nmore"))
        'bad'
    """
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("Weights only load failed.", "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _clip(lines[0] if lines else type(err).__name__, 200)


def device_problem(location: Any) -> str | None:
    """Why tensors cannot be put where `location` says in this process (None: they can, or
    it is a callable, which torch checks itself)."""
    if isinstance(location, Mapping):
        for value in location.values():
            problem = device_problem(value)
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



def write_failure(path: str, err: BaseException) -> str:
    """The message for a checkpoint that could not be written (the old file is unchanged).

    Examples:
        >>> err = RuntimeError("unexpected pos 64")  # how torch's writer reports a full disk
        >>> err.__cause__ = OSError(28, "No space left on device")
        >>> write_failure("a.ckpt", err).split(";")[0]
        "'a.ckpt' could not be written (OSError: [Errno 28] No space left on device)"
    """
    # torch's writer turns the OSError of a full disk into "unexpected pos": show the OSError
    cause: BaseException | None = err
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, OSError):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    shown = cause if isinstance(cause, OSError) else err
    return (f"{path!r} could not be written ({type(shown).__name__}: {first_line(shown)}); "
            "nothing was written there: a file already at that path is unchanged")

