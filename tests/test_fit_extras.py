"""`ft.fit(max_time=...)` / `ft.with_max_time` and the model summary (`ft.summary`,
printed by fit)."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import Net, classify, make_batches, torchrun_env
from torch import nn

import ftrain as ft
from ftrain.layers.max_time import seconds

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "scripts" / "ddp_extras.py"


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), ft.optim.sgd(0.1), seed=0)


class Slow:
    """A step that takes at least `pause` seconds (a real train step, then a sleep)."""

    def __init__(self, pause: float) -> None:
        self.inner, self.pause = ft.train_step(classify), pause

    def __call__(self, state, batch):
        state, metrics = self.inner(state, batch)
        time.sleep(self.pause)
        return state, metrics


# -- max_time -------------------------------------------------------------------------

def test_max_time_takes_lightnings_forms():
    assert seconds(90) == 90.0 and seconds(0.5) == 0.5
    assert seconds(datetime.timedelta(hours=1, seconds=3)) == 3603.0
    assert seconds({"days": 1, "minutes": 1}) == 86460.0
    assert seconds("01:02:03:04") == ((24 + 2) * 60 + 3) * 60 + 4
    for bad in (0, -1, True, float("inf"), float("nan"), None, [1]):
        with pytest.raises(ft.ConfigError, match="max_time must be a positive number"):
            seconds(bad)
    with pytest.raises(ft.ConfigError, match="'DD:HH:MM:SS'.*got '12:00'"):
        seconds("12:00")
    with pytest.raises(ft.ConfigError, match="timedelta's arguments.*'weeks_'"):
        seconds({"weeks_": 1})
    with pytest.raises(ft.ConfigError, match="max_time as a string must be .*got .soon."):
        ft.fit(ft.train_step(classify), fresh(), make_batches(2), epochs=1, max_time="soon",
               logger=False, checkpoint=False, progress=False, summary=False)


def test_fit_stops_after_max_time_with_a_checkpoint_holding_the_final_state(tmp_path):
    start = time.monotonic()
    state = ft.fit(Slow(0.05), fresh(), make_batches(8), epochs=1000, max_time=0.5,
                   root_dir=tmp_path, logger=False, progress=False, summary=False)
    took = time.monotonic() - start
    assert 0.5 <= took < 30  # stopped long before 1000 epochs
    assert ft.stop_reason(state).startswith("max_time: ")
    assert 1 <= state.step <= 0.5 / 0.05 + 1  # every step took >= 0.05 s
    last = tmp_path / "checkpoints" / "version_0" / "last.ckpt"
    saved = ft.load(last, like=fresh())
    assert saved.step == state.step
    assert torch.equal(saved.params["fc1.weight"], state.params["fc1.weight"])
    assert 0.5 <= saved.slots["max_time"]["elapsed"] <= state.slots["max_time"]["elapsed"]


def test_a_resumed_run_counts_on_from_the_time_already_spent(tmp_path):
    state = ft.fit(Slow(0.05), fresh(), make_batches(8), epochs=1000, max_time=0.3,
                   root_dir=tmp_path, logger=False, progress=False, summary=False)
    first = ft.load(tmp_path / "checkpoints" / "version_0" / "last.ckpt", like=fresh())
    spent = first.slots["max_time"]["elapsed"]
    assert spent >= 0.3
    # a budget a millisecond above what was spent: one more step (>= 50 ms) uses it up
    state = ft.fit(Slow(0.05), fresh(), make_batches(8), epochs=1000, max_time=spent + 1e-3,
                   root_dir=tmp_path, logger=False, progress=False, summary=False,
                   resume="auto")
    assert state.step == first.step + 1
    assert ft.stop_reason(state).startswith("max_time")
    # from scratch the same budget runs several steps: the spent time was counted
    fresh_run = ft.fit(Slow(0.05), fresh(), make_batches(8), epochs=1000,
                       max_time=spent + 1e-3, logger=False, checkpoint=False,
                       progress=False, summary=False)
    assert fresh_run.step >= 2


class SlowAt:
    """A real train step that sleeps `pause` seconds at step `at` only."""

    def __init__(self, at: int, pause: float) -> None:
        self.inner, self.at, self.pause = ft.train_step(classify), at, pause

    def __call__(self, state, batch):
        state, metrics = self.inner(state, batch)
        if state.step == self.at:
            time.sleep(self.pause)
        return state, metrics


def test_time_up_at_an_epochs_last_batch_saves_after_that_epochs_end(tmp_path):
    def stack():
        step = ft.with_validation(SlowAt(4, 1.0), ft.eval_step(classify), make_batches(2))
        return ft.with_checkpointing(step, str(tmp_path), every_n_epochs=2)  # not due at 1

    state = ft.fit(stack(), fresh(), make_batches(4), epochs=2, max_time=0.8, logger=False,
                   progress=False, summary=False)
    assert state.step == 4 and ft.stop_reason(state).startswith("max_time")
    saved = ft.load(tmp_path / "last.ckpt", like=fresh())
    # saved after epoch 0's end: position moved on, its validation counted
    assert saved.step == 4 and saved.slots["loop"]["epoch"] == 1
    assert saved.slots["loop"]["batch"] == 0 and saved.slots["validation"]["checks"] == 1
    state = ft.fit(stack(), fresh(), make_batches(4), epochs=2, max_time=100, logger=False,
                   progress=False, summary=False, resume=str(tmp_path / "last.ckpt"))
    assert state.step == 8 and state.slots["validation"]["checks"] == 2  # none repeated
    assert ft.stop_reason(state) is None


def test_with_max_time_inside_iterate_and_a_damaged_slot():
    step = ft.with_max_time(Slow(0.02), 0.1)
    for state, _ in ft.iterate(step, fresh(), make_batches(4), epochs=100):
        pass
    assert ft.stop_reason(state).startswith("max_time") and state.step < 400
    bad = fresh().replace(slots={"max_time": {"elapsed": "a lot"}})
    with pytest.raises(ft.CheckpointError, match="max_time"):
        next(ft.iterate(ft.with_max_time(ft.train_step(classify), 10), bad,
                        make_batches(2), epochs=1))
    with pytest.raises(ft.ConfigError, match="slot 'max_time'"):  # two of them
        ft.with_max_time(ft.with_max_time(ft.train_step(classify), 5), 5)




@pytest.mark.slow
def test_ranks_with_different_budgets_stop_after_the_same_step(tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(SCRIPT), str(tmp_path), "max_time"],
                          capture_output=True, text=True, timeout=180, env=torchrun_env())
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] < 100 * 13  # stopped early, together
    assert ranks[0]["saved"] == ranks[0]["step"]  # last.ckpt holds the stop step
    assert ranks[0]["reason"].startswith("max_time") and "another rank" not in \
        ranks[0]["reason"]
    assert "another rank's is spent" in ranks[1]["reason"]  # rank 1's own 60 s was not


# -- the model summary ----------------------------------------------------------------

def test_summary_counts_per_top_level_module_trainable_and_frozen():
    model = Net()
    model.fc1.requires_grad_(False)
    text = ft.summary(ft.TrainState.create(model, ft.optim.sgd(0.1)))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:]]
            for line in text.splitlines()[2:6]}
    assert rows == {"fc1": ["Linear", "112", "0", "112"],
                    "bn": ["BatchNorm1d", "32", "32", "0"],
                    "drop": ["Dropout", "0", "0", "0"],
                    "fc2": ["Linear", "51", "51", "0"]}
    total = sum(p.numel() for p in model.parameters())
    assert f"{total - 112:<10}Trainable params" in text
    assert "112       Non-trainable params" in text
    assert f"{total * 4 / 1e6:.3f}     Total params size (MB)" in text
    multi = ft.summary(ft.TrainState.create({"G": Net(), "D": nn.Linear(3, 1)},
                                            {"G": ft.optim.sgd(0.1), "D": ft.optim.sgd(0.1)}))
    assert "G.fc1" in multi and "| D " in multi
    big = ft.TrainState.create(nn.Linear(1000, 2000))
    assert "2.0 M" in ft.summary(big) and "8.008     Total params size (MB)" in \
        ft.summary(big)


def test_summary_refuses_what_is_not_a_live_state():
    with pytest.raises(ft.ConfigError, match="summary expects a TrainState, got Net"):
        ft.summary(Net())
    state = fresh()
    ft.fit(ft.train_step(classify), state, make_batches(1), epochs=1, logger=False,
           checkpoint=False, progress=False, summary=False)
    with pytest.raises(ft.DonatedStateError):
        ft.summary(state)


def test_fit_prints_the_summary_unless_switched_off(caplog, capsys):
    run = {"logger": False, "checkpoint": False}
    with caplog.at_level(logging.INFO, logger="ftrain"):
        ft.fit(ft.train_step(classify), fresh(), make_batches(1), epochs=1, progress=False,
               **run)
    assert "model summary" in caplog.text and "Total params" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftrain"):
        ft.fit(ft.train_step(classify), fresh(), make_batches(1), epochs=1, progress=False,
               summary=False, **run)
    assert "Total params" not in caplog.text
    # no INFO logging configured: on the console, where the progress bar shows
    ft.fit(ft.train_step(classify), fresh(), make_batches(1), epochs=1, progress="always",
           **run)
    assert "Total params" in capsys.readouterr().err
    ft.fit(ft.train_step(classify), fresh(), make_batches(1), epochs=1, progress=False,
           **run)
    assert "Total params" not in capsys.readouterr().err
