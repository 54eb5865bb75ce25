"""with_accumulation(step, n, over="batches"): one update from n consecutive batches,
weighted by samples (or tokens); its partial gradient in a slot, so a run stopped or
killed mid-group resumes exactly; the last partial group of an epoch still updates."""

from __future__ import annotations

import json
import logging
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tensors_equal, torchrun_env

import ftrain as ft

OFF = {"logger": False, "checkpoint": False, "progress": False}
SCRIPTS = pathlib.Path(__file__).parent / "scripts"
G = torch.Generator().manual_seed(3)
X = torch.randn(40, 3, generator=G)
Y = torch.randn(40, 1, generator=G)


def batches(sizes):
    """Consecutive batches of these sizes from (X, Y)."""
    return list(zip(X[:sum(sizes)].split(sizes), Y[:sum(sizes)].split(sizes)))


def mse(m, b):
    return torch.nn.functional.mse_loss(m(b[0]), b[1])


def fresh(optimizer=None) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(torch.nn.Linear(3, 1), optimizer or ft.optim.sgd(0.1), seed=1)


def by_hand(state: ft.TrainState, group, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """SGD on the mean loss over all the group's samples, with plain autograd."""
    w = state.params["weight"].clone().requires_grad_(True)
    b = state.params["bias"].clone().requires_grad_(True)
    x = torch.cat([g[0] for g in group])
    y = torch.cat([g[1] for g in group])
    loss = ((x @ w.T + b - y) ** 2).mean()
    gw, gb = torch.autograd.grad(loss, [w, b])
    return {"weight": (w - lr * gw).detach(), "bias": (b - lr * gb).detach()}


def close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# -- the update: one step on all of the group's samples --------------------------------------

def test_a_group_of_batches_of_any_size_equals_one_step_on_all_their_samples():
    group = batches([5, 8, 3])
    expected = by_hand(fresh(), group)
    step = ft.with_accumulation(ft.train_step(mse), 3, over="batches")
    state = fresh()
    for i, batch in enumerate(group):  # direct (pure) calls
        before = state
        state, metrics = step(state, batch)
        assert sorted(metrics) == ["loss"] and state.step == i + 1
        close(metrics["loss"], ft.train_step(mse)(fresh(), batch)[1]["loss"])  # its own
        assert before.step == i  # the input is untouched
    assert int(state.opt_state["count"]) == 1 and state.slots["accumulation"]["batches"] == 0
    close(state.params, expected)
    looped = ft.fit(step, fresh(), group, epochs=1, **OFF)  # the loop: .grad held between
    close(looped.params, expected)
    assert tensors_equal(looped.params, state.params)


def test_tokens_weight_a_masked_mean_over_the_whole_group():
    g = torch.Generator().manual_seed(4)
    seqs = [(torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 1, generator=g),
             (torch.arange(6) < n).float().expand(2, 6)) for n in (2, 6, 3)]

    def masked(m, b):  # a mean over the batch's real tokens
        x, y, mask = b
        return (((m(x) - y) ** 2).squeeze(-1) * mask).sum() / mask.sum()

    w = fresh().params["weight"].clone().requires_grad_(True)
    bias = fresh().params["bias"].clone().requires_grad_(True)
    total = sum(((((x @ w.T + bias) - y) ** 2).squeeze(-1) * mask).sum()
                for x, y, mask in seqs) / sum(mask.sum() for _, _, mask in seqs)
    gw, gb = torch.autograd.grad(total, [w, bias])
    expected = {"weight": (w - 0.1 * gw).detach(), "bias": (bias - 0.1 * gb).detach()}

    tokens = ft.with_accumulation(ft.train_step(masked), 3, over="batches",
                                  weight=lambda b: b[2].sum())  # a 0-d tensor: no host read
    close(ft.fit(tokens, fresh(), seqs, epochs=1, **OFF).params, expected)
    samples = ft.with_accumulation(ft.train_step(masked), 3, over="batches")  # 2 each
    assert not torch.allclose(ft.fit(samples, fresh(), seqs, epochs=1, **OFF).params["weight"],
                              expected["weight"], atol=1e-4)


