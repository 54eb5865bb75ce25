"""with_amp, with_accumulation, manual_step, and the data sharding with_ddp uses."""

from __future__ import annotations

import pytest
import torch
from helpers import classify, make_batches, make_dataset, tensors_equal
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft
from ftrain.data import batches as ft_data


def mlp(d_in: int = 6, hidden: int = 16, d_out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def plain_classify(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


# -- bfloat16 ----------------------------------------------------------------------------

def _digits_accuracy(precision: str) -> float:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True)
    test = [(x[1400:], y[1400:])]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    step = ft.train_step(plain_classify)
    if precision == "bf16":
        step = ft.with_amp(step, torch.bfloat16)
    state = ft.TrainState.create(model, ft.optim.adam(3e-3), seed=0)
    state = ft.fit(step, state, train, epochs=8, logger=False, checkpoint=False,
                   progress=False)
    evaluator = ft.eval_step(lambda m, b: {"acc": (m(b[0]).argmax(-1) == b[1]).float().mean()})
    return ft.evaluate(evaluator, state, test)["acc"]


def test_bfloat16_autocast_trains_digits_as_well_as_float32():
    full, half = _digits_accuracy("32"), _digits_accuracy("bf16")
    assert full > 0.9 and half > 0.9
    assert abs(full - half) < 0.03


def test_bfloat16_runs_the_forward_in_bfloat16_and_has_no_scaler():
    seen = []

    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return F.cross_entropy(out.float(), batch[1])

    step = ft.with_amp(ft.train_step(loss_fn), torch.bfloat16)
    state = ft.TrainState.create(mlp(), ft.optim.sgd(0.1))
    state, _ = step(state, make_batches(1)[0])
    assert seen == [torch.bfloat16]
    assert "amp" not in state.slots and ft.loss_scale(state) is None


# -- float16 loss scaling -----------------------------------------------------------------

def _poisoned_loss(model, batch):
    """A finite loss whose gradient is inf when the batch says so (an fp16 overflow)."""
    x, y, poison = batch
    out = model(x)
    if bool(poison):
        out.register_hook(lambda g: g * float("inf"))
    return F.cross_entropy(out.float(), y)


def _fp16_step(interval: int = 3):
    return ft.with_amp(ft.train_step(_poisoned_loss), torch.float16, init_scale=1024.0,
                       growth_interval=interval)


def _batch(poison: bool, seed: int = 0):
    x, y = make_batches(1, seed=seed)[0]
    return x, y, torch.tensor(poison)


def test_float16_overflow_skips_exactly_that_update():
    schedule = ft.optim.schedules.cosine_decay(1e-2, 100)
    state = ft.TrainState.create(mlp(), ft.optim.adam(schedule), seed=0)
    step = _fp16_step()
    state, _ = step(state, _batch(False))
    before = state.copy()
    lr_before = state.optimizer.learning_rates(state.opt_state)
    state, metrics = step(state, _batch(True, seed=1))
    assert torch.isfinite(metrics["loss"])
    assert state.step == before.step + 1  # iterations still count
    assert tensors_equal(state.params, before.params)
    assert tensors_equal(state.opt_state, before.opt_state)  # count and Adam moments
    assert state.optimizer.learning_rates(state.opt_state) == lr_before
    amp = state.slots["amp"]
    assert float(amp["scale"]) == 512.0  # backed off by half
    assert int(amp["skipped"]) == 1 and int(amp["growth_tracker"]) == 0
    # the next clean step updates again
    state, _ = step(state, _batch(False, seed=2))
    assert not tensors_equal(state.params, before.params)
    assert int(state.opt_state["count"]) == 2


def test_float16_scale_grows_after_the_interval_and_survives_save_load(tmp_path):
    state = ft.TrainState.create(mlp(), ft.optim.adam(1e-2), seed=0)
    step = _fp16_step(interval=3)
    for i in range(3):
        state, _ = step(state, _batch(False, seed=i))
    assert ft.loss_scale(state) == 2048.0
    state, _ = step(state, _batch(True, seed=9))
    ft.save(tmp_path / "s.ckpt", state)
    template = ft.TrainState.create(mlp(), ft.optim.adam(1e-2))
    loaded = ft.load(tmp_path / "s.ckpt", like=template)
    assert tensors_equal(loaded.slots["amp"], state.slots["amp"])
    assert ft.loss_scale(loaded) == 1024.0
    a, _ = step(loaded, _batch(False, seed=5))
    b, _ = step(state, _batch(False, seed=5))
    assert tensors_equal(a.params, b.params) and tensors_equal(a.slots["amp"], b.slots["amp"])


def test_float16_in_a_loop_equals_direct_calls():
    batches = [_batch(i == 2, seed=i) for i in range(5)]
    direct = ft.TrainState.create(mlp(), ft.optim.adam(1e-2), seed=0)
    step = _fp16_step()
    for b in batches:
        direct, _ = step(direct, b)
    looped = ft.TrainState.create(mlp(), ft.optim.adam(1e-2), seed=0)
    looped = ft.fit(step, looped, batches, epochs=1, logger=False, checkpoint=False,
                    progress=False)
    assert tensors_equal(looped.params, direct.params)
    assert tensors_equal(looped.slots["amp"], direct.slots["amp"])
    assert int(looped.slots["amp"]["skipped"]) == 1


def test_amp_errors_name_the_problem():
    step = ft.train_step(plain_classify)
    with pytest.raises(ft.ConfigError, match="bfloat16 or torch.float16"):
        ft.with_amp(step, torch.float32)
    amp = ft.with_amp(step)
    with pytest.raises(ft.ConfigError, match="amp option is already set"):
        ft.with_amp(amp, torch.float16)
    ft.with_amp(step, torch.float16)  # `step` itself was not changed by the first
    with pytest.raises(ft.ConfigError, match="core step built by ft.train_step"):
        ft.with_amp(lambda s, b: (s, {}))
    with pytest.raises(ft.ConfigError, match="growth_factor"):
        ft.with_amp(ft.train_step(plain_classify), torch.float16, growth_factor=0.5)


def test_a_foreign_amp_slot_is_rejected_at_init():
    state = ft.TrainState.create(mlp(), ft.optim.sgd(0.1))
    state = state.replace(slots={**state.slots, "amp": {"scale": 3.0}})
    step = ft.with_amp(ft.train_step(plain_classify), torch.float16)
    with pytest.raises(ft.CheckpointError, match="not a loss-scaler slot"):
        ft.fit(step, state, make_batches(2), epochs=1, logger=False, checkpoint=False,
               progress=False)


# -- gradient accumulation ------------------------------------------------------------------

@pytest.mark.parametrize("batch", [32, 30])  # an even and an uneven split
def test_accumulating_4_micro_batches_equals_one_step_on_the_whole_batch(batch):
    data = make_batches(5, batch=batch)
    whole = ft.TrainState.create(mlp(), ft.optim.adam(1e-2), seed=0)
    whole = ft.fit(ft.train_step(plain_classify), whole, data, epochs=2, logger=False,
                   checkpoint=False, progress=False)
    acc = ft.TrainState.create(mlp(), ft.optim.adam(1e-2), seed=0)
    step = ft.with_accumulation(ft.train_step(plain_classify), 4)
    acc = ft.fit(step, acc, data, epochs=2, logger=False, checkpoint=False, progress=False)
    assert acc.step == whole.step == 10  # steps count updates
    assert int(acc.opt_state["count"]) == 10
    for name in whole.params:
        torch.testing.assert_close(acc.params[name], whole.params[name], rtol=1e-5,
                                   atol=1e-6)


def test_accumulation_metrics_are_the_whole_batch_metrics():
    batch = make_batches(1, batch=24)[0]
    state = ft.TrainState.create(mlp(), ft.optim.sgd(0.1))
    _, whole = ft.train_step(classify)(state, batch)
    _, parts = ft.with_accumulation(ft.train_step(classify), 3)(state, batch)
    torch.testing.assert_close(parts["loss"], whole["loss"])
    torch.testing.assert_close(parts["acc"], whole["acc"])


def test_accumulation_with_a_custom_split_and_amp_together():
    batch = make_batches(1, batch=16)[0]
    state = ft.TrainState.create(mlp(), ft.optim.sgd(0.1))
    step = ft.with_amp(ft.train_step(plain_classify), torch.float16)
    step = ft.with_accumulation(step, 2, split=lambda b: [(b[0][:8], b[1][:8]),
                                                          (b[0][8:], b[1][8:])])
    new, _ = step(state, batch)
    ref, _ = ft.with_accumulation(ft.train_step(plain_classify), 2)(state, batch)
    for name in ref.params:  # float16 autocast: close to the float32 result
        torch.testing.assert_close(new.params[name], ref.params[name], rtol=1e-2, atol=1e-3)
    assert ft.loss_scale(new) == 65536.0


def test_accumulation_errors_name_the_problem():
    with pytest.raises(ft.ConfigError, match="micro_batches must be an int >= 1"):
        ft.with_accumulation(ft.train_step(plain_classify), 0)
    state = ft.TrainState.create(mlp(), ft.optim.sgd(0.1))
    ragged = (torch.randn(8, 6), torch.randint(0, 3, (6,)))
    with pytest.raises(ft.DataError, match="different lengths"):
        ft.with_accumulation(ft.train_step(plain_classify), 2)(state, ragged)
    with pytest.raises(ft.ConfigError, match="in a manual step call m.backward"):
        ft.with_accumulation(ft.manual_step(lambda m, b: {}), 2)
    bad = ft.with_accumulation(ft.train_step(plain_classify), 2, split=lambda b: b[0])
    with pytest.raises(ft.DataError, match="non-empty list"):
        bad(state, make_batches(1)[0])


# -- manual optimization ------------------------------------------------------------------

def _same_tree(a, b) -> bool:
    from torch.utils import _pytree as pytree
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def _two_models():
    torch.manual_seed(0)
    models = {"G": nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 6)),
              "D": nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))}
    opts = {"G": ft.optim.adam(1e-2), "D": ft.optim.sgd(0.05, momentum=0.9)}
    return ft.TrainState.create(models, opts, seed=1)


