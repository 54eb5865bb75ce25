"""Changing the run mid-way (issue 15, part 3): freeze / unfreeze, a group's settings, a
new optimizer, from an `ft.every` hook, against torch.optim run by hand; checkpoints
and resume after a change; with_ddp under real torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tensors_equal
from torch import nn

import ftrain as ft

K, N = 3, 10  # the change happens after step K; runs are N steps


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _data(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _hand(change, steps: int = N, opt=None) -> dict[str, torch.Tensor]:
    """torch.optim by hand; `change(model, opt)` after step K may return a new optimizer."""
    model, data = _net(), _data()
    opt = opt(model) if opt is not None else None
    for i in range(steps):
        if i == K:
            opt = change(model, opt) or opt
        loss = loss_fn(model, data[i % len(data)])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def _ft(state: ft.TrainState, hook, steps: int = N, direct: bool = False) -> ft.TrainState:
    def at_k(s, metrics):
        return hook(s) if s.step == K else None
    step = ft.every(ft.train_step(loss_fn), at_k, every_n_steps=1)
    if direct:  # pure calls, no loop
        data = _data()
        while state.step < steps:
            state, _ = step(state, data[state.step % len(data)])
        return state
    return ft.fit(step, state, _data(), max_steps=steps, logger=False, checkpoint=False,
                  progress=False)


def _frozen_backbone(model: Net) -> torch.optim.Optimizer:
    model.backbone.requires_grad_(False)
    return torch.optim.AdamW(model.head.parameters(), lr=1e-2, fused=True)


def _add_backbone(model: Net, opt: torch.optim.Optimizer) -> None:
    model.backbone.requires_grad_(True)
    opt.add_param_group({"params": list(model.backbone.parameters()), "lr": 1e-3})


@pytest.mark.parametrize("direct", [False, True], ids=["loop", "pure"])
def test_unfreeze_matches_torch_add_param_group(direct: bool) -> None:
    """Backbone frozen for K steps, then a new param group at a lower lr: bitwise torch."""
    ref = _hand(_add_backbone, opt=_frozen_backbone)
    state = ft.TrainState.create(_net(), ft.optim.adamw(1e-2)).freeze("backbone.*")
    assert sorted(state.opt_state["adamw"]["exp_avg"]) == ["head.bias", "head.weight"]
    state = _ft(state, lambda s: s.unfreeze("backbone.*", lr=1e-3), direct=direct)
    assert tensors_equal(state.params, ref)
    assert int(state.opt_state["count"]) == N
    # the backbone's Adam step count started at the unfreeze: fresh state, as torch's
    assert state.opt_state["adamw"]["step"]["backbone.0.weight"].item() == N - K
    assert state.opt_state["adamw"]["step"]["head.weight"].item() == N


def test_unfreeze_with_a_torch_optimizer() -> None:
    """The same with ft.optim.from_torch(RMSprop): its per-parameter state carries over."""
    def frozen(model: Net) -> torch.optim.Optimizer:
        model.backbone.requires_grad_(False)
        return torch.optim.RMSprop(model.head.parameters(), lr=1e-2)
    ref = _hand(_add_backbone, opt=frozen)
    opt = ft.optim.from_torch(torch.optim.RMSprop, lr=1e-2)
    state = ft.TrainState.create(_net(), opt).freeze("backbone.*")
    state = _ft(state, lambda s: s.unfreeze("backbone.*", lr=1e-3))
    assert tensors_equal(state.params, ref)


def test_module_frozen_before_create_unfreezes_the_same() -> None:
    """requires_grad=False on the user's module at create is the same trainable set."""
    net = _net()
    net.backbone.requires_grad_(False)
    state = _ft(ft.TrainState.create(net, ft.optim.adamw(1e-2)),
                lambda s: s.unfreeze("backbone.*", lr=1e-3))
    assert tensors_equal(state.params, _hand(_add_backbone, opt=_frozen_backbone))


def test_freeze_keeps_the_others_state_and_matches_torch() -> None:
    def hand_freeze(model: Net, opt: torch.optim.Optimizer) -> None:
        model.backbone.requires_grad_(False)  # torch skips params without a gradient
    ref = _hand(hand_freeze, opt=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2,
                                                               fused=True))
    seen = {}

    def freeze(s: ft.TrainState) -> ft.TrainState:
        seen["before"] = {k: {n: t.clone() for n, t in v.items()}
                          for k, v in s.opt_state["adamw"].items()}
        new = s.freeze("backbone.*")
        seen["after"] = {k: {n: t.clone() for n, t in v.items()}
                         for k, v in new.opt_state["adamw"].items()}
        return new
    state = _ft(ft.TrainState.create(_net(), ft.optim.adamw(1e-2)), freeze)
    assert tensors_equal(state.params, ref)
    before, after = seen["before"], seen["after"]
    for key in ("exp_avg", "exp_avg_sq", "step"):  # the head's state carried over as it was
        assert sorted(after[key]) == ["head.bias", "head.weight"]
        assert tensors_equal(after[key], {n: before[key][n] for n in after[key]})
    assert ft.TrainState.freeze is not None and state.model.backbone[0].weight.requires_grad \
        is False


