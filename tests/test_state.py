"""TrainState: creation, immutability, copies, devices, pytree, several models."""

from __future__ import annotations

import attrs
import pytest
import torch
from helpers import Net, tensors_equal
from torch import nn
from torch.utils import _pytree as pytree

import ftrain as ft


def test_create_copies_weights_and_leaves_the_module_alone(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = ft.TrainState.create(net, ft.optim.adam(1e-3), seed=7)
    assert sorted(state.params) == sorted(n for n, _ in net.named_parameters())
    assert sorted(state.buffers) == ["bn.num_batches_tracked", "bn.running_mean",
                                     "bn.running_var"]
    assert state.step == 0 and state.seed == 7 and state.slots == {}
    for name, p in net.named_parameters():
        assert torch.equal(state.params[name], p)
        assert state.params[name].data_ptr() != p.data_ptr()  # a copy
        assert not state.params[name].requires_grad
    # training changes the state, never the user's module
    step = ft.train_step(lambda m, b: m(b).pow(2).mean())
    ft.fit(step, state, [torch.randn(4, 6)] * 3, epochs=1, logger=False, checkpoint=False,
           progress=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_template_holds_no_weights(net):
    state = ft.TrainState.create(net)
    assert all(p.device.type == "meta" for p in state.model.parameters())
    assert all(b.device.type == "meta" for b in state.model.buffers())
    assert isinstance(state.model, Net)


def test_fields_cannot_be_assigned(net):
    state = ft.TrainState.create(net)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.step = 3  # type: ignore[misc]


def test_replace_returns_a_new_record_and_rejects_unknown_fields(net):
    state = ft.TrainState.create(net)
    other = state.replace(step=4, seed=2)
    assert (other.step, other.seed, state.step, state.seed) == (4, 2, 0, 0)
    assert other.params is state.params
    with pytest.raises(ft.ConfigError, match="no field 'epochs'"):
        state.replace(epochs=3)
    with pytest.raises(ft.ConfigError, match="step must be an int"):
        state.replace(step=1.5)


def test_copy_is_deep(net):
    state = ft.TrainState.create(net, ft.optim.adam(1e-3))
    state = state.replace(slots={"mine": {"n": torch.zeros(()), "tag": "a"}})
    c = state.copy()
    assert tensors_equal(c.params, state.params) and tensors_equal(c.buffers, state.buffers)
    c.params["fc1.weight"].add_(1.0)
    c.opt_state["adam"]["exp_avg"]["fc1.weight"].add_(1.0)
    c.slots["mine"]["n"].add_(1.0)
    assert not torch.equal(c.params["fc1.weight"], state.params["fc1.weight"])
    assert float(state.opt_state["adam"]["exp_avg"]["fc1.weight"].abs().sum()) == 0.0
    assert float(state.slots["mine"]["n"]) == 0.0
    assert c.model is state.model and c.optimizer is state.optimizer  # static fields shared


def test_to_moves_every_tensor_and_only_changes_devices(net):
    state = ft.TrainState.create(net, ft.optim.adam(1e-3))
    moved = state.to("cpu")
    assert moved.device.type == "cpu" and moved.step == state.step
    assert moved.opt_state["count"].dtype == torch.int64
    with pytest.raises(ft.ConfigError, match="moves between devices"):
        state.to(torch.float64)  # type: ignore[arg-type]


def test_pytree_round_trip_keeps_static_fields(net):
    state = ft.TrainState.create(net, ft.optim.sgd(0.1), seed=3).replace(step=9)
    leaves, spec = pytree.tree_flatten(state)
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, ft.TrainState)
    assert back.step == 9 and back.seed == 3 and back.model is state.model
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(state)[0]]
    assert ".params['fc1.weight']" in paths


