"""Files at a local path or behind an fsspec URL: the small interface checkpoints and logs use.

A *URL* is a path containing "://" other than `file://` (`s3://bucket/run`, `gs://...`,
`memory://...`, chained ones such as `simplecache::s3://...`); `file:///tmp/x` is the local
path `/tmp/x`. For a local path each function here is the plain `os` call, and the
checkpoint code keeps its own `os` calls for what needs more (flock, O_EXCL, fsync,
rename), unchanged. URLs go through fsspec, imported the first time a URL is seen
(`import ftrain` does not import it).

What each store guarantees (docs/checkpoints.md, "Remote storage"):

- `put_atomic`: the bytes go to a temporary key `.tmp-<host>-<pid>-<hex>.tmp` beside the
  target, then `fs.mv` puts them at the target. A local rename (`local://`) is atomic; on
  S3, GCS and Azure a move is a server-side copy then a delete, and the copy creates the
  target object whole or not at all (one object's put is atomic); on `memory://` a copy is
  one dict assignment. A kill leaves the old object or the new one (and perhaps a
  temporary, which never looks like a checkpoint and is removed by a later run).
- `create_exclusive`: `fs.open(path, "xb")`, which S3 (s3fs >= 2024.12, a conditional
  put), GCS (gcsfs), Azure (adlfs), `memory://` and `local://` implement; a backend
  without it falls back to write-then-read-back of a unique token, which two writers
  racing within the same instant can both pass (documented as the weaker guarantee).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import secrets
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeGuard

from ftrain.errors import ConfigError

__all__ = ["claim", "copy_atomic", "create_exclusive", "exists", "filesystem", "is_url",
           "isdir", "isfile", "join", "listdir", "local_path", "makedirs", "mtime",
           "normalize", "open_read", "open_text", "put_atomic", "put_bytes", "read_bytes",
           "remove", "subdirs"]

CLAIM = ".ftrain.claim"  # marks a claimed `version_N` folder on a store without folders
# the package that implements a protocol, for the error when it is missing
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub",
             "sftp": "paramiko", "ssh": "paramiko", "http": "aiohttp", "https": "aiohttp"}


def is_url(path: Any) -> TypeGuard[str]:
    """Whether `path` is an fsspec URL (has "://", and is not a `file://` path).

    Examples:
        >>> is_url("memory://bucket/run"), is_url("runs/x.ckpt"), is_url("file:///tmp/x")
        (True, False, False)
    """
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_path(path: str | os.PathLike[str]) -> str:
    """`path` as a string, with a `file://` prefix removed (a local path, for `os`).

    Examples:
        >>> local_path("file:///tmp/run"), local_path("runs")
        ('/tmp/run', 'runs')
    """
    path = os.fspath(path)
    return path[len("file://"):] if path.startswith("file://") else path


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`; a ConfigError naming the URL and the
    package to install when fsspec or the protocol's implementation is missing.

    Examples:
        >>> fs, path = filesystem("memory://bucket/run")
        >>> type(fs).__name__, path
        ('MemoryFileSystem', '/bucket/run')
    """
    protocol = url.split("://", 1)[0].rsplit("::", 1)[-1]
    try:
        import fsspec.core
    except ImportError as err:
        raise ConfigError(f"{url!r} is a URL, which ftrain reaches through fsspec: install "
                          "it (pip install 'ftrain[remote]')") from err
    try:
        return fsspec.core.url_to_fs(url)  # type: ignore[no-any-return]
    except ImportError as err:
        package = _PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise ConfigError(f"{url!r}: the {protocol}:// protocol needs {package}, which is "
                          f"not installed (pip install {package}): {err}") from err
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{url!r} is not a URL fsspec can open (expected protocol://path "
                          f"with a known protocol, e.g. s3://, gs://, memory://): {err}"
                          ) from err