def gan(m, real):
    G, D = m.model["G"], m.model["D"]
    fake = G(torch.randn(len(real), 4))
    ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
    d_loss = (F.binary_cross_entropy_with_logits(D(real), ones)
              + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros))
    m.update(d_loss, "D")
    g_loss = F.binary_cross_entropy_with_logits(D(fake), ones)
    m.update(g_loss, "G")
    return {"d_loss": d_loss, "g_loss": g_loss}


def test_manual_step_is_pure_when_called_and_bitwise_equal_in_a_loop():
    data = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    step = ft.manual_step(gan)
    direct = _two_models()
    original = direct.copy()
    first, _ = step(direct, data[0])
    assert tensors_equal(direct.params, original.params)  # the input is untouched
    assert not tensors_equal(first.params["G"], original.params["G"])
    for b in data[1:]:
        first, metrics = step(first, b)
    looped = ft.fit(step, _two_models(), data, epochs=1, logger=False, checkpoint=False,
                    progress=False)
    assert tensors_equal(looped.params, first.params)
    assert _same_tree(looped.opt_state, first.opt_state)
    assert int(looped.opt_state["G"]["count"]) == int(looped.opt_state["D"]["count"]) == 4
    assert sorted(metrics) == ["d_loss", "g_loss"]


def test_manual_step_with_outer_combinators_and_fp16(tmp_path):
    data = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    step = ft.with_amp(ft.manual_step(gan), torch.float16)
    csv = ft.loggers.CSV(tmp_path)
    step = ft.with_logging(step, [csv], every_n_steps=2, log_grad_norm=True)
    step = ft.with_checkpointing(step, tmp_path / "ckpt")
    state = ft.fit(step, _two_models(), data, epochs=1, progress=False)
    assert ft.loss_scale(state) == 65536.0 and state.step == 4
    header = open(csv.path).readline()
    assert "grad_norm/D" in header and "grad_norm/G" in header
    loaded = ft.load(ft.checkpoints(tmp_path / "ckpt").last, like=_two_models())
    assert tensors_equal(loaded.params, state.params)
    assert tensors_equal(loaded.slots["amp"], state.slots["amp"])