def test_steps_count_batches_and_the_schedule_updates():
    schedule = ft.optim.schedules.warmup_cosine(0.2, warmup_steps=1, total_steps=3)
    data = batches([4, 6, 5, 3, 2, 7])
    step = ft.with_accumulation(ft.train_step(mse), 2, over="batches")
    counts = [(s.step, int(s.opt_state["count"])) for s, _ in
              ft.iterate(step, fresh(ft.optim.sgd(schedule)), data, epochs=1)]
    assert counts == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3)]
    expected = fresh(ft.optim.sgd(schedule))  # three whole-group steps, the same schedule
    for i in range(0, 6, 2):
        whole = (torch.cat([data[i][0], data[i + 1][0]]), torch.cat([data[i][1], data[i + 1][1]]))
        expected, _ = ft.train_step(mse)(expected, whole)
    close(ft.fit(step, fresh(ft.optim.sgd(schedule)), data, epochs=1, **OFF).params,
          expected.params)


def test_an_epochs_last_partial_group_still_updates():
    data = batches([4, 6, 5, 3, 2])  # groups of 2: [0, 1], [2, 3], [4] each epoch
    step = ft.with_accumulation(ft.train_step(mse), 2, over="batches")
    state = ft.fit(step, fresh(), data, epochs=2, **OFF)
    assert state.step == 10 and int(state.opt_state["count"]) == 6
    expected = fresh()
    for _ in range(2):
        for group in (data[0:2], data[2:4], data[4:5]):
            expected = expected.replace(params=by_hand(expected, group))
    close(state.params, expected.params)


# -- stopping and resuming mid-group --------------------------------------------------------

def test_a_checkpoint_mid_group_holds_the_partial_gradient_and_resumes_exactly(tmp_path,
                                                                              caplog):
    data = batches([4, 6, 5, 3, 2, 7])
    step = ft.with_accumulation(ft.train_step(mse), 4, over="batches")
    straight = ft.fit(step, fresh(ft.optim.adam(1e-2)), data, epochs=2, **OFF)
    saving = ft.with_checkpointing(step, tmp_path, every_n_steps=1, every_n_epochs=None)
    with caplog.at_level(logging.WARNING, logger="ftrain"):
        ft.fit(saving, fresh(ft.optim.adam(1e-2)), data, max_steps=8, **OFF)  # 2 into group
    assert "stopping 2 batch(es) into an accumulation group of 4" in caplog.text
    slot = torch.load(tmp_path / "last.ckpt", weights_only=True)["slots"]["accumulation"]
    assert slot["batches"] == 2 and sorted(slot["grads"]) == ["bias", "weight"]
    state = ft.load(tmp_path / "last.ckpt", like=fresh(ft.optim.adam(1e-2)))
    resumed = ft.fit(step, state, data, epochs=2, **OFF)
    assert tensors_equal(resumed.params, straight.params)
    assert int(resumed.opt_state["count"]) == int(straight.opt_state["count"]) == 4


