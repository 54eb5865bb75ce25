"""What the running loop was asked to do, for the combinators that adapt to it."""

from __future__ import annotations

from typing import Any

from ftrain.core.context import binding_of


class RunInfo:
    """The loop's settings; combinators read them through `run_info(state)`."""

    def __init__(self, epochs: int | None, max_steps: int | None, limit: int | None,
                 fast_dev_run: int, batches_per_epoch: int | None, *,
                 progress: bool | str = False, root_dir: str | None = None,
                 hparams: Any = None, signals: list[str] | None = None,
                 checkpoint_dir: str | None = None) -> None:
        self.epochs = epochs
        self.max_steps = max_steps
        self.limit_train_batches = limit
        self.fast_dev_run = fast_dev_run
        self.batches_per_epoch = batches_per_epoch
        self.progress = progress
        self.root_dir = root_dir
        self.hparams = hparams
        # The run folder `resume="auto"` continues (a checkpointing layer writes there).
        self.checkpoint_dir = checkpoint_dir
        # Signals received while the loop runs (fit's SIGTERM handler appends to it); the
        # loop checks it at each step boundary (one list read).
        self.signals: list[str] = signals if signals is not None else []
        # Set by with_ddp at init: this process's place in the run, and what to do when
        # the loop fails (tell the peers, take the process group down).
        self.rank = 0
        self.world = 1
        self.on_error: Any = None
        # The epoch the loop is in (set at each epoch start): what `per_epoch` schedules
        # follow, so skipped updates and a resume on another world size keep it exact.
        self.epoch: int | None = None
        # Where the loop writes repro bundles of failing steps: (folder, size limit), or None.
        self.capture: tuple[str, int | None] | None = None
        # The run's final checkpoint so far (best, else last), set by a checkpointing layer
        # as it writes one; logging hands it to trackers at close (an artifact).
        self.checkpoint_path: str | None = None

    @property
    def epoch_length(self) -> int | None:
        """Batches in a full epoch as this run sees it (limits applied), if known."""
        n = self.batches_per_epoch
        if self.limit_train_batches is not None:
            n = self.limit_train_batches if n is None else min(n, self.limit_train_batches)
        return n


def run_info(state: Any) -> RunInfo | None:
    """The `RunInfo` of the loop running `state`, or None outside a loop.

    Examples:
        >>> import torch, ftrain as ft
        >>> ft.run_info(ft.TrainState.create(torch.nn.Linear(1, 1))) is None
        True
    """
    binding = binding_of(state)
    return binding.run if binding is not None else None