def test_manual_step_errors_name_the_problem():
    state = _two_models()
    batch = torch.randn(8, 6)

    def no_apply(m, real):
        m.backward(m.model["D"](real).mean(), "D")
        return {"x": 0.0}

    with pytest.raises(ft.ConfigError, match="not followed by m.apply"):
        ft.manual_step(no_apply)(state, batch)

    def unnamed(m, real):
        m.update(m.model["D"](real).mean())
        return {}

    with pytest.raises(ft.ConfigError, match="several models"):
        ft.manual_step(unnamed)(state, batch)

    def unknown(m, real):
        m.update(m.model["D"](real).mean(), "E")
        return {}

    with pytest.raises(ft.ConfigError, match="no model 'E'"):
        ft.manual_step(unknown)(state, batch)

    def not_scalar(m, real):
        m.update(m.model["D"](real), "D")
        return {}

    with pytest.raises(ft.LossError, match="0-d floating-point loss"):
        ft.manual_step(not_scalar)(state, batch)


def test_manual_step_nan_loss_raises_at_epoch_end_naming_the_step():
    def nan_at_2(m, real):
        loss = m.model["D"](real).mean()
        if m.state.step == 2:
            loss = loss * float("nan")
        m.update(loss, "D")
        return {"loss": loss}

    data = [torch.randn(8, 6) for _ in range(4)]
    with pytest.raises(ft.NonFiniteLossError, match="at step 2"):
        ft.fit(ft.manual_step(nan_at_2), _two_models(), data, epochs=1, logger=False,
               checkpoint=False, progress=False)


# -- with_ddp on one process; sharding ---------------------------------------------------

def test_with_ddp_on_one_process_changes_nothing():
    data = make_batches(4)
    a = ft.fit(ft.with_ddp(ft.train_step(plain_classify)),
               ft.TrainState.create(mlp(), ft.optim.adam(1e-2)), data, epochs=1,
               logger=False, checkpoint=False, progress=False)
    b = ft.fit(ft.train_step(plain_classify), ft.TrainState.create(mlp(), ft.optim.adam(1e-2)),
               data, epochs=1, logger=False, checkpoint=False, progress=False)
    assert tensors_equal(a.params, b.params)


