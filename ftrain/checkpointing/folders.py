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

A folder given as a URL (`s3://`, `memory://`, ...: `ftrain.storage`) keeps these rules
with what a store offers: a run folder is claimed by creating a marker exclusively, the
lock is an object created exclusively and kept fresh by its holder (`RemoteLock`), and
temporaries of other hosts are removed only once a day old.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from typing import Any

from ftrain import storage as _storage
from ftrain.core.slots import clip, short
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
    """Whether two paths name one folder (symlinks resolved; URLs as their store spells
    them; a URL and a local path never do)."""
    if _storage.is_url(a) or _storage.is_url(b):
        return _storage.is_url(a) == _storage.is_url(b) and \
            _storage.normalize(a) == _storage.normalize(b)
    return os.path.realpath(a) == os.path.realpath(b)


def own_file(folder: str, name: str) -> str | None:
    """The path of `name` in `folder` if it is a regular file there (not a link), else None."""
    if _storage.is_url(folder):  # an object store has no links
        path = _storage.join(folder, name)
        return path if _storage.isfile(path) else None
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
    if _storage.is_url(root):
        return sorted(((int(m.group(1)), _storage.join(root, e))
                       for e in _storage.subdirs(root) if (m := _VERSION.fullmatch(e))),
                      reverse=True)
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
    if _storage.is_url(root):  # the exclusive creation of a marker claims the number
        try:
            found = versions(root)
            n = found[0][0] + 1 if found else 0
            while not _storage.claim(_storage.join(root, f"version_{n}")):
                n += 1
            return _storage.join(root, f"version_{n}")
        except OSError as err:
            raise CheckpointError(f"cannot create a run folder in {root!r}: {err}") from err
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
        if _storage.is_url(folder):  # an object, created exclusively
            return RemoteLock.acquire(folder)
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


# -- one writer per folder behind a URL --------------------------------------------------

BEAT_EVERY = 30.0  # seconds between refreshes of a held lock on a URL
STALE_AFTER = 300.0  # a lock on a URL not refreshed for this long is a dead run's
TAKEOVER_SETTLE = 1.0  # seconds a run that took over a stale lock waits, then checks it


class RemoteLock(FolderLock):
    """The lock of a checkpoint folder behind a URL: an object `.ftrain.lock` created
    exclusively (`ftrain.storage.create_exclusive`), naming its holder (pid, host, a
    token). A store cannot release it when its holder dies, as the kernel drops a flock,
    so the holder rewrites it every `BEAT_EVERY` seconds from a thread, and a lock is
    taken over when its holder is a dead process of this host, or when it has not been
    refreshed for `STALE_AFTER` seconds (a run killed on another machine). Released by
    deleting it.

    Examples:
        >>> lock = FolderLock.acquire("memory://doc-lock/run")
        >>> FolderLock.acquire("memory://doc-lock/run")
        Traceback (most recent call last):
        ...
        ftrain.errors.CheckpointError: ...is in use by another run (pid ...
        >>> lock.release()
    """

    def __init__(self, folder: str, token: str) -> None:
        super().__init__(folder, None)
        self.path = _storage.join(folder, LOCK)
        self.token: str | None = token
        self._stop = threading.Event()
        # the thread holds no reference to the lock: a lock dropped unreleased is collected
        # (and released by __del__) as a local one is
        self._beat = threading.Thread(target=_keep_fresh, args=(
            self.path, token, folder, self._stop), daemon=True, name="ftrain-lock-beat")

    @classmethod
    def acquire(cls, folder: str) -> RemoteLock:
        path, token = _storage.join(folder, LOCK), secrets.token_hex(16)
        try:
            took_over = False
            for _ in range(3):  # a stale lock removed, or one that vanished: try again
                if _storage.create_exclusive(path, _lock_info(token)):
                    if took_over and not _still_ours(path, token):
                        continue  # a run taking over the same stale lock removed ours
                    lock = cls(folder, token)
                    lock._beat.start()
                    return lock
                holder, age = _remote_holder(path)
                if holder is None and age is None:
                    continue  # released meanwhile
                if not _stale(holder, age):
                    raise CheckpointError(
                        f"the checkpoint folder {folder!r} is in use by another run "
                        f"({_describe(holder)}); two runs writing one folder would "
                        "overwrite each other's checkpoints. Give this run its own folder, "
                        f"or wait for that run to end (a lock not refreshed for "
                        f"{STALE_AFTER:.0f} s is taken over)")
                if _remote_holder(path)[0] == holder:  # not taken over by another meanwhile
                    log.warning("taking over the lock of %s from a run that is gone (%s)",
                                folder, _describe(holder))
                    _storage.remove(path)
                    took_over = True
        except OSError as err:
            raise CheckpointError(f"cannot lock the checkpoint folder {folder!r}: "
                                  f"{err}") from err
        raise CheckpointError(f"cannot lock the checkpoint folder {folder!r}: other runs "
                              "kept taking its lock")

    @property
    def held(self) -> bool:
        return self.token is not None

    def release(self) -> None:
        token, self.token = self.token, None
        if token is None or os.getpid() != self._pid:
            return  # released already, or a forked child: the parent holds it
        self._stop.set()
        with contextlib.suppress(Exception):
            holder, _ = _remote_holder(self.path)
            if holder is not None and holder.get("token") == token:  # never another's
                _storage.remove(self.path)


