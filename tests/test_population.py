"""Populations: N members trained in one vmapped step equal N separate ordinary runs."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from helpers import Net, classify, make_batches
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

import ftrain as ft
from ftrain.populations.population import (
    PopulationStep,
    is_population,
    member,
    population,
    population_eval_step,
    population_step,
    split_members,
    vmap,
)

QUIET = {"logger": False, "checkpoint": False, "progress": False}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def mse_like(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def separate_run(make_model, optimizer, seed, data, loss_fn=mse_like, epochs=1):
    """What member `seed` should equal: an ordinary ft.fit run from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    state = ft.TrainState.create(make_model(), optimizer, seed=seed)
    return ft.fit(ft.train_step(loss_fn), state, data, epochs=epochs, **QUIET)


def assert_states_close(a: ft.TrainState, b: ft.TrainState, atol: float = 2e-6) -> None:
    for kind in ("params", "buffers", "opt_state"):
        la, sa = pytree.tree_flatten(getattr(a, kind))
        lb, sb = pytree.tree_flatten(getattr(b, kind))
        assert sa == sb, f"{kind} structures differ"
        for x, y in zip(la, lb):
            if isinstance(x, torch.Tensor):
                assert x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
                torch.testing.assert_close(x, y, atol=atol, rtol=1e-5, msg=kind)
            else:
                assert x == y


# -- trajectories -----------------------------------------------------------------------

def test_adamw_members_follow_their_own_runs():
    data = make_batches(20)
    lrs, wds = [1e-3, 1e-2, 3e-2], [0.0, 0.1, 0.01]

    def opt(lr, wd):
        return ft.optim.adamw(lr, weight_decay=wd, groups={"*.bias": {"weight_decay": 0.0}})

    template = ft.TrainState.create(mlp(), opt(1e-3, 0.0), seed=7)
    pop = population(template, hparams={"lr": lrs, "weight_decay": wds})
    assert pop.slots["population"] == {"n": 3, "seeds": [7, 8, 9],
                                       "hparams": {"lr": lrs, "weight_decay": wds}}
    pop = ft.fit(vmap(ft.train_step(mse_like)), pop, data, epochs=1, **QUIET)
    assert pop.step == 20 and is_population(pop)
    for i in range(3):
        own = separate_run(mlp, opt(lrs[i], wds[i]), 7 + i, data)
        mine = member(pop, i)
        assert mine.seed == own.seed and mine.step == own.step == 20
        assert int(mine.opt_state["count"]) == 20
        assert_states_close(mine, own)


def test_sgd_momentum_clipping_members_follow_their_own_runs():
    data = make_batches(20)
    lrs, moms = [0.05, 0.2], [0.5, 0.9]

    def opt(lr, momentum):
        return ft.optim.chain(ft.optim.clip_grad_norm(0.5),
                              ft.optim.sgd(lr, momentum=momentum, nesterov=True,
                                           weight_decay=1e-3))

    template = ft.TrainState.create(mlp(), opt(0.1, 0.9), seed=3)
    pop = population(template, hparams={"lr": lrs, "momentum": moms})
    step = population_step(mse_like)
    for batch in data:  # pure calls this time
        pop, metrics = step(pop, batch)
    assert sorted(metrics) == ["loss", "loss/m0", "loss/m1"]
    for i in range(2):
        assert_states_close(member(pop, i), separate_run(mlp, opt(lrs[i], moms[i]), 3 + i,
                                                         data))


