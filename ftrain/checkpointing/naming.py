"""The file names of checkpoints: a format string over `epoch`, `step` and metrics.

`with_checkpointing(filename="{epoch:02d}-{val_loss:.2f}")` renders a name per save; a
rendered name never makes folders, and never replaces a file already there or one the
layer keeps (it gets a `-v1`, `-v2`, ... suffix instead).
"""

from __future__ import annotations

import os
import string
from collections.abc import Collection, Mapping

from ftrain import storage as _storage
from ftrain.checkpointing import folders as _folders
from ftrain.checkpointing.folders import SUFFIX
from ftrain.errors import CheckpointError, ConfigError

__all__ = ["render", "safe_name", "template_fields", "unique_name"]


def template_fields(template: str) -> list[str]:
    """The field names a file-name template reads (a ValueError if it is malformed).

    Examples:
        >>> template_fields("{epoch:02d}-{val_loss:.2f}")
        ['epoch', 'val_loss']
    """
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def safe_name(name: str) -> str:
    """A rendered filename never creates folders: separators become underscores.

    Examples:
        >>> safe_name("val/acc=0.9")
        'val_acc=0.9'
    """
    for sep in {"/", "\\", os.sep}:
        name = name.replace(sep, "_")
    return name


def render(template: str, epoch: int, step: int, values: Mapping[str, float]) -> str:
    """The name (without `.ckpt`) `template` gives a save at `epoch` and `step`.

    Examples:
        >>> render("{epoch:02d}-{val_loss:.2f}", 3, 120, {"val_loss": 0.25})
        '03-0.25'
        >>> render("{acc}", 0, 1, {})
        Traceback (most recent call last):
        ftrain.errors.ConfigError: cannot render filename '{acc}': 'acc'
    """
    try:
        return safe_name(template.format(epoch=epoch, step=step, **values))
    except (KeyError, ValueError, IndexError) as err:
        raise ConfigError(f"cannot render filename {template!r}: {err}") from err


def unique_name(name: str, taken: Collection[str], folder: str, template: str) -> str:
    """`name` + `.ckpt`, or with a `-vN` suffix if that is in `taken` or in `folder`;
    checked to be a bare file name (`template` is named in the error if not).

    Examples:
        >>> import tempfile
        >>> unique_name("best", {"best.ckpt", "last.ckpt"}, tempfile.mkdtemp(), "best")
        'best-v1.ckpt'
    """
    candidate, n = name + SUFFIX, 0
    while candidate in taken or _storage.exists(_storage.join(folder, candidate)):
        n += 1
        candidate = f"{name}-v{n}{SUFFIX}"
    try:
        return _folders.bare_name(candidate, "a rendered file name", "with_checkpointing")
    except CheckpointError as err:
        raise ConfigError(f"filename {template!r} renders {candidate!r}, which "
                          f"cannot be a checkpoint's name: {err}") from None