@pytest.mark.slow
def test_sigkill_mid_group_then_resume_is_exact(tmp_path):
    pytest.importorskip("torchdata")

    def launch(root, out):
        return subprocess.Popen([sys.executable, str(SCRIPTS / "stateful_run.py"), str(root),
                                 str(out), "--accumulate", "4", "--sleep", "0.03"],
                                env=torchrun_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    def steps(out):
        lines = out.read_text().splitlines() if out.exists() else []
        return {int(p[0]): p[1] for p in (line.split() for line in lines) if len(p) == 3}

    ref = launch(tmp_path / "ref", tmp_path / "ref.txt")
    assert ref.wait(timeout=120) == 0, ref.stdout.read().decode()
    out = tmp_path / "run.txt"
    proc = launch(tmp_path / "run", out)
    deadline = time.monotonic() + 60
    while max(steps(out), default=0) < 9:  # 9: one batch into the second pass's group
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert launch(tmp_path / "run", out).wait(timeout=120) == 0
    assert steps(out) == steps(tmp_path / "ref.txt")  # every loss, bitwise
    final = torch.load(str(out) + ".final.pt", weights_only=True)
    assert tensors_equal(final, torch.load(str(tmp_path / "ref.txt") + ".final.pt",
                                           weights_only=True))


# -- with_amp and non-finite losses: a group updates as a whole or not at all --------------

def test_float16_an_overflow_in_any_batch_skips_the_groups_update():
    data = batches([4, 4, 4, 4])

    def loss(m, b):
        value = mse(m, b)
        return value * float("inf") if b[0] is data[0][0] else value

    step = ft.with_accumulation(ft.with_amp(ft.train_step(loss), torch.float16,
                                            init_scale=256.0), 2, over="batches")
    state = fresh()
    start = state.params
    state, _ = step(state, data[0])  # inf: no update yet, the scale is left alone
    assert float(state.slots["amp"]["scale"]) == 256.0
    state, _ = step(state, data[1])  # the group's end: skipped as a whole
    assert int(state.slots["amp"]["skipped"]) == 1 and int(state.opt_state["count"]) == 0
    assert float(state.slots["amp"]["scale"]) == 128.0 and tensors_equal(state.params, start)
    state, _ = step(state, data[2])
    state, _ = step(state, data[3])  # the next group: clean (float16 forward: ~1e-3)
    assert int(state.slots["amp"]["skipped"]) == 1 and int(state.opt_state["count"]) == 1
    torch.testing.assert_close(state.params, by_hand(fresh(), data[2:4]), rtol=0, atol=2e-3)


def test_on_nonfinite_skip_drops_a_group_with_a_nan_in_any_batch():
    data = batches([4, 4, 4, 4])

    def loss(m, b):
        value = mse(m, b)
        return value * float("nan") if b[0] is data[0][0] else value

    step = ft.with_accumulation(ft.train_step(loss, on_nonfinite="skip"), 2, over="batches")
    state = ft.fit(step, fresh(), data, epochs=1, **OFF)
    close(state.params, by_hand(fresh(), data[2:4]))  # the first group left no trace


# -- errors -----------------------------------------------------------------------------------

def test_bad_settings_are_refused_when_built():
    core = ft.train_step(mse)
    with pytest.raises(ft.ConfigError, match="over must be 'micro_batches'.*got 'epochs'"):
        ft.with_accumulation(core, 2, over="epochs")  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match="split= .* does not apply"):
        ft.with_accumulation(core, 2, over="batches", split=lambda b: [b])
    with pytest.raises(ft.ConfigError, match="weight= is a function .* got int"):
        ft.with_accumulation(core, 2, over="batches", weight=3)  # type: ignore[arg-type]
    with pytest.raises(ft.ConfigError, match="number of batches must be an int >= 1, got 0"):
        ft.with_accumulation(core, 0, over="batches")
    with pytest.raises(ft.ConfigError, match="not supported with with_dp"):
        ft.with_accumulation(ft.with_dp(core, noise_multiplier=1.0, max_grad_norm=1.0,
                                        sample_rate=0.1), 2, over="batches")
    step = ft.compile(ft.with_accumulation(core, 2, over="batches"), fallback=False)
    with pytest.raises(ft.ConfigError, match="ft.compile does not support"):
        step(fresh(), batches([4])[0])