def test_schedules_amsgrad_betas_eps_and_a_member_without_momentum():
    data = make_batches(12)
    warm = ft.optim.schedules.warmup_cosine
    # per-member schedules
    scheds = [warm(0.1, 3, 12), warm(0.3, 5, 12)]
    pop = population(ft.TrainState.create(mlp(), ft.optim.sgd(0.1, momentum=0.9), seed=0),
                     hparams={"lr": scheds})
    pop = ft.fit(population_step(mse_like), pop, data, epochs=1, **QUIET)
    for i in range(2):
        assert_states_close(member(pop, i),
                            separate_run(mlp, ft.optim.sgd(scheds[i], momentum=0.9), i, data))
    # AMSGrad with per-member betas and eps, a shared schedule
    hp = {"betas": [(0.9, 0.999), (0.8, 0.99)], "eps": [1e-8, 1e-3]}
    base = warm(1e-2, 4, 12)
    pop = population(ft.TrainState.create(mlp(), ft.optim.adam(base, amsgrad=True), seed=0),
                     hparams=hp)
    pop = ft.fit(population_step(mse_like), pop, data, epochs=1, **QUIET)
    for i in range(2):
        opt = ft.optim.adam(base, betas=hp["betas"][i], eps=hp["eps"][i], amsgrad=True)
        assert_states_close(member(pop, i), separate_run(mlp, opt, i, data))
    # momentum 0 for one member: its state keeps no momentum buffers, as sgd(m=0) does
    pop = population(ft.TrainState.create(mlp(), ft.optim.sgd(0.1), seed=0),
                     hparams={"momentum": [0.0, 0.9]})
    pop = ft.fit(population_step(mse_like), pop, data, epochs=1, **QUIET)
    assert member(pop, 0).opt_state["sgd"]["momentum_buffer"] == {}
    for i, m in enumerate((0.0, 0.9)):
        assert_states_close(member(pop, i),
                            separate_run(mlp, ft.optim.sgd(0.1, momentum=m), i, data))


def test_batchnorm_statistics_follow_their_own_runs_and_dropout_members_differ():
    data = make_batches(10)

    def net(p: float = 0.0) -> nn.Module:
        model = Net()
        model.drop.p = p
        return model

    # SGD: fc1.bias feeds BatchNorm, so its true gradient is 0 and what arrives is float
    # noise, which Adam would blow up to full-size steps (in a separate run as well)
    opt = ft.optim.sgd(0.1, momentum=0.9)
    pop = population(ft.TrainState.create(net(), opt, seed=0), n=2)
    pop = ft.fit(population_step(classify), pop, data, epochs=1, **QUIET)
    assert pop.buffers["bn.num_batches_tracked"].tolist() == [10, 10]
    for i in range(2):
        assert_states_close(member(pop, i), separate_run(net, opt, i, data, classify))
    # dropout: every member draws its own mask, and a rerun draws the same ones
    same_start = population([ft.TrainState.create(net(0.5), ft.optim.adam(1e-2))] * 2)
    runs = [ft.fit(population_step(classify), same_start.copy(), data, epochs=1, **QUIET)
            for _ in range(2)]
    w = runs[0].params["fc1.weight"]
    assert not torch.equal(w[0], w[1])
    assert torch.equal(w, runs[1].params["fc1.weight"])
    same = ft.fit(population_step(classify, randomness="same"), same_start, data, epochs=1,
                  **QUIET)
    assert torch.equal(same.params["fc1.weight"][0], same.params["fc1.weight"][1])


