"""Edge cases found in review: each test pins down one behaviour a user relies on."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch
from helpers import Net, classify, make_batches, tensors_equal
from torch import nn
from torch.utils.data import DataLoader

import ftrain as ft
from ftrain.checkpointing.manager import latest_valid

OFF = {"logger": False, "checkpoint": False, "progress": False}


def fresh(seed: int = 0, optimizer=None) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), optimizer or ft.optim.adam(1e-2), seed=seed)


def validated(every_n_steps=None):
    return ft.with_validation(ft.train_step(classify), ft.eval_step(classify),
                              make_batches(2, seed=5), every_n_steps=every_n_steps,
                              sanity_steps=0)


def test_sigterm_with_a_monitored_top_k_saves_last_and_exits(tmp_path):
    core = ft.train_step(classify)

    def sends_sigterm(state, batch):
        state, metrics = core(state, batch)
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics

    sends_sigterm.inner = core  # type: ignore[attr-defined]
    step = ft.with_checkpointing(
        ft.with_validation(sends_sigterm, ft.eval_step(classify), make_batches(1)),
        tmp_path, monitor="val_loss", save_top_k=3)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        ft.fit(step, fresh(), make_batches(8), epochs=2, logger=False, progress=False)
    assert exit_info.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before
    assert ft.load(tmp_path / "last.ckpt", like=fresh()).step == 3


def test_checkpoints_hold_every_layers_slot_as_of_the_step(tmp_path):
    step = ft.early_stop(ft.with_checkpointing(validated(), tmp_path), "val_loss", patience=5)
    ft.fit(step, fresh(), make_batches(3), epochs=2, logger=False, progress=False)
    saved = ft.load(tmp_path / "last.ckpt", like=fresh())
    assert saved.slots["early_stop"]["seen"] == saved.slots["validation"]["checks"] == 2
    resumed = ft.fit(step, fresh(), make_batches(3), epochs=4, logger=False, progress=False,
                     resume="auto", root_dir=str(tmp_path))
    assert resumed.step == 12 and resumed.slots["validation"]["checks"] == 4


def test_skip_policy_is_honoured_by_logging_and_validation(caplog):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, m = classify(model, batch)
        return (loss * float("nan") if calls["n"] == 2 else loss), m

    step = ft.with_logging(ft.with_validation(ft.train_step(loss_fn, on_nonfinite="skip"),
                                              ft.eval_step(classify), make_batches(1),
                                              every_n_steps=2, sanity_steps=0),
                           [], every_n_steps=1)
    with caplog.at_level("WARNING", logger="ftrain"):
        final = ft.fit(step, fresh(), make_batches(4), epochs=1, checkpoint=False,
                       progress=False)
    assert final.step == 4 and not torch.isnan(final.params["fc1.weight"]).any()
    assert "skipped updates with a non-finite loss, the first at step 1" in caplog.text


def test_on_epoch_false_and_outer_layer_errors_keep_their_message():
    step = ft.with_logging(ft.train_step(classify), [], on_epoch=False)
    assert ft.fit(step, fresh(), make_batches(2), epochs=1, **OFF).step == 2
    core = ft.train_step(classify)

    def broken_outer(state, batch):
        core(state, batch)
        raise OSError("disk full")

    broken_outer.inner = core  # type: ignore[attr-defined]
    with pytest.raises(ft.StepError, match=r"step 0 \(epoch 0, batch 0\) failed: "
                                           r"OSError: disk full") as info:
        ft.fit(broken_outer, fresh(), make_batches(2), epochs=1, **OFF)
    assert info.value.state.step == 1  # the work done so far comes with the error


def test_a_failing_init_leaves_the_callers_state_and_closes_the_stack():
    def broken(model, batch):
        raise ValueError("bad metric")

    step = ft.with_profiling(ft.with_validation(ft.train_step(classify),
                                                ft.eval_step(broken), make_batches(1)),
                             "advanced", file=open(os.devnull, "w"))
    state = fresh()
    with pytest.raises(ft.StepError, match="bad metric"):
        ft.fit(step, state, make_batches(2), epochs=1, **OFF)
    assert not ft.is_donated(state) and state.step == 0
    assert sys.getprofile() is None  # the cProfile profiler was switched off


def test_a_direct_call_inside_iterate_is_pure():
    step = ft.train_step(classify)
    gen = ft.iterate(step, fresh(), make_batches(4), epochs=1)
    state, _ = next(gen)
    before = state.copy()
    probe, _ = step(state, make_batches(1, seed=9)[0])  # a direct call: pure
    assert probe.step == 2 and tensors_equal(state.params, before.params)
    rest = [s.step for s, _ in gen]
    assert rest == [2, 3, 4]


def test_a_second_loop_takes_a_state_over_from_an_abandoned_one():
    step = ft.train_step(classify)
    gen1 = ft.iterate(step, fresh(), make_batches(6), epochs=1)
    for state, _ in gen1:
        if state.step == 2:
            break
    gen2 = ft.iterate(step, state, make_batches(6), epochs=1)
    first, _ = next(gen2)
    del gen1  # closing the old generator must not end the new loop's binding
    steps = [first.step] + [s.step for s, _ in gen2]
    assert steps == [3, 4, 5, 6]


def test_a_nan_after_the_device_fold_names_its_exact_step():
    torch.manual_seed(0)
    state = ft.TrainState.create(nn.Linear(2, 1), ft.optim.sgd(0.0))
    calls = {"n": 0}

    def loss_fn(model, x):
        calls["n"] += 1
        out = model(x).pow(2).mean()
        return out * float("nan") if calls["n"] == 1501 else out

    data = [torch.randn(2, 2)] * 1600
    with pytest.raises(ft.NonFiniteLossError, match="at step 1500 "):
        ft.fit(ft.train_step(loss_fn), state, data, epochs=1, **OFF)


class RunningMean(nn.Module):
    """Reassigns its buffer in forward (rather than updating it in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("avg", torch.zeros(()))

    def forward(self, x):
        out = self.lin(x)
        if self.training:
            self.avg = 0.5 * self.avg + 0.5 * out.detach().mean()
        return out


def test_reassigned_buffers_reach_the_state_in_both_modes(tmp_path):
    torch.manual_seed(0)
    state = ft.TrainState.create(RunningMean(), ft.optim.sgd(0.1))
    data = [torch.randn(4, 2) for _ in range(4)]
    step = ft.train_step(lambda m, x: m(x).pow(2).mean())
    pure = state.copy()
    for x in data:
        pure, _ = step(pure, x)
    ckpt = ft.with_checkpointing(step, tmp_path, every_n_steps=4, every_n_epochs=None)
    bound = ft.fit(ckpt, state, data, epochs=1, logger=False, progress=False)
    assert float(pure.buffers["avg"]) != 0.0
    assert torch.equal(pure.buffers["avg"], bound.buffers["avg"])
    saved = ft.load(tmp_path / "last.ckpt", like=bound)
    assert torch.equal(saved.buffers["avg"], bound.buffers["avg"])


def test_resume_auto_prefers_the_index_last_over_a_stale_newer_step(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path, every_n_steps=2,
                                 every_n_epochs=None, save_top_k=-1)
    ft.fit(step, fresh(), make_batches(8), epochs=2, logger=False, progress=False)
    early = ft.load(tmp_path / "0-4.ckpt", like=fresh())
    ft.fit(step, early, make_batches(8), max_steps=6, logger=False, progress=False)
    picked = latest_valid(str(tmp_path))
    assert ft.load(picked, like=fresh()).step == 6  # not the abandoned step-16 file
    assert os.path.exists(tmp_path / "1-16.ckpt")


def test_validation_and_checkpoint_run_once_per_step(tmp_path):
    step = ft.with_checkpointing(validated(every_n_steps=3), tmp_path, every_n_steps=3,
                                 monitor="val_loss", save_top_k=-1)
    final = ft.fit(step, fresh(), make_batches(6), epochs=1, logger=False, progress=False)
    assert final.slots["validation"]["checks"] == 2
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["0-3.ckpt", "0-6.ckpt",
                                                               "last.ckpt"]


def test_data_shapes_the_loops_accept_or_reject():
    ds = torch.utils.data.TensorDataset(torch.randn(12, 6), torch.randint(0, 3, (12,)))
    loader = DataLoader(ds, batch_sampler=[[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]])
    assert ft.fit(ft.train_step(classify), fresh(), loader, epochs=2, **OFF).step == 6
    with pytest.raises(ft.DataError, match="single tensor"):
        ft.fit(ft.train_step(classify), fresh(), torch.randn(4, 6), epochs=1, **OFF)


def test_partial_loads_touch_only_the_named_parameters(tmp_path):
    torch.manual_seed(0)
    old = ft.TrainState.create(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                               ft.optim.sgd(0.1, momentum=0.9))
    path = ft.save(tmp_path / "a.ckpt", old)
    torch.manual_seed(1)
    new_head = ft.TrainState.create(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5)),
                                    ft.optim.sgd(0.1, momentum=0.9))
    back = ft.load(path, like=new_head, exclude=["1.*"])
    assert torch.equal(back.params["0.weight"], old.params["0.weight"])
    assert back.params["1.weight"].shape == (5, 4)
    ft.train_step(lambda m, x: m(x).sum())(back, torch.randn(3, 4))  # trains fine
    with pytest.raises(ft.ConfigError, match=r"\['head.\*'\] matched no parameter"):
        ft.load(path, like=old, exclude=["head.*"])
    adam = ft.TrainState.create(nn.Linear(2, 2), ft.optim.adam(1e-2))
    trained, _ = ft.train_step(lambda m, x: m(x).sum())(adam, torch.randn(3, 2))
    path = ft.save(tmp_path / "b.ckpt", trained)
    partial = ft.load(path, like=adam, exclude=["b*"])  # "bias" only; not Adam's keys
    assert float(partial.opt_state["adam"]["step"]["weight"]) == 1.0
    assert float(partial.opt_state["adam"]["step"]["bias"]) == 0.0


def test_multi_model_loads_name_the_model_and_apply_bare_patterns_to_each(tmp_path):
    torch.manual_seed(0)
    state = ft.TrainState.create({"G": nn.Linear(2, 2), "D": nn.Linear(2, 1)},
                                 {"G": ft.optim.sgd(0.1), "D": ft.optim.sgd(0.1)})
    path = ft.save(tmp_path / "m.ckpt", state)
    other = ft.TrainState.create({"G": nn.Linear(2, 3), "D": nn.Linear(2, 1)},
                                 {"G": ft.optim.sgd(0.1), "D": ft.optim.sgd(0.1)})
    with pytest.raises(ft.CheckpointError, match="model 'G'"):
        ft.load(path, like=other)
    back = ft.load(path, like=state, exclude=["*bias"])
    assert torch.equal(back.params["D"]["weight"], state.params["D"]["weight"])
    assert ft.load(path, like=other, exclude=["G.*"]).params["G"]["weight"].shape == (3, 2)