def test_frozen_parameters_stay_frozen():
    torch.manual_seed(0)
    model = Net()
    model.fc1.requires_grad_(False)
    state = ft.TrainState.create(model, ft.optim.adam(1e-2))
    assert sorted(state.opt_state["adam"]["exp_avg"]) == ["bn.bias", "bn.weight", "fc2.bias",
                                                         "fc2.weight"]
    step = ft.train_step(lambda m, b: m(b).pow(2).mean())
    data = [torch.randn(8, 6) for _ in range(4)]
    before = state.copy()
    pure, _ = step(before.copy(), data[0])
    assert torch.equal(pure.params["fc1.weight"], before.params["fc1.weight"])
    assert not torch.equal(pure.params["fc2.weight"], before.params["fc2.weight"])
    final = ft.fit(step, state, data, epochs=1, logger=False, checkpoint=False, progress=False)
    assert torch.equal(final.params["fc1.weight"], before.params["fc1.weight"])
    assert not torch.equal(final.params["fc2.weight"], before.params["fc2.weight"])


def test_several_models_and_optimizers():
    torch.manual_seed(0)
    g, d = nn.Linear(4, 4), nn.Linear(4, 1)
    state = ft.TrainState.create({"G": g, "D": d}, {"G": ft.optim.adam(1e-3), "D": None})
    assert state.multi and set(state.params) == {"G", "D"}
    assert state.opt_state["D"] == {} and "adam" in state.opt_state["G"]

    def loss_fn(models, batch):
        return models["D"](models["G"](batch)).mean()

    new, _ = ft.train_step(loss_fn)(state, torch.randn(8, 4))
    assert not torch.equal(new.params["G"]["weight"], state.params["G"]["weight"])
    assert torch.equal(new.params["D"]["weight"], state.params["D"]["weight"])  # no optimizer


def test_create_errors():
    with pytest.raises(ft.ConfigError, match="must be a torch.nn.Module"):
        ft.TrainState.create("not a model")  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match="dict of optimizers"):
        ft.TrainState.create({"G": nn.Linear(2, 2)}, ft.optim.sgd(0.1))
    with pytest.raises(ft.ConfigError, match=r"\['X'\]"):
        ft.TrainState.create({"G": nn.Linear(2, 2)}, {"X": ft.optim.sgd(0.1)})
    with pytest.raises(ft.ConfigError, match="needs a dict of models"):
        ft.TrainState.create(nn.Linear(2, 2), {"G": ft.optim.sgd(0.1)})
    with pytest.raises(ft.ConfigError, match="models.G.weight is on the meta device and "
                                             "models.D.weight is not"):  # all meta or none
        ft.TrainState.create({"G": nn.Linear(2, 2, device="meta"), "D": nn.Linear(2, 2)})
    assert ft.TrainState.create(nn.Linear(2, 2, device="meta")).params["weight"].is_meta
    with pytest.raises(ft.ConfigError, match="seed must be an int"):
        ft.TrainState.create(nn.Linear(2, 2), seed="0")  # type: ignore[arg-type]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # weight tying, as in GPT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx))


def test_tied_weights_stay_tied_in_both_modes():
    torch.manual_seed(0)
    state = ft.TrainState.create(Tied(), ft.optim.sgd(0.5))
    assert list(state.params) == ["embed.weight"]

    def loss_fn(model, idx):
        return torch.nn.functional.cross_entropy(model(idx), idx)

    step = ft.train_step(loss_fn)
    data = [torch.randint(0, 10, (6,)) for _ in range(3)]
    pure = state.copy()
    for b in data:
        pure, _ = step(pure, b)
    bound = ft.fit(step, state, data, epochs=1, logger=False, checkpoint=False, progress=False)
    assert tensors_equal(pure.params, bound.params)
    # a tied gradient is the sum of both uses: compare with a hand loop
    torch.manual_seed(0)
    ref = Tied()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for b in data:
        opt.zero_grad()
        loss_fn(ref, b).backward()
        opt.step()
    assert torch.allclose(ref.embed.weight, bound.params["embed.weight"], atol=1e-6)