def test_set_hparams_matches_torch_lr_change() -> None:
    def lower(model: Net, opt: torch.optim.Optimizer) -> None:
        opt.param_groups[0]["lr"] = 1e-3
    ref = _hand(lower, opt=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True))
    state = _ft(ft.TrainState.create(_net(), ft.optim.adamw(1e-2)),
                lambda s: s.set_hparams(lr=1e-3))
    assert tensors_equal(state.params, ref)
    assert state.optimizer.settings()["lr"] == 1e-3


def test_set_hparams_of_a_group_and_its_errors() -> None:
    opt = ft.optim.adamw(1e-2, groups={"*.bias": {"weight_decay": 0.0}})
    state = ft.TrainState.create(_net(), opt)
    changed = state.set_hparams("*.bias", lr=5e-3)
    groups = changed.optimizer.transforms[0].groups
    assert groups.settings(1)["lr"] == 5e-3 and groups.settings(0)["lr"] == 1e-2
    assert changed.opt_state["adamw"]["exp_avg"]["head.weight"] is \
        state.opt_state["adamw"]["exp_avg"]["head.weight"]  # state kept
    with pytest.raises(ft.ConfigError, match=r"no parameter group 'head\.\*'.*\*\.bias"):
        state.set_hparams("head.*", lr=1e-3)
    with pytest.raises(ft.ConfigError, match=r"no setting \['momentum'\].*'lr'"):
        state.set_hparams(momentum=0.9)
    with pytest.raises(ft.ConfigError, match="lr must be a non-negative"):
        state.set_hparams(lr=-1.0)


def test_swap_optimizer_matches_a_new_torch_optimizer() -> None:
    def to_sgd(model: Net, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    ref = _hand(to_sgd, opt=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True))
    state = _ft(ft.TrainState.create(_net(), ft.optim.adamw(1e-2)),
                lambda s: s.with_optimizer(ft.optim.sgd(0.05, momentum=0.9)))
    assert tensors_equal(state.params, ref)
    assert sorted(state.opt_state) == ["count", "sgd"]
    assert int(state.opt_state["count"]) == N  # the update count carries over


def test_with_optimizer_keeps_matching_state_or_none() -> None:
    state = _ft(ft.TrainState.create(_net(), ft.optim.adamw(1e-2)), lambda s: s, steps=2)
    old = state.opt_state
    kept = state.with_optimizer(ft.optim.adamw(1e-3, groups={"head.*": {"lr": 1e-4}}))
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert all(kept.opt_state["adamw"][key][n] is old["adamw"][key][n]
                   for n in old["adamw"][key])
    assert kept.opt_state["count"] is old["count"]
    fresh = state.with_optimizer(ft.optim.adamw(1e-3), keep_state=False)
    assert int(fresh.opt_state["count"]) == 0
    assert not fresh.opt_state["adamw"]["exp_avg"]["head.weight"].any()
    other = state.with_optimizer(ft.optim.adam(1e-3))  # another kind: fresh moments
    assert not other.opt_state["adam"]["exp_avg"]["head.weight"].any()
    assert int(other.opt_state["count"]) == 2


def test_replace_optimizer_the_wrong_way_is_a_clear_error() -> None:
    state = ft.TrainState.create(_net(), ft.optim.adamw(1e-2))
    with pytest.raises(ft.ConfigError, match=r"laid out for \['adamw'\].*needs \['sgd'\].*"
                                             r"with_optimizer"):
        state.replace(optimizer=ft.optim.sgd(0.1))
    assert state.replace(optimizer=ft.optim.adamw(1e-3)).optimizer.settings()["lr"] == 1e-3
    with pytest.raises(ft.ConfigError, match="with_optimizer"):  # mid-run: not KeyError
        _ft(state, lambda s: s.replace(optimizer=ft.optim.sgd(0.1)))


