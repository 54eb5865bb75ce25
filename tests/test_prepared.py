"""The loop's prepared update (issue 14): the fused kernels called directly, once per step,
give bitwise the numbers of the general update (a direct, pure call of the same step) and
of torch.optim; what cannot be prepared takes the general update; a changed state is
prepared again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import Net, classify, make_batches
from torch import nn

import ftrain as ft
from ftrain.core import bind as _bind
from ftrain.optim._core import Prepared

CONFIGS: dict[str, Callable[[], ft.optim.Optimizer]] = {
    "adam": lambda: ft.optim.adam(1e-2),
    "adam_l2_amsgrad": lambda: ft.optim.adam(1e-2, weight_decay=0.1, amsgrad=True),
    "adamw_groups": lambda: ft.optim.adamw(1e-2, groups={"*.bias": {"weight_decay": 0.0,
                                                                    "lr": 3e-2}}),
    "adamw_schedule": lambda: ft.optim.adamw(ft.optim.schedules.warmup_cosine(1e-2, 3, 20)),
    "sgd": lambda: ft.optim.sgd(0.1),
    "sgd_nesterov_wd": lambda: ft.optim.sgd(0.1, momentum=0.9, nesterov=True,
                                            weight_decay=1e-3),
    "sgd_group_momentum": lambda: ft.optim.sgd(0.1, groups={"fc2.*": {"momentum": 0.5}}),
    "sgd_schedule": lambda: ft.optim.sgd(ft.optim.schedules.cosine_decay(0.1, 20),
                                         momentum=0.9),
    "clip_adamw": lambda: ft.optim.chain(ft.optim.clip_grad_norm(0.05), ft.optim.adamw(1e-2)),
}


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _assert_bitwise(a: ft.TrainState, b: ft.TrainState) -> None:
    for part in ("params", "buffers", "opt_state"):
        xs, ys = _tensors(getattr(a, part)), _tensors(getattr(b, part))
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=part)


def _prepared_of(state: ft.TrainState) -> Any:
    return _bind.binding_of(state).prepared[None][2]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loop_update_is_prepared_and_bitwise_the_pure_steps(name: str) -> None:
    torch.manual_seed(0)
    start = ft.TrainState.create(Net(), CONFIGS[name](), seed=3)
    step = ft.train_step(classify)
    data = make_batches(6)
    pure = start
    for _ in range(2):
        for batch in data:
            pure, _ = step(pure, batch)  # direct calls: the general update
    seen = []
    state = start.copy()
    for state, _ in ft.iterate(step, state, data, epochs=2):
        seen.append(_prepared_of(state))
    assert all(isinstance(p, Prepared) for p in seen)
    assert all(p is seen[0] for p in seen)  # prepared once, not per step
    _assert_bitwise(state, pure)


def test_loop_matches_torch_fused_adamw_with_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    ref = torch.nn.Sequential(*[m for m in __import__("copy").deepcopy(model)])
    state = ft.TrainState.create(model, ft.optim.adamw(
        1e-2, groups={"*.bias": {"weight_decay": 0.0}}))
    data = make_batches(5)
    state = ft.fit(ft.train_step(lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])),
                   state, data, epochs=2, logger=False, checkpoint=False, progress=False)
    decay = [p for n, p in ref.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in ref.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, fused=True)
    for _ in range(2):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
    for n, p in ref.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n


def test_skipped_nonfinite_updates_match_the_general_update() -> None:
    torch.manual_seed(0)
    start = ft.TrainState.create(Net(), ft.optim.adam(1e-2), seed=1)
    step = ft.train_step(classify, on_nonfinite="skip")
    data = make_batches(5)
    data[2] = (torch.full_like(data[2][0], float("nan")), data[2][1])  # found_inf set
    pure = start
    for batch in data:
        pure, _ = step(pure, batch)
    state = ft.fit(step, start.copy(), data, epochs=1, logger=False, checkpoint=False,
                   progress=False)
    assert int(state.opt_state["count"]) == 4  # the NaN step did not count
    _assert_bitwise(state, pure)


class _TwoHeads(nn.Module):
    """A head the loss uses only on some steps: its params have no gradient then."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = self.body(x)
        return self.extra(h).sum() if use_extra else h.sum()


def test_a_step_without_some_gradients_takes_the_general_update() -> None:
    torch.manual_seed(0)
    start = ft.TrainState.create(_TwoHeads(), ft.optim.adam(1e-2))
    step = ft.train_step(lambda m, b: m(b[0], bool(b[1])) ** 2)
    data = [(torch.randn(3, 4), i % 2) for i in range(6)]
    pure = start
    for batch in data:
        pure, _ = step(pure, batch)
    state = ft.fit(step, start.copy(), data, epochs=1, logger=False, checkpoint=False,
                   progress=False)
    _assert_bitwise(state, pure)


def test_a_sent_state_with_other_optimizer_state_is_prepared_again() -> None:
    torch.manual_seed(0)
    start = ft.TrainState.create(Net(), ft.optim.adam(1e-2), seed=2)
    step = ft.train_step(classify)
    data = make_batches(6)
    fresh = start.opt_state  # reset Adam's moments after step 3: a changed value
    pure = start
    for i, batch in enumerate(data):
        pure, _ = step(pure, batch)
        if i == 2:
            pure = pure.replace(opt_state=ft.TrainState.create(
                Net(), ft.optim.adam(1e-2)).opt_state)
    gen = ft.iterate(step, start.copy(), data, epochs=1)
    state, _ = next(gen)
    before = _prepared_of(state)
    for i in range(5):
        if i == 2:
            state = state.replace(opt_state=ft.TrainState.create(
                Net(), ft.optim.adam(1e-2)).opt_state)
            state, _ = gen.send(state)
        else:
            state, _ = next(gen)
    after = _prepared_of(state)
    assert before is not after and after.fits(_bind.binding_of(state).trainable[None],
                                              state.opt_state)
    assert fresh is not state.opt_state
    with pytest.raises(StopIteration) as done:
        next(gen)
    _assert_bitwise(done.value.value, pure)


def test_foreach_kernels_are_not_prepared_and_still_match() -> None:
    torch.manual_seed(0)
    start = ft.TrainState.create(Net(), ft.optim.adam(1e-2, foreach=True))
    step = ft.train_step(classify)
    data = make_batches(4)
    pure = start
    for batch in data:
        pure, _ = step(pure, batch)
    seen = []
    state = start.copy()
    for state, _ in ft.iterate(step, state, data, epochs=1):
        seen.append(_prepared_of(state))
    assert seen == [None] * 4
    _assert_bitwise(state, pure)