class Tied(nn.Module):
    """A tied weight (dec.weight is enc.weight) and a submodule used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.block(self.dec(self.enc(x)))))


def test_tied_weights_and_shared_modules_follow_their_own_runs():
    def make(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        return ft.TrainState.create(Tied(), ft.optim.adam(1e-2), seed=seed)

    data = make_batches(6)
    pop = population(make, n=2)
    assert "dec.weight" not in pop.params  # named once, as in a single model's state
    pop = ft.fit(population_step(mse_like), pop, data, epochs=1, **QUIET)
    for i in range(2):
        assert_states_close(member(pop, i),
                            separate_run(Tied, ft.optim.adam(1e-2), i, data))
    # which init a tied tensor keeps depends on the tie's direction: not re-seedable
    with pytest.raises(ft.ConfigError, match="tied weights"):
        population(make(0), n=2)


def test_slots_swap_tensors_in_and_out():
    from ftrain.core.swap import Slots

    bn = nn.BatchNorm1d(3)
    slots = Slots(bn)

    def held() -> dict[str, torch.Tensor]:
        return {**dict(bn.named_parameters()), **dict(bn.named_buffers())}

    before = held()
    given = {k: torch.full_like(v, 2.0) for k, v in before.items()}
    with pytest.raises(KeyError):  # a missing name changes nothing
        slots.put({k: v for k, v in given.items() if k != "bias"})
    assert all(held()[k] is v for k, v in before.items())
    old = slots.put(given)
    assert bn.weight is given["weight"]
    bn.running_mean = torch.ones(3)  # a forward may reassign a buffer
    now = slots.current(["running_mean", "running_var"], given)
    assert torch.equal(now["running_mean"], torch.ones(3))
    assert now["running_var"] is given["running_var"]
    slots.restore(old)
    assert all(held()[k] is v for k, v in before.items())


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: _weight_norm
def test_parametrized_modules_train_from_a_factory_and_reseeding_them_is_refused():
    def normed() -> nn.Module:
        return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)),
                             nn.ReLU(), nn.Linear(8, 3))

    def make(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        return ft.TrainState.create(normed(), ft.optim.adam(1e-2), seed=seed)

    data = make_batches(6)
    pop = ft.fit(population_step(mse_like), population(make, n=2), data, epochs=1, **QUIET)
    for i in range(2):
        assert_states_close(member(pop, i), separate_run(normed, ft.optim.adam(1e-2), i, data))
    with pytest.raises(ft.ConfigError, match="parametrized module"):
        population(make(0), n=2)


def test_per_member_batches():
    data = make_batches(24)
    stacked = [(torch.stack([data[i][0], data[i + 8][0], data[i + 16][0]]),
                torch.stack([data[i][1], data[i + 8][1], data[i + 16][1]])) for i in range(8)]
    pop = population(ft.TrainState.create(mlp(), ft.optim.adam(1e-2), seed=0), n=3)
    pop = ft.fit(population_step(mse_like, per_member_batches=True), pop, stacked, epochs=1,
                 **QUIET)
    for i in range(3):
        assert_states_close(member(pop, i), separate_run(mlp, ft.optim.adam(1e-2), i,
                                                         data[8 * i:8 * i + 8]))
    evaluator = population_eval_step(mse_like, per_member_batches=True)
    per_member = split_members(ft.evaluate(evaluator, pop, stacked, batch_size=lambda b: 12))
    for i in range(3):
        own = ft.evaluate(ft.eval_step(mse_like), member(pop, i), data[8 * i:8 * i + 8])
        assert per_member[i]["loss"] == pytest.approx(own["loss"], rel=1e-5)
    with pytest.raises(ft.DataError, match="lead with the member dimension 3"):
        ft.fit(population_step(mse_like, per_member_batches=True), pop, data, epochs=2,
               **QUIET)


# -- hyperparameters take effect; sources -----------------------------------------------

def test_per_member_hparams_change_training():
    data = make_batches(10)
    start = ft.TrainState.create(mlp(), ft.optim.adamw(1e-2, weight_decay=0.0), seed=0)
    pop = population([start] * 4, hparams={"lr": [1e-2, 1e-2, 1e-1, 1e-2],
                                           "weight_decay": [0.0, 0.0, 0.0, 5.0]})
    assert pop.slots["population"]["seeds"] == [0, 0, 0, 0]
    pop = ft.fit(population_step(mse_like), pop, data, epochs=2, **QUIET)
    w = pop.params["0.weight"]
    assert torch.equal(w[0], w[1])  # same start, same hparams: the same run
    assert not torch.allclose(w[0], w[2], atol=1e-3)  # another learning rate
    assert w[3].norm() < 0.8 * w[0].norm()  # strong decoupled weight decay shrinks weights
    assert member(pop, 3).optimizer.transforms[0].groups.base["weight_decay"] == 5.0


def test_sources_factory_list_and_inferred_hparams():
    def make(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        return ft.TrainState.create(mlp(), ft.optim.sgd(0.1 * (seed + 1), momentum=0.9))

    from_factory = population(make, seeds=[4, 5])
    from_template = population(ft.TrainState.create(mlp(), ft.optim.sgd(0.1, momentum=0.9),
                                                    seed=4),
                               n=2, hparams={"lr": [0.5, 0.6]})
    for name in ("0.weight", "2.bias"):  # reset_parameters from seed == construction
        assert torch.equal(from_factory.params[name], from_template.params[name])
    # the factory's states differ in lr only: it becomes a per-member hyperparameter
    assert from_factory.optimizer.names == ("lr",)
    assert from_factory.opt_state["hparams"]["lr"].tolist() == pytest.approx([0.5, 0.6])
    assert member(from_factory, 1).optimizer.transforms[0].groups.base["lr"] == \
        pytest.approx(0.6)
    # a list of trained states keeps their step and optimizer states
    states = [ft.fit(ft.train_step(mse_like), make(s), make_batches(3), epochs=1, **QUIET)
              for s in (0, 1)]
    pop = population(states)
    assert pop.step == 3 and pop.opt_state["count"].tolist() == [3, 3]
    assert torch.equal(pop.opt_state["sgd"]["momentum_buffer"]["0.weight"][1],
                       states[1].opt_state["sgd"]["momentum_buffer"]["0.weight"])


# -- members are ordinary states ---------------------------------------------------------

def test_member_saves_loads_binds_and_evaluates_like_the_population(tmp_path):
    data = make_batches(8)
    model = Net()
    model.drop.p = 0.0  # dropout draws differ between a population and a separate run
    template = ft.TrainState.create(model, ft.optim.sgd(0.1, momentum=0.9), seed=0)
    pop = population(template, hparams={"lr": [0.01, 0.05, 0.1]})
    step = ft.with_validation(vmap(ft.train_step(classify)), vmap(ft.eval_step(classify)),
                              data[:2])
    pop = ft.fit(step, pop, data, epochs=2, **QUIET)
    results = ft.evaluate(vmap(ft.eval_step(classify)), pop, data)
    assert set(results) == {"loss", "acc"} | {f"{k}/m{i}" for k in ("loss", "acc")
                                             for i in range(3)}
    per_member = split_members(results)
    assert results["loss"] == pytest.approx(sum(r["loss"] for r in per_member) / 3)

    m = member(pop, 2)
    assert type(m) is ft.TrainState and not is_population(m)
    own = ft.evaluate(ft.eval_step(classify), m, data)
    assert own == pytest.approx(per_member[2], rel=1e-5)
    path = ft.save(tmp_path / "m2.ckpt", m)
    fresh = ft.TrainState.create(Net(), ft.optim.sgd(0.1, momentum=0.9))
    loaded = ft.load(path, like=fresh)
    assert_states_close(loaded, m, atol=0)
    module = ft.bind(loaded)
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(module(x), ft.bind(pop)(x)[2])  # vmap: float rounding
    # a member keeps training as an ordinary state, exactly as the population would
    alone, _ = ft.train_step(classify)(m, data[0])
    together, _ = vmap(ft.train_step(classify))(pop, data[0])
    assert_states_close(alone, member(together, 2))


def test_population_checkpoint_resume_and_pure_call(tmp_path):
    data = make_batches(6)
    pop = population(ft.TrainState.create(mlp(), ft.optim.adamw(1e-2), seed=0),
                     hparams={"lr": [1e-2, 3e-2]})
    step = population_step(mse_like)
    before = pop.copy()
    direct, _ = step(pop, data[0])  # pure: the input is left intact
    assert_states_close(pop, before, atol=0)
    looped = ft.fit(step, pop.copy(), data[:1], epochs=1, **QUIET)
    assert_states_close(direct, looped, atol=0)  # bound (in place) == pure, bitwise

    half = ft.fit(step, pop.copy(), data, max_steps=3, **QUIET)
    path = ft.save(tmp_path / "pop.ckpt", half)
    resumed = ft.fit(step, ft.load(path, like=pop), data, epochs=1, **QUIET)
    straight = ft.fit(step, pop.copy(), data, epochs=1, **QUIET)
    assert resumed.step == straight.step == 6
    assert_states_close(resumed, straight, atol=0)
    assert ft.load(path, like=pop).slots["population"]["seeds"] == [0, 1]


def test_logging_sees_per_member_scalars():
    class Memory:
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def log_metrics(self, metrics, step):
            self.rows.append(dict(metrics))

        def log_hparams(self, hparams, metrics=None):
            pass

        def finalize(self, status="success"):
            pass

    logger = Memory()
    pop = population(ft.TrainState.create(mlp(), ft.optim.adam(1e-2)),
                     hparams={"lr": [1e-2, 1e-3]})
    step = ft.with_logging(population_step(mse_like), [logger], every_n_steps=2, log_lr=True)
    ft.fit(step, pop, make_batches(4), epochs=1, **QUIET)
    row = logger.rows[0]
    assert {"loss", "loss/m0", "loss/m1", "lr/adam/m0", "lr/adam/m1"} <= set(row)
    assert row["lr/adam/m1"] == pytest.approx(1e-3)
    assert row["loss"] == pytest.approx((row["loss/m0"] + row["loss/m1"]) / 2, rel=1e-5)


def test_compiled_kernel_matches_eager():
    data = make_batches(4)
    pop = population(ft.TrainState.create(mlp(), ft.optim.adamw(1e-2), seed=0),
                     hparams={"lr": [1e-2, 3e-2], "weight_decay": [0.0, 0.1]})
    eager = ft.fit(population_step(mse_like), pop.copy(), data, epochs=1, **QUIET)
    # aot_eager: the same fullgraph capture as inductor, without its (slow) code generation
    compiled_step = population_step(mse_like, compile={"backend": "aot_eager"})
    compiled = ft.fit(compiled_step, pop.copy(), data, epochs=1, **QUIET)
    assert_states_close(compiled, eager, atol=1e-6)
    assert repr(population_step(mse_like).compiled(backend="aot_eager")) == \
        "population_step(mse_like, compiled)"


def test_inductor_kernel_with_schedules_matches_eager_in_one_graph():
    """The real compiler (Inductor, whose per-member factors are computed once and
    returned, and whose step metrics come out of the graph): equal to eager, one graph
    over two epochs, with every member's metrics."""
    from torch._dynamo.utils import counters

    data = make_batches(6)
    warm = ft.optim.schedules.warmup_cosine
    pop = population(ft.TrainState.create(mlp(), ft.optim.adam(1e-2), seed=0),
                     hparams={"lr": [warm(1e-2, 3, 12), warm(3e-2, 5, 12)]})
    eager = ft.fit(population_step(mse_like), pop.copy(), data, epochs=2, **QUIET)
    graphs = counters["stats"]["unique_graphs"]
    step = population_step(mse_like, compile=True)
    seen = []
    compiled = ft.fit(ft.every(step, lambda s, m: seen.append(sorted(m)), every_n_steps=1),
                      pop.copy(), data, epochs=2, **QUIET)
    assert step.fallback_reason is None
    assert counters["stats"]["unique_graphs"] == graphs + 1  # no recompiles
    assert_states_close(compiled, eager, atol=1e-6)
    assert len(seen) == 12 and all(m == ["loss", "loss/m0", "loss/m1"] for m in seen)
    # with more metrics: each mean followed by its members, eager and compiled alike
    def with_acc(model, batch):
        out = model(batch[0])
        return F.cross_entropy(out, batch[1]), {"acc": (out.argmax(1) == batch[1]).float()
                                                .mean()}
    for compile in (False, {"backend": "aot_eager"}):
        _, metrics = population_step(with_acc, compile=compile)(compiled, data[0])
        assert list(metrics) == ["loss", "loss/m0", "loss/m1", "acc", "acc/m0", "acc/m1"]


