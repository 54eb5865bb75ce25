"""with_ema, with_swa, ft.averaged and ft.update_bn, against torch's AveragedModel,
get_ema_multi_avg_fn, SWALR and update_bn run by hand."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CountHostReads, Net, classify, make_batches, tensors_equal
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

import ftrain as ft
from ftrain.layers.swa import current_lrs

QUIET = {"logger": False, "checkpoint": False, "progress": False}


def fresh(net: nn.Module | None = None, lr: float = 0.1) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(net or Net(), ft.optim.sgd(lr, momentum=0.9), seed=0)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def load(module: nn.Module, state: ft.TrainState) -> nn.Module:
    module.load_state_dict({**state.params, **state.buffers})
    return module


def float_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in module.named_buffers() if b.is_floating_point()}


# -- EMA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("every, start", [(1, 0), (2, 3)])
def test_ema_equals_averaged_model_with_get_ema_multi_avg_fn(every, start):
    data = make_batches(6)
    step = ft.with_ema(ft.train_step(classify), 0.9, every_n_steps=every, start_step=start)
    by_hand = AveragedModel(Net(), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    live = Net()
    for state, _ in ft.iterate(step, fresh(), data, epochs=2):
        if state.step >= start and state.step % every == 0:
            by_hand.update_parameters(load(live, state))
        last = state.copy()
    avg = ft.averaged(last)
    assert last.slots["ema"]["count"] == len([s for s in range(1, 13)
                                               if s >= start and s % every == 0])
    assert tensors_equal(avg.params, dict(by_hand.module.named_parameters()))
    assert tensors_equal({n: avg.buffers[n] for n in float_buffers(by_hand.module)},
                         float_buffers(by_hand.module))
    # the integer buffer is the live model's; the live weights are not the average
    assert torch.equal(avg.buffers["bn.num_batches_tracked"],
                       last.buffers["bn.num_batches_tracked"])
    assert not torch.equal(avg.params["fc1.weight"], last.params["fc1.weight"])


def test_ema_buffers_live_keeps_the_live_buffers_and_warmup_uses_tf_rule():
    data = make_batches(4)
    step = ft.with_ema(ft.train_step(classify), 0.99, buffers="live", warmup=True)
    weights = []
    live = Net()
    avg_by_hand = None
    for state, _ in ft.iterate(step, fresh(), data, epochs=1):
        load(live, state)
        n = len(weights)
        decay = min(0.99, (1 + n) / (10 + n))
        weights.append(decay)
        if avg_by_hand is None:
            avg_by_hand = {k: v.detach().clone() for k, v in live.named_parameters()}
        else:
            for k, v in live.named_parameters():
                avg_by_hand[k].lerp_(v.detach(), 1 - decay)
        last = state.copy()
    avg = ft.averaged(last)
    assert tensors_equal(avg.params, avg_by_hand)
    assert avg.buffers is last.buffers and last.slots["ema"]["buffers"] == {}


def test_ema_direct_calls_are_pure_and_match_the_loop():
    data = make_batches(3)
    step = ft.with_ema(ft.train_step(classify), 0.8)
    state = step.init(fresh())
    before = state.copy()
    s = state
    for batch in data:
        s, _ = step(s, batch)
    assert tensors_equal(state.slots["ema"]["params"], before.slots["ema"]["params"])
    assert state.slots["ema"]["count"] == 0 and s.slots["ema"]["count"] == 3
    looped = ft.fit(step, fresh(), data, epochs=1, **QUIET)
    assert tensors_equal(ft.averaged(s).params, ft.averaged(looped).params)


def test_ema_of_a_multi_model_state_under_a_plain_function_step():
    torch.manual_seed(0)
    state = ft.TrainState.create({"G": nn.Linear(2, 2), "D": nn.Linear(2, 1)})

    def shift(state, batch):  # a hand-written step: every weight moves by `batch`
        params = {m: {n: t + batch for n, t in ps.items()} for m, ps in state.params.items()}
        return state.replace(params=params, step=state.step + 1), {}
    step = ft.with_ema(shift, 0.5)
    s = step.init(state)
    for value in (1.0, 2.0, 4.0):
        s, _ = step(s, value)
    avg = ft.averaged(s)
    # the first update copies (+1), then lerp by 1/2 toward +3 and +7: +2, then +4.5
    for m in ("G", "D"):
        for n, t in state.params[m].items():
            assert torch.allclose(avg.params[m][n], t + 4.5), (m, n)


def test_ema_resumes_exactly_from_a_checkpoint(tmp_path):
    data = make_batches(5)
    step = ft.with_ema(ft.train_step(classify), 0.9, every_n_steps=2)
    whole = ft.fit(step, fresh(), data, epochs=3, **QUIET)
    half = ft.fit(step, fresh(), data, epochs=1, **QUIET)
    ft.save(tmp_path / "mid.ckpt", half)
    resumed = ft.load(tmp_path / "mid.ckpt", like=fresh())
    resumed = ft.fit(step, resumed, data, epochs=3, **QUIET)
    assert resumed.slots["ema"]["count"] == whole.slots["ema"]["count"] == 7
    assert tensors_equal(resumed.slots["ema"]["params"], whole.slots["ema"]["params"])
    assert tensors_equal(resumed.slots["ema"]["buffers"], whole.slots["ema"]["buffers"])


def test_averaged_state_evaluates_binds_exports_and_saves(tmp_path):
    data = make_batches(4)
    state = ft.fit(ft.with_ema(ft.train_step(classify), 0.9), fresh(), data, epochs=2,
                   **QUIET)
    avg = ft.averaged(state)
    module = load(Net(), avg).eval()
    x, y = data[0]
    with torch.no_grad():
        expected = F.cross_entropy(module(x), y).item()
        assert torch.equal(ft.bind(avg)(x), module(x))
    result = ft.evaluate(ft.eval_step(classify), avg, [data[0]])
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    program = ft.export.program(avg, x)
    assert torch.allclose(program.module()(x), module(x), atol=1e-6)
    path = ft.save(tmp_path / "ema.ckpt", avg)
    assert tensors_equal(ft.load(path, like=fresh()).params, avg.params)


def test_validation_outside_with_ema_uses_the_average_and_inside_is_refused():
    data, val = make_batches(4), make_batches(2, seed=1)
    evaluator = ft.eval_step(classify)
    step = ft.with_validation(ft.with_ema(ft.train_step(classify), 0.9),
                              ft.averaged(evaluator), val)
    for state, metrics in ft.iterate(step, fresh(), data, epochs=1):
        last = state.copy()
    expected = ft.evaluate(evaluator, ft.averaged(last), val)["loss"]
    live = ft.evaluate(evaluator, last, val)["loss"]
    got = last.slots["validation"]["last"]["val_loss"]
    assert got == pytest.approx(expected, rel=1e-6) and got != pytest.approx(live, rel=1e-6)
    inside = ft.with_ema(ft.with_validation(ft.train_step(classify), ft.averaged(evaluator),
                                            val), 0.9)
    with pytest.raises(ft.ConfigError, match="place with_validation outside"):
        ft.fit(inside, fresh(), data, epochs=1, **QUIET)
    stepwise = ft.with_ema(ft.with_validation(ft.train_step(classify), ft.averaged(evaluator),
                                              val, every_n_steps=1, sanity_steps=0), 0.9)
    with pytest.raises(ft.ConfigError, match="outside the averaging layer"):
        ft.fit(stepwise, fresh(), data, epochs=1, **QUIET)


def test_averaged_evaluator_with_torchmetrics_metrics():
    from torchmetrics.classification import MulticlassAccuracy

    def fn(model, batch):
        logits = model(batch[0])
        return F.cross_entropy(logits, batch[1]), {"acc": (logits, batch[1])}
    evaluator = ft.eval_step(fn, metrics={"acc": MulticlassAccuracy(3, average="micro")})
    data, val = make_batches(4), make_batches(2, seed=1)
    step = ft.with_validation(ft.with_ema(ft.train_step(classify), 0.9),
                              ft.averaged(evaluator), val)
    state = ft.fit(step, fresh(), data, epochs=2, **QUIET)
    expected = ft.evaluate(evaluator, ft.averaged(state), val)
    got = state.slots["validation"]["last"]
    assert got["val_acc"] == pytest.approx(expected["acc"], rel=1e-6)
    assert got["val_loss"] == pytest.approx(expected["loss"], rel=1e-6)



def test_ema_adds_no_host_read_per_step():
    def reads(step):
        with CountHostReads() as counter:
            for _ in ft.iterate(step, fresh(), make_batches(12), max_steps=11):
                pass
        return counter.count
    core = ft.train_step(classify)
    assert reads(ft.with_ema(core, 0.9)) == reads(core)


def test_ema_errors_name_the_problem():
    core = ft.train_step(classify)
    with pytest.raises(ft.ConfigError, match="decay must be a float in"):
        ft.with_ema(core, 1.5)
    with pytest.raises(ft.ConfigError, match="buffers must be"):
        ft.with_ema(core, 0.9, buffers="copy")
    with pytest.raises(ft.ConfigError, match="every_n_steps"):
        ft.with_ema(core, 0.9, every_n_steps=0)
    with pytest.raises(ft.ConfigError, match="two combinators claim the slot 'ema'"):
        ft.with_ema(ft.with_ema(core, 0.9), 0.99)
    with pytest.raises(ft.ConfigError, match="no 'ema' slot"):
        ft.averaged(fresh())
    with pytest.raises(ft.ConfigError, match="TrainState or an evaluator"):
        ft.averaged(3)
    state = ft.with_ema(core, 0.9).init(fresh())
    bad = dict(state.slots["ema"])
    bad["params"] = {**bad["params"], "fc1.weight": torch.zeros(2, 2)}
    with pytest.raises(ft.CheckpointError, match=r"fc1.weight must be torch.float32\[16, 6\]"):
        ft.with_ema(core, 0.9).init(state.replace(slots={"ema": bad}))
    with pytest.raises(ft.CheckpointError, match="holds a 'ema' average"):
        ft.with_swa(core, 0.05).init(state.replace(slots={"swa": state.slots["ema"]}))
    stale = state.replace(step=5)
    with pytest.raises(ft.ConfigError, match="last brought up to date at step 0"):
        ft.averaged(stale)


# -- SWA ---------------------------------------------------------------------------------

def swa_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_swa_average_lrs_and_bn_match_torch_on_the_same_weights():
    data, epochs = make_batches(5), 6
    step = ft.with_swa(ft.train_step(swa_loss), swa_lrs=0.02, swa_epoch_start=3,
                       annealing_epochs=2, bn_data=data)
    by_hand = AveragedModel(bn_net())
    live = bn_net()
    lrs = []
    for state, _ in ft.iterate(step, fresh(bn_net()), data, epochs=epochs):
        if state.step % len(data) == 1:  # the first step of an epoch: the lr it used
            lrs.append(current_lrs(state.optimizer, state.opt_state, "test")[None])
        if state.step % len(data) == 0 and state.step // len(data) >= 3:
            by_hand.update_parameters(load(live, state))
        last = state.copy()
    assert last.slots["swa"]["count"] == 4 and last.slots["swa"]["bn"] == 4
    # SWALR on a torch optimizer, stepped after each SWA epoch
    opt = torch.optim.SGD(bn_net().parameters(), lr=0.1)
    expected = []
    sched = None
    for e in range(epochs):
        if e == 2:
            sched = SWALR(opt, swa_lr=0.02, anneal_epochs=2, anneal_strategy="cos")
        expected.append(opt.param_groups[0]["lr"])
        if sched is not None:
            sched.step()
    assert lrs == pytest.approx(expected, rel=1e-12)
    update_bn(data, by_hand)
    avg = ft.averaged(last, "swa")
    for name, p in by_hand.module.named_parameters():  # 1 / (n + 1): float32 in torch's
        assert torch.allclose(avg.params[name], p, atol=1e-7, rtol=0), name
    for name, b in float_buffers(by_hand.module).items():
        assert torch.allclose(avg.buffers[name], b, atol=1e-6, rtol=1e-6), name


@pytest.mark.parametrize("start", [1, 3])
def test_swa_without_annealing_sets_its_lr_when_the_first_swa_epoch_starts(start):
    # SWALR(anneal_epochs=0) sets swa_lr when built, at the start of epoch swa_start
    data, epochs = make_batches(2), 4
    step = ft.with_swa(ft.train_step(swa_loss), swa_lrs=0.02, swa_epoch_start=start,
                       annealing_epochs=0)
    lrs = [current_lrs(s.optimizer, s.opt_state, "test")[None]
           for s, _ in ft.iterate(step, fresh(bn_net()), data, epochs=epochs)
           if s.step % len(data) == 1]  # the first step of an epoch: the lr it used
    opt = torch.optim.SGD(bn_net().parameters(), lr=0.1)
    expected, sched = [], None
    for e in range(epochs):
        if e == start - 1:
            sched = SWALR(opt, swa_lr=0.02, anneal_epochs=0)
        expected.append(opt.param_groups[0]["lr"])
        if sched is not None:
            sched.step()
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert expected[start - 1] == 0.02


def test_swa_end_to_end_against_a_torch_loop():
    data, epochs = make_batches(5), 5
    step = ft.with_swa(ft.train_step(swa_loss), swa_lrs=0.05, swa_epoch_start=0.6,
                       annealing_epochs=1, annealing_strategy="linear", bn_data=data)
    state = ft.fit(step, fresh(bn_net()), data, epochs=epochs, **QUIET)
    model = bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    swa, sched = AveragedModel(model), None
    start = int(epochs * 0.6) - 1  # Lightning's rule: the 0-based start epoch
    for e in range(epochs):
        if e == start:
            sched = SWALR(opt, swa_lr=0.05, anneal_epochs=1, anneal_strategy="linear")
        for b in data:
            opt.zero_grad()
            swa_loss(model, b).backward()
            opt.step()
        if e >= start:
            swa.update_parameters(model)
            sched.step()
    update_bn(data, swa)
    avg = ft.averaged(state, "swa")
    for name, t in [*swa.module.named_parameters(), *float_buffers(swa.module).items()]:
        source = avg.params if name in avg.params else avg.buffers
        assert torch.allclose(source[name], t, atol=1e-5, rtol=1e-5), name


def test_swa_resumes_exactly_and_bn_is_refused_until_recomputed(tmp_path):
    data = make_batches(4)
    kwargs = {"swa_lrs": 0.03, "swa_epoch_start": 2, "annealing_epochs": 3}
    step = ft.with_swa(ft.train_step(swa_loss), **kwargs, bn_data=data)
    whole = ft.fit(step, fresh(bn_net()), data, epochs=5, **QUIET)
    half = ft.fit(step, fresh(bn_net()), data, epochs=3, **QUIET)
    path = ft.save(tmp_path / "mid.ckpt", half)
    resumed = ft.fit(step, ft.load(path, like=fresh(bn_net())), data, epochs=5, **QUIET)
    assert tensors_equal(resumed.params, whole.params)  # the lr schedule resumed too
    assert tensors_equal(resumed.slots["swa"]["params"], whole.slots["swa"]["params"])
    assert tensors_equal(resumed.slots["swa"]["buffers"], whole.slots["swa"]["buffers"])
    no_bn = ft.fit(ft.with_swa(ft.train_step(swa_loss), **kwargs), fresh(bn_net()), data,
                   epochs=5, **QUIET)
    with pytest.raises(ft.ConfigError, match="ft.update_bn"):
        ft.averaged(no_bn, "swa")
    done = ft.update_bn(no_bn, data)
    assert tensors_equal(ft.averaged(done, "swa").buffers, ft.averaged(whole, "swa").buffers)


def test_swa_errors():
    core = ft.train_step(swa_loss)
    with pytest.raises(ft.ConfigError, match="swa_epoch_start must be"):
        ft.with_swa(core, 0.1, swa_epoch_start=0)
    with pytest.raises(ft.ConfigError, match="annealing_strategy"):
        ft.with_swa(core, 0.1, annealing_strategy="exp")
    with pytest.raises(ft.ConfigError, match="swa_lrs must be a positive float"):
        ft.with_swa(core, -1.0)
    step = ft.with_swa(core, 0.1, swa_epoch_start=0.5)
    with pytest.raises(ft.ConfigError, match="needs the loop's epochs="):
        ft.fit(step, fresh(bn_net()), make_batches(2), max_steps=4, **QUIET)
    named = ft.with_swa(core, {"nope*": 0.1}, swa_epoch_start=1)
    with pytest.raises(ft.ConfigError, match="swa_lrs names groups"):
        ft.fit(named, fresh(bn_net()), make_batches(2), epochs=2, **QUIET)
    ema_state = ft.fit(ft.with_ema(core, 0.9), fresh(bn_net()), make_batches(2), epochs=1,
                       **QUIET)
    with pytest.raises(ft.ConfigError, match="holds a 'ema' average"):
        ft.update_bn(ema_state, make_batches(2), name="ema")
    assert math.isfinite(ft.evaluate(ft.eval_step(swa_loss), ft.averaged(ema_state),
                                     make_batches(2))["loss"])


@pytest.mark.parametrize("every", [1, 2])
def test_ema_state_left_by_a_failing_outer_layer_resumes_exactly(every):
    # with_validation fails after with_ema updated its average in place: err.state (the
    # core's state) must carry the slot as updated, so a resume continues the same average
    data = make_batches(4)
    failed = []

    def evaluator(model, batch):
        if not failed:
            failed.append(True)
            raise KeyboardInterrupt
        return classify(model, batch)[0]

    def stack(ev):
        return ft.with_validation(ft.with_ema(ft.train_step(classify), 0.5,
                                              every_n_steps=every),
                                  ft.eval_step(ev), data[:1], every_n_steps=3,
                                  sanity_steps=0)
    with pytest.raises(KeyboardInterrupt) as info:
        ft.fit(stack(evaluator), fresh(), data, epochs=1, **QUIET)
    left = info.value.state
    assert left.step == 3 and left.slots["ema"]["seen"] == 3
    resumed = ft.fit(stack(evaluator), left, data, epochs=1, **QUIET)
    whole = ft.fit(stack(evaluator), fresh(), data, epochs=1, **QUIET)
    assert tensors_equal(resumed.slots["ema"]["params"], whole.slots["ema"]["params"])
    assert resumed.slots["ema"]["count"] == whole.slots["ema"]["count"]

