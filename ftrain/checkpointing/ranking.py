"""Which checkpoints to keep: the top k by a monitored score, or the newest.

Entries are the `saved` records of the checkpointing slot (`file`, `score`, `step`,
`epoch`). A NaN score is never better than another; ties go to the newer save.
"""

from __future__ import annotations

import functools
import math
from typing import Any

__all__ = ["best", "better", "top_k"]

Entry = dict[str, Any]


def better(a: float, b: float, mode: str) -> bool:
    """Whether score `a` beats `b` under `mode` ("min" or "max"); NaN never wins.

    Examples:
        >>> better(0.1, 0.2, "min"), better(0.1, 0.2, "max"), better(0.1, float("nan"), "max")
        (True, False, True)
    """
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a < b if mode == "min" else a > b


def top_k(saved: list[Entry], entry: Entry, k: int, monitor: str | None, mode: str
          ) -> tuple[list[Entry], list[Entry]]:
    """(kept, dropped) once `entry` joins `saved`: the `k` best (-1: all), kept in step
    order; `dropped` never holds `entry` itself (it was never written).

    Examples:
        >>> old = [{"file": "a", "score": 0.5, "step": 1}, {"file": "b", "score": 0.2, "step": 2}]
        >>> kept, dropped = top_k(old, {"file": "c", "score": 0.3, "step": 3}, 2, "loss", "min")
        >>> [e["file"] for e in kept], [e["file"] for e in dropped]
        (['b', 'c'], ['a'])
    """
    candidates = [*saved, entry]
    if k == -1:
        return candidates, []
    if monitor is None:  # newest first
        order = sorted(candidates, key=lambda e: e["step"], reverse=True)
    else:
        def cmp(a: Entry, b: Entry) -> int:
            sa, sb = float(a["score"]), float(b["score"])
            if better(sa, sb, mode):
                return -1
            if better(sb, sa, mode):
                return 1
            return -1 if a["step"] > b["step"] else 1  # ties: the newer first
        order = sorted(candidates, key=functools.cmp_to_key(cmp))
    kept, dropped = order[:k], order[k:]
    kept.sort(key=lambda e: e["step"])
    return kept, [e for e in dropped if e is not entry]


def best(kept: list[Entry], monitor: str | None, mode: str) -> Entry | None:
    """The best of `kept` (the newest without a monitor), None if it is empty.

    Examples:
        >>> best([{"score": 0.5, "step": 1}, {"score": 0.7, "step": 2}], "acc", "max")
        {'score': 0.7, 'step': 2}
    """
    if not kept:
        return None
    if monitor is None:
        return max(kept, key=lambda e: e["step"])
    chosen = kept[0]
    for e in kept[1:]:
        if better(float(e["score"]), float(chosen["score"]), mode):
            chosen = e
    return chosen
