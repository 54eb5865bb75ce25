"""ft.with_activation_checkpointing: same numbers as without, less saved activation memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ftrain as ft
from ftrain.errors import ConfigError


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.out(self.drop(torch.nn.functional.gelu(self.fc(x))))


class Net(nn.Module):
    def __init__(self, d: int = 8, depth: int = 3, bn: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.norm = nn.BatchNorm1d(d) if bn else nn.Identity()
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=0.5)
        return self.head(self.norm(h))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def fresh(bn: bool = False) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(bn=bn), ft.optim.adamw(1e-2), seed=3)


def data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
            for _ in range(n)]


def run_pure(step: ft.Step, state: ft.TrainState) -> ft.TrainState:
    for b in data():
        state, _ = step(state, b)
    return state


def run_loop(step: ft.Step, state: ft.TrainState) -> ft.TrainState:
    out = state
    for out, _ in ft.iterate(step, state, data(), epochs=1):
        pass
    return out


def assert_same(a: ft.TrainState, b: ft.TrainState, exact: bool = True) -> None:
    for k in a.params:
        if exact:
            assert torch.equal(a.params[k], b.params[k]), k
        else:
            torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-5, atol=1e-6)
    for k in a.buffers:
        if exact or not a.buffers[k].is_floating_point():
            assert torch.equal(a.buffers[k], b.buffers[k]), k
        else:
            torch.testing.assert_close(a.buffers[k], b.buffers[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("run", [run_pure, run_loop], ids=["pure", "bound"])
def test_bitwise_same_with_dropout_and_batchnorm(run):
    base = ft.train_step(loss_fn)
    ck = ft.with_activation_checkpointing(base, ["blocks.*", nn.BatchNorm1d])
    assert_same(run(base, fresh(bn=True)), run(ck, fresh(bn=True)))
    # BatchNorm's running statistics were updated once per step, not again when recomputed
    assert int(run(ck, fresh(bn=True)).buffers["norm.num_batches_tracked"]) == 4


def test_recomputes_in_backward():
    calls = []
    base = ft.train_step(loss_fn)
    ck = ft.with_activation_checkpointing(base, "blocks.1")
    state = fresh()
    hook = state.model.blocks[1].fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        ck(state, data()[0])
        assert len(calls) == 2  # the forward and backward's recomputation
        calls.clear()
        base(state, data()[0])
        assert len(calls) == 1
    finally:
        hook.remove()
    assert "forward" not in state.model.blocks[1].__dict__  # restored after the call


def test_saved_activations_shrink():
    def saved_bytes(step: ft.Step) -> int:
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(fresh(), data()[0])
        return total[0]
    base = ft.train_step(loss_fn)
    plain = saved_bytes(base)
    ck = saved_bytes(ft.with_activation_checkpointing(base, "blocks.*"))
    assert ck < 0.6 * plain, (ck, plain)


def test_step_is_a_value_and_restores_forward_on_error():
    base = ft.train_step(loss_fn)
    ck = ft.with_activation_checkpointing(ft.with_logging(base, []), "blocks.*")
    assert ft.combinators.core(ck) is not base and base.loss_fn is loss_fn
    state = fresh()

    def bad(model, batch):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        ft.with_activation_checkpointing(ft.train_step(bad), "blocks.*")(state, data()[0])
    assert all("forward" not in b.__dict__ for b in state.model.blocks)


def test_bad_specs():
    base = ft.train_step(loss_fn)
    with pytest.raises(ConfigError, match=r"\['nope\.\*'\] match no submodule"):
        ft.with_activation_checkpointing(base, ["blocks.*", "nope.*"])(fresh(), data()[0])
    with pytest.raises(ConfigError, match="empty"):
        ft.with_activation_checkpointing(base, [])
    with pytest.raises(ConfigError, match="nn.Module class"):
        ft.with_activation_checkpointing(base, [int])
    with pytest.raises(ConfigError, match="already"):
        ft.with_activation_checkpointing(ft.with_activation_checkpointing(base, "inp"),
                                         "head")


def test_nested_matches_checkpoint_the_outermost_only():
    from ftrain.core.activation_checkpointing import select
    names = [n for n, _ in select(Net(), ["blocks.*", "blocks.0.fc", nn.Linear])]
    assert names == ["inp", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_multi_model_state():
    def fresh_multi() -> ft.TrainState:
        torch.manual_seed(0)
        return ft.TrainState.create({"a": Net(), "b": Net()},
                                    {"a": ft.optim.adamw(1e-2), "b": ft.optim.adamw(1e-2)})

    def multi_loss(models, batch):
        return loss_fn(models["a"], batch) + loss_fn(models["b"], batch)
    base = ft.train_step(multi_loss)
    ck = ft.with_activation_checkpointing(base, ["a.blocks.*", "b.blocks.0"])
    for run in (run_pure, run_loop):
        a, b = run(base, fresh_multi()), run(ck, fresh_multi())
        for part in ("a", "b"):
            for k in a.params[part]:
                assert torch.equal(a.params[part][k], b.params[part][k]), (part, k)


def test_amp_and_accumulation():
    base = ft.with_accumulation(ft.with_amp(ft.train_step(loss_fn), torch.bfloat16), 2)
    ck = ft.with_activation_checkpointing(base, "blocks.*")
    assert_same(run_loop(base, fresh()), run_loop(ck, fresh()))


def sgd_state(bn: bool = True, dropout: float = 0.0) -> ft.TrainState:
    torch.manual_seed(0)
    state = ft.TrainState.create(Net(bn=bn), ft.optim.sgd(0.05), seed=3)
    for b in state.model.blocks:
        b.drop.p = dropout
    return state


def test_compile_same_numbers_in_either_order():
    base = ft.train_step(loss_fn)
    specs = ["blocks.*", nn.BatchNorm1d]  # BatchNorm's in-place update inside a region
    eager = ft.with_activation_checkpointing(base, specs)
    plain = run_loop(ft.compile(base, fallback=False), sgd_state())
    first = ft.compile(eager, fallback=False)
    assert_same(plain, run_loop(first, sgd_state()))  # bitwise the compiled step's
    assert ft.combinators.core(first).fallback_reason is None
    assert_same(run_loop(eager, sgd_state()), run_loop(first, sgd_state()), exact=False)
    # the other order, a pure call: the same graphs' numbers
    second = ft.with_activation_checkpointing(ft.compile(base, fallback=False), specs)
    assert ft.combinators.core(second).eager_step.loss_fn is ft.combinators.core(second).loss_fn
    assert_same(run_pure(eager, sgd_state()), run_pure(second, sgd_state()), exact=False)
    assert int(run_pure(second, sgd_state()).buffers["norm.num_batches_tracked"]) == 4


def test_compile_refuses_dropout_in_a_region_or_runs_it_eagerly():
    eager = ft.with_activation_checkpointing(ft.train_step(loss_fn), "blocks.*")
    with pytest.raises(ConfigError, match="cannot recompute random numbers"):
        run_loop(ft.compile(eager, fallback=False), fresh())
    # fallback=True: the eager checkpointed step, the same numbers
    assert_same(run_loop(eager, fresh()), run_loop(ft.compile(eager, fallback=True), fresh()))


def test_selection_is_cached_per_model_object():
    from ftrain.core.activation_checkpointing import _CheckpointedLoss
    ck = _CheckpointedLoss(loss_fn, ("*blocks.?",))
    a, b = Net(), Net()
    first = ck.targets(a)
    assert ck.targets(a) is first  # no second walk
    assert [m for _, m in ck.targets(b)] == list(b.blocks)  # another model: selected anew
    multi = {"x": a}
    assert ck.targets(multi) is not first and ck.targets(dict(multi)) is ck.targets(multi)
