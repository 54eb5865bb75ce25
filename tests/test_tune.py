"""ft.tune.lr_find (Lightning's lr range test) and ft.tune.batch_size."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from helpers import tensors_equal
from torch import nn
from torch.nn import functional as F

import ftrain as ft
from ftrain.tune.batch_size import peak_rss, reset_peak_rss, search


def regression(n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def fresh(opt=None) -> ft.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return ft.TrainState.create(model, opt or ft.optim.sgd(0.01, momentum=0.9), seed=0)


def test_lr_find_sweeps_like_lightning_and_matches_a_torch_loop():
    data, n = regression(), 60
    state = fresh()
    before = state.copy()
    result = ft.tune.lr_find(ft.train_step(mse), state, data, min_lr=1e-5, max_lr=1.0,
                             num_steps=n, early_stop_threshold=None)
    assert tensors_equal(state.params, before.params) and state.step == 0  # untouched
    expected_lrs = [1e-5 * (1.0 / 1e-5) ** ((i + 1) / n) for i in range(n)]
    assert result.lrs == pytest.approx(expected_lrs, rel=1e-12)
    # the raw losses are those of torch.optim.SGD stepped with these lrs by hand
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    raw = []
    for i in range(n):
        for group in opt.param_groups:
            group["lr"] = expected_lrs[i]
        opt.zero_grad()
        loss = mse(model, data[i % len(data)])
        loss.backward()
        opt.step()
        raw.append(loss.item())
    assert result.raw_losses == pytest.approx(raw, rel=1e-5)
    # Lightning's smoothing and its steepest-descent suggestion (numpy's gradient here)
    avg, smoothed = 0.0, []
    for i, loss in enumerate(raw):
        avg = 0.98 * avg + 0.02 * loss
        smoothed.append(avg / (1 - 0.98 ** (i + 2)))
    assert result.losses == pytest.approx(smoothed, rel=1e-5)
    grads = np.gradient(np.array(smoothed[10:-1]), np.array(expected_lrs[10:-1]))
    assert result.suggestion_index == 10 + int(np.argmin(grads))
    assert result.suggestion == result.lrs[result.suggestion_index]
    assert "<- suggestion" in result.table() and len(str(result).splitlines()) == n + 1


def test_lr_find_stops_when_the_loss_diverges_and_sets_every_group():
    kwargs = {"min_lr": 1e-3, "max_lr": 20.0, "num_steps": 100, "mode": "linear"}
    grouped = ft.optim.sgd(0.01, groups={"0.*": {"lr": 0.5}})
    result = ft.tune.lr_find(ft.train_step(mse), fresh(grouped), regression(), **kwargs)
    assert result.stopped_early and 3 < len(result.lrs) < 100
    assert result.lrs[:3] == pytest.approx([1e-3 + r * (20.0 - 1e-3) for r in
                                            (0.01, 0.02, 0.03)])
    assert result.losses[-1] > 4.0 * min(result.losses[:-1])
    # the group's own lr was swept too: the same losses as without groups
    plain = ft.tune.lr_find(ft.train_step(mse), fresh(ft.optim.sgd(0.01)), regression(),
                            **kwargs)
    assert result.raw_losses == plain.raw_losses


def test_lr_find_plot_when_matplotlib_is_installed():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    result = ft.tune.lr_find(ft.train_step(mse), fresh(), regression(), num_steps=20,
                             min_lr=1e-4, max_lr=1.0)
    fig = result.plot()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    curve, mark = ax.lines[0], ax.lines[1]  # the sweep, then the suggestion's marker
    assert list(curve.get_xdata()) == list(result.lrs)
    assert list(curve.get_ydata()) == list(result.losses)
    assert list(mark.get_xdata()) == [result.suggestion]


def test_lr_find_errors():
    step, state, data = ft.train_step(mse), fresh(), regression()
    with pytest.raises(ft.ConfigError, match="min_lr .* must be below max_lr"):
        ft.tune.lr_find(step, state, data, min_lr=1.0, max_lr=0.1)
    with pytest.raises(ft.ConfigError, match="mode must be"):
        ft.tune.lr_find(step, state, data, mode="cyclic")
    with pytest.raises(ft.ConfigError, match="num_steps must be an int >= 2"):
        ft.tune.lr_find(step, state, data, num_steps=1)
    with pytest.raises(ft.ConfigError, match="no optimizer"):
        ft.tune.lr_find(step, ft.TrainState.create(nn.Linear(8, 1)), data)
    few = ft.tune.lr_find(step, state, data, num_steps=5)
    assert few.suggestion is None and len(few.lrs) == 5  # too few points: no suggestion


def test_search_doubles_then_bisects_or_stops_at_the_last_power():
    assert search(lambda b: b <= 100, 2, 25, "binsearch", None) == 100
    assert search(lambda b: b <= 100, 2, 25, "power", None) == 64
    assert search(lambda b: b <= 100, 2, 25, "binsearch", 40) == 40
    assert search(lambda b: b <= 100, 2, 3, "binsearch", None) == 8  # max_trials
    assert search(lambda b: b <= 1, 2, 25, "binsearch", None) == 1  # below init, as Lightning
    assert search(lambda b: b <= 1, 2, 25, "power", None) == 0
    assert search(lambda b: False, 4, 25, "binsearch", None) == 0
    tried = []
    search(lambda b: tried.append(b) or b <= 5, 1, 25, "binsearch", None)
    assert tried == [1, 2, 4, 8, 6, 5]


def wide_step():
    # 16 KB of activations per sample and copy of them: memory grows with the batch
    def loss(model, batch):
        return model(batch).pow(2).mean()
    return ft.train_step(loss)


def wide_state():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 1))
    return ft.TrainState.create(net, ft.optim.sgd(1e-3))


def test_batch_size_on_cpu_stays_under_the_peak_resident_memory_limit():
    step, state = wide_step(), wide_state()
    before = state.copy()
    data = lambda b: [torch.randn(b, 16) for _ in range(2)]  # noqa: E731
    for _ in ft.iterate(step, state.copy(), data(8), max_steps=2):  # warm the allocator
        pass
    reset_peak_rss()
    limit = peak_rss() + 32 * 2**20
    found = ft.tune.batch_size(step, state, data, init=128, memory_limit=limit,
                               steps_per_trial=2, max_trials=5)
    assert tensors_equal(state.params, before.params)
    # 32 MiB over the baseline at ~16-64 KB of activations per sample: 128 to 2048
    assert 128 <= found < 2048
    gc.collect()  # as before each trial: measure this run, not the last trial's leftovers
    reset_peak_rss()
    for _ in ft.iterate(step, state.copy(), data(found), max_steps=2):
        pass
    assert peak_rss() <= limit + 8 * 2**20  # reruns land near the same peak


def test_batch_size_errors():
    step, state = wide_step(), wide_state()
    data = lambda b: [torch.randn(b, 16)]  # noqa: E731
    with pytest.raises(ft.ConfigError, match="needs memory_limit="):
        ft.tune.batch_size(step, state, data)
    with pytest.raises(ft.ConfigError, match="function batch size -> training data"):
        ft.tune.batch_size(step, state, [torch.randn(2, 16)], memory_limit=2**30)
    with pytest.raises(ft.ConfigError, match="mode must be"):
        ft.tune.batch_size(step, state, data, mode="linear", memory_limit=2**30)
    with pytest.raises(ft.ConfigError, match="no batch size fits, from 2 down"):
        ft.tune.batch_size(step, state, data, memory_limit=1)