def _keep_fresh(path: str, token: str, folder: str, stop: threading.Event) -> None:
    """The holder's beat: rewrite the lock (one put, in place) every BEAT_EVERY s."""
    while not stop.wait(BEAT_EVERY):
        try:
            holder, _ = _remote_holder(path)
            if stop.is_set():
                return
            if holder is None or holder.get("token") != token:
                log.error("the lock of %s was taken over by another run (%s): this run no "
                          "longer owns the folder", folder, _describe(holder))
                return
            _storage.put_bytes(path, _lock_info(token))
        except Exception as err:  # a network hiccup: the next beat tries again
            log.warning("cannot refresh the lock of %s: %s", folder, err)


def _still_ours(path: str, token: str) -> bool:
    """After taking over a stale lock: two runs that found it stale together may each
    remove the other's new lock (read, then delete, is not atomic on a store); after a
    pause, only the run whose token is there keeps it."""
    time.sleep(TAKEOVER_SETTLE)
    holder, _ = _remote_holder(path)
    return holder is not None and holder.get("token") == token


def _lock_info(token: str) -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "beat": time.time()}).encode()


def _remote_holder(path: str) -> tuple[dict[str, Any] | None, float | None]:
    """(what the lock object says, or None if unreadable; seconds since it was written,
    or None if it is gone). Its content is untrusted: only checked fields are used."""
    try:
        raw = _storage.read_bytes(path, 4096)
    except FileNotFoundError:
        return None, None
    written = _storage.mtime(path)
    age = time.time() - written if written > 0 else 0.0
    try:
        info = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, age
    if not isinstance(info, dict):
        return None, age
    beat = info.get("beat")
    if written <= 0 and isinstance(beat, (int, float)) and not isinstance(beat, bool):
        age = time.time() - float(beat)  # the store keeps no time: the holder's word
    return info, age


def _stale(holder: dict[str, Any] | None, age: float | None) -> bool:
    """A dead process of this host holds it, or nobody refreshed it for STALE_AFTER."""
    if holder is not None and holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid != os.getpid() \
                and not _alive(pid):
            return True
    return age is not None and age > STALE_AFTER


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "holder unknown"

    def text(key: str, limit: int) -> str:  # untrusted: a plain string, bounded
        value = holder.get(key)
        return clip(value, limit) if isinstance(value, str) else short(value, limit)

    return f"pid {short(holder.get('pid'), 20)} on {text('host', 64)} since {text('since', 32)}"


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
    or of this one (never another live writer's, never another host's; on a URL, another
    host's once they are a day old: a run restarted elsewhere would never see them go)."""
    if _storage.is_url(folder):
        _remove_stale_url(folder)
        return
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


TMP_STALE_AFTER = 24 * 3600.0  # seconds: another host's temporary on a URL is a dead one's


def _remove_stale_url(folder: str) -> None:
    host, me, now = _host(), os.getpid(), time.time()
    for entry in _storage.listdir(folder):
        m = _TMP.fullmatch(entry)
        if m is None:
            continue
        path = _storage.join(folder, entry)
        if m.group(1) == host:
            stale = int(m.group(2)) == me or not _alive(int(m.group(2)))
        else:
            stale = 0.0 < _storage.mtime(path) < now - TMP_STALE_AFTER
        if stale:
            with contextlib.suppress(OSError):
                _storage.remove(path)
