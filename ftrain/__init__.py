"""ftrain: functional training for PyTorch.

A loss function becomes a step, `step(state, batch) -> (state, metrics)`; combinators
wrap steps; loops run them over data. State is a frozen record; nothing is inherited.

Examples:
    >>> import torch, ftrain as ft
    >>> state = ft.TrainState.create(torch.nn.Linear(4, 1), ft.optim.adamw(1e-3))
    >>> step = ft.train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
"""

import importlib
from typing import TYPE_CHECKING, Any

from ftrain import optim
from ftrain.core import layer as combinators
from ftrain.core.accumulation import with_accumulation
from ftrain.core.amp import loss_scale, with_amp
from ftrain.core.health import check_finite
from ftrain.core.manual import Manual, manual_step
from ftrain.core.run import RunInfo, run_info
from ftrain.core.state import TrainState, is_donated
from ftrain.core.step import (
    EvalStep,
    TrainStep,
    eval_step,
    request_stop,
    stop_reason,
    train_step,
)
from ftrain.data.batches import sample_seed
from ftrain.data.module import Data
from ftrain.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DonatedStateError,
    FTrainError,
    LossError,
    MonitorError,
    NonFiniteLossError,
    RollbackError,
    StepError,
)
from ftrain.layers.early_stop import early_stop
from ftrain.layers.hooks import every
from ftrain.layers.logging import loggers, with_logging
from ftrain.layers.max_time import with_max_time
from ftrain.layers.validation import with_validation
from ftrain.loops.evaluate import evaluate, predict
from ftrain.loops.fit import fit
from ftrain.loops.train import iterate
from ftrain.parallel.dist import (
    CollectiveError,
    CollectiveTimeoutError,
    PeerFailedError,
    local_device,
)

__version__ = "0.1.0"

# Names below are imported on first use (module __getattr__, PEP 562), keeping
# `import ftrain` within its 0.2 s budget (docs/performance.md): the CLI's parser, export,
# the tuners, populations and the checkpoint manager are ~0.15 s together. A program pays
# for each the first time it names it (`ft.fit` loads checkpointing when it adds it).
_LAZY: dict[str, tuple[str, str | None]] = {
    "ExportError": ("ftrain.export", "ExportError"),
    "apply": ("ftrain.unrolling", "apply"),
    "averaged": ("ftrain.layers.averaging", "averaged"),
    "bind": ("ftrain.export", "bind"),
    "checkpoints": ("ftrain.checkpointing.manager", "checkpoints"),
    "cli": ("ftrain.cli", None),
    "compile": ("ftrain.compiling.step", "compile"),
    "consolidate": ("ftrain.checkpointing.consolidate", "consolidate"),
    "divergence": ("ftrain.layers.divergence", None),
    "export": ("ftrain.export", None),
    "load": ("ftrain.checkpointing.file", "load"),
    "load_hparams": ("ftrain.checkpointing.file", "load_hparams"),
    "member": ("ftrain.populations.population", "member"),
    "population": ("ftrain.populations.population", "population"),
    "population_eval_step": ("ftrain.populations.population", "population_eval_step"),
    "population_step": ("ftrain.populations.population", "population_step"),
    "privacy": ("ftrain.privacy", None),
    "read_predictions": ("ftrain.loops.predict_writer", "read_predictions"),
    "replay": ("ftrain.repro", "replay"),
    "reduce_lr_on_plateau": ("ftrain.layers.plateau", "reduce_lr_on_plateau"),
    "save": ("ftrain.checkpointing.file", "save"),
    "split_members": ("ftrain.populations.population", "split_members"),
    "summary": ("ftrain.loops.summary", "summary"),
    "tune": ("ftrain.tune", None),
    "unroll": ("ftrain.unrolling", "unroll"),
    "update_bn": ("ftrain.layers.swa", "update_bn"),
    "vmap": ("ftrain.populations.population", "vmap"),
    "with_activation_checkpointing": ("ftrain.core.activation_checkpointing",
                                      "with_activation_checkpointing"),
    "with_checkpointing": ("ftrain.checkpointing.manager", "with_checkpointing"),
    "with_ddp": ("ftrain.parallel.ddp", "with_ddp"),
    "with_dp": ("ftrain.privacy.dp", "with_dp"),
    "with_ema": ("ftrain.layers.ema", "with_ema"),
    "with_fsdp": ("ftrain.parallel.fsdp", "with_fsdp"),
    "with_profiling": ("ftrain.layers.profile", "with_profiling"),
    "with_rollback": ("ftrain.layers.rollback", "with_rollback"),
    "with_swa": ("ftrain.layers.swa", "with_swa"),
    "with_throughput": ("ftrain.layers.throughput", "with_throughput"),
}

if TYPE_CHECKING:  # type checkers and IDEs see the names directly
    from ftrain import cli, export, privacy, tune
    from ftrain.checkpointing.consolidate import consolidate
    from ftrain.checkpointing.file import load, load_hparams, save
    from ftrain.checkpointing.manager import checkpoints, with_checkpointing
    from ftrain.compiling.step import compile
    from ftrain.core.activation_checkpointing import with_activation_checkpointing
    from ftrain.export import ExportError, bind
    from ftrain.layers import divergence
    from ftrain.layers.averaging import averaged
    from ftrain.layers.ema import with_ema
    from ftrain.layers.plateau import reduce_lr_on_plateau
    from ftrain.layers.profile import with_profiling
    from ftrain.layers.rollback import with_rollback
    from ftrain.layers.swa import update_bn, with_swa
    from ftrain.layers.throughput import with_throughput
    from ftrain.loops.predict_writer import read_predictions
    from ftrain.loops.summary import summary
    from ftrain.parallel.ddp import with_ddp
    from ftrain.parallel.fsdp import with_fsdp
    from ftrain.populations.population import (
        member,
        population,
        population_eval_step,
        population_step,
        split_members,
        vmap,
    )
    from ftrain.privacy.dp import with_dp
    from ftrain.repro import replay
    from ftrain.unrolling import apply, unroll


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ftrain' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "RollbackError",
    "RunInfo",
    "StepError",
    "TrainState",
    "TrainStep",
    "apply",
    "averaged",
    "bind",
    "check_finite",
    "checkpoints",
    "cli",
    "combinators",
    "compile",
    "consolidate",
    "divergence",
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
    "privacy",
    "read_predictions",
    "reduce_lr_on_plateau",
    "replay",
    "request_stop",
    "run_info",
    "sample_seed",
    "save",
    "split_members",
    "stop_reason",
    "summary",
    "train_step",
    "tune",
    "unroll",
    "update_bn",
    "vmap",
    "with_accumulation",
    "with_activation_checkpointing",
    "with_amp",
    "with_checkpointing",
    "with_ddp",
    "with_dp",
    "with_ema",
    "with_fsdp",
    "with_logging",
    "with_max_time",
    "with_profiling",
    "with_rollback",
    "with_swa",
    "with_throughput",
    "with_validation",
]
