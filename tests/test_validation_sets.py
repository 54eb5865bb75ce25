"""Several validation sets (a list of DataLoaders, a dict, in ft.Data) and validation at
fractions of an epoch, with a kill-and-resume run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import Net, classify, make_batches, make_dataset, tensors_equal
from torch.utils.data import DataLoader, IterableDataset

import ftrain as ft

OFF = {"logger": False, "checkpoint": False, "progress": False, "summary": False}
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "scripts" / "validate_resume.py"


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), ft.optim.sgd(0.1), seed=0)


def loaders() -> list[DataLoader]:
    return [DataLoader(make_dataset(24, seed=1), batch_size=8),
            DataLoader(make_dataset(20, seed=2), batch_size=8)]


class Counted:
    """A list of batches that counts the batches taken from it."""

    def __init__(self, batches: list) -> None:
        self.batches, self.taken = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.taken += 1
            yield b

    def __len__(self) -> int:
        return len(self.batches)


def test_a_list_of_loaders_gives_each_set_its_own_names_and_true_values():
    sets = loaders()
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(classify), sets)
    state = ft.fit(step, fresh(), make_batches(4), epochs=1, **OFF)
    last = state.slots["validation"]["last"]
    assert sorted(last) == ["val_0_acc", "val_0_loss", "val_1_acc", "val_1_loss"]
    for i, loader in enumerate(sets):  # each set's numbers are its own evaluation's
        direct = ft.evaluate(ft.eval_step(classify), state, loader)
        assert last[f"val_{i}_loss"] == pytest.approx(direct["loss"], rel=1e-12)
        assert last[f"val_{i}_acc"] == pytest.approx(direct["acc"], rel=1e-12)
    assert last["val_0_loss"] != last["val_1_loss"]


def test_an_ft_data_as_a_set_validates_on_its_val_split():
    val, test = loaders()
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(classify),
                              {"a": ft.Data(val=val, test=test)})
    state = ft.fit(step, fresh(), make_batches(2), epochs=1, **OFF)
    direct = ft.evaluate(ft.eval_step(classify), state, val)
    assert state.slots["validation"]["last"]["val_a_loss"] == pytest.approx(direct["loss"],
                                                                          rel=1e-12)


def test_set_and_metric_names_that_collide_are_refused():
    def two(model, batch):  # metrics "loss" and "b_loss"
        loss, _ = classify(model, batch)
        return loss, {"b_loss": loss * 2}
    a, b = loaders()
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(two), {"a": a, "a_b": b})
    with pytest.raises(ft.ConfigError, match=r"two metrics named 'val_a_b_loss'"):
        ft.fit(step, fresh(), make_batches(2), epochs=1, **OFF)


def test_one_loader_in_a_list_keeps_plain_names():
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(classify), loaders()[:1])
    state = ft.fit(step, fresh(), make_batches(2), epochs=1, **OFF)
    assert sorted(state.slots["validation"]["last"]) == ["val_acc", "val_loss"]


def test_a_dict_in_ft_data_through_fit_with_monitors_on_one_set(tmp_path):
    easy, hard = Counted(make_batches(3, seed=5)), Counted(make_batches(2, seed=6))
    data = ft.Data(train=make_batches(4), val={"easy": easy, "hard": hard})
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(classify), data,
                              sanity_steps=2)
    step = ft.early_stop(step, "val_hard_loss", patience=1, mode="max")  # stops at once
    step = ft.with_checkpointing(step, str(tmp_path), monitor="val_easy_acc", mode="max")
    state = ft.fit(step, fresh(), data, epochs=5, logger=False, progress=False,
                   summary=False)
    # the sanity check ran 2 batches of each set, then each epoch's check all of them
    checks = state.slots["validation"]["checks"]
    assert (easy.taken, hard.taken) == (2 + 3 * checks, 2 + 2 * checks)
    assert ft.stop_reason(state).startswith("early_stop: val_hard_loss")
    assert sorted(state.slots["validation"]["last"]) == [
        "val_easy_acc", "val_easy_loss", "val_hard_acc", "val_hard_loss"]
    best = ft.checkpoints(tmp_path).best
    assert best is not None and os.path.exists(best)


def test_a_list_of_loaders_in_ft_data():
    data = ft.Data(train=make_batches(2), val=loaders)  # a factory of a list
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(classify), data)
    state = ft.fit(step, fresh(), data, epochs=1, **OFF)
    assert "val_1_acc" in state.slots["validation"]["last"]


def test_bad_sets_are_clear_errors():
    step = ft.train_step(classify)
    ev = ft.eval_step(classify)
    with pytest.raises(ft.DataError, match="mixing DataLoaders with other items"):
        ft.with_validation(step, ev, [loaders()[0], make_batches(2)])
    with pytest.raises(ft.ConfigError, match="empty dict"):
        ft.with_validation(step, ev, {})
    with pytest.raises(ft.ConfigError, match=r"letters, digits and '_'.*got 'a b'"):
        ft.with_validation(step, ev, {"a b": make_batches(1)})
    with pytest.raises(ft.ConfigError, match="got 3"):
        ft.with_validation(step, ev, {3: make_batches(1)})
    with pytest.raises(ft.DataError, match="validation set 'x' must be a DataLoader or a "
                                           "list of batches, got NoneType"):
        ft.with_validation(step, ev, {"x": None})
    data = ft.Data(train=make_batches(2), val={"a": None})  # found when first evaluated
    with pytest.raises(ft.DataError, match="validation set 'a'"):
        ft.fit(ft.with_validation(step, ev, data), fresh(), data, epochs=1, **OFF)


def _validated_steps(every, *, limit=None, batches=8, epochs=1) -> list[int]:
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(classify),
                              make_batches(2, seed=9), every_n_epochs=every)
    seen = []
    for state, metrics in ft.iterate(step, fresh(), make_batches(batches), epochs=epochs,
                                      limit_train_batches=limit):
        if "val_loss" in metrics:
            seen.append(state.step)
    assert state.slots["validation"]["checks"] == len(seen)
    return seen


def test_fractional_intervals_validate_at_each_fraction_and_the_epoch_end():
    assert _validated_steps(0.25, epochs=2) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert _validated_steps(0.5, batches=5) == [2, 5]
    assert _validated_steps(0.3, batches=10) == [3, 6, 9, 10]  # and the end
    assert _validated_steps(0.25, limit=6) == [1, 3, 4, 6]  # a quarter of 6 batches
    assert _validated_steps(2.0, epochs=4) == [16, 32]  # a whole number: every 2 epochs


class Stream(IterableDataset):
    def __iter__(self):
        yield from make_batches(4)


def test_a_fraction_needs_data_with_a_length():
    step = ft.with_validation(ft.train_step(classify), ft.eval_step(classify),
                              make_batches(1), every_n_epochs=0.5)
    with pytest.raises(ft.ConfigError, match="needs training data with a length"):
        ft.fit(step, fresh(), DataLoader(Stream(), batch_size=None), epochs=1, **OFF)
    for bad in (1.5, 0.0, -0.25, float("nan")):
        with pytest.raises(ft.ConfigError, match="fraction of an epoch in"):
            ft.with_validation(ft.train_step(classify), ft.eval_step(classify),
                               make_batches(1), every_n_epochs=bad)


def _launch(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists():
            lines = out.read_text().splitlines()
            if lines and int(lines[-1].split()[0]) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read().decode()}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


def _lines(out: Path) -> dict[int, tuple[str, str]]:
    result = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            result[int(parts[0])] = (parts[1], parts[2])  # a re-run step overwrites
    return result


@pytest.mark.slow
def test_sigkill_after_a_mid_epoch_validation_then_resume_is_bitwise_exact(tmp_path):
    ref_out = tmp_path / "ref.txt"
    ref = _launch(tmp_path / "ref", ref_out)
    assert ref.wait(timeout=120) == 0, ref.stdout.read().decode()
    reference = _lines(ref_out)
    assert sorted(reference) == list(range(1, 17))
    assert [s for s, (_, v) in reference.items() if v != "-"] == [2, 4, 6, 10, 12, 14]

    out = tmp_path / "run.txt"
    kill_at = random.Random(0).choice([2, 4, 10, 12])  # right after a mid-epoch check
    proc = _launch(tmp_path / "run", out, "--sleep", "0.3")
    _wait_for_step(proc, out, kill_at + 1)  # step kill_at's checkpoint is written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc = _launch(tmp_path / "run", out)
    assert proc.wait(timeout=120) == 0, proc.stdout.read().decode()
    assert _lines(out) == reference  # losses and validation results, bit for bit
    final = torch.load(str(out) + ".final.pt", weights_only=True)
    expected = torch.load(str(ref_out) + ".final.pt", weights_only=True)
    assert tensors_equal(final["params"], expected["params"])
    assert final["checks"] == expected["checks"] == 8


def test_evaluate_on_a_data_with_several_val_sets_asks_for_one():
    data = ft.Data(val={"a": make_batches(2), "b": make_batches(1)})
    with pytest.raises(ft.DataError, match=r"'val' split of this ft.Data holds several sets "
                                           r"\(a dict of \['a', 'b'\]\)"):
        ft.evaluate(ft.eval_step(classify), fresh(), data)
    listed = ft.Data(test=loaders())
    with pytest.raises(ft.DataError, match="a list of 2 DataLoaders"):
        ft.evaluate(ft.eval_step(classify), fresh(), listed)
    one = ft.evaluate(ft.eval_step(classify), fresh(), data.split("val")["a"])
    assert set(one) == {"loss", "acc"}
