"""Run by tests/test_sync_batchnorm.py under torchrun (2 processes, gloo backend).

usage: PYTHONPATH=<repo root> torchrun --standalone --nproc_per_node=2 ddp_syncbn.py OUT MODE
(no ftrain install needed; plain `python` runs one process, where nothing is synced)

MODE cpu: on CPU processes `with_ddp(sync_batchnorm=True)` is refused at init with a
  ConfigError on every rank, before the process group is joined; the state passed in is
  unchanged; the same run without sync_batchnorm then trains, and a direct (pure) call of
  the synced step is refused the same way. Writes OUT/rank<r>.pt.
MODE cuda: both ranks on cuda:0 (gloo: NCCL refuses two ranks on one device). One step
  on rank r's shard (samples r, r + 2, ... of the first 8) must leave BatchNorm's running
  statistics and the parameters those of one process stepping on all 8 samples: in a
  loop (DDP + SyncBatchNorm), as a direct (pure) call, and as a manual step; without
  sync_batchnorm they are the rank's own. Checkpoints stay plain: the trained state's
  template is BatchNorm1d, and rank 0 writes OUT/synced.ckpt (loaded by the test into a
  plain CPU state). Writes OUT/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft
from ftrain.core.bind import binding_of

OFF = {"logger": False, "checkpoint": False, "progress": False}


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                               torch.nn.ReLU(), torch.nn.Linear(6, 1))


def mse(model: Any, batch: Any) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g) * 3 + 1  # statistics far from BatchNorm's (0, 1)
    return x.to(device), torch.randn(16, 1, generator=g).to(device)


def snapshot(state: ft.TrainState) -> dict[str, Any]:
    return {"params": {k: v.detach().cpu().clone() for k, v in state.params.items()},
            "buffers": {k: v.detach().cpu().clone() for k, v in state.buffers.items()}}


def cpu(out: str, rank: int) -> dict[str, Any]:
    x, y = data(torch.device("cpu"))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    state = ft.TrainState.create(build(), ft.optim.sgd(0.1))
    before = snapshot(state)
    synced = ft.with_ddp(ft.train_step(mse), sync_batchnorm=True)
    result: dict[str, Any] = {}
    try:
        ft.fit(synced, state, loader, max_steps=2, donate=False, **OFF)
        result["error"] = None
    except ft.ConfigError as err:
        result["error"] = str(err)
    result["joined_before_error"] = dist.is_initialized()
    after = snapshot(state)
    result["unchanged"] = all(torch.equal(before[k][n], after[k][n])
                              for k in before for n in before[k])
    result["template"] = type(state.model[1]).__name__
    plain = ft.fit(ft.with_ddp(ft.train_step(mse)), state, loader, max_steps=2,
                   donate=False, **OFF)
    result["plain_steps"] = plain.step
    try:  # the group is up now: a direct call of the synced step
        synced(state, (x[rank:8:2], y[rank:8:2]))
        result["pure_error"] = None
    except ft.ConfigError as err:
        result["pure_error"] = str(err)
    return result


def cuda(out: str, rank: int) -> dict[str, Any]:
    device = torch.device("cuda", 0)  # both ranks: this test needs one GPU only
    torch.cuda.set_device(device)
    x, y = data(device)
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=4)  # rank r: r, r+2..
    mine = (x[rank:8:2], y[rank:8:2])  # this rank's first batch, as the loader deals it
    fresh = ft.TrainState.create(build(), ft.optim.sgd(0.1)).to(device)
    result: dict[str, Any] = {"initial": snapshot(fresh)}

    # one process seeing the whole global batch of 8 (no collective: plain BatchNorm)
    alone, _ = ft.train_step(mse)(fresh, (x[:8], y[:8]))
    result["alone"] = snapshot(alone)
    own, _ = ft.train_step(mse)(fresh, mine)  # this rank's batch alone
    result["own"] = snapshot(own)

    def ddp(step: Any, sync: bool) -> Any:
        return ft.with_ddp(step, backend="gloo", sync_batchnorm=sync)

    for running, _ in ft.iterate(ddp(ft.train_step(mse), True), fresh, loader, max_steps=1,
                                 donate=False):
        bound = binding_of(running).modules[None]
        result["bound"] = type(bound[1]).__name__  # the loop's modules: converted
        # eval mode uses the running statistics, nothing synced: as plain BatchNorm
        inside = ft.predict(running, [x[:5]], distributed=False)  # the loop's modules
        plain = ft.predict(running.copy(), [x[:5]], distributed=False)  # a plain binding
        result["eval_equal"] = torch.equal(inside[0], plain[0])
        synced = running.copy()
    result["loop"] = snapshot(synced)
    result["template"] = type(synced.model[1]).__name__  # the state keeps plain BatchNorm
    result["input_template"] = type(fresh.model[1]).__name__
    result["input_unchanged"] = all(
        torch.equal(result["initial"][k][n], v)
        for k, part in snapshot(fresh).items() for n, v in part.items())
    unsynced = ft.fit(ddp(ft.train_step(mse), False), fresh, loader, max_steps=1,
                      donate=False, **OFF)
    result["unsynced"] = snapshot(unsynced)
    pure, _ = ddp(ft.train_step(mse), True)(fresh, mine)  # direct call: synced too
    result["pure"] = snapshot(pure)

    def manual(m: Any, batch: Any) -> dict[str, torch.Tensor]:
        loss = mse(m.model, batch)
        m.update(loss)
        return {"loss": loss}
    handmade = ft.fit(ddp(ft.manual_step(manual), True), fresh, loader, max_steps=1,
                      donate=False, **OFF)
    result["manual"] = snapshot(handmade)
    if rank == 0:
        ft.save(os.path.join(out, "synced.ckpt"), synced)
    if dist.is_initialized():  # plain `python`: one process, nothing synced or waited for
        dist.barrier()
    return result


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    result = cpu(out, rank) if mode == "cpu" else cuda(out, rank)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