def test_a_compiled_population_still_guards_what_the_loss_function_reads():
    """What the user's loss function reads is checked by the compiled kernel's guards: a
    change recompiles rather than replaying a stale graph."""
    factor = {"w": 1.0}

    def weighted(model, batch):
        return mse_like(model, batch) * factor["w"]

    step = population_step(weighted, compile={"backend": "aot_eager"})
    pop = population(ft.TrainState.create(mlp(), ft.optim.sgd(0.1), seed=0), n=2)
    batch = make_batches(1)[0]
    moved, first = step(pop, batch)
    factor["w"] = 0.0
    still, second = step(pop, batch)
    assert first["loss"] > 0 and second["loss"] == 0
    assert not torch.equal(moved.params["0.weight"], pop.params["0.weight"])
    assert torch.equal(still.params["0.weight"], pop.params["0.weight"])  # zero gradients


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_population_metrics_survive_the_next_replay():
    data = [(x.cuda(), y.cuda()) for x, y in make_batches(4)]
    pop = population(ft.TrainState.create(mlp().cuda(), ft.optim.adam(1e-2), seed=0), n=2)
    step = population_step(mse_like, compile={"mode": "reduce-overhead"})
    kept = []
    ft.fit(ft.every(step, lambda s, m: kept.append({k: (v, v.clone()) for k, v in m.items()}),
                    every_n_steps=1), pop, data, epochs=1, **QUIET)
    assert len(kept) == 4
    for metrics in kept:  # each step's values, read after later replays, are its own
        assert all(torch.equal(v, copy) for v, copy in metrics.values())
    assert not torch.equal(kept[0]["loss"][0], kept[-1]["loss"][0])


