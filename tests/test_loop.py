"""fit / iterate / evaluate / predict: donation, data order, continuation, limits, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import Net, classify, make_batches, make_dataset, tensors_equal
from torch.utils.data import DataLoader, IterableDataset

import ftrain as ft

OFF = {"logger": False, "checkpoint": False, "progress": False}


def fresh(seed: int = 0) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(Net(), ft.optim.adam(1e-2), seed=seed)


STEP = ft.train_step(classify)


def test_fit_donates_its_input():
    state = fresh()
    final = ft.fit(STEP, state, make_batches(3), epochs=1, **OFF)
    assert final.step == 3 and ft.is_donated(state)
    with pytest.raises(ft.DonatedStateError, match="donated to ft.fit"):
        _ = state.params
    with pytest.raises(ft.DonatedStateError):
        state.replace(step=0)
    with pytest.raises(ft.DonatedStateError):  # and giving it to a step or loop again
        STEP(state, make_batches(1)[0])
    with pytest.raises(ft.DonatedStateError):
        ft.fit(STEP, state, make_batches(3), epochs=1, **OFF)
    assert "donated" in repr(state)


def test_donate_false_keeps_the_callers_state():
    state = fresh()
    before = state.copy()
    final = ft.fit(STEP, state, make_batches(3), epochs=1, donate=False, **OFF)
    assert not ft.is_donated(state) and state.step == 0
    assert tensors_equal(state.params, before.params)
    assert not tensors_equal(final.params, before.params)


def test_a_yielded_state_is_invalid_once_the_generator_advances():
    gen = ft.iterate(STEP, fresh(), make_batches(4), epochs=1)
    first, _ = next(gen)
    kept = first.copy()
    second, _ = next(gen)
    assert ft.is_donated(first) and second.step == 2 and kept.step == 1
    gen.close()


def test_the_final_state_of_fit_is_an_ordinary_state():
    final = ft.fit(STEP, fresh(), make_batches(3), epochs=1, **OFF)
    new, _ = STEP(final, make_batches(1)[0])  # a pure call works on it
    assert new.step == 4 and final.step == 3


def test_breaking_out_and_continuing_equals_an_uninterrupted_run():
    data = DataLoader(make_dataset(96), batch_size=16, shuffle=True)
    full = ft.fit(STEP, fresh(seed=5), data, epochs=3, **OFF)
    losses_full = []
    for _, m in ft.iterate(STEP, fresh(seed=5), data, epochs=3):
        losses_full.append(float(m["loss"]))
    part = []
    for state, m in ft.iterate(STEP, fresh(seed=5), data, epochs=3):
        part.append(float(m["loss"]))
        if state.step == 8:  # mid-epoch 1 (6 batches per epoch)
            break
    assert (state.epoch, state.slots["loop"]["batch"]) == (1, 2)
    for state, m in ft.iterate(STEP, state, data, epochs=3):
        part.append(float(m["loss"]))
    assert part == losses_full
    assert tensors_equal(state.params, full.params)


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    seen: dict[int, list[list[int]]] = {}

    def recorder(state, batch):
        seen.setdefault(state.seed, []).append(batch[0][:, 0].tolist())
        return state.replace(step=state.step + 1), {}

    ds = make_dataset(32)
    for seed in (1, 1, 2):
        loader = DataLoader(ds, batch_size=8, shuffle=True)
        ft.fit(recorder, fresh(seed=seed), loader, epochs=2, **OFF)
    first, second = seen[1][:8], seen[1][8:]
    assert first == second  # same seed: same order, whatever the global RNG did
    assert first[:4] != first[4:]  # epochs differ
    assert seen[2][:4] != first[:4]  # seeds differ


def test_send_continues_from_a_changed_state():
    gen = ft.iterate(STEP, fresh(), make_batches(4), epochs=1)
    state, _ = next(gen)
    zeroed = state.copy()
    for p in zeroed.params.values():
        p.zero_()
    state, _ = gen.send(zeroed)  # the step sent back is the one trained on
    assert state.step == 2
    # one step from zero weights: tiny weights (lr 1e-2), not the old ones
    assert float(state.params["fc1.weight"].abs().max()) <= 0.011
    rest = list(gen)
    assert rest[-1][0].step == 4


def test_epoch_end_metrics_arrive_with_the_last_batch():
    class WithEpochEnd:
        inner = STEP

        def __call__(self, state, batch):
            return STEP(state, batch)

        def epoch_end(self, state):
            return state, {"val_score": torch.tensor(float(state.epoch))}

    keys = [sorted(m) for _, m in ft.iterate(WithEpochEnd(), fresh(), make_batches(3),
                                            epochs=2)]
    assert keys[2] == ["acc", "loss", "val_score"] and keys[0] == ["acc", "loss"]
    assert len(keys) == 6


def test_protocol_hooks_run_in_order_and_close_runs_on_error():
    calls = []

    class Hooked:
        def __init__(self, fail_at=None):
            self.fail_at = fail_at

        def init(self, state):
            calls.append("init")
            return state

        def __call__(self, state, batch):
            if state.step == self.fail_at:
                raise RuntimeError("boom")
            calls.append("step")
            return STEP(state, batch)

        def epoch_end(self, state):
            calls.append("epoch_end")
            return state, {}

        def close(self, state):
            calls.append("close")

    ft.fit(Hooked(), fresh(), make_batches(2), epochs=2, **OFF)
    assert calls == ["init", "step", "step", "epoch_end", "step", "step", "epoch_end", "close"]
    calls.clear()
    with pytest.raises(ft.StepError, match=r"step 1 \(epoch 0, batch 1\) failed: "
                                           r"RuntimeError: boom"):
        ft.fit(Hooked(fail_at=1), fresh(), make_batches(2), epochs=2, **OFF)
    assert calls == ["init", "step", "close"]


def test_max_steps_and_epochs_are_totals():
    state = ft.fit(STEP, fresh(), make_batches(4), max_steps=6, **OFF)
    assert state.step == 6 and (state.epoch, state.slots["loop"]["batch"]) == (1, 2)
    state = ft.fit(STEP, state, make_batches(4), max_steps=6, **OFF)
    assert state.step == 6  # already there
    state = ft.fit(STEP, state, make_batches(4), epochs=2, **OFF)
    assert state.step == 8 and state.epoch == 2
    state = ft.fit(STEP, state, make_batches(4), epochs=state.epoch + 1, **OFF)
    assert state.step == 12


def test_iterable_dataset_without_length_runs_with_max_steps():
    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            while True:
                yield torch.randn(6, generator=g), torch.randint(0, 3, (), generator=g)

    loader = DataLoader(Stream(), batch_size=8)
    state = ft.fit(STEP, fresh(), loader, max_steps=5, **OFF)
    assert state.step == 5


def test_limit_train_batches_and_fast_dev_run():
    state = ft.fit(STEP, fresh(), make_batches(8), epochs=2, limit_train_batches=3, **OFF)
    assert state.step == 6 and state.epoch == 2
    state = ft.fit(STEP, fresh(), make_batches(8), epochs=2, limit_train_batches=0.5, **OFF)
    assert state.step == 8
    state = ft.fit(STEP, fresh(), make_batches(8), epochs=10, fast_dev_run=True, **OFF)
    assert state.step == 1
    with pytest.raises(ft.ConfigError, match="fraction"):
        ft.fit(STEP, fresh(), make_batches(8), epochs=1, limit_train_batches=1.5, **OFF)


def test_loop_argument_errors():
    with pytest.raises(ft.ConfigError, match="needs epochs= or max_steps="):
        ft.fit(STEP, fresh(), make_batches(2), **OFF)
    with pytest.raises(ft.ConfigError, match="epochs must be an int"):
        ft.fit(STEP, fresh(), make_batches(2), epochs=1.5, **OFF)  # type: ignore[arg-type]
    with pytest.raises(ft.DataError, match="no batches in epoch 0"):
        ft.fit(STEP, fresh(), [], epochs=1, **OFF)
    with pytest.raises(ft.DataError, match="no batches"):
        ft.fit(STEP, fresh(), DataLoader(make_dataset(4), batch_size=8, drop_last=True),
               epochs=1, **OFF)
    with pytest.raises(ft.DataError, match="one-shot iterator"):
        ft.fit(STEP, fresh(), iter(make_batches(2)), epochs=2, **OFF)
    with pytest.raises(ft.DataError, match="iterable of batches"):
        ft.fit(STEP, fresh(), 42, epochs=1, **OFF)
    with pytest.raises(ft.ConfigError, match="expects a TrainState"):
        ft.fit(STEP, {"not": "a state"}, make_batches(2), epochs=1, **OFF)


def test_a_batch_the_model_rejects_names_step_and_batch():
    data = make_batches(3)
    data[2] = (torch.randn(12, 5), data[2][1])  # wrong feature size
    with pytest.raises(ft.StepError, match=r"step 2 \(epoch 0, batch 2\).*mat1 and mat2"):
        ft.fit(STEP, fresh(), data, epochs=1, **OFF)


def test_nested_batches_move_and_keep_their_structure():
    seen = []

    def loss_fn(model, batch):
        seen.append((type(batch).__name__, sorted(batch)))
        return classify(model, (batch["x"], batch["y"]["label"]))

    data = [{"x": x, "y": {"label": y}} for x, y in make_batches(2)]
    ft.fit(ft.train_step(loss_fn), fresh(), data, epochs=1, **OFF)
    assert seen == [("dict", ["x", "y"])] * 2


def test_evaluate_weights_by_batch_size():
    batches = [(torch.zeros(4, 6), torch.zeros(4, dtype=torch.long)),
               (torch.zeros(12, 6), torch.zeros(12, dtype=torch.long))]

    def metric(model, batch):
        return {"first": batch[0][0, 0] + (1.0 if batch[0].shape[0] == 4 else 0.0)}

    result = ft.evaluate(ft.eval_step(metric), fresh(), batches)
    assert result == {"first": pytest.approx(4 / 16)}
    custom = ft.evaluate(ft.eval_step(metric), fresh(), batches, batch_size=lambda b: 1)
    assert custom == {"first": pytest.approx(0.5)}
    limited = ft.evaluate(ft.eval_step(metric), fresh(), batches, limit_batches=1)
    assert limited == {"first": pytest.approx(1.0)}


def test_evaluate_matches_a_hand_computation_and_leaves_the_state():
    state = ft.fit(STEP, fresh(), make_batches(4), epochs=1, **OFF)
    before = state.copy()
    data = make_batches(3, batch=10, seed=9)
    result = ft.evaluate(ft.eval_step(classify), state, data)
    module = Net()
    module.load_state_dict({**state.params, **state.buffers})
    module.eval()
    with torch.no_grad():
        accs = [classify(module, b)[1]["acc"] for b in data]
    assert result["acc"] == pytest.approx(float(torch.stack(accs).mean()))
    assert tensors_equal(before.params, state.params)
    assert tensors_equal(before.buffers, state.buffers)


def test_evaluate_errors():
    with pytest.raises(ft.DataError, match="no batches"):
        ft.evaluate(ft.eval_step(classify), fresh(), [])
    bad = make_batches(2)
    bad[1] = (torch.randn(3, 2), bad[1][1])
    with pytest.raises(ft.StepError, match="evaluation batch 1 failed"):
        ft.evaluate(ft.eval_step(classify), fresh(), bad)

    def changing(model, batch):
        return {"a": torch.tensor(1.0)} if batch[0].shape[0] == 12 else {"b": torch.tensor(1.0)}

    mixed = [make_batches(1)[0], make_batches(1, batch=5)[0]]
    with pytest.raises(ft.ConfigError, match="earlier batches"):
        ft.evaluate(ft.eval_step(changing), fresh(), mixed)


def test_predict_outputs_in_eval_mode():
    state = fresh()
    data = make_batches(2)
    outs = ft.predict(state, data)
    assert [tuple(o.shape) for o in outs] == [(12, 3), (12, 3)]
    again = ft.predict(state, data)  # eval mode: dropout off, deterministic
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    probs = ft.predict(state, data, lambda m, b: m(b[0]).softmax(-1))
    assert torch.allclose(probs[0].sum(-1), torch.ones(12))


def test_predict_with_several_models():
    state = ft.TrainState.create({"G": torch.nn.Linear(2, 3), "D": torch.nn.Linear(3, 1)})
    out = ft.predict(state, [torch.randn(4, 2)], model="G")
    assert out[0].shape == (4, 3)
    both = ft.predict(state, [torch.randn(4, 2)], lambda ms, x: ms["D"](ms["G"](x)))
    assert both[0].shape == (4, 1)
    with pytest.raises(ft.ConfigError, match="several models"):
        ft.predict(state, [torch.randn(4, 2)])
    with pytest.raises(ft.ConfigError, match="'X' is not in this state"):
        ft.predict(state, [torch.randn(4, 2)], model="X")


def test_dataloader_with_workers_continues_exactly():
    data = DataLoader(make_dataset(64), batch_size=8, shuffle=True, num_workers=2)
    full = [float(m["loss"]) for _, m in ft.iterate(STEP, fresh(seed=2), data, epochs=2)]
    part = []
    for state, m in ft.iterate(STEP, fresh(seed=2), data, epochs=2):
        part.append(float(m["loss"]))
        if state.step == 11:
            break
    part += [float(m["loss"]) for _, m in ft.iterate(STEP, state, data, epochs=2)]
    assert part == full
