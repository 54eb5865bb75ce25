"""with_ddp's DistributedDataParallel options under real torchrun processes (gloo on this
CPU): gradients as views of DDP's all-reduce buckets and a static graph train bitwise as
the plain layout does, through ftrain's update (which sets `p.grad = None` after each
step), accumulation's `no_sync`, float16 loss scaling, clipping, the logged gradient
norm, a direct (pure) call, and a checkpoint resumed.

This file is also the worker: the test launches it under torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.slow,  # real torchrun processes
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]

PLAIN = {"gradient_as_bucket_view": False, "static_graph": False}  # torch's own defaults
VIEWS = {"gradient_as_bucket_view": True}
# case -> what it trains; each runs under PLAIN, VIEWS and the layer's defaults
CASES = ("fit", "clip-logged", "accum-fp16", "resume", "pure")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp-options")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", __file__, str(out)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("case", CASES)
def test_bucket_view_gradients_train_bitwise_as_the_plain_layout(ranks, case):
    for r in ranks:
        plain, views = r[case]["plain"], r[case]["views"]
        assert plain["step"] == views["step"] > 0
        for name, value in plain["params"].items():
            assert torch.equal(views["params"][name], value), (case, name)
    for name, value in ranks[0][case]["views"]["params"].items():  # ranks in lockstep
        assert torch.equal(ranks[1][case]["views"]["params"][name], value), (case, name)
    # the run trained: params moved from the initial ones
    first = ranks[0]["initial"]
    assert any(not torch.equal(first[n], v) for n, v in
               ranks[0][case]["plain"]["params"].items()), case


@pytest.mark.parametrize("case", CASES)
def test_the_default_layout_trains_bitwise_as_torchs_default(ranks, case):
    for r in ranks:
        for name, value in r[case]["plain"]["params"].items():
            assert torch.equal(r[case]["default"]["params"][name], value), (case, name)


def test_with_bucket_views_the_update_reads_gradients_inside_one_bucket(ranks):
    """The option takes effect: during every update under VIEWS all gradients share one
    storage (DDP's bucket: this small model fits one), under PLAIN each has its own,
    although ftrain sets them to None after every update."""
    n_params = len(ranks[0]["initial"])
    for r in ranks:
        assert r["storages"]["views"] == [1] * 6
        assert r["storages"]["plain"] == [n_params] * 6


def test_a_static_graph_trains_bitwise_as_the_default(ranks):
    for r in ranks:
        for name, value in r["fit"]["plain"]["params"].items():
            assert torch.equal(r["static"]["params"][name], value), name


# -- the worker (each rank, under torchrun) -------------------------------------------------

def _worker(out: str) -> None:
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import ftrain as ft

    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 5, generator=g)
    data = TensorDataset(x, (x.sum(1) > 0).long())

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))

    def loss_fn(m: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=8, shuffle=True)  # with_ddp shards it

    def fit(opts: dict[str, Any], case: str, where: str) -> dict[str, Any]:
        step = ft.with_ddp(ft.train_step(loss_fn), **opts)
        optimizer = ft.optim.adam(1e-2)
        if case == "accum-fp16":  # DDP's no_sync for the first micro-batch, unscale in place
            step = ft.with_accumulation(ft.with_amp(step, torch.float16, init_scale=1024.0),
                                        2)
        if case == "clip-logged":
            optimizer = ft.optim.chain(ft.optim.clip_grad_norm(0.05), ft.optim.adam(1e-2))
            step = ft.with_logging(step, [ft.loggers.CSV(f"{where}/logs")], every_n_steps=1,
                                   log_grad_norm=True)
        state = ft.TrainState.create(model(), optimizer, seed=3)
        if case == "resume":  # 4 steps, a checkpoint, a fresh process state resumes to 8
            saving = ft.with_checkpointing(step, f"{where}/ckpt", every_n_steps=2)
            ft.fit(saving, state, loader(), max_steps=4, progress=False, logger=False)
            state = ft.TrainState.create(model(), optimizer, seed=3)
            state = ft.fit(saving, state, loader(), max_steps=8, progress=False,
                           logger=False, resume="auto")
            assert state.step == 8
        elif case == "pure":  # direct calls: explicit all-reduce, DDP's module unused
            state = ft.fit(step, state, loader(), max_steps=3, progress=False, logger=False,
                           checkpoint=False)
            mine = (x[rank::2][:8], (x[rank::2][:8].sum(1) > 0).long())
            for _ in range(2):
                state, _ = step(state, mine)
        else:
            state = ft.fit(step, state, loader(), max_steps=8, progress=False, logger=False,
                           checkpoint=False)
        return {"step": state.step, "params": {k: v.clone() for k, v in state.params.items()}}

    class Probe:
        """An optimizer transform that counts the storages the gradients live in."""

        name = "probe"

        def __init__(self) -> None:
            self.seen: list[int] = []

        def init(self, params: Any) -> dict[str, Any]:
            return {}

        def apply(self, params: Any, state: Any, count: Any, found_inf: Any) -> None:
            self.seen.append(len({p.grad.untyped_storage().data_ptr()
                                  for p in params.values() if p.grad is not None}))

    def storages(opts: dict[str, Any]) -> list[int]:
        probe = Probe()
        step = ft.with_ddp(ft.train_step(loss_fn), **opts)
        state = ft.TrainState.create(model(), ft.optim.chain(probe, ft.optim.adam(1e-2)),
                                     seed=3)
        ft.fit(step, state, loader(), max_steps=6, progress=False, logger=False,
               checkpoint=False)
        return probe.seen

    results: dict[str, Any] = {
        "initial": {k: v.detach().clone() for k, v in model().state_dict().items()}}
    for case in CASES:
        results[case] = {label: fit(opts, case, f"{out}/{case}-{label}")
                         for label, opts in (("plain", PLAIN), ("views", VIEWS),
                                             ("default", {}))}
    results["static"] = fit({"static_graph": True}, "fit", f"{out}/static")
    results["storages"] = {"plain": storages(PLAIN), "views": storages(VIEWS)}
    torch.save(results, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    _worker(sys.argv[1])
