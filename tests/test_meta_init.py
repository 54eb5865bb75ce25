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


class Parent(nn.Module):
    """A parent whose reset_parameters sets its children again (after theirs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.LayerNorm(2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.a.bias)
        nn.init.ones_(self.b.weight)


@pytest.mark.parametrize("make", [Parent, lambda: nn.Transformer(8, 2, 1, 1, 16)],
                         ids=["parent-reset", "nn.Transformer"])
def test_parent_initializers_run_after_their_children_as_on_the_cpu(make) -> None:
    """nn.Transformer's _reset_parameters (xavier over every matrix) and a parent's
    reset_parameters run after their children's, as in construction."""
    from ftrain.parallel.materialize import initialize
    torch.manual_seed(0)
    ref = make()
    with torch.device("meta"):
        model = make()
    model = model.to_empty(device="cpu")
    tensors = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    initialize(model, set(tensors), tensors, seed=0)
    for name, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_an_integer_buffer_nothing_sets_is_named_and_cuda_generators_are_left_alone() -> None:
    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 2)
            self.register_buffer("pos", torch.arange(5))

        def reset_parameters(self) -> None:
            nn.init.normal_(self.emb.weight)  # forgets pos

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.emb(self.pos)[x]

    step = ft.with_fsdp(ft.train_step(lambda m, b: m(b).sum()))
    with pytest.raises(ft.ConfigError, match=r"\['pos'\] of the meta-device model"):
        ft.fit(step, deferred(Positions), [torch.tensor([0, 1])], epochs=1, logger=False,
               checkpoint=False, progress=False)

    def init(module: nn.Module) -> None:
        if isinstance(module, Positions):
            module.pos.copy_(torch.arange(5))
        elif isinstance(module, nn.Embedding):
            module.weight.fill_(1.0)

    state = ft.fit(ft.with_fsdp(ft.train_step(lambda m, b: m(b).sum()), init=init),
                   deferred(Positions, opt=ft.optim.sgd(0.0)), [torch.tensor([0, 1])],
                   epochs=1, logger=False, checkpoint=False, progress=False)
    assert torch.equal(state.buffers["pos"].cpu(), torch.arange(5))  # on cuda:0 with a GPU


def test_a_sharded_folder_loads_into_a_deferred_state_on_one_process(tmp_path) -> None:
    """ft.load(folder, like=<meta-device state>) with no process group: real tensors."""
    from ftrain.checkpointing.sharded import save_dir
    torch.manual_seed(5)
    real = ft.TrainState.create(build(), ft.optim.adamw(1e-2), seed=5)
    save_dir(str(tmp_path / "s.ckpt"), real, None)
    loaded = ft.load(tmp_path / "s.ckpt", like=deferred())
    assert loaded.device.type == "cpu" and not loaded.params["3.weight"].is_meta
    assert tensors_equal(loaded.params, real.params)
    assert tensors_equal(loaded.buffers, real.buffers)
