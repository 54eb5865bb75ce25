"""Checkpoints: plain data, strict and safe loads, atomic saves, top-k, resume, early stop."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import Net, classify, make_batches, make_dataset, tensors_equal
from torch import nn
from torch.utils.data import DataLoader

import ftrain as ft
from ftrain.checkpointing.manager import latest_valid

OFF = {"logger": False, "checkpoint": False, "progress": False}
SCRIPT = str(pathlib.Path(__file__).parent / "scripts" / "resumable.py")


def fresh(seed: int = 0, optimizer=None) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), optimizer or ft.optim.adam(1e-2), seed=seed)


def trained(steps: int = 5) -> ft.TrainState:
    step = ft.with_logging(ft.train_step(classify), [], every_n_steps=None)
    return ft.fit(step, fresh(), make_batches(8), max_steps=steps, **OFF)


# -- save / load ------------------------------------------------------------------------

def test_round_trip_restores_everything(tmp_path):
    state = trained(5)
    path = ft.save(tmp_path / "a.ckpt", state, hparams={"lr": 0.01, "layers": [6, 16, 3]})
    back = ft.load(path, like=fresh())
    assert back.step == 5 and back.seed == state.seed
    assert tensors_equal(back.params, state.params)
    assert tensors_equal(back.buffers, state.buffers)
    assert tensors_equal(back.opt_state["adam"]["exp_avg"], state.opt_state["adam"]["exp_avg"])
    assert int(back.opt_state["count"]) == 5
    assert back.slots["loop"] == {"epoch": 0, "batch": 5, "world": 1}
    assert set(back.slots) == set(state.slots)
    assert ft.load_hparams(path) == {"lr": 0.01, "layers": [6, 16, 3]}
    assert [f.name for f in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary left
    # a loaded state trains on exactly as the saved one would have
    a, _ = ft.train_step(classify)(back, make_batches(1)[0])
    b, _ = ft.train_step(classify)(state, make_batches(1)[0])
    assert tensors_equal(a.params, b.params)


def test_loads_refuse_states_of_another_model(tmp_path):
    path = ft.save(tmp_path / "a.ckpt", fresh())
    torch.manual_seed(0)
    wider = ft.TrainState.create(Net(hidden=32), ft.optim.adam(1e-2))
    with pytest.raises(ft.CheckpointError, match=r"params\['fc1.weight'\] is "
                                                 r"torch.float32\[16, 6\] in the checkpoint"):
        ft.load(path, like=wider)
    other = ft.TrainState.create(nn.Linear(6, 3), ft.optim.adam(1e-2))
    with pytest.raises(ft.CheckpointError, match="missing .*weight.*unknown .*fc1.weight"):
        ft.load(path, like=other)
    sgd = fresh(optimizer=ft.optim.sgd(0.1, momentum=0.9))
    with pytest.raises(ft.CheckpointError, match="opt_state"):
        ft.load(path, like=sgd)
    double = ft.TrainState.create(Net().double(), ft.optim.adam(1e-2))
    with pytest.raises(ft.CheckpointError, match="float32.*float64"):
        ft.load(path, like=double)
    with pytest.raises(ft.CheckpointError, match="holds models None"):
        ft.load(path, like=ft.TrainState.create({"G": Net()}))


def test_exclude_loads_partially_for_fine_tuning(tmp_path):
    path = ft.save(tmp_path / "a.ckpt", trained(3))
    torch.manual_seed(1)
    model = Net(d_out=5)  # a new head
    like = ft.TrainState.create(model, ft.optim.adam(1e-2))
    with pytest.raises(ft.CheckpointError):
        ft.load(path, like=like)
    back = ft.load(path, like=like, exclude=["fc2.*"])
    saved = torch.load(path, weights_only=True)
    assert torch.equal(back.params["fc1.weight"], saved["params"]["fc1.weight"])
    assert torch.equal(back.params["fc2.weight"], like.params["fc2.weight"])
    assert back.opt_state["adam"]["exp_avg"]["fc2.weight"].shape == (5, 16)
    fresh_opt = ft.load(path, like=fresh(), exclude=["opt_state", "step"])
    assert fresh_opt.step == 0 and int(fresh_opt.opt_state["count"]) == 0


def test_a_crafted_pickle_is_rejected_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"format": "ftrain.checkpoint", "version": 1, "params": Evil()}, path)
    with pytest.raises(ft.CheckpointError, match="not a safe checkpoint"):
        ft.load(path, like=fresh())
    with pytest.raises(ft.CheckpointError, match="not a safe checkpoint"):
        ft.load_hparams(path)
    assert not marker.exists()


def test_truncated_and_foreign_files_get_clear_errors(tmp_path):
    path = ft.save(tmp_path / "a.ckpt", trained(2))
    data = path and open(path, "rb").read()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ft.CheckpointError, match="truncated or not a checkpoint"):
        ft.load(cut, like=fresh())
    other = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ft.CheckpointError, match="not an ftrain checkpoint"):
        ft.load(other, like=fresh())
    with pytest.raises(ft.CheckpointError, match="no checkpoint file"):
        ft.load(tmp_path / "missing.ckpt", like=fresh())


def test_only_plain_data_is_saved(tmp_path):
    state = fresh().replace(slots={"mine": {"fn": print}})
    with pytest.raises(ft.CheckpointError, match=r"slots.mine.fn is a builtin_function"):
        ft.save(tmp_path / "a.ckpt", state)
    with pytest.raises(ft.CheckpointError, match="hparams.opt"):
        ft.save(tmp_path / "a.ckpt", fresh(), hparams={"opt": ft.optim.sgd(0.1)})
    assert not any(tmp_path.iterdir())


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "a.ckpt"
    ft.save(path, fresh())
    ft.save(path, trained(2))
    assert ft.load(path, like=fresh()).step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


# -- with_checkpointing -----------------------------------------------------------------

def scripted_validation(values):
    """A step whose epoch end reports the next value as val_loss (and val/acc)."""
    it = iter(values)
    core = ft.train_step(classify)

    class Scripted:
        inner = core

        def __call__(self, state, batch):
            return core(state, batch)

        def epoch_end(self, state):
            v = next(it)
            return state, {"val_loss": torch.tensor(v), "val/acc": torch.tensor(1 - v)}

    return Scripted()


def test_top_k_keeps_exactly_the_best_and_last_is_newest(tmp_path):
    scores = [0.9, 0.5, 0.7, 0.3, 0.8, 0.4]
    step = ft.with_checkpointing(scripted_validation(scores), tmp_path, monitor="val_loss",
                                 save_top_k=2, filename="{epoch:02d}-{val_loss:.2f}")
    final = ft.fit(step, fresh(), make_batches(2), epochs=6, logger=False, progress=False)
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert files == ["03-0.30.ckpt", "05-0.40.ckpt", "last.ckpt"]
    index = ft.checkpoints(tmp_path)
    assert os.path.basename(index.best) == "03-0.30.ckpt" and index.best_score == pytest.approx(0.3)
    assert ft.load(index.last, like=fresh()).step == final.step == 12
    assert ft.load(index.best, like=fresh()).step == 8
    assert [os.path.basename(s["path"]) for s in index.saved] == ["03-0.30.ckpt", "05-0.40.ckpt"]
    assert json.loads((tmp_path / "checkpoints.json").read_text())["monitor"] == "val_loss"


def test_mode_max_all_kept_and_slash_in_metric_names(tmp_path):
    step = ft.with_checkpointing(scripted_validation([0.9, 0.5, 0.7]), tmp_path,
                                 monitor="val/acc", mode="max", save_top_k=-1,
                                 filename="{val/acc:.1f}/{step}", save_last=False)
    ft.fit(step, fresh(), make_batches(2), epochs=3, logger=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt") == [
        "0.1_2.ckpt", "0.3_6.ckpt", "0.5_4.ckpt"]
    assert all(p.is_file() for p in tmp_path.iterdir())
    assert os.path.basename(ft.checkpoints(tmp_path).best) == "0.5_4.ckpt"


def test_without_monitor_the_newest_are_kept_and_names_never_collide(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path, every_n_steps=2,
                                 every_n_epochs=None, save_top_k=2, filename="same")
    ft.fit(step, fresh(), make_batches(8), epochs=1, logger=False, progress=False)
    kept = [p for p in tmp_path.glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(kept) == 2 and all(p.name.startswith("same") for p in kept)
    assert sorted(ft.load(p, like=fresh()).step for p in kept) == [6, 8]
    assert ft.load(tmp_path / "last.ckpt", like=fresh()).step == 8


def test_monitor_or_template_metric_that_never_appears_lists_what_exists(tmp_path):
    step = ft.with_checkpointing(ft.train_step(classify), tmp_path, monitor="val_loss")
    with pytest.raises(ft.MonitorError, match=r"\['val_loss'\].*available: \[\]"):
        ft.fit(step, fresh(), make_batches(2), epochs=1, logger=False, progress=False)


def test_fit_checkpoints_each_epoch_by_default_and_resumes(tmp_path):
    state = ft.fit(ft.train_step(classify), fresh(), make_batches(3), epochs=2,
                   root_dir=str(tmp_path), progress=False, hparams={"lr": 0.01})
    folder = tmp_path / "checkpoints" / "version_0"  # each run has its own folder
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["1-6.ckpt", "last.ckpt"]
    assert ft.load_hparams(folder / "last.ckpt") == {"lr": 0.01}
    resumed = ft.fit(ft.train_step(classify), fresh(), make_batches(3), epochs=3,
                     root_dir=str(tmp_path), progress=False, resume="auto",
                     hparams={"lr": 0.01})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["version_0"]
    straight = ft.fit(ft.train_step(classify), fresh(), make_batches(3), epochs=3, **OFF)
    assert resumed.step == 9 and tensors_equal(resumed.params, straight.params)
    again = ft.fit(ft.train_step(classify), fresh(), make_batches(3), epochs=1,
                   root_dir=str(tmp_path / "new"), progress=False, resume="auto")
    assert again.step == 3  # nothing to resume: started fresh
    assert state.step == 6


def test_resume_mid_epoch_in_process_is_exact(tmp_path):
    data = DataLoader(make_dataset(96), batch_size=8, shuffle=True)
    schedule = ft.optim.schedules.warmup_cosine(1e-2, 4, 36)
    losses: dict[int, float] = {}

    def run(resume=None, max_steps=None):
        def record(state, batch):
            state, metrics = core(state, batch)
            losses[state.step] = float(metrics["loss"])
            return state, metrics
        core = ft.train_step(classify)
        record.inner = core
        step = ft.with_checkpointing(record, tmp_path, every_n_steps=1, every_n_epochs=None)
        return ft.fit(step, fresh(seed=4, optimizer=ft.optim.adamw(schedule)), data, epochs=3,
                      max_steps=max_steps, logger=False, progress=False, resume=resume)

    straight = run()
    reference = dict(losses)
    losses.clear()
    run(max_steps=17)
    final = run(resume=str(tmp_path / "last.ckpt"))
    assert losses == reference
    assert tensors_equal(final.params, straight.params)


# -- real processes: SIGKILL, SIGTERM ----------------------------------------------------

def _launch(root, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, SCRIPT, str(root), str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_step(proc, out, step, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists():
            lines = out.read_text().splitlines()
            if lines and int(lines[-1].split()[0]) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read().decode()}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


def _losses(out) -> dict[int, str]:
    result: dict[int, str] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            result[int(parts[0])] = parts[1]  # a re-run step overwrites
    return result


@pytest.mark.slow
def test_sigkill_mid_epoch_twice_then_resume_is_bitwise_exact(tmp_path):
    ref_out = tmp_path / "ref.txt"
    ref = _launch(tmp_path / "ref", ref_out)
    assert ref.wait(timeout=120) == 0, ref.stdout.read().decode()
    reference = _losses(ref_out)
    assert sorted(reference) == list(range(1, 37))

    out = tmp_path / "run.txt"
    rng = random.Random(0)
    for kill_at in sorted(rng.sample(range(14, 23), 2)):  # two kills inside epoch 1
        proc = _launch(tmp_path / "run", out, "--sleep", "0.05")
        _wait_for_step(proc, out, kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    proc = _launch(tmp_path / "run", out)
    assert proc.wait(timeout=120) == 0, proc.stdout.read().decode()
    assert _losses(out) == reference
    final = torch.load(str(out) + ".final.pt", weights_only=True)
    expected = torch.load(str(ref_out) + ".final.pt", weights_only=True)
    assert tensors_equal(final, expected)


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_bad_checkpoint(tmp_path):
    out = tmp_path / "run.txt"
    folder = tmp_path / "run" / "checkpoints" / "version_0"  # resumes continue it
    rng = random.Random(1)
    last_step = 0
    interrupted = 0
    # six kills, then more (up to 12) until one has landed inside a save: where a kill
    # lands is up to the machine's timing
    for kill in range(12):
        if kill >= 6 and interrupted:
            break
        proc = _launch(tmp_path / "run", out, "--big", "--epochs", "50")
        _wait_for_step(proc, out, last_step + 2, timeout=120)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside a ~16 MB save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        interrupted += any(p.name.startswith(".tmp-") for p in folder.iterdir())
        for ckpt in folder.glob("*.ckpt"):  # every file that looks like a checkpoint loads
            data = torch.load(ckpt, weights_only=True, mmap=True)
            assert data["format"] == "ftrain.checkpoint"
        index = ft.checkpoints(folder)
        for entry in index.saved:
            assert os.path.exists(entry["path"])
        picked = latest_valid(str(folder))
        assert picked is not None and not os.path.basename(picked).startswith(".tmp")
        step = torch.load(picked, weights_only=True, mmap=True)["step"]
        assert step >= max(last_step, 1)  # resumed from there; never went back
        last_step = step
    assert last_step >= 5
    assert interrupted >= 1  # at least one kill really landed inside a save


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_exits_cleanly(tmp_path):
    out = tmp_path / "run.txt"
    proc = _launch(tmp_path / "run", out, "--sleep", "0.05")
    _wait_for_step(proc, out, 5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    log = proc.stdout.read().decode()
    assert "Traceback" not in log
    seen = max(_losses(out))
    last = torch.load(tmp_path / "run" / "checkpoints" / "version_0" / "last.ckpt",
                      weights_only=True)
    assert last["step"] == seen
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # this process untouched


def test_fit_restores_the_previous_sigterm_handler():
    before = signal.getsignal(signal.SIGTERM)
    ft.fit(ft.train_step(classify), fresh(), make_batches(2), epochs=1, **OFF)
    assert signal.getsignal(signal.SIGTERM) == before


# -- early stopping -----------------------------------------------------------------------

def test_early_stop_after_exactly_patience_non_improving_checks():
    scores = [1.0, 0.8, 0.85, 0.81, 0.9, 0.1, 0.05]
    step = ft.early_stop(scripted_validation(scores), "val_loss", patience=3)
    final = ft.fit(step, fresh(), make_batches(2), epochs=20, **OFF)
    assert final.epoch == 5  # improvement at check 2, then three checks without
    assert ft.stop_reason(final) == ("early_stop: val_loss did not improve for 3 checks "
                                     "(best 0.8)")
    slot = final.slots["early_stop"]
    assert slot["best"] == pytest.approx(0.8) and slot["wait"] == 3


def test_early_stop_counts_validation_checks_not_epochs_or_sanity_runs():
    values = iter([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])

    def metric(model, batch):
        return {"score": torch.tensor(next(values))}

    step = ft.with_validation(ft.train_step(classify), ft.eval_step(metric), make_batches(1),
                              every_n_epochs=2, sanity_steps=1)
    step = ft.early_stop(step, "val_score", patience=2, min_delta=0.01)
    final = ft.fit(step, fresh(), make_batches(2), epochs=20, **OFF)
    # sanity (not counted), checks at epochs 2 (best), 4 and 6 (two without improving)
    assert final.epoch == 6 and final.slots["validation"]["checks"] == 3


def test_early_stop_count_survives_save_and_load(tmp_path):
    scores = [1.0, 0.8, 0.85, 0.81, 0.9, 0.1]
    step = ft.early_stop(scripted_validation(scores), "val_loss", patience=3)
    part = ft.fit(step, fresh(), make_batches(2), epochs=3, **OFF)
    assert part.slots["early_stop"]["wait"] == 1
    path = ft.save(tmp_path / "mid.ckpt", part)
    step2 = ft.early_stop(scripted_validation(scores[3:]), "val_loss", patience=3)
    final = ft.fit(step2, ft.load(path, like=fresh()), make_batches(2), epochs=20, **OFF)
    assert final.epoch == 5 and final.slots["early_stop"]["wait"] == 3


def test_early_stop_thresholds_and_non_finite():
    step = ft.early_stop(scripted_validation([0.5, 0.2, 0.01]), "val_loss",
                         stopping_threshold=0.1, patience=10)
    final = ft.fit(step, fresh(), make_batches(1), epochs=10, **OFF)
    assert final.epoch == 3 and "stopping threshold" in ft.stop_reason(final)
    step = ft.early_stop(scripted_validation([0.5, 5.0]), "val_loss",
                         divergence_threshold=2.0, patience=10)
    final = ft.fit(step, fresh(), make_batches(1), epochs=10, **OFF)
    assert final.epoch == 2 and "divergence" in ft.stop_reason(final)
    step = ft.early_stop(scripted_validation([0.5, float("nan")]), "val_loss", patience=10)
    final = ft.fit(step, fresh(), make_batches(1), epochs=10, **OFF)
    assert final.epoch == 2 and "not finite" in ft.stop_reason(final)


def test_early_stop_unknown_monitor_lists_available_keys():
    step = ft.early_stop(scripted_validation([0.5]), "val_acc")
    with pytest.raises(ft.MonitorError, match=r"'val_acc'.*'val/acc', 'val_loss'\]"):
        ft.fit(step, fresh(), make_batches(1), epochs=3, **OFF)
    with pytest.raises(ft.ConfigError, match="patience"):
        ft.early_stop(ft.train_step(classify), "val_loss", patience=0)


STUCK = """
import time, torch, ftrain as ft
class Stuck:
    def __iter__(self):
        yield torch.randn(4, 2)
        print("stuck", flush=True)
        while True:
            time.sleep(0.05)
state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.optim.sgd(0.1))
ft.fit(ft.train_step(lambda m, x: m(x).pow(2).mean()), state, Stuck(), max_steps=5,
       logger=False, checkpoint=False, progress=False)
"""


def test_a_second_sigterm_ends_a_loop_stuck_outside_a_step():
    proc = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout.readline().strip() == b"stuck"
    proc.send_signal(signal.SIGTERM)  # noted for the next step boundary, which never comes
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert b"second SIGTERM" in proc.stdout.read()
