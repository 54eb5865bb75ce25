"""Sharded checkpoints under torchrun (tests/test_sharded_checkpoint.py).

usage: dcp_ckpt.py MODE DIR
  save   (any world size): train 2 steps, shard params and param-shaped optimizer state as
         FSDP2 does (Shard(0) on a 1-D mesh), ft.save the sharded state to DIR/w<world>.ckpt,
         the plain state to DIR/ref<world>.ckpt; load every w*.ckpt found back into a
         sharded `like` (resharding) and check it equals its reference; an async save
         checks that training on after it does not change what it wrote; with_checkpointing
         keeps the top 1 and last.ckpt as folders.
  kill   (2 ranks): a sync save to DIR/good.ckpt, then an async one to DIR/bad.ckpt during
         which rank 1 SIGKILLs itself.
  plain  (one process, no process group): load DIR/w2.ckpt into a plain `like`,
         consolidate it, load that and export it to ONNX.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn

import ftrain as ft
from ftrain.checkpointing import sharded

mode, out = sys.argv[1], sys.argv[2]
WIDTH = 128


def fresh() -> ft.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 4))
    return ft.TrainState.create(model, ft.optim.adamw(1e-2), seed=3)


def trained() -> ft.TrainState:
    step = ft.train_step(lambda m, b: m(b).pow(2).mean())
    state = fresh()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        state, _ = step(state, torch.randn(8, WIDTH, generator=g))
    return state.replace(slots={**state.slots, "note": {"tensor": torch.arange(3), "n": 1}})


def shard(state: ft.TrainState) -> ft.TrainState:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def sh(t: object) -> object:  # param-shaped: sharded; 0-d counters stay replicated
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return distribute_tensor(t, mesh, [Shard(0)])
        return t

    tm = torch.utils._pytree.tree_map
    return state.replace(params=tm(sh, state.params), opt_state=tm(sh, state.opt_state))


def full(tree: object) -> object:
    from torch.distributed.tensor import DTensor

    return torch.utils._pytree.tree_map(
        lambda t: t.full_tensor().clone() if isinstance(t, DTensor) else t, tree)


def equal(a: ft.TrainState, b: ft.TrainState) -> bool:
    la = torch.utils._pytree.tree_leaves((full(a.params), full(a.opt_state)))
    lb = torch.utils._pytree.tree_leaves((full(b.params), full(b.opt_state)))
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb)) \
        and a.step == b.step and a.seed == b.seed


if mode == "plain":
    like = fresh()
    ref = ft.load(os.path.join(out, "ref2.ckpt"), like=like)
    got = ft.load(os.path.join(out, "w2.ckpt"), like=like)
    assert equal(got, ref) and torch.equal(got.slots["note"]["tensor"], torch.arange(3))
    one = ft.consolidate(os.path.join(out, "w2.ckpt"), os.path.join(out, "one.ckpt"))
    assert equal(ft.load(one, like=like), ref)
    ft.export.onnx(ft.load(one, like=like), torch.randn(2, WIDTH),
                   os.path.join(out, "m.onnx"))
    print(json.dumps({"ok": True}))
    sys.exit(0)

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
state = trained()
big = shard(state)

if mode == "kill":
    ft.save(os.path.join(out, "good.ckpt"), big)
    ft.save(os.path.join(out, "bad.ckpt"), big.replace(step=99), save_async=True)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the writer thread is running
    sharded.wait()
    raise SystemExit("unreachable: the save cannot finish without rank 1")

# save: every rank its own shards
path = ft.save(os.path.join(out, f"w{world}.ckpt"), big, hparams={"width": WIDTH})
if rank == 0:
    ft.save(os.path.join(out, f"ref{world}.ckpt"), state)
dist.barrier()
sizes = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
for name in sorted(os.listdir(out)):  # every sharded checkpoint, from any world size
    if name.startswith("w") and name.endswith(".ckpt"):
        ref = ft.load(os.path.join(out, "ref" + name[1:]), like=fresh())
        got = ft.load(os.path.join(out, name), like=shard(fresh()))
        assert isinstance(got.params["0.weight"], torch.distributed.tensor.DTensor)
        assert equal(got, ref), name
        assert got.slots["note"]["n"] == 1 and ft.load_hparams(os.path.join(out, name)) \
            == {"width": WIDTH}

# async: training on (in place) after the save starts does not change what it wrote
before = full(big.params)
later = ft.save(os.path.join(out, "async.ckpt"), big.replace(step=7), save_async=True)
for t in torch.utils._pytree.tree_leaves(big.params):
    t.to_local().add_(1.0)  # what an in-place optimizer update does
assert sharded.pending_path() is not None
sharded.wait()
back = ft.load(later, like=shard(fresh()))
assert back.step == 7
assert all(torch.equal(full(back.params)[k], before[k]) for k in before)

# with_checkpointing: top 1 and last.ckpt as folders; the one out of the top k is deleted
layer = ft.with_checkpointing(ft.train_step(lambda m, b: m(b).sum()),
                              os.path.join(out, f"run{world}"), save_top_k=1,
                              save_async=True)
s1 = layer.save_now(big.replace(step=1))
s2 = layer.save_now(s1.replace(step=2))
sharded.wait()
layer.at_close(s2)
dist.barrier()
folder = os.path.join(out, f"run{world}")
run = sorted(e for e in os.listdir(folder) if not e.startswith("."))
if rank == 0:
    print(json.dumps({"world": world, "sizes": sizes, "run": run,
                      "best": os.path.basename(ft.checkpoints(folder).best)}))
dist.destroy_process_group()