def _indices(loader) -> list[int]:
    return [int(i) for x, _ in loader for i in x[:, 0]]


def test_training_shards_are_disjoint_interleaved_and_ordered_by_seed_and_epoch():
    ds = TensorDataset(torch.arange(20.0).unsqueeze(1), torch.zeros(20))
    loader = DataLoader(ds, batch_size=3, shuffle=True)
    shards = [ft_data.shard(loader, r, 2, seed=7) for r in (0, 1)]
    per_epoch = []
    for epoch in (0, 1):
        seen = [_indices(ft_data.epoch_batches(s, seed=7, epoch=epoch)) for s in shards]
        assert sorted(seen[0] + seen[1]) == list(range(20))  # every sample, once
        assert len(seen[0]) == len(seen[1])
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]  # reshuffled per epoch
    again = [_indices(ft_data.epoch_batches(ft_data.shard(loader, r, 2, seed=7), seed=7,
                                            epoch=1)) for r in (0, 1)]
    assert again == per_epoch[1]  # a function of (seed, epoch)
    ordered = DataLoader(ds, batch_size=2, shuffle=False)
    first = next(iter(ft_data.epoch_batches(ft_data.shard(ordered, 1, 2, seed=0), seed=0,
                                            epoch=0)))
    assert first[0][:, 0].tolist() == [1.0, 3.0]  # interleaved by rank


def test_lists_are_dealt_out_whole_and_evaluation_keeps_every_sample():
    data = [torch.full((2,), float(i)) for i in range(5)]
    train = [ft_data.shard(data, r, 2, seed=0) for r in (0, 1)]
    assert [[int(b[0]) for b in t] for t in train] == [[0, 2], [1, 3]]  # same count
    assert len(train[0]) == len(train[1]) == 2
    evals = [list(ft_data.shard_eval(data, r, 2)) for r in (0, 1)]
    assert [[int(b[0]) for b in e] for e in evals] == [[0, 2, 4], [1, 3]]
    ds = TensorDataset(torch.arange(7.0).unsqueeze(1), torch.zeros(7))
    loaders = [ft_data.shard_eval(DataLoader(ds, batch_size=2), r, 2) for r in (0, 1)]
    assert sorted(_indices(loaders[0]) + _indices(loaders[1])) == list(range(7))
    with pytest.raises(ft.DataError, match="one-shot iterator"):
        ft_data.shard(iter(data), 0, 2, seed=0)


def test_evaluation_keeps_a_loader_that_already_has_a_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler
    ds = TensorDataset(torch.arange(8.0).unsqueeze(1), torch.zeros(8))
    loader = DataLoader(ds, batch_size=2,
                        sampler=DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False))
    assert ft_data.shard_eval(loader, 1, 2) is loader
    assert ft_data.shard(loader, 1, 2, seed=0) is loader


def test_evaluation_splits_a_padding_distributed_batch_sampler_exactly():
    # DistributedSampler inside batch_sampler=: 5 samples on 2 ranks pad to 6; evaluation
    # rebuilds the BatchSampler over an exact split (every sample once)
    from torch.utils.data import BatchSampler, Sampler
    from torch.utils.data.distributed import DistributedSampler
    ds = TensorDataset(torch.arange(5.0).unsqueeze(1), torch.zeros(5))
    shares = []
    for r in (0, 1):
        batcher = BatchSampler(DistributedSampler(ds, 2, r, shuffle=False), 2, False)
        shares.append(ft_data.shard_eval(DataLoader(ds, batch_sampler=batcher), r, 2))
    assert sorted(_indices(shares[0]) + _indices(shares[1])) == list(range(5))
    assert all(len(b[0]) <= 2 for b in shares[0])

    class Pairs(Sampler):  # a custom batch sampler over a padding sampler: refused
        def __init__(self, inner):
            self.sampler = inner

        def __iter__(self):
            it = iter(self.sampler)
            return iter(list(zip(it, it)))

        def __len__(self):
            return 1
    loader = DataLoader(ds, batch_sampler=Pairs(DistributedSampler(ds, 2, 0, shuffle=False)))
    with pytest.raises(ft.DataError, match="cannot be rebuilt over an exact split"):
        ft_data.shard_eval(loader, 0, 2)


def test_make_dataset_loader_shards_keep_loader_settings():
    loader = DataLoader(make_dataset(), batch_size=10, drop_last=True)
    sharded = ft_data.shard(loader, 0, 2, seed=0)
    assert sharded.batch_size == 10 and sharded.drop_last
    assert len(sharded) == 4  # 48 samples per rank, 4 full batches
