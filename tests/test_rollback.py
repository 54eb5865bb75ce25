"""with_rollback (issue 17, part 2): past a NaN or a loss spike the run goes back to its
last good state, skips the batches that led there and finishes as a run on the data
without them would, bitwise; also across a SIGKILL and resume, and on two ranks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tensors_equal, torchrun_env
from torch import nn

import ftrain as ft
from ftrain.layers import snapshots

SCRIPT = Path(__file__).parent / "scripts" / "rollback_run.py"
OFF = {"logger": False, "checkpoint": False, "progress": False}
NAN = float("nan")


def _script():
    spec = importlib.util.spec_from_file_location("rollback_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _script()


def poisoned(*at: int, n: int = 40, value: float = NAN) -> list:
    """`run.batches()` without its own poison, with NaN (or `value` x) inputs at `at`."""
    data = [b for i, b in enumerate(run.batches()) if i != run.POISON]
    data.insert(run.POISON, (torch.randn(8, 4), torch.randn(8, 1)))
    for i in at:
        data[i] = (torch.full((8, 4), value) if value != value else data[i][0] * value,
                   data[i][1])
    return data[:n]


def reference(data: list, lr: dict | None = None) -> ft.TrainState:
    """Plain direct calls (bitwise what a loop does) over `data`; `lr`: {step: lr} set
    before that step."""
    step, state = ft.train_step(run.loss_fn), run.fresh()
    if lr:
        state = ft.TrainState.create(state.model, ft.optim.sgd(0.1), seed=1).replace(
            params=state.params)
    for batch in data:
        if lr and state.step in lr:
            state = state.set_hparams(lr=lr[state.step])
        state, _ = step(state, batch)
    return state


def test_a_nan_window_is_skipped_and_the_result_is_a_run_without_it():
    data = poisoned(17)
    seen = []
    step = ft.with_rollback(ft.train_step(run.loss_fn), every_n_steps=5)
    state = run.fresh()
    for state, metrics in ft.iterate(step, state, data, epochs=1):
        seen.append((state.step, float(metrics["rollbacks"])))
    slot = state.slots["rollback"]
    # verified at steps 5, 10, 15; the window of batches 15..19 held the NaN (batch 17)
    assert slot["skipped"] == [{"step": 15, "at": 17, "first": [0, 15], "last": [0, 19],
                                "reason": "the loss was nan"}]
    assert slot["rollbacks"] == 1 and slot["in_a_row"] == 0
    assert seen[19] == (15, 1.0) and seen[18] == (19, 0.0)  # step 20 went back to 15
    expected = reference(data[:15] + data[20:])
    assert state.step == expected.step == 35
    assert tensors_equal(state.params, expected.params)
    assert tensors_equal(state.opt_state, expected.opt_state)  # the schedule's count too
    assert ft.check_finite(state) is None  # the NaN left no record behind


def test_a_nan_already_folded_into_the_record_is_forgotten(monkeypatch):
    from ftrain.core import health
    monkeypatch.setattr(health, "FOLD_EVERY", 2)  # pending losses folded every 2 steps
    data = poisoned(9, n=20)
    step = ft.with_rollback(ft.train_step(run.loss_fn), every_n_steps=6)
    state = ft.fit(step, run.fresh(), data, epochs=1, **OFF)  # no NonFiniteLossError
    assert state.slots["rollback"]["rollbacks"] == 1 and ft.check_finite(state) is None
    expected = reference(data[:6] + data[12:])
    assert tensors_equal(state.params, expected.params)


def test_two_bad_windows_in_a_row_go_two_good_states_back():
    data = poisoned(9, 12, n=24)
    step = ft.with_rollback(ft.train_step(run.loss_fn), every_n_steps=3, keep=2)
    state = ft.fit(step, run.fresh(), data, epochs=1, **OFF)
    first, second = state.slots["rollback"]["skipped"]
    assert (first["step"], first["first"], first["last"]) == (9, [0, 9], [0, 11])
    # the second in a row leaves the newest good state (step 9) for the one before (6)
    assert (second["step"], second["first"], second["last"]) == (6, [0, 6], [0, 14])
    assert state.slots["rollback"]["in_a_row"] == 0  # a clean window since
    expected = reference(data[:6] + data[15:])
    assert state.step == expected.step and tensors_equal(state.params, expected.params)


def test_a_loss_spike_is_rolled_back_by_the_robust_z_score():
    data = poisoned(25, value=300.0)  # finite, but far off the recent losses
    detect = ft.divergence.spike(z=8.0, window=20, min_history=10)
    step = ft.with_rollback(ft.train_step(run.loss_fn), detect, every_n_steps=1)
    state = ft.fit(step, run.fresh(), data, epochs=1, **OFF)
    (skipped,) = state.slots["rollback"]["skipped"]
    assert (skipped["first"], skipped["last"]) == ([0, 25], [0, 25])
    assert "robust standard deviations above the median" in skipped["reason"]
    assert len(state.slots["rollback"]["history"]) == 20  # bounded by the window
    expected = reference(data[:25] + data[26:])
    assert tensors_equal(state.params, expected.params)


def test_the_learning_rate_is_scaled_for_a_while_after_a_rollback():
    data = poisoned(6, n=16)
    optimizer = ft.optim.sgd(0.1)
    step = ft.with_rollback(ft.train_step(run.loss_fn), every_n_steps=2, lr_factor=0.5,
                            lr_steps=3)
    state = ft.TrainState.create(run.fresh().model, optimizer, seed=1)
    state = state.replace(params=run.fresh().params)
    seen = []
    inner = ft.every(ft.train_step(run.loss_fn),  # inside: sees the optimizer it trains with
                     lambda s, m: seen.append(s.optimizer.settings()["lr"]), every_n_steps=1)
    step = ft.with_rollback(inner, every_n_steps=2, lr_factor=0.5, lr_steps=3)
    outside = []
    for state, _ in ft.iterate(step, state, data, epochs=1):
        outside.append(state.optimizer.settings()["lr"])
    assert state.slots["rollback"]["cooldown_until"] == 9  # back to step 6, then 3 steps
    assert set(outside) == {0.1}  # states leaving the layer carry the run's optimizer
    assert seen.count(0.05) == 3  # the steps inside trained at half the rate for 3 steps
    # the same as direct calls on the data without batches 6-7, at 0.05 for steps 6-8
    ref = reference(data[:6] + data[8:], lr={0: 0.1, 6: 0.05, 9: 0.1})
    assert tensors_equal(state.params, ref.params)


def test_privacy_spent_in_dropped_steps_stays_counted():
    data = poisoned(6, n=12)
    core = ft.with_dp(ft.train_step(run.loss_fn), max_grad_norm=1.0, noise_multiplier=1.0,
                      sample_rate=0.1)
    state = ft.fit(ft.with_rollback(core, every_n_steps=4), run.fresh(), data, epochs=1,
                   **OFF)
    assert state.slots["rollback"]["rollbacks"] == 1 and state.step == 8
    # four steps were dropped, but their noisy gradients saw the data: 12 are spent
    assert state.slots["dp"]["steps"] == 12


def test_a_direct_call_is_pure_and_skips_the_bad_batch():
    step = ft.with_rollback(ft.train_step(run.loss_fn), give_up_after=1)
    state = run.fresh()
    good, _ = step(state, run.batches()[0])
    assert good.step == 1 and good.slots["rollback"]["history"] == []  # no window kept
    bad, metrics = step(good, (torch.full((8, 4), NAN), torch.zeros(8, 1)))
    assert bad.step == 1 and tensors_equal(bad.params, good.params)
    assert bad.slots["rollback"]["rollbacks"] == 1 and float(metrics["rollbacks"]) == 1.0
    assert good.slots["rollback"]["rollbacks"] == 0  # the input is untouched
    with pytest.raises(ft.RollbackError, match="2th time in a row"):
        step(bad, (torch.full((8, 4), NAN), torch.zeros(8, 1)))


def test_giving_up_stops_with_an_error_the_good_state_and_a_bundle(tmp_path):
    data = poisoned(*range(10, 40))  # nothing after batch 10 is trainable
    step = ft.with_rollback(ft.train_step(run.loss_fn), every_n_steps=2, give_up_after=2)
    state = run.fresh()
    with pytest.raises(ft.RollbackError, match="fired 3 times in a row") as caught:
        for state, _ in ft.iterate(step, state, data, epochs=1,
                                   capture_failures=tmp_path / "repro"):
            pass
    err = caught.value
    good = err.state
    assert good.step == 8 and ft.check_finite(good) is None  # the state went back
    assert all(torch.isfinite(t).all() for t in good.params.values())
    assert tensors_equal(good.params, reference(data[:8]).params)
    skipped = [(e["step"], e["first"], e["last"]) for e in good.slots["rollback"]["skipped"]]
    # back to 10, then two good states back (8), then the window after 8 failed again
    assert skipped == [(10, [0, 10], [0, 11]), (8, [0, 8], [0, 13]), (8, [0, 14], [0, 15])]
    assert err.repro is not None and Path(err.repro).name == "step-8-rank0"
    again = ft.replay(err.repro, ft.train_step(run.loss_fn, check_finite_every_step=True),
                      like=run.fresh())
    assert again.reproduced and again.info["batch_index"] == 14  # the failing step alone


def test_bad_settings_and_a_bad_slot_are_refused():
    core = ft.train_step(run.loss_fn)
    for kwargs, match in [({"keep": 0}, "keep"), ({"where": "gpu"}, "where must be"),
                          ({"lr_factor": 2.0, "lr_steps": 1}, "lr_factor must be"),
                          ({"lr_factor": 0.5}, "lr_steps >= 1"),
                          ({"detect": "nan"}, "detect must be a callable")]:
        with pytest.raises(ft.ConfigError, match=match):
            ft.with_rollback(core, **kwargs)
    with pytest.raises(ft.ConfigError, match="check_finite_every_step"):
        ft.with_rollback(ft.train_step(run.loss_fn, check_finite_every_step=True))
    with pytest.raises(ft.ConfigError, match="min_history"):
        ft.divergence.spike(window=5, min_history=10)
    state = run.fresh()
    state = state.replace(slots={**state.slots, "rollback": {
        "rollbacks": -1, "in_a_row": 0, "history": [], "skipped": [], "cooldown_until": 0}})
    with pytest.raises(ft.CheckpointError, match="rollbacks must be an int >= 0, found -1"):
        ft.fit(ft.with_rollback(core), state, run.batches(), epochs=1, **OFF)
    with pytest.raises(ft.MonitorError, match="'val_loss'"):
        ft.with_rollback(core, monitor="val_loss")(run.fresh(), run.batches()[0])


def test_a_snapshot_does_not_restore_into_a_state_of_another_shape():
    state = run.fresh()
    snap = snapshots.take(state, (0, 0), [], [], "host", None)
    other = ft.TrainState.create(nn.Linear(4, 2), ft.optim.adamw(1e-3))
    with pytest.raises(ft.RollbackError, match="changed shape"):
        snapshots.restore(snap, other)
    reused = snapshots.take(state, (0, 1), [], [], "host", snap)
    assert reused.tensors is snap.tensors and snap.nbytes > 0  # the ring reuses storage


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, env=torchrun_env())


@pytest.mark.slow
def test_sigkill_after_a_rollback_and_resume_give_the_same_result(tmp_path):
    whole = _python(str(tmp_path / "a"), str(tmp_path / "a.pt"))
    assert whole.returncode == 0, whole.stderr
    killed = _python(str(tmp_path / "b"), str(tmp_path / "b.pt"), "--kill-at", "21")
    assert killed.returncode == -9, killed.stderr  # really killed, after the rollback
    assert "back to step 15" in killed.stderr
    # every checkpoint written holds a verified state: finite, and none of the window
    saved = sorted((tmp_path / "b").rglob("*.ckpt"))
    assert saved
    for path in saved:
        params = torch.load(path, weights_only=True)["params"]
        assert all(torch.isfinite(t).all() for t in params.values()), path
    resumed = _python(str(tmp_path / "b"), str(tmp_path / "b.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["slot"]["skipped"] == b["slot"]["skipped"] and b["slot"]["rollbacks"] == 1
    assert a["step"] == b["step"] and tensors_equal(a["params"], b["params"])
    (window,) = a["slot"]["skipped"]
    first, last = window["first"][1], window["last"][1]
    assert first <= run.POISON <= last
    clean = _python(str(tmp_path / "c"), str(tmp_path / "c.pt"), "--skip",
                    f"{first}:{last + 1}")
    assert clean.returncode == 0, clean.stderr
    c = torch.load(tmp_path / "c.pt")
    assert c["step"] == a["step"] and tensors_equal(a["params"], c["params"])


@pytest.mark.slow
def test_ranks_roll_back_together_under_ddp(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), str(tmp_path / "root"), str(tmp_path / "out"), "--ddp"],
        capture_output=True, text=True, timeout=180, env=torchrun_env())
    assert done.returncode == 0, done.stdout + done.stderr
    r0, r1 = (torch.load(tmp_path / f"out.rank{r}.pt") for r in (0, 1))
    # the NaN was in rank 1's batch only; both ranks went back, to the same step
    assert r0["slot"] == r1["slot"] and r0["slot"]["rollbacks"] == 1
    assert tensors_equal(r0["params"], r1["params"])
    assert run.POISON in r0["gone"]
    # and both equal a two-rank run on the data without the skipped batches
    assert r0["step"] == r0["reference_step"]
    assert tensors_equal(r0["params"], r0["reference"])


class _Drift(nn.Module):
    """A module that reassigns its buffer (`self.mu = ...`), as many do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("mu", torch.zeros(4))

    def forward(self, x):
        if self.training:
            self.mu = 0.9 * self.mu + 0.1 * x.mean(0).detach()
        return self.lin(x - self.mu)