def join(base: str, *names: str) -> str:
    """`base` joined with `names` by "/" for a URL, by `os.path.join` for a local path.

    Examples:
        >>> join("memory://b/run/", "version_0", "last.ckpt")
        'memory://b/run/version_0/last.ckpt'
    """
    if not is_url(base):
        return os.path.join(base, *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def normalize(path: str) -> str:
    """One spelling per place: a URL as its filesystem writes it back, a local path with
    links resolved (`os.path.realpath`), so two spellings of a folder compare equal.

    Examples:
        >>> normalize("memory://b//run/") == normalize("memory:///b/run")
        True
    """
    if not is_url(path):
        return os.path.realpath(path)
    _, inner = filesystem(path)
    inner = posixpath.normpath(inner) if inner else inner
    return path.split("://", 1)[0] + "://" + inner.rstrip("/")


def _fresh(fs: Any, path: str) -> None:
    # listings are cached by some backends (s3fs): another process's writes must show
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def exists(path: str) -> bool:
    """Whether anything (a file, a folder, a prefix) is at `path`.

    Examples:
        >>> put_bytes("memory://doc-exists/a/x.txt", b"x")
        >>> exists("memory://doc-exists/a"), exists("memory://doc-exists/a/x.txt")
        (True, True)
        >>> exists("/no/such")
        False
    """
    if not is_url(path):
        return os.path.lexists(path)
    fs, inner = filesystem(path)
    _fresh(fs, inner)
    return bool(fs.exists(inner))


def isfile(path: str) -> bool:
    """Whether `path` is a file (an object).

    Examples:
        >>> put_bytes("memory://doc-isfile/a/x.txt", b"x")
        >>> isfile("memory://doc-isfile/a/x.txt"), isfile("memory://doc-isfile/a")
        (True, False)
    """
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = filesystem(path)
    _fresh(fs, inner)
    return bool(fs.isfile(inner))


def isdir(path: str) -> bool:
    """Whether `path` is a folder (a prefix holding objects, on an object store).

    Examples:
        >>> put_bytes("memory://doc-isdir/a/x.txt", b"x")
        >>> isdir("memory://doc-isdir/a"), isdir("memory://doc-isdir/a/x.txt")
        (True, False)
    """
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    _fresh(fs, inner)
    return bool(fs.isdir(inner))


def _entries(path: str) -> list[tuple[str, bool]]:
    """(name, is_folder) of the entries of folder `path` ([] if there is none)."""
    fs, inner = filesystem(path)
    _fresh(fs, inner)
    try:
        found = fs.ls(inner, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for entry in found:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if name and str(entry["name"]).rstrip("/") != inner.rstrip("/"):
            out.append((name, entry.get("type") == "directory"))
    return out


def listdir(path: str) -> list[str]:
    """The names in folder `path` ([] if there is none; a URL's listing is never cached).

    Examples:
        >>> put_bytes("memory://doc-listdir/a/x.txt", b"x")
        >>> listdir("memory://doc-listdir/a"), listdir("memory://doc-listdir/none")
        (['x.txt'], [])
    """
    if not is_url(path):
        try:
            return os.listdir(path)
        except OSError:
            return []
    return [name for name, _ in _entries(path)]


def subdirs(path: str) -> list[str]:
    """The names of the folders in folder `path` (never links, for a local path).

    Examples:
        >>> put_bytes("memory://doc-subdirs/a/x.txt", b"x")
        >>> put_bytes("memory://doc-subdirs/y.txt", b"y")
        >>> subdirs("memory://doc-subdirs")
        ['a']
    """
    if not is_url(path):
        return [e for e in listdir(path) if os.path.isdir(os.path.join(path, e))
                and not os.path.islink(os.path.join(path, e))]
    return [name for name, folder in _entries(path) if folder]


def makedirs(path: str) -> None:
    """Create folder `path` and its parents (a no-op where a store has no folders).

    Examples:
        >>> makedirs("memory://doc-makedirs/b/c"); isdir("memory://doc-makedirs/b/c")
        True
    """
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, inner = filesystem(path)
    fs.makedirs(inner, exist_ok=True)


def open_read(path: str) -> IO[bytes]:
    """`path` opened for reading bytes (a FileNotFoundError if there is no such file).

    Examples:
        >>> put_bytes("memory://doc-open/x.txt", b"x")
        >>> with open_read("memory://doc-open/x.txt") as f:
        ...     f.read()
        b'x'
    """
    if not is_url(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    return fs.open(inner, "rb")  # type: ignore[no-any-return]


def read_bytes(path: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of `path` (so a caller can tell a file over `limit`).

    Examples:
        >>> put_bytes("memory://doc-read/big.txt", b"0123456789")
        >>> read_bytes("memory://doc-read/big.txt", 3)
        b'0123'
    """
    with open_read(path) as f:
        return f.read(limit + 1)


def mtime(path: str) -> float:
    """When `path` was last written (seconds since the epoch; 0.0 if unknown or gone).

    Examples:
        >>> put_bytes("memory://doc-mtime/x.txt", b"x")
        >>> mtime("memory://doc-mtime/x.txt") > 0, mtime("memory://doc-mtime/gone")
        (True, 0.0)
    """
    try:
        if not is_url(path):
            return os.path.getmtime(path)
        fs, inner = filesystem(path)
        return float(fs.modified(inner).timestamp())
    except (OSError, NotImplementedError, AttributeError, KeyError):
        return 0.0


def remove(path: str) -> None:
    """Delete the file `path`; one already gone is fine.

    Examples:
        >>> put_bytes("memory://doc-remove/x.txt", b"x")
        >>> remove("memory://doc-remove/x.txt"); remove("memory://doc-remove/x.txt")
        >>> exists("memory://doc-remove/x.txt")
        False
    """
    if not is_url(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    fs, inner = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(inner)


def _temporary(fs: Any, inner: str, prefix: str) -> str:
    return posixpath.join(posixpath.dirname(inner), f"{prefix}{secrets.token_hex(8)}.tmp")


def put_atomic(url: str, write: Callable[[IO[bytes]], Any], prefix: str) -> None:
    """Write URL `url` whole or not at all: `write(f)` into a temporary key beside it
    (named `<prefix><hex>.tmp`), then `fs.mv` to `url` (see the module's guarantees). On
    any failure the temporary is removed and an object already at `url` is unchanged.

    Examples:
        >>> put_atomic("memory://doc-put/notes.txt", lambda f: f.write(b"hi"), ".tmp-")
        >>> read_bytes("memory://doc-put/notes.txt", 10), listdir("memory://doc-put")
        (b'hi', ['notes.txt'])
    """
    fs, inner = filesystem(url)
    tmp = _temporary(fs, inner, prefix)
    try:
        fs.makedirs(posixpath.dirname(inner), exist_ok=True)
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, inner)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp)
        raise


def put_bytes(url: str, data: bytes) -> None:
    """Write URL `url` with one put of `data`, in place (atomic where one put is: S3, GCS,
    Azure, memory://; for small files such as a lock).

    Examples:
        >>> put_bytes("memory://doc-put-bytes/lock", b"held")
        >>> read_bytes("memory://doc-put-bytes/lock", 9)
        b'held'
    """
    fs, inner = filesystem(url)
    fs.pipe_file(inner, data)


def copy_atomic(src: str, dst: str, prefix: str) -> None:
    """Make URL `dst` a copy of URL `src` (server-side where the store can), whole or not
    at all: copied to a temporary key beside `dst`, then moved there.

    Examples:
        >>> put_bytes("memory://doc-copy/x.txt", b"x")
        >>> copy_atomic("memory://doc-copy/x.txt", "memory://doc-copy/y.txt", ".tmp-")
        >>> listdir("memory://doc-copy")
        ['x.txt', 'y.txt']
    """
    fs, inner_src = filesystem(src)
    _, inner_dst = filesystem(dst)
    tmp = _temporary(fs, inner_dst, prefix)
    try:
        fs.copy(inner_src, tmp)
        fs.mv(tmp, inner_dst)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp)
        raise


def create_exclusive(url: str, data: bytes) -> bool:
    """Create URL `url` holding `data` if nothing is there; False if something is.

    `fs.open(.., "xb")` where the backend has it (atomic on S3, GCS, Azure, memory://);
    elsewhere (and as a check everywhere) the object is read back and must hold `data`,
    which should therefore be unique to the caller (a token).

    Examples:
        >>> lock = "memory://doc-exclusive/lock"
        >>> create_exclusive(lock, b"me"), create_exclusive(lock, b"you")
        (True, False)
    """
    fs, inner = filesystem(url)
    _fresh(fs, inner)
    fs.makedirs(posixpath.dirname(inner), exist_ok=True)
    try:
        with fs.open(inner, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # no "x" mode here: weaker, see the module
        if fs.exists(inner):
            return False
        with fs.open(inner, "wb") as f:
            f.write(data)
    _fresh(fs, inner)
    try:
        with fs.open(inner, "rb") as f:
            return bool(f.read(len(data) + 1) == data)
    except FileNotFoundError:
        return False


def claim(path: str) -> bool:
    """Claim folder `path` for one run: True if this call created it, False if it was
    there. Locally an atomic `os.mkdir`; on a URL, the exclusive creation of a marker
    `path/.ftrain.claim` (folders on object stores exist only through their objects).

    Examples:
        >>> claim("memory://doc-claim/version_0"), claim("memory://doc-claim/version_0")
        (True, False)
    """
    if not is_url(path):
        try:
            os.mkdir(path)
            return True
        except FileExistsError:
            return False
    return create_exclusive(join(path, CLAIM), secrets.token_hex(16).encode())


class _TextOut(io.StringIO):
    """Text for a URL, put there atomically when closed (after what `prefix` held)."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__()
        self.url, self.head = url, prefix

    def close(self) -> None:
        if not self.closed:
            data = (self.head + self.getvalue()).encode("utf-8")
            put_atomic(self.url, lambda f: f.write(data), ".tmp-")
        super().close()


@contextlib.contextmanager
def open_text(path: str, mode: str) -> Iterator[IO[str]]:
    """`path` opened as text ("r", "w" or "a"; newlines untranslated, as csv wants).

    Locally the built-in `open`. On a URL, "r" reads the object; "w" and "a" collect the
    text and put the whole object atomically when the block ends ("a" rewrites it with
    the old text first: object stores have no append), so a reader never sees half.

    Examples:
        >>> with open_text("memory://doc-text/log.txt", "w") as f:
        ...     _ = f.write("a\\n")
        >>> with open_text("memory://doc-text/log.txt", "a") as f:
        ...     _ = f.write("b\\n")
        >>> read_bytes("memory://doc-text/log.txt", 100)
        b'a\\nb\\n'
    """
    if mode not in ("r", "w", "a"):
        raise ConfigError(f"open_text: mode must be 'r', 'w' or 'a', got {mode!r}")
    if not is_url(path):
        with open(path, mode, newline="") as f:
            yield f
        return
    if mode == "r":
        with open_read(path) as raw:
            yield io.StringIO(raw.read().decode("utf-8"), newline="")
        return
    head = ""
    if mode == "a" and isfile(path):
        with open_read(path) as raw:
            head = raw.read().decode("utf-8")
    out = _TextOut(path, head)
    try:
        yield out
    except BaseException:
        super(_TextOut, out).close()  # a failed block writes nothing
        raise
    out.close()
