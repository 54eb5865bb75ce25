"""Poisson sampling: each sample joins a step's batch independently with probability q.

DP-SGD's privacy analysis (the RDP and PRV accountants) assumes Poisson-sampled batches:
batches then have a random size, sometimes zero. `PoissonBatchSampler` draws them from a
generator an ftrain loop seeds from (seed, epoch) at the start of each epoch (the hook
it uses for a DataLoader's random sampler), so a run resumed mid-epoch sees the same
batches; under `with_dp` + `with_ddp` each step's sample is dealt out across the ranks
(every rank loads the step's whole sample list and keeps its share), so the union over
ranks is one Poisson sample of the dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Dataset, default_collate

from ftrain.core import rng as _rng
from ftrain.errors import ConfigError
from ftrain.parallel import dist as _dist


def check_rate(sample_rate: Any, what: str) -> float:
    """`sample_rate` as a float in (0, 1], else a ConfigError naming `what`."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) \
            or not 0.0 < sample_rate <= 1.0:
        raise ConfigError(f"{what}: sample_rate must be a number in (0, 1], got "
                          f"{sample_rate!r}")
    return float(sample_rate)


class _Seeding:
    """What a loop seeds per epoch (`ftrain.data.batches.seed_epoch` sets `.generator`)."""

    def __init__(self) -> None:
        self.generator: torch.Generator | None = None


class PoissonBatchSampler:
    """Batches of indices of `num_samples` samples, each included with probability
    `sample_rate`, for `steps` steps per epoch (default `round(1 / sample_rate)`, one
    pass over the data in expectation).

    In an ftrain loop the draws come from a generator seeded from (the state's seed,
    epoch); iterated outside a loop, from `seed`. Under torch.distributed with `world`
    processes each step yields `world` lists (the step's sample dealt out by position),
    which the loop's sharding gives one per rank.

    Examples:
        >>> from ftrain.privacy import PoissonBatchSampler
        >>> sampler = PoissonBatchSampler(100, 0.1, seed=0)
        >>> len(sampler), sum(len(b) for b in sampler) > 0
        (10, True)
    """

    def __init__(self, num_samples: int, sample_rate: float, *, steps: int | None = None,
                 seed: int = 0) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) \
                or num_samples < 1:
            raise ConfigError(f"PoissonBatchSampler: num_samples must be an int >= 1, got "
                              f"{num_samples!r}")
        self.sample_rate = check_rate(sample_rate, "PoissonBatchSampler")
        if steps is None:
            steps = max(1, round(1.0 / self.sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"PoissonBatchSampler: steps must be an int >= 1, got "
                              f"{steps!r}")
        self.num_samples, self.steps, self.seed = num_samples, steps, seed
        self.sampler = _Seeding()  # the loop's per-epoch seeding hook

    @property
    def expected_batch_size(self) -> float:
        """The mean batch size, `sample_rate * num_samples` (what gradients divide by)."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps * _dist.rank_world()[1]

    def __iter__(self) -> Iterator[list[int]]:
        g = self.sampler.generator
        if g is None:
            g = torch.Generator().manual_seed(_rng.mix(self.seed, _rng.SAMPLE))
        world = _dist.rank_world()[1]
        for _ in range(self.steps):
            chosen = (torch.rand(self.num_samples, generator=g) < self.sample_rate)
            indices = chosen.nonzero().flatten().tolist()
            for rank in range(world):
                yield indices[rank::world]


class _EmptyAware:
    """A collate function that turns an empty sample list into a batch of 0 samples
    shaped as the dataset's first sample (a Poisson step may draw none)."""

    def __init__(self, collate: Callable[[list[Any]], Any], dataset: Any) -> None:
        self.collate, self.dataset = collate, dataset

    def __call__(self, samples: list[Any]) -> Any:
        if samples:
            return self.collate(samples)
        template = self.collate([self.dataset[0]])
        return pytree.tree_map(
            lambda t: t[:0] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, template)


def poisson_loader(dataset: Dataset[Any], sample_rate: float, *, steps: int | None = None,
                   seed: int = 0, collate_fn: Callable[[list[Any]], Any] | None = None,
                   **loader_kwargs: Any) -> DataLoader[Any]:
    """A DataLoader over `dataset` whose batches are Poisson samples (`PoissonBatchSampler`).

    Give it to `with_dp(..., data=loader)` so the sample rate and expected batch size are
    taken from it. A step that samples nothing gets a batch of 0 samples (shaped as
    `dataset[0]`); DP-SGD still adds its noise. Other keyword arguments (`num_workers`,
    `pin_memory`, ...) go to the DataLoader.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from ftrain.privacy import poisson_loader
        >>> data = TensorDataset(torch.randn(50, 3), torch.arange(50))
        >>> loader = poisson_loader(data, 0.1, seed=1)   # 10 steps, 5 samples on average
        >>> [len(b[1]) for b in loader][:5]
        [1, 7, 5, 6, 7]
    """
    n = len(dataset)  # type: ignore[arg-type]
    if not n:
        raise ConfigError("poisson_loader: the dataset is empty")
    sampler = PoissonBatchSampler(n, sample_rate, steps=steps, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler,
                      collate_fn=_EmptyAware(collate_fn or default_collate, dataset),
                      **loader_kwargs)


def rate_and_size(data: Any, world: int) -> tuple[float, float | None]:
    """The sample rate a loader implies, and the expected batch size to divide by (None:
    the actual batch size): a Poisson loader's own; else `world / len(loader)` (each
    step takes `world` batches of an epoch, as Opacus's `1 / len(loader)` on one
    process)."""
    batcher = getattr(data, "batch_sampler", None)
    if isinstance(batcher, PoissonBatchSampler):
        return batcher.sample_rate, batcher.expected_batch_size
    try:
        batches = len(data)
    except TypeError:
        raise ConfigError(f"with_dp: data= must be a DataLoader with a length (to derive "
                          f"the sample rate), got {type(data).__name__}; pass sample_rate="
                          ) from None
    if batches < 1:
        raise ConfigError("with_dp: data= has no batches")
    return min(1.0, world / batches), None