def test_a_loss_that_cannot_be_captured_runs_eagerly_or_raises(caplog):
    def breaking(model, batch):
        torch._dynamo.graph_break()  # fine eagerly, not in one graph
        return mse_like(model, batch)

    data = make_batches(2)
    pop = population(ft.TrainState.create(mlp(), ft.optim.sgd(0.1), seed=0), n=2)
    eager = ft.fit(population_step(breaking), pop.copy(), data, epochs=1, **QUIET)
    step = population_step(breaking, compile={"backend": "eager"})
    out = ft.fit(step, pop.copy(), data, epochs=1, **QUIET)
    assert step.fallback_reason and "running the population step" in caplog.text
    assert_states_close(out, eager, atol=0)
    strict = population_step(breaking, compile={"backend": "eager"}, fallback=False)
    with pytest.raises(ft.ConfigError, match="cannot compile the population step"):
        strict(pop, data[0])


def test_nonfinite_member_loss_is_raised_unless_ignored():
    data = [(torch.full((4, 6), float("nan")), torch.zeros(4, dtype=torch.int64))]
    pop = population(ft.TrainState.create(mlp(), ft.optim.sgd(0.1)), n=2)
    with pytest.raises(ft.NonFiniteLossError, match="step 0"):
        ft.fit(population_step(mse_like), pop.copy(), data, epochs=1, **QUIET)
    out = ft.fit(population_step(mse_like, on_nonfinite="ignore"), pop, data, epochs=1,
                 **QUIET)
    assert out.step == 1


