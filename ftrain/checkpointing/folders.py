"""A run's checkpoint folder: its own place, one writer at a time, names it may touch.

Rules kept here (the threat model in docs/checkpoints.md):
- every run gets its own folder (`<root>/checkpoints/version_N`, claimed with an atomic
  `mkdir`), so concurrent runs in one root never share files;
- a folder has at most one writer: an advisory lock (`flock`, released by the kernel when
  the process dies, so a SIGKILLed run leaves no stale lock) whose file names the holder;
- a file name read back from a file (a slot, the index) is untrusted: it must be a bare
  `*.ckpt` name, and only then is it joined to the folder;
- temporaries carry their writer's host and pid, so a clean-up removes only those of a
  writer that is dead (or of this process), never a live run's half-written save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import stat
import time
from typing import Any

from ftrain.core.slots import short
from ftrain.errors import CheckpointError

log = logging.getLogger("ftrain")
SUFFIX = ".ckpt"
LOCK = ".ftrain.lock"
TMP_PREFIX = ".tmp-"
_VERSION = re.compile(r"version_(\d{1,9})")
_MAX_NAME = 255

try:  # POSIX; elsewhere folders are not locked (said once in the docs)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _host() -> str:
    # the host name goes into file names: keep it to safe characters
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def tmp_prefix() -> str:
    """The prefix of this process's temporary files: `.tmp-<host>-<pid>-`."""
    return f"{TMP_PREFIX}{_host()}-{os.getpid()}-"


def bare_name(name: Any, what: str, where: str) -> str:
    """`name` if it is a plain `*.ckpt` file name (no folder part), else a CheckpointError.

    Examples:
        >>> bare_name("3-12.ckpt", "a file", "a slot")
        '3-12.ckpt'
        >>> bare_name("../x.ckpt", "a file", "a slot")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ftrain.errors.CheckpointError: a slot: a file must be a bare *.ckpt file name ...
    """
    ok = (isinstance(name, str) and 0 < len(name) <= _MAX_NAME and name.endswith(SUFFIX)
          and name not in (".", "..") and not name.startswith(TMP_PREFIX)
          and "\x00" not in name and not any(s and s in name for s in
                                             ("/", "\\", os.sep, os.altsep)))
    if not ok:
        raise CheckpointError(f"{where}: {what} must be a bare *{SUFFIX} file name inside the "
                              f"checkpoint folder, got {short(name, 120)}")
    return name  # type: ignore[no-any-return]


def same_folder(a: str, b: str) -> bool:
    """Whether two paths name one folder (symlinks resolved)."""
    return os.path.realpath(a) == os.path.realpath(b)


def own_file(folder: str, name: str) -> str | None:
    """The path of `name` in `folder` if it is a regular file there (not a link), else None."""
    path = os.path.join(folder, name)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not same_folder(os.path.dirname(path), folder):
        return None
    return path


# -- one folder per run ------------------------------------------------------------------

def versions(root: str) -> list[tuple[int, str]]:
    """The `version_N` folders under `root`, as (N, path), newest (highest N) first."""
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    found = []
    for entry in entries:
        m = _VERSION.fullmatch(entry)
        path = os.path.join(root, entry)
        if m and os.path.isdir(path) and not os.path.islink(path):
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def claim_version(root: str) -> str:
    """Create and return the next free `root/version_N`; a concurrent claim of the same N
    fails in `mkdir` (atomic), so each run gets its own folder."""
    try:
        os.makedirs(root, exist_ok=True)
        found = versions(root)
        n = found[0][0] + 1 if found else 0
        while True:
            path = os.path.join(root, f"version_{n}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                n += 1
    except OSError as err:
        raise CheckpointError(f"cannot create a run folder in {root!r}: {err}") from err


# -- one writer per folder ---------------------------------------------------------------

class FolderLock:
    """An exclusive advisory lock on a checkpoint folder, held while a run writes to it.

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> lock = FolderLock.acquire(d)
        >>> FolderLock.acquire(d)
        Traceback (most recent call last):
        ...
        ftrain.errors.CheckpointError: ...is in use by another run (pid ...
        >>> lock.release()
    """

    def __init__(self, folder: str, fd: int | None) -> None:
        self.folder = folder
        self._fd: int | None = fd
        self._pid = os.getpid()

    @classmethod
    def acquire(cls, folder: str) -> FolderLock:
        path = os.path.join(folder, LOCK)
        try:
            os.makedirs(folder, exist_ok=True)
            # never through a link: the lock file is written to (the holder's name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                         | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            raise CheckpointError(f"cannot open the lock file {path!r} of the checkpoint "
                                  f"folder: {err}") from err
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise CheckpointError(f"{path!r} is not a plain file of its own (a link to "
                                  "another file?); remove it to let a run lock the folder")
        if fcntl is None:  # pragma: no cover
            _held.add(fd)
            return cls(folder, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"the checkpoint folder {folder!r} is in use by another run ({holder}); "
                "two runs writing one folder would overwrite each other's checkpoints. "
                "Give this run its own folder (with_checkpointing(step, dirpath) or "
                "root_dir=), or wait for that run to end") from None
        except OSError as err:  # a filesystem without flock (some NFS or Lustre mounts)
            log.warning("cannot lock the checkpoint folder %s (%s): nothing stops another "
                        "run from writing to it at the same time", folder, err)
            os.close(fd)
            return cls(folder, None)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        with contextlib.suppress(OSError):  # who holds it, for the next one's error
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        _held.add(fd)
        return cls(folder, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.getpid() != self._pid or fd not in _held:
            return  # a forked child: its copy was closed at the fork
        _held.discard(fd)
        os.close(fd)  # closing the last descriptor of the open file drops the flock

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


# Descriptors of held locks. A forked child (a DataLoader worker) shares the open file and
# so the flock: it closes its copies at once, so the lock ends when this process drops it.
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 1024, 0)
        info = json.loads(raw.decode())
        return f"pid {int(info['pid'])} on {str(info['host'])[:64]} since {info['since']}"
    except Exception:
        return "pid unknown"


# -- temporaries -------------------------------------------------------------------------

_TMP = re.compile(re.escape(TMP_PREFIX) + r"(.{1,64})-(\d{1,10})-.*\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str) -> None:
    """Delete temporaries a killed save of this host left behind: those of a dead process
    or of this one (never another live writer's, never another host's)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    host, me = _host(), os.getpid()
    for entry in entries:
        m = _TMP.fullmatch(entry)
        if m is None or m.group(1) != host:
            continue
        pid = int(m.group(2))
        if pid == me or not _alive(pid):
            path = own_file(folder, entry)
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            else:  # an unfinished sharded save's folder: only the files such a save writes
                from ftrain.checkpointing.ckptdir import remove

                remove(os.path.join(folder, entry))
