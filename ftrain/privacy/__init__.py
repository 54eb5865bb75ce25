"""Differentially private training (DP-SGD): `with_dp`, accounting, Poisson sampling.

`with_dp` is an inner combinator: it sets the core step's `dp` option, and the core then
makes each update from per-sample gradients (`torch.func.vmap` of `torch.func.grad`),
each clipped to `max_grad_norm`, summed, with Gaussian noise drawn from ftrain's
(seed, step, rank) generator. The privacy spent is counted in a slot and turned into an
epsilon by Opacus's accountants (imported only when an epsilon is asked for). See
docs/privacy.md.
"""

from __future__ import annotations

from ftrain.privacy.accounting import epsilon, steps_for_epsilon
from ftrain.privacy.dp import DP, with_dp
from ftrain.privacy.sampling import PoissonBatchSampler, poisson_loader

__all__ = ["DP", "PoissonBatchSampler", "epsilon", "poisson_loader", "steps_for_epsilon",
           "with_dp"]