def test_patterns_that_match_nothing_and_bad_settings() -> None:
    state = ft.TrainState.create(_net(), ft.optim.adamw(1e-2))
    with pytest.raises(ft.ConfigError, match=r"'encoder\.\*' matches no parameter.*"
                                             r"backbone\.0\.weight.*head\.bias"):
        state.freeze("encoder.*")
    with pytest.raises(ft.ConfigError, match="glob patterns"):
        state.freeze([])
    with pytest.raises(ft.ConfigError, match=r"sets \['momentum'\]"):
        state.freeze("backbone.*").unfreeze("backbone.*", momentum=0.9)
    with pytest.raises(ft.ConfigError, match="with_optimizer needs"):
        state.with_optimizer("sgd")


def test_unfreeze_with_settings_never_changes_what_already_trains() -> None:
    # a new group keyed by a pattern that also matches trainable parameters would move
    # them into it (new lr, and out of their own group): refused, naming them
    opt = ft.optim.adamw(1e-3, weight_decay=0.1, groups={"*.bias": {"weight_decay": 0.0}})
    state = ft.TrainState.create(_net(), opt).freeze("backbone.*")
    with pytest.raises(ft.ConfigError, match=r"already train \(\['head\.bias'\]\)"):
        state.unfreeze(["backbone.0.weight", "*.bias"], lr=1e-4)
    done = state.unfreeze("backbone.*", lr=1e-4)  # only frozen ones: a new group
    rates = ft.optim.learning_rates(done)
    assert rates["adamw/backbone.*"] == 1e-4 and rates["adamw/*.bias"] == 1e-3
    assert rates["adamw"] == 1e-3


def test_several_models() -> None:
    nets = {"G": _net(), "D": _net()}
    state = ft.TrainState.create(nets, {"G": ft.optim.adam(1e-2), "D": ft.optim.sgd(0.1)})
    frozen = state.freeze("G.backbone.*")
    assert sorted(frozen.opt_state["G"]["adam"]["exp_avg"]) == ["head.bias", "head.weight"]
    assert frozen.opt_state["D"] is not None and frozen.model["D"].head.weight.requires_grad
    back = frozen.unfreeze("G.backbone.*", lr=1e-3)
    assert back.optimizer["G"].transforms[0].groups.settings(1)["lr"] == 1e-3
    with pytest.raises(ft.ConfigError, match="must start with a model name"):
        frozen.unfreeze("*.weight", lr=1e-3)
    with pytest.raises(ft.ConfigError, match="model="):
        state.set_hparams(lr=1e-3)
    assert state.set_hparams(lr=1e-3, model="G").optimizer["G"].settings()["lr"] == 1e-3


def test_iterate_send_and_pending_checks_follow_the_new_binding() -> None:
    """A state sent back into ft.iterate rebinds too; a NaN loss at the step of the change
    (pending on the old binding, checked later on the host) is still reported."""
    state = ft.TrainState.create(_net(), ft.optim.adamw(1e-2)).freeze("backbone.*")
    gen = ft.iterate(ft.train_step(loss_fn), state, _data(), max_steps=N)
    state, _ = next(gen)
    state = gen.send(state.unfreeze("backbone.*", lr=1e-3))[0]
    for state, _ in gen:
        pass
    assert state.frozen == [] and int(state.opt_state["count"]) == N
    data = _data()
    data[K - 1] = (torch.full_like(data[K - 1][0], float("nan")), data[K - 1][1])
    step = ft.every(ft.train_step(loss_fn),
                    lambda s, m: _unfreeze(s) if s.step == K else None, every_n_steps=1)
    start = ft.TrainState.create(_net(), ft.optim.adamw(1e-2)).freeze("backbone.*")
    with pytest.raises(ft.NonFiniteLossError, match=f"step {K - 1}"):
        ft.fit(step, start, data, epochs=1, logger=False, checkpoint=False, progress=False)


def _unfreeze(s: ft.TrainState) -> ft.TrainState:
    return s.unfreeze("backbone.*", lr=1e-3)


def test_checkpoint_and_resume_after_an_unfreeze(tmp_path: Path) -> None:
    def fresh() -> ft.TrainState:
        return ft.TrainState.create(_net(), ft.optim.adamw(1e-2)).freeze("backbone.*")
    whole = _ft(fresh(), _unfreeze)
    part = _ft(fresh(), _unfreeze, steps=K + 3)
    path = ft.save(tmp_path / "a.ckpt", part)
    loaded = ft.load(path, like=fresh())  # the unfreeze is redone on like, then restored
    assert tensors_equal(loaded.opt_state["adamw"], part.opt_state["adamw"])
    assert loaded.optimizer.transforms[0].groups.settings(1)["lr"] == 1e-3
    resumed = _ft(loaded, _unfreeze)  # the hook does not fire again (step > K)
    assert tensors_equal(resumed.params, whole.params)
    assert tensors_equal(resumed.opt_state["adamw"], whole.opt_state["adamw"])
    # a state already unfrozen (the same changes) loads as it is
    assert ft.load(path, like=_unfreeze(fresh())).step == K + 3


