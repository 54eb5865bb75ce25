"""`ft.with_fsdp` (issue 16, part 1): FSDP2 on 2 ranks under real torchrun against the
unsharded step on one process; on one process the layer does nothing; bad options fail
at construction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tensors_equal, torchrun_env
from torch import nn

import ftrain as ft
from ftrain.errors import ConfigError
from ftrain.parallel.fsdp import is_sharded

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_train.py"


def _loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(m(b[0]), b[1])


def _state() -> ft.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = ft.optim.chain(ft.optim.clip_grad_norm(0.5), ft.optim.adamw(1e-2))
    return ft.TrainState.create(model, opt, seed=1)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
            for _ in range(6)]


def test_one_process_equals_the_plain_step_bitwise() -> None:
    """On one process with_fsdp does nothing: a loop and a direct call give bitwise the
    plain step's numbers, and the state stays plain tensors."""
    plain = ft.with_accumulation(ft.train_step(_loss), 2)
    sharded = ft.with_fsdp(plain)
    kw = dict(epochs=2, logger=False, checkpoint=False, progress=False)
    a = ft.fit(plain, _state(), _data(), **kw)
    b = ft.fit(sharded, _state(), _data(), **kw)
    assert tensors_equal(a.params, b.params) and tensors_equal(a.opt_state, b.opt_state)
    assert not is_sharded(b)
    s0 = _state()
    (c, mc), (d, md) = plain(s0, _data()[0]), sharded(s0, _data()[0])
    assert tensors_equal(c.params, d.params) and torch.equal(mc["loss"], md["loss"])
    assert not torch.equal(c.params["0.weight"], s0.params["0.weight"])  # it trained


def test_ddp_and_fsdp_are_exclusive() -> None:
    core = ft.train_step(_loss)
    for stack in (lambda: ft.with_ddp(ft.with_fsdp(core)),
                  lambda: ft.with_fsdp(ft.with_ddp(core))):
        with pytest.raises(ConfigError, match="with_ddp and with_fsdp"):
            stack()


def test_float16_is_refused_bfloat16_accepted() -> None:
    core = ft.with_fsdp(ft.train_step(_loss))
    with pytest.raises(ConfigError, match="float16"):
        ft.with_amp(core, torch.float16)
    step = ft.with_amp(core, torch.bfloat16)
    state, metrics = step(_state(), _data()[0])
    assert torch.isfinite(metrics["loss"]) and state.params["0.weight"].dtype == torch.float32


def test_bad_shard_policy_names_the_entries() -> None:
    """An entry matching no submodule fails at init (on one process too), naming it."""
    step = ft.with_fsdp(ft.train_step(_loss), shard=["blocks.*", nn.Conv2d, "0"])
    with pytest.raises(ConfigError, match=r"\['blocks\.\*', 'Conv2d'\]"):
        ft.fit(step, _state(), _data(), epochs=1, logger=False, checkpoint=False,
               progress=False)
    with pytest.raises(ConfigError, match="module classes and name patterns"):
        ft.with_fsdp(ft.train_step(_loss), shard=[3])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="list of module classes"):
        ft.with_fsdp(ft.train_step(_loss), shard="0")  # type: ignore[arg-type]
    good = ft.with_fsdp(ft.train_step(_loss), shard=[nn.Linear, "2"])
    ft.fit(good, _state(), _data(), epochs=1, logger=False, checkpoint=False,
           progress=False)


def test_manual_step_is_refused() -> None:
    with pytest.raises(ConfigError, match="train_step cores"):
        ft.with_fsdp(ft.manual_step(lambda m, b: {}))




def _run(mode: str, out: Path, ranks: int) -> list[dict]:
    cmd = [sys.executable, str(SCRIPT), mode, str(out)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", *cmd[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=torchrun_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(ranks)]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("mode", ["adamw", "torch"])
def test_two_ranks_match_one_process(tmp_path: Path, mode: str) -> None:
    """20 steps of AdamW (a schedule; or torch's AdamW via from_torch), clipping and 2
    micro-batches on 2 ranks under FSDP = one process on the same global batches; each
    rank holds about half of the parameters and optimizer state. `torch` also checkpoints
    two blocks' activations (recomputed inside FSDP's gathers). `adamw` builds the model
    of the 2-rank run on the meta device: each rank makes only its shards real, with the
    values of the one-process run's CPU build."""
    (ref,) = _run(mode, tmp_path / "ref", 1)
    r0, r1 = _run("meta" if mode == "adamw" else mode, tmp_path / "fsdp", 2)
    assert r0["step"] == r1["step"] == ref["step"] == 20
    assert r0["sharded"] and r0["types"] == ["DTensor"] and not ref["sharded"]
    for name, value in ref["params"].items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["params"][name], r1["params"][name])
    total = sum(ref["local"].values())
    for r in (r0, r1):
        assert abs(sum(r["local"].values()) - total / 2) <= 0.1 * total
        assert abs(r["opt_local"] - ref["opt_local"] / 2) <= 0.1 * ref["opt_local"]
    assert sum(r0["local"].values()) + sum(r1["local"].values()) == total


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_validation_logging_early_stop_and_bf16(tmp_path: Path) -> None:
    """with_validation + with_logging (grad norm) + early_stop complete on 2 ranks and
    log what one process logs (with offload=True); with_amp(bfloat16) trains with fp32
    shards."""
    (ref,) = _run("validate", tmp_path / "ref", 1)
    r0, r1 = _run("validate", tmp_path / "fsdp", 2)
    assert r0["step"] == r1["step"] == ref["step"] < 5 * 10  # stopped early, together
    assert [s for s, _ in r0["logged"]] == [s for s, _ in ref["logged"]] and r0["logged"]
    assert r1["logged"] == []  # rank 0 writes the logs
    keys = {k for _, m in r0["logged"] for k in m}
    assert {"grad_norm", "val_loss", "loss"} <= keys
    for (_, got), (_, want) in zip(r0["logged"], ref["logged"]):
        assert got.keys() == want.keys()
        for k in got:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    b0, b1 = _run("bf16", tmp_path / "bf16", 2)
    assert b0["dtypes"] == ["torch.float32"] and b0["sharded"]
    assert b0["loss"] == b1["loss"] < 1.0  # trained, evaluated on gathered weights
