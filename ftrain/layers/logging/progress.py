"""The progress bar: tqdm, one bar per epoch, with step, it/s and chosen metrics.

Metric values reach the bar at most every `refresh_secs` (a host sync then, none in
between): the shown value is the mean of the steps since the last refresh, a smoothed
training loss. Quiet when stderr is not a terminal, unless `always=True`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from ftrain.core.host import to_host


class ProgressBar:
    """A tqdm bar per epoch; `update(metrics)` once per step (cheap between refreshes)."""

    def __init__(self, names: Any, *, always: bool = False, refresh_secs: float = 0.5,
                 file: Any = None) -> None:
        self.names = names
        self.file = file if file is not None else sys.stderr
        isatty = getattr(self.file, "isatty", None)
        self.enabled = always or bool(isatty and isatty())
        self.refresh_secs = refresh_secs
        self.bar: Any = None
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.shown: dict[str, str] = {}
        self.last = 0.0
        self.epoch = -1
        self.version: int | None = None

    def start_epoch(self, epoch: int, total: int | None, done: int = 0) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm  # lazy: keeps `import ftrain` fast
        self.close()
        self.epoch = epoch
        self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", file=self.file,
                        dynamic_ncols=True, leave=True, unit="it")
        self.last = float("-inf")  # show values from the first step on

    def update(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        if self.bar is None:
            return
        for name in (metrics if self.names is True else self.names):
            value = metrics.get(name)
            if value is not None:
                self.pending.setdefault(name, []).append(value)
        now = time.monotonic()
        if now - self.last >= self.refresh_secs:
            self.last = now
            self._refresh_values(step)
        self.bar.update(1)

    def _refresh_values(self, step: int) -> None:
        names = [n for n, v in self.pending.items() if v]
        if names:
            means = [torch.stack([v.detach().float() for v in self.pending[n]]).mean()
                     for n in names]
            for name, value in zip(names, to_host(means)):  # host sync here
                self.shown[name] = f"{value:.4g}"
        self.pending = {}
        postfix = {"step": step, **self.shown}
        if self.version is not None:
            postfix["v_num"] = self.version
        self.bar.set_postfix(postfix, refresh=False)

    def end_epoch(self, step: int) -> None:
        """Show the values of the epoch's last steps (the caller syncs here anyway)."""
        if self.bar is not None:
            self._refresh_values(step)
            self.bar.refresh()

    def show(self, values: dict[str, float]) -> None:
        """Show already-read values (e.g. validation results) on the bar."""
        if self.bar is None:
            return
        for name, value in values.items():
            self.shown[name] = f"{value:.4g}"
        self.bar.set_postfix({**self.shown}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def eval_bar(total: int | None, desc: str, enabled: bool) -> Any:
    """A transient bar for a validation run (closed and cleared when done)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
