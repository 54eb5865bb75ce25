"""Pure optimizers: `init(params) -> opt_state` and an in-place `update`, on torch's kernels.

Examples:
    >>> import ftrain as ft
    >>> opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0),
    ...                      ft.optim.adamw(ft.optim.schedules.warmup_cosine(1e-3, 100, 1000)))
"""

from ftrain.optim import schedules, updates
from ftrain.optim._core import Groups, Optimizer, Transform, chain
from ftrain.optim._kernels import adam, adamw, clip_grad_norm, clip_grad_value, sgd
from ftrain.optim.rates import learning_rates
from ftrain.optim.torch_optim import from_torch

__all__ = ["Groups", "Optimizer", "Transform", "adam", "adamw", "chain", "clip_grad_norm",
           "clip_grad_value", "from_torch", "learning_rates", "schedules", "sgd", "updates"]
