"""Divergence detectors for `with_rollback`: is this loss a sign the run went wrong?

A detector is any callable `detect(loss, history) -> str | None`: `loss` is one step's
loss as a Python float (averaged over ranks under `with_ddp`), `history` the losses of
the latest steps that passed (oldest first). It returns a reason (the run diverged here)
or None. `with_rollback` calls detectors on the host, at its verification points only,
so they cost nothing per step. A detector with a `window` attribute asks for that many
losses of history (kept in the layer's slot, so a resumed run judges as the first did).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import attrs

from ftrain.errors import ConfigError


def nonfinite(loss: float, history: Sequence[float]) -> str | None:
    """Fire on a NaN or infinite loss.

    Examples:
        >>> import ftrain as ft
        >>> ft.divergence.nonfinite(float("nan"), []), ft.divergence.nonfinite(1.0, [])
        ('the loss was nan', None)
    """
    return None if math.isfinite(loss) else f"the loss was {loss}"


@attrs.frozen
class Spike:
    """The detector `spike` builds: a robust z-score of the loss over recent history."""

    z: float = 6.0
    window: int = 100
    min_history: int = 20

    def __call__(self, loss: float, history: Sequence[float]) -> str | None:
        if not math.isfinite(loss):
            return f"the loss was {loss}"
        recent = list(history)[-self.window:]
        if len(recent) < self.min_history:
            return None  # too little history to call anything a spike
        median = statistics.median(recent)
        mad = statistics.median(abs(v - median) for v in recent)
        # 1.4826 * MAD estimates the standard deviation of normal noise; the floor keeps a
        # perfectly flat history from calling any rise a spike
        scale = max(1.4826 * mad, 1e-6 * abs(median), 1e-12)
        score = (loss - median) / scale
        if score > self.z:
            return (f"the loss {loss:.6g} is {score:.1f} robust standard deviations above "
                    f"the median {median:.6g} of the last {len(recent)} steps")
        return None


def spike(z: float = 6.0, *, window: int = 100, min_history: int = 20) -> Spike:
    """Fire when the loss rises more than `z` robust standard deviations (1.4826 x the
    median absolute deviation) above the median of the last `window` good losses, once
    `min_history` of them are known; a NaN or infinite loss fires too. Only upward
    spikes count: a sudden drop is not divergence.

    Examples:
        >>> import ftrain as ft
        >>> detect = ft.divergence.spike(z=6.0, window=50, min_history=5)
        >>> history = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]
        >>> detect(1.2, history) is None, detect(5.0, history).split(" is ")[0]
        (True, 'the loss 5')
    """
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
        raise ConfigError(f"spike: z must be a number > 0, got {z!r}")
    for label, value in (("window", window), ("min_history", min_history)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"spike: {label} must be an int >= 1, got {value!r}")
    if min_history > window:
        raise ConfigError(f"spike: min_history ({min_history}) cannot exceed window "
                          f"({window})")
    return Spike(float(z), window, min_history)
