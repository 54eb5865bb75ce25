"""`summary`: the model's parameters per top-level module, as Lightning's `ModelSummary`.

Counts come from the state's tensors and the template's `requires_grad` (what the
optimizer trains); sizes are the parameters' bytes in their own dtypes. Host metadata
only: no tensor is read.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ftrain.core.state import TrainState, is_donated
from ftrain.errors import ConfigError

log = logging.getLogger("ftrain")


def _rows(state: TrainState) -> list[tuple[str, str, int, int, int]]:
    """(name, type, parameters, trainable, bytes) per top-level module of each model."""
    models: dict[str, Any] = state.model if state.multi else {"": state.model}
    params_of: dict[str, Any] = state.params if state.multi else {"": state.params}
    rows = []
    for model_name, template in models.items():
        params = params_of[model_name]
        children = dict(template.named_children())
        groups: dict[str, list[str]] = {head: [] for head in children}  # all, in order
        for pname in params:
            head = pname.split(".", 1)[0]
            groups.setdefault(head if head in children else "", []).append(pname)
        for head, names in groups.items():
            kind = type(children[head]).__name__ if head in children else \
                type(template).__name__
            total = trainable = size = 0
            for pname in names:
                t = params[pname]
                total += t.numel()
                size += t.numel() * t.element_size()
                if template.get_parameter(pname).requires_grad:
                    trainable += t.numel()
            label = ".".join(p for p in (model_name, head) if p) or "(root)"
            rows.append((label, kind, total, trainable, size))
    return rows


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def summary(state: TrainState) -> str:
    """A table of the state's parameters per top-level module: type, parameters,
    trainable and frozen counts, and the totals with the size in MB.

    Examples:
        >>> import torch, ftrain as ft
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        >>> model[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:...
        >>> table = ft.summary(ft.TrainState.create(model)).splitlines()
        >>> print(table[2]); print(table[-2])
        0 | 0    | Linear | 16     | 4         | 12
        21        Total params
    """
    if is_donated(state):
        _ = state.params  # raises, naming the loop that took it
    if not isinstance(state, TrainState):
        raise ConfigError(f"summary expects a TrainState, got {type(state).__name__}")
    rows = _rows(state)
    header = ("", "Name", "Type", "Params", "Trainable", "Frozen")
    table = [header] + [(str(i), name, kind, _count(total), _count(trainable),
                         _count(total - trainable))
                        for i, (name, kind, total, trainable, _) in enumerate(rows)]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    rule = "-" * max(len(line) for line in lines)
    total = sum(r[2] for r in rows)
    trainable = sum(r[3] for r in rows)
    size_mb = sum(r[4] for r in rows) / 1e6
    foot = [(_count(trainable), "Trainable params"),
            (_count(total - trainable), "Non-trainable params"),
            (_count(total), "Total params"), (f"{size_mb:.3f}", "Total params size (MB)")]
    return "\n".join([lines[0], rule, *lines[1:], rule,
                      *(f"{a.ljust(10)}{b}" for a, b in foot)])


def show_summary(state: TrainState, *, console: bool) -> None:
    """Print the summary at the start of `ft.fit` (rank 0): to the "ftrain" logger when it
    has somewhere to write INFO, else to stderr when `console` (fit's bar would show)."""
    from ftrain.core import rng
    if rng.rank() != 0:
        return
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info("model summary:\n%s", summary(state))
    elif console:
        print(summary(state), file=sys.stderr)
