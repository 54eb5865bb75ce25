"""Trained by tests/test_fsdp_resume.py: a `with_fsdp` run with sharded checkpoints every 3
steps, resumed (resume="auto") on another number of processes. The global batch is 8
samples whatever the world (8 // world per rank), one epoch of 96 samples (12 steps).
Every call of the loss function appends the sample ids it trained on.

usage: fsdp_resume.py OUT TAG DIR [--plain] [--resume auto|PATH] [--async]
                      [--kill-rank R --kill-call K] [--sharded-again] [--meta]

`--plain`: no with_fsdp (one process reads the sharded checkpoint whole); `--async`:
save_async=True; `--kill-rank/--kill-call`: that rank SIGKILLs itself in its K-th loss
call (the save of step 6 is then in flight); `--sharded-again`: after the fit, fit again
from the returned (sharded) state and from `ft.load(like=<that state>)` for 0 steps more,
checking the binding of an already-sharded state; `--meta`: the model is built on the meta
device, so the resumed state is read straight into each rank's shards. Rank 0 writes
OUT/TAG.pt (the full parameters and the final step).
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("tag")
    parser.add_argument("dir")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--async", dest="save_async", action="store_true")
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-call", type=int, default=0)
    parser.add_argument("--sharded-again", action="store_true")
    parser.add_argument("--extras", action="store_true")
    parser.add_argument("--meta", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.extras:
        return extras(args.out, args.tag, rank, world)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 5, generator=g)
    data = DataLoader(TensorDataset(x, (x.sum(1) > 0).long(), torch.arange(96)),
                      batch_size=8 // world, shuffle=True)
    seen = open(f"{args.out}/{args.tag}-rank{rank}.txt", "a")
    calls = [0]

    def loss_fn(m, b):
        calls[0] += 1
        if rank == args.kill_rank and calls[0] == args.kill_call:
            os.kill(os.getpid(), signal.SIGKILL)  # really: no clean-up, no exit handler
        seen.write(" ".join(str(int(i)) for i in b[2]) + "\n")
        seen.flush()
        return nn.functional.cross_entropy(m(b[0]), b[1])

    def fresh() -> ft.TrainState:
        torch.manual_seed(0)  # the last layer's 2 rows: uneven (empty) shards on 4 ranks
        with torch.device("meta" if args.meta else "cpu"):
            model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
        opt = ft.optim.chain(ft.optim.clip_grad_norm(1.0), ft.optim.adamw(1e-2))
        return ft.TrainState.create(model, opt, seed=3)

    core = ft.train_step(loss_fn)
    inner = core if args.plain else ft.with_fsdp(core)
    step = ft.with_checkpointing(inner, args.dir, every_n_steps=3, every_n_epochs=None,
                                 save_top_k=-1, save_async=args.save_async)
    state = ft.fit(step, fresh(), data, epochs=1, logger=False, progress=False,
                   resume=args.resume)
    result: dict = {"step": state.step, "loop": dict(state.slots["loop"])}
    if args.sharded_again:
        from ftrain.parallel.fsdp import is_sharded

        assert is_sharded(state) == (world > 1)
        result["sharded"] = is_sharded(state)
        # a sharded state bound again: gathered once, sharded afresh; 0 steps to go
        again = ft.fit(ft.with_fsdp(core), state, data, epochs=1, logger=False,
                       progress=False, checkpoint=False, donate=False)
        loaded = ft.load(os.path.join(args.dir, "last.ckpt"), like=state)
        assert is_sharded(loaded) == (world > 1)
        more = ft.fit(ft.with_fsdp(core), loaded, data, epochs=2, logger=False,
                      progress=False, checkpoint=False)  # one more epoch, from DTensors
        result["again"] = {k: _full(v) for k, v in again.params.items()}
        result["more_step"] = more.step
        result["more"] = {k: _full(v) for k, v in more.params.items()}
    result["params"] = {k: _full(v) for k, v in state.params.items()}  # every rank gathers
    if rank == 0:
        torch.save(result, f"{args.out}/{args.tag}.pt")
    print(f"rank {rank} ended at step {state.step}", flush=True)


def extras(out: str, tag: str, rank: int, world: int) -> None:
    """A two-model state under with_fsdp (epoch order: no shuffle), saved at the end to
    OUT/TAG-models.ckpt; inside the loop at step 6, ft.predict (3 batches: 2 on rank 0,
    1 on rank 1; 1 batch: none on rank 1) and ft.evaluate on 1, 3 and 4 batches;
    ft.compile(fallback=False) of a with_fsdp step on several processes."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 5, generator=g), torch.randn(96, 2, generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=8 // world)
    val = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    torch.manual_seed(0)
    state = ft.TrainState.create({"enc": nn.Linear(5, 16), "head": nn.Linear(16, 2)},
                                 {"enc": ft.optim.adamw(1e-2), "head": ft.optim.sgd(0.1, 0.9)})

    def loss_fn(m, b):
        return nn.functional.mse_loss(m["head"](torch.tanh(m["enc"](b[0]))), b[1])

    def forward(m, b):
        return m["head"](torch.tanh(m["enc"](b[0])))

    ev = ft.eval_step(loss_fn)
    result: dict = {}
    import ftrain.parallel.fsdp as fsdp
    gathered = []  # a spy on the full-weights fallback: unequal shares must not use it
    unshard = fsdp.unshard
    fsdp.unshard = lambda s: (gathered.append(1), unshard(s))[1]
    for state, _ in ft.iterate(ft.with_fsdp(ft.train_step(loss_fn)), state, data, epochs=1):
        if state.step == 6:
            folder = ft.predict(state, val[:3], forward, write_to=f"{out}/{tag}-pred")
            result["pred"] = torch.cat(ft.read_predictions(folder))
            folder = ft.predict(state, val[:1], forward, write_to=f"{out}/{tag}-pred1")
            result["pred1"] = torch.cat(ft.read_predictions(folder))
            result["eval1"] = ft.evaluate(ev, state, val[:1])["loss"]
            result["eval3"] = ft.evaluate(ev, state, val[:3])["loss"]
            result["eval4"] = ft.evaluate(ev, state, val)["loss"]
    fsdp.unshard = unshard
    result["gathered"] = len(gathered)
    from ftrain.parallel.fsdp import is_sharded

    result["sharded"] = is_sharded(state)
    result["params"] = {m: {k: _full(v).clone() for k, v in p.items()}
                        for m, p in state.params.items()}
    ft.save(f"{out}/{tag}-models.ckpt", state)  # 2 ranks: a sharded folder
    try:  # last: the refusal takes the process group down (a failed rank stops all)
        compiled = ft.compile(ft.with_fsdp(ft.train_step(loss_fn)), fallback=False)
        ft.fit(compiled, state, data, epochs=2, logger=False, progress=False,
               checkpoint=False)
        result["compile"] = "ran"
    except Exception as err:  # ConfigError, or PeerFailedError quoting it
        result["compile"] = f"{type(err).__name__}: {err}"
    if rank == 0:
        torch.save(result, f"{out}/{tag}.pt")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # collective


if __name__ == "__main__":
    main()
