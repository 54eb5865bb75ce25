"""ft.Data (the DataModule equivalent) and ft.every (user hooks)."""

from __future__ import annotations

import pytest
import torch
from helpers import classify, make_batches, make_dataset
from torch import nn
from torch.utils.data import DataLoader

import ftrain as ft


def state() -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(nn.Linear(6, 3), ft.optim.adam(1e-2), seed=0)


def test_data_with_factories_and_hooks_drives_fit_evaluate_and_predict(tmp_path):
    log: list[str] = []

    def prepare() -> None:
        log.append("prepare")
        torch.save(make_dataset(), tmp_path / "data.pt")  # "download" once

    def setup() -> None:
        log.append("setup")

    def loader(split: str, shuffle: bool = False):
        def build():
            log.append(split)
            ds = torch.load(tmp_path / "data.pt", weights_only=False)
            return DataLoader(ds, batch_size=16, shuffle=shuffle)
        return build

    data = ft.Data(train=loader("train", True), val=loader("val"), test=loader("test"),
                   predict=lambda: [torch.randn(5, 6)], prepare=prepare, setup=setup)
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(classify), data,
                              sanity_steps=0)
    trained = ft.fit(step, state(), data, epochs=2, logger=False, checkpoint=False,
                     progress=False)
    assert trained.step == 12  # 96 samples / 16 per batch, 2 epochs
    assert log[:2] == ["prepare", "setup"] and log.count("prepare") == 1
    assert log.count("train") == 1 and log.count("val") == 1  # factories called once
    results = ft.evaluate(ft.eval_step(classify), trained, data)  # the test split
    assert log.count("test") == 1 and set(results) == {"loss", "acc"}
    outs = ft.predict(trained, data)
    assert [tuple(o.shape) for o in outs] == [(5, 3)]


def test_data_with_plain_loaders_equals_passing_the_loader():
    batches = make_batches(4)
    a = ft.fit(ft.train_step(classify), state(), ft.Data(train=batches), epochs=2,
               logger=False, checkpoint=False, progress=False)
    b = ft.fit(ft.train_step(classify), state(), batches, epochs=2, logger=False,
               checkpoint=False, progress=False)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_data_errors_name_the_problem():
    with pytest.raises(ft.ConfigError, match="at least one of"):
        ft.Data()
    with pytest.raises(ft.ConfigError, match="setup must be a function"):
        ft.Data(train=[], setup=3)
    data = ft.Data(val=make_batches(1))
    with pytest.raises(ft.DataError, match="no 'train' split"):
        ft.fit(ft.train_step(classify), state(), data, epochs=1, logger=False,
               checkpoint=False, progress=False)
    with pytest.raises(ft.DataError, match="no 'predict' split; it has \\['val'\\]"):
        ft.predict(state(), data)
    with pytest.raises(ft.DataError, match="factory returned None"):
        ft.Data(train=lambda: None).split("train")


def test_every_calls_the_hook_on_steps_and_epochs_and_can_change_the_state():
    seen: list[tuple[str, int, int]] = []

    def on_step(s, metrics):
        seen.append(("step", s.step, s.epoch))
        assert "loss" in metrics

    def on_epoch(s, metrics):
        seen.append(("epoch", s.step, s.epoch))
        return s.replace(slots={**s.slots, "mine": s.epoch})  # a changed state is kept

    step = ft.every(ft.train_step(classify), on_step, every_n_steps=3)
    step = ft.every(step, on_epoch, every_n_epochs=2)
    final = ft.fit(step, state(), make_batches(4), epochs=4, logger=False, checkpoint=False,
                   progress=False)
    assert [x for x in seen if x[0] == "step"] == [("step", n, (n - 1) // 4)
                                                   for n in (3, 6, 9, 12, 15)]
    assert [x for x in seen if x[0] == "epoch"] == [("epoch", 8, 2), ("epoch", 16, 4)]
    assert final.slots["mine"] == 4


def test_every_can_add_a_metric_that_early_stop_monitors():
    def score(s, metrics):
        return s, {"score": torch.tensor(1.0)}  # never improves after the first epoch

    step = ft.every(ft.train_step(classify), score, every_n_epochs=1)
    step = ft.early_stop(step, monitor="score", patience=2, mode="max")
    final = ft.fit(step, state(), make_batches(2), epochs=10, logger=False, checkpoint=False,
                   progress=False)
    assert final.epoch == 3 and "score" in ft.stop_reason(final)


def test_every_errors():
    with pytest.raises(ft.ConfigError, match="every_n_steps= or every_n_epochs="):
        ft.every(ft.train_step(classify), lambda s, m: None)
    with pytest.raises(ft.ConfigError, match="every_n_steps must be an int >= 1"):
        ft.every(ft.train_step(classify), lambda s, m: None, every_n_steps=0)
    bad = ft.every(ft.train_step(classify), lambda s, m: 42, every_n_steps=1)
    with pytest.raises(ft.ConfigError, match="must return None, a TrainState or"):
        ft.fit(bad, state(), make_batches(2), epochs=1, logger=False, checkpoint=False,
               progress=False)
