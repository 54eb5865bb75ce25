"""ftrain.testing: each helper passes on a good step and fails on a bad one."""

from __future__ import annotations

import pytest
import torch
from helpers import Net, classify, make_batches

import ftrain as ft
from ftrain import testing


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), ft.optim.adam(1e-2))


def test_assert_pure_passes_for_train_step_and_names_mutated_fields():
    testing.assert_pure(ft.train_step(classify), fresh(), make_batches(1)[0])

    def impure(state, batch):
        state.params["fc1.bias"].add_(1.0)
        state.slots["count"] = 1
        return state, {}

    with pytest.raises(AssertionError, match=r"\.params\['fc1.bias'\]"):
        testing.assert_pure(impure, fresh(), make_batches(1)[0])


def test_assert_overfits_returns_the_loss_or_fails_with_the_curve():
    x = torch.randn(12, 6)
    batch = (x, (x[:, 0] > 0).long())
    loss = testing.assert_overfits(ft.train_step(classify), fresh(), batch, below=0.05,
                                   steps=400)
    assert loss < 0.05
    frozen = ft.TrainState.create(Net(), ft.optim.sgd(0.0))
    with pytest.raises(AssertionError, match="did not fall below 0.05 within 20 steps"):
        testing.assert_overfits(ft.train_step(classify), frozen, batch, below=0.05, steps=20)


def test_assert_gradients_catches_a_wrong_backward():
    torch.manual_seed(0)
    state = ft.TrainState.create(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                                     torch.nn.Linear(4, 1)))
    batch = (torch.randn(5, 3), torch.randn(5, 1))
    testing.assert_gradients(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                             state, batch)

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 3

    with pytest.raises(AssertionError, match="finite differences"):
        testing.assert_gradients(lambda m, b: Wrong.apply(m(b[0])).pow(2).mean(), state, batch)