def test_resume_through_fit_checkpoints(tmp_path: Path) -> None:
    """with_checkpointing saves at the step the hook unfreezes (its save is carried over to
    the new binding); fit(resume=...) from a fresh frozen state continues exactly."""
    def fresh() -> ft.TrainState:
        return ft.TrainState.create(_net(), ft.optim.adamw(1e-2)).freeze("backbone.*")

    def stack():
        def at_k(s, metrics):
            return _unfreeze(s) if s.step == K else None
        return ft.every(ft.train_step(loss_fn), at_k, every_n_steps=1)
    whole = ft.fit(stack(), fresh(), _data(), max_steps=N, logger=False, checkpoint=False,
                   progress=False)
    ckpt = ft.with_checkpointing(stack(), str(tmp_path / "ck"), every_n_steps=K,
                                 save_top_k=-1, save_last=False)
    ft.fit(ckpt, fresh(), _data(), max_steps=K + 2, logger=False, progress=False)
    files = sorted(os.listdir(tmp_path / "ck"))
    saved = [f for f in files if f.endswith(f"-{K}.ckpt")]
    assert len(saved) == 1, files  # saved at step K, where the hook unfroze
    assert ft.load(tmp_path / "ck" / saved[0], like=fresh()).frozen == []
    resumed = ft.fit(stack(), fresh(), _data(), max_steps=N, logger=False, checkpoint=False,
                     progress=False, resume=str(tmp_path / "ck" / saved[0]))
    assert tensors_equal(resumed.params, whole.params)


def test_load_refuses_a_change_it_cannot_redo(tmp_path: Path) -> None:
    state = ft.TrainState.create(_net(), ft.optim.adamw(1e-2))
    swapped = state.with_optimizer(ft.optim.sgd(0.1))
    path = ft.save(tmp_path / "s.ckpt", swapped)
    with pytest.raises(ft.CheckpointError, match=r"with_optimizer.*build `like` with that"):
        ft.load(path, like=ft.TrainState.create(_net(), ft.optim.adamw(1e-2)))
    assert ft.load(path, like=swapped).step == 0
    other = ft.save(tmp_path / "o.ckpt", state.freeze("head.*"))
    with pytest.raises(ft.CheckpointError, match="not where that run began"):
        ft.load(other, like=state.freeze("backbone.*"))


def test_load_checks_the_slot_it_reads(tmp_path: Path) -> None:
    state = ft.TrainState.create(_net(), ft.optim.adamw(1e-2))
    bad = state.replace(slots={"finetune": {"log": [{"op": "rm -rf"}], "frozen": []}})
    path = ft.save(tmp_path / "b.ckpt", bad)
    with pytest.raises(ft.CheckpointError, match="unknown change 'rm -rf'"):
        ft.load(path, like=state)


SCRIPT = Path(__file__).parent / "scripts" / "ddp_finetune.py"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_unfreeze_under_torchrun(tmp_path: Path, optimizer: str) -> None:
    """2 ranks, with_ddp, unfreeze at step 2: the backbone's gradients are averaged from
    then on (DDP rebuilt for the new trainable set), so both ranks end bitwise equal, and
    close to one process on the whole batch. rmsprop: ft.optim.from_torch(RMSprop) under
    with_ddp (torch's own optimizer on DDP-averaged gradients)."""
    # the processes import the ftrain this test imports (not whatever is installed)
    root = str(Path(ft.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    single = tmp_path / "single"
    single.mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), str(single), "8", "6", "2", optimizer],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(SCRIPT), str(tmp_path), "4", "6", "2",
                           optimizer],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ref = torch.load(single / "rank0.pt", weights_only=True)
    assert r0["trained"] == r1["trained"] == sorted(ref["params"])
    assert tensors_equal(r0["params"], r1["params"])
    start = _start_backbone()
    assert not torch.equal(r0["params"]["backbone.0.weight"], start)  # it trained
    for name, value in ref["params"].items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-5, atol=1e-6)


def _start_backbone() -> torch.Tensor:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import ddp_finetune
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    return ddp_finetune.Net().backbone[0].weight.detach()