def test_a_reassigned_buffer_goes_back_too():
    data = poisoned(6, n=16)

    def fresh():
        torch.manual_seed(0)
        return ft.TrainState.create(_Drift(), ft.optim.sgd(0.1), seed=1)
    step = ft.with_rollback(ft.train_step(run.loss_fn), every_n_steps=4)
    state = ft.fit(step, fresh(), data, epochs=1, **OFF)
    ref = ft.fit(ft.train_step(run.loss_fn), fresh(), data[:4] + data[8:], epochs=1, **OFF)
    assert state.step == ref.step and tensors_equal(state.buffers, ref.buffers)
    assert tensors_equal(state.params, ref.params)


def test_an_unfreeze_inside_a_window_starts_good_states_of_the_new_structure():
    data = poisoned(7, n=16)
    state = run.fresh().freeze("0.*")
    hook = ft.every(ft.with_rollback(ft.train_step(run.loss_fn), every_n_steps=4),
                    lambda s, m: s.unfreeze("0.*") if s.step == 6 else None,
                    every_n_steps=1)
    state = ft.fit(hook, state, data, epochs=1, **OFF)
    (skipped,) = state.slots["rollback"]["skipped"]
    assert skipped["step"] == 6 and skipped["first"] == [0, 6]  # judged at the change
    assert all(torch.isfinite(t).all() for t in state.params.values())