# -- errors ------------------------------------------------------------------------------

def test_errors_name_the_problem():
    state = ft.TrainState.create(mlp(), ft.optim.adam(1e-3))
    with pytest.raises(ft.ConfigError, match=r"n=3, len\(seeds\)=2"):
        population(state, n=3, seeds=[1, 2])
    with pytest.raises(ft.ConfigError, match=r"len\(hparams\['lr'\]\)=3"):
        population(state, n=2, hparams={"lr": [1e-3, 1e-2, 1e-1]})
    with pytest.raises(ft.ConfigError, match="unknown per-member hyperparameter 'beta'"):
        population(state, hparams={"beta": [0.9, 0.8]})
    with pytest.raises(ft.ConfigError, match="'momentum' does not apply"):
        population(state, hparams={"momentum": [0.9, 0.8]})
    with pytest.raises(ft.ConfigError, match="non-negative float"):
        population(state, hparams={"weight_decay": [0.1, -1.0]})
    with pytest.raises(ft.ConfigError, match="needs the number of members"):
        population(state)
    other = ft.TrainState.create(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                                 ft.optim.adam(1e-3))
    with pytest.raises(ft.ConfigError, match=r"member 1's params.0.weight is .*\[8, 6\]"):
        population([state, other])
    with pytest.raises(ft.ConfigError, match="same step"):
        population([state, state.replace(step=4)])
    with pytest.raises(ft.ConfigError, match="not member 0's"):
        population([state, ft.TrainState.create(mlp(), ft.optim.sgd(1e-3))])
    with pytest.raises(ft.ConfigError, match="must be fresh"):
        population(state.replace(step=1), n=2)
    with pytest.raises(ft.ConfigError, match="multi-model"):
        population(ft.TrainState.create({"a": mlp(), "b": mlp()}), n=2)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x * self.scale

    with pytest.raises(ft.ConfigError, match=r"no module resets \['scale'\]"):
        population(ft.TrainState.create(Scaled()), n=2)

    pop = population(state, n=2)
    with pytest.raises(ft.ConfigError, match=r"member index must be an int in \[0, 2\)"):
        member(pop, 2)
    with pytest.raises(ft.ConfigError, match="expects a population state"):
        member(state, 0)
    with pytest.raises(ft.ConfigError, match="made by ft.population"):
        population_step(mse_like)(state, make_batches(1)[0])
    with pytest.raises(ft.ConfigError, match="ft.vmap takes a step built by"):
        vmap(ft.with_logging(ft.train_step(mse_like), []))
    with pytest.raises(ft.ConfigError, match="with_amp"):
        vmap(ft.with_amp(ft.train_step(mse_like), torch.bfloat16))
    assert isinstance(vmap(ft.train_step(mse_like, on_nonfinite="ignore")), PopulationStep)