def test_a_weight_that_is_not_a_positive_number_is_an_error():
    step = ft.with_accumulation(ft.train_step(mse), 2, over="batches", weight=lambda b: 0)
    with pytest.raises(ft.DataError, match=r"step 0: .*weight\(batch\) must return a number "
                                           r"> 0 or a 0-d tensor, got 0"):
        step(fresh(), batches([4])[0])
    step = ft.with_accumulation(ft.train_step(mse), 2, over="batches", weight=lambda b: "x")
    with pytest.raises(ft.DataError, match="got 'x'"):
        step(fresh(), batches([4])[0])


def test_a_partial_group_from_another_setting_is_refused_on_resume():
    data = batches([4, 6, 5])
    step = ft.with_accumulation(ft.train_step(mse), 3, over="batches")
    state = ft.fit(step, fresh(), data, max_steps=2, **OFF)  # 2 of 3 batches held
    fewer = ft.with_accumulation(ft.train_step(mse), 2, over="batches")
    with pytest.raises(ft.ConfigError, match="holds 2 batches; .*needs fewer than 2"):
        ft.fit(fewer, state.copy(), data, epochs=1, **OFF)
    slot = state.slots["accumulation"]
    other = state.replace(slots={**state.slots, "accumulation": {**slot, "world": 2}})
    with pytest.raises(ft.ConfigError, match="under 2 process.*this run has 1"):
        ft.fit(step, other, data, epochs=1, **OFF)
    bad = {**slot, "grads": {**slot["grads"], "weight": torch.zeros(2, 2)}}
    with pytest.raises(ft.CheckpointError, match=r"gradient of 'weight' must be a "
                                                 r"torch.float32 tensor of shape \[1, 3\]"):
        ft.fit(step, state.replace(slots={**state.slots, "accumulation": bad}), data,
               epochs=1, **OFF)
    with pytest.raises(ft.CheckpointError, match="'accumulation' slot: batches must be"):
        ft.fit(step, state.replace(slots={**state.slots, "accumulation": {
            **slot, "batches": -1}}), data, epochs=1, **OFF)


# -- with_ddp: no_sync before a group's end, every rank's weight, a resume mid-group ---------

@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_make_one_update_per_group_equal_to_one_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPTS / "ddp_accumulate.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=torchrun_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["local_grads_differ"]  # no all-reduce before the group's last batch
        assert got["max_diff_to_one_process"] < 1e-6, got
        assert got["resumed_bitwise"] and got["counts"] == [3, 3]


class NanGradOnce(torch.autograd.Function):
    """Identity forward; a NaN gradient the first time `armed` is set."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if NanGradOnce.armed:
            NanGradOnce.armed = False
            return torch.full_like(g, float("nan"))
        return g


def poisoned_mse(m, b):
    out = m(b[0])
    if b[0].shape[0] == 5:  # the poisoned batch
        out = NanGradOnce.apply(out)
    return torch.nn.functional.mse_loss(out, b[1])


def test_a_step_failing_after_its_backward_never_leaves_its_gradient_behind():
    """A gradient check failing after the backward: outside a group the gradient is
    dropped and the run continues exactly; inside a group the partial gradient cannot be
    told apart from it, so no state is attached (never a silently doubled gradient)."""
    data = batches([4, 5, 4, 4])
    core = ft.train_step(poisoned_mse, check_finite_every_step=True)
    NanGradOnce.armed = True
    with pytest.raises(ft.errors.NonFiniteLossError) as err:
        ft.fit(core, fresh(), data, epochs=1, **OFF)
    assert err.value.state is not None and err.value.state.step == 1
    done = ft.fit(core, err.value.state, data, epochs=1, **OFF)  # batch 1 again, clean
    expected = ft.fit(core, fresh(), data, epochs=1, **OFF)
    assert tensors_equal(done.params, expected.params)
    grouped = ft.with_accumulation(core, 4, over="batches")
    NanGradOnce.armed = True
    with pytest.raises(ft.errors.NonFiniteLossError) as err:
        ft.fit(grouped, fresh(), data, epochs=1, **OFF)
    assert getattr(err.value, "state", None) is None  # mid-group: refused, not guessed
