"""Train under `ft.with_fsdp` (torchrun, 2 processes) or as the unsharded reference (one
process): tests/test_fsdp.py compares the two.

    python fsdp_train.py MODE OUT     MODE: adamw | meta | torch | validate | bf16

`adamw`: AdamW with a schedule, clipping and accumulation (2 micro-batches), 20 steps;
`meta`: `adamw` with the model built on the meta device (with_fsdp makes it real);
`torch`: the same with `ft.optim.from_torch(torch.optim.AdamW)` and activation
checkpointing of two Linear blocks (under FSDP2's hooks); `validate`:
with_validation, logging (grad norm) and early_stop; `bf16`: `adamw` under
with_amp(torch.bfloat16). On several ranks each rank writes the full parameters (gathered)
and its local shard sizes to OUT.<rank>; one process writes OUT.0.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import ftrain as ft
from ftrain.parallel.fsdp import is_sharded

mode, out = sys.argv[1], sys.argv[2]
meta, mode = mode == "meta", "adamw" if mode == "meta" else mode
torch.manual_seed(3)  # the state's seed: a meta-device model gets the same initial values
with torch.device("meta" if meta else "cpu"):
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 3))
g = torch.Generator().manual_seed(0)
X = torch.randn(320, 8, generator=g)
Y = torch.randn(320, 3, generator=g)
train = torch.utils.data.TensorDataset(X, Y)


def loss_fn(m, b):
    return nn.functional.mse_loss(m(b[0]), b[1])


sched = ft.optim.schedules.cosine_decay(1e-2, 40)
if mode == "torch":
    opt = ft.optim.chain(ft.optim.clip_grad_norm(0.5),
                         ft.optim.from_torch(torch.optim.AdamW, lr=1e-2, weight_decay=0.1))
else:
    opt = ft.optim.chain(ft.optim.clip_grad_norm(0.5), ft.optim.adamw(sched))
state = ft.TrainState.create(model, opt, seed=3)
# validate: shards and the update kept on the CPU (CPUOffloadPolicy; on a CPU-only
# machine a no-op move, so it checks the wiring, not the transfer)
step = ft.with_accumulation(ft.with_fsdp(ft.train_step(loss_fn), offload=mode == "validate"), 2)
if mode == "torch":  # recomputed forwards of sharded blocks: their gathers run outside
    step = ft.with_activation_checkpointing(step, ["0", "2"])
if mode == "bf16":  # MixedPrecisionPolicy: bf16 compute, fp32 shards and reductions
    step = ft.with_amp(step, torch.bfloat16)
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
# the same global batches: 16 per step in total, i.e. 16 / world per rank
loader = torch.utils.data.DataLoader(train, batch_size=16 // world)


class Rec:
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def log_hparams(self, hparams, metrics):
        pass

    def finalize(self):
        pass


rec = Rec()
if mode == "validate":
    ev = ft.eval_step(loss_fn)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:64], Y[:64]),
                                      batch_size=16)
    step = ft.with_validation(step, ev, val)
    step = ft.early_stop(step, monitor="val_loss", patience=1, mode="min", min_delta=10.0)
    step = ft.with_logging(step, [rec], every_n_steps=5, log_grad_norm=True)
    state = ft.fit(step, state, loader, epochs=5, logger=False, checkpoint=False,
                   progress=False)
    result = {"step": state.step, "val": ft.evaluate(ev, state, val) if world == 1 else None}
else:
    state = ft.fit(step, state, loader, max_steps=20, logger=False, checkpoint=False,
                   progress=False)
    result = {"step": state.step, "loss": float(ft.evaluate(ft.eval_step(loss_fn), state,
                                                            loader)["loss"])}
rank = torch.distributed.get_rank() if world > 1 else 0
local = {}
full = {}
for name, t in state.params.items():
    local[name] = t.to_local().numel() if is_sharded(state) else t.numel()
    full[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
opt_local = sum((t.to_local() if hasattr(t, "to_local") else t).numel()
                for t in torch.utils._pytree.tree_leaves(state.opt_state)
                if isinstance(t, torch.Tensor) and t.dim() >= 1)
result.update(dtypes=sorted({str(t.dtype) for t in state.params.values()}),
              logged=rec.logged, sharded=is_sharded(state), params=full, local=local,
              opt_local=opt_local,
              types=sorted({type(t).__name__ for t in state.params.values()}))
torch.save(result, f"{out}.{rank}")