# -- the example ---------------------------------------------------------------------------

def test_sweep_example_finds_a_good_learning_rate(capsys):
    pytest.importorskip("sklearn")
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--members", "8", "--epochs", "3"])
    out = capsys.readouterr().out
    assert len(results["val_accuracy"]) == 8 and results["steps"] == 3 * 20
    assert results["val_accuracy"][results["best"]] == max(results["val_accuracy"])
    assert results["best_lr"] > 1e-3 and results["test_accuracy"] > 0.85, out
    assert results["val_accuracy"][0] < results["val_accuracy"][results["best"]] - 0.2, out
    assert f"best member: {results['best']}" in out and "test accuracy" in out


def test_ft_compile_compiles_a_population_step_inside_a_stack():
    core = population_step(mse_like)
    stack = ft.compile(ft.with_logging(core, []), mode="max-autotune-no-cudagraphs")
    assert stack.inner is not core and stack.inner.compile_options["fullgraph"] is True
    assert stack.inner.compile_options["mode"] == "max-autotune-no-cudagraphs"
    assert repr(stack.inner) == "population_step(mse_like, compiled)"


def test_a_fresh_optimizer_compiles_in_a_population_step_without_falling_back():
    """The first update an optimizer ever makes may run inside the compiled kernel (the
    benchmark's case): it must be traceable then too, not only after an eager warm-up."""
    pop = population(ft.TrainState.create(mlp(), ft.optim.adam(1e-2), seed=0), n=2)
    step = population_step(mse_like, compile={"backend": "aot_eager"}, fallback=False)
    pop, metrics = step(pop, make_batches(1)[0])
    assert step.fallback_reason is None and pop.step == 1 and "loss" in metrics
