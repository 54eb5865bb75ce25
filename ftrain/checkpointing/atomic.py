"""Atomic writes: a temporary file in the target folder, flushed and fsynced, then renamed
over the target (and the folder fsynced).

A kill at any moment leaves either the old file or the new one, never a partial file under
the target name; a failed write removes its temporary and leaves the old file as it was.
A URL (`s3://`, `memory://`, ...) is written by `ftrain.storage.put_atomic`: a temporary key
beside the target, then a move (no fsync: the store makes the object durable).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from typing import Any

from ftrain import storage as _storage
from ftrain.checkpointing import folders as _folders
from ftrain.checkpointing.diagnostics import write_failure
from ftrain.errors import CheckpointError, FTrainError


def atomic_write(path: str, write: Callable[[Any], None], *, prefix: str | None = None
                 ) -> None:
    """Write `path` atomically: temp file in the same folder, fsync, rename, fsync folder.

    A failure to write (a full disk, an I/O error, torch's writer giving up) is a
    CheckpointError naming `path`; the temporary file is removed and a file already at
    `path` is left as it was. The temporary's name starts with `prefix` and ends `.tmp`;
    by default `.tmp-<host>-<pid>-`, so a clean-up can tell a dead writer's leftovers from
    a live one's (`ftrain.checkpointing.folders.remove_stale_temporaries`).

    Examples:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> path = os.path.join(folder, "notes.txt")
        >>> atomic_write(path, lambda f: f.write(b"hello"))
        >>> open(path, "rb").read(), os.listdir(folder)
        (b'hello', ['notes.txt'])
    """
    if prefix is None:
        prefix = _folders.tmp_prefix()
    if _storage.is_url(path):
        _write_url(path, write, prefix)
        return
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
            raise CheckpointError(write_failure(path, err)) from err
        raise
    fsync_dir(folder)


def _write_url(url: str, write: Callable[[Any], None], prefix: str) -> None:
    try:
        _storage.put_atomic(url, write, prefix)
    except FTrainError:  # a missing fsspec implementation, said as such
        raise
    except Exception as err:  # a store reports failures its own way (botocore, aiohttp)
        raise CheckpointError(write_failure(url, err)) from err


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


def fsync_dir(folder: str) -> None:
    """Make a folder's entries (a rename, a removal) durable; best effort: a folder that
    cannot be opened or fsynced (some filesystems) is skipped silently.

    Examples:
        >>> import tempfile
        >>> fsync_dir(tempfile.mkdtemp())
        >>> fsync_dir("/no/such/folder")   # nothing to make durable: no error
    """
    if _storage.is_url(folder):  # a store's objects are durable once written
        return
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