def test_nan_is_never_good_whatever_the_detectors_and_a_nan_start_is_refused():
    data = poisoned(6, n=12)
    step = ft.with_rollback(ft.train_step(run.loss_fn), lambda loss, history: loss > 10,
                            every_n_steps=4)
    state = ft.fit(step, run.fresh(), data, epochs=1, **OFF)
    assert state.slots["rollback"]["skipped"][0]["reason"] == "the loss was nan"
    # a state taken out between verifications (a break) is unverified: not a good start
    for state, _ in ft.iterate(step, run.fresh(), data, epochs=1):
        if state.step == 7:
            break
    with pytest.raises(ft.RollbackError, match="non-finite parameters"):
        ft.fit(step, state, data, epochs=2, **OFF)


def test_huge_or_malformed_values_in_a_restored_slot_are_refused():
    core = ft.with_rollback(ft.train_step(run.loss_fn))
    good = {"rollbacks": 0, "in_a_row": 0, "history": [], "skipped": [], "cooldown_until": 0}
    window = {"step": 1, "at": 1, "first": [0, 1, 2], "last": [0, 1], "reason": "x"}
    for bad, match in [({"history": [10**400]}, "finite numbers"),
                       ({"history": [float("nan")]}, "finite numbers"),
                       ({"skipped": [window]}, "records")]:
        state = run.fresh()
        state = state.replace(slots={**state.slots, "rollback": {**good, **bad}})
        with pytest.raises(ft.CheckpointError, match=match):
            ft.fit(core, state, run.batches(), epochs=1, **OFF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("where", ["device", "host"])
def test_cuda_rollback_keeps_good_states_on_the_gpu_or_in_pinned_memory(where):
    device = torch.device("cuda", torch.cuda.current_device())
    data = [tuple(t.to(device) for t in b) for b in poisoned(17)]
    step = ft.with_rollback(ft.train_step(run.loss_fn), every_n_steps=5, where=where)
    state = run.fresh().to(device)
    for state, _ in ft.iterate(step, state, data, epochs=1):
        pass
    assert state.slots["rollback"]["rollbacks"] == 1
    expected_step, expected = ft.train_step(run.loss_fn), run.fresh().to(device)
    for batch in data[:15] + data[20:]:
        expected, _ = expected_step(expected, batch)
    assert state.step == expected.step == 35
    assert tensors_equal(state.params, expected.params)
    kept = snapshots._storage(torch.ones(4, device=device), where)  # what a good state uses
    assert kept.is_pinned() if where == "host" else kept.device == device
