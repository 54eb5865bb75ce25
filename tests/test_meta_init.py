"""Models built on the meta device (issue 16): `TrainState.create` keeps them deferred and
`ft.with_fsdp` makes them real when a loop starts, module by module, with the values the
CPU build gets after `torch.manual_seed(state.seed)`. The 2-rank runs (each rank makes
only its shards real; resume reads only its shards) are in test_fsdp.py and
test_fsdp_resume.py; these run on one process."""

from __future__ import annotations

import pytest
import torch
from helpers import tensors_equal
from torch import nn

import ftrain as ft


def build() -> nn.Module:
    return nn.Sequential(nn.Embedding(10, 8),
                         nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                         nn.BatchNorm1d(3), nn.Linear(8, 1))


def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
    return m(b).pow(2).mean()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 10, (4, 3), generator=g) for _ in range(3)]


def deferred(model_fn=build, seed: int = 5, opt=None) -> ft.TrainState:
    with torch.device("meta"):
        model = model_fn()
    return ft.TrainState.create(model, opt or ft.optim.adamw(1e-2), seed=seed)


def test_meta_model_trains_as_its_cpu_build_bitwise() -> None:
    """Embedding, a TransformerEncoderLayer (MultiheadAttention initializes its out_proj's
    bias), BatchNorm's running statistics: made real, then 3 AdamW steps equal to the
    plain step on the model built on the CPU after manual_seed(state.seed)."""
    torch.manual_seed(5)
    ref = ft.TrainState.create(build(), ft.optim.adamw(1e-2), seed=5)
    before = torch.get_rng_state()
    want = ft.fit(ft.train_step(loss_fn), ref, batches(), epochs=1, logger=False,
                  checkpoint=False, progress=False)
    torch.set_rng_state(before)
    state = deferred()
    assert state.params["3.weight"].is_meta
    got = ft.fit(ft.with_fsdp(ft.train_step(loss_fn)), state, batches(), epochs=1,
                 logger=False, checkpoint=False, progress=False)
    assert got.step == 3 and not got.params["3.weight"].is_meta
    assert tensors_equal(got.params, want.params)
    assert tensors_equal(got.buffers, want.buffers)  # running stats, num_batches_tracked
    assert tensors_equal(got.opt_state, want.opt_state)


def test_the_global_generator_is_left_as_it_was() -> None:
    state = deferred()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for _ in ft.iterate(ft.with_fsdp(ft.train_step(loss_fn)), state, batches()[:1],
                        max_steps=0):
        pass
    assert torch.equal(torch.rand(3), expected)


class Scaled(nn.Module):
    """A parameter held directly, with no reset_parameters: no initializer sets it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_a_tensor_no_initializer_sets_is_named() -> None:
    step = ft.with_fsdp(ft.train_step(lambda m, b: m(b).sum()))
    with pytest.raises(ft.ConfigError, match=r"\['scale'\].*with_fsdp\(init=fn\)"):
        ft.fit(step, deferred(Scaled), [torch.randn(2, 3)], epochs=1, logger=False,
               checkpoint=False, progress=False)


def test_init_sets_each_modules_own_tensors() -> None:
    seen = []

    def init(module: nn.Module) -> None:
        seen.append(type(module).__name__)
        if isinstance(module, nn.Linear):
            module.weight.fill_(0.5)
            module.bias.zero_()
        if isinstance(module, Scaled):
            assert module.scale.shape == (2,) and not module.scale.is_meta
            module.scale.fill_(2.0)

    step = ft.with_fsdp(ft.train_step(lambda m, b: m(b).sum()), init=init)
    state = ft.fit(step, deferred(Scaled, opt=ft.optim.sgd(0.0)), [torch.ones(2, 3)],
                   epochs=1, logger=False, checkpoint=False, progress=False)
    assert seen == ["Linear", "Scaled"]  # children first, each module once
    assert torch.equal(state.params["lin.weight"], torch.full((2, 3), 0.5))
    assert torch.equal(state.params["scale"], torch.full((2,), 2.0))


def test_a_reset_that_leaves_a_tensor_unset_is_named() -> None:
    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.ones(2))
            self.b = nn.Parameter(torch.ones(2))

        def reset_parameters(self) -> None:
            nn.init.ones_(self.a)  # forgets b

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.a * self.b

    step = ft.with_fsdp(ft.train_step(lambda m, b: m(b).sum()))
    with pytest.raises(ft.ConfigError, match=r"\['b'\] of the meta-device model"):
        ft.fit(step, deferred(Half), [torch.ones(2)], epochs=1, logger=False,
               checkpoint=False, progress=False)


def test_a_deferred_state_is_refused_where_real_tensors_are_needed() -> None:
    state = deferred()
    plain = ft.train_step(loss_fn)
    with pytest.raises(ft.ConfigError, match="meta device.*ft.with_fsdp makes them real"):
        plain(state, batches()[0])
    with pytest.raises(ft.ConfigError, match="ft.iterate got a state whose tensors are on "
                                             "the meta device"):
        for _ in ft.iterate(plain, state.copy(), batches(), max_steps=1):
            pass
    with pytest.raises(ft.ConfigError, match="a direct \\(pure\\) call of a with_fsdp step "
                                             "on a meta-device state"):
        ft.with_fsdp(plain)(state, batches()[0])
    with pytest.raises(ft.ConfigError, match="evaluation got a state whose tensors"):
        ft.evaluate(ft.eval_step(loss_fn), state, batches())
    with pytest.raises(ft.ConfigError, match="init must be a function"):
        ft.with_fsdp(plain, init="normal")  # type: ignore[arg-type]


def test_a_model_partly_on_the_meta_device_is_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.device("meta"):
        model[1] = nn.Linear(2, 1)
    with pytest.raises(ft.ConfigError, match=r"model.1.weight is on the meta device and "
                                             r"model.0.weight is not"):
        ft.TrainState.create(model)


def test_a_checkpoint_loads_into_a_deferred_state(tmp_path) -> None:
    """ft.load(like=<meta-device state>) reads onto this process's device, and the
    loop continues from it (nothing is initialized)."""
    torch.manual_seed(5)
    real = ft.TrainState.create(build(), ft.optim.adamw(1e-2), seed=5)
    real = ft.fit(ft.train_step(loss_fn), real, batches(), epochs=1, logger=False,
                  checkpoint=False, progress=False)
    path = ft.save(tmp_path / "s.ckpt", real)
    loaded = ft.load(path, like=deferred())
    assert loaded.step == 3 and tensors_equal(loaded.params, real.params)
    assert loaded.device.type == "cpu"
