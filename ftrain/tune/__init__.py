"""Tuners (Lightning's `Tuner`): `lr_find`, an lr range test, and `batch_size`, the
largest batch that fits. Both run on a copy: the state given is left untouched."""

from ftrain.tune.batch_size import batch_size
from ftrain.tune.lr_find import LRFinderResult, lr_find

__all__ = ["LRFinderResult", "batch_size", "lr_find"]
