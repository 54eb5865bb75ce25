"""Every rank runs as many forwards: what a sharded model's evaluation needs.

Under `with_fsdp` each block's forward gathers its parameters from every rank, so all
ranks must run the same number of forwards. An evaluation or a prediction whose ranks
hold unequal numbers of batches (3 batches on 2 ranks) pads the shorter ranks with
forwards on a batch they already ran, whose outputs are discarded, rather than gathering
the whole model on every rank. A rank with no batch at all pads with rank 0's first
batch, sent to it before any forward (one object broadcast).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch.distributed as dist


def counts(n: int | None) -> list[int | None]:
    """Every rank's number of batches (None: unknown). One all_gather of a Python int
    (host sync); every rank calls it."""
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, n)
    return found


def padded(batches: Iterable[Any], known: list[int | None]) -> Iterator[tuple[Any, bool]]:
    """(batch, real) pairs: this rank's batches, then repeats of its last one (real=False)
    up to the largest count in `known` (every rank's, from `counts`, all known). Every rank
    calls it; ranks with no batch get rank 0's first batch here, before any forward.

    Examples:
        >>> from ftrain.parallel.even import padded
        >>> [(b, real) for b, real in padded([1, 2], [2, 2])]  # equal counts: as they are
        [(1, True), (2, True)]
    """
    most = max(n or 0 for n in known)
    it = iter(batches)
    spare: Any = None
    if len(known) > 1 and min(n or 0 for n in known) == 0 < most:
        sent = [None]
        if dist.get_rank() == 0:
            first = next(it)
            sent = [first]
            it = itertools.chain([first], it)
        dist.broadcast_object_list(sent, src=0)
        spare = sent[0]
    ran = 0
    for batch in it:
        ran += 1
        spare = batch
        yield batch, True
    for _ in range(most - ran):
        yield spare, False
