"""`ft.Data`: the train/val/test/predict data of an experiment in one record.

The functional counterpart of Lightning's `LightningDataModule`: each split is data (a
DataLoader, a list of batches) or a zero-argument factory that builds it; `prepare` runs
once per machine (download, unpack: on local rank 0, the other local ranks wait) and
`setup` once per process, both before the first split is built. `ft.fit`,
`ft.evaluate`, `ft.predict` and `ft.with_validation` accept a `Data` and take the split
they need; a factory is called once and its result kept. The `val` split may hold several
validation sets for `ft.with_validation`: a dict name -> data, or a list of DataLoaders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ftrain.errors import ConfigError, DataError

SPLITS = ("train", "val", "test", "predict")


@attrs.define(eq=False)
class Data:
    """Train/val/test/predict data (or factories) plus optional `prepare` and `setup`.

    Examples:
        >>> import torch, ftrain as ft
        >>> calls = []
        >>> data = ft.Data(train=lambda: [(torch.randn(4, 3), torch.randn(4, 1))],
        ...                setup=lambda: calls.append("setup"))
        >>> batches = data.split("train")
        >>> len(batches), calls
        (1, ['setup'])
    """

    train: Any = None
    val: Any = None
    test: Any = None
    predict: Any = None
    prepare: Callable[[], Any] | None = None
    setup: Callable[[], Any] | None = None
    _built: dict[str, Any] = attrs.field(factory=dict, init=False, repr=False)
    _ready: bool = attrs.field(default=False, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        for name in ("prepare", "setup"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ConfigError(f"ft.Data: {name} must be a function of no arguments, got "
                                  f"{type(hook).__name__}")
        if all(getattr(self, s) is None for s in SPLITS):
            raise ConfigError("ft.Data needs at least one of train=, val=, test=, predict=")

    def _hooks(self) -> None:
        if self._ready:
            return
        if self.prepare is not None:
            # once per machine: local rank 0 prepares, the other local ranks wait for it
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                self.prepare()
            from ftrain.parallel.dist import barrier
            barrier()
        if self.setup is not None:
            self.setup()
        self._ready = True

    def has(self, name: str) -> bool:
        """Whether the split `name` was given."""
        return getattr(self, name) is not None

    def given(self) -> list[str]:
        """The splits given, in order.

        Examples:
            >>> import ftrain as ft
            >>> ft.Data(train=[1], test=[2]).given()
            ['train', 'test']
        """
        return [s for s in SPLITS if self.has(s)]

    def split(self, name: str) -> Any:
        """The data of split `name` ("train", "val", "test" or "predict"), built once."""
        if name not in SPLITS:
            raise ConfigError(f"ft.Data has splits {list(SPLITS)}, not {name!r}")
        if name in self._built:
            return self._built[name]
        value = getattr(self, name)
        if value is None:
            raise DataError(f"this ft.Data has no {name!r} split; it has {self.given()}")
        self._hooks()
        if callable(value) and not hasattr(value, "__iter__"):
            value = value()
            if value is None:
                raise DataError(f"ft.Data: the {name!r} factory returned None")
        self._built[name] = value
        return value


def resolve(data: Any, *names: str) -> Any:
    """`data` itself, or for a `Data` the first of `names` it has (built)."""
    if not isinstance(data, Data):
        return data
    for name in names:
        if data.has(name):
            value = data.split(name)
            if names != ("val",) and _several_sets(value):
                raise DataError(
                    f"the {name!r} split of this ft.Data holds several sets "
                    f"({_describe_sets(value)}); this call takes one: give it one set, "
                    "e.g. ft.evaluate(evaluator, state, data.split('val')['name'])")
            return value
    raise DataError(f"this ft.Data has no {' or '.join(map(repr, names))} split; it has "
                    f"{data.given()}")


def _several_sets(value: Any) -> bool:
    """A dict of sets, or a list of two or more DataLoaders (`with_validation`'s sets)."""
    from torch.utils.data import DataLoader
    if isinstance(value, Mapping):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 1 and all(
        isinstance(item, DataLoader) for item in value)


def _describe_sets(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict of {sorted(map(str, value))}"
    return f"a list of {len(value)} DataLoaders"
