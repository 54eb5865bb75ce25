"""ftrain's errors: each says what was expected, what was found, and where."""

from __future__ import annotations


class FTrainError(Exception):
    """Base class of every error ftrain raises on purpose.

    Examples:
        >>> import ftrain as ft
        >>> issubclass(ft.ConfigError, ft.FTrainError)
        True
    """


class ConfigError(FTrainError, ValueError):
    """A function was called with arguments that cannot work together."""


class LossError(FTrainError, TypeError):
    """A loss or metric function returned something of the wrong type or shape."""


class DataError(FTrainError, ValueError):
    """The data given to a loop cannot be iterated as batches (empty, one-shot, ...)."""


class StepError(FTrainError):
    """A step failed on a batch; the message names the step, epoch and batch index."""


class NonFiniteLossError(FTrainError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step it happened at."""


class DonatedStateError(FTrainError):
    """A state given to a loop (donated) was read after the loop took it over."""


class CheckpointError(FTrainError):
    """A checkpoint file is unsafe, truncated, of another format, or does not fit the state."""


class MonitorError(FTrainError, KeyError):
    """A monitored metric was never produced; the message lists the metrics that exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def check_int(name: str, value: object, minimum: int) -> None:
    """An optional count argument: None or an int >= `minimum`, else a ConfigError.

    Examples:
        >>> from ftrain.errors import check_int
        >>> check_int("every_n_steps", 0, 1)
        Traceback (most recent call last):
        ...
        ftrain.errors.ConfigError: every_n_steps must be an int >= 1 or None, got 0
    """
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < minimum):
        raise ConfigError(f"{name} must be an int >= {minimum} or None, got {value!r}")


def described(value: object) -> str:
    """What an error says it found: "a tensor of shape (2, 3)", else "a <type>".

    Examples:
        >>> import torch
        >>> described(torch.zeros(2, 3)), described([1])
        ('a tensor of shape (2, 3)', 'a list')
    """
    shape = getattr(value, "shape", None)
    if shape is not None and type(value).__module__.startswith("torch"):
        return f"a tensor of shape {tuple(shape)}"
    return f"a {type(value).__name__}"



class RollbackError(FTrainError):
    """`with_rollback` gave up: its detector fired too many times in a row, or the state
    cannot be rolled back (its structure changed since the last good snapshot)."""
