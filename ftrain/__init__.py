"""ftrain: functional training for PyTorch.

A loss function becomes a step, `step(state, batch) -> (state, metrics)`; combinators
wrap steps; loops run them over data. State is a frozen record; nothing is inherited.

Examples:
    >>> import torch, ftrain as ft
    >>> state = ft.TrainState.create(torch.nn.Linear(4, 1), ft.optim.adamw(1e-3))
    >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
"""

from ftrain import cli, combinators, export, optim
from ftrain._dist import CollectiveError, CollectiveTimeoutError, PeerFailedError, local_device
from ftrain._run import RunInfo, run_info
from ftrain.accumulation import with_accumulation
from ftrain.amp import loss_scale, with_amp
from ftrain.checkpoint import load, load_hparams, save
from ftrain.checkpointing import checkpoints, with_checkpointing
from ftrain.compilation import compile
from ftrain.data import sample_seed
from ftrain.data_module import Data
from ftrain.ddp import with_ddp
from ftrain.early_stop import early_stop
from ftrain.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DonatedStateError,
    FTrainError,
    LossError,
    MonitorError,
    NonFiniteLossError,
    StepError,
)
from ftrain.export import ExportError, bind
from ftrain.health import check_finite
from ftrain.hooks import every
from ftrain.logging import loggers, with_logging
from ftrain.loop import evaluate, fit, iterate, predict
from ftrain.manual import Manual, manual_step
from ftrain.populations import (
    member,
    population,
    population_eval_step,
    population_step,
    split_members,
    vmap,
)
from ftrain.profile import with_profiling
from ftrain.state import TrainState, is_donated
from ftrain.step import (
    EvalStep,
    TrainStep,
    eval_step,
    request_stop,
    stop_reason,
    train_step,
)
from ftrain.validation import with_validation

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "ConfigError",
    "Data",
    "DataError",
    "DonatedStateError",
    "EvalStep",
    "ExportError",
    "FTrainError",
    "LossError",
    "Manual",
    "MonitorError",
    "NonFiniteLossError",
    "PeerFailedError",
    "RunInfo",
    "StepError",
    "TrainState",
    "TrainStep",
    "bind",
    "check_finite",
    "checkpoints",
    "cli",
    "combinators",
    "compile",
    "early_stop",
    "eval_step",
    "evaluate",
    "every",
    "export",
    "fit",
    "is_donated",
    "iterate",
    "load",
    "load_hparams",
    "local_device",
    "loggers",
    "loss_scale",
    "manual_step",
    "member",
    "optim",
    "population",
    "population_eval_step",
    "population_step",
    "predict",
    "request_stop",
    "run_info",
    "sample_seed",
    "save",
    "split_members",
    "stop_reason",
    "train_step",
    "vmap",
    "with_accumulation",
    "with_amp",
    "with_checkpointing",
    "with_ddp",
    "with_logging",
    "with_profiling",
    "with_validation",
]
